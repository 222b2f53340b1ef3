//! Consistent hash ring (Karger et al.) with virtual nodes, and optional bounded load
//! (Mirrokni et al., "consistent hashing with bounded loads", as HAProxy's
//! `hash-balance-factor`).
//!
//! Each server puts `100 × weight` points on the ring (fewer per unit of weight past
//! [`MAX_POINTS`] in all, at least one each), each point a fixed-seed hash of the server's
//! identity and the point's number. A key goes to the first point at or after it (binary
//! search, wrapping). Ineligible servers are skipped by walking on along the ring, at most one
//! lap, so their keys spread over the servers that follow their points and no other key moves.
//! Removing a server of N moves only its keys, about 1/N.
//!
//! With a balance factor `f` (percent), a server is also skipped while a new connection would
//! take it past `ceil(f/100 × (total_active + 1) × weight / eligible_weight)`, its fair share
//! of the load including the new connection, times `f`. That needs the total over the
//! eligible servers: one pass over them per pick, only with the factor set.

use std::fmt;

use super::{Servers, hash_pair};

/// Points per unit of weight.
const POINTS_PER_WEIGHT: u64 = 100;
/// Most points on one ring (12 bytes each).
pub const MAX_POINTS: u64 = 1 << 18;

const SEED_POINT: u64 = 0x7269_6e67; // "ring"

pub struct RingHash {
    /// Point hashes, sorted.
    hashes: Box<[u64]>,
    /// The server owning the point at the same position.
    owners: Box<[u32]>,
    weights: Box<[u32]>,
    /// Percent, at least 100.
    balance_factor: Option<u32>,
}

impl fmt::Debug for RingHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingHash")
            .field("servers", &self.weights.len())
            .field("points", &self.hashes.len())
            .field("balance_factor", &self.balance_factor)
            .finish()
    }
}

impl RingHash {
    /// Builds the ring for `(identity, weight)` servers; `balance_factor` in percent (values
    /// under 100 are taken as 100: every server exactly at its share).
    pub fn new(servers: &[(u64, u32)], balance_factor: Option<u32>) -> RingHash {
        let weights: Box<[u32]> = servers.iter().map(|(_, w)| (*w).max(1)).collect();
        let total_weight: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        // Points per unit of weight in thousandths, lowered for big sets.
        let per_weight_milli = if total_weight * POINTS_PER_WEIGHT <= MAX_POINTS {
            POINTS_PER_WEIGHT * 1000
        } else {
            MAX_POINTS * 1000 / total_weight
        };
        let mut points: Vec<(u64, u32)> = Vec::new();
        for (i, ((id, _), w)) in servers.iter().zip(weights.iter()).enumerate() {
            let n = (u64::from(*w) * per_weight_milli / 1000).max(1);
            // Point r of a server is the same whatever the rest of the set, so a change of
            // set (or of the per-weight count) only adds or removes points.
            points.extend((0..n).map(|r| (hash_pair(SEED_POINT, *id, r), i as u32)));
        }
        points.sort_unstable();
        RingHash {
            hashes: points.iter().map(|p| p.0).collect(),
            owners: points.iter().map(|p| p.1).collect(),
            weights,
            balance_factor: balance_factor.map(|f| f.max(100)),
        }
    }

    /// The server of the first point at or after `hash` that is eligible (and under its load
    /// bound, with a balance factor); `None` when no server is eligible.
    #[inline]
    pub fn pick(&self, hash: u64, servers: &impl Servers) -> Option<usize> {
        let len = self.hashes.len();
        if len == 0 {
            return None;
        }
        let start = self.hashes.partition_point(|&h| h < hash);
        let start = if start == len { 0 } else { start };
        match self.balance_factor {
            None => self.walk(start, |i| servers.eligible(i)),
            Some(factor) => self.pick_bounded(start, factor, servers),
        }
    }

    /// The owner of the first point from `start` (one lap) that `take` accepts.
    #[inline]
    fn walk(&self, start: usize, mut take: impl FnMut(usize) -> bool) -> Option<usize> {
        let len = self.owners.len();
        let mut last = usize::MAX;
        for k in 0..len {
            let p = if start + k < len {
                start + k
            } else {
                start + k - len
            };
            let i = self.owners[p] as usize;
            // Neighbouring points of one server: asked once.
            if i != last {
                if take(i) {
                    return Some(i);
                }
                last = i;
            }
        }
        None
    }

    fn pick_bounded(&self, start: usize, factor: u32, servers: &impl Servers) -> Option<usize> {
        let (mut total_active, mut total_weight) = (0u128, 0u128);
        for (i, w) in self.weights.iter().enumerate() {
            if servers.eligible(i) {
                total_active += u128::from(servers.active(i));
                total_weight += u128::from(*w);
            }
        }
        if total_weight == 0 {
            return None;
        }
        // active + 1 <= ceil(f × (total + 1) × w / (100 × W)), i.e.
        // (active + 1) × 100 × W < f × (total + 1) × w + 100 × W.
        let load = u128::from(factor) * (total_active + 1);
        let scale = 100 * total_weight;
        let mut fallback = None;
        let under = self.walk(start, |i| {
            if !servers.eligible(i) {
                return false;
            }
            fallback.get_or_insert(i);
            let w = u128::from(self.weights[i]);
            (u128::from(servers.active(i)) + 1) * scale < load * w + scale
        });
        // All at their bound can only happen while the counts move under us: then the
        // first eligible server on the way.
        under.or(fallback)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Fake, ids, keys};
    use super::*;

    fn keyed(ids: &[u64], weights: &[u32]) -> Vec<(u64, u32)> {
        ids.iter().copied().zip(weights.iter().copied()).collect()
    }

    #[test]
    fn same_key_same_server_and_builds_agree() {
        let a = RingHash::new(&keyed(&ids(6), &[1, 2, 1, 1, 3, 1]), None);
        let b = RingHash::new(&keyed(&ids(6), &[1, 2, 1, 1, 3, 1]), None);
        assert_eq!(a.hashes, b.hashes);
        assert_eq!(a.owners, b.owners);
        let servers = Fake::new(6);
        for key in keys(10_000) {
            let got = a.pick(key, &servers);
            assert_eq!(a.pick(key, &servers), got);
            assert_eq!(b.pick(key, &servers), got);
        }
    }

    #[test]
    fn removing_a_server_moves_only_its_keys() {
        let all = ids(5);
        let before = RingHash::new(&keyed(&all, &[1; 5]), None);
        let rest: Vec<u64> = all.iter().copied().filter(|id| *id != all[1]).collect();
        let after = RingHash::new(&keyed(&rest, &[1; 4]), None);
        let (s5, s4) = (Fake::new(5), Fake::new(4));
        let (mut on_removed, n) = (0, 10_000);
        for key in keys(n) {
            let was = all[before.pick(key, &s5).unwrap()];
            let now = rest[after.pick(key, &s4).unwrap()];
            if was == all[1] {
                on_removed += 1;
            } else {
                assert_eq!(was, now);
            }
        }
        // About 1/5 of keys, with 100 points per server.
        assert!(
            on_removed > n / 10 && on_removed < n * 3 / 10,
            "{on_removed}"
        );
    }

    #[test]
    fn weights_share_keys() {
        let r = RingHash::new(&keyed(&ids(2), &[2, 1]), None);
        let servers = Fake::new(2);
        let mut counts = [0u64; 2];
        for key in keys(30_000) {
            counts[r.pick(key, &servers).unwrap()] += 1;
        }
        // 200 and 100 points: the shares are close to 2:1, not exact.
        let share = counts[0] as f64 / 30_000.0;
        assert!((0.6..0.73).contains(&share), "{counts:?}");
    }

    #[test]
    fn ineligible_keys_go_elsewhere_others_stay() {
        let r = RingHash::new(&keyed(&ids(5), &[1; 5]), None);
        let all = Fake::new(5);
        let mut down = Fake::new(5);
        down.eligible[0] = false;
        for key in keys(10_000) {
            let was = r.pick(key, &all).unwrap();
            let now = r.pick(key, &down).unwrap();
            if was == 0 {
                assert_ne!(now, 0);
                assert_eq!(r.pick(key, &down), Some(now));
            } else {
                assert_eq!(was, now);
            }
        }
    }

    #[test]
    fn bounded_load_under_skew() {
        for factor in [125u32, 150] {
            let r = RingHash::new(&keyed(&ids(4), &[1; 4]), Some(factor));
            let servers = Fake::new(4);
            // 90% of connections from one client, the rest from 100 others.
            let hot = keys(1).next().unwrap();
            let others: Vec<u64> = keys(101).skip(1).collect();
            let picks = 4000u64;
            for n in 0..picks {
                let key = if n % 10 == 0 {
                    others[(n / 10) as usize % others.len()]
                } else {
                    hot
                };
                servers.claim(r.pick(key, &servers).unwrap());
            }
            let c = servers.counts();
            let bound = (u64::from(factor) * picks).div_ceil(100 * 4);
            assert!(c.iter().all(|a| *a <= bound), "{c:?} over {bound}");
            assert_eq!(c.iter().sum::<u64>(), picks);
        }
    }

    #[test]
    fn bounded_load_follows_weights() {
        let r = RingHash::new(&keyed(&ids(2), &[3, 1]), Some(125));
        let servers = Fake::new(2);
        let hot = keys(1).next().unwrap();
        for _ in 0..4000 {
            servers.claim(r.pick(hot, &servers).unwrap());
        }
        let c = servers.counts();
        // The hot key's server fills to its bound, the other takes the rest.
        let bounds = [
            (125 * 4000 * 3u64).div_ceil(400),
            (125 * 4000u64).div_ceil(400),
        ];
        assert!(c[0] <= bounds[0] && c[1] <= bounds[1], "{c:?}");
    }

    #[test]
    fn unbounded_ignores_load() {
        let r = RingHash::new(&keyed(&ids(3), &[1; 3]), None);
        let servers = Fake::new(3);
        let hot = keys(1).next().unwrap();
        let first = r.pick(hot, &servers).unwrap();
        for _ in 0..100 {
            servers.claim(r.pick(hot, &servers).unwrap());
        }
        assert_eq!(servers.counts()[first], 100);
    }

    #[test]
    fn big_sets_are_capped() {
        let r = RingHash::new(&keyed(&ids(2000), &[256; 2000]), None);
        assert!(r.hashes.len() as u64 <= MAX_POINTS);
        let servers = Fake::new(2000);
        let mut hit = vec![false; 2000];
        for key in keys(100_000) {
            hit[r.pick(key, &servers).unwrap()] = true;
        }
        assert!(hit.iter().filter(|h| **h).count() > 1900);
        assert_eq!(r.pick(5, &Fake::none(2000)), None);
    }
}
