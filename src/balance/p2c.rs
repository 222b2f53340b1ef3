//! Power of two choices, weighted: draw two distinct servers at random (each with
//! probability proportional to its weight), take the one with fewer live connections per
//! unit of weight. On a tie the first drawn wins, so with no load the picks follow the
//! weights exactly.
//!
//! O(log n) per pick with no shared write (the generator is per thread), unlike least_conn's
//! full scan. Ineligible draws are redrawn a bounded number of times; when that fails (most
//! servers out, or only one left) a least_conn scan from a random start decides.

use super::Servers;
use super::least_conn::{least_loaded, lighter};
use super::random::WeightedDraw;

/// Draws per choice before falling back to the scan.
const DRAWS: usize = 8;

#[derive(Debug)]
pub struct P2c {
    draw: WeightedDraw,
}

impl P2c {
    pub fn new(weights: &[u32]) -> P2c {
        P2c {
            draw: WeightedDraw::new(weights),
        }
    }

    /// The lighter of two weighted random eligible servers; `None` when none is eligible.
    #[inline]
    pub fn pick(&self, servers: &impl Servers) -> Option<usize> {
        let n = self.draw.len();
        if n < 2 {
            return (n == 1 && servers.eligible(0)).then_some(0);
        }
        let Some(a) = (0..DRAWS)
            .map(|_| self.draw.draw())
            .find(|&i| servers.eligible(i))
        else {
            return self.scan(servers);
        };
        let Some(b) = (0..DRAWS)
            .map(|_| self.draw.draw_other(a))
            .find(|&i| servers.eligible(i))
        else {
            return self.scan(servers);
        };
        let w = &self.draw.weights;
        if lighter(servers.active(b), w[b], servers.active(a), w[a]) {
            Some(b)
        } else {
            Some(a)
        }
    }

    #[cold]
    fn scan(&self, servers: &impl Servers) -> Option<usize> {
        least_loaded(&self.draw.weights, fastrand::usize(..), servers)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Fake, assert_shares};
    use super::*;

    #[test]
    fn unloaded_picks_follow_weights() {
        fastrand::seed(11);
        let p = P2c::new(&[3, 1, 1]);
        let servers = Fake::new(3);
        let mut counts = [0u64; 3];
        for _ in 0..30_000 {
            counts[p.pick(&servers).unwrap()] += 1;
        }
        assert_shares(&counts, &[3, 1, 1], 30_000);
    }

    #[test]
    fn picks_the_lighter_of_two() {
        fastrand::seed(12);
        let p = P2c::new(&[1, 1]);
        let servers = Fake::with_active(&[7, 2]);
        for _ in 0..100 {
            assert_eq!(p.pick(&servers), Some(1));
        }
        // Per unit of weight: 7/4 < 2/1.
        let p = P2c::new(&[4, 1]);
        let servers = Fake::with_active(&[7, 2]);
        for _ in 0..100 {
            assert_eq!(p.pick(&servers), Some(0));
        }
    }

    #[test]
    fn long_held_connections_stay_balanced() {
        fastrand::seed(13);
        // Connections are claimed and never released: the counts only grow.
        let p = P2c::new(&[1; 10]);
        let servers = Fake::new(10);
        for _ in 0..30_000 {
            servers.claim(p.pick(&servers).unwrap());
        }
        let c = servers.counts();
        let spread = c.iter().max().unwrap() - c.iter().min().unwrap();
        assert!(spread <= 10, "{c:?}");

        // Weighted 3:1:1: the counts follow the weights.
        let p = P2c::new(&[3, 1, 1]);
        let servers = Fake::new(3);
        for _ in 0..30_000 {
            servers.claim(p.pick(&servers).unwrap());
        }
        let c = servers.counts();
        assert_shares(&c, &[3, 1, 1], 30_000);
        let per_weight = [c[0] as f64 / 3.0, c[1] as f64, c[2] as f64];
        let spread = per_weight.iter().cloned().fold(f64::MIN, f64::max)
            - per_weight.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread <= 10.0, "{c:?}");
    }

    #[test]
    fn skips_ineligible_and_falls_back() {
        fastrand::seed(14);
        let p = P2c::new(&[1; 50]);
        let mut servers = Fake::none(50);
        // One eligible server among 50: the second choice never finds another.
        servers.eligible[17] = true;
        for _ in 0..100 {
            assert_eq!(p.pick(&servers), Some(17));
        }
        servers.eligible[33] = true;
        servers.active.borrow_mut()[17] = 5;
        for _ in 0..100 {
            assert_eq!(p.pick(&servers), Some(33));
        }
        assert_eq!(P2c::new(&[1]).pick(&Fake::none(1)), None);
        assert_eq!(P2c::new(&[1]).pick(&Fake::new(1)), Some(0));
    }
}
