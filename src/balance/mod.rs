//! Picking a server: one file per algorithm. A balancer is built once from a server set and
//! is immutable; the live state it consults (connection counts, health) lives on the
//! servers.

mod round_robin;

pub use round_robin::RoundRobin;

use crate::config::Balance;

/// A built balancer for one server set.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
}

impl Balancer {
    /// Builds the balancer for servers with these weights (in server order).
    pub fn build(kind: Balance, weights: &[u32]) -> Balancer {
        match kind {
            Balance::RoundRobin => Balancer::RoundRobin(RoundRobin::new(weights)),
        }
    }

    /// Picks the index of a server for which `eligible` holds.
    ///
    /// Returns `None` when no server is eligible. Never scans more than one full cycle.
    #[inline]
    pub fn pick(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(eligible),
        }
    }
}
