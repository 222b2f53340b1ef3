//! Servers found in DNS: a name's every A/AAAA record becomes a server; an SRV name's
//! records give servers with their ports, tiers and weights (`srv.rs`). Re-resolved every
//! `resolve_interval`, and sooner when the answers' TTL ends (at most once a second).
//!
//! A failed lookup (no answer within [`RESOLVE_TIMEOUT`], SERVFAIL, a network error) keeps
//! the name's last servers, logs a warning, and is tried again within [`RETRY_FAILED`]. A definite empty answer (NXDOMAIN, no
//! records, the target ".") removes an SRV name's servers: the service says it has none; a
//! plain name keeps its last addresses then too, as it always has.
//!
//! Names are looked up with the system's resolver (getaddrinfo: `/etc/hosts`, then DNS)
//! unless `[global] resolvers` is set; SRV names, and every name when `resolvers` is set,
//! with ferry's own (`hickory-resolver`, feature `dns`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Pool;
use super::srv::{Found, Lookup};
use crate::config::ServerAddr;

/// How long a lookup may take before it counts as failed (the last good addresses stay).
/// Lookups of a pool run at once, so this bounds a whole round. An SRV name's lookup
/// (its records, then its targets' addresses) is one lookup.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The soonest a round follows the previous one because the answers' TTL ended: a TTL of
/// 0 (Consul's default) does not make ferry ask without pause.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);

/// A failed lookup is tried again this soon (or at `resolve_interval` if sooner), while
/// its name keeps its last servers.
pub const RETRY_FAILED: Duration = Duration::from_secs(5);

/// A pool's DNS state: its resolver (made at first use) and when to look again.
#[derive(Debug)]
pub(super) struct Dns {
    /// `[global] resolvers`; empty: the system's.
    servers: Vec<SocketAddr>,
    #[cfg(feature = "dns")]
    resolver: Mutex<Option<super::srv::Resolver>>,
    /// When the last round ended, and when the soonest TTL of its answers ends.
    schedule: Mutex<(Instant, Option<Instant>)>,
    /// Wakes the re-resolution loop when a round it did not run (an admin API change)
    /// moved the schedule.
    rescheduled: Notify,
}

impl Dns {
    pub(super) fn new(servers: &[SocketAddr]) -> Dns {
        Dns {
            servers: servers.to_vec(),
            #[cfg(feature = "dns")]
            resolver: Mutex::new(None),
            schedule: Mutex::new((Instant::now(), None)),
            rescheduled: Notify::new(),
        }
    }

    /// Ferry's own resolver, made at first use (the system's configuration is read then).
    #[cfg(feature = "dns")]
    fn resolver(&self) -> Result<super::srv::Resolver, String> {
        let mut r = self.resolver.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = &*r {
            return Ok(r.clone());
        }
        let made = super::srv::Resolver::new(&self.servers)?;
        *r = Some(made.clone());
        Ok(made)
    }

    /// When the next round is due: `interval` after the last, or when its answers expire,
    /// but never sooner than [`MIN_REFRESH`] after it.
    fn next_round(&self, interval: Duration) -> Instant {
        let (last, expiry) = *self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        next_round(last, expiry, interval)
    }

    /// A round ended now; `expiry`: when the soonest TTL of its answers ends.
    fn round_done(&self, expiry: Option<Instant>) {
        *self.schedule.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), expiry);
        self.rescheduled.notify_waiters();
    }
}

/// See [`Dns::next_round`].
fn next_round(last: Instant, expiry: Option<Instant>, interval: Duration) -> Instant {
    let regular = crate::clock::after(last, interval);
    match expiry {
        Some(e) => regular.min(e.max(last + MIN_REFRESH)),
        None => regular,
    }
}

/// Looks up one configured server (never an IP address): its servers, or why not.
async fn lookup(
    dns: Option<Result<Resolver, String>>,
    spec: crate::config::ServerSpec,
) -> Lookup<Vec<Found>> {
    let with = |addrs: Vec<SocketAddr>| {
        addrs
            .into_iter()
            .map(|a| (a, spec.weight, spec.backup))
            .collect::<Vec<Found>>()
    };
    match (&spec.addr, dns) {
        (ServerAddr::Ip(_), _) => Lookup::None,
        (_, Some(Err(e))) => Lookup::Failed(e),
        (ServerAddr::Name { host, port }, None) => {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                // getaddrinfo tells no TTL: the name is looked at again after
                // `resolve_interval`.
                Ok(addrs) => Lookup::Found(with(addrs.collect()), far_future()),
                Err(e) => Lookup::Failed(e.to_string()),
            }
        }
        #[cfg(feature = "dns")]
        (ServerAddr::Name { host, port }, Some(Ok(r))) => match r.ips(host).await {
            Lookup::Found(ips, until) => Lookup::Found(
                with(
                    ips.into_iter()
                        .map(|ip| SocketAddr::new(ip, *port))
                        .collect(),
                ),
                until,
            ),
            Lookup::None => Lookup::None,
            Lookup::Failed(e) => Lookup::Failed(e),
        },
        #[cfg(feature = "dns")]
        (ServerAddr::Srv { name }, Some(Ok(r))) => r.srv(name, spec.backup).await,
        #[cfg(feature = "dns")]
        (ServerAddr::Srv { .. }, None) => Lookup::Failed("no resolver for an SRV name".into()),
        #[cfg(not(feature = "dns"))]
        (_, _) => Lookup::Failed("this build of ferry has no DNS resolver of its own".into()),
    }
}

#[cfg(feature = "dns")]
type Resolver = super::srv::Resolver;
/// Never made: without the `dns` feature every lookup goes through getaddrinfo.
#[cfg(not(feature = "dns"))]
#[derive(Debug, Clone)]
enum Resolver {}

/// An instant later than any TTL: "no expiry known".
fn far_future() -> std::time::Instant {
    std::time::Instant::now() + crate::clock::MAX_DURATION
}

/// Resolves every name of `pool` once and swaps in the new server set if it changed.
/// Returns the names (as configured) that gave no servers: failed, or, for an SRV name,
/// had none.
pub async fn resolve_all(pool: &Pool) -> Vec<String> {
    let specs = pool.specs();
    // Ferry's own resolver, where a lookup needs it.
    let own = |addr: &ServerAddr| -> Option<Result<Resolver, String>> {
        let needed = match addr {
            ServerAddr::Ip(_) => false,
            ServerAddr::Name { .. } => !pool.dns.servers.is_empty(),
            ServerAddr::Srv { .. } => true,
        };
        if !needed {
            return None;
        }
        #[cfg(feature = "dns")]
        return Some(pool.dns.resolver());
        #[cfg(not(feature = "dns"))]
        Some(Err(
            "this build of ferry has no DNS resolver of its own".into()
        ))
    };
    // Every name looked up at once, each within RESOLVE_TIMEOUT.
    let mut lookups = tokio::task::JoinSet::new();
    for (i, spec) in specs.iter().enumerate() {
        if !spec.addr.is_dns() {
            continue;
        }
        let (dns, spec) = (own(&spec.addr), spec.clone());
        lookups.spawn(async move {
            let r = match tokio::time::timeout(RESOLVE_TIMEOUT, lookup(dns, spec)).await {
                Ok(r) => r,
                Err(_) => Lookup::Failed(format!("no answer within {RESOLVE_TIMEOUT:?}")),
            };
            (i, r)
        });
    }
    let mut found: Vec<Option<Lookup<Vec<Found>>>> = specs.iter().map(|_| None).collect();
    while let Some(done) = lookups.join_next().await {
        if let Ok((i, r)) = done {
            found[i] = Some(r);
        }
    }

    let mut failed = Vec::new();
    let mut expiry: Option<std::time::Instant> = None;
    let current = pool.servers();
    let mut wanted: Vec<(Arc<str>, SocketAddr, u32, bool)> = Vec::new();
    // An address given literally is that server; a name resolving to it adds nothing.
    let literal: Vec<SocketAddr> = specs
        .iter()
        .filter_map(|s| match s.addr {
            ServerAddr::Ip(a) => Some(a),
            _ => None,
        })
        .collect();
    for (spec, found) in specs.iter().zip(found) {
        if let ServerAddr::Ip(a) = spec.addr {
            if !wanted.iter().any(|w| w.1 == a) {
                wanted.push((a.to_string().into(), a, spec.weight, spec.backup));
            }
            continue;
        }
        let name: Arc<str> = spec.addr.to_string().into();
        let srv = matches!(spec.addr, ServerAddr::Srv { .. });
        match found.unwrap_or_else(|| Lookup::Failed("the lookup failed".into())) {
            Lookup::Found(servers, until) if !servers.is_empty() => {
                expiry = Some(expiry.map_or(until, |e| e.min(until)));
                for (a, weight, backup) in servers {
                    if !wanted.iter().any(|w| w.1 == a) && !literal.contains(&a) {
                        wanted.push((name.clone(), a, weight, backup));
                    }
                }
            }
            // An SRV name's definite "none": the service has no servers now.
            Lookup::Found(..) | Lookup::None if srv => {
                failed.push(name.to_string());
                if current.servers.iter().any(|s| s.configured == name) {
                    tracing::warn!(upstream = %pool.name, "{name} has no records now (no such name, or none of its targets has an address): its servers are removed");
                }
            }
            // A name without addresses keeps its last ones.
            Lookup::Found(..) | Lookup::None => {
                tracing::warn!(upstream = %pool.name, "{name} resolves to no address; keeping its last servers");
                failed.push(name.to_string());
                keep_last(&current.servers, &name, &mut wanted);
            }
            Lookup::Failed(e) => {
                let retry = std::time::Instant::now() + RETRY_FAILED;
                expiry = Some(expiry.map_or(retry, |e| e.min(retry)));
                tracing::warn!(upstream = %pool.name, "cannot resolve {name}: {e}; keeping its last servers, trying again within {RETRY_FAILED:?}");
                failed.push(name.to_string());
                keep_last(&current.servers, &name, &mut wanted);
            }
        }
    }
    drop(current);
    if pool.replace_servers(wanted) {
        let addrs: Vec<String> = pool
            .servers()
            .servers
            .iter()
            .map(|s| s.addr.to_string())
            .collect();
        let now = if addrs.is_empty() {
            "none".to_string()
        } else {
            addrs.join(", ")
        };
        tracing::info!(upstream = %pool.name, "servers now: {now}");
    }
    let expiry =
        expiry.map(|e| Instant::now() + e.saturating_duration_since(std::time::Instant::now()));
    pool.dns.round_done(expiry);
    failed
}

fn keep_last(
    current: &[Arc<super::Server>],
    name: &Arc<str>,
    wanted: &mut Vec<(Arc<str>, SocketAddr, u32, bool)>,
) {
    for s in current.iter().filter(|s| s.configured == *name) {
        if !wanted.iter().any(|w| w.1 == s.addr) {
            wanted.push((s.configured.clone(), s.addr, s.weight(), s.backup));
        }
    }
}

/// Re-resolves `pool`'s names every `resolve_interval`, and when their answers' TTL ends
/// (at most once a second), until `stop`.
pub async fn run(pool: Arc<Pool>, stop: CancellationToken) {
    loop {
        let due = pool.dns.next_round(pool.resolve_interval);
        tokio::select! {
            () = stop.cancelled() => return,
            // Another round (the admin API's) moved the schedule.
            () = pool.dns.rescheduled.notified() => continue,
            () = tokio::time::sleep_until(due) => {}
        }
        // Names may come later too: a server added through the admin API.
        if pool.has_names() {
            resolve_all(&pool).await;
        } else {
            pool.dns.round_done(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_follow_the_interval_and_the_ttl() {
        let t = Instant::now();
        let s = Duration::from_secs;
        // No TTL known: the interval.
        assert_eq!(next_round(t, None, s(30)), t + s(30));
        // A TTL ending before the interval: then.
        assert_eq!(next_round(t, Some(t + s(7)), s(30)), t + s(7));
        // One ending after it: the interval.
        assert_eq!(next_round(t, Some(t + s(60)), s(30)), t + s(30));
        // A TTL of 0 (or one already over): a second after the last round.
        assert_eq!(next_round(t, Some(t), s(30)), t + MIN_REFRESH);
        // ... unless the interval is shorter still.
        assert_eq!(
            next_round(t, Some(t), Duration::from_millis(200)),
            t + Duration::from_millis(200)
        );
    }
}
