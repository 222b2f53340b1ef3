//! The front-end stage: what happens to an accepted connection before it is routed.
//!
//! Per listener mode ([`FrontEnd`], with the mode's settings), one handshake turns the
//! accepted socket into an [`Accepted`]: the real client (after a PROXY header), what
//! routing may look at (SNI, ALPN), the client end of the relay (a plain socket or a TLS
//! session), and any bytes already read from the client that the server must still get (a
//! ClientHello read to route on is replayed, not peeked: a peek loop on an edge-triggered
//! socket spins). Or a [`Refusal`] with its stage, outcome and reason, the socket already
//! closed.
//!
//! - mode `tcp`: the PROXY header if configured; then, only if a route matches on SNI or
//!   ALPN, the TLS ClientHello (a client that is not TLS takes the default route).
//! - mode `tls`: the PROXY header if configured, the ClientHello, the TLS handshake.
//! - modes `socks5` and `http-connect`: the PROXY header if configured, then the proxy
//!   protocol's handshake up to the client's request (`socks5.rs`, `http_proxy.rs`); the
//!   answer to it comes after the connect (`forward::Reply`).
//! - mode `transparent`: the PROXY header if configured, and the original destination
//!   (`transparent.rs`).
//!
//! The whole handshake runs within the listener's `handshake_timeout`: a client that
//! sends half a header or half a ClientHello and stops is closed (`protocol_error`) and
//! holds nothing after that.
//!
//! The handshake reads its listener's settings through the [`Listener`] trait, which the
//! listener's context implements.

pub mod forward;
mod hello;
mod http_proxy;
mod proxy_header;
mod socks5;
mod transparent;

pub use forward::{Forwarding, Request, Transparent};

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ProxyAccept;
use crate::net::{self, Sock};
use crate::observe::{ListenerStats, Outcome};
use crate::observe::{Refusal, Stage};
use crate::policy::{self, ClientPermit};
use crate::relay::Stream;
use crate::tls::{ServerTls, TlsInfo, TlsStream};
use crate::wire::proxy::Addresses;

/// A listener's front-end handshake, by mode, with that mode's settings.
pub enum FrontEnd {
    /// Plain TCP; the ClientHello is read only if a route needs it.
    Tcp,
    /// TLS terminated with these settings.
    Tls(Arc<ServerTls>),
    /// A SOCKS5 server; `udp`: UDP ASSOCIATE allowed.
    Socks5 { forward: Arc<Forwarding>, udp: bool },
    /// An HTTP proxy (CONNECT and absolute-form requests).
    HttpConnect {
        forward: Arc<Forwarding>,
        sni_must_match: bool,
    },
    /// Redirected connections, to their original destination (or the default upstream).
    Transparent(Arc<Transparent>),
    /// A UDP listener: no handshake; `udp::serve` starts its sessions with these settings.
    Udp(crate::udp::Settings),
}

impl FrontEnd {
    pub fn mode(&self) -> &'static str {
        match self {
            FrontEnd::Tcp => "tcp",
            FrontEnd::Tls(_) => "tls",
            FrontEnd::Socks5 { .. } => "socks5",
            FrontEnd::HttpConnect { .. } => "http-connect",
            FrontEnd::Transparent(_) => "transparent",
            FrontEnd::Udp(_) => "udp",
        }
    }
}

/// What a handshake needs of the listener it runs for: implemented by the listener's
/// settings (`listener::ListenerCtx`), which a connection keeps from its accept on.
pub trait Listener {
    /// The listener's name, for the process log.
    fn name(&self) -> &str;
    /// Its mode, with that mode's settings.
    fn front(&self) -> &FrontEnd;
    /// The whole handshake (PROXY header included) runs within this.
    fn handshake_timeout(&self) -> Duration;
    /// How a PROXY header is read, if the listener takes one.
    fn proxy(&self) -> Option<&ProxyAccept>;
    /// A route matches on SNI or ALPN: mode `tcp` reads the ClientHello.
    fn needs_hello(&self) -> bool;
    /// Its counters (TLS handshakes).
    fn stats(&self) -> &ListenerStats;
    /// Admits the real client a PROXY header names: the ACL, then the per-client limits.
    fn admit_client(&self, ip: IpAddr) -> Result<Option<ClientPermit>, Outcome>;
}

/// A client connection ready to be routed.
pub struct Accepted {
    /// The client: the real one behind a PROXY header.
    pub peer: SocketAddr,
    /// Where the client connected to, as a PROXY header gave it.
    pub destination: Option<SocketAddr>,
    pub stream: Stream,
    /// Bytes read from the client that the server must get first.
    pub replay: Vec<u8>,
    /// SNI, lowercased (from the ClientHello).
    pub sni: Option<Box<str>>,
    /// ALPN protocols the ClientHello offers (mode tcp).
    pub alpn_offered: Vec<Vec<u8>>,
    /// What a terminated handshake settled (mode tls).
    pub tls: Option<TlsInfo>,
    /// The client's place under the per-client limits, when checked here.
    pub client_permit: Option<ClientPermit>,
    /// Forward-proxy modes: where the client asked to go (transparent: the original
    /// destination).
    pub request: Option<Request>,
    /// The name the client authenticated with, for the record.
    pub user: Option<Box<str>>,
    /// The destination as the client asked for it, for the record.
    pub asked: Option<Box<str>>,
}

/// What a failed handshake leaves for the record.
pub struct Failed {
    pub peer: SocketAddr,
    pub refusal: Refusal,
    pub sni: Option<Box<str>>,
    pub user: Option<Box<str>>,
    pub destination: Option<Box<str>>,
}

/// A forward-proxy handshake's exchange with the client so far.
#[derive(Default)]
pub(crate) struct Talk {
    /// Something was written to the client (an answer that must be read, so the socket is
    /// closed with a FIN, not reset).
    pub answered: bool,
    /// The user name the client gave.
    pub user: Option<Box<str>>,
    /// The destination it asked for, as it named it.
    pub destination: Option<Box<str>>,
}

/// Reads more of a handshake message from `sock` into `buf` (`what` names it in errors);
/// refuses a message longer than `max`.
pub(crate) async fn fill(
    sock: &Sock,
    buf: &mut Vec<u8>,
    max: usize,
    what: &str,
) -> Result<(), Refusal> {
    if buf.len() >= max {
        return Err(Refusal::handshake(format!(
            "{what} is longer than {max} bytes"
        )));
    }
    let n = hello::read_some(sock, buf, max - buf.len())
        .await
        .map_err(|e| Refusal::handshake(format!("reading {what}: {e}")))?;
    if n == 0 {
        return Err(Refusal::handshake(if buf.is_empty() {
            "closed before sending anything".to_string()
        } else {
            format!("closed in the middle of {what}")
        }));
    }
    Ok(())
}

/// Runs the listener's front-end handshake on `sock` within its `handshake_timeout`.
/// `client_permit` is the accept loop's admission (without a PROXY header to read);
/// otherwise the real client is admitted here. On failure the socket is closed.
pub async fn handshake(
    l: &impl Listener,
    sock: Sock,
    peer: SocketAddr,
    client_permit: Option<ClientPermit>,
) -> Result<Accepted, Failed> {
    let mut state = State {
        peer,
        destination: None,
        client_permit,
        sni: None,
        sock: Some(sock),
        tls_started: false,
        talk: Talk::default(),
    };
    let started = Instant::now();
    let r = tokio::time::timeout(l.handshake_timeout(), run(l, &mut state)).await;
    let refusal = match r {
        Ok(Ok(a)) => return Ok(a),
        Ok(Err(refusal)) => refusal,
        Err(_) => Refusal::handshake(format!(
            "handshake not complete within {:?}",
            l.handshake_timeout()
        )),
    };
    // On a TLS listener, every failure from the ClientHello on is a failed TLS handshake
    // (a PROXY header or admission failure before it is not).
    if state.tls_started && refusal.stage == Stage::Handshake {
        l.stats()
            .tls_failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    tracing::debug!(listener = %l.name(), client = %state.peer, took = ?started.elapsed(), "front-end handshake failed: {}", refusal.reason.as_deref().unwrap_or(refusal.outcome.as_str()));
    // A socket still here was not handed to a TLS session (which closes its own): reset
    // it, as every refused connection is, unless it was sent an answer to read.
    if let Some(s) = state.sock.take()
        && !state.talk.answered
    {
        net::close_with_reset(s);
    }
    Err(Failed {
        peer: state.peer,
        refusal,
        sni: state.sni,
        user: state.talk.user,
        destination: state.talk.destination,
    })
}

/// What the handshake has learned so far (kept when it times out).
struct State {
    peer: SocketAddr,
    destination: Option<SocketAddr>,
    client_permit: Option<ClientPermit>,
    sni: Option<Box<str>>,
    /// The client socket until a stream owns it.
    sock: Option<Sock>,
    /// A TLS listener has started reading the ClientHello.
    tls_started: bool,
    talk: Talk,
}

async fn run(l: &impl Listener, st: &mut State) -> Result<Accepted, Refusal> {
    let Some(sock) = st.sock.as_ref() else {
        return Err(Refusal::handshake("no socket"));
    };
    // The PROXY header, from trusted sources only; its source address then stands for the
    // client everywhere (ACL, limits, hashing, affinity, logs).
    if let Some(pp) = l.proxy() {
        let header = if !policy::contains(&pp.trusted, st.peer.ip()) {
            Err(proxy_header::HeaderError::Untrusted(st.peer))
        } else {
            match tokio::time::timeout(pp.timeout, proxy_header::read(sock, pp.accept)).await {
                Ok(r) => r,
                Err(_) => Err(proxy_header::HeaderError::Timeout(pp.timeout)),
            }
        };
        match header {
            Ok(Addresses::Proxied {
                source,
                destination,
            }) => {
                st.peer = source;
                st.destination = Some(destination);
            }
            Ok(Addresses::Local) => {}
            Err(e) => return Err(Refusal::handshake(e.to_string())),
        }
        st.client_permit = l.admit_client(st.peer.ip()).map_err(|o| Refusal {
            stage: Stage::Admission,
            outcome: o,
            reason: None,
            server: None,
        })?;
    }

    match l.front() {
        // Its sockets are UDP: no connection is ever accepted on it.
        FrontEnd::Udp(_) => Err(Refusal::handshake("a UDP listener has no connections")),
        FrontEnd::Tcp => {
            let mut replay = Vec::new();
            let mut alpn_offered = Vec::new();
            if l.needs_hello() {
                // Not TLS (`None`): routes on SNI and ALPN do not match.
                if let Some(h) = hello::read(sock, &mut replay).await? {
                    st.sni = h.sni.map(Into::into);
                    alpn_offered = h.alpn;
                }
            }
            let sock = st
                .sock
                .take()
                .ok_or_else(|| Refusal::handshake("no socket"))?;
            Ok(Accepted {
                peer: st.peer,
                destination: st.destination,
                stream: Stream::Plain(sock),
                replay,
                sni: st.sni.take(),
                alpn_offered,
                tls: None,
                client_permit: st.client_permit.take(),
                request: None,
                user: None,
                asked: None,
            })
        }
        FrontEnd::Socks5 { forward, udp } => {
            let (request, replay) = socks5::handshake(sock, forward, *udp, &mut st.talk).await?;
            st.forwarded(request, replay)
        }
        FrontEnd::HttpConnect { forward, .. } => {
            let (request, replay) = http_proxy::handshake(sock, forward, &mut st.talk).await?;
            st.forwarded(request, replay)
        }
        FrontEnd::Transparent(t) => {
            // Behind a PROXY header, its destination is the original one.
            let dst = match st.destination {
                Some(d) => d,
                None => transparent::original_destination(sock, t.interception)?,
            };
            let target = crate::upstream::dial::Target::addr(dst);
            st.talk.destination = Some(target.to_string().into());
            let request = Request {
                target,
                user: None,
                reply: forward::Reply::None,
                associate: false,
            };
            st.forwarded(request, Vec::new())
        }
        FrontEnd::Tls(tls) => {
            st.tls_started = true;
            let started = Instant::now();
            let mut bytes = Vec::new();
            let h = hello::read(sock, &mut bytes).await?.ok_or_else(|| {
                Refusal::handshake("not TLS: the first bytes are not a ClientHello")
            })?;
            st.sni = h.sni.map(Into::into);
            let sock = st
                .sock
                .take()
                .ok_or_else(|| Refusal::handshake("no socket"))?;
            let fail = Refusal::handshake;
            let mut t = Box::new(
                TlsStream::server(sock, tls.config_for(h.prefers_chacha), bytes)
                    .map_err(|e| fail(e.0))?,
            );
            // On failure the session is dropped here: the alert rustls queued has been
            // written, and the socket closes with a FIN so that the client can read it.
            t.handshake().await.map_err(|e| fail(e.0))?;
            let info = t.info();
            tls.check_peer(&info, t.peer_certificates())
                .map_err(|e| fail(e.to_string()))?;
            let counter = if info.resumed {
                &l.stats().tls_resumed
            } else {
                &l.stats().tls_full
            };
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            l.stats().tls_handshake.observe(started.elapsed());
            Ok(Accepted {
                peer: st.peer,
                destination: st.destination,
                stream: Stream::Tls(t),
                replay: Vec::new(),
                sni: st.sni.take(),
                alpn_offered: Vec::new(),
                tls: Some(info),
                client_permit: st.client_permit.take(),
                request: None,
                user: None,
                asked: None,
            })
        }
    }
}

/// Reads a TLS ClientHello into `buf` (kept for the server): `Some(sni)` if the client
/// speaks TLS, `None` if it does not.
pub async fn read_hello(
    sock: &Sock,
    buf: &mut Vec<u8>,
) -> Result<Option<Option<Box<str>>>, Refusal> {
    Ok(hello::read(sock, buf).await?.map(|h| h.sni.map(Into::into)))
}

impl State {
    /// A forward-proxy handshake's result.
    fn forwarded(&mut self, request: Request, replay: Vec<u8>) -> Result<Accepted, Refusal> {
        let sock = self
            .sock
            .take()
            .ok_or_else(|| Refusal::handshake("no socket"))?;
        // A UDP association's target is only where the client will send from: its record
        // names no destination.
        let asked = self.talk.destination.take().filter(|_| !request.associate);
        Ok(Accepted {
            peer: self.peer,
            destination: self.destination,
            stream: Stream::Plain(sock),
            replay,
            sni: None,
            alpn_offered: Vec::new(),
            tls: None,
            client_permit: self.client_permit.take(),
            request: Some(request),
            user: self.talk.user.take(),
            asked,
        })
    }
}

impl Refusal {
    /// A client the front end refuses: `denied` (authentication, a command not allowed).
    pub fn denied(reason: impl Into<String>) -> Refusal {
        Refusal::with(Outcome::Denied, reason)
    }

    /// A front-end failure with its outcome.
    pub fn with(outcome: Outcome, reason: impl Into<String>) -> Refusal {
        Refusal {
            stage: Stage::Handshake,
            outcome,
            reason: Some(reason.into()),
            server: None,
        }
    }

    /// A front-end handshake that failed: `protocol_error`.
    pub fn handshake(reason: impl Into<String>) -> Refusal {
        Refusal {
            stage: Stage::Handshake,
            outcome: Outcome::ProtocolError,
            reason: Some(reason.into()),
            server: None,
        }
    }
}
