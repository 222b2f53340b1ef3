//! Listeners: bound sockets, the accept loop, and admission under the connection limits.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use crate::net::Listener;
use tokio_util::sync::CancellationToken;

use crate::config::ProxyAccept;
use crate::frontend::{self, FrontEnd};
use crate::observe::{AccessLog, ListenerStats, Outcome, Record};
use crate::policy::{Acl, ClientPermit, ClientTable, clients::Refusal};
use crate::route::Router;

/// A count of open connections with a ceiling.
#[derive(Debug)]
pub struct Gate {
    active: AtomicUsize,
    max: AtomicUsize,
}

impl Gate {
    pub fn new(max: usize) -> Gate {
        Gate {
            active: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        }
    }

    /// Changes the ceiling (reload). Connections already in stay.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Relaxed);
    }

    pub fn max(&self) -> usize {
        self.max.load(Relaxed)
    }

    /// Takes a place if one is free. Never lets more than `max` in, even when called
    /// concurrently.
    fn try_enter(&self) -> bool {
        if self.active.fetch_add(1, Relaxed) < self.max.load(Relaxed) {
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

/// Everything a connection accepted on one listener needs. Immutable: a reload builds a
/// new one (sharing `stats` and `gate`, so counts carry over) and swaps it into the
/// listener's [`Slot`]; connections keep the one they were accepted with.
pub struct ListenerCtx {
    pub name: String,
    pub front: FrontEnd,
    pub router: Router,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    /// How the relay moves bytes.
    pub engine: crate::relay::Engine,
    pub stats: Arc<ListenerStats>,
    /// This listener's `max_connections`.
    pub gate: Arc<Gate>,
    /// `[global] max_connections`, shared by all listeners.
    pub global: Arc<Gate>,
    pub access_log: Arc<AccessLog>,
    /// Cancelled when the drain timeout runs out: open connections close (`drained`).
    /// Sharded: every waiting connection is registered with one of these, so that
    /// connections starting and ending do not all contend for one waiter list.
    stops: Box<[CancellationToken]>,
    pub acl: Acl,
    pub clients: Option<Arc<ClientTable>>,
    pub proxy: Option<ProxyAccept>,
    /// The client sockets' buffer caps.
    pub buffers: crate::config::SocketBuffers,
    /// Refused connections logged individually this second, and those only counted.
    /// The current second (high bits) and the refusals logged in it (low 16 bits), in one
    /// word so that workers crossing a second boundary together cannot log more than the cap.
    refused_window: AtomicU64,
    refused_unlogged: AtomicU64,
}

/// Refused connections logged one by one per second and listener; beyond it they are
/// counted (metrics, status) and summed up in one process-log line a second, so that a
/// flood of refused connections cannot make logging the bottleneck.
pub const REFUSED_LOG_PER_SEC: u64 = 100;
const _: () = assert!(REFUSED_LOG_PER_SEC < 0xffff, "the count has 16 bits");

/// Shards of a listener's drain signal.
const STOP_SHARDS: usize = 16;

impl ListenerCtx {
    /// SO_MARK for this listener's outbound sockets (a forward listener's `mark`).
    pub fn mark(&self) -> Option<u32> {
        match &self.front {
            FrontEnd::Transparent(t) => t.dial.mark,
            FrontEnd::Socks5 { forward, .. } | FrontEnd::HttpConnect { forward, .. } => {
                forward.dial.mark
            }
            FrontEnd::Tcp | FrontEnd::Tls(_) | FrontEnd::Udp(_) => None,
        }
    }

    /// The drain signal for a new connection: one of the shards, at random.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stops[fastrand::usize(..self.stops.len())]
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        front: FrontEnd,
        router: Router,
        handshake_timeout: Duration,
        idle_timeout: Duration,
        engine: crate::relay::Engine,
        stats: Arc<ListenerStats>,
        gate: Arc<Gate>,
        global: Arc<Gate>,
        access_log: Arc<AccessLog>,
        stop: CancellationToken,
        acl: Acl,
        clients: Option<Arc<ClientTable>>,
        proxy: Option<ProxyAccept>,
        buffers: crate::config::SocketBuffers,
    ) -> ListenerCtx {
        ListenerCtx {
            name,
            front,
            router,
            handshake_timeout,
            idle_timeout,
            engine,
            stats,
            gate,
            global,
            access_log,
            stops: (0..STOP_SHARDS).map(|_| stop.child_token()).collect(),
            acl,
            clients,
            proxy,
            buffers,
            refused_window: AtomicU64::new(0),
            refused_unlogged: AtomicU64::new(0),
        }
    }

    /// Checks a client address against the ACL and the per-client limits.
    pub fn admit_client(&self, ip: IpAddr) -> Result<Option<ClientPermit>, Outcome> {
        if !self.acl.permits(ip) {
            return Err(Outcome::Denied);
        }
        match &self.clients {
            None => Ok(None),
            Some(t) => t.admit(ip).map(Some).map_err(|r| {
                if r == Refusal::TableFull {
                    tracing::debug!(listener = %self.name, "per-client table full: refusing new client {ip}");
                }
                Outcome::Limited
            }),
        }
    }

    /// Accounts for a connection refused before any server was contacted: counted always,
    /// logged individually up to [`REFUSED_LOG_PER_SEC`] a second.
    pub fn refuse(&self, rec: &Record<'_>) {
        self.stats.finish(rec.result);
        let sec = rec
            .ts
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let admitted = self
            .refused_window
            .fetch_update(Relaxed, Relaxed, |w| {
                let (s, n) = (w >> 16, w & 0xffff);
                match sec.cmp(&s) {
                    std::cmp::Ordering::Greater => Some((sec << 16) | 1),
                    std::cmp::Ordering::Equal if n < REFUSED_LOG_PER_SEC => Some(w + 1),
                    // Over the cap, or stamped in a second already past (another worker
                    // moved on): counted, not logged, so no second logs more than the cap.
                    _ => None,
                }
            })
            .is_ok();
        if !admitted {
            self.refused_unlogged.fetch_add(1, Relaxed);
            return;
        }
        self.access_log.write(rec);
    }

    /// Once a second: reports refused connections that were not logged one by one, and
    /// sweeps the per-client table.
    pub fn housekeeping(&self) {
        let n = self.refused_unlogged.swap(0, Relaxed);
        if n > 0 {
            tracing::warn!(
                listener = %self.name,
                "{n} refused connection(s) in the last second were counted but not logged one by one (over {REFUSED_LOG_PER_SEC}/s)"
            );
        }
        if let Some(t) = &self.clients {
            t.sweep();
        }
    }
}

impl frontend::Listener for ListenerCtx {
    fn name(&self) -> &str {
        &self.name
    }

    fn front(&self) -> &FrontEnd {
        &self.front
    }

    fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    fn proxy(&self) -> Option<&ProxyAccept> {
        self.proxy.as_ref()
    }

    fn needs_hello(&self) -> bool {
        self.router.needs_hello()
    }

    fn stats(&self) -> &ListenerStats {
        &self.stats
    }

    fn admit_client(&self, ip: IpAddr) -> Result<Option<ClientPermit>, Outcome> {
        ListenerCtx::admit_client(self, ip)
    }
}

/// A connection's place under the limits; released on drop.
pub struct Permit {
    l: Arc<ListenerCtx>,
}

impl Permit {
    pub(crate) fn try_new(l: &Arc<ListenerCtx>) -> Option<Permit> {
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

    /// The listener's context, to keep after the permit is given up.
    pub fn ctx(&self) -> Arc<ListenerCtx> {
        self.l.clone()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.l.stats.active.fetch_sub(1, Relaxed);
        self.l.gate.leave();
        self.l.global.leave();
    }
}

/// A listening socket and the worker that accepts on it.
pub struct Bound {
    /// The address as configured (port 0: an ephemeral port).
    pub listen: SocketAddr,
    pub worker: usize,
    pub socket: Socket,
}

/// A listening socket: TCP, or a UDP listener's.
pub enum Socket {
    Tcp(std::net::TcpListener),
    Udp(std::net::UdpSocket),
}

impl std::os::fd::AsFd for Socket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Udp(s) => s.as_fd(),
        }
    }
}

impl Socket {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Socket::Tcp(s) => s.local_addr(),
            Socket::Udp(s) => s.local_addr(),
        }
    }

    fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Udp(s) => Socket::Udp(s.try_clone()?),
        })
    }
}

/// Where listening sockets come from: the system ([`SystemBinder`]), or, in tests, sockets
/// made or refused on purpose; the runtime binds every listener (at start and at reloads)
/// through the one it was given.
pub trait Binder: Send + Sync {
    /// A listening socket on `addr`, non-blocking and not yet registered with a runtime.
    /// `reuse_port`: SO_REUSEPORT, so that other sockets may bind the same address;
    /// `transparent`: IP_TRANSPARENT (TPROXY). `exclusive`: the address must not be in
    /// use by any other socket, even one with SO_REUSEPORT (`AddrInUse` if it is).
    fn bind(
        &self,
        addr: SocketAddr,
        reuse_port: bool,
        transparent: bool,
        exclusive: bool,
    ) -> io::Result<std::net::TcpListener>;

    /// A UDP listening socket on `addr`, non-blocking and not yet registered; `reuse_port`
    /// and `exclusive` as for [`Binder::bind`].
    fn bind_udp(
        &self,
        addr: SocketAddr,
        reuse_port: bool,
        exclusive: bool,
    ) -> io::Result<std::net::UdpSocket> {
        crate::net::bind_udp(addr, reuse_port, exclusive)
    }

    /// Whether the sockets this gives for `addr` are descriptors of one socket rather than
    /// `SO_REUSEPORT` siblings (a socket systemd passed): the workers then share it, and a
    /// UDP one is served by one worker alone (each client's datagrams must reach the worker
    /// that holds its session).
    fn shared(&self, _addr: SocketAddr, _udp: bool) -> bool {
        false
    }

    /// More sockets for `addr` beyond one per worker, each of which must be served: the
    /// members of an `SO_REUSEPORT` group an upgraded-from process had more of than this
    /// one has workers (the kernel goes on sending each its share of connections).
    fn leftover(&self, _addr: SocketAddr, _udp: bool) -> Vec<io::Result<Socket>> {
        Vec::new()
    }
}

/// Binds with the system's sockets.
pub struct SystemBinder;

impl Binder for SystemBinder {
    fn bind(
        &self,
        addr: SocketAddr,
        reuse_port: bool,
        transparent: bool,
        exclusive: bool,
    ) -> io::Result<std::net::TcpListener> {
        if let Some(s) = passed(addr, false, reuse_port, Some(transparent)) {
            return s.map(Into::into);
        }
        if exclusive {
            crate::net::check_free(addr)?;
        }
        crate::net::bind_listener(addr, reuse_port, transparent)
    }

    fn bind_udp(
        &self,
        addr: SocketAddr,
        reuse_port: bool,
        exclusive: bool,
    ) -> io::Result<std::net::UdpSocket> {
        if let Some(s) = passed(addr, true, reuse_port, None) {
            return s.map(Into::into);
        }
        crate::net::bind_udp(addr, reuse_port, exclusive)
    }

    fn shared(&self, addr: SocketAddr, udp: bool) -> bool {
        crate::upgrade::shared(addr, udp) || crate::systemd::has(addr, udp)
    }

    fn leftover(&self, addr: SocketAddr, udp: bool) -> Vec<io::Result<Socket>> {
        crate::upgrade::leftover(addr, udp)
            .into_iter()
            .map(|s| {
                s.map(|s| {
                    if udp {
                        Socket::Udp(s.into())
                    } else {
                        Socket::Tcp(s.into())
                    }
                })
            })
            .collect()
    }
}

/// A socket for `addr` passed by an upgraded-from process (see [`kept_options`]) or by
/// systemd, if there is one.
fn passed(
    addr: SocketAddr,
    udp: bool,
    reuse_port: bool,
    transparent: Option<bool>,
) -> Option<io::Result<socket2::Socket>> {
    if let Some(s) = crate::upgrade::take(addr, udp) {
        return Some(s.inspect(|s| kept_options(s, addr, reuse_port, transparent)));
    }
    crate::systemd::take(addr, udp)
}

/// A socket passed by an upgraded-from process keeps its options: says so when the config
/// now asks for others (they take effect at a restart).
fn kept_options(
    s: &socket2::Socket,
    addr: SocketAddr,
    reuse_port: bool,
    transparent: Option<bool>,
) {
    if s.reuse_port().is_ok_and(|r| r != reuse_port) {
        tracing::warn!(
            "{addr}: the socket passed by the old process has reuse_port = {}, as it was bound; the config's reuse_port = {reuse_port} takes effect at a restart",
            !reuse_port
        );
    }
    if let Some(want) = transparent {
        let has = if addr.is_ipv6() {
            s.ip_transparent_v6()
        } else {
            s.ip_transparent_v4()
        };
        if has.is_ok_and(|t| t != want) {
            tracing::warn!(
                "{addr}: the socket passed by the old process is {}transparent, as it was bound; the change takes effect at a restart",
                if want { "not " } else { "" }
            );
        }
    }
}

/// What a listener's sockets are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TCP; `transparent`: IP_TRANSPARENT (TPROXY).
    Tcp {
        transparent: bool,
    },
    Udp,
}

/// Binds every address of a listener, with a socket for each worker: with `reuse_port`, a
/// socket of its own per worker (the kernel spreads new connections, or UDP clients, over
/// them); without, one TCP socket per address whose descriptor every worker accepts on, or
/// one UDP socket that the first worker serves (a client's datagrams must all reach the
/// one worker that holds its session). Port 0 binds an ephemeral port, shared by that
/// address's sockets.
///
/// With `reuse_port`, an address that some other socket listens on is refused
/// (`AddrInUse`) even if that socket has SO_REUSEPORT too: a second ferry started by
/// mistake must fail, not quietly take half the connections. Addresses in `own` (held by
/// this process's current listeners, during a reload) are not checked.
pub fn bind(
    binder: &dyn Binder,
    addrs: &[SocketAddr],
    reuse_port: bool,
    kind: Kind,
    workers: usize,
    own: &[SocketAddr],
) -> io::Result<Vec<Bound>> {
    let one = |addr: SocketAddr, exclusive: bool| -> io::Result<Socket> {
        Ok(match kind {
            Kind::Tcp { transparent } => {
                Socket::Tcp(binder.bind(addr, reuse_port, transparent, exclusive)?)
            }
            Kind::Udp => Socket::Udp(binder.bind_udp(addr, reuse_port, exclusive)?),
        })
    };
    let mut out = Vec::new();
    for addr in addrs {
        let exclusive = reuse_port && addr.port() != 0 && !own.contains(addr);
        let first = one(*addr, exclusive)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let actual = first.local_addr()?;
        let one_socket = binder.shared(actual, kind == Kind::Udp);
        let shared = kind == Kind::Udp && (!reuse_port || one_socket);
        for worker in 1..workers.max(1) {
            if shared {
                break;
            }
            let socket = if reuse_port {
                one(actual, false)?
            } else {
                first.try_clone()?
            };
            out.push(Bound {
                listen: *addr,
                worker,
                socket,
            });
        }
        out.push(Bound {
            listen: *addr,
            worker: 0,
            socket: first,
        });
        for (i, socket) in binder
            .leftover(actual, kind == Kind::Udp)
            .into_iter()
            .enumerate()
        {
            out.push(Bound {
                listen: *addr,
                worker: i % workers.max(1),
                socket: socket?,
            });
        }
    }
    Ok(out)
}

/// Where a listener's current [`ListenerCtx`] is published.
pub type Slot = Arc<arc_swap::ArcSwap<ListenerCtx>>;

/// Connections one accept loop takes per wake-up before it lets the other tasks of its
/// worker run (HAProxy's `tune.maxaccept`): a connect flood cannot starve the relays.
pub const MAX_ACCEPT: usize = 64;

/// At most this many connections left waiting in a socket's accept queue are taken when it
/// stops (the kernel's largest backlog).
const MAX_WAITING: usize = 65_536;

/// Accepts connections until `shutdown` is cancelled, then drops the socket (new connects
/// are refused once every worker's loop on it has stopped), handing each to `accepted`.
/// The socket is registered with the runtime this runs on. Each wake-up accepts up to
/// [`MAX_ACCEPT`] waiting connections, then yields. Resource errors (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM) back off and retry rather than spin or exit.
pub async fn accept_loop(
    socket: std::net::TcpListener,
    name: &str,
    shutdown: CancellationToken,
    mut accepted: impl FnMut(std::net::TcpStream, SocketAddr),
) {
    let listener: Listener = match crate::net::register_readable(socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %name, "cannot register the listening socket: {e}");
            return;
        }
    };
    let mut backoff = Duration::ZERO;
    let mut last_warn: Option<tokio::time::Instant> = None;
    'outer: loop {
        let mut ready = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                // Connections the kernel completed are waiting in the queue: closing the
                // socket would reset them. Take them first, unless the socket stays open
                // (handed over to a new process, whose queue they are now).
                let waiting = if crate::upgrade::handed_over() { 0 } else { MAX_WAITING };
                for _ in 0..waiting {
                    match crate::net::accept_waiting(listener.get_ref()) {
                        Ok(Some((stream, peer))) => accepted(stream, peer),
                        Ok(None) => break,
                        Err(e) if is_resource_error(&e) => break,
                        Err(_) => {}
                    }
                }
                break;
            }
            r = listener.readable() => match r {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(listener = %name, "listening socket failed: {e}");
                    break;
                }
            },
        };
        let mut taken = 0;
        loop {
            if taken == MAX_ACCEPT {
                // More may be waiting (readiness is kept): let this worker's connections
                // run before taking them.
                drop(ready);
                tokio::task::yield_now().await;
                break;
            }
            match crate::net::try_accept(&mut ready) {
                Ok(None) => break,
                Ok(Some((stream, peer))) => {
                    backoff = Duration::ZERO;
                    taken += 1;
                    accepted(stream, peer);
                }
                Err(e) if is_resource_error(&e) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    let now = tokio::time::Instant::now();
                    if last_warn.is_none_or(|t| now - t >= Duration::from_secs(5)) {
                        tracing::warn!(listener = %name, "accept: {e}; backing off {backoff:?}");
                        last_warn = Some(now);
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break 'outer,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    break;
                }
                // Per-connection errors (e.g. ECONNABORTED): the next accept is unaffected.
                Err(e) => tracing::debug!(listener = %name, "accept: {e}"),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// With more connections waiting than [`MAX_ACCEPT`], the accept loop lets another task
    /// of its runtime run between batches.
    #[test]
    fn accepts_in_batches_and_yields_between_them() {
        const WAITING: usize = 300;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        socket.listen(1024).unwrap();
        socket.set_nonblocking(true).unwrap();
        let listener: std::net::TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        // Every connection waits in the accept queue before the loop first runs.
        let clients: Vec<_> = (0..WAITING)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();

        // As on a worker: a current-thread runtime, with another task beside the loop that
        // I/O wakes, as a relay is. Each accept sends it a datagram; it counts those it got.
        let ticks = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        rt.spawn({
            let ticks = ticks.clone();
            async move {
                let rx = tokio::net::UdpSocket::from_std(rx).unwrap();
                let mut b = [0u8; 8];
                while rx.recv(&mut b).await.is_ok() {
                    ticks.fetch_add(1, Relaxed);
                }
            }
        });
        rt.spawn({
            let (ticks, seen, stop) = (ticks.clone(), seen.clone(), stop.clone());
            async move {
                accept_loop(listener, "test", stop.clone(), |s, _| {
                    tx.send(b"x").unwrap();
                    let mut seen = seen.lock().unwrap();
                    seen.push((ticks.load(Relaxed), s));
                    if seen.len() == WAITING {
                        stop.cancel();
                    }
                })
                .await
            }
        });
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(30), stop.cancelled())
                .await
                .expect("every connection accepted")
        });
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), WAITING);
        const { assert!(MAX_ACCEPT * 2 < WAITING) };
        // The other task ran at least once within every MAX_ACCEPT + 1 accepts.
        for w in seen.windows(MAX_ACCEPT + 1) {
            assert!(
                w[MAX_ACCEPT].0 > w[0].0,
                "{} accepts without a yield",
                MAX_ACCEPT + 1
            );
        }
        drop(clients);
    }
}
