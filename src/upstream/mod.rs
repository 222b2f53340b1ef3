//! Upstream pools: the servers of one `[[upstream]]`, their state and live counters, and
//! claiming one for a new connection (balancing, backups, affinity, limits, queueing).
//!
//! The server set and its balancers are immutable and published with `ArcSwap`: DNS
//! re-resolution builds a new set (keeping the `Server` objects, and so the health and
//! counters, of addresses that stay) and swaps it in; open connections keep their
//! `ServerGuard` and never notice.

pub mod connect;
pub mod dial;
mod dns;
mod queue;
pub mod srv;
mod sticky;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::balance::{self, Balancer};
use crate::config::{self, Balance, HealthConfig, ServerAddr, TcpOptions};
use crate::observe::ServerStats;

pub use dns::{resolve_all, run as resolve_loop};
use queue::Queue;
use sticky::StickyTable;

/// What an operator set on a server through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    Enabled = 0,
    /// No new connections; open ones continue.
    Draining = 1,
    /// No new connections; open ones continue.
    Disabled = 2,
}

/// A server's state as shown to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerState {
    Up,
    Down,
    Draining,
    Disabled,
}

impl ServerState {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerState::Up => "up",
            ServerState::Down => "down",
            ServerState::Draining => "draining",
            ServerState::Disabled => "disabled",
        }
    }
}

/// The outcome of the last active health check of a server.
#[derive(Debug, Clone, Default)]
pub struct LastCheck {
    pub ok: bool,
    /// Why it failed (empty when it passed).
    pub reason: String,
    /// Wall-clock time of the check.
    pub at: Option<std::time::SystemTime>,
    pub duration: Duration,
}

/// One server of a pool.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    /// The server as configured (`"10.0.0.1:5432"`, or `"db.internal:5432"` for every
    /// address that name resolves to): the `server` label of metrics.
    pub configured: Arc<str>,
    /// Its share of new connections (set anew by the admin API's re-weighting).
    weight: AtomicU32,
    pub backup: bool,
    pub stats: ServerStats,
    /// Health as decided by active checks (true until a check says otherwise).
    healthy: AtomicBool,
    admin: AtomicU8,
    /// Passive ejection: consecutive failed connects, and until when (ms since the pool's
    /// epoch) the server is ejected.
    passive_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    /// Health-check bookkeeping (written only by the server's check task).
    pub(crate) check_streak: AtomicU32,
    pub last_check: std::sync::Mutex<LastCheck>,
}

impl Server {
    fn new(addr: SocketAddr, configured: Arc<str>, weight: u32, backup: bool) -> Server {
        Server {
            addr,
            configured,
            weight: AtomicU32::new(weight),
            backup,
            stats: ServerStats::default(),
            healthy: AtomicBool::new(true),
            admin: AtomicU8::new(AdminState::Enabled as u8),
            passive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            check_streak: AtomicU32::new(0),
            last_check: std::sync::Mutex::new(LastCheck::default()),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub(crate) fn set_healthy(&self, up: bool) {
        self.healthy.store(up, Relaxed);
    }

    pub fn admin(&self) -> AdminState {
        match self.admin.load(Relaxed) {
            1 => AdminState::Draining,
            2 => AdminState::Disabled,
            _ => AdminState::Enabled,
        }
    }

    pub fn set_admin(&self, s: AdminState) {
        self.admin.store(s as u8, Relaxed);
    }

    pub fn state(&self, pool: &Pool) -> ServerState {
        match self.admin() {
            AdminState::Draining => ServerState::Draining,
            AdminState::Disabled => ServerState::Disabled,
            AdminState::Enabled if self.available(pool.now_ms()) => ServerState::Up,
            AdminState::Enabled => ServerState::Down,
        }
    }

    /// Up by health checks, not ejected, enabled: may be given new connections (if it has
    /// room).
    fn available(&self, now_ms: u64) -> bool {
        self.healthy()
            && self.admin() == AdminState::Enabled
            && self.ejected_until_ms.load(Relaxed) <= now_ms
    }
}

/// The immutable part of a pool: its servers and one balancer per tier.
#[derive(Debug)]
pub struct ServerSet {
    pub servers: Vec<Arc<Server>>,
    primaries: Tier,
    backups: Tier,
}

/// Servers of one tier (primary or backup) and the balancer over them.
#[derive(Debug)]
struct Tier {
    /// Indices into `ServerSet::servers`.
    members: Vec<usize>,
    balancer: Option<Balancer>,
}

impl Tier {
    fn new(kind: Balance, servers: &[Arc<Server>], backup: bool) -> Tier {
        let members: Vec<usize> = (0..servers.len())
            .filter(|i| servers[*i].backup == backup)
            .collect();
        let keyed: Vec<(u64, u32)> = members
            .iter()
            .map(|i| {
                let s = &servers[*i];
                (balance::hash_str(&s.addr.to_string()), s.weight())
            })
            .collect();
        let balancer = (!members.is_empty()).then(|| Balancer::build_keyed(kind, &keyed));
        Tier { members, balancer }
    }
}

impl ServerSet {
    fn new(kind: Balance, servers: Vec<Arc<Server>>) -> ServerSet {
        ServerSet {
            primaries: Tier::new(kind, &servers, false),
            backups: Tier::new(kind, &servers, true),
            servers,
        }
    }
}

/// A runtime pool built from a validated [`config::Upstream`].
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub balance: Balance,
    set: ArcSwap<ServerSet>,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub tcp: TcpOptions,
    /// Send a PROXY header first on every server connection.
    pub proxy_protocol: Option<crate::wire::proxy::Version>,
    /// UDP: the PROXY header on every datagram, not only a session's first.
    pub proxy_every_datagram: bool,
    /// TCP, or UDP (its listeners' sessions, its health checks).
    pub protocol: config::Protocol,
    /// TLS to the servers.
    pub tls: Option<Arc<crate::tls::ClientTls>>,
    pub health: Option<HealthConfig>,
    max_per_server: u64,
    queue: Option<Arc<Queue>>,
    sticky: Option<StickyTable>,
    /// The configured servers (names are resolved into `set`).
    specs: std::sync::Mutex<Vec<config::ServerSpec>>,
    /// What the admin API changed since the pool was built from the file.
    runtime: std::sync::Mutex<RuntimeChanges>,
    pub resolve_interval: Duration,
    /// Its resolver and the re-resolution schedule.
    dns: dns::Dns,
    /// Time to establish server connections.
    pub connect_hist: crate::observe::stats::Histogram,
    epoch: Instant,
}

/// The admin API's changes to a pool, for the status and metrics.
#[derive(Debug, Default)]
struct RuntimeChanges {
    /// One line per change, with its time.
    log: Vec<String>,
    /// Servers (as configured) the API added, and those it is removing.
    added: std::collections::BTreeSet<String>,
    removing: std::collections::BTreeSet<String>,
    /// Adds, removals, re-weightings.
    counts: [u64; 3],
}

impl RuntimeChanges {
    fn note(&mut self, what: String) {
        // Bounded: the oldest go first.
        if self.log.len() >= 100 {
            self.log.remove(0);
        }
        let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        self.log.push(format!("{at} {what}"));
    }
}

/// Why a run-time change of a pool's servers was refused.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the upstream already has server {0}")]
    Exists(String),
    #[error("the upstream has no server {0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "server {0} was added, but its name does not resolve (yet); it is re-resolved with the others"
    )]
    Unresolved(String),
}

/// Why an SRV name takes no weight.
const SRV_WEIGHT: &str =
    "a srv: server takes no weight: each SRV record's weight is used (change it in DNS)";

/// Why no server was claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    /// No server is available: all down, drained, disabled, ejected (or excluded after a
    /// failed connect).
    NoServer,
    /// Servers are available, but every one is at `max_connections_per_server`.
    AllFull,
}

/// Why [`Pool::acquire`] gave no server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireError {
    /// As [`PickError::NoServer`].
    NoServer,
    /// Every server full, and no queue or the queue is full.
    Full,
    /// Waited in the queue for `queue.timeout`.
    QueueTimeout,
}

/// A connection's claim on a server: counted in the server's `active` while it lives; when
/// dropped, the slot goes to the first connection waiting in the pool's queue.
#[derive(Debug)]
pub struct ServerGuard {
    server: Arc<Server>,
    queue: Option<Arc<Queue>>,
}

impl ServerGuard {
    fn new(server: Arc<Server>, queue: Option<Arc<Queue>>) -> ServerGuard {
        server.stats.active.fetch_add(1, Relaxed);
        server.stats.total.fetch_add(1, Relaxed);
        ServerGuard { server, queue }
    }

    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        self.server.stats.active.fetch_sub(1, Relaxed);
        if let Some(q) = &self.queue {
            q.slot_freed();
        }
    }
}

/// The live view a balancer reads: one tier of servers, with eligibility decided here.
struct View<'a> {
    set: &'a ServerSet,
    tier: &'a Tier,
    pool: &'a Pool,
    now_ms: u64,
    exclude: &'a [SocketAddr],
    /// Whether to ignore health (fail-open when every server is down).
    ignore_health: bool,
}

impl View<'_> {
    fn server(&self, i: usize) -> &Server {
        &self.set.servers[self.tier.members[i]]
    }
}

impl balance::Servers for View<'_> {
    #[inline]
    fn eligible(&self, i: usize) -> bool {
        let s = self.server(i);
        ((self.ignore_health && s.admin() == AdminState::Enabled) || s.available(self.now_ms))
            && s.stats.active.load(Relaxed) < self.pool.max_per_server
            && !self.exclude.contains(&s.addr)
    }

    #[inline]
    fn active(&self, i: usize) -> u64 {
        self.server(i).stats.active.load(Relaxed)
    }
}

impl Pool {
    /// Builds a pool. Servers given by name are added by [`dns::resolve_all`], which the
    /// runtime calls before accepting connections and then every `resolve_interval`.
    ///
    /// With `old` (a reload), servers that stay keep their `Server` object, and with it
    /// their health, counters and admin state; servers of a name keep their last addresses
    /// until it is resolved again.
    pub fn new(
        cfg: &config::Upstream,
        old: Option<&Pool>,
        tls: Option<Arc<crate::tls::ClientTls>>,
    ) -> Pool {
        let old_servers = old.map(|p| p.servers());
        let reuse = |configured: &str, addr: SocketAddr, weight: u32, backup: bool| {
            old_servers
                .as_ref()
                .and_then(|o| {
                    o.servers
                        .iter()
                        .find(|s| {
                            s.addr == addr && s.backup == backup && &*s.configured == configured
                        })
                        .inspect(|s| s.weight.store(weight, Relaxed))
                        .cloned()
                })
                .unwrap_or_else(|| Arc::new(Server::new(addr, configured.into(), weight, backup)))
        };
        let mut servers: Vec<Arc<Server>> = Vec::new();
        for spec in &cfg.servers {
            match &spec.addr {
                ServerAddr::Ip(a) => {
                    servers.push(reuse(&a.to_string(), *a, spec.weight, spec.backup))
                }
                ServerAddr::Name { .. } | ServerAddr::Srv { .. } => {
                    let name = spec.addr.to_string();
                    if let Some(o) = &old_servers {
                        for s in o.servers.iter().filter(|s| *s.configured == *name) {
                            if !servers.iter().any(|x| x.addr == s.addr) {
                                // An SRV name's servers keep their records' weight and tier
                                // until it is looked up again.
                                let (weight, backup) = match spec.addr {
                                    ServerAddr::Srv { .. } => (s.weight(), s.backup),
                                    _ => (spec.weight, spec.backup),
                                };
                                servers.push(reuse(&name, s.addr, weight, backup));
                            }
                        }
                    }
                }
            }
        }
        // A server the admin API was removing is the file's again: no longer draining (and
        // the old pool's removal, which finds its name gone, stops).
        if let Some(old) = old {
            let removing = std::mem::take(&mut old.runtime().removing);
            for s in servers.iter().filter(|s| removing.contains(&*s.configured)) {
                s.set_admin(AdminState::Enabled);
            }
        }
        Pool {
            name: cfg.name.clone(),
            balance: cfg.balance,
            set: ArcSwap::from_pointee(ServerSet::new(cfg.balance, servers)),
            connect_timeout: cfg.connect_timeout,
            retries: cfg.retries,
            tcp: cfg.tcp,
            proxy_protocol: cfg.proxy_protocol,
            proxy_every_datagram: cfg.proxy_every_datagram,
            protocol: cfg.protocol,
            tls,
            health: cfg.health.clone(),
            max_per_server: cfg
                .max_connections_per_server
                .map_or(u64::MAX, |n| n as u64),
            queue: cfg.queue.map(|q| Arc::new(Queue::new(q.size, q.timeout))),
            sticky: cfg.sticky.map(|s| StickyTable::new(s.ttl, s.max_entries)),
            specs: std::sync::Mutex::new(cfg.servers.clone()),
            runtime: Default::default(),
            resolve_interval: cfg.resolve_interval,
            dns: dns::Dns::new(&cfg.resolvers),
            connect_hist: crate::observe::stats::Histogram::new(
                crate::observe::stats::CONNECT_BUCKETS,
            ),
            epoch: Instant::now(),
        }
    }

    /// The current server set.
    pub fn servers(&self) -> arc_swap::Guard<Arc<ServerSet>> {
        self.set.load()
    }

    /// Whether any server is given by name or SRV name (and so needs resolving).
    pub fn has_names(&self) -> bool {
        self.specs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|s| s.addr.is_dns())
    }

    /// The servers as configured, with the admin API's changes.
    pub(crate) fn specs(&self) -> Vec<config::ServerSpec> {
        self.specs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn runtime(&self) -> std::sync::MutexGuard<'_, RuntimeChanges> {
        self.runtime.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the admin API changed the servers since the file's config was applied.
    pub fn changed_at_runtime(&self) -> bool {
        !self.runtime().log.is_empty()
    }

    /// The admin API's changes, oldest first; and the servers it added and is removing
    /// (as configured).
    pub fn runtime_changes(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let r = self.runtime();
        (
            r.log.clone(),
            r.added.iter().cloned().collect(),
            r.removing.iter().cloned().collect(),
        )
    }

    /// Changes made through the admin API, by action: added, removed, re-weighted.
    pub fn runtime_counts(&self) -> [(&'static str, u64); 3] {
        let r = self.runtime();
        [
            ("add", r.counts[0]),
            ("remove", r.counts[1]),
            ("weight", r.counts[2]),
        ]
    }

    /// Adds a server (admin API): its addresses join the set at once (a name is resolved
    /// now, within 5 s), open connections untouched.
    pub async fn add_server(&self, spec: config::ServerSpec) -> Result<(), RuntimeError> {
        let label = spec.addr.to_string();
        if matches!(spec.addr, ServerAddr::Srv { .. }) && spec.weight != 1 {
            return Err(RuntimeError::Invalid(SRV_WEIGHT.into()));
        }
        {
            let mut specs = self.specs.lock().unwrap_or_else(|e| e.into_inner());
            if specs.iter().any(|s| s.addr == spec.addr) {
                return Err(RuntimeError::Exists(label));
            }
            if spec.backup && !specs.iter().any(|s| !s.backup) {
                return Err(RuntimeError::Invalid(
                    "a backup needs a primary server in the upstream".into(),
                ));
            }
            specs.push(spec.clone());
        }
        let failed = dns::resolve_all(self).await;
        let mut r = self.runtime();
        r.added.insert(label.clone());
        r.removing.remove(&label);
        r.counts[0] += 1;
        r.note(format!(
            "added {label} (weight {}{})",
            spec.weight,
            if spec.backup { ", backup" } else { "" }
        ));
        drop(r);
        tracing::info!(upstream = %self.name, "server {label} added through the admin API");
        if failed.contains(&label) {
            return Err(RuntimeError::Unresolved(label));
        }
        Ok(())
    }

    /// Sets a server's weight (admin API); the balancer is rebuilt, the server keeps its
    /// health and counters.
    pub async fn set_weight(&self, configured: &str, weight: u32) -> Result<(), RuntimeError> {
        {
            let mut specs = self.specs.lock().unwrap_or_else(|e| e.into_inner());
            let Some(spec) = specs.iter_mut().find(|s| s.addr.to_string() == configured) else {
                return Err(RuntimeError::NotFound(configured.to_string()));
            };
            if matches!(spec.addr, ServerAddr::Srv { .. }) {
                return Err(RuntimeError::Invalid(SRV_WEIGHT.into()));
            }
            spec.weight = weight;
        }
        // The set rebuilt with the new weight (every address the name gave), no lookup.
        let wanted = self
            .servers()
            .servers
            .iter()
            .map(|s| {
                let w = if *s.configured == *configured {
                    weight
                } else {
                    s.weight()
                };
                (s.configured.clone(), s.addr, w, s.backup)
            })
            .collect();
        self.replace_servers(wanted);
        let mut r = self.runtime();
        r.counts[2] += 1;
        r.note(format!("weight of {configured} set to {weight}"));
        drop(r);
        tracing::info!(upstream = %self.name, "weight of {configured} set to {weight} through the admin API");
        Ok(())
    }

    /// Removes a server (admin API): it drains at once (no new connections), and leaves
    /// the set once its last connection has ended. Returns its open connections.
    pub fn remove_server(self: &Arc<Self>, configured: &str) -> Result<u64, RuntimeError> {
        let spec = {
            let specs = self.specs.lock().unwrap_or_else(|e| e.into_inner());
            let Some(spec) = specs
                .iter()
                .find(|s| s.addr.to_string() == configured)
                .cloned()
            else {
                return Err(RuntimeError::NotFound(configured.to_string()));
            };
            if !spec.backup && specs.iter().filter(|s| !s.backup).count() == 1 {
                return Err(RuntimeError::Invalid(
                    "the last primary server cannot be removed".into(),
                ));
            }
            spec
        };
        let mine = |set: &ServerSet, configured: &str| -> Vec<Arc<Server>> {
            set.servers
                .iter()
                .filter(|s| *s.configured == *configured)
                .cloned()
                .collect()
        };
        let draining = mine(&self.servers(), configured);
        for s in &draining {
            s.set_admin(AdminState::Draining);
        }
        let open: u64 = draining.iter().map(|s| s.stats.active.load(Relaxed)).sum();
        {
            let mut r = self.runtime();
            r.removing.insert(configured.to_string());
            r.counts[1] += 1;
            r.note(format!(
                "removing {configured}: draining {open} connection(s)"
            ));
        }
        tracing::info!(upstream = %self.name, "removing server {configured} through the admin API: draining {open} connection(s)");
        let pool = self.clone();
        let configured = configured.to_string();
        tokio::spawn(async move {
            // Until its connections have ended (checked every 100 ms), then it goes; unless
            // a reload gave the pool back to the file meanwhile.
            loop {
                if !pool.runtime().removing.contains(&configured) {
                    return;
                }
                let open: u64 = mine(&pool.servers(), &configured)
                    .iter()
                    .map(|s| s.stats.active.load(Relaxed))
                    .sum();
                if open == 0 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            pool.specs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|s| s.addr != spec.addr);
            dns::resolve_all(&pool).await;
            let mut r = pool.runtime();
            r.removing.remove(&configured);
            r.added.remove(&configured);
            r.note(format!("removed {configured}"));
            drop(r);
            tracing::info!(upstream = %pool.name, "server {configured} removed");
        });
        Ok(open)
    }

    /// Replaces the server set with `addrs` (configured name, address, weight, backup),
    /// keeping the `Server` (health, counters) of every address that stays.
    pub(crate) fn replace_servers(&self, wanted: Vec<(Arc<str>, SocketAddr, u32, bool)>) -> bool {
        let old = self.set.load();
        let same = old.servers.len() == wanted.len()
            && old.servers.iter().zip(&wanted).all(|(s, w)| {
                s.configured == w.0 && s.addr == w.1 && s.weight() == w.2 && s.backup == w.3
            });
        if same {
            return false;
        }
        let servers = wanted
            .into_iter()
            .map(|(configured, addr, weight, backup)| {
                old.servers
                    .iter()
                    .find(|s| s.configured == configured && s.addr == addr && s.backup == backup)
                    .inspect(|s| s.weight.store(weight, Relaxed))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Server::new(addr, configured, weight, backup)))
            })
            .collect();
        self.set
            .store(Arc::new(ServerSet::new(self.balance, servers)));
        if let Some(q) = &self.queue {
            q.wake_all();
        }
        true
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Picks and claims a server for a client, never one in `exclude`.
    ///
    /// Order: the client's sticky server if it is eligible; else the primaries' balancer;
    /// backups only while no primary is available. With `fail_open`, when no server at all
    /// is up, health is ignored.
    pub fn pick(&self, client: IpAddr, exclude: &[SocketAddr]) -> Result<ServerGuard, PickError> {
        let set = self.set.load();
        let now_ms = self.now_ms();
        let view = |tier, ignore_health| View {
            set: &set,
            tier,
            pool: self,
            now_ms,
            exclude,
            ignore_health,
        };

        if let Some(st) = &self.sticky
            && let Some(addr) = st.get(client)
            && let Some(s) = set.servers.iter().find(|s| s.addr == addr)
            && s.available(now_ms)
            && s.stats.active.load(Relaxed) < self.max_per_server
            && !exclude.contains(&s.addr)
        {
            return Ok(self.claim(s.clone(), client));
        }

        let hash = balance::hash_ip(client);
        let mut any_available = false;
        for tier in [&set.primaries, &set.backups] {
            let Some(b) = &tier.balancer else { continue };
            if let Some(i) = b.pick(hash, &view(tier, false)) {
                return Ok(self.claim(set.servers[tier.members[i]].clone(), client));
            }
            // Backups only stand in for primaries that are unavailable, not for full ones.
            if tier.members.iter().any(|i| {
                set.servers[*i].available(now_ms) && !exclude.contains(&set.servers[*i].addr)
            }) {
                any_available = true;
                break;
            }
        }
        if any_available {
            return Err(PickError::AllFull);
        }
        if self.health.as_ref().is_some_and(|h| h.fail_open) {
            for tier in [&set.primaries, &set.backups] {
                if let Some(b) = &tier.balancer
                    && let Some(i) = b.pick(hash, &view(tier, true))
                {
                    return Ok(self.claim(set.servers[tier.members[i]].clone(), client));
                }
            }
        }
        Err(PickError::NoServer)
    }

    fn claim(&self, s: Arc<Server>, client: IpAddr) -> ServerGuard {
        if let Some(st) = &self.sticky {
            st.put(client, s.addr);
        }
        ServerGuard::new(s, self.queue.clone())
    }

    /// Claims a server, waiting in the pool's queue (if it has one) while every server is
    /// full. FIFO: a new connection does not overtake one already waiting.
    pub async fn acquire(
        &self,
        client: IpAddr,
        exclude: &[SocketAddr],
    ) -> Result<ServerGuard, AcquireError> {
        let Some(queue) = &self.queue else {
            return self.pick(client, exclude).map_err(|e| match e {
                PickError::NoServer => AcquireError::NoServer,
                PickError::AllFull => AcquireError::Full,
            });
        };
        if queue.is_empty() {
            match self.pick(client, exclude) {
                Ok(g) => return Ok(g),
                Err(PickError::NoServer) => return Err(AcquireError::NoServer),
                Err(PickError::AllFull) => {}
            }
        }
        let Some(mut ticket) = queue.join() else {
            return Err(AcquireError::Full);
        };
        let deadline = crate::clock::later(queue.timeout());
        loop {
            if tokio::time::timeout_at(deadline, ticket.wait())
                .await
                .is_err()
            {
                return Err(AcquireError::QueueTimeout);
            }
            match self.pick(client, exclude) {
                Ok(g) => return Ok(g),
                Err(PickError::NoServer) => return Err(AcquireError::NoServer),
                // Someone else got the slot; keep our place.
                Err(PickError::AllFull) => continue,
            }
        }
    }

    /// Client IPs the affinity table remembers.
    pub fn sticky_entries(&self) -> usize {
        self.sticky.as_ref().map_or(0, |s| s.len())
    }

    /// Connections waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.as_ref().map_or(0, |q| q.len())
    }

    /// A connect to `server` succeeded: resets its passive-failure count.
    pub fn connect_succeeded(&self, server: &Server) {
        if server.passive_failures.load(Relaxed) != 0 {
            server.passive_failures.store(0, Relaxed);
        }
    }

    /// A connect to `server` failed: counted; with passive health, enough consecutive
    /// failures eject it for `eject`.
    pub fn connect_failed(&self, server: &Server) {
        server.stats.connect_failures.fetch_add(1, Relaxed);
        let Some(p) = self.health.as_ref().and_then(|h| h.passive) else {
            return;
        };
        let n = server.passive_failures.fetch_add(1, Relaxed) + 1;
        if n >= p.failures {
            server.passive_failures.store(0, Relaxed);
            let until = self.now_ms() + p.eject.as_millis() as u64;
            server.ejected_until_ms.store(until, Relaxed);
            tracing::warn!(
                upstream = %self.name,
                server = %server.addr,
                "server ejected for {:?} after {n} consecutive failed connects",
                p.eject
            );
        }
    }

    /// Wakes connections waiting in the queue (a server came up or the set changed).
    pub(crate) fn capacity_changed(&self) {
        if let Some(q) = &self.queue {
            q.wake_all();
        }
    }

    /// Finds a server of the current set by address.
    pub fn find(&self, addr: SocketAddr) -> Option<Arc<Server>> {
        self.set
            .load()
            .servers
            .iter()
            .find(|s| s.addr == addr)
            .cloned()
    }
}
