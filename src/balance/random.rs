//! Weighted random: a server drawn with probability `weight / sum(weights)`.
//!
//! A draw is one number from the thread's own generator (`fastrand`, no lock) and a binary
//! search in the prefix sums of the weights (or a plain index when all weights are equal).
//! A drawn server that is not eligible is redrawn a few times, which keeps the draw exactly
//! weighted over the eligible servers; when most servers are out, a weighted two-pass scan
//! over the eligible ones settles it.

use super::{Servers, weighted_eligible};

/// Draws before falling back to the scan: with half the servers out, all of them miss
/// once in 256 picks.
const DRAWS: usize = 8;

#[derive(Debug)]
pub struct Random {
    draw: WeightedDraw,
}

impl Random {
    pub fn new(weights: &[u32]) -> Random {
        Random {
            draw: WeightedDraw::new(weights),
        }
    }

    /// A weighted random eligible server; `None` when none is eligible.
    #[inline]
    pub fn pick(&self, servers: &impl Servers) -> Option<usize> {
        if self.draw.len() == 0 {
            return None;
        }
        for _ in 0..DRAWS {
            let i = self.draw.draw();
            if servers.eligible(i) {
                return Some(i);
            }
        }
        weighted_eligible(&self.draw.weights, fastrand::u64(..), servers)
    }
}

/// Weighted draws over a fixed server set: the weights and their prefix sums.
#[derive(Debug)]
pub(super) struct WeightedDraw {
    pub(super) weights: Box<[u32]>,
    /// `cumulative[i] = weights[0] + … + weights[i]`.
    cumulative: Box<[u64]>,
    /// All weights equal: draw an index directly.
    uniform: bool,
}

impl WeightedDraw {
    pub(super) fn new(weights: &[u32]) -> WeightedDraw {
        let cumulative = weights
            .iter()
            .scan(0u64, |sum, w| {
                *sum += u64::from(*w);
                Some(*sum)
            })
            .collect();
        WeightedDraw {
            weights: weights.into(),
            cumulative,
            uniform: weights.windows(2).all(|w| w[0] == w[1]),
        }
    }

    #[inline]
    pub(super) fn len(&self) -> usize {
        self.weights.len()
    }

    fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// A server index with probability `weight / total`. The set must not be empty.
    #[inline]
    pub(super) fn draw(&self) -> usize {
        if self.uniform {
            return fastrand::usize(..self.len());
        }
        let r = fastrand::u64(..self.total());
        self.cumulative.partition_point(|&c| c <= r)
    }

    /// A server index other than `not`, with probability `weight / (total - weight[not])`.
    /// The set must have at least two servers.
    #[inline]
    pub(super) fn draw_other(&self, not: usize) -> usize {
        if self.uniform {
            let i = fastrand::usize(..self.len() - 1);
            return if i >= not { i + 1 } else { i };
        }
        let w = u64::from(self.weights[not]);
        let mut r = fastrand::u64(..self.total() - w);
        // Skip over `not`'s stretch of the line.
        if r >= self.cumulative[not] - w {
            r += w;
        }
        self.cumulative.partition_point(|&c| c <= r)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Fake, assert_shares};
    use super::*;

    #[test]
    fn proportional_to_weight() {
        fastrand::seed(1);
        let r = Random::new(&[3, 1, 1]);
        let servers = Fake::new(3);
        let mut counts = [0u64; 3];
        for _ in 0..30_000 {
            counts[r.pick(&servers).unwrap()] += 1;
        }
        assert_shares(&counts, &[3, 1, 1], 30_000);

        let r = Random::new(&[1, 1, 1, 1]);
        let servers = Fake::new(4);
        let mut counts = [0u64; 4];
        for _ in 0..30_000 {
            counts[r.pick(&servers).unwrap()] += 1;
        }
        assert_shares(&counts, &[1, 1, 1, 1], 30_000);
    }

    #[test]
    fn ineligible_share_goes_to_the_others_by_weight() {
        fastrand::seed(2);
        let r = Random::new(&[3, 5, 1, 1]);
        let mut servers = Fake::new(4);
        servers.eligible[1] = false;
        let mut counts = [0u64; 4];
        for _ in 0..30_000 {
            counts[r.pick(&servers).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        assert_shares(&[counts[0], counts[2], counts[3]], &[3, 1, 1], 30_000);
    }

    #[test]
    fn fallback_scan_is_weighted() {
        fastrand::seed(3);
        // 40 servers, only two eligible (weights 3 and 1): the draws mostly miss.
        let mut weights = vec![1u32; 40];
        weights[10] = 3;
        let r = Random::new(&weights);
        let mut servers = Fake::none(40);
        servers.eligible[10] = true;
        servers.eligible[30] = true;
        let mut counts = [0u64; 2];
        for _ in 0..20_000 {
            match r.pick(&servers) {
                Some(10) => counts[0] += 1,
                Some(30) => counts[1] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_shares(&counts, &[3, 1], 20_000);
    }

    #[test]
    fn draw_other_is_distinct_and_weighted() {
        fastrand::seed(4);
        let d = WeightedDraw::new(&[3, 1, 1, 5]);
        let mut counts = [0u64; 4];
        for _ in 0..30_000 {
            let i = d.draw_other(1);
            assert_ne!(i, 1);
            counts[i] += 1;
        }
        assert_shares(&[counts[0], counts[2], counts[3]], &[3, 1, 5], 30_000);
        let d = WeightedDraw::new(&[2, 2, 2]);
        for not in 0..3 {
            for _ in 0..100 {
                assert_ne!(d.draw_other(not), not);
            }
        }
    }

    #[test]
    fn none_eligible() {
        let r = Random::new(&[1, 2]);
        assert_eq!(r.pick(&Fake::none(2)), None);
    }
}
