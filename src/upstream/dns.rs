//! Servers given by name: every A/AAAA record becomes a server; re-resolved every
//! `resolve_interval`. A failed lookup keeps the last good addresses of that name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Pool;
use crate::config::ServerAddr;

/// How long a lookup may take before it counts as failed (the last good addresses stay).
/// Lookups of a pool run at once, so this bounds a whole round.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves every name of `pool` once and swaps in the new server set if it changed.
/// Returns the names that failed to resolve.
pub async fn resolve_all(pool: &Pool) -> Vec<String> {
    // Every name looked up at once, each within RESOLVE_TIMEOUT.
    let mut lookups = tokio::task::JoinSet::new();
    let specs = pool.specs();
    for (i, spec) in specs.iter().enumerate() {
        if let ServerAddr::Name { host, port } = &spec.addr {
            let (host, port) = (host.clone(), *port);
            lookups.spawn(async move {
                let r = match tokio::time::timeout(
                    RESOLVE_TIMEOUT,
                    tokio::net::lookup_host((host.as_str(), port)),
                )
                .await
                {
                    Ok(Ok(addrs)) => Ok(addrs.collect::<Vec<SocketAddr>>()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer within {RESOLVE_TIMEOUT:?}")),
                };
                (i, r)
            });
        }
    }
    let mut found: Vec<Option<Result<Vec<SocketAddr>, String>>> = vec![None; specs.len()];
    while let Some(done) = lookups.join_next().await {
        if let Ok((i, r)) = done {
            found[i] = Some(r);
        }
    }

    let mut failed = Vec::new();
    let current = pool.servers();
    let mut wanted: Vec<(Arc<str>, SocketAddr, u32, bool)> = Vec::new();
    // An address given literally is that server; a name resolving to it adds nothing.
    let literal: Vec<SocketAddr> = specs
        .iter()
        .filter_map(|s| match s.addr {
            ServerAddr::Ip(a) => Some(a),
            ServerAddr::Name { .. } => None,
        })
        .collect();
    for (spec, found) in specs.iter().zip(found) {
        match &spec.addr {
            ServerAddr::Ip(a) => {
                if !wanted.iter().any(|w| w.1 == *a) {
                    wanted.push((a.to_string().into(), *a, spec.weight, spec.backup));
                }
            }
            ServerAddr::Name { host, port } => {
                let name: Arc<str> = format!("{host}:{port}").into();
                match found.unwrap_or_else(|| Err("the lookup failed".into())) {
                    Ok(mut addrs) => {
                        addrs.sort();
                        addrs.dedup();
                        if addrs.is_empty() {
                            failed.push(name.to_string());
                            keep_last(&current.servers, &name, &mut wanted);
                        }
                        for a in addrs {
                            if !wanted.iter().any(|w| w.1 == a) && !literal.contains(&a) {
                                wanted.push((name.clone(), a, spec.weight, spec.backup));
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(upstream = %pool.name, "cannot resolve {name}: {e}; keeping its last addresses");
                        failed.push(name.to_string());
                        keep_last(&current.servers, &name, &mut wanted);
                    }
                }
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
        tracing::info!(upstream = %pool.name, "servers now: {}", addrs.join(", "));
    }
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

/// Re-resolves `pool`'s names every `resolve_interval` until `stop`.
pub async fn run(pool: Arc<Pool>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pool.resolve_interval) => {}
        }
        // Names may come later too: a server added through the admin API.
        if pool.has_names() {
            resolve_all(&pool).await;
        }
    }
}
