//! The running proxy: runtime objects built from a [`Config`], the listeners' accept tasks,
//! hot reload, signals, and the graceful drain. The admin server is not built here: whoever
//! runs the proxy hands [`Proxy::start`] an [`AdminServer`] to bind and serve.
//!
//! Reload runs the new file through the same parse → validate path, then applies only the
//! difference: an unchanged listener keeps its sockets (its context is swapped if its
//! settings changed), a new one binds, a removed one stops accepting while its connections
//! finish; an upstream whose settings changed gets a new pool that keeps the `Server`
//! objects (health, counters) of servers that stay. Connections keep the context and pool
//! they started with, so a reload never cuts one.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Users;
use crate::config::{self, Config, ListenerMode};
use crate::frontend::{Forwarding, FrontEnd, Transparent};
use crate::listener::{self, Binder, Bound, Gate, ListenerCtx, Slot, Socket};
use crate::observe::{AccessLog, ListenerStats, Logs};
use crate::policy::{Acl, ClientLimits, ClientTable};
use crate::relay::Engine;
use crate::route::Router;
use crate::tls::{ClientTls, ServerTls, SetupError};
use crate::upstream::Pool;
use crate::upstream::dial::OwnAddrs;
use crate::workers::Workers;

pub mod plan;
mod udp;
mod upgrade;

use plan::{ListenerPlan, UpstreamPlan, kind, targets, unindexed};

/// How long connections cut by the drain timeout get to write their log records.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// After a second SIGINT: how long connections get to close and log.
const INTERRUPT_GRACE: Duration = Duration::from_secs(1);

/// What the admin API and metrics read: the current listeners and pools.
pub struct View {
    pub listeners: Vec<ListenerView>,
    pub pools: Vec<Arc<Pool>>,
    /// The access log new connections write to.
    pub access_log: Arc<AccessLog>,
}

pub struct ListenerView {
    pub slot: Slot,
    pub addrs: Vec<SocketAddr>,
}

/// State shared by the proxy, its admin server and its signal handling.
pub struct Shared {
    pub started: SystemTime,
    pub view: ArcSwap<View>,
    pub global: Arc<Gate>,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    /// `[global] io_uring`, for UDP sockets served from now on.
    io_uring: AtomicBool,
    /// `[global] udp_kernel`, for UDP sockets served from now on.
    udp_kernel: AtomicBool,
    /// The kernel's UDP path, loaded when the first UDP socket is served with
    /// `udp_kernel` (`None`: it could not be).
    kernel: OnceLock<Option<Arc<crate::udp::Kernel>>>,
    /// Where the config came from; reload reads it again. `None` in quick and demo mode.
    pub config_path: Option<PathBuf>,
    live: tokio::sync::Mutex<Live>,
    connections: TaskTracker,
    conn_stop: CancellationToken,
    /// Health checks, DNS, housekeeping.
    background: CancellationToken,
    /// The data-plane threads: accept loops and connections run there.
    workers: Arc<Workers>,
    /// Every address ferry listens on (listeners and admin): never a forward destination.
    own: Arc<ArcSwap<OwnAddrs>>,
    admin_addr: Option<SocketAddr>,
    /// The admin server, awaited at the end of a drain.
    admin_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// What every access log opened shares: dropped records, writer threads.
    logs: Arc<Logs>,
    /// Where listening sockets come from, at start and at reloads.
    binder: Arc<dyn Binder>,
    /// Stops the admin server accepting (at the end of the drain, or at once when an
    /// upgrade hands its socket to the new process).
    admin_stop: CancellationToken,
    /// A descriptor of the admin server's listening socket, for an upgrade.
    admin_fd: std::sync::Mutex<Option<OwnedFd>>,
    /// An upgrade to a new process, and its control socket (`upgrade.rs`).
    upgrade: upgrade::State,
}

/// The parts of the running proxy that only reload and drain change.
struct Live {
    cfg: Config,
    access_log: Arc<AccessLog>,
    listeners: HashMap<String, LiveListener>,
    pools: HashMap<String, LivePool>,
}

struct LiveListener {
    cfg: config::Listener,
    /// The upstreams its default route and routes name (the config holds indices, which a
    /// reload may shuffle).
    targets: Vec<String>,
    /// Its TLS settings (mode tls), with the session-resumption state they carry.
    tls: Option<Arc<ServerTls>>,
    slot: Slot,
    stats: Arc<ListenerStats>,
    gate: Arc<Gate>,
    clients: Option<Arc<ClientTable>>,
    /// Its sockets, by configured address: a reload that changes `listen` keeps the
    /// sockets of the addresses that stay (their accept queues with them).
    groups: Vec<Group>,
}

/// The listening sockets of one configured address and their accept loops.
struct Group {
    listen: SocketAddr,
    /// Where they are bound (the port chosen, for port 0).
    addr: Option<SocketAddr>,
    stop: CancellationToken,
    /// UDP: ends the sessions at once (`stop` only stops new ones; the socket serves the
    /// sessions it has until they end). Cancelled with the drain's connection stop.
    end: CancellationToken,
    /// Waited for after `stop`, so that "stopped" means the sockets are closed (TCP; a UDP
    /// socket closes once its sessions have ended: it is served as a connection).
    accepting: TaskTracker,
    /// A descriptor of each of its sockets, to hand to a new process at an upgrade;
    /// closed when it stops.
    held: std::sync::Mutex<Vec<OwnedFd>>,
}

impl Group {
    async fn stop_accepting(&self) {
        self.stop.cancel();
        self.release();
        self.accepting.close();
        self.accepting.wait().await;
    }

    /// Closes the descriptors kept for an upgrade (the sockets close with the last of the
    /// accept loops' own).
    fn release(&self) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

impl LiveListener {
    /// Every address it is bound to.
    fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.groups.iter().filter_map(|g| g.addr)
    }

    /// UDP: ends every session now and closes the sockets (their options changed: they
    /// must not share the address with the new ones).
    fn end_sessions(&self) {
        for g in &self.groups {
            g.stop.cancel();
            g.end.cancel();
            g.release();
        }
    }

    /// Stops accepting and waits until the listening sockets are closed.
    async fn stop_accepting(&self) {
        for g in &self.groups {
            g.stop.cancel();
        }
        for g in &self.groups {
            g.stop_accepting().await;
        }
    }
}

struct LivePool {
    cfg: config::Upstream,
    pool: Arc<Pool>,
    stop: CancellationToken,
}

/// A started proxy: listeners bound and accepting.
pub struct Proxy {
    pub shared: Arc<Shared>,
    /// Every bound address at start, with its listener's name.
    pub bound: Vec<(String, SocketAddr)>,
    /// Where the admin server listens, if configured.
    pub admin: Option<SocketAddr>,
    /// Taking over from another process: the admin server, served once that one has
    /// confirmed (`complete_upgrade`).
    admin_later: Option<BoxFuture<'static, ()>>,
}

/// The signals [`Proxy::run_until`] acts on, registered early: a signal that arrives
/// while the proxy starts is acted on once it runs, rather than ending the process.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers SIGTERM, SIGINT, SIGHUP and SIGUSR2 (within a tokio runtime).
    pub fn new() -> io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// How [`Proxy::run_until_signal`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Every connection finished within the drain timeout.
    Drained,
    /// The drain timeout ran out; the rest were closed.
    TimedOut,
    /// A second SIGINT: closed at once.
    Interrupted,
}

/// The answer to a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// Applied; what changed, one line each (empty: nothing did).
    Applied(Vec<String>),
    /// Refused; the old config keeps serving.
    Rejected(Vec<String>),
}

/// A boxed future, as an [`AdminServer`] returns them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The admin server (`[admin]`), as the proxy runs it: [`Proxy::start`] binds it with the
/// listeners, before anything accepts (an error fails the start), and serves it on the
/// control plane once the listeners accept; the drain waits for it to shut down (a second
/// SIGINT aborts it). Implemented by `admin::Server`, which whoever runs the proxy passes
/// to [`Proxy::start`].
pub trait AdminServer: Sync {
    /// Binds the admin server's socket on `addr` (`[admin] listen`).
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, io::Result<TcpListener>>;

    /// Serves the proxy `shared` on `listener` until `stop` (with `token`: POSTs must
    /// carry it), then returns once its connections have closed.
    fn serve(
        &self,
        listener: TcpListener,
        shared: Arc<Shared>,
        token: Option<String>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()>;
}

fn engine(cfg: &Config) -> Engine {
    if cfg.global.splice {
        Engine::Splice {
            pipe_size: cfg.global.pipe_size,
        }
    } else {
        Engine::Copy
    }
}

fn open_log(cfg: &Config, logs: &Arc<Logs>) -> io::Result<Arc<AccessLog>> {
    AccessLog::open(
        &cfg.log.access,
        cfg.log.format,
        cfg.log.interval,
        cfg.log.on_connect,
        logs.clone(),
    )
    .map(Arc::new)
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot open access log {:?}: {e}", cfg.log.access),
        )
    })
}

impl Proxy {
    /// Builds the runtime objects and binds every listener through `binder` (now and at
    /// reloads); `workers` accept and serve the connections. With `[admin]`, binds
    /// `admin_server` too and serves it. Must run inside
    /// a tokio runtime: the control plane (admin server, health checks, DNS, housekeeping,
    /// reload) runs on it.
    ///
    /// Fails (nothing left bound) if an address cannot be bound or the access log cannot be
    /// opened.
    pub async fn start(
        cfg: &Config,
        config_path: Option<PathBuf>,
        workers: Arc<Workers>,
        admin_server: &dyn AdminServer,
        binder: Arc<dyn Binder>,
    ) -> io::Result<Proxy> {
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        crate::systemd::log_notes();
        let logs = Arc::new(Logs::default());
        let access_log = open_log(cfg, &logs)?;
        let n_workers = workers.len();
        let global = Arc::new(Gate::new(cfg.global.max_connections));
        let background = CancellationToken::new();

        let tls =
            build_tls(cfg, None).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut pools = HashMap::new();
        for u in &cfg.upstreams {
            let client_tls = tls.upstreams.get(&u.name).cloned();
            pools.insert(
                u.name.clone(),
                start_pool(u, None, client_tls, &background).await,
            );
        }

        // Bind everything before accepting anything: a config that cannot fully start
        // starts nothing.
        let mut sockets = Vec::new();
        for lc in &cfg.listeners {
            sockets.push(listener::bind(
                &*binder,
                &lc.listen,
                lc.reuse_port,
                kind(lc),
                n_workers,
                &[],
            )?);
        }
        let admin = match &cfg.admin {
            Some(a) => Some((admin_server.bind(a.listen).await?, a.token.clone())),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|(s, _)| s.local_addr().ok());
        let admin_fd = match &admin {
            Some((s, _)) => Some(s.as_fd().try_clone_to_owned()?),
            None => None,
        };
        let own = OwnAddrs::new(
            sockets
                .iter()
                .flatten()
                .filter_map(|b| b.socket.local_addr().ok())
                .chain(admin_addr),
        );

        let admin_stop = background.child_token();
        let shared = Arc::new(Shared {
            started: SystemTime::now(),
            view: ArcSwap::from_pointee(View {
                listeners: Vec::new(),
                pools: Vec::new(),
                access_log: access_log.clone(),
            }),
            global,
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            io_uring: AtomicBool::new(cfg.global.io_uring),
            udp_kernel: AtomicBool::new(cfg.global.udp_kernel),
            kernel: OnceLock::new(),
            config_path,
            live: tokio::sync::Mutex::new(Live {
                cfg: cfg.clone(),
                access_log,
                listeners: HashMap::new(),
                pools,
            }),
            connections: TaskTracker::new(),
            conn_stop: CancellationToken::new(),
            background,
            workers,
            own: Arc::new(ArcSwap::from_pointee(own)),
            admin_addr,
            admin_task: std::sync::Mutex::new(None),
            logs,
            binder,
            admin_stop,
            admin_fd: std::sync::Mutex::new(admin_fd),
            upgrade: upgrade::State::default(),
        });

        let mut bound = Vec::new();
        {
            let mut live = shared.live.lock().await;
            for (lc, socks) in cfg.listeners.iter().zip(sockets) {
                let server_tls = tls.listeners.get(&lc.name).cloned();
                let ll = shared.start_listener(&live, lc, socks, None, server_tls);
                for a in ll.addrs() {
                    tracing::info!("listener {:?} listening on {a}", lc.name);
                    bound.push((lc.name.clone(), a));
                }
                live.listeners.insert(lc.name.clone(), ll);
            }
            shared.publish(&live);
        }
        tokio::spawn(housekeeping(shared.clone()));
        let inherited_unused =
            crate::systemd::unused(&bound.iter().map(|b| b.1).collect::<Vec<_>>());
        for a in inherited_unused {
            tracing::warn!("systemd passed a socket for {a}, which no listener listens on");
        }
        let mut admin_addr = None;
        let mut admin_later = None;
        if let Some((sock, token)) = admin {
            if let Ok(a) = sock.local_addr() {
                tracing::info!("admin listening on http://{a}/");
                admin_addr = Some(a);
            }
            let serving =
                admin_server.serve(sock, shared.clone(), token, shared.admin_stop.clone());
            if crate::upgrade::pending() {
                admin_later = Some(serving);
            } else {
                let task = tokio::spawn(serving);
                *shared.admin_task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
            }
        }
        for a in crate::upgrade::release_unused() {
            tracing::warn!(
                "the old process passed a socket for {a}, which no listener listens on; closed"
            );
        }
        // Taking over from another process: ready once it has confirmed
        // (`Proxy::complete_upgrade`).
        if !crate::upgrade::pending() {
            crate::systemd::notify(&format!(
                "READY=1\nSTATUS={}",
                shared.status_line("serving")
            ));
        }
        Ok(Proxy {
            shared,
            bound,
            admin: admin_addr,
            admin_later,
        })
    }

    /// Serves until SIGTERM or SIGINT, then drains: listening sockets close at once, open
    /// connections get up to `drain_timeout` to finish, then the rest are closed. A second
    /// SIGINT closes everything at once. SIGHUP reloads the config file.
    pub async fn run_until_signal(self) -> io::Result<Stopped> {
        let signals = Signals::new()?;
        self.run_until(signals).await
    }

    /// As [`Proxy::run_until_signal`], with signals registered before the proxy started.
    pub async fn run_until(self, signals: Signals) -> io::Result<Stopped> {
        let Signals {
            mut term,
            mut int,
            mut hup,
            mut usr2,
        } = signals;
        self.shared.listen_for_upgrades();
        // Reloads run beside the signal loop (one at a time: they take the reload lock), so
        // that a slow one (a resolver that does not answer) never delays a stop.
        let reloads = TaskTracker::new();
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: draining"); break }
                _ = int.recv() => { tracing::info!("SIGINT: draining (again to exit at once)"); break }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    let shared = self.shared.clone();
                    reloads.spawn(async move { shared.reload().await });
                }
                _ = usr2.recv() => {
                    tracing::info!("SIGUSR2: starting a new ferry to take over");
                    tokio::spawn(self.shared.clone().upgrade_to_successor());
                }
                () = self.shared.upgrade.handed_over.cancelled() => {
                    tracing::info!("handed over to the new process: draining");
                    break
                }
            }
        }
        let interrupt = async move {
            int.recv().await;
            tracing::info!("SIGINT again: closing every connection now");
        };
        Ok(self.shared.drain(interrupt).await)
    }
}

impl Shared {
    /// Where the admin server listens, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The worker threads.
    pub fn workers(&self) -> &Workers {
        &self.workers
    }

    /// Starts accepting on `socks` for listener `lc`. `prev` carries the counters of the
    /// listener of that name before a reload.
    fn start_listener(
        &self,
        live: &Live,
        lc: &config::Listener,
        socks: Vec<Bound>,
        prev: Option<&LiveListener>,
        tls: Option<Arc<ServerTls>>,
    ) -> LiveListener {
        let stats = prev.map_or_else(Arc::default, |p| p.stats.clone());
        let gate = prev.map_or_else(
            || Arc::new(Gate::new(lc.max_connections.unwrap_or(usize::MAX))),
            |p| p.gate.clone(),
        );
        gate.set_max(lc.max_connections.unwrap_or(usize::MAX));
        let clients = self.clients_for(lc, prev);
        let ctx = self.build_ctx(
            live,
            lc,
            stats.clone(),
            gate.clone(),
            clients.clone(),
            tls.clone(),
            prev,
        );
        let slot: Slot = Arc::new(ArcSwap::from_pointee(ctx));
        let groups = self.start_accepting(&lc.name, &slot, socks);
        LiveListener {
            cfg: lc.clone(),
            targets: targets(&live.cfg, lc),
            tls,
            slot,
            stats,
            gate,
            clients,
            groups,
        }
    }

    /// Starts an accept loop on each socket of `socks`, on its worker, for listener `name`;
    /// one group per configured address.
    fn start_accepting(&self, name: &str, slot: &Slot, socks: Vec<Bound>) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for b in socks {
            let i = match groups.iter().position(|g| g.listen == b.listen) {
                Some(i) => i,
                None => {
                    groups.push(Group {
                        listen: b.listen,
                        addr: None,
                        stop: CancellationToken::new(),
                        end: self.conn_stop.child_token(),
                        accepting: TaskTracker::new(),
                        held: std::sync::Mutex::new(Vec::new()),
                    });
                    groups.len() - 1
                }
            };
            let g = &mut groups[i];
            if g.addr.is_none() {
                g.addr = b.socket.local_addr().ok();
            }
            match b.socket.as_fd().try_clone_to_owned() {
                Ok(fd) => g.held.get_mut().unwrap_or_else(|e| e.into_inner()).push(fd),
                Err(e) => tracing::warn!(
                    listener = %name,
                    "cannot keep a descriptor of a socket for upgrades: {e}"
                ),
            }
            let (slot, tracker, workers, me) = (
                slot.clone(),
                self.connections.clone(),
                self.workers.clone(),
                b.worker,
            );
            let stop = g.stop.clone();
            let name = name.to_string();
            let io_uring = self.io_uring.load(Relaxed);
            let kernel = match b.socket {
                Socket::Udp(_) => self.udp_kernel(),
                Socket::Tcp(_) => None,
            };
            match b.socket {
                Socket::Tcp(socket) => {
                    g.accepting.spawn_on(
                        async move {
                            listener::accept_loop(socket, &name, stop, |stream, peer| {
                                crate::session::admit(stream, peer, &slot, &tracker, &workers, me)
                            })
                            .await
                        },
                        self.workers.handle(b.worker),
                    );
                }
                Socket::Udp(socket) => {
                    let stop = crate::udp::Stop {
                        sessions: stop,
                        now: g.end.clone(),
                    };
                    let sessions = Arc::new(udp::Sessions {
                        stats: slot.load().stats.clone(),
                        slot,
                    });
                    let kernel = kernel.and_then(|k| {
                        crate::udp::Listening::kernel_ready(&socket).ok()?;
                        let index = kernel_counts(&k, &sessions.stats)?;
                        Some((k, index))
                    });
                    // Served as a connection: the drain waits for its sessions.
                    tracker.spawn_on(
                        async move {
                            match crate::udp::Listening::new(socket, io_uring, kernel) {
                                Ok(l) => {
                                    crate::udp::serve(Arc::new(l), sessions.clone(), sessions, stop)
                                        .await
                                }
                                Err(e) => tracing::error!(
                                    listener = %name,
                                    "cannot register the UDP socket: {e}"
                                ),
                            }
                        },
                        self.workers.handle(b.worker),
                    );
                }
            }
        }
        groups
    }

    /// The kernel's UDP path for a UDP socket served now, if `[global] udp_kernel` asks
    /// for it and it could be loaded (tried once; a failure is logged once).
    fn udp_kernel(&self) -> Option<Arc<crate::udp::Kernel>> {
        if !self.udp_kernel.load(Relaxed) {
            return None;
        }
        self.kernel
            .get_or_init(|| match crate::udp::Kernel::load() {
                Ok(k) => {
                    tracing::info!(
                        interfaces = ?k.interfaces(),
                        "UDP sessions are relayed in the kernel once their server answers"
                    );
                    Some(Arc::new(k))
                }
                Err(e) => {
                    tracing::warn!("UDP sessions relay through sockets only: the kernel path: {e}");
                    None
                }
            })
            .clone()
    }

    /// The per-client table: kept across a reload when the limits did not change (so
    /// clients' open connections stay counted), new otherwise.
    fn clients_for(
        &self,
        lc: &config::Listener,
        prev: Option<&LiveListener>,
    ) -> Option<Arc<ClientTable>> {
        let p = lc.per_client?;
        if let Some(prev) = prev
            && prev.cfg.per_client == lc.per_client
            && let Some(t) = &prev.clients
        {
            return Some(t.clone());
        }
        Some(Arc::new(ClientTable::new(ClientLimits {
            max_connections: p.max_connections,
            rate: p.rate,
            max_tracked: p.max_tracked,
            ipv6_prefix: p.ipv6_prefix,
        })))
    }

    #[allow(clippy::too_many_arguments)]
    fn build_ctx(
        &self,
        live: &Live,
        lc: &config::Listener,
        stats: Arc<ListenerStats>,
        gate: Arc<Gate>,
        clients: Option<Arc<ClientTable>>,
        tls: Option<Arc<ServerTls>>,
        prev: Option<&LiveListener>,
    ) -> ListenerCtx {
        let pool_of = |i: usize| live.pools[&live.cfg.upstreams[i].name].pool.clone();
        // Route counts carry over a reload that leaves the routes as they were.
        let keep_hits = prev
            .filter(|p| {
                unindexed(&p.cfg).routes == unindexed(lc).routes
                    && p.targets == targets(&live.cfg, lc)
            })
            .map(|p| p.slot.load().router.hits());
        let router = Router::new(&lc.routes, lc.upstream.map(pool_of), pool_of, keep_hits);
        let forwarding = |f: &config::Forward| {
            Arc::new(Forwarding {
                destinations: f.destinations.clone(),
                users: Users::new(&f.users),
                dial: f.dial,
                own: self.own.clone(),
            })
        };
        let front = match (&lc.mode, tls) {
            (ListenerMode::Tls(_), Some(t)) => FrontEnd::Tls(t),
            (ListenerMode::Socks5(m), _) => FrontEnd::Socks5 {
                forward: forwarding(&m.forward),
                udp: m.udp,
            },
            (ListenerMode::HttpConnect(m), _) => FrontEnd::HttpConnect {
                forward: forwarding(&m.forward),
                sni_must_match: m.sni_must_match,
            },
            (ListenerMode::Transparent(m), _) => FrontEnd::Transparent(Arc::new(Transparent {
                interception: m.interception,
                destinations: m.destinations.clone(),
                dial: m.dial,
                own: self.own.clone(),
            })),
            (ListenerMode::Udp(m), _) => FrontEnd::Udp(crate::udp::Settings {
                idle_timeout: lc.idle_timeout,
                responses: m.responses,
                requests: m.requests,
            }),
            _ => FrontEnd::Tcp,
        };
        ListenerCtx::new(
            lc.name.clone(),
            front,
            router,
            lc.handshake_timeout,
            lc.idle_timeout,
            engine(&live.cfg),
            stats,
            gate,
            self.global.clone(),
            live.access_log.clone(),
            self.conn_stop.clone(),
            Acl {
                allow: lc.allow.clone(),
                deny: lc.deny.clone(),
            },
            clients,
            lc.proxy_protocol.clone(),
            lc.buffers,
        )
    }

    /// Publishes the current listeners and pools for the admin API.
    fn publish(&self, live: &Live) {
        self.own.store(Arc::new(OwnAddrs::new(
            live.listeners
                .values()
                .flat_map(|l| l.addrs())
                .chain(self.admin_addr),
        )));
        let listeners = live
            .cfg
            .listeners
            .iter()
            .filter_map(|lc| live.listeners.get(&lc.name))
            .map(|l| ListenerView {
                slot: l.slot.clone(),
                addrs: l.addrs().collect(),
            })
            .collect();
        let pools = live
            .cfg
            .upstreams
            .iter()
            .filter_map(|u| live.pools.get(&u.name))
            .map(|p| p.pool.clone())
            .collect();
        self.view.store(Arc::new(View {
            listeners,
            pools,
            access_log: live.access_log.clone(),
        }));
    }

    /// Re-reads the config file and applies the difference. The answer says what changed,
    /// or why nothing did.
    pub async fn reload(&self) -> ReloadOutcome {
        crate::systemd::reloading();
        let outcome = match &self.config_path {
            None => ReloadOutcome::Rejected(vec![
                "no config file to reload (quick or demo mode)".into(),
            ]),
            Some(_) if self.upgrade.in_progress() => ReloadOutcome::Rejected(vec![
                "an upgrade is in progress: the new process reads the config".into(),
            ]),
            Some(path) => match Config::load(path) {
                Err(errs) => {
                    ReloadOutcome::Rejected(errs.0.iter().map(|e| e.to_string()).collect())
                }
                Ok(cfg) => self.apply(cfg).await,
            },
        };
        match &outcome {
            ReloadOutcome::Applied(changes) => {
                self.reloads_ok.fetch_add(1, Relaxed);
                if changes.is_empty() {
                    tracing::info!("reload: nothing changed");
                }
                for c in changes {
                    tracing::info!("reload: {c}");
                }
            }
            ReloadOutcome::Rejected(errs) => {
                self.reloads_failed.fetch_add(1, Relaxed);
                for e in errs {
                    tracing::error!("reload rejected: {e}");
                }
            }
        }
        let status = match &outcome {
            ReloadOutcome::Applied(c) => format!("reloaded: {} change(s)", c.len()),
            ReloadOutcome::Rejected(e) => format!(
                "reload rejected ({}); serving the previous config",
                e.first().map_or("", String::as_str)
            ),
        };
        crate::systemd::notify(&format!("READY=1\nSTATUS={}", self.status_line(&status)));
        outcome
    }

    /// A one-line status for systemd (`systemctl status`): what is served, and `what`.
    fn status_line(&self, what: &str) -> String {
        let view = self.view.load();
        let line = format!(
            "{what}; {} listener(s), {} upstream(s), {} connection(s) open",
            view.listeners.len(),
            view.pools.len(),
            self.global.active()
        );
        line.replace('\n', " ")
    }

    /// Applies a validated config to the running proxy: what [`plan::plan`] says changed.
    pub async fn apply(&self, cfg: Config) -> ReloadOutcome {
        for w in &cfg.warnings {
            tracing::warn!("{w}");
        }
        let mut live = self.live.lock().await;
        // Checked under the lock an upgrade takes to gather the sockets.
        if self.upgrade.in_progress() {
            return ReloadOutcome::Rejected(vec![
                "an upgrade is in progress: the new process reads the config".into(),
            ]);
        }
        let old = live.cfg.clone();
        let workers = self.workers.len();
        let own: Vec<SocketAddr> = live.listeners.values().flat_map(|l| l.addrs()).collect();
        let plan = match plan::plan(&old, &cfg) {
            Ok(p) => p,
            Err(errors) => return ReloadOutcome::Rejected(errors),
        };
        let mut changes = Vec::new();

        // TLS settings first: a certificate rustls cannot use rejects the reload before
        // anything changes.
        let tls = match build_tls(&cfg, Some(&live)) {
            Ok(t) => t,
            Err(e) => return ReloadOutcome::Rejected(vec![e.to_string()]),
        };

        // An access log file is reopened on every reload, so that log rotation works as
        // with other daemons: move the file, then SIGHUP. Connections that started before
        // finish writing to the old one.
        let reopen = matches!(cfg.log.access, config::AccessTarget::File(_));
        let access_log = if plan.log_changed || reopen {
            match open_log(&cfg, &self.logs) {
                Ok(l) => {
                    if plan.log_changed {
                        changes.push("access log settings changed".into());
                    }
                    l
                }
                Err(e) => return ReloadOutcome::Rejected(vec![e.to_string()]),
            }
        } else {
            live.access_log.clone()
        };

        // Bind what is new first: if any address cannot be bound, nothing changes (and what
        // was bound is closed before it accepted anything).
        let mut new_sockets: HashMap<String, Vec<Bound>> = HashMap::new();
        for (lp, lc) in plan.listeners.iter().zip(&cfg.listeners) {
            let wanted: &[SocketAddr] = match lp {
                ListenerPlan::Keep { bind, .. } => bind,
                ListenerPlan::Add { .. } | ListenerPlan::Rebind { .. } => &lc.listen,
            };
            if wanted.is_empty() {
                continue;
            }
            match listener::bind(
                &*self.binder,
                wanted,
                lc.reuse_port,
                kind(lc),
                workers,
                &own,
            ) {
                Ok(s) => {
                    new_sockets.insert(lc.name.clone(), s);
                }
                Err(e)
                    if matches!(lp, ListenerPlan::Rebind { .. })
                        && e.kind() == io::ErrorKind::AddrInUse =>
                {
                    return ReloadOutcome::Rejected(vec![format!(
                        "listener {:?}: its socket options changed and {e}; change them in two steps (remove, then add)",
                        lc.name
                    )]);
                }
                Err(e) => {
                    return ReloadOutcome::Rejected(vec![format!("listener {:?}: {e}", lc.name)]);
                }
            }
        }

        // Upstreams.
        let mut pools = HashMap::new();
        for ((name, up), u) in plan.upstreams.iter().zip(&cfg.upstreams) {
            let prev = live.pools.remove(name);
            let client_tls = tls.upstreams.get(name).cloned();
            match (up, prev) {
                (UpstreamPlan::Same, Some(p)) if !p.pool.changed_at_runtime() => {
                    pools.insert(name.clone(), p);
                }
                (_, prev) => {
                    if let Some(p) = &prev {
                        p.stop.cancel();
                    }
                    changes.push(match up {
                        UpstreamPlan::Added => format!("upstream {name:?} added"),
                        UpstreamPlan::Same => format!(
                            "upstream {name:?}: the servers the admin API changed are the file's again"
                        ),
                        _ => format!("upstream {name:?} changed"),
                    });
                    let old_pool = prev.as_ref().map(|p| &*p.pool);
                    pools.insert(
                        name.clone(),
                        start_pool(u, old_pool, client_tls, &self.background).await,
                    );
                }
            }
        }
        for name in &plan.removed_upstreams {
            if let Some(p) = live.pools.remove(name) {
                p.stop.cancel();
            }
            changes.push(format!("upstream {name:?} removed"));
        }
        live.pools = pools;

        self.io_uring.store(cfg.global.io_uring, Relaxed);
        self.udp_kernel.store(cfg.global.udp_kernel, Relaxed);
        if let Some(max) = plan.max_connections {
            self.global.set_max(max);
            changes.push(format!("max_connections is now {max}"));
        }
        changes.extend(plan.notes.iter().cloned());
        live.access_log = access_log;
        live.cfg = cfg.clone();

        // Listeners.
        let mut listeners = HashMap::new();
        for (lp, lc) in plan.listeners.iter().zip(&cfg.listeners) {
            let prev = live.listeners.remove(&lc.name);
            let socks = new_sockets.remove(&lc.name);
            let server_tls = tls.listeners.get(&lc.name).cloned();
            match (lp, prev) {
                (ListenerPlan::Keep { changed, .. }, Some(mut p)) => {
                    // Same sockets for the addresses that stay; new settings (and pool)
                    // for new connections.
                    let ctx = self.build_ctx(
                        &live,
                        lc,
                        p.stats.clone(),
                        p.gate.clone(),
                        self.clients_for(lc, Some(&p)),
                        server_tls.clone(),
                        Some(&p),
                    );
                    p.gate.set_max(lc.max_connections.unwrap_or(usize::MAX));
                    let clients = ctx.clients.clone();
                    p.slot.store(Arc::new(ctx));
                    if *changed {
                        changes.push(format!("listener {:?} changed", lc.name));
                    }
                    // New addresses accept first, then the ones that went stop.
                    if let Some(socks) = socks {
                        let added = self.start_accepting(&lc.name, &p.slot, socks);
                        for a in added.iter().filter_map(|g| g.addr) {
                            tracing::info!("listener {:?} listening on {a}", lc.name);
                            changes.push(format!("listener {:?} now listens on {a}", lc.name));
                        }
                        p.groups.extend(added);
                    }
                    let (kept, gone): (Vec<Group>, Vec<Group>) = std::mem::take(&mut p.groups)
                        .into_iter()
                        .partition(|g| lc.listen.contains(&g.listen));
                    for g in gone {
                        g.stop_accepting().await;
                        let a = g.addr.unwrap_or(g.listen);
                        changes.push(format!("listener {:?} stopped listening on {a}", lc.name));
                    }
                    // In the order of the config.
                    let mut groups = kept;
                    groups.sort_by_key(|g| lc.listen.iter().position(|a| *a == g.listen));
                    listeners.insert(
                        lc.name.clone(),
                        LiveListener {
                            cfg: lc.clone(),
                            targets: targets(&cfg, lc),
                            clients,
                            tls: server_tls,
                            groups,
                            ..p
                        },
                    );
                }
                (_, prev) => {
                    // New, or its sockets need other options: new sockets accept, then the
                    // old ones (if any) stop.
                    let Some(socks) = socks else {
                        unreachable!("a new listener, or one with new socket options, has sockets")
                    };
                    let ll = self.start_listener(&live, lc, socks, prev.as_ref(), server_tls);
                    for a in ll.addrs() {
                        tracing::info!("listener {:?} listening on {a}", lc.name);
                    }
                    if let Some(p) = &prev {
                        p.end_sessions();
                        p.stop_accepting().await;
                        changes.push(format!("listener {:?} has new sockets", lc.name));
                    } else {
                        changes.push(format!("listener {:?} added", lc.name));
                    }
                    listeners.insert(lc.name.clone(), ll);
                }
            }
        }
        for name in &plan.removed_listeners {
            // New connects are refused from the moment this returns; open connections
            // finish on their own.
            if let Some(l) = live.listeners.remove(name) {
                l.stop_accepting().await;
            }
            changes.push(format!("listener {name:?} removed; its connections drain"));
        }
        live.listeners = listeners;
        self.publish(&live);
        ReloadOutcome::Applied(changes)
    }

    /// Stops accepting, then waits for open connections as [`Proxy::run_until_signal`] says.
    /// `interrupt` resolving cuts the wait short.
    pub async fn drain(&self, interrupt: impl Future<Output = ()>) -> Stopped {
        tokio::pin!(interrupt);
        // Stopping the listeners waits for a reload in progress (the reload lock); a second
        // SIGINT does not wait for it.
        self.upgrade.stop_listening().await;
        // After an upgrade the new process is systemd's main process: the service is not
        // stopping.
        if !self.upgrade.handed_over.is_cancelled() {
            crate::systemd::notify(&format!(
                "STOPPING=1\nSTATUS=draining: {} connection(s) open",
                self.global.active()
            ));
        }
        let stop_accepting = async {
            let live = self.live.lock().await;
            // Every socket told first, so that they all close about together.
            for g in live.listeners.values().flat_map(|l| &l.groups) {
                g.stop.cancel();
            }
            for l in live.listeners.values() {
                l.stop_accepting().await;
            }
            live.cfg.global.drain_timeout
        };
        let stopped = tokio::select! {
            drain_timeout = stop_accepting => {
                self.connections.close();
                tracing::info!(
                    "stopped accepting; waiting up to {drain_timeout:?} for {} open connection(s)",
                    self.global.active()
                );
                tokio::select! {
                    () = self.connections.wait() => Stopped::Drained,
                    () = tokio::time::sleep(drain_timeout) => Stopped::TimedOut,
                    () = &mut interrupt => Stopped::Interrupted,
                }
            }
            () = &mut interrupt => Stopped::Interrupted,
        };
        self.connections.close();
        // Interrupted: connections get a short grace to close and log, the admin server none.
        let grace = match stopped {
            Stopped::Interrupted => INTERRUPT_GRACE,
            _ => CLOSE_GRACE,
        };
        if stopped != Stopped::Drained {
            self.conn_stop.cancel();
            if tokio::time::timeout(grace, self.connections.wait())
                .await
                .is_err()
            {
                tracing::warn!("some connections did not close within {grace:?}");
            }
        }
        self.background.cancel();
        self.admin_fd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let admin = self
            .admin_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = admin {
            if stopped == Stopped::Interrupted {
                task.abort();
            } else {
                // The admin server answers the requests it has (it closes after a grace
                // period).
                let _ = task.await;
            }
        }
        tracing::info!("drained ({stopped:?})");
        // Every record written before the process exits: the current log flushed, and the
        // logs of before a reload (their connections have ended) written out.
        let log = self.view.load().access_log.clone();
        let logs = self.logs.clone();
        let flushed = tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            log.flush(grace)
                && logs.wait_writers(
                    usize::from(log.enabled()),
                    grace.saturating_sub(start.elapsed()),
                )
        })
        .await
        .unwrap_or(false);
        if !flushed {
            tracing::warn!("the access log could not be flushed within {grace:?}");
        }
        let dropped = self.logs.dropped();
        if dropped > 0 {
            tracing::warn!("{dropped} access log record(s) were dropped");
        }
        stopped
    }

    /// Records the access log could not keep up with, since start.
    pub fn access_log_dropped(&self) -> u64 {
        self.logs.dropped()
    }
}

/// Builds a pool (keeping the servers of `old` that stay), resolves its names, and starts
/// its health checks and DNS re-resolution.
async fn start_pool(
    u: &config::Upstream,
    old: Option<&Pool>,
    tls: Option<Arc<ClientTls>>,
    background: &CancellationToken,
) -> LivePool {
    let pool = Arc::new(Pool::new(u, old, tls));
    if pool.has_names() {
        crate::upstream::resolve_all(&pool).await;
    }
    let stop = background.child_token();
    // Also for a pool without names now: the admin API may add one.
    tokio::spawn(crate::upstream::resolve_loop(pool.clone(), stop.clone()));
    if pool.health.as_ref().is_some_and(|h| h.active) {
        tokio::spawn(crate::health::run(pool.clone(), stop.clone()));
    }
    LivePool {
        cfg: u.clone(),
        pool,
        stop,
    }
}

/// Once a second, per listener: refused-connection summaries, per-client table sweeps.
async fn housekeeping(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.background.cancelled() => return,
            _ = tick.tick() => {}
        }
        for l in &shared.view.load().listeners {
            l.slot.load().housekeeping();
        }
    }
}

/// `workers = 0` means one per core.
pub fn effective_workers(workers: usize) -> usize {
    if workers > 0 {
        workers
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The TLS settings a config needs, built before anything is started or changed.
struct TlsSet {
    listeners: HashMap<String, Arc<ServerTls>>,
    upstreams: HashMap<String, Arc<ClientTls>>,
}

/// Why a config's TLS settings cannot be built (start-up fails, a reload is refused): the
/// listener or upstream, and what is wrong with its settings.
#[derive(Debug, thiserror::Error)]
enum TlsSetError {
    #[error("listener {name:?}: {error}")]
    Listener { name: String, error: SetupError },
    #[error("upstream {name:?}: {error}")]
    Upstream { name: String, error: SetupError },
}

/// Builds every listener's and upstream's TLS settings for `cfg`. With `live` (a reload),
/// a listener whose TLS settings did not change keeps them as they are; one whose
/// certificates changed gets new ones but keeps its session-resumption state while its
/// client-certificate settings stay the same; an unchanged upstream keeps its own (and its
/// sessions with the servers). Warns about certificates that expire soon.
fn build_tls(cfg: &Config, live: Option<&Live>) -> Result<TlsSet, TlsSetError> {
    let mut listeners = HashMap::new();
    for lc in &cfg.listeners {
        let ListenerMode::Tls(spec) = &lc.mode else {
            continue;
        };
        let prev = live.and_then(|l| l.listeners.get(&lc.name));
        let same = prev
            .filter(|p| p.cfg.mode == lc.mode)
            .and_then(|p| p.tls.clone());
        let t = match same {
            Some(t) => t,
            None => {
                let keep = prev.and_then(|p| p.tls.as_ref()).map(|t| &t.resumption);
                let t = ServerTls::new(spec, keep).map_err(|error| TlsSetError::Listener {
                    name: lc.name.clone(),
                    error,
                })?;
                let keys =
                    std::iter::once(&spec.default_cert).chain(spec.certs.iter().map(|(_, c)| c));
                for c in keys {
                    if let Some(w) = crate::tls::certs::key_file_warning(&c.key) {
                        tracing::warn!(listener = %lc.name, "{w}");
                    }
                }
                Arc::new(t)
            }
        };
        // At start and at every reload, changed or not.
        warn_expiry(&lc.name, &t);
        listeners.insert(lc.name.clone(), t);
    }
    let mut upstreams = HashMap::new();
    for u in &cfg.upstreams {
        let Some(spec) = &u.tls else { continue };
        let prev = live
            .and_then(|l| l.pools.get(&u.name))
            .filter(|p| p.cfg.tls == u.tls)
            .and_then(|p| p.pool.tls.clone());
        let t = match prev {
            Some(t) => t,
            None => Arc::new(ClientTls::new(spec).map_err(|error| TlsSetError::Upstream {
                name: u.name.clone(),
                error,
            })?),
        };
        // At start and at every reload, changed or not.
        if !spec.verify {
            tracing::warn!(upstream = %u.name, "tls.verify = false: the servers' certificates are not checked; anyone on the path can impersonate them");
        }
        if let Some(w) = spec
            .client_cert
            .as_ref()
            .and_then(|c| crate::tls::certs::key_file_warning(&c.key))
        {
            tracing::warn!(upstream = %u.name, "{w}");
        }
        upstreams.insert(u.name.clone(), t);
    }
    Ok(TlsSet {
        listeners,
        upstreams,
    })
}

/// Certificates that expire within this are warned about at start and reload.
const EXPIRY_WARNING: i64 = 14 * 24 * 3600;

fn warn_expiry(listener: &str, t: &ServerTls) {
    for c in &t.certs {
        let left = crate::tls::certs::seconds_left(&c.info);
        if left <= 0 {
            tracing::warn!(listener, cert = %c.name, subject = %c.info.subject, "certificate has expired");
        } else if left < EXPIRY_WARNING {
            tracing::warn!(listener, cert = %c.name, subject = %c.info.subject, "certificate expires in {}", crate::tls::certs::time_left(&c.info));
        }
    }
}

/// The listener's index in the kernel's counts (given once, kept for the life of its
/// stats, which show them); `None` once the kernel has none left to give.
fn kernel_counts(k: &Arc<crate::udp::Kernel>, stats: &ListenerStats) -> Option<u32> {
    if stats.kernel.get().is_none() {
        let index = k.listener()?;
        let _ = stats.kernel.set(Box::new(crate::udp::ListenerCounts {
            kernel: k.clone(),
            index,
        }));
    }
    stats.kernel.get().map(|c| c.index())
}
