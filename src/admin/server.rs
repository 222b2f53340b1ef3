//! The admin server's connections: accepted always, bounded in number, time and size, so
//! that no client — idle, slow, or many — can keep a scrape or an operator out.
//!
//! - Up to [`KEEP`] connections are kept; a new one beyond that closes the connection that
//!   has been idle longest (between requests, or still sending its first one). Only when
//!   `MAX_OPEN` connections are all in the middle of a request is a new one closed.
//! - A request head must arrive within `HEADER_TIMEOUT` of the connection opening or of
//!   the previous response (so an idle connection closes then too), and fit
//!   [`MAX_HEADER_BYTES`] and [`MAX_HEADERS`]; a response that cannot be written for
//!   `WRITE_TIMEOUT` ends its connection; a connection serves at most [`MAX_REQUESTS`]
//!   requests.
//! - At shutdown, idle connections close, requests in progress finish (up to
//!   [`SHUTDOWN_GRACE`]), and [`serve`] returns only then. A connection accepted just
//!   before (its request not read yet) gets [`FIRST_REQUEST_GRACE`] to send it, and an
//!   answer: after an upgrade, a request that reached the old process is answered by it.
//!   Every answer after the shutdown began closes its connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Connections kept before the longest-idle one makes way for a new one.
pub const KEEP: usize = 64;
/// Connections open at most: beyond this, with none idle, a new connection is closed.
pub const MAX_OPEN: usize = 256;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_REQUESTS: u32 = 1000;
pub const MAX_HEADERS: usize = 64;
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// At shutdown, how long a connection that has sent no request yet has to send one.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

pub type Resp = Response<Full<Bytes>>;

/// What the admin server's connections did, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Open now.
    pub open: AtomicU64,
    /// Closed to make room for a new connection.
    pub evicted: AtomicU64,
    /// Closed without a whole request head within `HEADER_TIMEOUT` (idle, or slow).
    pub timeout: AtomicU64,
    /// Closed because the client sent a bad or oversized request head, or did not read
    /// its response within `WRITE_TIMEOUT`.
    pub failed: AtomicU64,
    /// New connections closed at once: `MAX_OPEN` all busy.
    pub refused: AtomicU64,
}

impl Stats {
    /// `(reason, count)` of closed connections, as the metrics label them.
    pub fn closed(&self) -> [(&'static str, u64); 4] {
        [
            ("evicted", self.evicted.load(Relaxed)),
            ("timeout", self.timeout.load(Relaxed)),
            ("failed", self.failed.load(Relaxed)),
            ("refused", self.refused.load(Relaxed)),
        ]
    }
}

/// One connection as the accept loop sees it.
#[derive(Debug)]
struct Conn {
    /// Requests being answered now.
    busy: AtomicU32,
    /// When the last request ended (or the connection opened), in ms since `epoch`.
    idle_since: AtomicU64,
    /// Closes the connection at once (evicted, or idle too long).
    close: CancellationToken,
}

/// The open connections, by the order they were accepted.
#[derive(Debug)]
struct Table {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    epoch: Instant,
}

impl Table {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Makes room for one more connection; `false` if there is none.
    fn admit(&self, stats: &Stats) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() < KEEP {
            return true;
        }
        let idlest = conns
            .values()
            .filter(|c| c.busy.load(Relaxed) == 0 && !c.close.is_cancelled())
            .min_by_key(|c| c.idle_since.load(Relaxed));
        match idlest {
            Some(c) => {
                c.close.cancel();
                stats.evicted.fetch_add(1, Relaxed);
                true
            }
            None => conns.len() < MAX_OPEN,
        }
    }
}

/// What answers the requests: an async function of the request.
pub trait Handler: Fn(Request<Incoming>) -> Self::Answer + Clone + Send + Sync + 'static {
    type Answer: Future<Output = Resp> + Send + 'static;
}

impl<H, F> Handler for H
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Resp> + Send + 'static,
{
    type Answer = F;
}

/// Serves `handler` on `listener` until `stop`, then shuts down gracefully.
pub async fn serve(
    listener: TcpListener,
    handler: impl Handler,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let table = Arc::new(Table {
        conns: Mutex::new(HashMap::new()),
        epoch: Instant::now(),
    });
    let tasks = TaskTracker::new();
    let mut next_id = 0u64;
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // EMFILE and the like: the connection stays in the backlog; try again
                    // shortly rather than spin.
                    tracing::debug!("admin accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !table.admit(&stats) {
            stats.refused.fetch_add(1, Relaxed);
            tracing::debug!("admin: {MAX_OPEN} connections busy; closing a new one");
            continue;
        }
        stats.open.fetch_add(1, Relaxed);
        next_id += 1;
        let id = next_id;
        let conn = Arc::new(Conn {
            busy: AtomicU32::new(0),
            idle_since: AtomicU64::new(table.now_ms()),
            close: CancellationToken::new(),
        });
        table
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, conn.clone());
        tasks.spawn(connection(
            stream,
            conn,
            table.clone(),
            id,
            handler.clone(),
            stats.clone(),
            stop.clone(),
        ));
    }
    drop(listener);
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("admin: requests still running after {SHUTDOWN_GRACE:?}; closed");
    }
}

async fn connection(
    stream: TcpStream,
    conn: Arc<Conn>,
    table: Arc<Table>,
    id: u64,
    handler: impl Handler,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let served = Arc::new(AtomicU32::new(0));
    let service = {
        let conn = conn.clone();
        let table = table.clone();
        let served = served.clone();
        let stop = stop.clone();
        hyper::service::service_fn(move |req| {
            let busy = Busy::start(conn.clone(), table.clone());
            let n = served.fetch_add(1, Relaxed) + 1;
            let fut = handler(req);
            let stop = stop.clone();
            async move {
                let mut resp = fut.await;
                if n >= MAX_REQUESTS || stop.is_cancelled() {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                drop(busy);
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = TokioIo::new(WriteDeadline::new(stream, WRITE_TIMEOUT));
    let http = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEADER_BYTES)
        .serve_connection(io, service);
    tokio::pin!(http);
    let mut draining = false;
    let first_request = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(first_request);
    let mut awaiting_first = false;
    loop {
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    let counter = if e.is_timeout() { &stats.timeout } else { &stats.failed };
                    counter.fetch_add(1, Relaxed);
                    tracing::debug!("admin connection: {e}");
                }
                break;
            }
            () = conn.close.cancelled() => break,
            () = stop.cancelled(), if !draining => {
                draining = true;
                if served.load(Relaxed) == 0 {
                    // Just accepted: its request may be on its way.
                    awaiting_first = true;
                    first_request
                        .as_mut()
                        .reset(tokio::time::Instant::now() + FIRST_REQUEST_GRACE);
                } else {
                    // Idle connections close now; a request in progress is answered first.
                    http.as_mut().graceful_shutdown();
                }
            }
            () = &mut first_request, if awaiting_first => {
                awaiting_first = false;
                http.as_mut().graceful_shutdown();
            }
        }
    }
    table
        .conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    stats.open.fetch_sub(1, Relaxed);
}

/// A request being answered: the connection is busy until it is dropped.
struct Busy {
    conn: Arc<Conn>,
    table: Arc<Table>,
}

impl Busy {
    fn start(conn: Arc<Conn>, table: Arc<Table>) -> Busy {
        conn.busy.fetch_add(1, Relaxed);
        Busy { conn, table }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.conn.idle_since.store(self.table.now_ms(), Relaxed);
        self.conn.busy.fetch_sub(1, Relaxed);
    }
}

/// A stream whose writes fail with `TimedOut` once one has waited `timeout` for the peer
/// to make room: a client that stops reading cannot hold its connection.
struct WriteDeadline<S> {
    inner: S,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
    timeout: Duration,
}

impl<S: Unpin> WriteDeadline<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        WriteDeadline {
            inner,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
            timeout,
        }
    }

    /// Passes on the result of a write: `Pending` until it has waited too long.
    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.armed = false;
            return r;
        }
        if !self.armed {
            self.armed = true;
            let at = Instant::now() + self.timeout;
            self.sleep.as_mut().reset(at);
        }
        ready!(self.sleep.as_mut().poll(cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not read the response",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, r)
    }
}

#[cfg(test)]
mod tests {
    //! In-process, on loopback, in paused time: timeouts pass without waiting for them,
    //! and "answered at once" means before any of them could have fired.

    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    struct Server {
        addr: SocketAddr,
        stats: Arc<Stats>,
        stop: CancellationToken,
        done: tokio::task::JoinHandle<()>,
    }

    /// Serves `body` for `GET /` (and `/slow` after `release` is notified).
    async fn start(body: &'static [u8], release: Arc<Notify>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        let handler = move |req: Request<Incoming>| {
            let release = release.clone();
            async move {
                if req.uri().path() == "/slow" {
                    release.notified().await;
                }
                Response::new(Full::new(Bytes::from_static(body)))
            }
        };
        let done = tokio::spawn(serve(listener, handler, stats.clone(), stop.clone()));
        Server {
            addr,
            stats,
            stop,
            done,
        }
    }

    async fn request(addr: SocketAddr, path: &str) -> String {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Waits (in paused time) until `cond`, for at most a virtual minute.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..600 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_cannot_lock_out_a_request() {
        let s = start(b"ok", Arc::default()).await;
        let t0 = Instant::now();
        // More idle connections than the server ever holds.
        let mut idle = Vec::new();
        for _ in 0..MAX_OPEN + 44 {
            idle.push(TcpStream::connect(s.addr).await.unwrap());
        }
        for round in 0..20 {
            let r = request(s.addr, "/").await;
            assert!(
                r.starts_with("HTTP/1.1 200") && r.ends_with("ok"),
                "round {round}: {r}"
            );
        }
        assert!(
            t0.elapsed() < HEADER_TIMEOUT,
            "answered only after {:?}: a timeout had to free a slot",
            t0.elapsed()
        );
        until("idle ones evicted", || {
            s.stats.open.load(Relaxed) <= KEEP as u64
        })
        .await;
        let evicted = s.stats.evicted.load(Relaxed);
        assert!(
            evicted >= (MAX_OPEN + 44 - KEEP) as u64,
            "{evicted} evicted"
        );
        assert_eq!(s.stats.refused.load(Relaxed), 0);
        // The evicted ones were closed by the server; the newest are still open.
        let mut first = [0u8; 1];
        assert_eq!(idle[0].read(&mut first).await.unwrap(), 0);
        s.stop.cancel();
        s.done.await.unwrap();
        assert_eq!(s.stats.open.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_and_idle_clients_are_closed() {
        let s = start(&[b'x'; 1 << 20], Arc::default()).await;
        // Pipelined requests for a megabyte each, never read.
        let mut reader_less = TcpStream::connect(s.addr).await.unwrap();
        let many = "GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(64);
        reader_less.write_all(many.as_bytes()).await.unwrap();
        // Half a request head, never finished.
        let mut half = TcpStream::connect(s.addr).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        // A connection that asks once and then stays.
        let mut keeper = TcpStream::connect(s.addr).await.unwrap();
        keeper
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = vec![0u8; 64];
        let n = keeper.read(&mut got).await.unwrap();
        assert!(got[..n].starts_with(b"HTTP/1.1 200"));
        until("all three closed", || s.stats.open.load(Relaxed) == 0).await;
        // The one that did not read failed; the half head and the idle keeper timed out.
        assert_eq!(s.stats.failed.load(Relaxed), 1, "{:?}", s.stats.closed());
        assert_eq!(s.stats.timeout.load(Relaxed), 2, "{:?}", s.stats.closed());
        s.stop.cancel();
        s.done.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_heads_are_refused() {
        let s = start(b"ok", Arc::default()).await;
        for head in [
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n",
                "a".repeat(MAX_HEADER_BYTES)
            ),
            format!(
                "GET / HTTP/1.1\r\n{}\r\n",
                "A: b\r\n".repeat(MAX_HEADERS + 1)
            ),
        ] {
            let mut c = TcpStream::connect(s.addr).await.unwrap();
            // The server may close before it has read everything: a write error is fine.
            let _ = c.write_all(head.as_bytes()).await;
            let mut out = Vec::new();
            let _ = c.read_to_end(&mut out).await;
            let out = String::from_utf8_lossy(&out);
            assert!(out.starts_with("HTTP/1.1 431"), "{out}");
        }
        s.stop.cancel();
        s.done.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn connections_end_after_max_requests() {
        let s = start(b"ok", Arc::default()).await;
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        let one = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut all = Vec::new();
        let reader = async {
            let mut buf = vec![0u8; 1 << 16];
            let (mut r, mut w) = c.split();
            let write = async {
                for _ in 0..MAX_REQUESTS + 5 {
                    if w.write_all(one.as_bytes()).await.is_err() {
                        break;
                    }
                }
            };
            let read = async {
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => all.extend_from_slice(&buf[..n]),
                    }
                }
            };
            tokio::join!(write, read);
        };
        reader.await;
        let text = String::from_utf8_lossy(&all);
        assert_eq!(text.matches("HTTP/1.1 200").count(), MAX_REQUESTS as usize);
        assert_eq!(text.matches("connection: close").count(), 1);
        s.stop.cancel();
        s.done.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_accepted_before_shutdown_gets_its_answer() {
        let s = start(b"late", Arc::new(Notify::new())).await;
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        until("accepted", || s.stats.open.load(Relaxed) == 1).await;
        s.stop.cancel();
        tokio::time::sleep(FIRST_REQUEST_GRACE / 2).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{out}"
        );
        assert!(out.ends_with("late"), "{out}");
        // Answered, the connection closed, and the server done.
        s.done.await.unwrap();
        assert_eq!(s.stats.open.load(Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_answers_requests_in_progress() {
        let release = Arc::new(Notify::new());
        let s = start(b"done", release.clone()).await;
        let pending = tokio::spawn(request(s.addr, "/slow"));
        let idle = TcpStream::connect(s.addr).await.unwrap();
        until("both accepted", || s.stats.open.load(Relaxed) == 2).await;
        s.stop.cancel();
        // The idle connection closes; the request in progress holds the server open.
        until("idle closed", || s.stats.open.load(Relaxed) == 1).await;
        assert!(!s.done.is_finished());
        release.notify_one();
        let r = pending.await.unwrap();
        assert!(r.ends_with("done"), "{r}");
        s.done.await.unwrap();
        assert_eq!(s.stats.open.load(Relaxed), 0);
        drop(idle);
    }
}
