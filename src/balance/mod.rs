//! Picking a server: one file per algorithm. A balancer is built once from a server set
//! (addresses and weights) and is immutable; the live state it consults (connection counts,
//! health, limits) is read through [`Servers`] at pick time, so a health flip or a finished
//! connection never rebuilds it.

mod round_robin;

pub use round_robin::RoundRobin;

use crate::config::Balance;

/// What a balancer may ask about the servers of its set, by index (the order they were
/// built with).
pub trait Servers {
    /// May take a new connection now: up, not drained or disabled, below its connection
    /// limit, and not excluded (a server that just failed, on retry).
    fn eligible(&self, i: usize) -> bool;
    /// Live connections assigned to server `i`.
    fn active(&self, i: usize) -> u64;
}

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
            _ => unimplemented!("balance {}", kind.as_str()),
        }
    }

    /// Picks the index of an eligible server. `hash` is the client's key for the hashing
    /// algorithms (see [`hash_ip`]); the others ignore it.
    ///
    /// Returns `None` when no server is eligible.
    #[inline]
    pub fn pick(&self, _hash: u64, servers: &impl Servers) -> Option<usize> {
        match self {
            Balancer::RoundRobin(rr) => rr.pick(|i| servers.eligible(i)),
        }
    }
}
