//! Picking a server: one file per algorithm. A balancer is built once from a server set
//! (identities and weights) and is immutable; the live state it consults (connection counts,
//! health, limits) is read through [`Servers`] at pick time, so a health flip or a finished
//! connection never rebuilds it.
//!
//! A pick takes no lock and allocates nothing. The hashing algorithms (`maglev`,
//! `ring_hash`) are built from each server's *identity* (a stable hash of its configured
//! address, see [`hash_str`]), never from its position, so two ferry processes with the same
//! server set agree on every key, and removing one server of N moves only about 1/N of keys.

mod first;
mod least_conn;
mod maglev;
mod p2c;
mod random;
mod ring_hash;
mod round_robin;

pub use first::First;
pub use least_conn::LeastConn;
pub use maglev::Maglev;
pub use p2c::P2c;
pub use random::Random;
pub use ring_hash::RingHash;
pub use round_robin::RoundRobin;

use std::net::IpAddr;

use twox_hash::XxHash3_64;

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
    LeastConn(LeastConn),
    Random(Random),
    P2c(P2c),
    Maglev(Maglev),
    RingHash(RingHash),
    First(First),
}

impl Balancer {
    /// Builds the balancer for servers with these weights (in server order). The servers'
    /// identities are their indexes: fine where positions never change (tests, quick mode);
    /// a pool whose set can change on reload should use [`Balancer::build_keyed`].
    pub fn build(kind: Balance, weights: &[u32]) -> Balancer {
        let servers: Vec<(u64, u32)> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| (index_identity(i), *w))
            .collect();
        Balancer::build_keyed(kind, &servers)
    }

    /// Builds the balancer for servers given as `(identity, weight)` in server order. The
    /// identity is a stable hash of what names the server (e.g. [`hash_str`] of its
    /// configured `ip:port`); only `maglev` and `ring_hash` use it. Weights are 1..=256;
    /// a weight of 0 is taken as 1.
    pub fn build_keyed(kind: Balance, servers: &[(u64, u32)]) -> Balancer {
        let weights: Vec<u32> = servers.iter().map(|(_, w)| (*w).max(1)).collect();
        match kind {
            Balance::RoundRobin => Balancer::RoundRobin(RoundRobin::new(&weights)),
            Balance::LeastConn => Balancer::LeastConn(LeastConn::new(&weights)),
            Balance::Random => Balancer::Random(Random::new(&weights)),
            Balance::P2c => Balancer::P2c(P2c::new(&weights)),
            Balance::Maglev => Balancer::Maglev(Maglev::new(servers)),
            Balance::RingHash { balance_factor } => {
                Balancer::RingHash(RingHash::new(servers, balance_factor))
            }
            Balance::First => Balancer::First(First::new(weights.len())),
        }
    }

    /// Picks the index of an eligible server. `hash` is the client's key for the hashing
    /// algorithms (see [`hash_ip`]); the others ignore it.
    ///
    /// Returns `None` when no server is eligible (never while one is).
    #[inline]
    pub fn pick(&self, hash: u64, servers: &impl Servers) -> Option<usize> {
        match self {
            Balancer::RoundRobin(b) => b.pick(|i| servers.eligible(i)),
            Balancer::LeastConn(b) => b.pick(servers),
            Balancer::Random(b) => b.pick(servers),
            Balancer::P2c(b) => b.pick(servers),
            Balancer::Maglev(b) => b.pick(hash, servers),
            Balancer::RingHash(b) => b.pick(hash, servers),
            Balancer::First(b) => b.pick(servers),
        }
    }
}

/// The fixed seed of every hash here: changing it remaps every client of every hashing pool,
/// and makes processes of different versions disagree.
const SEED: u64 = 0x6665_7272_795f_6c62; // "ferry_lb"

/// A stable hash of a client address, the key for `maglev` and `ring_hash`: xxh3 with a fixed
/// seed, the same in every process, on every machine, across restarts. An IPv4-mapped IPv6
/// address (`::ffff:a.b.c.d`) hashes like the IPv4 address, so a dual-stack listener keys a
/// client the same on either socket.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => XxHash3_64::oneshot_with_seed(SEED, &v4.octets()),
        IpAddr::V6(v6) => XxHash3_64::oneshot_with_seed(SEED, &v6.octets()),
    }
}

/// A stable hash of a string (same function as [`hash_ip`]): the identity of a server for
/// [`Balancer::build_keyed`], from its address as configured (e.g. `"10.0.0.1:5432"`).
pub fn hash_str(s: &str) -> u64 {
    XxHash3_64::oneshot_with_seed(SEED, s.as_bytes())
}

/// A stable hash of two words, with its own seed (so the hashes of one server's identity
/// under different seeds are independent).
pub(crate) fn hash_pair(seed: u64, a: u64, b: u64) -> u64 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..].copy_from_slice(&b.to_le_bytes());
    XxHash3_64::oneshot_with_seed(SEED ^ seed, &bytes)
}

/// The identity [`Balancer::build`] gives server `i`.
fn index_identity(i: usize) -> u64 {
    hash_pair(0, i as u64, 0)
}

/// A cheap bijective mix of a word (the splitmix64 finalizer): derives more keys from one.
#[inline]
pub(crate) fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The slow path shared by the algorithms whose fast path missed: an eligible server chosen
/// with probability proportional to its weight, by `key` (the same key and eligible set give
/// the same server). Two passes over the servers, no allocation.
///
/// Returns `None` when no server is eligible.
pub(crate) fn weighted_eligible(
    weights: &[u32],
    key: u64,
    servers: &impl Servers,
) -> Option<usize> {
    let total: u64 = weights
        .iter()
        .enumerate()
        .filter(|(i, _)| servers.eligible(*i))
        .map(|(_, w)| u64::from(*w))
        .sum();
    if total == 0 {
        return None;
    }
    let mut r = key % total;
    let mut last = None;
    for (i, w) in weights.iter().enumerate() {
        if !servers.eligible(i) {
            continue;
        }
        let w = u64::from(*w);
        if r < w {
            return Some(i);
        }
        r -= w;
        last = Some(i);
    }
    // A server turned ineligible between the passes: take the last eligible one seen.
    last
}

/// Test helpers shared by the algorithms' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::Servers;
    use std::cell::RefCell;

    /// A fake server set: eligibility and live counts, changed by the test between picks.
    pub struct Fake {
        pub eligible: Vec<bool>,
        pub active: RefCell<Vec<u64>>,
    }

    impl Fake {
        pub fn new(n: usize) -> Fake {
            Fake {
                eligible: vec![true; n],
                active: RefCell::new(vec![0; n]),
            }
        }

        pub fn with_active(active: &[u64]) -> Fake {
            Fake {
                eligible: vec![true; active.len()],
                active: RefCell::new(active.to_vec()),
            }
        }

        pub fn none(n: usize) -> Fake {
            Fake {
                eligible: vec![false; n],
                active: RefCell::new(vec![0; n]),
            }
        }

        /// Counts a new connection on `i` (as the pool's guard does).
        pub fn claim(&self, i: usize) {
            self.active.borrow_mut()[i] += 1;
        }

        pub fn counts(&self) -> Vec<u64> {
            self.active.borrow().clone()
        }
    }

    impl Servers for Fake {
        fn eligible(&self, i: usize) -> bool {
            self.eligible[i]
        }
        fn active(&self, i: usize) -> u64 {
            self.active.borrow()[i]
        }
    }

    /// Each count within 5% of its expected share of `picks`.
    pub fn assert_shares(counts: &[u64], weights: &[u32], picks: u64) {
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        for (c, w) in counts.iter().zip(weights) {
            let expected = picks * u64::from(*w) / total;
            assert!(
                c.abs_diff(expected) * 20 <= expected,
                "{counts:?} for weights {weights:?}"
            );
        }
    }

    /// A stable identity per test server, as the pool would give it.
    pub fn ids(n: usize) -> Vec<u64> {
        (0..n)
            .map(|i| super::hash_str(&format!("10.0.0.{i}:5432")))
            .collect()
    }

    /// Client keys for `n` distinct IPv4 clients.
    pub fn keys(n: u32) -> impl Iterator<Item = u64> {
        (0..n).map(|k| super::hash_ip(std::net::Ipv4Addr::from(0x0a00_0000 + k).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Fake;
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn hash_ip_maps_v4_in_v6() {
        let v4 = Ipv4Addr::new(192, 0, 2, 7);
        assert_eq!(
            hash_ip(IpAddr::V4(v4)),
            hash_ip(IpAddr::V6(v4.to_ipv6_mapped()))
        );
        assert_ne!(
            hash_ip(IpAddr::V4(v4)),
            hash_ip(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_ne!(
            hash_ip(IpAddr::V4(v4)),
            hash_ip(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8)))
        );
    }

    #[test]
    fn hash_is_stable() {
        // Fixed values: a change here remaps every hashing pool's clients, and makes ferry
        // processes of different versions disagree. Change only on purpose.
        assert_eq!(
            hash_ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            7688831005291357296
        );
        assert_eq!(hash_str("10.0.0.1:5432"), 7697894460066014166);
    }

    #[test]
    fn weighted_eligible_is_weighted_and_skips() {
        let weights = [3, 1, 1];
        let mut servers = Fake::new(3);
        let mut counts = [0u32; 3];
        for key in 0..5000u64 {
            counts[weighted_eligible(&weights, key, &servers).unwrap()] += 1;
        }
        assert_eq!(counts, [3000, 1000, 1000]);
        servers.eligible[0] = false;
        for key in 0..100u64 {
            assert_ne!(weighted_eligible(&weights, key, &servers), Some(0));
        }
        assert_eq!(weighted_eligible(&weights, 7, &Fake::none(3)), None);
    }

    #[test]
    fn every_algorithm_returns_none_when_none_eligible() {
        let kinds = [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::Random,
            Balance::P2c,
            Balance::Maglev,
            Balance::RingHash {
                balance_factor: None,
            },
            Balance::RingHash {
                balance_factor: Some(125),
            },
            Balance::First,
        ];
        for kind in kinds {
            for n in [1, 3, 20] {
                let weights: Vec<u32> = (1..=n).collect();
                let b = Balancer::build(kind, &weights);
                let none = Fake::none(n as usize);
                for key in 0..50 {
                    assert_eq!(b.pick(key, &none), None, "{} n={n}", kind.as_str());
                }
                let all = Fake::new(n as usize);
                for key in 0..50 {
                    let i = b
                        .pick(key, &all)
                        .unwrap_or_else(|| panic!("{}", kind.as_str()));
                    assert!(i < n as usize);
                }
                // Only the last server eligible: every algorithm finds it.
                let mut last = Fake::none(n as usize);
                last.eligible[n as usize - 1] = true;
                for key in 0..50 {
                    assert_eq!(
                        b.pick(key, &last),
                        Some(n as usize - 1),
                        "{}",
                        kind.as_str()
                    );
                }
            }
        }
    }
}
