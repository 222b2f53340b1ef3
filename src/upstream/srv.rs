//! DNS SRV records (RFC 2782) → servers, and ferry's own DNS lookups (`hickory-resolver`,
//! feature `dns`): SRV names, and names when `[global] resolvers` is set.
//!
//! A record gives `target:port`; each of the target's A/AAAA addresses becomes a server
//! with the record's weight and tier. The lowest priority value present is the primaries;
//! every higher one is a backup (ferry has two tiers). Weights 0..=65535 become ferry's
//! 1..=[`MAX_WEIGHT`] (see [`weights`]). A lone target `"."` says the service is not
//! offered: no servers.
//!
//! What a lookup can end in ([`Lookup`]): records; a definite "none" (NXDOMAIN, or an
//! answer without records of the type, or the target `"."`), after which the name has no
//! servers; or a failure (no answer in time, SERVFAIL, REFUSED, a network error), after which
//! the name keeps the servers it had.

use std::net::{IpAddr, SocketAddr};

use crate::config::MAX_WEIGHT;

/// One SRV record as ferry uses it. `target` is lowercase, without the final dot; `"."` is
/// the root ("no service").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

impl Record {
    /// Whether the record names a host (the root, `"."`, names none).
    fn has_target(&self) -> bool {
        self.target != "." && !self.target.is_empty()
    }
}

/// A server found in DNS: address, weight, backup.
pub type Found = (SocketAddr, u32, bool);

/// Maps SRV weights (0..=65535) to ferry weights (1..=[`MAX_WEIGHT`]) keeping their
/// proportions within the set: unchanged while the largest is at most `MAX_WEIGHT`, else
/// scaled so the largest becomes `MAX_WEIGHT` (rounded to nearest). Weight 0, and any that
/// scales below 1, becomes 1, the smallest ferry weight (RFC 2782: "a very small chance").
pub fn weights(srv: &[u16]) -> Vec<u32> {
    let max = srv.iter().copied().max().unwrap_or(0) as u64;
    srv.iter()
        .map(|&w| {
            let w = w as u64;
            let scaled = if max <= MAX_WEIGHT as u64 {
                w
            } else {
                (w * MAX_WEIGHT as u64 + max / 2) / max
            };
            scaled.clamp(1, MAX_WEIGHT as u64) as u32
        })
        .collect()
}

/// The servers `records` give, each target's addresses taken from `addrs` (already looked
/// up; a target without addresses gives none). Records with the lowest priority value are
/// primaries, the others backups; with `all_backup` (a `backup = true` srv entry) every
/// server is a backup. Deterministic: records in order of priority, target and port, each
/// target's addresses sorted; an address given twice keeps its first (most preferred) record.
pub fn servers<'a>(
    records: &[Record],
    addrs: impl Fn(&str) -> &'a [IpAddr],
    all_backup: bool,
) -> Vec<Found> {
    let mut usable: Vec<&Record> = records.iter().filter(|r| r.has_target()).collect();
    usable.sort_by(|a, b| {
        (a.priority, &a.target, a.port, std::cmp::Reverse(a.weight)).cmp(&(
            b.priority,
            &b.target,
            b.port,
            std::cmp::Reverse(b.weight),
        ))
    });
    let Some(primary) = usable.first().map(|r| r.priority) else {
        return Vec::new();
    };
    let mapped = weights(&usable.iter().map(|r| r.weight).collect::<Vec<_>>());
    let mut out: Vec<Found> = Vec::new();
    for (r, weight) in usable.iter().zip(mapped) {
        let mut ips = addrs(&r.target).to_vec();
        ips.sort();
        ips.dedup();
        for ip in ips {
            let a = SocketAddr::new(ip, r.port);
            if !out.iter().any(|f| f.0 == a) {
                out.push((a, weight, all_backup || r.priority != primary));
            }
        }
    }
    out
}

/// A lookup's outcome.
#[derive(Debug)]
pub enum Lookup<T> {
    /// The records, and until when they are valid (their smallest TTL from now).
    Found(T, std::time::Instant),
    /// A definite answer that there are none: NXDOMAIN, or no records of the type.
    None,
    /// No usable answer: the last good servers stay.
    Failed(String),
}

#[cfg(feature = "dns")]
pub use resolver::Resolver;

#[cfg(feature = "dns")]
mod resolver {
    use std::collections::HashMap;
    use std::net::{IpAddr, SocketAddr};
    use std::time::Instant;

    use hickory_resolver::TokioResolver;
    use hickory_resolver::config::{
        ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig,
    };
    use hickory_resolver::net::NetError;
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::proto::rr::{Name, RData, RecordType};

    use super::{Found, Lookup, Record};

    /// Answers kept at most (per pool): every lookup of a round fits many times over.
    const CACHE_SIZE: u64 = 1024;

    /// A DNS stub resolver: `[global] resolvers`, or the system's (`/etc/resolv.conf`, and
    /// `/etc/hosts` for names). Answers are cached for their TTL, never longer.
    #[derive(Clone)]
    pub struct Resolver(TokioResolver);

    impl std::fmt::Debug for Resolver {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Resolver")
        }
    }

    impl Resolver {
        /// A resolver asking `servers` (UDP, and TCP for truncated answers), or, when it is
        /// empty, the system's name servers. Fails only when the system's configuration
        /// cannot be read.
        pub fn new(servers: &[SocketAddr]) -> Result<Resolver, String> {
            let provider = TokioRuntimeProvider::default();
            let mut builder = if servers.is_empty() {
                TokioResolver::builder(provider)
                    .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?
            } else {
                let mut config = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
                for a in servers {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = a.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = a.port();
                    config.add_name_server(NameServerConfig::new(a.ip(), true, vec![udp, tcp]));
                }
                let mut b = TokioResolver::builder_with_config(config, provider);
                // The operator named the servers: ask them, not /etc/hosts.
                b.options_mut().use_hosts_file = ResolveHosts::Never;
                b
            };
            let opts = builder.options_mut();
            opts.cache_size = CACHE_SIZE;
            // Within the caller's RESOLVE_TIMEOUT, a second try (or a second server).
            opts.timeout = std::time::Duration::from_secs(2);
            opts.attempts = 2;
            builder
                .build()
                .map(Resolver)
                .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
        }

        /// Looks up `name`'s A and AAAA records.
        pub async fn ips(&self, name: &str) -> Lookup<Vec<IpAddr>> {
            let name = match Name::from_utf8(name) {
                Ok(n) => n,
                Err(e) => return Lookup::Failed(format!("{name:?} is not a DNS name: {e}")),
            };
            let (v4, v6) = tokio::join!(
                self.0.lookup(name.clone(), RecordType::A),
                self.0.lookup(name, RecordType::AAAA),
            );
            let mut ips = Vec::new();
            let mut until: Option<Instant> = None;
            for r in [v4, v6] {
                match classify(r) {
                    Lookup::Found(l, u) => {
                        until = Some(until.map_or(u, |t| t.min(u)));
                        ips.extend(l.answers().iter().filter_map(|r| match &r.data {
                            RData::A(a) => Some(IpAddr::V4(a.0)),
                            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                            _ => None,
                        }));
                    }
                    Lookup::None => {}
                    Lookup::Failed(e) => return Lookup::Failed(e),
                }
            }
            match until {
                Some(u) if !ips.is_empty() => Lookup::Found(ips, u),
                _ => Lookup::None,
            }
        }

        /// Looks up `name`'s SRV records and their targets' addresses (from the answer's
        /// additional section when the server put them there, as Consul does; else asked
        /// for), and turns them into servers. Any failed lookup fails the whole name.
        pub async fn srv(&self, name: &str, all_backup: bool) -> Lookup<Vec<Found>> {
            let qname = match Name::from_utf8(name) {
                Ok(n) => n,
                Err(e) => return Lookup::Failed(format!("{name:?} is not a DNS name: {e}")),
            };
            let lookup = match classify(self.0.lookup(qname, RecordType::SRV).await) {
                Lookup::Found(l, u) => (l, u),
                Lookup::None => return Lookup::None,
                Lookup::Failed(e) => return Lookup::Failed(e),
            };
            let (answer, mut until) = lookup;
            let records: Vec<Record> = answer
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(s) => Some(Record {
                        priority: s.priority,
                        weight: s.weight,
                        port: s.port,
                        target: target_name(&s.target.to_ascii()),
                    }),
                    _ => None,
                })
                .collect();
            if records.is_empty() {
                return Lookup::None;
            }
            // Addresses the server sent along with the records.
            let mut addrs: HashMap<String, Vec<IpAddr>> = HashMap::new();
            for r in answer.additionals() {
                let ip = match &r.data {
                    RData::A(a) => IpAddr::V4(a.0),
                    RData::AAAA(a) => IpAddr::V6(a.0),
                    _ => continue,
                };
                let t = target_name(&r.name.to_ascii());
                if records.iter().any(|rec| rec.target == t) {
                    addrs.entry(t).or_default().push(ip);
                    let ttl = std::time::Duration::from_secs(r.ttl.into());
                    until = until.min(Instant::now() + ttl);
                }
            }
            // The others, asked for at once.
            let mut missing: Vec<String> = records
                .iter()
                .filter(|r| r.has_target() && !addrs.contains_key(&r.target))
                .map(|r| r.target.clone())
                .collect();
            missing.sort_unstable();
            missing.dedup();
            let mut lookups = tokio::task::JoinSet::new();
            for t in missing {
                let me = self.clone();
                lookups.spawn(async move {
                    let found = me.ips(&t).await;
                    (t, found)
                });
            }
            while let Some(done) = lookups.join_next().await {
                let Ok((t, found)) = done else {
                    return Lookup::Failed("a target's lookup ended early".into());
                };
                match found {
                    Lookup::Found(ips, u) => {
                        until = until.min(u);
                        addrs.insert(t, ips);
                    }
                    // A target without addresses gives no server.
                    Lookup::None => {}
                    Lookup::Failed(e) => {
                        return Lookup::Failed(format!("target {t}: {e}"));
                    }
                }
            }
            let servers = super::servers(
                &records,
                |t| addrs.get(t).map_or(&[][..], Vec::as_slice),
                all_backup,
            );
            if servers.is_empty() {
                return Lookup::None;
            }
            Lookup::Found(servers, until)
        }
    }

    /// A name as records carry it: lowercase, without the final dot (the root stays ".").
    fn target_name(ascii: &str) -> String {
        let lower = ascii.to_ascii_lowercase();
        match lower.strip_suffix('.') {
            Some("") | None => lower,
            Some(t) => t.to_string(),
        }
    }

    /// Sorts a lookup's result into records, a definite "none", or a failure.
    fn classify(
        r: Result<hickory_resolver::lookup::Lookup, NetError>,
    ) -> Lookup<hickory_resolver::lookup::Lookup> {
        match r {
            Ok(l) if l.answers().is_empty() => Lookup::None,
            Ok(l) => {
                let until = l.valid_until();
                Lookup::Found(l, until)
            }
            Err(e) if e.is_no_records_found() => Lookup::None,
            Err(NetError::Timeout) => Lookup::Failed("no answer in time".into()),
            Err(e) => Lookup::Failed(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(priority: u16, weight: u16, port: u16, target: &str) -> Record {
        Record {
            priority,
            weight,
            port,
            target: target.into(),
        }
    }

    #[test]
    fn weights_keep_their_proportions() {
        // Within ferry's range: as they are (0 becomes 1).
        assert_eq!(weights(&[1, 3, 0, 256]), vec![1, 3, 1, 256]);
        assert_eq!(weights(&[0, 0]), vec![1, 1]);
        assert_eq!(weights(&[]), Vec::<u32>::new());
        // Beyond it: scaled so the largest is 256, rounded; never below 1.
        assert_eq!(weights(&[100, 300]), vec![85, 256]);
        assert_eq!(weights(&[65535, 32768, 1, 0]), vec![256, 128, 1, 1]);
        assert_eq!(weights(&[257, 257]), vec![256, 256]);
        assert_eq!(weights(&[1000, 10]), vec![256, 3]);
        for w in weights(&[65535, 12345, 7, 0, 300]) {
            assert!((1..=MAX_WEIGHT).contains(&w));
        }
    }

    #[test]
    fn records_become_servers_by_priority_and_weight() {
        let a: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap()];
        let b: Vec<IpAddr> = vec!["::1".parse().unwrap()];
        let c: Vec<IpAddr> = vec!["10.0.0.9".parse().unwrap()];
        let addrs = |t: &str| -> &[IpAddr] {
            match t {
                "a.example" => &a,
                "b.example" => &b,
                "c.example" => &c,
                _ => &[],
            }
        };
        let records = [
            rec(20, 5, 7000, "c.example"),
            rec(10, 3, 5432, "b.example"),
            rec(10, 1, 5432, "a.example"),
            // No addresses: nothing.
            rec(10, 1, 5432, "gone.example"),
        ];
        let s = servers(&records, addrs, false);
        assert_eq!(
            s,
            vec![
                ("10.0.0.1:5432".parse().unwrap(), 1, false),
                ("10.0.0.2:5432".parse().unwrap(), 1, false),
                ("[::1]:5432".parse().unwrap(), 3, false),
                // A higher priority value: a backup.
                ("10.0.0.9:7000".parse().unwrap(), 5, true),
            ]
        );
        // The same in any order of records.
        let mut reversed = records.to_vec();
        reversed.reverse();
        assert_eq!(servers(&reversed, addrs, false), s);
        // A backup srv entry: everything is a backup.
        assert!(servers(&records, addrs, true).iter().all(|f| f.2));
    }

    #[test]
    fn the_root_target_means_no_service() {
        let none: Vec<IpAddr> = Vec::new();
        let addrs = |_: &str| -> &[IpAddr] { &none };
        assert!(servers(&[rec(0, 0, 0, ".")], addrs, false).is_empty());
        assert!(servers(&[], addrs, false).is_empty());
        // Beside real records it is skipped, and does not hold the primary tier.
        let one: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        let addrs = |t: &str| -> &[IpAddr] { if t == "a" { &one } else { &none } };
        assert_eq!(
            servers(&[rec(0, 0, 0, "."), rec(5, 0, 80, "a")], addrs, false),
            vec![("10.0.0.1:80".parse().unwrap(), 1, false)]
        );
    }

    #[test]
    fn an_address_in_two_records_keeps_the_preferred_one() {
        let one: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap()];
        let addrs = |_: &str| -> &[IpAddr] { &one };
        assert_eq!(
            servers(&[rec(9, 50, 80, "y"), rec(1, 2, 80, "x")], addrs, false),
            vec![("10.0.0.1:80".parse().unwrap(), 2, false)]
        );
    }
}
