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
//! Two engines move the bytes, chosen per relay by [`Engine`]:
//! - `Splice` (Linux, plain TCP): `splice(2)` from the source socket into a pipe and from
//!   the pipe into the destination socket; the payload never enters user space. A pipe is
//!   taken from a per-thread pool when the source becomes readable and given back as soon
//!   as it is empty, so an idle connection holds none. If no pipe can be had (descriptor
//!   limit), that read falls back to the copy engine.
//! - `Copy`: the scratch-buffer loop above; for TLS and wherever splice is unavailable.
//!
//! Callers see only [`relay`] and its [`Relayed`] result.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::net::close_with_reset;

mod pipe;

use pipe::Pipe;

/// How a relay moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Through user space, one read and one write per chunk.
    Copy,
    /// `splice(2)` through a pooled pipe; falls back to `Copy` per read if no pipe can be had.
    Splice,
}

/// Bytes read from a socket at a time.
pub const CHUNK: usize = 64 * 1024;
/// Reads per direction in one wake-up before yielding to other tasks.
const READS_PER_POLL: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes client → server.
    pub bytes_up: u64,
    /// Bytes server → client.
    pub bytes_down: u64,
    pub end: End,
}

/// Shared byte counters a relay adds to as bytes move (not only when it ends), so that
/// throughput shows while connections are open. Added to once per wake-up, not per read.
pub struct Meters<'a> {
    /// Client → server counters (e.g. the listener's and the server's).
    pub up: [&'a AtomicU64; 2],
    /// Server → client counters.
    pub down: [&'a AtomicU64; 2],
}

/// How a relay reports on a long connection: `report(bytes_up, bytes_down)` every `every`.
pub struct Progress<'a> {
    pub every: Duration,
    pub report: &'a mut (dyn FnMut(u64, u64) + Send),
}

/// Relays between `client` and `server` until both directions are done, `idle_timeout`
/// passes with no bytes moving, one side fails, or `stop` is cancelled. Consumes and closes
/// both sockets.
pub async fn relay(
    client: TcpStream,
    server: TcpStream,
    idle_timeout: Duration,
    stop: &CancellationToken,
    engine: Engine,
    meters: Meters<'_>,
    mut progress: Option<Progress<'_>>,
) -> Relayed {
    let mut up = Half::new(engine);
    let mut down = Half::new(engine);
    let mut last = Instant::now();
    let sleep = tokio::time::sleep(idle_timeout);
    tokio::pin!(sleep);
    let every = progress.as_ref().map_or(Duration::MAX, |p| p.every);
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let tick = tokio::time::sleep_until(Instant::now().checked_add(every).unwrap_or(far));
    tokio::pin!(tick);
    let mut metered = (0u64, 0u64);

    let end = loop {
        tokio::select! {
            biased;
            r = poll_fn(|cx| {
                let r = poll_both(cx, &client, &server, &mut up, &mut down, &mut last);
                meter(&meters, &mut metered, up.bytes, down.bytes);
                r
            }) => break r,
            () = &mut sleep => {
                let deadline = last + idle_timeout;
                if Instant::now() >= deadline {
                    break End::IdleTimeout;
                }
                sleep.as_mut().reset(deadline);
            }
            () = &mut tick, if progress.is_some() => {
                if let Some(p) = progress.as_mut() {
                    (p.report)(up.bytes, down.bytes);
                }
                tick.as_mut().reset(Instant::now() + every);
            }
            () = stop.cancelled() => break End::Drained,
        }
    };
    match end {
        End::ClientReset => close_with_reset(server),
        End::ServerReset => close_with_reset(client),
        End::Done | End::IdleTimeout | End::Drained => {}
    }
    Relayed {
        bytes_up: up.bytes,
        bytes_down: down.bytes,
        end,
    }
}

/// Adds what moved since the last call to the shared counters.
#[inline]
fn meter(m: &Meters<'_>, done: &mut (u64, u64), up: u64, down: u64) {
    if up != done.0 {
        for c in m.up {
            c.fetch_add(up - done.0, Relaxed);
        }
        done.0 = up;
    }
    if down != done.1 {
        for c in m.down {
            c.fetch_add(down - done.1, Relaxed);
        }
        done.1 = down;
    }
}

/// Drives both directions; ready when both are done or either fails.
fn poll_both(
    cx: &mut Context<'_>,
    client: &TcpStream,
    server: &TcpStream,
    up: &mut Half,
    down: &mut Half,
    last: &mut Instant,
) -> Poll<End> {
    let u = match up.poll(cx, client, server, last) {
        Poll::Ready(Err(Fail::Read)) => return Poll::Ready(End::ClientReset),
        Poll::Ready(Err(Fail::Write)) => return Poll::Ready(End::ServerReset),
        Poll::Ready(Ok(())) => true,
        Poll::Pending => false,
    };
    let d = match down.poll(cx, server, client, last) {
        Poll::Ready(Err(Fail::Read)) => return Poll::Ready(End::ServerReset),
        Poll::Ready(Err(Fail::Write)) => return Poll::Ready(End::ClientReset),
        Poll::Ready(Ok(())) => true,
        Poll::Pending => false,
    };
    if u && d {
        Poll::Ready(End::Done)
    } else {
        Poll::Pending
    }
}

/// Which socket of a direction failed.
enum Fail {
    Read,
    Write,
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
    splice: bool,
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
    WriteErr,
}

impl Half {
    fn new(engine: Engine) -> Half {
        Half {
            pending: Pending::None,
            splice: engine == Engine::Splice,
            eof: false,
            done: false,
            bytes: 0,
        }
    }

    /// Writes out whatever is pending. Ready(Ok) once nothing is.
    fn flush(&mut self, cx: &mut Context<'_>, to: &TcpStream) -> Poll<Result<(), Fail>> {
        loop {
            let r = match &mut self.pending {
                Pending::None => return Poll::Ready(Ok(())),
                Pending::Buf { buf, pos } => {
                    if *pos == buf.len() {
                        // Released as soon as it drains: an idle connection holds no buffer.
                        self.pending = Pending::None;
                        continue;
                    }
                    to.try_write(&buf[*pos..]).map(|n| *pos += n)
                }
                Pending::Pipe { pipe, len } => {
                    if *len == 0 {
                        if let Pending::Pipe { pipe, .. } =
                            std::mem::replace(&mut self.pending, Pending::None)
                        {
                            pipe::give_back(pipe);
                        }
                        continue;
                    }
                    to.try_io(tokio::io::Interest::WRITABLE, || pipe.splice_out(to, *len))
                        .and_then(|n| {
                            if n == 0 {
                                Err(io::ErrorKind::WriteZero.into())
                            } else {
                                *len -= n;
                                Ok(())
                            }
                        })
                }
            };
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if ready!(to.poll_write_ready(cx)).is_err() {
                        return Poll::Ready(Err(Fail::Write));
                    }
                }
                Err(_) => return Poll::Ready(Err(Fail::Write)),
            }
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        last: &mut Instant,
    ) -> Poll<Result<(), Fail>> {
        let mut reads = 0;
        loop {
            ready!(self.flush(cx, to))?;
            if self.eof {
                if !self.done {
                    self.done = true;
                    // Fails only if the peer is already gone; its reset shows on the other
                    // direction.
                    let _ = SockRef::from(to).shutdown(Shutdown::Write);
                }
                return Poll::Ready(Ok(()));
            }
            if reads == READS_PER_POLL {
                // Let other connections on this worker run; come back at once.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if ready!(from.poll_read_ready(cx)).is_err() {
                return Poll::Ready(Err(Fail::Read));
            }
            reads += 1;
            let step = match self.splice.then(pipe::take).flatten() {
                Some(pipe) => self.read_splice(from, pipe),
                None => self.read_copy(from, to),
            };
            match step {
                Step::Moved => *last = Instant::now(),
                Step::Eof => {
                    self.eof = true;
                    *last = Instant::now();
                }
                Step::Again => {}
                Step::ReadErr => return Poll::Ready(Err(Fail::Read)),
                Step::WriteErr => return Poll::Ready(Err(Fail::Write)),
            }
        }
    }

    /// Splices what `from` has into `pipe`; the next flush moves it on.
    fn read_splice(&mut self, from: &TcpStream, pipe: Pipe) -> Step {
        match from.try_io(tokio::io::Interest::READABLE, || pipe.splice_in(from)) {
            Ok(0) => {
                pipe::give_back(pipe);
                Step::Eof
            }
            Ok(n) => {
                self.bytes += n as u64;
                self.pending = Pending::Pipe { pipe, len: n };
                Step::Moved
            }
            Err(e) => {
                pipe::give_back(pipe);
                if e.kind() == io::ErrorKind::WouldBlock {
                    Step::Again
                } else {
                    Step::ReadErr
                }
            }
        }
    }

    /// Reads into the thread's scratch buffer and writes on at once; keeps only what the
    /// destination cannot take yet.
    fn read_copy(&mut self, from: &TcpStream, to: &TcpStream) -> Step {
        SCRATCH.with_borrow_mut(|scratch| match from.try_read(scratch) {
            Ok(0) => Step::Eof,
            Ok(n) => {
                self.bytes += n as u64;
                let written = match to.try_write(&scratch[..n]) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(_) => return Step::WriteErr,
                };
                if written < n {
                    self.pending = Pending::Buf {
                        buf: scratch[written..n].to_vec(),
                        pos: 0,
                    };
                }
                Step::Moved
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Again,
            Err(_) => Step::ReadErr,
        })
    }
}
