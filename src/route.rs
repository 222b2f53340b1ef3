//! Routing: which upstream a connection goes to, decided in one place from what the front
//! end learned (the TLS ClientHello's SNI and ALPN, or what a terminated handshake agreed),
//! the client's address and the local port it reached.
//!
//! A [`Router`] is immutable: built with the listener's context, replaced whole by a
//! reload. Routes are tried in order; the first whose matchers all match wins, then the
//! listener's `upstream`. Each is counted when it matches.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ipnet::IpNet;

use crate::config::{NamePattern, Route};
use crate::upstream::Pool;

/// What routing may look at.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The SNI, lowercased.
    pub sni: Option<&'a str>,
    pub alpn: Alpn<'a>,
    /// The client (the real one behind a PROXY header).
    pub source: IpAddr,
    /// The local port the client connected to.
    pub port: u16,
}

/// ALPN as the front end knows it.
#[derive(Debug, Clone, Copy)]
pub enum Alpn<'a> {
    /// Mode tcp: what the ClientHello offers.
    Offered(&'a [Vec<u8>]),
    /// Mode tls: what the handshake agreed, if anything.
    Agreed(Option<&'a str>),
}

struct Entry {
    sni: Option<Vec<NamePattern>>,
    alpn: Option<Vec<String>>,
    source: Option<Vec<IpNet>>,
    port: Option<Vec<u16>>,
    pool: Arc<Pool>,
}

impl Entry {
    fn matches(&self, f: &Facts<'_>) -> bool {
        if let Some(names) = &self.sni {
            let Some(sni) = f.sni else { return false };
            if !names.iter().any(|n| n.matches(sni)) {
                return false;
            }
        }
        if let Some(protos) = &self.alpn {
            let hit = match f.alpn {
                Alpn::Offered(offered) => offered
                    .iter()
                    .any(|o| protos.iter().any(|p| p.as_bytes() == o.as_slice())),
                Alpn::Agreed(Some(agreed)) => protos.iter().any(|p| p == agreed),
                Alpn::Agreed(None) => false,
            };
            if !hit {
                return false;
            }
        }
        if let Some(nets) = &self.source
            && !nets.iter().any(|n| n.contains(&f.source))
        {
            return false;
        }
        if let Some(ports) = &self.port
            && !ports.contains(&f.port)
        {
            return false;
        }
        true
    }
}

/// The routes of one listener and its default upstream.
pub struct Router {
    routes: Vec<Entry>,
    default: Option<Arc<Pool>>,
    /// Matches per route, the default last. Shared with the router this one replaces when
    /// a reload leaves the routes as they were, so counts carry over.
    hits: Arc<[AtomicU64]>,
    needs_hello: bool,
    needs_port: bool,
}

/// Where a connection goes.
pub struct Routed<'a> {
    pub pool: &'a Arc<Pool>,
    /// Which route matched: its position (0-based), or `None` for the default.
    pub route: Option<usize>,
}

impl Router {
    /// `pool_of` maps an upstream index of the config to its pool. `keep_hits` is the
    /// counter set of the router this one replaces, if its routes were the same.
    pub fn new(
        routes: &[Route],
        default: Option<Arc<Pool>>,
        pool_of: impl Fn(usize) -> Arc<Pool>,
        keep_hits: Option<Arc<[AtomicU64]>>,
    ) -> Router {
        let hits = keep_hits
            .filter(|h| h.len() == routes.len() + 1)
            .unwrap_or_else(|| (0..=routes.len()).map(|_| AtomicU64::new(0)).collect());
        Router {
            needs_hello: routes.iter().any(Route::needs_hello),
            needs_port: routes.iter().any(|r| r.port.is_some()),
            routes: routes
                .iter()
                .map(|r| Entry {
                    sni: r.sni.clone(),
                    alpn: r.alpn.clone(),
                    source: r.source.clone(),
                    port: r.port.clone(),
                    pool: pool_of(r.upstream),
                })
                .collect(),
            default,
            hits,
        }
    }

    /// Some route matches on SNI or ALPN: in mode tcp the ClientHello must be read.
    pub fn needs_hello(&self) -> bool {
        self.needs_hello
    }

    /// Some route matches on the local port (which costs a `getsockname` to learn).
    pub fn needs_port(&self) -> bool {
        self.needs_port
    }

    /// The first route that matches, else the default; `None` when neither applies.
    pub fn route(&self, f: &Facts<'_>) -> Option<Routed<'_>> {
        let hit = self
            .routes
            .iter()
            .position(|r| r.matches(f))
            .map(|i| (Some(i), &self.routes[i].pool))
            .or_else(|| self.default.as_ref().map(|p| (None, p)));
        let (route, pool) = hit?;
        self.hits[route.unwrap_or(self.routes.len())].fetch_add(1, Relaxed);
        Some(Routed { pool, route })
    }

    /// The listener's default upstream.
    pub fn default(&self) -> Option<&Arc<Pool>> {
        self.default.as_ref()
    }

    /// `(route label, upstream, matches)`: routes as `"1"`, `"2"`, … in config order, then
    /// `"default"`.
    pub fn counts(&self) -> Vec<(String, &str, u64)> {
        let mut out: Vec<(String, &str, u64)> = self
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    (i + 1).to_string(),
                    r.pool.name.as_str(),
                    self.hits[i].load(Relaxed),
                )
            })
            .collect();
        if let Some(d) = &self.default {
            out.push((
                "default".into(),
                d.name.as_str(),
                self.hits[self.routes.len()].load(Relaxed),
            ));
        }
        out
    }

    /// The counter set, for the router that replaces this one.
    pub fn hits(&self) -> Arc<[AtomicU64]> {
        self.hits.clone()
    }
}
