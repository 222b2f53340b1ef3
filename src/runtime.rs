//! The running proxy: runtime objects built from a [`Config`], the listeners' accept tasks,
//! signals, and the graceful drain.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::listener::{self, Gate, ListenerCtx};
use crate::observe::AccessLog;
use crate::policy::{Acl, ClientLimits, ClientTable};
use crate::relay::Engine;
use crate::upstream::Pool;

/// How long connections cut by the drain timeout get to write their log records.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A started proxy: listeners bound and accepting.
pub struct Proxy {
    pub listeners: Vec<Arc<ListenerCtx>>,
    pub pools: Vec<Arc<Pool>>,
    /// Every bound address, by listener index.
    pub bound: Vec<(usize, SocketAddr)>,
    drain_timeout: Duration,
    access_log: Arc<AccessLog>,
    accept_stop: CancellationToken,
    conn_stop: CancellationToken,
    accepting: TaskTracker,
    connections: TaskTracker,
    /// Health checks and DNS re-resolution.
    background: CancellationToken,
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

impl Proxy {
    /// Builds the runtime objects and binds every listener. Must run inside a tokio runtime.
    ///
    /// Fails (nothing left bound) if an address cannot be bound or the access log cannot be
    /// opened.
    pub async fn start(cfg: &Config) -> io::Result<Proxy> {
        let access_log = Arc::new(AccessLog::open(&cfg.log.access, cfg.log.format).map_err(
            |e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open access log {:?}: {e}", cfg.log.access),
                )
            },
        )?);
        let workers = effective_workers(cfg.global.workers);
        let pools: Vec<Arc<Pool>> = cfg
            .upstreams
            .iter()
            .map(|u| Arc::new(Pool::new(u)))
            .collect();
        // Names are resolved before anything is accepted; one that fails now is retried
        // every `resolve_interval`.
        for p in &pools {
            if p.has_names() {
                crate::upstream::resolve_all(p).await;
            }
        }
        let global = Arc::new(Gate::new(cfg.global.max_connections));
        let conn_stop = CancellationToken::new();

        // Bind everything before accepting anything: a config that cannot fully start
        // starts nothing.
        let mut sockets = Vec::new();
        let mut listeners = Vec::new();
        let mut bound = Vec::new();
        for (i, lc) in cfg.listeners.iter().enumerate() {
            let socks = listener::bind(&lc.listen, lc.reuse_port, workers)?;
            for s in &socks {
                let a = s.local_addr()?;
                if !bound.contains(&(i, a)) {
                    bound.push((i, a));
                }
            }
            let ctx = Arc::new(ListenerCtx::new(
                lc.name.clone(),
                pools[lc.upstream].clone(),
                lc.idle_timeout,
                if cfg.global.splice {
                    Engine::Splice
                } else {
                    Engine::Copy
                },
                lc.max_connections,
                global.clone(),
                access_log.clone(),
                conn_stop.clone(),
                Acl {
                    allow: lc.allow.clone(),
                    deny: lc.deny.clone(),
                },
                lc.per_client.map(|p| {
                    Arc::new(ClientTable::new(ClientLimits {
                        max_connections: p.max_connections,
                        rate: p.rate,
                        max_tracked: p.max_tracked,
                    }))
                }),
                lc.proxy_protocol.clone(),
            ));
            sockets.push((ctx.clone(), socks));
            listeners.push(ctx);
        }

        let accept_stop = CancellationToken::new();
        let accepting = TaskTracker::new();
        let connections = TaskTracker::new();
        for (ctx, socks) in sockets {
            for s in socks {
                accepting.spawn(listener::accept_loop(
                    s,
                    ctx.clone(),
                    accept_stop.clone(),
                    connections.clone(),
                ));
            }
        }
        accepting.close();
        let background = CancellationToken::new();
        tokio::spawn(housekeeping(listeners.clone(), background.clone()));
        for p in &pools {
            if p.has_names() {
                tokio::spawn(crate::upstream::resolve_loop(p.clone(), background.clone()));
            }
            if p.health.is_some() {
                tokio::spawn(crate::health::run(p.clone(), background.clone()));
            }
        }
        for (i, a) in &bound {
            tracing::info!("listener {:?} listening on {a}", listeners[*i].name);
        }
        Ok(Proxy {
            listeners,
            pools,
            bound,
            drain_timeout: cfg.global.drain_timeout,
            access_log,
            accept_stop,
            conn_stop,
            accepting,
            connections,
            background,
        })
    }

    /// Serves until SIGTERM or SIGINT, then drains: listening sockets close at once, open
    /// connections get up to `drain_timeout` to finish, then the rest are closed. A second
    /// SIGINT closes everything at once.
    pub async fn run_until_signal(self) -> io::Result<Stopped> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: draining"); break }
                _ = int.recv() => { tracing::info!("SIGINT: draining (again to exit at once)"); break }
                _ = hup.recv() => {
                    tracing::warn!("SIGHUP: configuration reload is not supported yet; nothing changed");
                }
            }
        }
        let interrupt = async move {
            int.recv().await;
        };
        Ok(self.drain(interrupt).await)
    }

    /// Stops accepting, then waits for open connections as [`Proxy::run_until_signal`] says.
    /// `interrupt` resolving cuts the wait short.
    pub async fn drain(self, interrupt: impl Future<Output = ()>) -> Stopped {
        self.accept_stop.cancel();
        self.accepting.wait().await;
        self.connections.close();
        let open: u64 = self
            .listeners
            .iter()
            .map(|l| l.stats.active.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        tracing::info!(
            "stopped accepting; waiting up to {:?} for {open} open connection(s)",
            self.drain_timeout
        );
        let stopped = tokio::select! {
            () = self.connections.wait() => Stopped::Drained,
            () = tokio::time::sleep(self.drain_timeout) => Stopped::TimedOut,
            () = interrupt => Stopped::Interrupted,
        };
        if stopped != Stopped::Drained {
            self.conn_stop.cancel();
            if tokio::time::timeout(CLOSE_GRACE, self.connections.wait())
                .await
                .is_err()
            {
                tracing::warn!("some connections did not close within {CLOSE_GRACE:?}");
            }
        }
        self.background.cancel();
        tracing::info!("drained ({stopped:?})");
        let dropped = self.access_log.dropped();
        if dropped > 0 {
            tracing::warn!("{dropped} access log record(s) were dropped");
        }
        stopped
    }

    /// Flushes the access log. Call after the last connection is gone.
    pub fn close_log(log: Arc<AccessLog>) {
        if let Ok(log) = Arc::try_unwrap(log) {
            log.close();
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

/// Once a second, per listener: refused-connection summaries, per-client table sweeps.
async fn housekeeping(listeners: Vec<Arc<ListenerCtx>>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for l in &listeners {
            l.housekeeping();
        }
    }
}
