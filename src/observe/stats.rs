//! Live counters, updated on the connection path with relaxed atomics and read by the
//! status API and metrics.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{Counter, Dropped, Outcome};

/// Counters of one listener.
#[derive(Debug)]
pub struct ListenerStats {
    /// Connections accepted and not yet finished.
    pub active: AtomicU64,
    /// Finished connections by [`Outcome::slot`].
    pub finished: [AtomicU64; Outcome::FINAL.len()],
    /// Payload bytes client → server (of UDP, those through ferry's sockets: see
    /// [`ListenerStats::bytes`]).
    pub bytes_up: Counter,
    /// Payload bytes server → client.
    pub bytes_down: Counter,
    /// TLS handshakes (mode "tls"): full, resumed, failed; and how long they took.
    pub tls_full: AtomicU64,
    pub tls_resumed: AtomicU64,
    pub tls_failed: AtomicU64,
    pub tls_handshake: Histogram,
    /// UDP listeners: datagrams passed on each way, and those dropped by [`Dropped`] (in
    /// the order of [`Dropped::ALL`]).
    pub datagrams_up: Counter,
    pub datagrams_down: Counter,
    pub dropped: [AtomicU64; Dropped::ALL.len()],
    /// The kernel's counts of this listener, once a socket of it is served with the
    /// kernel's UDP path.
    pub kernel: OnceLock<Box<dyn KernelCounts>>,
}

impl Default for ListenerStats {
    fn default() -> Self {
        ListenerStats {
            active: AtomicU64::new(0),
            finished: Default::default(),
            bytes_up: Counter::new(),
            bytes_down: Counter::new(),
            tls_full: AtomicU64::new(0),
            tls_resumed: AtomicU64::new(0),
            tls_failed: AtomicU64::new(0),
            tls_handshake: Histogram::new(HANDSHAKE_BUCKETS),
            datagrams_up: Counter::new(),
            datagrams_down: Counter::new(),
            dropped: Default::default(),
            kernel: OnceLock::new(),
        }
    }
}

impl ListenerStats {
    /// Counts a finished connection. Its bytes were counted as they moved.
    pub fn finish(&self, outcome: Outcome) {
        if let Some(i) = outcome.slot() {
            self.finished[i].fetch_add(1, Relaxed);
        }
    }

    pub fn finished(&self, outcome: Outcome) -> u64 {
        outcome.slot().map_or(0, |i| self.finished[i].load(Relaxed))
    }

    /// Counts a dropped datagram.
    pub fn drop_datagram(&self, why: Dropped) {
        self.dropped[why as usize].fetch_add(1, Relaxed);
    }

    /// Datagrams dropped for `why`.
    pub fn dropped(&self, why: Dropped) -> u64 {
        self.dropped[why as usize].load(Relaxed)
    }

    /// What the kernel relayed for this listener: (datagrams up, bytes up, datagrams
    /// down, bytes down).
    fn in_kernel(&self) -> [u64; 4] {
        self.kernel.get().map_or([0; 4], |k| k.relayed())
    }

    /// Payload bytes each way, through ferry and (UDP) through the kernel.
    pub fn bytes(&self) -> (u64, u64) {
        let k = self.in_kernel();
        (self.bytes_up.get() + k[1], self.bytes_down.get() + k[3])
    }

    /// UDP datagrams relayed each way, and of them, those the kernel relayed.
    pub fn datagrams(&self) -> (u64, u64, u64) {
        let k = self.in_kernel();
        (
            self.datagrams_up.get() + k[0],
            self.datagrams_down.get() + k[2],
            k[0] + k[2],
        )
    }
}

/// Counts kept by the kernel for a listener (its UDP sessions relayed in the kernel),
/// read when shown.
pub trait KernelCounts: Send + Sync + std::fmt::Debug {
    /// The listener's index in the kernel's counts.
    fn index(&self) -> u32;
    /// (datagrams up, bytes up, datagrams down, bytes down)
    fn relayed(&self) -> [u64; 4];
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
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    /// Active health checks passed and failed.
    pub checks_ok: AtomicU64,
    pub checks_failed: AtomicU64,
}

/// A latency histogram with fixed buckets, updated with relaxed atomics (no lock).
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds; the last bucket is +Inf.
    pub bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

/// Buckets for connect times, in seconds.
pub const CONNECT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets for TLS handshake times (from the first byte of the ClientHello), in seconds.
pub const HANDSHAKE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: std::time::Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Relaxed);
    }

    /// (sum in seconds, count, buckets as (upper bound, count in that bucket)), the way the
    /// OpenMetrics encoder takes them: it accumulates the counts itself, and writes `+Inf`
    /// for an upper bound of `f64::MAX`.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Relaxed);
            total += n;
            buckets.push((self.bounds.get(i).copied().unwrap_or(f64::MAX), n));
        }
        (self.sum_ns.load(Relaxed) as f64 / 1e9, total, buckets)
    }
}
