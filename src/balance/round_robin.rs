//! Smooth weighted round robin.
//!
//! The schedule (one full cycle, `sum(weights)` long) is computed once with the smooth
//! algorithm, so weights 3:1 give `a a b a`, interleaved rather than in bursts. A pick is one
//! atomic increment and an index into the schedule; ineligible servers are skipped by moving
//! along the cycle.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

#[derive(Debug)]
pub struct RoundRobin {
    schedule: Box<[u32]>,
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new(weights: &[u32]) -> RoundRobin {
        let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += i64::from(*w);
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            schedule.push(best as u32);
        }
        RoundRobin {
            schedule: schedule.into_boxed_slice(),
            next: AtomicUsize::new(0),
        }
    }

    #[inline]
    pub fn pick(&self, eligible: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed);
        for k in 0..len {
            let i = self.schedule[(start.wrapping_add(k)) % len] as usize;
            if eligible(i) {
                if k > 0 {
                    // Continue after the server we settled on, not after the skipped ones.
                    self.next.fetch_add(k, Relaxed);
                }
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(rr: &RoundRobin, n: usize) -> Vec<usize> {
        (0..n).map(|_| rr.pick(|_| true).unwrap()).collect()
    }

    #[test]
    fn equal_weights_in_order() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        assert_eq!(picks(&rr, 7), vec![0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn weighted_is_smooth() {
        let rr = RoundRobin::new(&[3, 1]);
        assert_eq!(picks(&rr, 8), vec![0, 0, 1, 0, 0, 0, 1, 0]);
        let rr = RoundRobin::new(&[5, 1, 1]);
        // nginx's smooth sequence for 5:1:1.
        assert_eq!(picks(&rr, 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn skips_ineligible() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        let got: Vec<usize> = (0..4).map(|_| rr.pick(|i| i != 1).unwrap()).collect();
        assert_eq!(got, vec![0, 2, 0, 2]);
        assert_eq!(rr.pick(|_| false), None);
    }
}
