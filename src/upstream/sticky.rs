//! Client IP → server affinity with bounded memory.
//!
//! Sharded maps under short, never-awaited locks. An entry unused for `ttl` is forgotten.
//! The table holds at most `max_entries`: when a shard is full, expired entries are purged
//! (at most once a second per shard); if it is still full, the new client is not
//! remembered, so a flood of new addresses can neither grow memory nor push out the
//! clients already pinned.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const SHARDS: usize = 16;

#[derive(Debug)]
struct Shard {
    map: HashMap<IpAddr, (SocketAddr, Instant)>,
    last_purge: Option<Instant>,
}

#[derive(Debug)]
pub struct StickyTable {
    shards: Box<[Mutex<Shard>]>,
    ttl: Duration,
    per_shard: usize,
}

impl StickyTable {
    pub fn new(ttl: Duration, max_entries: usize) -> StickyTable {
        StickyTable {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        last_purge: None,
                    })
                })
                .collect(),
            ttl,
            per_shard: max_entries.div_ceil(SHARDS).max(1),
        }
    }

    fn shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, Shard> {
        let i = (crate::balance::hash_ip(ip) as usize) % SHARDS;
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server this client was last sent to, if remembered and not expired.
    pub fn get(&self, ip: IpAddr) -> Option<SocketAddr> {
        let now = Instant::now();
        let mut s = self.shard(ip);
        match s.map.get_mut(&ip) {
            Some((addr, used)) if now.duration_since(*used) < self.ttl => {
                *used = now;
                Some(*addr)
            }
            Some(_) => {
                s.map.remove(&ip);
                None
            }
            None => None,
        }
    }

    /// Remembers that this client went to `addr`.
    pub fn put(&self, ip: IpAddr, addr: SocketAddr) {
        let now = Instant::now();
        let ttl = self.ttl;
        let mut s = self.shard(ip);
        if let Some(e) = s.map.get_mut(&ip) {
            *e = (addr, now);
            return;
        }
        if s.map.len() >= self.per_shard {
            if s.last_purge
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
            {
                s.map.retain(|_, (_, used)| now.duration_since(*used) < ttl);
                s.last_purge = Some(now);
            }
            if s.map.len() >= self.per_shard {
                return;
            }
        }
        s.map.insert(ip, (addr, now));
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).map.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[tokio::test(start_paused = true)]
    async fn remembers_and_expires() {
        let t = StickyTable::new(Duration::from_secs(10), 100);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        t.put(ip(1), a);
        assert_eq!(t.get(ip(1)), Some(a));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(t.get(ip(1)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_under_flood() {
        let t = StickyTable::new(Duration::from_secs(10), 1000);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for n in 0..50_000 {
            t.put(ip(n), a);
        }
        assert!(t.len() <= 1000 + SHARDS, "{} entries", t.len());
        // After the ttl, new clients are remembered again.
        tokio::time::advance(Duration::from_secs(11)).await;
        t.put(ip(99_999_999), a);
        assert_eq!(t.get(ip(99_999_999)), Some(a));
    }
}
