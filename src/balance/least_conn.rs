//! Least connections, weighted: the eligible server with the fewest live connections per
//! unit of weight (`active / weight`, compared as `active_i * w_j < active_j * w_i`, no
//! floats).
//!
//! Ties are broken by where the scan starts, which rotates on every pick (one atomic
//! increment), so equally loaded servers share new connections instead of the first one
//! taking them all. A pick scans every server once; it stops early at an idle eligible server,
//! which no other can beat.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Servers;

#[derive(Debug)]
pub struct LeastConn {
    weights: Box<[u32]>,
    next: AtomicUsize,
}

impl LeastConn {
    pub fn new(weights: &[u32]) -> LeastConn {
        LeastConn {
            weights: weights.into(),
            next: AtomicUsize::new(0),
        }
    }

    /// The least loaded eligible server; `None` when none is eligible.
    #[inline]
    pub fn pick(&self, servers: &impl Servers) -> Option<usize> {
        let start = self.next.fetch_add(1, Relaxed);
        least_loaded(&self.weights, start, servers)
    }
}

/// The eligible server minimising `active / weight`, scanning from `start` (modulo the
/// number of servers) so that of equally loaded servers the first after `start` wins.
///
/// Returns `None` when no server is eligible.
pub(super) fn least_loaded(weights: &[u32], start: usize, servers: &impl Servers) -> Option<usize> {
    let n = weights.len();
    if n == 0 {
        return None;
    }
    let start = start % n;
    let mut best: Option<(usize, u64, u32)> = None;
    for k in 0..n {
        let i = if start + k < n {
            start + k
        } else {
            start + k - n
        };
        if !servers.eligible(i) {
            continue;
        }
        let active = servers.active(i);
        if active == 0 {
            return Some(i);
        }
        let w = weights[i];
        match best {
            Some((_, best_active, best_w)) if !lighter(active, w, best_active, best_w) => {}
            _ => best = Some((i, active, w)),
        }
    }
    best.map(|(i, _, _)| i)
}

/// `a_active / a_weight < b_active / b_weight`, exactly.
#[inline]
pub(super) fn lighter(a_active: u64, a_weight: u32, b_active: u64, b_weight: u32) -> bool {
    u128::from(a_active) * u128::from(b_weight) < u128::from(b_active) * u128::from(a_weight)
}

#[cfg(test)]
mod tests {
    use super::super::testing::Fake;
    use super::*;

    #[test]
    fn picks_fewest() {
        let lc = LeastConn::new(&[1, 1, 1]);
        let servers = Fake::with_active(&[3, 0, 2]);
        for _ in 0..10 {
            assert_eq!(lc.pick(&servers), Some(1));
        }
        let servers = Fake::with_active(&[3, 1, 2]);
        for _ in 0..10 {
            assert_eq!(lc.pick(&servers), Some(1));
        }
    }

    #[test]
    fn weighted_tie_is_shared() {
        // 2 active on weight 2 and 1 active on weight 1: both at 1 per unit of weight.
        let lc = LeastConn::new(&[2, 1]);
        let servers = Fake::with_active(&[2, 1]);
        let picks: Vec<usize> = (0..4).map(|_| lc.pick(&servers).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 0, 1]);
        // One more on the weight-1 server breaks the tie.
        let servers = Fake::with_active(&[2, 2]);
        for _ in 0..4 {
            assert_eq!(lc.pick(&servers), Some(0));
        }
        // Not a tie: 3/2 is more than 1/1.
        let servers = Fake::with_active(&[3, 1]);
        assert_eq!(lc.pick(&servers), Some(1));
    }

    #[test]
    fn equal_servers_share() {
        let lc = LeastConn::new(&[1, 1, 1, 1]);
        let servers = Fake::with_active(&[5, 5, 5, 5]);
        let mut seen = [0; 4];
        for _ in 0..40 {
            seen[lc.pick(&servers).unwrap()] += 1;
        }
        assert_eq!(seen, [10, 10, 10, 10]);
    }

    #[test]
    fn spread_follows_weights() {
        let lc = LeastConn::new(&[1, 1, 1]);
        let servers = Fake::new(3);
        for _ in 0..3000 {
            servers.claim(lc.pick(&servers).unwrap());
        }
        assert_eq!(servers.counts(), vec![1000, 1000, 1000]);

        let lc = LeastConn::new(&[3, 2, 1]);
        let servers = Fake::new(3);
        for _ in 0..6001 {
            servers.claim(lc.pick(&servers).unwrap());
            let c = servers.counts();
            // No server more than one connection per weight unit ahead of another:
            // a_i / w_i <= a_j / w_j + 1.
            let w = [3u64, 2, 1];
            for i in 0..3 {
                for j in 0..3 {
                    assert!(c[i] * w[j] <= (c[j] + w[j]) * w[i], "{c:?}");
                }
            }
        }
        let c = servers.counts();
        assert!(
            c[0].abs_diff(3000) <= 3 && c[1].abs_diff(2000) <= 2,
            "{c:?}"
        );
    }

    #[test]
    fn skips_ineligible() {
        let lc = LeastConn::new(&[1, 1, 1]);
        let mut servers = Fake::with_active(&[3, 0, 2]);
        servers.eligible[1] = false;
        assert_eq!(lc.pick(&servers), Some(2));
        servers.eligible[2] = false;
        assert_eq!(lc.pick(&servers), Some(0));
        servers.eligible[0] = false;
        assert_eq!(lc.pick(&servers), None);
    }
}
