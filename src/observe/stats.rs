//! Live counters, updated on the connection path with relaxed atomics and read by the
//! status API and metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::Outcome;

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections accepted and not yet finished.
    pub active: AtomicU64,
    /// Finished connections by [`Outcome::slot`].
    pub finished: [AtomicU64; Outcome::FINAL.len()],
    /// Payload bytes client → server.
    pub bytes_up: AtomicU64,
    /// Payload bytes server → client.
    pub bytes_down: AtomicU64,
}

impl ListenerStats {
    pub fn finish(&self, outcome: Outcome, up: u64, down: u64) {
        if let Some(i) = outcome.slot() {
            self.finished[i].fetch_add(1, Relaxed);
        }
        self.bytes_up.fetch_add(up, Relaxed);
        self.bytes_down.fetch_add(down, Relaxed);
    }

    pub fn finished(&self, outcome: Outcome) -> u64 {
        outcome.slot().map_or(0, |i| self.finished[i].load(Relaxed))
    }
}

/// Counters of one server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections assigned to this server and not yet finished.
    pub active: AtomicU64,
    /// Connections ever assigned.
    pub total: AtomicU64,
    /// Connect attempts that failed or timed out.
    pub connect_failures: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Active health checks passed and failed.
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
}
