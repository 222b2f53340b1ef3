//! UDP listeners: one session per client address (IP and port), relaying datagrams
//! unchanged between the client and one server.
//!
//! A worker serves each of its listening sockets with [`serve`], reading datagrams in
//! batches (`recvmmsg`, and UDP GRO where the kernel has it, through `quinn-udp`, which
//! also reports the address each datagram was sent to). The first datagram from a client
//! address asks the listener's [`Route`] whether it may start a session and with which
//! server (the ACL and limits, then the pool's balancer, so every `balance` applies and a
//! session counts as a connection on its server), opens a socket connected to that server,
//! and spawns the session's task, which passes replies back to the client from the
//! listening socket, from the address the client sent to (`IP_PKTINFO`/`IPV6_PKTINFO`, for
//! a listener bound to a wildcard address). Later datagrams from that address go straight
//! to the session's socket. With `SO_REUSEPORT`, the kernel hashes a client's datagrams to
//! the same socket every time, so each worker's session table is its own: no lock is
//! shared.
//!
//! A session ends after `idle_timeout` without a datagram either way; with `responses = N`,
//! once it has had N replies for every datagram the client sent (DNS: 1), which is `ok`;
//! with `requests = N`, the client's address is unbound after N datagrams (its next
//! datagram starts a new session), and the session ends when its replies are in or at its
//! idle timeout. A server that answers with ICMP port unreachable ends it as
//! `connect_failed`.
//!
//! Once a session's server has answered, the kernel may relay the rest of its datagrams
//! ([`Kernel`], `kernel.rs`): the session's task then only reads the kernel's counts at
//! its idle deadline and takes its entries out when it ends; what the kernel leaves alone
//! (fragments, say) still comes through the sockets as below.
//!
//! Datagrams are received into buffers of the listening socket and one per worker thread
//! for replies, each large enough for any UDP datagram (so none is ever truncated), and
//! sent on at once: nothing is allocated per datagram, and a datagram the other side
//! cannot take now (its socket buffer is full) is dropped and counted, as a router would.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::after;
pub use crate::observe::Dropped;
use crate::observe::Outcome;

mod kernel;
mod links;
mod outbox;
use kernel::{Flow, Rewrite};
pub use kernel::{Kernel, ListenerCounts};
use outbox::{Outbox, To};

/// A UDP socket registered with the worker's runtime for reads and errors only
/// ([`crate::net::register_readable`]: sends never wait for room).
pub(crate) type Socket = AsyncFd<std::net::UdpSocket>;

/// Large enough for any UDP payload (IPv4: 65,507 bytes; IPv6 without jumbograms: 65,527).
pub const MAX_DATAGRAM: usize = 65_536;

/// Datagrams read from a listening socket per `recvmmsg`.
const BATCH: usize = 32;

/// Batches read from a listening socket per wake-up before the worker's other tasks run.
const BATCHES_PER_WAKE: usize = 8;

/// Replies read from a session's socket per `recvmmsg`.
const REPLY_BATCH: usize = 8;

thread_local! {
    /// Replies are read here and sent on at once.
    static REPLY: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; REPLY_BATCH * MAX_DATAGRAM].into_boxed_slice());
}

/// How a UDP listener's sessions end (read when a session starts; it keeps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// No datagram either way for this long ends a session.
    pub idle_timeout: Duration,
    /// Replies expected per client datagram: when all are in, the session ends (`ok`).
    pub responses: Option<u32>,
    /// Client datagrams per session: after this many, the client's next datagram starts a
    /// new session.
    pub requests: Option<u32>,
}

/// A new session, as the [`Route`] starts it.
pub struct Admitted<G> {
    pub server: SocketAddr,
    /// Held for the session's life (the pool's server guard, the limits' permits).
    pub guard: G,
    pub settings: Settings,
    /// A PROXY protocol v2 header to put before the session's first datagram, or before
    /// every one.
    pub header: Option<(Vec<u8>, bool)>,
    /// Ask [`Route::pass`] about each later datagram of the session (a datagram rate).
    pub check_each: bool,
}

/// Starts sessions: a listener's limits and its pool.
pub trait Route: Send + Sync + 'static {
    type Guard: Send + Sync + 'static;
    /// A session for `client`, which sent to `local`: its server, or why there is none.
    fn admit(
        &self,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Result<Admitted<Self::Guard>, Dropped>;
    /// Whether a datagram of a session of `client` may pass (`per_client.rate`).
    fn pass(&self, _client: SocketAddr) -> bool {
        true
    }
}

/// A session that ended, for its access-log record and the counters.
#[derive(Debug)]
pub struct Ended<G> {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub guard: G,
    pub started: SystemTime,
    pub duration: Duration,
    pub datagrams_up: u64,
    pub datagrams_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Of the datagrams both ways, those the kernel relayed ([`Kernel`]).
    pub datagrams_kernel: u64,
    pub outcome: Outcome,
    /// More about the outcome (the error of a failed server socket).
    pub reason: Option<String>,
}

/// Which way a datagram went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// What a listening socket's sessions report. Called on the worker that serves the socket.
pub trait Report<G>: Send + Sync + 'static {
    fn ended(&self, session: Ended<G>);
    /// A datagram of `client` was dropped.
    fn dropped(&self, client: SocketAddr, why: Dropped);
    /// `datagrams` (one, or the segments of one GSO send) of `bytes` in all were passed on.
    fn relayed(&self, way: Direction, datagrams: u64, bytes: usize);
}

/// A listening socket: registered with the worker that serves it.
pub struct Listening {
    sock: Socket,
    state: UdpSocketState,
    local: SocketAddr,
    /// Bound to a wildcard address: each reply names its source address.
    wildcard: bool,
    /// This round's datagrams, both ways, sent together (only this socket's worker takes
    /// the lock).
    outbox: Mutex<Outbox>,
    /// A session queued replies: [`serve`] sends them once the round's other sessions have
    /// queued theirs.
    queued: Notify,
    /// The kernel refused a GSO send.
    gso_failed: AtomicBool,
    /// Relays established sessions in the kernel, counted there as this listener (its
    /// index).
    kernel: Option<(Arc<Kernel>, u32)>,
}

impl Listening {
    /// Registers `sock` with the current runtime, for batched reads that report where each
    /// datagram was sent to; sends go through io_uring with `io_uring` if the kernel allows
    /// it, else `sendmmsg`. With `kernel`, the kernel relays the socket's sessions once
    /// each has had a reply, counted there as listener `kernel.1` ([`Kernel::listener`]):
    /// `sock` must have been given [`Listening::kernel_ready`] already.
    pub fn new(
        sock: std::net::UdpSocket,
        io_uring: bool,
        kernel: Option<(Arc<Kernel>, u32)>,
    ) -> io::Result<Listening> {
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        let local = sock.local_addr()?;
        crate::net::allow_fragments(&sock, local)?;
        // The kernel's path needs each datagram's interface, asked for already.
        crate::net::quiet_listener(&sock, local, kernel.is_some())?;
        Ok(Listening {
            sock: crate::net::register_readable(sock)?,
            state,
            local,
            wildcard: local.ip().is_unspecified(),
            outbox: Mutex::new(Outbox::new(io_uring)),
            queued: Notify::new(),
            gso_failed: AtomicBool::new(false),
            kernel,
        })
    }

    /// Readies a listening socket for the kernel's path: each datagram it receives from
    /// now on says which interface it came in on, where its session's replies will leave
    /// by. (A datagram queued before has none: its session stays on the sockets' path.)
    /// Called when the socket is handed to its worker, before clients are told it listens.
    pub fn kernel_ready(sock: &std::net::UdpSocket) -> io::Result<()> {
        crate::net::receive_pktinfo(sock, sock.local_addr()?, true)
    }

    /// Whether sends go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.outbox().uses_io_uring()
    }

    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a datagram (`parts` joined) for this round's send, sending what is queued
    /// first if there is no room. With `segment`, it is datagrams of that size (GSO).
    fn queue<G>(
        &self,
        report: &impl Report<G>,
        to: To,
        parts: &[&[u8]],
        segment: Option<usize>,
        client: SocketAddr,
        way: Direction,
    ) {
        let segment = segment.and_then(|s| u16::try_from(s).ok());
        let mut o = self.outbox();
        let Err(to) = o.push(to, parts, segment, client, way) else {
            return;
        };
        self.send_queued(&mut o, report);
        if o.push(to, parts, segment, client, way).is_err() {
            // Larger than the whole outbox: cannot happen for a UDP datagram.
            report.dropped(client, Dropped::SendFailed);
        }
    }

    /// Sends every queued datagram and reports each.
    fn flush<G>(&self, report: &impl Report<G>) {
        let mut o = self.outbox();
        if !o.is_empty() {
            self.send_queued(&mut o, report);
        }
    }

    fn send_queued<G>(&self, o: &mut Outbox, report: &impl Report<G>) {
        o.flush(self.sock.as_raw_fd(), |s| match s.result {
            Ok(()) => report.relayed(s.way, s.datagrams, s.bytes),
            Err(why) => {
                for _ in 0..s.datagrams {
                    report.dropped(s.client, why);
                }
            }
        });
        if o.gso_failed() {
            self.gso_failed.store(true, Relaxed);
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Whether the kernel sends several datagrams in one call (UDP GSO).
    fn gso(&self) -> bool {
        self.state.max_gso_segments() > 1 && !self.gso_failed.load(Relaxed)
    }
}

/// A send's result as a drop reason.
fn sent(r: io::Result<()>) -> Result<(), Dropped> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Dropped::Full),
        Err(_) => Err(Dropped::SendFailed),
    }
}

/// Datagrams in `len` bytes of `stride`-byte segments (the last may be shorter).
fn segments(len: usize, stride: usize) -> u64 {
    len.div_ceil(stride.max(1)) as u64
}

/// Replies a session must have had before its server socket coalesces them (UDP GRO),
/// to pass them on in one send each (GSO): a bulk flow, worth the extra system call.
const GRO_AFTER: u64 = 64;

/// The client-side half of a session's counters; the session's task keeps the rest.
#[derive(Default)]
struct Up {
    datagrams: AtomicU64,
    bytes: AtomicU64,
    /// When the client last sent, in milliseconds since the session started.
    last_ms: AtomicU64,
    /// The session has ended (or is ending): the client's next datagram starts another.
    closed: AtomicBool,
}

/// A client address bound to a session.
struct Binding {
    server: Arc<Socket>,
    up: Arc<Up>,
    started: Instant,
    /// Tells the session's end from a later session of the same address.
    id: u64,
    /// A PROXY header to put before every datagram.
    header: Option<Box<[u8]>>,
    requests: Option<u32>,
    check_each: bool,
}

/// Tells [`serve`] when to stop.
#[derive(Clone, Default)]
pub struct Stop {
    /// No new sessions: the socket is served until its sessions have ended, then closed.
    pub sessions: CancellationToken,
    /// Everything ends now (`drained`).
    pub now: CancellationToken,
}

/// Serves one listening socket: sessions are created, fed and ended as above. Once
/// `stop.sessions` is cancelled, new clients' datagrams are dropped and it returns when
/// the last session has ended; `stop.now` ends every session (`drained`). It returns only
/// once every session it started has reported its end.
pub async fn serve<R: Route, P: Report<R::Guard>>(
    listening: Arc<Listening>,
    route: Arc<R>,
    report: Arc<P>,
    stop: Stop,
) {
    let mut bufs = vec![0u8; BATCH * MAX_DATAGRAM].into_boxed_slice();
    let mut meta = [RecvMeta::default(); BATCH];
    let mut s = Serving {
        listening,
        route,
        report,
        sessions: HashMap::new(),
        live: 0,
        next_id: 0,
        stop: stop.clone(),
        ended: mpsc::unbounded_channel(),
    };
    loop {
        if s.stopping() && s.live == 0 {
            s.listening.flush(&*s.report);
            return;
        }
        tokio::select! {
            biased;
            // Sessions queued replies; the others woken with them have had their turn.
            () = s.listening.queued.notified() => {
                s.listening.flush(&*s.report);
                continue;
            }
            Some((client, id)) = s.ended.1.recv() => {
                s.live -= 1;
                if s.sessions.get(&client).is_some_and(|b| b.id == id) {
                    s.sessions.remove(&client);
                }
                continue;
            }
            // Told to stop: sessions end (at once, for `now`); their reports are awaited
            // above.
            () = stop.now.cancelled(), if !stop.now.is_cancelled() => continue,
            () = stop.sessions.cancelled(), if !stop.sessions.is_cancelled() => continue,
            // Handed over to a new process: the socket's datagrams are its now (this one
            // only sends its sessions' replies).
            r = s.listening.sock.readable(),
                if !(s.stopping() && crate::upgrade::handed_over()) => if r.is_err() { continue },
        }
        for _ in 0..BATCHES_PER_WAKE {
            let mut slices: [IoSliceMut<'_>; BATCH] = {
                let mut chunks = bufs.chunks_mut(MAX_DATAGRAM);
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()))
            };
            let l = &s.listening;
            let n = match recv_batch(&l.sock, &l.state, &mut slices, &mut meta) {
                Ok(0) => break,
                Ok(n) => n,
                // An ICMP error for an earlier reply, or a transient failure: the socket
                // itself goes on.
                Err(_) => break,
            };
            for (m, buf) in meta.iter().zip(slices.iter()).take(n) {
                // With GRO, one read holds several datagrams of `stride` bytes each: to a
                // session they go on in one send (GSO), else one by one.
                let stride = m.stride.max(1);
                let data = &buf[..m.len];
                if m.len > stride && s.segments(data, stride, m.addr) {
                    continue;
                }
                for data in data.chunks(stride) {
                    s.datagram(data, m.addr, m.dst_ip, m.interface_index);
                }
            }
            if n < BATCH {
                break;
            }
        }
        s.listening.flush(&*s.report);
    }
}

/// Reads a batch of datagrams from `sock` (0: none waiting). A batch shorter than `bufs`
/// emptied the socket's queue, so its read readiness is cleared with it: the next wait is
/// for new datagrams, not for one more read that would find none. (Readiness that arrived
/// during the read is kept.)
fn recv_batch(
    sock: &Socket,
    state: &UdpSocketState,
    bufs: &mut [IoSliceMut<'_>],
    meta: &mut [RecvMeta],
) -> io::Result<usize> {
    let mut short = 0;
    let r = sock.try_io(Interest::READABLE, |sock| {
        let n = state.recv(UdpSockRef::from(sock), bufs, meta)?;
        if n < bufs.len() {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(short),
        Err(e) => Err(e),
    }
}

/// A session's end as its task tells the socket's loop: its client and id.
type Ends = (SocketAddr, u64);

/// One listening socket's state while it is served.
struct Serving<R: Route, P> {
    listening: Arc<Listening>,
    route: Arc<R>,
    report: Arc<P>,
    sessions: HashMap<SocketAddr, Binding>,
    /// Sessions started and not yet reported ended.
    live: usize,
    next_id: u64,
    stop: Stop,
    /// Sessions report their end here: (client, session id).
    ended: (mpsc::UnboundedSender<Ends>, mpsc::UnboundedReceiver<Ends>),
}

impl<R: Route, P: Report<R::Guard>> Serving<R, P> {
    /// No new sessions.
    fn stopping(&self) -> bool {
        self.stop.sessions.is_cancelled() || self.stop.now.is_cancelled()
    }

    /// Datagrams of `stride` bytes from `client`, read together (GRO): passed on in one
    /// send (GSO) if the client has a session that takes them so (no header on each
    /// datagram, no rate or request count to check one by one). Whether it did.
    fn segments(&mut self, data: &[u8], stride: usize, client: SocketAddr) -> bool {
        let Some(b) = self.sessions.get(&client) else {
            return false;
        };
        if b.up.closed.load(Relaxed)
            || b.header.is_some()
            || b.check_each
            || b.requests.is_some()
            || !self.listening.gso()
        {
            return false;
        }
        let k = segments(data.len(), stride);
        let up = &b.up;
        up.datagrams.fetch_add(k, Relaxed);
        up.bytes.fetch_add(data.len() as u64, Relaxed);
        up.last_ms.store(millis(b.started.elapsed()), Relaxed);
        self.listening.queue(
            &*self.report,
            To::Server(b.server.clone()),
            &[data],
            Some(stride),
            client,
            Direction::Up,
        );
        true
    }

    /// A datagram from `client`, sent to `dst` (when the socket is bound to a wildcard),
    /// which came in on interface `ifindex`.
    fn datagram(
        &mut self,
        data: &[u8],
        client: SocketAddr,
        dst: Option<IpAddr>,
        ifindex: Option<u32>,
    ) {
        let n = data.len();
        if self
            .sessions
            .get(&client)
            .is_some_and(|b| b.up.closed.load(Relaxed))
        {
            self.sessions.remove(&client);
        }
        if let Some(b) = self.sessions.get(&client) {
            if b.check_each && !self.route.pass(client) {
                self.report.dropped(client, Dropped::Rate);
                return;
            }
            let up = &b.up;
            let count = up.datagrams.fetch_add(1, Relaxed) + 1;
            up.bytes.fetch_add(n as u64, Relaxed);
            up.last_ms.store(millis(b.started.elapsed()), Relaxed);
            let to = To::Server(b.server.clone());
            match b.header.as_deref() {
                Some(h) => {
                    self.listening
                        .queue(&*self.report, to, &[h, data], None, client, Direction::Up)
                }
                None => {
                    self.listening
                        .queue(&*self.report, to, &[data], None, client, Direction::Up)
                }
            }
            if b.requests.is_some_and(|r| count >= u64::from(r)) {
                self.sessions.remove(&client);
            }
            return;
        }
        if self.stopping() {
            self.report.dropped(client, Dropped::Stopping);
            return;
        }
        let local = SocketAddr::new(
            dst.unwrap_or(self.listening.local.ip()),
            self.listening.local.port(),
        );
        let a = match self.route.admit(client, local) {
            Ok(a) => a,
            Err(why) => {
                self.report.dropped(client, why);
                return;
            }
        };
        let settings = a.settings;
        let server = match connect(a.server) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.report.ended(Ended {
                    client,
                    server: a.server,
                    guard: a.guard,
                    started: SystemTime::now(),
                    duration: Duration::ZERO,
                    datagrams_up: 0,
                    datagrams_down: 0,
                    bytes_up: 0,
                    bytes_down: 0,
                    datagrams_kernel: 0,
                    outcome: Outcome::ConnectFailed,
                    reason: Some(e.to_string()),
                });
                return;
            }
        };
        let kernel = self
            .kernel_plan(&a, client, local, ifindex, &server)
            .map_or(KernelPath::Off, KernelPath::Planned);
        let up = Arc::new(Up::default());
        up.datagrams.store(1, Relaxed);
        up.bytes.store(n as u64, Relaxed);
        let id = self.next_id;
        self.next_id += 1;
        let started = Instant::now();
        let started_at = SystemTime::now();
        let (first, every) = match a.header {
            Some((h, every)) => (Some(h), every),
            None => (None, false),
        };
        let to = To::Server(server.clone());
        match first.as_deref() {
            Some(h) => {
                self.listening
                    .queue(&*self.report, to, &[h, data], None, client, Direction::Up)
            }
            None => self
                .listening
                .queue(&*self.report, to, &[data], None, client, Direction::Up),
        }
        let mut session = Session {
            client,
            dst,
            server: server.clone(),
            listening: self.listening.clone(),
            up: up.clone(),
            started,
            settings,
            kernel,
        };
        let unbound = settings.requests.is_some_and(|r| r <= 1);
        if !unbound {
            self.sessions.insert(
                client,
                Binding {
                    server,
                    up,
                    started,
                    id,
                    header: first.filter(|_| every).map(Vec::into_boxed_slice),
                    requests: settings.requests,
                    check_each: a.check_each,
                },
            );
        }
        self.live += 1;
        let report = self.report.clone();
        let ended_tx = self.ended.0.clone();
        let stop = self.stop.clone();
        let server_addr = a.server;
        let guard = a.guard;
        tokio::spawn(async move {
            // In place: the task's future holds the session once.
            let (end, counts) = session.run(&*report, &stop).await;
            // Its socket closes before its record goes out.
            drop(session);
            report.ended(Ended {
                client,
                server: server_addr,
                guard,
                started: started_at,
                duration: started.elapsed(),
                datagrams_up: counts.0,
                datagrams_down: counts.1,
                bytes_up: counts.2,
                bytes_down: counts.3,
                datagrams_kernel: counts.4,
                outcome: end.0,
                reason: end.1,
            });
            let _ = ended_tx.send((client, id));
        });
    }
}

impl<R: Route, P> Serving<R, P> {
    /// Whether the kernel may relay a new session, once its server has answered: the
    /// listener has the kernel's path, and every datagram passes unchanged and uncounted
    /// one by one (no PROXY header, datagram rate, `requests` or `responses`), client and
    /// server of one address family.
    fn kernel_plan(
        &self,
        a: &Admitted<R::Guard>,
        client: SocketAddr,
        local: SocketAddr,
        ifindex: Option<u32>,
        server: &Socket,
    ) -> Option<KernelPlan> {
        let (kernel, listener) = self.listening.kernel.as_ref()?;
        let s = &a.settings;
        if a.header.is_some() || a.check_each || s.responses.is_some() || s.requests.is_some() {
            return None;
        }
        // Unicast both ends (a datagram to a broadcast address has no one reply source).
        let unicast = |a: SocketAddr| match a.ip().to_canonical() {
            IpAddr::V4(ip) => !(ip.is_broadcast() || ip.is_multicast() || ip.is_unspecified()),
            IpAddr::V6(ip) => !(ip.is_multicast() || ip.is_unspecified()),
        };
        if !unicast(client) || !unicast(local) {
            return None;
        }
        // A datagram is rewritten, not translated: client and server of one family.
        if client.ip().to_canonical().is_ipv4() != a.server.ip().to_canonical().is_ipv4() {
            return None;
        }
        let up = Flow::new(client, local)?;
        let down_to = Flow::new(local, client)?;
        // 0: the datagram was queued before the socket was asked for its interface.
        let client_if = ifindex.filter(|&i| i != 0)?;
        // The first reply tells where the server's datagrams come in.
        crate::net::receive_pktinfo(server.get_ref(), a.server, true).ok()?;
        Some(KernelPlan {
            kernel: kernel.clone(),
            listener: *listener,
            up,
            down_to,
            client_if,
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A socket of the server's address family connected to `server`, registered with the
/// current runtime.
fn connect(server: SocketAddr) -> io::Result<Socket> {
    let any: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(server)?;
    s.set_nonblocking(true)?;
    crate::net::register_readable(s)
}

/// One session's task: replies back to the client until it ends.
struct Session {
    client: SocketAddr,
    /// Where the client sent to (a wildcard listener): replies leave from there.
    dst: Option<IpAddr>,
    server: Arc<Socket>,
    listening: Arc<Listening>,
    up: Arc<Up>,
    started: Instant,
    settings: Settings,
    /// Relayed by the kernel once the server has answered.
    kernel: KernelPath,
}

/// Where a session stands with the kernel's path.
enum KernelPath {
    /// Not for the kernel, or no longer.
    Off,
    /// To be handed to the kernel at the first reply.
    Planned(KernelPlan),
    /// In the kernel's path.
    In(InKernel),
}

/// (datagrams up, datagrams down, bytes up, bytes down, datagrams either way the kernel
/// relayed)
type Counts = (u64, u64, u64, u64, u64);

/// A session the kernel may relay once its server has answered: its client's datagrams to
/// the listener (`up`), and their interface; replies become `down_to`.
struct KernelPlan {
    kernel: Arc<Kernel>,
    listener: u32,
    up: Flow,
    down_to: Flow,
    client_if: u32,
}

/// A session in the kernel's path: its two entries, and their counts read so far.
struct InKernel {
    kernel: Arc<Kernel>,
    up: Flow,
    down: Flow,
    /// (datagrams up, bytes up, datagrams down, bytes down)
    read: [u64; 4],
    /// When the kernel last relayed one of its datagrams, in milliseconds since the
    /// session started.
    last_ms: u64,
    /// The entries are gone.
    taken: bool,
}

/// A session's entries go with it, however its task ends: a stale one would go on
/// relaying for a session that is over.
impl Drop for InKernel {
    fn drop(&mut self) {
        if !self.taken {
            let _ = self.kernel.take(&self.up);
            let _ = self.kernel.take(&self.down);
        }
    }
}

impl KernelPlan {
    /// Hands the session to the kernel: its server `server` answers from interface
    /// `server_if` to `sock`.
    fn install(&self, sock: &Socket, server: SocketAddr, server_if: u32) -> Option<InKernel> {
        let local = sock.get_ref().local_addr().ok()?;
        let down = Flow::new(server, local)?;
        let up_to = Flow::new(local, server)?;
        let k = &self.kernel;
        let (l, client_if) = (self.listener, self.client_if);
        let down_rw = Rewrite::new(server_if, self.down_to, client_if, l, Direction::Down);
        k.insert(&down, &down_rw).ok()?;
        let up_rw = Rewrite::new(client_if, up_to, server_if, l, Direction::Up);
        if k.insert(&self.up, &up_rw).is_err() {
            let _ = k.take(&down);
            return None;
        }
        tracing::debug!(up = ?self.up, %local, %server, server_if, client_if, "UDP session in the kernel");
        Some(InKernel {
            kernel: k.clone(),
            up: self.up,
            down,
            read: [0; 4],
            last_ms: 0,
            taken: false,
        })
    }
}

impl InKernel {
    /// Reads the kernel's counts and when it last relayed a datagram of the session (or,
    /// with `end`, takes the entries with their last counts).
    fn read(&mut self, started: Instant, end: bool) {
        let get = |f: &Flow| {
            let r = if end {
                self.kernel.take(f)
            } else {
                self.kernel.get(f)
            };
            if let Err(e) = &r {
                tracing::warn!(flow = ?f, "UDP session's entry in the kernel: {e}");
            }
            r
        };
        // An entry that cannot be read keeps its counts so far.
        let (up, down) = (get(&self.up).ok(), get(&self.down).ok());
        self.taken |= end;
        let r = self.read;
        self.read = [
            up.map_or(r[0], |e| e.datagrams),
            up.map_or(r[1], |e| e.bytes),
            down.map_or(r[2], |e| e.datagrams),
            down.map_or(r[3], |e| e.bytes),
        ];
        let last_ns = up
            .map_or(0, |e| e.last_ns)
            .max(down.map_or(0, |e| e.last_ns));
        if last_ns > 0 {
            let ago = Duration::from_nanos(kernel::monotonic_ns().saturating_sub(last_ns));
            self.last_ms = self
                .last_ms
                .max(millis(started.elapsed().saturating_sub(ago)));
        }
    }
}

impl Session {
    async fn run<G>(
        &mut self,
        report: &impl Report<G>,
        stop: &Stop,
    ) -> ((Outcome, Option<String>), Counts) {
        let (mut down, mut down_bytes) = (0u64, 0u64);
        let mut gro = false;
        let mut last_down_ms = 0u64;
        // What the kernel relayed before the session left it (a hand-over).
        let mut kernel_counts = [0; 4];
        let mut stop_seen = false;
        let idle = self.settings.idle_timeout;
        // One timer for the session's life, moved only when its deadline does.
        let sleep = tokio::time::sleep_until(after(self.started, idle));
        tokio::pin!(sleep);
        let end = loop {
            // Idle since the later of the last datagram each way, through ferry or (read
            // on each wake-up below) through the kernel.
            let last = self.up.last_ms.load(Relaxed).max(last_down_ms);
            let since = |ms: u64| after(self.started + Duration::from_millis(ms), idle);
            let in_kernel = match &self.kernel {
                KernelPath::In(k) => k.last_ms,
                _ => 0,
            };
            let mut deadline = since(last.max(in_kernel));
            let now = Instant::now();
            if now >= deadline
                && let KernelPath::In(k) = &mut self.kernel
            {
                // The kernel's latest first.
                k.read(self.started, false);
                deadline = since(last.max(k.last_ms));
            }
            if now >= deadline {
                break (Outcome::IdleTimeout, None);
            }
            if self.done(down) {
                break (Outcome::Ok, None);
            }
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                () = stop.now.cancelled() => break (Outcome::Drained, None),
                () = &mut sleep => continue,
                // Handed over to a new process: the client's datagrams are to reach its
                // socket, not this session, which ends when they stop.
                () = stop.sessions.cancelled(), if matches!(self.kernel, KernelPath::In(_)) && !stop_seen => {
                    if crate::upgrade::handed_over()
                        && let KernelPath::In(k) = &mut self.kernel
                    {
                        k.read(self.started, true);
                        kernel_counts = k.read;
                        self.kernel = KernelPath::Off;
                    } else {
                        // A drain or a removed listener: the session goes on as it is
                        // until it ends.
                        stop_seen = true;
                    }
                    continue;
                }
                // ERROR too: an ICMP error (port unreachable) makes the socket neither
                // readable nor writable, only erroneous.
                r = self.server.ready(Interest::READABLE | Interest::ERROR) => match r {
                    Ok(mut ready) if ready.ready().is_error() => {
                        if let Ok(Some(e)) = self.server.get_ref().take_error() {
                            break (Outcome::ConnectFailed, Some(e.to_string()));
                        }
                        // Nothing pending after all: forget the error readiness.
                        ready.clear_ready_matching(tokio::io::Ready::ERROR);
                    }
                    Ok(_) => {}
                    Err(e) => break (Outcome::ConnectFailed, Some(e.to_string())),
                }
            }
            // Everything waiting, each datagram queued as it is read.
            let mut queued = false;
            let r = REPLY.with_borrow_mut(|buf| {
                let mut meta = [RecvMeta::default(); REPLY_BATCH];
                loop {
                    let mut slices: [IoSliceMut<'_>; REPLY_BATCH] = {
                        let mut chunks = buf.chunks_mut(MAX_DATAGRAM);
                        std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()))
                    };
                    let l = &self.listening;
                    let n = recv_batch(&self.server, &l.state, &mut slices, &mut meta)?;
                    for (m, data) in meta.iter().zip(slices.iter()).take(n) {
                        // The server has answered: the kernel can relay the rest (unless
                        // its map is full, say: then the sockets do, as before). Before
                        // this reply is queued, so the client's next datagram finds it.
                        // Tried once, at the first reply that says where it came in.
                        if let Some(server_if) = m.interface_index.filter(|&i| i != 0)
                            && let KernelPath::Planned(p) = &self.kernel
                            && let Ok(server) = self.server.get_ref().peer_addr()
                        {
                            let next = p.install(&self.server, server, server_if);
                            self.kernel = next.map_or(KernelPath::Off, KernelPath::In);
                        }
                        let data = &data[..m.len];
                        // Coalesced replies (GRO) go on in one send (GSO).
                        let stride = (m.stride < m.len).then_some(m.stride);
                        let k = stride.map_or(1, |st| segments(m.len, st));
                        down += k;
                        down_bytes += data.len() as u64;
                        // Sent with the round's others; one that cannot be sent then is
                        // dropped, and the client retries.
                        let to = || To::Client {
                            addr: self.client,
                            src: self.dst.filter(|_| l.wildcard),
                        };
                        match stride {
                            // The socket's GSO sends failed: the datagrams go one by one.
                            Some(st) if !l.gso() => {
                                for d in data.chunks(st) {
                                    l.queue(report, to(), &[d], None, self.client, Direction::Down);
                                }
                            }
                            _ => {
                                l.queue(report, to(), &[data], stride, self.client, Direction::Down)
                            }
                        }
                        queued = true;
                    }
                    if n < REPLY_BATCH {
                        return Ok::<(), io::Error>(());
                    }
                }
            });
            if queued {
                self.listening.queued.notify_one();
            }
            last_down_ms = millis(self.started.elapsed());
            if !gro && down >= GRO_AFTER && self.listening.gso() {
                // A bulk flow: from here on its replies come coalesced. Without it they
                // come one by one, as before.
                gro = crate::net::enable_udp_gro(&*self.server).is_ok();
            }
            if let Err(e) = r {
                // ICMP port unreachable (ECONNREFUSED) and the like: the server is not there.
                break (Outcome::ConnectFailed, Some(e.to_string()));
            }
        };
        // The kernel's last counts, its entries gone: the client's datagrams come to the
        // listening socket again.
        let mut k = kernel_counts;
        if let KernelPath::In(ik) = &mut self.kernel {
            ik.read(self.started, true);
            k = ik.read;
        }
        // From here on the listening socket starts a new session for this client.
        self.up.closed.store(true, Relaxed);
        let up = (self.up.datagrams.load(Relaxed), self.up.bytes.load(Relaxed));
        (
            end,
            (
                up.0 + k[0],
                down + k[2],
                up.1 + k[1],
                down_bytes + k[3],
                k[0] + k[2],
            ),
        )
    }

    /// With `responses`, every reply the client's datagrams so far asked for is in.
    fn done(&self, down: u64) -> bool {
        let Some(per) = self.settings.responses else {
            return false;
        };
        let up = self.up.datagrams.load(Relaxed);
        up > 0 && down >= up.saturating_mul(u64::from(per))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn_udp::Transmit;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::UdpSocket;

    /// Routes every session to one server, up to `limit` at once, and counts them.
    struct To {
        server: SocketAddr,
        settings: Settings,
        limit: usize,
        header: Option<bool>,
        started: AtomicUsize,
        active: Arc<AtomicUsize>,
    }

    /// A session's place under `To`'s limit.
    #[derive(Debug)]
    struct Held(Arc<AtomicUsize>);

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Relaxed);
        }
    }

    impl Route for To {
        type Guard = Held;
        fn admit(&self, client: SocketAddr, local: SocketAddr) -> Result<Admitted<Held>, Dropped> {
            if self.active.load(Relaxed) >= self.limit {
                return Err(Dropped::SessionLimit);
            }
            self.active.fetch_add(1, Relaxed);
            self.started.fetch_add(1, Relaxed);
            Ok(Admitted {
                server: self.server,
                guard: Held(self.active.clone()),
                settings: self.settings,
                header: self
                    .header
                    .map(|every| (crate::wire::proxy::encode_datagram(client, local), every)),
                check_each: false,
            })
        }
    }

    #[derive(Default)]
    struct Log {
        ended: Mutex<Vec<Ended<Held>>>,
        dropped: Mutex<Vec<Dropped>>,
        relayed: AtomicU64,
        /// Sends up, and down.
        sends: [AtomicU64; 2],
    }

    impl Report<Held> for Log {
        fn ended(&self, session: Ended<Held>) {
            self.ended.lock().unwrap().push(session);
        }
        fn dropped(&self, _client: SocketAddr, why: Dropped) {
            self.dropped.lock().unwrap().push(why);
        }
        fn relayed(&self, way: Direction, _datagrams: u64, _bytes: usize) {
            self.relayed.fetch_add(1, Relaxed);
            self.sends[way as usize].fetch_add(1, Relaxed);
        }
    }

    impl Log {
        fn outcomes(&self) -> Vec<Outcome> {
            self.ended
                .lock()
                .unwrap()
                .iter()
                .map(|e| e.outcome)
                .collect()
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    /// A UDP echo server on `ip`.
    async fn echo(ip: &str) -> SocketAddr {
        let s = UdpSocket::bind((ip, 0)).await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    struct Running {
        addr: SocketAddr,
        route: Arc<To>,
        log: Arc<Log>,
        stop: Stop,
        served: tokio::task::JoinHandle<()>,
    }

    impl Running {
        fn sessions(&self) -> usize {
            self.route.started.load(Relaxed)
        }
    }

    thread_local! {
        /// How the sockets `start` serves send (`[global] io_uring`).
        static IO_URING: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
    }

    async fn start(ip: &str, server: SocketAddr, settings: Settings) -> Running {
        start_with(ip, server, settings, usize::MAX, None).await
    }

    async fn start_with(
        ip: &str,
        server: SocketAddr,
        settings: Settings,
        limit: usize,
        header: Option<bool>,
    ) -> Running {
        let sock = std::net::UdpSocket::bind((ip, 0)).unwrap();
        let listening = Arc::new(Listening::new(sock, IO_URING.get(), None).unwrap());
        assert_eq!(
            listening.uses_io_uring(),
            IO_URING.get() && outbox::tests::io_uring_available()
        );
        let addr = listening.local_addr();
        let route = Arc::new(To {
            server,
            settings,
            limit,
            header,
            started: AtomicUsize::new(0),
            active: Arc::new(AtomicUsize::new(0)),
        });
        let log = Arc::new(Log::default());
        let stop = Stop::default();
        let served = tokio::spawn(serve(listening, route.clone(), log.clone(), stop.clone()));
        Running {
            addr,
            route,
            log,
            stop,
            served,
        }
    }

    fn settings() -> Settings {
        Settings {
            idle_timeout: Duration::from_secs(30),
            responses: None,
            requests: None,
        }
    }

    async fn client(ip: &str, to: SocketAddr) -> UdpSocket {
        let c = UdpSocket::bind((ip, 0)).await.unwrap();
        c.connect(to).await.unwrap();
        c
    }

    async fn round_trip(c: &UdpSocket, msg: &[u8]) {
        c.send(msg).await.unwrap();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = tokio::time::timeout(WAIT, c.recv(&mut buf))
            .await
            .expect("a reply")
            .unwrap();
        assert_eq!(&buf[..n], msg);
    }

    /// Waits (bounded) until `n` sessions have ended.
    async fn ended(log: &Log, n: usize) {
        for _ in 0..1000 {
            if log.ended.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{} sessions ended, not {n}",
            log.ended.lock().unwrap().len()
        );
    }

    /// 10 clients × 100 datagrams of 1 to 1,400 bytes: every one comes back unchanged to
    /// its sender, with one session (one server socket) per client; at the stop each ends
    /// `drained` with its counts.
    #[tokio::test]
    async fn datagrams_come_back_unchanged_with_one_session_per_client() {
        // Sent through io_uring, then with sendmmsg.
        for io_uring in [true, false] {
            IO_URING.set(io_uring);
            let r = start("127.0.0.1", echo("127.0.0.1").await, settings()).await;
            let mut clients = Vec::new();
            for _ in 0..10 {
                clients.push(client("127.0.0.1", r.addr).await);
            }
            let mut sent = [0u64; 10];
            for i in 0..100usize {
                for (k, c) in clients.iter().enumerate() {
                    let len = 1 + (i * 37 + k * 101) % 1400;
                    let msg: Vec<u8> = (0..len).map(|j| (j + i + k) as u8).collect();
                    round_trip(c, &msg).await;
                    sent[k] += len as u64;
                }
            }
            assert_eq!(r.sessions(), 10, "one session per client");
            r.stop.now.cancel();
            ended(&r.log, 10).await;
            let ended = r.log.ended.lock().unwrap();
            for e in ended.iter() {
                assert_eq!(e.outcome, Outcome::Drained);
                assert_eq!((e.datagrams_up, e.datagrams_down), (100, 100));
                assert_eq!(e.bytes_up, e.bytes_down);
                let k = clients
                    .iter()
                    .position(|c| c.local_addr().unwrap() == e.client)
                    .unwrap();
                assert_eq!(e.bytes_up, sent[k]);
            }
            assert!(r.log.dropped.lock().unwrap().is_empty());
        }
    }

    /// `responses = 1` (DNS): each query is a session that ends `ok` at its reply.
    #[tokio::test]
    async fn responses_end_a_session_at_its_last_reply() {
        let s = Settings {
            responses: Some(1),
            ..settings()
        };
        let r = start("127.0.0.1", echo("127.0.0.1").await, s).await;
        let c = client("127.0.0.1", r.addr).await;
        for i in 0..3u8 {
            round_trip(&c, &[i; 40]).await;
            ended(&r.log, usize::from(i) + 1).await;
        }
        assert_eq!(r.sessions(), 3);
        assert_eq!(r.log.outcomes(), vec![Outcome::Ok; 3]);
        for e in r.log.ended.lock().unwrap().iter() {
            assert_eq!((e.datagrams_up, e.datagrams_down), (1, 1));
        }
    }

    /// `requests = 2`: the client's third datagram starts a second session.
    #[tokio::test]
    async fn requests_unbind_the_client_after_that_many_datagrams() {
        let s = Settings {
            requests: Some(2),
            ..settings()
        };
        let r = start("127.0.0.1", echo("127.0.0.1").await, s).await;
        let c = client("127.0.0.1", r.addr).await;
        for i in 0..4u8 {
            round_trip(&c, &[i; 10]).await;
        }
        assert_eq!(r.sessions(), 2);
    }

    /// Beyond the route's limit, a new client's datagram is dropped and counted, not
    /// answered.
    #[tokio::test]
    async fn a_session_beyond_the_limit_is_dropped() {
        let r = start_with("127.0.0.1", echo("127.0.0.1").await, settings(), 2, None).await;
        let (a, b) = (
            client("127.0.0.1", r.addr).await,
            client("127.0.0.1", r.addr).await,
        );
        round_trip(&a, b"a").await;
        round_trip(&b, b"b").await;
        let third = client("127.0.0.1", r.addr).await;
        third.send(b"c").await.unwrap();
        // The drop is reported once the datagram is taken; then the others still work.
        dropped(&r.log, 1).await;
        assert_eq!(*r.log.dropped.lock().unwrap(), vec![Dropped::SessionLimit]);
        round_trip(&a, b"a again").await;
        let mut buf = [0u8; 16];
        assert!(
            third.try_recv(&mut buf).is_err(),
            "the third client got an answer"
        );
        assert_eq!(r.sessions(), 2);
    }

    /// Waits (bounded) until `n` datagrams have been dropped.
    async fn dropped(log: &Log, n: usize) {
        for _ in 0..1000 {
            if log.dropped.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{:?} dropped, not {n}", log.dropped.lock().unwrap());
    }

    /// Told to stop taking sessions, the socket still serves the sessions it has, drops a
    /// new client's datagrams, and returns once the last session has ended.
    #[tokio::test(start_paused = true)]
    async fn stopping_keeps_the_sessions_it_has_until_they_end() {
        let r = start("127.0.0.1", echo("127.0.0.1").await, settings()).await;
        let a = client("127.0.0.1", r.addr).await;
        round_trip(&a, b"before").await;
        r.stop.sessions.cancel();
        round_trip(&a, b"after").await;
        let b = client("127.0.0.1", r.addr).await;
        b.send(b"new").await.unwrap();
        dropped(&r.log, 1).await;
        assert_eq!(*r.log.dropped.lock().unwrap(), vec![Dropped::Stopping]);
        assert!(!r.served.is_finished());
        // The session's idle timeout ends it; then the socket is let go.
        tokio::time::timeout(Duration::from_secs(60), r.served)
            .await
            .expect("serve returns once its sessions have ended")
            .unwrap();
        assert_eq!(r.log.outcomes(), vec![Outcome::IdleTimeout]);
        assert_eq!(r.route.started.load(Relaxed), 1);
    }

    /// A listener bound to a wildcard address replies from the address each client sent
    /// to: a client whose socket is connected to 127.0.0.2 (and so takes datagrams from
    /// there only) gets its answers, and so does one of 127.0.0.3.
    #[tokio::test]
    async fn a_wildcard_listener_replies_from_the_address_sent_to() {
        // Sent through io_uring, then with sendmmsg.
        for io_uring in [true, false] {
            IO_URING.set(io_uring);
            let r = start("0.0.0.0", echo("127.0.0.1").await, settings()).await;
            for ip in ["127.0.0.2", "127.0.0.3"] {
                let to = SocketAddr::new(ip.parse().unwrap(), r.addr.port());
                let c = client("127.0.0.1", to).await;
                round_trip(&c, ip.as_bytes()).await;
            }
        }
    }

    /// A PROXY protocol v2 header (DGRAM, the client and the address it sent to) before the
    /// first datagram of a session, or before every one.
    #[tokio::test]
    async fn proxy_header_on_the_first_or_every_datagram() {
        // Sent through io_uring, then with sendmmsg.
        for io_uring in [true, false] {
            IO_URING.set(io_uring);
            for every in [false, true] {
                let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                let r = start_with(
                    "127.0.0.1",
                    server.local_addr().unwrap(),
                    settings(),
                    usize::MAX,
                    Some(every),
                )
                .await;
                let c = client("127.0.0.1", r.addr).await;
                let header = crate::wire::proxy::encode_datagram(c.local_addr().unwrap(), r.addr);
                let mut buf = vec![0u8; MAX_DATAGRAM];
                for (i, msg) in [&b"one"[..], b"two"].iter().enumerate() {
                    c.send(msg).await.unwrap();
                    let (n, _) = tokio::time::timeout(WAIT, server.recv_from(&mut buf))
                        .await
                        .expect("a datagram")
                        .unwrap();
                    let mut want = if i == 0 || every {
                        header.clone()
                    } else {
                        Vec::new()
                    };
                    want.extend_from_slice(msg);
                    assert_eq!(&buf[..n], &want[..], "every = {every}, datagram {i}");
                }
                // v2, PROXY; IPv4 over DGRAM (0x12); the client, and the address it sent to.
                assert_eq!((header[12], header[13]), (0x21, 0x12));
                use crate::wire::proxy::{Accept, Addresses, Parsed, parse};
                match parse(&header, Accept::V2) {
                    Parsed::Complete {
                        addresses:
                            Addresses::Proxied {
                                source,
                                destination,
                            },
                        ..
                    } => {
                        assert_eq!(source, c.local_addr().unwrap());
                        assert_eq!(destination, r.addr);
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
    }

    /// A session ends `idle_timeout` after the last datagram either way, not before.
    #[tokio::test(start_paused = true)]
    async fn idle_session_ends_at_its_timeout() {
        let r = start("127.0.0.1", echo("127.0.0.1").await, settings()).await;
        let c = client("127.0.0.1", r.addr).await;
        round_trip(&c, b"hello").await;
        tokio::time::sleep(Duration::from_millis(29_900)).await;
        assert!(
            r.log.ended.lock().unwrap().is_empty(),
            "ended before its timeout"
        );
        round_trip(&c, b"again").await;
        tokio::time::sleep(Duration::from_millis(29_900)).await;
        assert!(
            r.log.ended.lock().unwrap().is_empty(),
            "traffic did not re-arm it"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        ended(&r.log, 1).await;
        assert_eq!(r.log.outcomes(), vec![Outcome::IdleTimeout]);
        // The client's next datagram starts a new session.
        round_trip(&c, b"back").await;
        assert_eq!(r.sessions(), 2);
    }

    /// A server that is not there (ICMP port unreachable) ends the session as
    /// `connect_failed`, with the error.
    #[tokio::test]
    async fn unreachable_server_ends_the_session() {
        // Sent through io_uring, then with sendmmsg.
        for io_uring in [true, false] {
            IO_URING.set(io_uring);
            let gone = std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let r = start("127.0.0.1", gone, settings()).await;
            let c = client("127.0.0.1", r.addr).await;
            c.send(b"anyone?").await.unwrap();
            ended(&r.log, 1).await;
            let e = &r.log.ended.lock().unwrap()[0];
            assert_eq!(e.outcome, Outcome::ConnectFailed);
            assert!(
                e.reason.as_deref().unwrap_or("").contains("refused"),
                "{e:?}"
            );
        }
    }

    /// A burst of replies to one datagram (as many as the session's socket buffer holds):
    /// every one reaches the client, in order, with either way of sending.
    #[tokio::test]
    async fn a_burst_of_replies_reaches_the_client_whole() {
        const REPLIES: u32 = 150;
        for io_uring in [true, false] {
            IO_URING.set(io_uring);
            let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let server_addr = server.local_addr().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                if let Ok((_, from)) = server.recv_from(&mut buf) {
                    for i in 0..REPLIES {
                        let _ = server.send_to(&i.to_be_bytes(), from);
                    }
                }
            });
            let r = start("127.0.0.1", server_addr, settings()).await;
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket2::SockRef::from(&c)
                .set_recv_buffer_size(4 << 20)
                .unwrap();
            c.connect(r.addr).unwrap();
            let c = UdpSocket::from_std({
                c.set_nonblocking(true).unwrap();
                c
            })
            .unwrap();
            c.send(b"go").await.unwrap();
            let mut buf = [0u8; 64];
            for i in 0..REPLIES {
                let n = tokio::time::timeout(WAIT, c.recv(&mut buf))
                    .await
                    .expect("every reply within the bound")
                    .unwrap();
                assert_eq!(&buf[..n], i.to_be_bytes(), "{io_uring}: reply {i}");
            }
        }
    }

    /// The largest IPv4 datagram, and IPv6.
    #[tokio::test]
    async fn largest_datagram_and_ipv6() {
        // Sent through io_uring, then with sendmmsg.
        for io_uring in [true, false] {
            IO_URING.set(io_uring);
            let r = start("127.0.0.1", echo("127.0.0.1").await, settings()).await;
            let c = client("127.0.0.1", r.addr).await;
            let big: Vec<u8> = (0..65_507usize).map(|i| (i % 251) as u8).collect();
            round_trip(&c, &big).await;
            let r6 = start("::1", echo("::1").await, settings()).await;
            let c6 = client("::1", r6.addr).await;
            round_trip(&c6, b"over IPv6").await;
            round_trip(&c6, &big[..65_000]).await;
        }
    }

    /// A GSO batch of equal datagrams from a client arrives coalesced at the listening
    /// socket (GRO) and goes on to the server in one send (GSO), which gets every datagram
    /// whole; once a session has had enough replies, its socket coalesces them too, and
    /// they go back to the client in one send each. Every datagram arrives, in order.
    #[tokio::test]
    async fn coalesced_datagrams_pass_in_one_send_each_way() {
        // Sent through io_uring, then with sendmmsg.
        for io_uring in [true, false] {
            IO_URING.set(io_uring);
            // A server that answers each read with one GSO send of the same datagrams.
            let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            server.set_nonblocking(true).unwrap();
            let server_addr = server.local_addr().unwrap();
            let sstate = UdpSocketState::new(UdpSockRef::from(&server)).unwrap();
            if sstate.max_gso_segments() <= 1 {
                // No UDP GSO in this kernel: the path is not taken (and not testable).
                return;
            }
            let server = crate::net::register_readable(server).unwrap();
            let received = Arc::new(AtomicU64::new(0));
            let got = received.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; MAX_DATAGRAM];
                let mut meta = [RecvMeta::default(); 1];
                loop {
                    if server.readable().await.is_err() {
                        return;
                    }
                    let mut slices = [IoSliceMut::new(&mut buf)];
                    let Ok(n) = recv_batch(&server, &sstate, &mut slices, &mut meta) else {
                        continue;
                    };
                    if n == 0 {
                        continue;
                    }
                    let m = meta[0];
                    got.fetch_add(segments(m.len, m.stride), Relaxed);
                    let t = Transmit {
                        destination: m.addr,
                        ecn: None,
                        contents: &buf[..m.len],
                        segment_size: (m.stride < m.len).then_some(m.stride),
                        src_ip: None,
                    };
                    let _ = sstate.try_send(UdpSockRef::from(server.get_ref()), &t);
                }
            });
            let r = start("127.0.0.1", server_addr, settings()).await;
            let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            c.connect(r.addr).unwrap();
            c.set_nonblocking(true).unwrap();
            let cstate = UdpSocketState::new(UdpSockRef::from(&c)).unwrap();
            let c = crate::net::register_readable(c).unwrap();
            const SIZE: usize = 1000;
            const PER_SEND: usize = 10;
            const SENDS: usize = 10;
            let mut next = 0u32;
            let mut expect = 0u32;
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let mut meta = [RecvMeta::default(); 1];
            for _ in 0..SENDS {
                let mut batch = Vec::with_capacity(SIZE * PER_SEND);
                for _ in 0..PER_SEND {
                    let mut d = [0u8; SIZE];
                    d[..4].copy_from_slice(&next.to_be_bytes());
                    batch.extend_from_slice(&d);
                    next += 1;
                }
                let t = Transmit {
                    destination: r.addr,
                    ecn: None,
                    contents: &batch,
                    segment_size: Some(SIZE),
                    src_ip: None,
                };
                cstate.try_send(UdpSockRef::from(c.get_ref()), &t).unwrap();
                // Every datagram back, in order, whole.
                while expect < next {
                    let _ready = tokio::time::timeout(WAIT, c.readable())
                        .await
                        .unwrap()
                        .unwrap();
                    let mut slices = [IoSliceMut::new(&mut buf)];
                    let n = recv_batch(&c, &cstate, &mut slices, &mut meta).unwrap();
                    if n == 0 {
                        continue;
                    }
                    let m = meta[0];
                    for d in buf[..m.len].chunks(m.stride) {
                        assert_eq!(d.len(), SIZE);
                        assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), expect);
                        expect += 1;
                    }
                }
            }
            let total = (SIZE * PER_SEND * SENDS) as u64;
            assert_eq!(received.load(Relaxed), total / SIZE as u64);
            assert_eq!(r.sessions(), 1);
            // Up, one send per batch (but the first, which starts the session and goes one by
            // one); down, one per reply until the session's socket coalesces them (after
            // GRO_AFTER replies), then one per batch.
            let up = r.log.sends[Direction::Up as usize].load(Relaxed);
            let down = r.log.sends[Direction::Down as usize].load(Relaxed);
            assert_eq!(up, (PER_SEND + SENDS - 1) as u64, "sends up");
            assert!(
                down <= GRO_AFTER + SENDS as u64 && down < total / SIZE as u64,
                "{down} sends down for {} datagrams",
                total / SIZE as u64
            );
        }
    }
}
