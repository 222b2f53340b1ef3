//! Listeners: bound sockets, the accept loop, and admission under the connection limits.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::observe::{AccessLog, ListenerStats, Outcome, Record};
use crate::upstream::Pool;

/// A count of open connections with a ceiling.
#[derive(Debug)]
pub struct Gate {
    active: AtomicUsize,
    max: usize,
}

impl Gate {
    pub fn new(max: usize) -> Gate {
        Gate {
            active: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes a place if one is free. Never lets more than `max` in, even when called
    /// concurrently.
    fn try_enter(&self) -> bool {
        if self.active.fetch_add(1, Relaxed) < self.max {
            true
        } else {
            self.active.fetch_sub(1, Relaxed);
            false
        }
    }

    fn leave(&self) {
        self.active.fetch_sub(1, Relaxed);
    }

    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }
}

/// Everything a connection accepted on one listener needs.
pub struct ListenerCtx {
    pub name: String,
    pub pool: Arc<Pool>,
    pub idle_timeout: Duration,
    /// How the relay moves bytes.
    pub engine: crate::relay::Engine,
    pub stats: ListenerStats,
    /// This listener's `max_connections`.
    pub gate: Gate,
    /// `[global] max_connections`, shared by all listeners.
    pub global: Arc<Gate>,
    pub access_log: Arc<AccessLog>,
    /// Cancelled when the drain timeout runs out: open connections close (`drained`).
    pub stop: CancellationToken,
}

/// A connection's place under the limits; released on drop.
pub struct Permit {
    l: Arc<ListenerCtx>,
}

impl Permit {
    fn try_new(l: &Arc<ListenerCtx>) -> Option<Permit> {
        if !l.global.try_enter() {
            return None;
        }
        if !l.gate.try_enter() {
            l.global.leave();
            return None;
        }
        l.stats.active.fetch_add(1, Relaxed);
        Some(Permit { l: l.clone() })
    }

    pub fn listener(&self) -> &ListenerCtx {
        &self.l
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.l.stats.active.fetch_sub(1, Relaxed);
        self.l.gate.leave();
        self.l.global.leave();
    }
}

/// Binds every address of a listener: one socket per address, or with `reuse_port` one per
/// worker. Port 0 binds an ephemeral port, shared by that address's sockets.
pub fn bind(
    addrs: &[SocketAddr],
    reuse_port: bool,
    workers: usize,
) -> io::Result<Vec<TcpListener>> {
    let mut out = Vec::new();
    for addr in addrs {
        let first = crate::net::bind_listener(*addr, reuse_port)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let actual = first.local_addr()?;
        out.push(first);
        if reuse_port {
            for _ in 1..workers.max(1) {
                out.push(crate::net::bind_listener(actual, true)?);
            }
        }
    }
    Ok(out)
}

/// Accepts connections until `shutdown` is cancelled, then drops the socket (new connects
/// are refused from that moment). Resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off
/// and retry rather than spin or exit.
pub async fn accept_loop(
    listener: TcpListener,
    l: Arc<ListenerCtx>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut backoff = Duration::ZERO;
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                match Permit::try_new(&l) {
                    Some(permit) => {
                        tracker.spawn(crate::session::serve(stream, peer, permit));
                    }
                    None => {
                        crate::net::close_with_reset(stream);
                        refuse(&l, peer, Outcome::Limited);
                    }
                }
            }
            Err(e) if is_resource_error(&e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                let now = tokio::time::Instant::now();
                if last_warn.is_none_or(|t| now - t >= Duration::from_secs(5)) {
                    tracing::warn!(listener = %l.name, "accept: {e}; backing off {backoff:?}");
                    last_warn = Some(now);
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
            }
            // Per-connection errors (e.g. ECONNABORTED): the next accept is unaffected.
            Err(e) => tracing::debug!(listener = %l.name, "accept: {e}"),
        }
    }
}

fn is_resource_error(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(e),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
    )
}

/// Accounts for a connection refused before it was served.
fn refuse(l: &ListenerCtx, peer: SocketAddr, outcome: Outcome) {
    l.stats.finish(outcome, 0, 0);
    l.access_log.write(&Record {
        ts: SystemTime::now(),
        listener: &l.name,
        client: peer,
        upstream: None,
        server: None,
        sni: None,
        bytes_up: 0,
        bytes_down: 0,
        connect_ms: None,
        duration_ms: Duration::ZERO,
        result: outcome,
    });
}
