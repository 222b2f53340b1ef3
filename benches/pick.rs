//! The cost of one `Balancer::pick`, per algorithm, for 3, 100 and 1,000 servers, all
//! eligible (`all`) and with every other one ineligible (`half`).
//!
//! `cargo bench --bench pick`

use std::hint::black_box;

use divan::Bencher;
use ferry::balance::{Balancer, Servers, hash_str};
use ferry::config::Balance;

fn main() {
    divan::main();
}

const SIZES: [usize; 3] = [3, 100, 1000];

/// A server set with fixed live counts (none idle, so least_conn scans them all).
struct Fake {
    eligible: Vec<bool>,
    active: Vec<u64>,
}

impl Fake {
    fn new(n: usize, half: bool) -> Fake {
        Fake {
            eligible: (0..n).map(|i| !half || i % 2 == 0).collect(),
            active: (0..n as u64).map(|i| 1 + i * 7919 % 50).collect(),
        }
    }
}

impl Servers for Fake {
    fn eligible(&self, i: usize) -> bool {
        self.eligible[i]
    }
    fn active(&self, i: usize) -> u64 {
        self.active[i]
    }
}

fn run(bencher: Bencher, kind: Balance, n: usize, half: bool) {
    let keyed: Vec<(u64, u32)> = (0..n)
        .map(|i| {
            (
                hash_str(&format!("10.0.{}.{}:80", i / 256, i % 256)),
                1 + (i % 3) as u32,
            )
        })
        .collect();
    let balancer = Balancer::build_keyed(kind, &keyed);
    let servers = Fake::new(n, half);
    let mut key = 0u64;
    bencher.bench_local(|| {
        // A new client key each time, so the hashing algorithms don't hit one cached slot.
        key = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
        balancer.pick(black_box(key), black_box(&servers))
    });
}

macro_rules! algorithm {
    ($name:ident, $kind:expr) => {
        mod $name {
            use super::*;

            #[divan::bench(args = SIZES)]
            fn all(bencher: Bencher, n: usize) {
                run(bencher, $kind, n, false);
            }

            #[divan::bench(args = SIZES)]
            fn half(bencher: Bencher, n: usize) {
                run(bencher, $kind, n, true);
            }
        }
    };
}

algorithm!(round_robin, Balance::RoundRobin);
algorithm!(least_conn, Balance::LeastConn);
algorithm!(random, Balance::Random);
algorithm!(p2c, Balance::P2c);
algorithm!(maglev, Balance::Maglev);
algorithm!(
    ring_hash,
    Balance::RingHash {
        balance_factor: None
    }
);
algorithm!(
    ring_hash_bounded,
    Balance::RingHash {
        balance_factor: Some(125)
    }
);
algorithm!(first, Balance::First);
