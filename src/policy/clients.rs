//! Per-client-IP limits: concurrent connections and a connection rate (GCRA, the
//! token-bucket equivalent that needs one timestamp per client).
//!
//! Memory stays bounded under a flood from many addresses: an entry is kept only while its
//! client has open connections or a bucket that has not refilled; such entries are dropped
//! when the client's last connection ends, and swept otherwise. The table holds at most
//! `max_tracked` clients; when it is full and nothing can be swept, a new client is refused
//! (`limited`) rather than let in untracked, and the refusal says so in the log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

const SHARDS: usize = 32;

/// `per_client` of a listener.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientLimits {
    pub max_connections: Option<u32>,
    /// Connections per second, and how many may come at once.
    pub rate: Option<(f64, u32)>,
    pub max_tracked: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    active: u32,
    /// GCRA's theoretical arrival time, in ns since the table's epoch.
    tat: u64,
}

#[derive(Debug)]
pub struct ClientTable {
    shards: Box<[Mutex<HashMap<IpAddr, Entry>>]>,
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
    ip: IpAddr,
}

impl ClientTable {
    pub fn new(limits: ClientLimits) -> ClientTable {
        let (interval_ns, tolerance_ns) = match limits.rate {
            Some((per_sec, burst)) => {
                let t = (1e9 / per_sec) as u64;
                (t, t * u64::from(burst.max(1) - 1))
            }
            None => (0, 0),
        };
        ClientTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            limits,
            interval_ns,
            tolerance_ns,
            per_shard: limits.max_tracked.div_ceil(SHARDS).max(1),
            epoch: Instant::now(),
        }
    }

    fn shard(&self, ip: IpAddr) -> MutexGuard<'_, HashMap<IpAddr, Entry>> {
        let i = (crate::balance::hash_ip(ip) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ClientPermit, Refusal> {
        let ip = ip.to_canonical();
        let now = self.now_ns();
        let mut shard = self.shard(ip);
        if !shard.contains_key(&ip) && shard.len() >= self.per_shard {
            shard.retain(|_, e| e.active > 0 || e.tat > now);
            if shard.len() >= self.per_shard {
                return Err(Refusal::TableFull);
            }
        }
        let e = shard.entry(ip).or_insert(Entry { active: 0, tat: 0 });
        if let Some(max) = self.limits.max_connections
            && e.active >= max
        {
            return Err(Refusal::TooManyConnections);
        }
        if self.limits.rate.is_some() {
            let tat = e.tat.max(now);
            if tat - now > self.tolerance_ns {
                if e.active == 0 && e.tat <= now {
                    shard.remove(&ip);
                }
                return Err(Refusal::RateExceeded);
            }
            e.tat = tat + self.interval_ns;
        }
        e.active += 1;
        Ok(ClientPermit {
            table: self.clone(),
            ip,
        })
    }

    /// Drops entries that hold nothing (no connection, bucket full again).
    pub fn sweep(&self) {
        let now = self.now_ns();
        for s in self.shards.iter() {
            s.lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, e| e.active > 0 || e.tat > now);
        }
    }

    /// Clients tracked now.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// The time `n` more connections from one client at once would need, at the
    /// configured rate (for tests and docs).
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval_ns)
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let now = self.table.now_ns();
        let mut shard = self.table.shard(self.ip);
        if let Some(e) = shard.get_mut(&self.ip) {
            e.active = e.active.saturating_sub(1);
            if e.active == 0 && e.tat <= now {
                shard.remove(&self.ip);
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
}
