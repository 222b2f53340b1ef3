//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted.
//!
//! A lookup table of prime size `M` is filled once: each server walks its own permutation of
//! the slots (`offset + j × skip mod M`, from two fixed-seed hashes of its *identity*) and the
//! servers take turns claiming their next free slot, a server of weight `w` taking `w` turns
//! for every `w_max` (as Envoy does), so slot counts follow the weights. A key goes to
//! `table[key mod M]`: one division and one load.
//!
//! The table is built over all servers, eligible or not. When the slot's server is not
//! eligible the lookup probes other slots, picked by rehashing the key, so a health flip never
//! rebuilds the table, keys of other servers never move, and a given key always lands on the
//! same fallback. Because the permutations depend on identities, not positions, two processes
//! agree on every key, and removing one server of N moves about 1/N of keys.

use std::fmt;

use super::{Servers, hash_pair, mix64, weighted_eligible};

/// Table sizes: primes, the smallest one at least 100 × the number of servers is used (the
/// paper's bound for under 1% imbalance), 65537 at least.
const PRIMES: [usize; 9] = [
    65_537, 131_071, 262_139, 524_287, 1_048_573, 2_097_143, 4_194_301, 8_388_593, 16_777_213,
];

/// Slots tried (the key's own and its rehashes) before the weighted scan settles it.
const PROBES: u64 = 16;

const SEED_OFFSET: u64 = 0x6f66_6673_6574; // "offset"
const SEED_SKIP: u64 = 0x736b_6970; // "skip"
const SEED_PROBE: u64 = 0x0070_726f_6265; // "probe"

pub struct Maglev {
    table: Box<[u32]>,
    weights: Box<[u32]>,
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev")
            .field("servers", &self.weights.len())
            .field("table", &self.table.len())
            .finish()
    }
}

impl Maglev {
    /// Builds the table for `(identity, weight)` servers.
    pub fn new(servers: &[(u64, u32)]) -> Maglev {
        let weights: Box<[u32]> = servers.iter().map(|(_, w)| (*w).max(1)).collect();
        if servers.is_empty() {
            return Maglev {
                table: Box::new([]),
                weights,
            };
        }
        let m = table_size(servers.len());
        let m64 = m as u64;
        // Per server: next slot of its permutation, its skip, and its turns so far.
        struct Fill {
            slot: u64,
            skip: u64,
            weight: u64,
            target: u64,
        }
        let mut fill: Vec<Fill> = servers
            .iter()
            .map(|(id, w)| Fill {
                slot: hash_pair(SEED_OFFSET, *id, 0) % m64,
                skip: hash_pair(SEED_SKIP, *id, 0) % (m64 - 1) + 1,
                weight: u64::from((*w).max(1)),
                target: 0,
            })
            .collect();
        let max_weight = fill.iter().map(|f| f.weight).max().unwrap_or(1);
        const EMPTY: u32 = u32::MAX;
        let mut table = vec![EMPTY; m];
        let mut filled = 0;
        let mut round = 1u64;
        while filled < m {
            for (i, f) in fill.iter_mut().enumerate() {
                if filled == m {
                    break;
                }
                // A server of the heaviest weight claims a slot every round, one of a third
                // of it every third round.
                if round * f.weight < f.target {
                    continue;
                }
                f.target += max_weight;
                // The permutation visits every slot (M prime, 0 < skip < M), and the table is
                // not full, so this ends.
                while table[f.slot as usize] != EMPTY {
                    f.slot = (f.slot + f.skip) % m64;
                }
                table[f.slot as usize] = i as u32;
                f.slot = (f.slot + f.skip) % m64;
                filled += 1;
            }
            round += 1;
        }
        Maglev {
            table: table.into_boxed_slice(),
            weights,
        }
    }

    /// The server of `hash`, or of its first eligible fallback; `None` when no server is
    /// eligible.
    #[inline]
    pub fn pick(&self, hash: u64, servers: &impl Servers) -> Option<usize> {
        let m = self.table.len() as u64;
        if m == 0 {
            return None;
        }
        let i = self.table[(hash % m) as usize] as usize;
        if servers.eligible(i) {
            return Some(i);
        }
        self.probe(hash, servers)
    }

    #[cold]
    fn probe(&self, hash: u64, servers: &impl Servers) -> Option<usize> {
        let m = self.table.len() as u64;
        let key = mix64(hash ^ SEED_PROBE);
        for k in 1..PROBES {
            let i = self.table[(mix64(key.wrapping_add(k)) % m) as usize] as usize;
            if servers.eligible(i) {
                return Some(i);
            }
        }
        weighted_eligible(&self.weights, key, servers)
    }

    /// Slots held by each server (for tests and the stats page).
    pub fn slots(&self) -> Vec<usize> {
        let mut counts = vec![0; self.weights.len()];
        for i in &self.table {
            counts[*i as usize] += 1;
        }
        counts
    }
}

/// The smallest listed prime at least 100 × `n`, the largest one past that.
fn table_size(n: usize) -> usize {
    let want = n.saturating_mul(100);
    PRIMES
        .iter()
        .copied()
        .find(|&p| p >= want)
        .unwrap_or(PRIMES[PRIMES.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Fake, ids, keys};
    use super::*;

    fn keyed(ids: &[u64], weights: &[u32]) -> Vec<(u64, u32)> {
        ids.iter().copied().zip(weights.iter().copied()).collect()
    }

    #[test]
    fn primes_are_prime() {
        for p in PRIMES {
            assert!((2..).take_while(|d| d * d <= p).all(|d| p % d != 0), "{p}");
        }
        assert_eq!(table_size(3), 65_537);
        assert_eq!(table_size(1000), 131_071);
        assert_eq!(table_size(10_000), 1_048_573);
    }

    #[test]
    fn same_key_same_server() {
        let m = Maglev::new(&keyed(&ids(5), &[1; 5]));
        let servers = Fake::new(5);
        for key in keys(1000) {
            let first = m.pick(key, &servers);
            for _ in 0..3 {
                assert_eq!(m.pick(key, &servers), first);
            }
        }
    }

    #[test]
    fn separate_builds_agree() {
        let a = Maglev::new(&keyed(&ids(7), &[1, 2, 3, 1, 1, 5, 1]));
        let b = Maglev::new(&keyed(&ids(7), &[1, 2, 3, 1, 1, 5, 1]));
        assert_eq!(a.table, b.table);
        let servers = Fake::new(7);
        for key in keys(10_000) {
            assert_eq!(a.pick(key, &servers), b.pick(key, &servers));
        }
    }

    #[test]
    fn equal_weights_fill_evenly() {
        let m = Maglev::new(&keyed(&ids(5), &[1; 5]));
        for slots in m.slots() {
            assert!(slots.abs_diff(65_537 / 5) <= 1, "{:?}", m.slots());
        }
    }

    #[test]
    fn removing_a_server_moves_about_its_keys() {
        let all = ids(5);
        let before = Maglev::new(&keyed(&all, &[1; 5]));
        // Server 2 removed: the others keep their identities, not their positions.
        let rest: Vec<u64> = all.iter().copied().filter(|id| *id != all[2]).collect();
        let after = Maglev::new(&keyed(&rest, &[1; 4]));
        let (s5, s4) = (Fake::new(5), Fake::new(4));
        let (mut on_removed, mut moved) = (0, 0);
        let n = 10_000;
        for key in keys(n) {
            let was = all[before.pick(key, &s5).unwrap()];
            let now = rest[after.pick(key, &s4).unwrap()];
            if was == all[2] {
                on_removed += 1;
            } else if was != now {
                moved += 1;
            }
        }
        assert!(on_removed > n / 5 - n / 50 && on_removed < n / 5 + n / 50);
        // Maglev trades a little disruption for even tables: a few % of the rest.
        assert!(
            moved * 100 <= (n - on_removed) * 2,
            "{moved} of the others moved"
        );
    }

    #[test]
    fn weights_share_keys() {
        let m = Maglev::new(&keyed(&ids(2), &[2, 1]));
        let slots = m.slots();
        assert!(slots[0].abs_diff(65_537 * 2 / 3) <= 1, "{slots:?}");
        let servers = Fake::new(2);
        let mut counts = [0u64; 2];
        for key in keys(30_000) {
            counts[m.pick(key, &servers).unwrap()] += 1;
        }
        super::super::testing::assert_shares(&counts, &[2, 1], 30_000);

        let weights = [256, 1, 10, 100];
        let m = Maglev::new(&keyed(&ids(4), &weights));
        let total: usize = weights.iter().map(|w| *w as usize).sum();
        for (slots, w) in m.slots().iter().zip(weights) {
            let expected = 65_537 * w as usize / total;
            assert!(slots.abs_diff(expected) <= 1, "{:?}", m.slots());
        }
    }

    #[test]
    fn ineligible_keys_go_elsewhere_others_stay() {
        let m = Maglev::new(&keyed(&ids(5), &[1; 5]));
        let all = Fake::new(5);
        let mut down = Fake::new(5);
        down.eligible[3] = false;
        let mut moved_to = [0u64; 5];
        for key in keys(10_000) {
            let was = m.pick(key, &all).unwrap();
            let now = m.pick(key, &down).unwrap();
            assert_ne!(now, 3);
            if was == 3 {
                moved_to[now] += 1;
                // The same fallback every time.
                assert_eq!(m.pick(key, &down), Some(now));
            } else {
                assert_eq!(was, now);
            }
        }
        // Spread over the others, not piled on one.
        let moved: u64 = moved_to.iter().sum();
        for (i, c) in moved_to.iter().enumerate() {
            if i != 3 {
                assert!(*c * 8 > moved, "{moved_to:?}");
            }
        }
    }

    #[test]
    fn mostly_ineligible_still_finds_one() {
        let m = Maglev::new(&keyed(&ids(100), &[1; 100]));
        let mut servers = Fake::none(100);
        servers.eligible[42] = true;
        servers.eligible[77] = true;
        for key in keys(1000) {
            let i = m.pick(key, &servers).unwrap();
            assert!(i == 42 || i == 77);
            assert_eq!(m.pick(key, &servers), Some(i));
        }
        assert_eq!(m.pick(1, &Fake::none(100)), None);
    }
}
