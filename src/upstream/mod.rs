//! Upstream pools: the servers of one `[[upstream]]`, their live counters, and picking one
//! for a new connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::balance::Balancer;
use crate::config::{self, TcpOptions};
use crate::observe::ServerStats;

/// One server of a pool.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    pub weight: u32,
    pub stats: ServerStats,
}

/// A runtime pool built from a validated [`config::Upstream`].
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub servers: Vec<Arc<Server>>,
    balancer: Balancer,
    pub connect_timeout: Duration,
    pub tcp: TcpOptions,
}

/// Why no server was picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// No server of the pool is available.
    NoServer,
}

/// A connection's claim on a server: counted in the server's `active` while it lives.
#[derive(Debug)]
pub struct ServerGuard {
    server: Arc<Server>,
}

impl ServerGuard {
    fn new(server: Arc<Server>) -> ServerGuard {
        server.stats.active.fetch_add(1, Relaxed);
        server.stats.total.fetch_add(1, Relaxed);
        ServerGuard { server }
    }

    pub fn server(&self) -> &Server {
        &self.server
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.server.stats.active.fetch_sub(1, Relaxed);
    }
}

impl Pool {
    pub fn new(cfg: &config::Upstream) -> Pool {
        let servers: Vec<Arc<Server>> = cfg
            .servers
            .iter()
            .map(|s| {
                Arc::new(Server {
                    addr: s.addr,
                    weight: s.weight,
                    stats: ServerStats::default(),
                })
            })
            .collect();
        let weights: Vec<u32> = servers.iter().map(|s| s.weight).collect();
        Pool {
            name: cfg.name.clone(),
            balancer: Balancer::build(cfg.balance, &weights),
            servers,
            connect_timeout: cfg.connect_timeout,
            tcp: cfg.tcp,
        }
    }

    /// Picks a server for a new connection and claims it.
    pub fn pick(&self) -> Result<ServerGuard, PickError> {
        self.balancer
            .pick(0, &Live(&self.servers))
            .map(|i| ServerGuard::new(self.servers[i].clone()))
            .ok_or(PickError::NoServer)
    }
}

/// The live view of a pool's servers that a balancer reads.
struct Live<'a>(&'a [Arc<Server>]);

impl crate::balance::Servers for Live<'_> {
    fn eligible(&self, _i: usize) -> bool {
        true
    }

    fn active(&self, i: usize) -> u64 {
        self.0[i].stats.active.load(Relaxed)
    }
}
