//! Per-client-IP limits: concurrent connections and a connection rate (GCRA, the
//! token-bucket equivalent that needs one timestamp per client).
//!
//! Memory stays bounded under a flood from many addresses: an entry is kept only while its
//! client has open connections or a bucket that has not refilled; such entries are dropped
//! when the client's last connection ends, and swept otherwise. The table holds at most
//! `max_tracked` clients; when it is full and nothing can be swept, a new client is refused
//! (`limited`) rather than let in untracked, and the refusal says so in the log.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

const SHARDS: usize = 32;

/// Entries of the eviction ring looked at per admission, and more when the shard is full
/// before a new client is refused: constant work under the lock, whatever the table size.
const STEP: usize = 2;
const STEP_WHEN_FULL: usize = 16;

/// `per_client` of a listener.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientLimits {
    pub max_connections: Option<u32>,
    /// Connections per second, and how many may come at once.
    pub rate: Option<(f64, u32)>,
    pub max_tracked: usize,
    /// IPv6 clients are counted per network of this length (one host usually owns a /64).
    pub ipv6_prefix: u8,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    active: u32,
    /// GCRA's theoretical arrival time, in ns since the table's epoch.
    tat: u64,
    /// Which ring slot stands for this entry (older slots for its key are stale).
    generation: u32,
}

impl Entry {
    /// Holds nothing: no connection, and the bucket has refilled.
    fn idle(&self, now: u64) -> bool {
        self.active == 0 && self.tat <= now
    }
}

/// One shard: the entries, and a ring of their keys that eviction walks a few steps at a
/// time (the "clock" of a page cache) instead of scanning the map.
#[derive(Debug, Default)]
struct Shard {
    map: HashMap<IpAddr, Entry>,
    ring: VecDeque<(IpAddr, u32)>,
    generation: u32,
}

impl Shard {
    /// Looks at up to `n` ring slots: stale ones are dropped, idle entries evicted, the
    /// rest go round again. Returns whether anything was evicted.
    fn evict(&mut self, n: usize, now: u64) -> bool {
        let mut evicted = false;
        for _ in 0..n.min(self.ring.len()) {
            let Some((key, generation)) = self.ring.pop_front() else {
                break;
            };
            match self.map.get(&key) {
                Some(e) if e.generation == generation => {
                    if e.idle(now) {
                        self.map.remove(&key);
                        evicted = true;
                    } else {
                        self.ring.push_back((key, generation));
                    }
                }
                // Removed or re-added since: a stale slot.
                _ => {}
            }
        }
        evicted
    }

    fn insert(&mut self, key: IpAddr) -> &mut Entry {
        self.generation = self.generation.wrapping_add(1);
        let generation = self.generation;
        self.ring.push_back((key, generation));
        self.map.entry(key).or_insert(Entry {
            active: 0,
            tat: 0,
            generation,
        })
    }
}

#[derive(Debug)]
pub struct ClientTable {
    shards: Box<[Mutex<Shard>]>,
    limits: ClientLimits,
    /// ns between connections at the configured rate, and the burst tolerance.
    interval_ns: u64,
    tolerance_ns: u64,
    per_shard: usize,
    epoch: Instant,
}

/// Why a client was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyConnections,
    RateExceeded,
    TableFull,
}

/// A client's open connection: released on drop.
#[derive(Debug)]
pub struct ClientPermit {
    table: Arc<ClientTable>,
    key: IpAddr,
}

/// The key a client is counted under: its IPv4 address, or its IPv6 network of
/// `ipv6_prefix` bits.
fn key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(ipv6_prefix.clamp(1, 128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & mask))
        }
    }
}

impl ClientTable {
    pub fn new(limits: ClientLimits) -> ClientTable {
        let (interval_ns, tolerance_ns) = match limits.rate {
            Some((per_sec, burst)) => {
                // Float to int saturates; the product saturates too: a slow rate with a
                // large burst ("1/h", burst 10000000) is ~3.6e19 ns, more than a u64.
                let t = (1e9 / per_sec) as u64;
                (t, t.saturating_mul(u64::from(burst.max(1) - 1)))
            }
            None => (0, 0),
        };
        ClientTable {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            limits,
            interval_ns,
            tolerance_ns,
            per_shard: limits.max_tracked.div_ceil(SHARDS).max(1),
            epoch: Instant::now(),
        }
    }

    fn shard(&self, key: IpAddr) -> MutexGuard<'_, Shard> {
        let i = (crate::balance::hash_ip(key) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a rate is set.
    pub fn limits_rate(&self) -> bool {
        self.limits.rate.is_some()
    }

    /// Whether one more datagram of `ip` (a UDP listener's client with a session, which
    /// holds its entry) is within the rate; it counts against the rate if it is.
    pub fn pass(&self, ip: IpAddr) -> bool {
        if self.limits.rate.is_none() {
            return true;
        }
        let key = key(ip, self.limits.ipv6_prefix);
        let now = self.now_ns();
        let mut shard = self.shard(key);
        // The session's permit keeps the entry; a datagram cannot outlive it, so this is
        // only a stale view of a session that just ended: let it through.
        let Some(e) = shard.map.get_mut(&key) else {
            return true;
        };
        let tat = e.tat.max(now);
        if tat - now > self.tolerance_ns {
            return false;
        }
        e.tat = tat.saturating_add(self.interval_ns);
        true
    }

    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ClientPermit, Refusal> {
        let key = key(ip, self.limits.ipv6_prefix);
        let now = self.now_ns();
        let mut shard = self.shard(key);
        shard.evict(STEP, now);
        if !shard.map.contains_key(&key) && shard.map.len() >= self.per_shard {
            shard.evict(STEP_WHEN_FULL, now);
            if shard.map.len() >= self.per_shard {
                return Err(Refusal::TableFull);
            }
        }
        let e = match shard.map.get_mut(&key) {
            Some(e) => e,
            None => shard.insert(key),
        };
        if let Some(max) = self.limits.max_connections
            && e.active >= max
        {
            return Err(Refusal::TooManyConnections);
        }
        if self.limits.rate.is_some() {
            let tat = e.tat.max(now);
            if tat - now > self.tolerance_ns {
                if e.idle(now) {
                    shard.map.remove(&key);
                }
                return Err(Refusal::RateExceeded);
            }
            e.tat = tat.saturating_add(self.interval_ns);
        }
        e.active += 1;
        Ok(ClientPermit {
            table: self.clone(),
            key,
        })
    }

    /// Drops entries that hold nothing (no connection, bucket full again).
    pub fn sweep(&self) {
        let now = self.now_ns();
        for s in self.shards.iter() {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            s.map.retain(|_, e| !e.idle(now));
            let Shard { map, ring, .. } = &mut *s;
            ring.retain(|(k, g)| map.get(k).is_some_and(|e| e.generation == *g));
        }
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }

    /// The time `n` more connections from one client at once would need, at the
    /// configured rate (for tests and docs).
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }

    /// Ring slots held, live and stale (for tests: bounded by a multiple of `tracked`).
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).ring.len())
            .sum()
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let now = self.table.now_ns();
        let mut shard = self.table.shard(self.key);
        if let Some(e) = shard.map.get_mut(&self.key) {
            e.active = e.active.saturating_sub(1);
            if e.idle(now) {
                shard.map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    fn table(max: Option<u32>, rate: Option<(f64, u32)>, tracked: usize) -> Arc<ClientTable> {
        Arc::new(ClientTable::new(ClientLimits {
            max_connections: max,
            rate,
            max_tracked: tracked,
            ipv6_prefix: 64,
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_cap_is_exact() {
        let t = table(Some(3), None, 1000);
        let a = ip(1);
        let permits: Vec<_> = (0..3).map(|_| t.admit(a).unwrap()).collect();
        assert_eq!(t.admit(a).unwrap_err(), Refusal::TooManyConnections);
        assert!(t.admit(ip(2)).is_ok(), "other clients unaffected");
        drop(permits);
        assert!(t.admit(a).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn rate_with_burst() {
        let t = table(None, Some((10.0, 5)), 1000);
        let a = ip(1);
        // A burst of 5 at once, then one per 100 ms.
        for _ in 0..5 {
            drop(t.admit(a).unwrap());
        }
        assert_eq!(t.admit(a).unwrap_err(), Refusal::RateExceeded);
        tokio::time::advance(Duration::from_millis(100)).await;
        drop(t.admit(a).unwrap());
        assert_eq!(t.admit(a).unwrap_err(), Refusal::RateExceeded);
        // Over 10 s, about 100 more.
        let mut ok = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            if t.admit(a).is_ok() {
                ok += 1;
            }
        }
        assert!((99..=101).contains(&ok), "{ok} admitted in 10 s at 10/s");
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_under_a_flood_of_addresses() {
        let t = table(Some(10), Some((1.0, 1)), 1000);
        let mut held = Vec::new();
        // 50,000 distinct clients pass through; some hold connections.
        for n in 0..50_000u32 {
            match t.admit(ip(n)) {
                Ok(p) if n % 100 == 0 => held.push(p),
                _ => {}
            }
            assert!(t.tracked() <= 1000 + SHARDS);
        }
        // Past the buckets' refill, only clients with open connections remain.
        tokio::time::advance(Duration::from_secs(2)).await;
        t.sweep();
        assert_eq!(t.tracked(), held.len());
        drop(held);
        assert_eq!(t.tracked(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_table_refuses_new_clients_only() {
        let t = table(None, None, SHARDS); // one entry per shard
        let mut held = Vec::new();
        let mut refused = 0;
        for n in 0..1000 {
            match t.admit(ip(n)) {
                Ok(p) => held.push((n, p)),
                Err(Refusal::TableFull) => refused += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(refused > 0);
        // Known clients still get in.
        let (n, _) = &held[0];
        assert!(t.admit(ip(*n)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_counted_per_network() {
        let t = table(Some(2), None, 1000);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _p = (t.admit(a).unwrap(), t.admit(b).unwrap());
        assert_eq!(
            t.admit(a).unwrap_err(),
            Refusal::TooManyConnections,
            "same /64"
        );
        assert!(t.admit(other).is_ok(), "another /64");
        // A mapped IPv4 client is its IPv4 address; /128 counts each address.
        assert_eq!(
            key("::ffff:10.0.0.1".parse().unwrap(), 64),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(key(a, 128), a);
        assert_eq!(key(a, 48), "2001:db8:1::".parse::<IpAddr>().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn one_network_cannot_fill_the_table() {
        // One /64 sending from 100,000 addresses is one client.
        let t = table(None, Some((1000.0, 1000)), 64);
        for n in 0..100_000u128 {
            let ip = IpAddr::V6(Ipv6Addr::from((0x2001_0db8_0000_0001u128 << 64) | n));
            let _ = t.admit(ip);
        }
        assert_eq!(t.tracked(), 1);
        assert!(t.admit("2001:db8:2::1".parse().unwrap()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn slow_rate_with_large_burst_does_not_overflow() {
        let t = table(None, Some((1.0 / 3600.0, 10_000_000)), 1000);
        let a = ip(1);
        for _ in 0..1000 {
            drop(t.admit(a).unwrap());
        }
        tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
        drop(t.admit(a).unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_keeps_up_and_the_ring_stays_bounded() {
        let t = table(None, Some((10.0, 1)), 320);
        // Waves of new clients; each wave's buckets refill before the next comes.
        for wave in 0..50u32 {
            let clients = || (0..300u32).map(|n| ip(wave * 1000 + n));
            // As many as an empty table admits: the last wave's idle entries all made way.
            let fresh = table(None, Some((10.0, 1)), 320);
            let expected = clients().filter(|c| fresh.admit(*c).is_ok()).count();
            let admitted = clients().filter(|c| t.admit(*c).is_ok()).count();
            assert_eq!(admitted, expected, "wave {wave}");
            assert!(t.tracked() <= 320 + SHARDS);
            assert!(t.slots() <= 4 * (320 + SHARDS), "{} ring slots", t.slots());
            tokio::time::advance(Duration::from_secs(1)).await;
        }
    }
}
