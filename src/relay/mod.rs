//! The relay: moves bytes both ways between a client and a server until both directions
//! are done.
//!
//! Both directions are driven from one task, straight off socket readiness:
//! - a read goes into a per-thread scratch buffer and is written on at once; only bytes
//!   the receiver cannot take yet are kept, in a buffer owned by the connection that is
//!   released as soon as it drains. An idle connection holds no buffer at all, and a
//!   direction never holds more than one read (64 KiB) while its receiver is slow: it stops
//!   reading until that is written, so backpressure reaches the sender through TCP.
//! - EOF on one side is passed on as a write shutdown to the other (half-close); the other
//!   direction carries on until it ends too.
//! - A reset (or any error) on one side ends the relay and resets the other side.
//! - No bytes either way for `idle_timeout` ends it; so does the drain signal.
//!
//! Each end is a [`Stream`]: a plain socket or a TLS session ([`TlsStream`]), so the same
//! state machine relays plain TCP, terminated TLS (plaintext on one side) and re-encrypted
//! TLS. A TLS end's EOF is its close_notify (or its TCP FIN), and an EOF passed on to a TLS
//! end is a close_notify followed by a FIN; a TLS failure ends the relay like a reset.
//!
//! Two engines move the bytes, chosen per relay by [`Engine`]:
//! - `Splice` (Linux, plain TCP): adaptive. A direction starts by copying; once a read
//!   fills the whole buffer (bulk data), it moves to `splice(2)` from the source socket into
//!   a pipe and from the pipe into the destination socket, so the payload never enters user
//!   space; a small read moves it back (for small messages a `read` and a `write` are
//!   cheaper than two splices). A pipe is taken from a per-thread pool when the source
//!   becomes readable and given back as soon as it is empty, so an idle connection holds
//!   none. If no pipe can be had (descriptor limit), that read is copied.
//! - `Copy`: the scratch-buffer loop above; always used for a direction with a TLS end
//!   (its bytes are encrypted or decrypted in user space).
//!
//! Readiness is edge-triggered: the kernel wakes us when data arrives, not while it sits.
//! So a direction stops reading only when it has seen its socket empty: a `recv` or
//! `splice` that failed with `EAGAIN`, or a `recv` that returned less than asked (TCP
//! copies until the receive queue is empty, so a short `recv` saves the `EAGAIN` call).
//! Two things look like "empty" and are not: a splice that stopped because the pipe ran
//! out of slots (one per packet fragment, so with 1,500-byte packets a 1 MiB pipe takes
//! about 370 KB), and a read that stopped at TCP urgent data (`MSG_OOB`). A short splice
//! is therefore always followed by another; a socket that has had urgent data (`EPOLLPRI`)
//! is copied, never spliced (a splice cannot pass the urgent mark), and its short reads
//! prove nothing. Listening and server sockets set `SO_OOBINLINE`, so an urgent byte is
//! relayed in line with the rest rather than dropped.
//!
//! Callers see only [`relay`] and its [`Relayed`] result.

use std::cell::RefCell;
use std::io::{self, Write};
use std::net::Shutdown;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::Interest;
use tokio::time::Instant;

use crate::clock::after;
use crate::config::{ADAPTIVE_AFTER, BufferSize, SocketBuffers};
use crate::observe::Counter;
use tokio_util::sync::CancellationToken;

use crate::net::{self, ReadGuard, Recv, Sock, close_with_reset};
use crate::tls::TlsStream;
use crate::tls::stream::ReadEnd;

mod pipe;

use pipe::Pipe;

/// How a relay moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Through user space, one read and one write per chunk.
    Copy,
    /// `splice(2)` through a pooled pipe of `pipe_size` bytes; falls back to `Copy` per
    /// read if no pipe can be had.
    Splice { pipe_size: usize },
}

/// How a relay runs: fixed for its life.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// No bytes either way for this long ends the relay.
    pub idle_timeout: Duration,
    pub engine: Engine,
    /// The client socket's buffers as configured (the listener's `tcp`).
    pub client_buffers: SocketBuffers,
    /// The server socket's buffers as configured (the upstream's `tcp`).
    pub server_buffers: SocketBuffers,
}

/// Bytes read from a socket at a time.
pub const CHUNK: usize = 64 * 1024;
/// In splice mode, a read smaller than this switches the direction back to copying: for
/// small messages two `splice` calls through a pipe cost more than a `read` and a `write`.
const SPLICE_BELOW: usize = 4096;
/// Reads per direction in one wake-up before yielding to other tasks.
const READS_PER_POLL: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
    /// The plaintext of the TLS records one read brings, written on in one go (one
    /// `send` for several 16 KiB records).
    static BATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(2 * CHUNK));
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions finished with EOF.
    Done,
    /// No bytes moved for `idle_timeout`.
    IdleTimeout,
    /// The client reset the connection, or could not be written to.
    ClientReset,
    /// The server reset the connection, or could not be written to.
    ServerReset,
    /// Stopped by the drain signal.
    Drained,
}

/// What a relay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes client → server (plaintext where TLS is terminated).
    pub bytes_up: u64,
    /// Bytes server → client.
    pub bytes_down: u64,
    pub end: End,
    /// Why, when a TLS session failed.
    pub reason: Option<Box<str>>,
}

/// One end of a relay.
pub enum Stream {
    Plain(Sock),
    /// Boxed: a TLS session is large, and most connections have none.
    Tls(Box<TlsStream>),
}

impl Stream {
    /// Closes with a reset (a peer's reset passed on).
    fn reset(self) {
        match self {
            Stream::Plain(s) => close_with_reset(s),
            Stream::Tls(t) => close_with_reset(t.into_sock()),
        }
    }

    /// The socket under this end.
    fn sock(&self) -> &Sock {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.sock(),
        }
    }

    /// An end that did not finish cleanly (idle timeout, drain): a TLS peer gets a
    /// close_notify if one can be written at once.
    fn close_abruptly(self) {
        if let Stream::Tls(mut t) = self {
            t.close_now();
        }
    }
}

/// Shared byte counters a relay adds to as bytes move (not only when it ends), so that
/// throughput shows while connections are open. Bytes are counted as soon as they are read,
/// before they are written on: once the receiver has them, the counters include them.
pub struct Meters<'a> {
    /// Client → server counters (e.g. the listener's and the server's).
    pub up: [&'a Counter; 2],
    /// Server → client counters.
    pub down: [&'a Counter; 2],
}

/// How a relay reports on a long connection: `report(bytes_up, bytes_down)` every `every`.
pub struct Progress<'a> {
    pub every: Duration,
    pub report: &'a mut (dyn FnMut(u64, u64) + Send),
}

/// Relays between `client` and `server` until both directions are done, `idle_timeout`
/// passes with no bytes moving, one side fails, or `stop` is cancelled. Consumes and closes
/// both ends. Splices only between two plain sockets.
pub fn relay<'a>(
    client: Stream,
    server: Stream,
    settings: Settings,
    stop: &'a CancellationToken,
    meters: Meters<'a>,
    progress: Option<Progress<'a>>,
) -> Relay<'a> {
    let Settings {
        idle_timeout,
        engine,
        client_buffers: cb,
        server_buffers: sb,
    } = settings;
    let now = Instant::now();
    let next_report = progress.as_ref().map(|p| after(now, p.every));
    let first = next_report.map_or(after(now, idle_timeout), |r| {
        r.min(after(now, idle_timeout))
    });
    let engine = match (&client, &server) {
        (Stream::Plain(_), Stream::Plain(_)) => engine,
        _ => Engine::Copy,
    };
    Relay {
        client: Some(client),
        server: Some(server),
        up: Half::new(engine),
        down: Half::new(engine),
        adaptive: adaptive(cb.recv, sb.send) | adaptive(sb.recv, cb.send) << 2,
        last: now,
        idle_timeout,
        next_report,
        meters,
        progress,
        sleep: tokio::time::sleep_until(first),
        stop,
        cancel_registered: false,
        cancelled: stop.cancelled(),
        reason: None,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`relay`]: written out by hand (rather than an `async fn` with
    /// `select!`) because it lives as long as the connection, and its size is most of what
    /// an idle connection costs.
    pub struct Relay<'a> {
        client: Option<Stream>,
        server: Option<Stream>,
        up: Half,
        down: Half,
        // When bytes last moved either way.
        last: Instant,
        idle_timeout: Duration,
        next_report: Option<Instant>,
        meters: Meters<'a>,
        progress: Option<Progress<'a>>,
        // One timer serves both the idle timeout and progress reports: it fires at
        // whichever comes first, and is re-armed lazily (reads only note the time).
        #[pin]
        sleep: tokio::time::Sleep,
        stop: &'a CancellationToken,
        // The drain signal: polled once, to register this task's waker with it; after
        // that an atomic check per wake-up suffices (re-polling would take its lock).
        cancel_registered: bool,
        // The buffers still capped under `"adaptive"`: the up direction's flags in bits 0-1,
        // the down direction's in bits 2-3 (see `ADAPTIVE_RECV`). Here rather than in each
        // `Half`, where a byte more would cost eight.
        adaptive: u8,
        #[pin]
        cancelled: tokio_util::sync::WaitForCancellationFuture<'a>,
        // Why a TLS session failed, if one did.
        reason: Option<Box<str>>,
    }
}

impl Future for Relay<'_> {
    type Output = Relayed;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Relayed> {
        let mut this = self.project();
        let (Some(client), Some(server)) = (this.client.as_mut(), this.server.as_mut()) else {
            // Polled again after completion.
            return Poll::Pending;
        };
        let io = poll_both(
            cx,
            client,
            server,
            this.up,
            this.down,
            this.adaptive,
            this.last,
            this.meters,
            this.reason,
        );
        let end = match io {
            Poll::Ready(end) => end,
            Poll::Pending => loop {
                if *this.cancel_registered {
                    if this.stop.is_cancelled() {
                        break End::Drained;
                    }
                } else {
                    *this.cancel_registered = true;
                    if this.cancelled.as_mut().poll(cx).is_ready() {
                        break End::Drained;
                    }
                }
                if this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let now = Instant::now();
                let idle_deadline = after(*this.last, *this.idle_timeout);
                if now >= idle_deadline {
                    break End::IdleTimeout;
                }
                if let (Some(p), Some(at)) = (this.progress.as_mut(), this.next_report.as_mut())
                    && now >= *at
                {
                    (p.report)(this.up.bytes, this.down.bytes);
                    *at = after(now, p.every);
                }
                let wake = this
                    .next_report
                    .map_or(idle_deadline, |r| r.min(idle_deadline));
                this.sleep.as_mut().reset(wake);
                // Poll the re-armed timer so it is registered.
            },
        };
        let (client, server) = (this.client.take(), this.server.take());
        match (end, client, server) {
            (End::ClientReset, _, Some(server)) => server.reset(),
            (End::ServerReset, Some(client), _) => client.reset(),
            (End::IdleTimeout | End::Drained, client, server) => {
                client
                    .into_iter()
                    .chain(server)
                    .for_each(Stream::close_abruptly);
            }
            _ => {}
        }
        Poll::Ready(Relayed {
            bytes_up: this.up.bytes,
            bytes_down: this.down.bytes,
            end,
            reason: this.reason.take(),
        })
    }
}

/// Drives both directions; ready when both are done or either fails.
#[allow(clippy::too_many_arguments)]
fn poll_both(
    cx: &mut Context<'_>,
    client: &mut Stream,
    server: &mut Stream,
    up: &mut Half,
    down: &mut Half,
    adaptive: &mut u8,
    last: &mut Instant,
    meters: &Meters<'_>,
    reason: &mut Option<Box<str>>,
) -> Poll<End> {
    let (mut up_adaptive, mut down_adaptive) = (*adaptive & 3, *adaptive >> 2);
    let down_done = down.done;
    let u = match up.poll(
        cx,
        client,
        server,
        last,
        down_done,
        meters.up,
        &mut up_adaptive,
    ) {
        Poll::Ready(Err(f)) => {
            *reason = f.reason;
            return Poll::Ready(match f.side {
                Side::Read => End::ClientReset,
                Side::Write => End::ServerReset,
            });
        }
        Poll::Ready(Ok(())) => true,
        Poll::Pending => false,
    };
    let up_done = up.done;
    let d = match down.poll(
        cx,
        server,
        client,
        last,
        up_done,
        meters.down,
        &mut down_adaptive,
    ) {
        Poll::Ready(Err(f)) => {
            *reason = f.reason;
            return Poll::Ready(match f.side {
                Side::Read => End::ServerReset,
                Side::Write => End::ClientReset,
            });
        }
        Poll::Ready(Ok(())) => true,
        Poll::Pending => false,
    };
    *adaptive = up_adaptive | down_adaptive << 2;
    if u && d {
        Poll::Ready(End::Done)
    } else {
        Poll::Pending
    }
}

/// Which end of a direction failed, and why when TLS says.
struct Fail {
    side: Side,
    reason: Option<Box<str>>,
}

enum Side {
    Read,
    Write,
}

impl Fail {
    const READ: Fail = Fail {
        side: Side::Read,
        reason: None,
    };
    const WRITE: Fail = Fail {
        side: Side::Write,
        reason: None,
    };
}

/// A direction's adaptive flags (`Relay::adaptive`): the source's receive buffer is
/// `"adaptive"` and still capped.
const ADAPTIVE_RECV: u8 = 1;
/// A direction's adaptive flags: the destination's send buffer is `"adaptive"` and still
/// capped.
const ADAPTIVE_SEND: u8 = 2;

/// The adaptive flags of a direction that reads a socket whose receive buffer is
/// `recv` and writes one whose send buffer is `send`.
fn adaptive(recv: BufferSize, send: BufferSize) -> u8 {
    let mut flags = 0;
    if recv == BufferSize::Adaptive {
        flags |= ADAPTIVE_RECV;
    }
    if send == BufferSize::Adaptive {
        flags |= ADAPTIVE_SEND;
    }
    flags
}

/// Bytes read from the source but not yet written to the destination.
enum Pending {
    None,
    /// In user space, from `pos` on.
    Buf {
        buf: Vec<u8>,
        pos: usize,
    },
    /// In a pipe, `len` bytes.
    Pipe {
        pipe: Pipe,
        len: usize,
    },
}

/// One direction of the relay.
struct Half {
    pending: Pending,
    /// The pipe size when the engine allows splicing this direction; 0 when it does not.
    pipe_size: u32,
    /// Splicing now: the direction is moving bulk data (see [`Half::read_copy`]).
    splicing: bool,
    /// The source has had TCP urgent data: copy only, and a short read does not prove its
    /// receive queue empty (a read stops at the urgent mark).
    urgent: bool,
    /// The source sent EOF.
    eof: bool,
    /// The EOF has been passed on as a write shutdown.
    done: bool,
    bytes: u64,
}

enum Step {
    /// Bytes were read (and maybe some written on).
    Moved,
    Eof,
    /// Nothing to read right now.
    Again,
    ReadErr,
    WriteErr(Fail),
}

impl Half {
    fn new(engine: Engine) -> Half {
        let pipe_size = match engine {
            // The config bounds the size far below u32::MAX.
            Engine::Splice { pipe_size } => u32::try_from(pipe_size).unwrap_or(u32::MAX),
            Engine::Copy => 0,
        };
        Half {
            pending: Pending::None,
            pipe_size,
            splicing: false,
            urgent: false,
            eof: false,
            done: false,
            bytes: 0,
        }
    }

    /// The destination has taken `ADAPTIVE_AFTER` bytes: it reads, so the caps on the
    /// source's receive buffer and the destination's send buffer now only cost throughput.
    /// Both go over to the kernel's autotuning (once; on a kernel without `SO_BUF_LOCK`
    /// they stay capped).
    fn release_buffers(adaptive: &mut u8, from: &Stream, to: &Stream) {
        let flags = std::mem::take(adaptive);
        let r = net::unlock_buffers(from.sock().get_ref(), false, flags & ADAPTIVE_RECV != 0)
            .and_then(|()| {
                net::unlock_buffers(to.sock().get_ref(), flags & ADAPTIVE_SEND != 0, false)
            });
        if let Err(e) = r {
            tracing::debug!("socket buffers stay capped: {e}");
        }
    }

    /// Writes out whatever is pending, then whatever `to` has queued (TLS). Ready(Ok) once
    /// nothing is.
    fn flush(&mut self, cx: &mut Context<'_>, to: &mut Stream) -> Poll<Result<(), Fail>> {
        loop {
            match &mut self.pending {
                Pending::None => break,
                Pending::Buf { buf, pos } if *pos == buf.len() => {
                    // Released as soon as it drains: an idle connection holds no buffer.
                    self.pending = Pending::None;
                    continue;
                }
                Pending::Pipe { len: 0, .. } => {
                    if let Pending::Pipe { pipe, .. } =
                        std::mem::replace(&mut self.pending, Pending::None)
                    {
                        pipe::give_back(pipe);
                    }
                    continue;
                }
                _ => {}
            }
            let sock = match to {
                Stream::Plain(sock) => sock,
                Stream::Tls(t) => {
                    // A TLS end takes plaintext whole (what its socket cannot take waits
                    // there, encrypted).
                    if let Pending::Buf { buf, pos } =
                        std::mem::replace(&mut self.pending, Pending::None)
                    {
                        t.write_plain(&buf[pos..]).map_err(tls_write_fail)?;
                    }
                    continue;
                }
            };
            let Ok(mut g) = ready!(sock.poll_write_ready(cx)) else {
                return Poll::Ready(Err(Fail::WRITE));
            };
            let r = g.try_io(|s| match &self.pending {
                Pending::Buf { buf, pos } => s.get_ref().write(&buf[*pos..]),
                Pending::Pipe { pipe, len } => pipe.splice_out(s.get_ref(), *len),
                Pending::None => Ok(0),
            });
            match r {
                // Would block: readiness is cleared; the next poll registers for it.
                Err(_would_block) => {}
                Ok(Ok(0)) | Ok(Err(_)) => return Poll::Ready(Err(Fail::WRITE)),
                Ok(Ok(n)) => match &mut self.pending {
                    Pending::Buf { pos, .. } => *pos += n,
                    Pending::Pipe { len, .. } => *len -= n,
                    Pending::None => {}
                },
            }
        }
        if let Stream::Tls(t) = to {
            ready!(t.poll_flush(cx)).map_err(|_| Fail::WRITE)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Passes the EOF on: a write shutdown (a FIN), after a close_notify for a TLS end.
    /// When the other direction is done too, the relay ends now and closing the socket
    /// sends the FIN: the shutdown is skipped. A failure means the peer is already gone;
    /// its reset shows on the other direction.
    fn close_write(
        &mut self,
        cx: &mut Context<'_>,
        to: &mut Stream,
        other_done: bool,
    ) -> Poll<Result<(), Fail>> {
        let sock = match to {
            Stream::Plain(sock) => sock,
            Stream::Tls(t) => {
                if t.queue_close().is_ok() && ready!(t.poll_flush(cx)).is_err() {
                    return Poll::Ready(Ok(()));
                }
                t.sock()
            }
        };
        if !other_done {
            let _ = sock.get_ref().shutdown(Shutdown::Write);
        }
        Poll::Ready(Ok(()))
    }

    #[allow(clippy::too_many_arguments)]
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut Stream,
        to: &mut Stream,
        last: &mut Instant,
        other_done: bool,
        meter: [&Counter; 2],
        adaptive: &mut u8,
    ) -> Poll<Result<(), Fail>> {
        let mut reads = 0;
        loop {
            ready!(self.flush(cx, to))?;
            // Nothing is pending: everything read has been written on.
            if *adaptive != 0 && self.bytes >= ADAPTIVE_AFTER {
                Half::release_buffers(adaptive, from, to);
            }
            if self.eof {
                if !self.done {
                    ready!(self.close_write(cx, to, other_done))?;
                    self.done = true;
                }
                return Poll::Ready(Ok(()));
            }
            if reads == READS_PER_POLL {
                // Let other connections on this worker run; come back at once.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            let step = match from {
                Stream::Plain(sock) => {
                    let Ok(mut rg) = ready!(sock.poll_read_ready(cx)) else {
                        return Poll::Ready(Err(Fail::READ));
                    };
                    if !self.urgent && net::has_urgent_data(sock) {
                        self.urgent = true;
                        self.splicing = false;
                    }
                    let pipe = match to {
                        Stream::Plain(_) if self.splicing => pipe::take(self.pipe_size as usize),
                        _ => None,
                    };
                    match pipe {
                        Some(pipe) => self.read_splice(&mut rg, pipe, meter),
                        None => self.read_copy(&mut rg, to, meter),
                    }
                }
                Stream::Tls(tls) => {
                    // One read's records (at most one `recv`, 64 KiB and a partial record),
                    // gathered and written on together.
                    let r = BATCH.with_borrow_mut(|batch| {
                        batch.clear();
                        let r = tls.poll_read(cx, &mut |plain: &[u8]| {
                            batch.extend_from_slice(plain);
                            true
                        });
                        if !batch.is_empty() {
                            self.count(batch.len(), meter);
                            self.deliver(batch, to)?;
                        }
                        if batch.capacity() > 4 * CHUNK {
                            // Grown by a large stash: do not keep that.
                            *batch = Vec::with_capacity(2 * CHUNK);
                        }
                        Ok(r)
                    });
                    let r = match r {
                        Ok(r) => r,
                        Err(f) => return Poll::Ready(Err(f)),
                    };
                    match ready!(r) {
                        ReadEnd::Moved => Step::Moved,
                        ReadEnd::Eof => Step::Eof,
                        ReadEnd::Again => Step::Again,
                        ReadEnd::Reset => Step::ReadErr,
                        ReadEnd::Failed(e) => {
                            return Poll::Ready(Err(Fail {
                                side: Side::Read,
                                reason: Some(e.0.into()),
                            }));
                        }
                    }
                }
            };
            match step {
                Step::Moved => *last = Instant::now(),
                Step::Eof => {
                    self.eof = true;
                    *last = Instant::now();
                }
                Step::Again => {}
                Step::ReadErr => return Poll::Ready(Err(Fail::READ)),
                Step::WriteErr(f) => return Poll::Ready(Err(f)),
            }
        }
    }

    /// Counts `n` bytes read, here and in the shared counters (before they are written on).
    fn count(&mut self, n: usize, meter: [&Counter; 2]) {
        self.bytes += n as u64;
        for c in meter {
            c.add(n as u64);
        }
    }

    /// Writes `data` to `to` at once; keeps what it cannot take yet. Called only when
    /// nothing is pending.
    fn deliver(&mut self, data: &[u8], to: &mut Stream) -> Result<(), Fail> {
        match to {
            Stream::Plain(sock) => {
                // No syscall unless the socket is known writable; EAGAIN clears that.
                let written = match sock.try_io(Interest::WRITABLE, |mut s| s.write(data)) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(_) => return Err(Fail::WRITE),
                };
                if written < data.len() {
                    self.pending = Pending::Buf {
                        buf: data[written..].to_vec(),
                        pos: 0,
                    };
                }
                Ok(())
            }
            Stream::Tls(t) => t.write_plain(data).map_err(tls_write_fail),
        }
    }

    /// Splices what `from` has into `pipe`; the next flush moves it on.
    fn read_splice(&mut self, rg: &mut ReadGuard<'_>, pipe: Pipe, meter: [&Counter; 2]) -> Step {
        match rg.try_io(|s| pipe.splice_in(s.get_ref())) {
            Ok(Ok(0)) => {
                pipe::give_back(pipe);
                Step::Eof
            }
            Ok(Ok(n)) => {
                self.count(n, meter);
                // Short or not, the socket may hold more (see the module doc): readiness
                // stays, and the next read (a splice, or a copy) tells.
                if n < SPLICE_BELOW {
                    // Small reads again: request/response traffic, cheaper copied.
                    self.splicing = false;
                }
                self.pending = Pending::Pipe { pipe, len: n };
                Step::Moved
            }
            Ok(Err(_)) => {
                pipe::give_back(pipe);
                Step::ReadErr
            }
            Err(_would_block) => {
                pipe::give_back(pipe);
                Step::Again
            }
        }
    }

    /// Reads into the thread's scratch buffer and writes on at once; keeps only what the
    /// destination cannot take yet.
    fn read_copy(&mut self, rg: &mut ReadGuard<'_>, to: &mut Stream, meter: [&Counter; 2]) -> Step {
        SCRATCH.with_borrow_mut(|scratch| {
            let n = match net::recv(rg, scratch, self.urgent) {
                Recv::Again => return Step::Again,
                Recv::Err(_) => return Step::ReadErr,
                Recv::Eof => return Step::Eof,
                Recv::Data(n) => n,
            };
            self.count(n, meter);
            if n == scratch.len() && self.pipe_size > 0 && !self.urgent {
                // A full buffer: more is waiting, this is bulk; splice from now on.
                self.splicing = true;
            }
            match self.deliver(&scratch[..n], to) {
                Ok(()) => Step::Moved,
                Err(f) => Step::WriteErr(f),
            }
        })
    }
}

fn tls_write_fail(e: crate::tls::stream::TlsError) -> Fail {
    Fail {
        side: Side::Write,
        reason: Some(e.0.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open connection's memory is mostly this future: keep it from creeping up.
    #[tokio::test]
    async fn relay_future_stays_small() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let a = crate::net::register(a).unwrap();
        let b = crate::net::register(b).unwrap();
        let stop = CancellationToken::new();
        let c = Counter::new();
        let meters = Meters {
            up: [&c, &c],
            down: [&c, &c],
        };
        let settings = Settings {
            idle_timeout: Duration::from_secs(1),
            engine: Engine::Splice { pipe_size: 1 << 20 },
            client_buffers: SocketBuffers::default(),
            server_buffers: SocketBuffers::default(),
        };
        let f = relay(
            Stream::Plain(a),
            Stream::Plain(b),
            settings,
            &stop,
            meters,
            None,
        );
        let size = std::mem::size_of_val(&f);
        assert!(size <= 512, "relay future is {size} bytes");
    }
}
