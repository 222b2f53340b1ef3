//! UDP listeners: one session per client address (IP and port), relaying datagrams
//! unchanged between the client and one server.
//!
//! A worker serves each of its listening sockets with [`serve`]. The first datagram from a
//! client address asks the listener's [`Route`] for a server (the pool's balancer, so every
//! `balance` applies and a session counts as a connection on its server), opens a socket
//! connected to that server, and spawns the session's task, which passes replies back to
//! the client from the listening socket. Later datagrams from that address go straight to
//! the session's socket. With `SO_REUSEPORT`, the kernel hashes a client's datagrams to the
//! same socket every time, so each worker's session table is its own: no lock is shared.
//!
//! A session ends after `idle_timeout` without a datagram either way; with `responses = N`,
//! once it has had N replies for every datagram the client sent (DNS: 1), which is `ok`;
//! with `requests = N`, the client's address is unbound after N datagrams (its next
//! datagram starts a new session), and the session ends when its replies are in or at its
//! idle timeout. A server that answers with ICMP port unreachable ends it as
//! `connect_failed`.
//!
//! Datagrams are received into one buffer per listening socket and one per worker thread
//! for replies, each large enough for any UDP datagram (so none is ever truncated), and
//! sent on at once: nothing is allocated per datagram, and a datagram the other side
//! cannot take now (its socket buffer is full) is dropped and counted, as a router would.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::after;
use crate::observe::Outcome;

/// Large enough for any UDP payload (IPv4: 65,507 bytes; IPv6 without jumbograms: 65,527).
pub const MAX_DATAGRAM: usize = 65_536;

thread_local! {
    /// Replies are read here and sent on at once.
    static REPLY: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_DATAGRAM].into_boxed_slice());
}

/// A UDP listener's session settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// No datagram either way for this long ends a session.
    pub idle_timeout: Duration,
    /// Replies expected per client datagram: when all are in, the session ends (`ok`).
    pub responses: Option<u32>,
    /// Client datagrams per session: after this many, the client's next datagram starts a
    /// new session.
    pub requests: Option<u32>,
    /// Sessions at once on one listening socket; a datagram that would start another is
    /// dropped.
    pub max_sessions: usize,
}

/// Why a datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// It would have started a session beyond `max_sessions`.
    SessionLimit,
    /// No server for a new session (the route refused; it says why).
    NoServer,
    /// The socket it was to leave by had no room for it.
    Full,
    /// Sending it failed.
    SendFailed,
}

/// Picks the server for a new session; what it returns is held for the session's life
/// (a pool's server guard: the session counts as a connection on its server).
pub trait Route: Send + Sync + 'static {
    type Guard: Send + 'static;
    /// The server for a session of `client`, or why there is none.
    fn route(&self, client: SocketAddr) -> Result<(SocketAddr, Self::Guard), Outcome>;
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
    pub outcome: Outcome,
    /// More about the outcome (the error of a failed server socket).
    pub reason: Option<String>,
}

/// What a listening socket's sessions report: each ended session, and each datagram
/// dropped. Called on the worker that serves the socket.
pub trait Report<G>: Send + Sync + 'static {
    fn ended(&self, session: Ended<G>);
    fn dropped(&self, why: Dropped);
    /// A session of `client` could not start: no server (`outcome` says why).
    fn refused(&self, client: SocketAddr, outcome: Outcome);
}

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
    server: Arc<UdpSocket>,
    up: Arc<Up>,
    started: Instant,
    /// Tells the session's end from a later session of the same address.
    id: u64,
}

/// Serves one listening socket until `stop`: sessions are created, fed and ended as above.
/// Returns when `stop` is cancelled; the sessions end then too (`drained`).
pub async fn serve<R: Route, P: Report<R::Guard>>(
    sock: Arc<UdpSocket>,
    settings: Settings,
    route: Arc<R>,
    report: Arc<P>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM].into_boxed_slice();
    let mut sessions: HashMap<SocketAddr, Binding> = HashMap::new();
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut next_id = 0u64;
    loop {
        let (n, client) = tokio::select! {
            biased;
            () = stop.cancelled() => return,
            Some((client, id)) = ended_rx.recv() => {
                if sessions.get(&client).is_some_and(|b| b.id == id) {
                    sessions.remove(&client);
                }
                continue;
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // An ICMP error for an earlier reply, or a transient failure: the socket
                // itself goes on.
                Err(_) => continue,
            },
        };
        let data = &buf[..n];
        if sessions
            .get(&client)
            .is_some_and(|b| b.up.closed.load(Relaxed))
        {
            sessions.remove(&client);
        }
        if let Some(b) = sessions.get(&client) {
            let up = &b.up;
            let count = up.datagrams.fetch_add(1, Relaxed) + 1;
            up.bytes.fetch_add(n as u64, Relaxed);
            up.last_ms.store(millis(b.started.elapsed()), Relaxed);
            if let Err(why) = send(&b.server, data) {
                report.dropped(why);
            }
            if settings.requests.is_some_and(|r| count >= u64::from(r)) {
                sessions.remove(&client);
            }
            continue;
        }
        if sessions.len() >= settings.max_sessions {
            report.dropped(Dropped::SessionLimit);
            continue;
        }
        let (server_addr, guard) = match route.route(client) {
            Ok(r) => r,
            Err(outcome) => {
                report.refused(client, outcome);
                report.dropped(Dropped::NoServer);
                continue;
            }
        };
        let server = match connect(server_addr) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                report.ended(Ended {
                    client,
                    server: server_addr,
                    guard,
                    started: SystemTime::now(),
                    duration: Duration::ZERO,
                    datagrams_up: 0,
                    datagrams_down: 0,
                    bytes_up: 0,
                    bytes_down: 0,
                    outcome: Outcome::ConnectFailed,
                    reason: Some(e.to_string()),
                });
                continue;
            }
        };
        let up = Arc::new(Up::default());
        up.datagrams.store(1, Relaxed);
        up.bytes.store(n as u64, Relaxed);
        let id = next_id;
        next_id += 1;
        let started = Instant::now();
        let started_at = SystemTime::now();
        if let Err(why) = send(&server, data) {
            report.dropped(why);
        }
        let session = Session {
            client,
            server: server.clone(),
            listener: sock.clone(),
            up: up.clone(),
            started,
            settings,
        };
        let unbound = settings.requests.is_some_and(|r| r <= 1);
        if !unbound {
            sessions.insert(
                client,
                Binding {
                    server,
                    up,
                    started,
                    id,
                },
            );
        }
        let report = report.clone();
        let ended_tx = ended_tx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let (end, counts) = session.run(&stop).await;
            let _ = ended_tx.send((client, id));
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
                outcome: end.0,
                reason: end.1,
            });
        });
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Sends `data` on a connected socket now, or says why not. A direct `send`: a datagram
/// that cannot go now is dropped, never waited for, so the reactor's idea of the socket's
/// writability (unknown on a socket just made) does not matter.
fn send(sock: &UdpSocket, data: &[u8]) -> Result<(), Dropped> {
    match socket2::SockRef::from(sock).send(data) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Dropped::Full),
        Err(_) => Err(Dropped::SendFailed),
    }
}

/// A socket of the server's address family connected to `server`, registered with the
/// current runtime.
fn connect(server: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any)?;
    s.connect(server)?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// One session's task: replies back to the client until it ends.
struct Session {
    client: SocketAddr,
    server: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    up: Arc<Up>,
    started: Instant,
    settings: Settings,
}

/// (datagrams up, datagrams down, bytes up, bytes down)
type Counts = (u64, u64, u64, u64);

impl Session {
    async fn run(self, stop: &CancellationToken) -> ((Outcome, Option<String>), Counts) {
        let (mut down, mut down_bytes) = (0u64, 0u64);
        let mut last_down_ms = 0u64;
        let idle = self.settings.idle_timeout;
        // One timer for the session's life, moved only when its deadline does.
        let sleep = tokio::time::sleep_until(after(self.started, idle));
        tokio::pin!(sleep);
        let end = loop {
            // Idle since the later of the last datagram each way.
            let last = self.up.last_ms.load(Relaxed).max(last_down_ms);
            let deadline = after(self.started + Duration::from_millis(last), idle);
            if Instant::now() >= deadline {
                break (Outcome::IdleTimeout, None);
            }
            if self.done(down) {
                break (Outcome::Ok, None);
            }
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                () = stop.cancelled() => break (Outcome::Drained, None),
                () = &mut sleep => continue,
                // ERROR too: an ICMP error (port unreachable) makes the socket neither
                // readable nor writable, only erroneous.
                r = self.server.ready(Interest::READABLE | Interest::ERROR) => match r {
                    Ok(ready) if ready.is_error() => {
                        if let Ok(Some(e)) = self.server.take_error() {
                            break (Outcome::ConnectFailed, Some(e.to_string()));
                        }
                        // Nothing pending after all: forget the error readiness.
                        let _ = self.server.try_io(Interest::ERROR, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                    }
                    Ok(_) => {}
                    Err(e) => break (Outcome::ConnectFailed, Some(e.to_string())),
                }
            }
            // Everything waiting, each datagram sent on as it is read.
            let r = REPLY.with_borrow_mut(|buf| {
                loop {
                    match self.server.try_recv(buf) {
                        Ok(n) => {
                            down += 1;
                            down_bytes += n as u64;
                            // A reply that cannot be sent now is dropped; the client retries.
                            let _ = socket2::SockRef::from(&*self.listener)
                                .send_to(&buf[..n], &self.client.into());
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                        Err(e) => return Err(e),
                    }
                }
            });
            last_down_ms = millis(self.started.elapsed());
            if let Err(e) = r {
                // ICMP port unreachable (ECONNREFUSED) and the like: the server is not there.
                break (Outcome::ConnectFailed, Some(e.to_string()));
            }
        };
        // From here on the listening socket starts a new session for this client.
        self.up.closed.store(true, Relaxed);
        let up = (self.up.datagrams.load(Relaxed), self.up.bytes.load(Relaxed));
        (end, (up.0, down, up.1, down_bytes))
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
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    /// Routes every session to one server and counts the sessions.
    struct To(SocketAddr, AtomicUsize);

    impl Route for To {
        type Guard = ();
        fn route(&self, _client: SocketAddr) -> Result<(SocketAddr, ()), Outcome> {
            self.1.fetch_add(1, Relaxed);
            Ok((self.0, ()))
        }
    }

    #[derive(Default)]
    struct Log {
        ended: Mutex<Vec<Ended<()>>>,
        dropped: Mutex<Vec<Dropped>>,
    }

    impl Report<()> for Log {
        fn ended(&self, session: Ended<()>) {
            self.ended.lock().unwrap().push(session);
        }
        fn dropped(&self, why: Dropped) {
            self.dropped.lock().unwrap().push(why);
        }
        fn refused(&self, _client: SocketAddr, _outcome: Outcome) {}
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
        stop: CancellationToken,
    }

    async fn start(ip: &str, server: SocketAddr, settings: Settings) -> Running {
        let sock = Arc::new(UdpSocket::bind((ip, 0)).await.unwrap());
        let addr = sock.local_addr().unwrap();
        let route = Arc::new(To(server, AtomicUsize::new(0)));
        let log = Arc::new(Log::default());
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            sock,
            settings,
            route.clone(),
            log.clone(),
            stop.clone(),
        ));
        Running {
            addr,
            route,
            log,
            stop,
        }
    }

    fn settings() -> Settings {
        Settings {
            idle_timeout: Duration::from_secs(30),
            responses: None,
            requests: None,
            max_sessions: 1000,
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
        assert_eq!(r.route.1.load(Relaxed), 10, "one session per client");
        r.stop.cancel();
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
        assert_eq!(r.route.1.load(Relaxed), 3);
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
        assert_eq!(r.route.1.load(Relaxed), 2);
    }

    /// Beyond `max_sessions`, a new client's datagram is dropped and counted, not answered.
    #[tokio::test]
    async fn a_session_beyond_the_limit_is_dropped() {
        let s = Settings {
            max_sessions: 2,
            ..settings()
        };
        let r = start("127.0.0.1", echo("127.0.0.1").await, s).await;
        let (a, b) = (
            client("127.0.0.1", r.addr).await,
            client("127.0.0.1", r.addr).await,
        );
        round_trip(&a, b"a").await;
        round_trip(&b, b"b").await;
        let third = client("127.0.0.1", r.addr).await;
        third.send(b"c").await.unwrap();
        // The drop is reported once the datagram is taken; then the others still work.
        for _ in 0..1000 {
            if !r.log.dropped.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*r.log.dropped.lock().unwrap(), vec![Dropped::SessionLimit]);
        round_trip(&a, b"a again").await;
        let mut buf = [0u8; 16];
        assert!(
            third.try_recv(&mut buf).is_err(),
            "the third client got an answer"
        );
        assert_eq!(r.route.1.load(Relaxed), 2);
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
        assert_eq!(r.route.1.load(Relaxed), 2);
    }

    /// A server that is not there (ICMP port unreachable) ends the session as
    /// `connect_failed`, with the error.
    #[tokio::test]
    async fn unreachable_server_ends_the_session() {
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

    /// The largest IPv4 datagram, and IPv6.
    #[tokio::test]
    async fn largest_datagram_and_ipv6() {
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
