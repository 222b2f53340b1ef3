//! A TLS session on a connected socket, driven by rustls's unbuffered API from socket
//! readiness, with ferry's own buffers.
//!
//! rustls decrypts records in place in the buffer it is given and encrypts into the buffer
//! it is given, so the session itself holds no I/O buffer. Here, ciphertext is received
//! into a per-thread buffer and processed there; only what must outlive one wake-up is
//! kept by the connection, in buffers that are released as soon as they empty:
//! - `inbox`: the tail of a record not yet complete (at most one record), or records not
//!   processed yet because the receiver of their plaintext was full;
//! - `outbox`: ciphertext the socket could not take yet;
//! - `stash`: plaintext that turned up while writing (rustls may process a record then),
//!   delivered before anything else is read.
//!
//! An idle session therefore holds only rustls's connection state (keys, the handshake
//! outcome). Handshake and data path share one state machine (`TlsStream::pump`); every
//! state rustls can report is handled in one place (`handle`).

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::Interest;

use crate::net::{self, Recv, Sock};

/// The most ciphertext read from the socket at once.
const RX_READ: usize = 64 * 1024;
/// The longest TLS record on the wire (TLS 1.2 allows 2,048 bytes of expansion).
const MAX_RECORD: usize = 5 + 16 * 1024 + 2048;
/// Plaintext encrypted at once, and room for its records' headers and tags.
const TX_PLAIN: usize = 64 * 1024;
const TX_SIZE: usize = TX_PLAIN + 4 * 1024;

thread_local! {
    /// Received ciphertext: a carried-over partial record, then what one `recv` brings.
    static RX: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_RECORD + RX_READ].into_boxed_slice());
    /// Encrypted output before it is written.
    static TX: RefCell<Box<[u8]>> = RefCell::new(vec![0; TX_SIZE].into_boxed_slice());
}

/// Either end of rustls's unbuffered API.
enum Conn {
    Server(UnbufferedServerConnection),
    Client(UnbufferedClientConnection),
}

impl Conn {
    fn common(&self) -> &rustls::CommonState {
        match self {
            Conn::Server(c) => c,
            Conn::Client(c) => c,
        }
    }
}

/// What a handshake settled, for the access log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The IANA name of the cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher: &'static str,
    /// The protocol agreed by ALPN.
    pub alpn: Option<Box<str>>,
    /// The session was resumed (no full handshake).
    pub resumed: bool,
    /// The subject of the peer's certificate, when it sent one.
    pub peer_subject: Option<Box<str>>,
}

/// Why a handshake or a session failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> Self {
        TlsError(format!("TLS: {e}"))
    }
}

/// How a read ended.
pub enum ReadEnd {
    /// Plaintext was handed over, or progress was made (call again).
    Moved,
    /// The peer sent close_notify, or closed the connection.
    Eof,
    /// Nothing to read now: poll again (which waits for the socket).
    Again,
    /// The peer broke the protocol, or rustls failed.
    Failed(TlsError),
    /// Reading failed on the socket (reset).
    Reset,
}

/// A TLS session over `sock`.
pub struct TlsStream {
    sock: Sock,
    conn: Conn,
    inbox: Vec<u8>,
    /// `inbox` may hold complete records not yet processed.
    fresh: bool,
    outbox: Vec<u8>,
    outpos: usize,
    stash: Vec<u8>,
    /// The peer's close_notify (or EOF) was seen: nothing more will be read.
    peer_closed: bool,
    /// Our close_notify is queued: nothing more may be written.
    closing: bool,
    /// The socket had urgent data (see `relay`): short reads prove nothing.
    urgent: bool,
    /// Client side: the server asked for our certificate during the handshake.
    cert_asked: bool,
}

/// What one `process_tls_records` call came to.
enum Event {
    /// Handshake bytes were queued for sending; call again.
    Queued,
    /// Application data was handed over; `stop` when the receiver asked to stop.
    Data {
        stop: bool,
    },
    /// More input is needed (a handshake message, or the next record).
    NeedInput,
    /// Application data may be sent now (and was, if it was asked for).
    Writable,
    PeerClosed,
    Closed,
    Failed(rustls::Error),
}

/// What the caller of [`handle`] wants from a `WriteTraffic` state.
enum WriteOp<'a> {
    None,
    /// Encrypt this plaintext into `out`; `produced` says how much was written there.
    Data {
        plain: &'a [u8],
        out: &'a mut [u8],
        produced: usize,
    },
    Close {
        out: &'a mut [u8],
        produced: usize,
    },
}

/// Handles one state reported by rustls. Control output goes to `outbox`; application
/// data to `deliver` (what it refuses after it asks to stop goes to `stash`). Returns the
/// extra bytes to discard from the input and what happened.
fn handle<D>(
    state: Result<ConnectionState<'_, '_, D>, rustls::Error>,
    outbox: &mut Vec<u8>,
    stash: &mut Vec<u8>,
    deliver: &mut dyn FnMut(&[u8]) -> bool,
    write: &mut WriteOp<'_>,
) -> (usize, Event) {
    let state = match state {
        Ok(s) => s,
        Err(e) => return (0, Event::Failed(e)),
    };
    match state {
        ConnectionState::ReadTraffic(mut rt) => {
            let mut discard = 0;
            let mut stop = false;
            while let Some(rec) = rt.next_record() {
                match rec {
                    Ok(rec) => {
                        discard += rec.discard;
                        if stop {
                            stash.extend_from_slice(rec.payload);
                        } else {
                            stop = !deliver(rec.payload);
                        }
                    }
                    Err(e) => return (discard, Event::Failed(e)),
                }
            }
            (discard, Event::Data { stop })
        }
        ConnectionState::EncodeTlsData(mut enc) => {
            let start = outbox.len();
            let mut size = 4096;
            loop {
                outbox.resize(start + size, 0);
                match enc.encode(&mut outbox[start..]) {
                    Ok(n) => {
                        outbox.truncate(start + n);
                        return (0, Event::Queued);
                    }
                    Err(EncodeError::InsufficientSize(s)) => size = s.required_size,
                    Err(EncodeError::AlreadyEncoded) => {
                        outbox.truncate(start);
                        return (0, Event::Queued);
                    }
                }
            }
        }
        ConnectionState::TransmitTlsData(t) => {
            // The bytes are in `outbox`, which is always written out in order before
            // anything queued after it.
            t.done();
            (0, Event::Queued)
        }
        ConnectionState::BlockedHandshake => (0, Event::NeedInput),
        ConnectionState::WriteTraffic(mut wt) => {
            match write {
                WriteOp::None => {}
                WriteOp::Data {
                    plain,
                    out,
                    produced,
                } => match wt.encrypt(plain, out) {
                    Ok(n) => *produced = n,
                    Err(EncryptError::EncryptExhausted) => {
                        return (0, Event::Failed(rustls::Error::EncryptError));
                    }
                    Err(e) => {
                        return (
                            0,
                            Event::Failed(rustls::Error::General(format!("encrypt: {e}"))),
                        );
                    }
                },
                WriteOp::Close { out, produced } => match wt.queue_close_notify(out) {
                    Ok(n) => *produced = n,
                    Err(e) => {
                        return (
                            0,
                            Event::Failed(rustls::Error::General(format!("close_notify: {e}"))),
                        );
                    }
                },
            }
            (0, Event::Writable)
        }
        ConnectionState::PeerClosed => (0, Event::PeerClosed),
        ConnectionState::Closed => (0, Event::Closed),
        // Early data (never accepted: no `max_early_data_size`), and states added later.
        _ => (
            0,
            Event::Failed(rustls::Error::General("unexpected TLS state".into())),
        ),
    }
}

fn status_of<D>(
    st: UnbufferedStatus<'_, '_, D>,
    outbox: &mut Vec<u8>,
    stash: &mut Vec<u8>,
    deliver: &mut dyn FnMut(&[u8]) -> bool,
    write: &mut WriteOp<'_>,
) -> (usize, Event) {
    let discard = st.discard;
    let (extra, ev) = handle(st.state, outbox, stash, deliver, write);
    (discard + extra, ev)
}

impl TlsStream {
    /// A server session: `hello` holds the bytes already read from the client (its
    /// ClientHello, read to learn SNI and ALPN).
    pub fn server(
        sock: Sock,
        config: Arc<ServerConfig>,
        hello: Vec<u8>,
    ) -> Result<TlsStream, TlsError> {
        let conn = UnbufferedServerConnection::new(config)?;
        Ok(TlsStream::new(sock, Conn::Server(conn), hello))
    }

    /// A client session to a server named `name`.
    pub fn client(
        sock: Sock,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<TlsStream, TlsError> {
        let conn = UnbufferedClientConnection::new(config, name)?;
        Ok(TlsStream::new(sock, Conn::Client(conn), Vec::new()))
    }

    fn new(sock: Sock, conn: Conn, inbox: Vec<u8>) -> TlsStream {
        TlsStream {
            sock,
            conn,
            fresh: !inbox.is_empty(),
            inbox,
            outbox: Vec::new(),
            outpos: 0,
            stash: Vec::new(),
            peer_closed: false,
            closing: false,
            urgent: false,
            cert_asked: false,
        }
    }

    pub fn sock(&self) -> &Sock {
        &self.sock
    }

    /// The socket, for closing it with a reset.
    pub fn into_sock(self) -> Sock {
        self.sock
    }

    /// Runs rustls over `buf` from its start until it needs more input, has delivered data
    /// and was asked to stop, the peer closed, or it fails. Returns how many bytes of `buf`
    /// are consumed and the last event.
    fn pump(
        &mut self,
        buf: &mut [u8],
        deliver: &mut dyn FnMut(&[u8]) -> bool,
        write: &mut WriteOp<'_>,
    ) -> (usize, Event) {
        let mut consumed = 0;
        loop {
            let input = &mut buf[consumed..];
            let (discard, ev) = match &mut self.conn {
                Conn::Server(c) => status_of(
                    c.process_tls_records(input),
                    &mut self.outbox,
                    &mut self.stash,
                    deliver,
                    write,
                ),
                Conn::Client(c) => status_of(
                    c.process_tls_records(input),
                    &mut self.outbox,
                    &mut self.stash,
                    deliver,
                    write,
                ),
            };
            consumed += discard;
            match ev {
                Event::Queued => continue,
                Event::Data { stop: false } => continue,
                Event::Failed(e) => {
                    // rustls queues a fatal alert before failing: send it along if it can.
                    self.queue_pending_alert(&mut buf[consumed..]);
                    return (consumed, Event::Failed(e));
                }
                ev => return (consumed, ev),
            }
        }
    }

    /// After a failure, whatever rustls still has to send (the alert).
    fn queue_pending_alert(&mut self, buf: &mut [u8]) {
        for _ in 0..4 {
            let mut none = WriteOp::None;
            let (_, ev) = match &mut self.conn {
                Conn::Server(c) => status_of(
                    c.process_tls_records(buf),
                    &mut self.outbox,
                    &mut self.stash,
                    &mut |_| true,
                    &mut none,
                ),
                Conn::Client(c) => status_of(
                    c.process_tls_records(buf),
                    &mut self.outbox,
                    &mut self.stash,
                    &mut |_| true,
                    &mut none,
                ),
            };
            if !matches!(ev, Event::Queued) {
                return;
            }
        }
    }

    /// Completes the handshake. Application data that arrived with the peer's last flight
    /// stays in the session, to be read first. The caller bounds the time it may take.
    pub async fn handshake(&mut self) -> Result<(), TlsError> {
        loop {
            let mut buf = std::mem::take(&mut self.inbox);
            let mut stash = Vec::new();
            let (consumed, ev) = {
                let mut to_stash = |d: &[u8]| {
                    stash.extend_from_slice(d);
                    true
                };
                self.pump(&mut buf, &mut to_stash, &mut WriteOp::None)
            };
            self.stash.extend_from_slice(&stash);
            buf.drain(..consumed);
            self.inbox = buf;
            if matches!(self.conn, Conn::Client(_)) && super::take_cert_asked() {
                self.cert_asked = true;
            }
            let done = match ev {
                Event::Writable => !self.conn.common().is_handshaking(),
                Event::NeedInput => false,
                // The peer finished the handshake and closed its side in the same flight
                // (data in between is in the stash): a complete session, already at EOF.
                Event::PeerClosed | Event::Closed if !self.conn.common().is_handshaking() => {
                    self.peer_closed = true;
                    true
                }
                Event::PeerClosed | Event::Closed => {
                    return Err(TlsError("closed by the peer during the handshake".into()));
                }
                Event::Failed(e) => {
                    let _ = self.flush_all().await;
                    return Err(e.into());
                }
                Event::Queued | Event::Data { .. } => false,
            };
            self.flush_all()
                .await
                .map_err(|e| TlsError(format!("sending the handshake: {e}")))?;
            if done {
                self.fresh = !self.inbox.is_empty();
                if self.inbox.is_empty() {
                    self.inbox = Vec::new();
                }
                return Ok(());
            }
            self.read_more().await?;
        }
    }

    /// Reads more of the handshake from the socket into `inbox`.
    async fn read_more(&mut self) -> Result<(), TlsError> {
        if self.inbox.len() >= 64 * 1024 + MAX_RECORD {
            return Err(TlsError("handshake message too long".into()));
        }
        loop {
            let mut g = self
                .sock
                .readable()
                .await
                .map_err(|e| TlsError(format!("reading the handshake: {e}")))?;
            let start = self.inbox.len();
            self.inbox.resize(start + 16 * 1024, 0);
            let r = g.try_io(|s| io::Read::read(&mut s.get_ref(), &mut self.inbox[start..]));
            match r {
                Err(_would_block) => self.inbox.truncate(start),
                Ok(Ok(0)) => {
                    self.inbox.truncate(start);
                    return Err(TlsError("closed by the peer during the handshake".into()));
                }
                Ok(Ok(n)) => {
                    self.inbox.truncate(start + n);
                    return Ok(());
                }
                Ok(Err(e)) => {
                    self.inbox.truncate(start);
                    return Err(TlsError(format!("reading the handshake: {e}")));
                }
            }
        }
    }

    /// Writes all of `outbox`, waiting for room.
    async fn flush_all(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Client side, after the handshake: in TLS 1.3 a server judges our certificate only
    /// after our last handshake message, so a handshake that looks complete may still be
    /// refused with an alert. When the server asked for a certificate, wait (within the
    /// caller's bound) for what it sends first: a session ticket or data means it took us
    /// (data stays for the relay), an alert that it did not. No answer in time is taken as
    /// acceptance (a server that sends no ticket and waits for the client).
    pub async fn confirm(&mut self, within: std::time::Duration) -> Result<(), TlsError> {
        let tls13 = self.conn.common().protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        if !(self.cert_asked && tls13) {
            return Ok(());
        }
        let mut got = Vec::new();
        let wait = std::future::poll_fn(|cx| {
            loop {
                let r = self.poll_read(cx, &mut |d| {
                    got.extend_from_slice(d);
                    true
                });
                match r {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(ReadEnd::Again) => {}
                    Poll::Ready(ReadEnd::Moved) => return Poll::Ready(Ok(())),
                    Poll::Ready(ReadEnd::Eof) => {
                        return Poll::Ready(Err(TlsError(
                            "the server closed right after the handshake".into(),
                        )));
                    }
                    Poll::Ready(ReadEnd::Failed(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(ReadEnd::Reset) => {
                        return Poll::Ready(Err(TlsError(
                            "the server reset the connection after the handshake".into(),
                        )));
                    }
                }
            }
        });
        let r = tokio::time::timeout(within, wait).await.unwrap_or(Ok(()));
        if !got.is_empty() {
            // Data the server sent first belongs before anything read later.
            got.extend_from_slice(&self.stash);
            self.stash = got;
        }
        r
    }

    /// What the handshake settled. Call after [`TlsStream::handshake`].
    pub fn info(&self) -> TlsInfo {
        let c = self.conn.common();
        TlsInfo {
            version: match c.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "unknown",
            },
            cipher: c
                .negotiated_cipher_suite()
                .and_then(|s| s.suite().as_str())
                .unwrap_or("unknown"),
            alpn: c.alpn_protocol().map(|p| String::from_utf8_lossy(p).into()),
            resumed: c.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            peer_subject: c
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|ee| super::certs::describe(ee).ok())
                .map(|i| i.subject.into()),
        }
    }

    /// The peer's certificate chain, if it sent one.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.common().peer_certificates()
    }

    /// Reads what the peer sent and hands its plaintext to `deliver`, record by record,
    /// until nothing more is there now (`Pending`), `deliver` asks to stop, or the session
    /// ends. Plaintext left from earlier comes first, before the socket is read.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        deliver: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Poll<ReadEnd> {
        if !self.stash.is_empty() {
            let s = std::mem::take(&mut self.stash);
            deliver(&s);
            return Poll::Ready(ReadEnd::Moved);
        }
        if self.fresh {
            self.fresh = false;
            let mut buf = std::mem::take(&mut self.inbox);
            let (consumed, ev) = self.pump(&mut buf, deliver, &mut WriteOp::None);
            buf.drain(..consumed);
            self.inbox = if buf.is_empty() { Vec::new() } else { buf };
            return Poll::Ready(self.after_pump(ev));
        }
        if self.peer_closed {
            return Poll::Ready(ReadEnd::Eof);
        }
        let Ok(mut rg) = ready!(self.sock.poll_read_ready(cx)) else {
            return Poll::Ready(ReadEnd::Reset);
        };
        if !self.urgent && net::has_urgent_data(&self.sock) {
            self.urgent = true;
        }
        let urgent = self.urgent;
        let carry = self.inbox.len();
        let inbox = &self.inbox;
        let got = RX.with_borrow_mut(|rx| {
            rx[..carry].copy_from_slice(inbox);
            net::recv(&mut rg, &mut rx[carry..carry + RX_READ], urgent)
        });
        drop(rg);
        let got = match got {
            // Drained: the caller polls again, which registers for the next wake-up.
            Recv::Again => return Poll::Ready(ReadEnd::Again),
            Recv::Err(_) => return Poll::Ready(ReadEnd::Reset),
            Recv::Eof => {
                self.peer_closed = true;
                return Poll::Ready(ReadEnd::Eof);
            }
            Recv::Data(n) => n,
        };
        let total = carry + got;
        let ev = RX.with_borrow_mut(|rx| {
            let (consumed, ev) = self.pump(&mut rx[..total], deliver, &mut WriteOp::None);
            self.inbox.clear();
            self.inbox.extend_from_slice(&rx[consumed..total]);
            ev
        });
        if self.inbox.is_empty() {
            self.inbox = Vec::new();
        }
        Poll::Ready(self.after_pump(ev))
    }

    fn after_pump(&mut self, ev: Event) -> ReadEnd {
        match ev {
            Event::Data { stop: true } => {
                // Stopped with records possibly left unprocessed.
                self.fresh = !self.inbox.is_empty();
                ReadEnd::Moved
            }
            Event::PeerClosed | Event::Closed => {
                self.peer_closed = true;
                ReadEnd::Eof
            }
            Event::Failed(e) => ReadEnd::Failed(e.into()),
            Event::NeedInput | Event::Writable | Event::Queued | Event::Data { .. } => {
                ReadEnd::Moved
            }
        }
    }

    /// Ciphertext is waiting to be written.
    pub fn has_output(&self) -> bool {
        self.outpos < self.outbox.len()
    }

    /// Writes queued ciphertext; ready when none is left.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outpos < self.outbox.len() {
            let mut g = ready!(self.sock.poll_write_ready(cx))?;
            match g.try_io(|s| s.get_ref().write(&self.outbox[self.outpos..])) {
                Err(_would_block) => {}
                Ok(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(Ok(n)) => self.outpos += n,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
        if !self.outbox.is_empty() {
            self.outbox = Vec::new();
            self.outpos = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Encrypts all of `plain` and writes what the socket takes now; the rest waits in
    /// `outbox` (see [`TlsStream::poll_flush`]).
    pub fn write_plain(&mut self, plain: &[u8]) -> Result<(), TlsError> {
        if self.closing {
            return Err(TlsError("write after close_notify".into()));
        }
        for chunk in plain.chunks(TX_PLAIN) {
            TX.with_borrow_mut(|tx| -> Result<(), TlsError> {
                let mut op = WriteOp::Data {
                    plain: chunk,
                    out: &mut tx[..],
                    produced: 0,
                };
                self.write_op(&mut op)?;
                let WriteOp::Data { produced, .. } = op else {
                    unreachable!()
                };
                self.send_now(&tx[..produced]);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Queues our close_notify (once); the caller flushes, then shuts the socket's write
    /// side.
    pub fn queue_close(&mut self) -> Result<(), TlsError> {
        if self.closing {
            return Ok(());
        }
        TX.with_borrow_mut(|tx| -> Result<(), TlsError> {
            let mut op = WriteOp::Close {
                out: &mut tx[..],
                produced: 0,
            };
            self.write_op(&mut op)?;
            let WriteOp::Close { produced, .. } = op else {
                unreachable!()
            };
            self.send_now(&tx[..produced]);
            Ok(())
        })?;
        self.closing = true;
        Ok(())
    }

    /// Drives rustls to its `WriteTraffic` state and performs `op` there. Anything else it
    /// reports first is handled on the way (control messages queued; plaintext stashed).
    fn write_op(&mut self, op: &mut WriteOp<'_>) -> Result<(), TlsError> {
        let mut buf = std::mem::take(&mut self.inbox);
        let mut stash = Vec::new();
        let mut result = Ok(());
        let mut consumed = 0;
        for _ in 0..64 {
            let mut to_stash = |d: &[u8]| {
                stash.extend_from_slice(d);
                true
            };
            let (c, ev) = self.pump(&mut buf[consumed..], &mut to_stash, op);
            consumed += c;
            match ev {
                Event::Writable => break,
                Event::PeerClosed | Event::Closed => {
                    // Seen here rather than by the reader: it reads it as EOF.
                    self.peer_closed = true;
                }
                Event::NeedInput => {
                    result = Err(TlsError(
                        "cannot write: the handshake is not complete".into(),
                    ));
                    break;
                }
                Event::Failed(e) => {
                    result = Err(e.into());
                    break;
                }
                Event::Queued | Event::Data { .. } => {}
            }
        }
        buf.drain(..consumed);
        self.inbox = if buf.is_empty() { Vec::new() } else { buf };
        self.stash.extend_from_slice(&stash);
        result
    }

    /// Writes `bytes` now if nothing is queued before them and the socket takes them;
    /// queues the rest.
    fn send_now(&mut self, bytes: &[u8]) {
        let mut sent = 0;
        if !self.has_output() {
            // No syscall unless the socket is known writable; EAGAIN clears that.
            if let Ok(n) = self.sock.try_io(Interest::WRITABLE, |mut s| s.write(bytes)) {
                sent = n;
            }
        }
        if sent < bytes.len() {
            if self.outbox.is_empty() {
                self.outpos = 0;
            }
            self.outbox.extend_from_slice(&bytes[sent..]);
        }
    }

    /// Best effort on an abrupt end (idle timeout, drain): a close_notify if one can be
    /// written at once.
    pub fn close_now(&mut self) {
        if self.queue_close().is_ok() && self.has_output() {
            let _ = self.sock.try_io(Interest::WRITABLE, |mut s| {
                s.write(&self.outbox[self.outpos..])
            });
        }
    }

    /// The peer's close_notify or EOF was seen.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Encrypts and writes all of `data`, waiting for room (outside the relay: health
    /// checks).
    pub async fn send(&mut self, data: &[u8]) -> Result<(), TlsError> {
        self.write_plain(data)?;
        self.flush_all()
            .await
            .map_err(|e| TlsError(format!("writing: {e}")))
    }

    /// Waits for plaintext and appends what arrives to `out`; 0 means the peer closed
    /// (outside the relay: health checks).
    pub async fn recv(&mut self, out: &mut Vec<u8>) -> Result<usize, TlsError> {
        let before = out.len();
        std::future::poll_fn(|cx| {
            loop {
                let r = self.poll_read(cx, &mut |d| {
                    out.extend_from_slice(d);
                    true
                });
                match r {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(ReadEnd::Moved | ReadEnd::Again) => {
                        if out.len() > before {
                            return Poll::Ready(Ok(out.len() - before));
                        }
                    }
                    Poll::Ready(ReadEnd::Eof) => return Poll::Ready(Ok(out.len() - before)),
                    Poll::Ready(ReadEnd::Failed(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(ReadEnd::Reset) => {
                        return Poll::Ready(Err(TlsError("connection reset".into())));
                    }
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TLS session is boxed inside the relay; its own size is what every open TLS
    /// connection pays besides rustls's heap state. Keep it from creeping up.
    #[test]
    fn session_stays_small() {
        let size = std::mem::size_of::<TlsStream>();
        // 1,208 bytes with rustls 0.23.46, nearly all of it rustls's connection state.
        assert!(size <= 1280, "TlsStream is {size} bytes");
    }
}
