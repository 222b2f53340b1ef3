//! One client connection, from accept to the access-log record, as a short pipeline:
//! front-end handshake (PROXY header, ClientHello, TLS) → admission → route → connect
//! (with retries, PROXY header and TLS to the server) → relay → record.
//!
//! Each stage either hands the connection on or refuses it with a [`Refusal`] that says
//! where (its [`Stage`]), how (`Outcome`) and why. The set-up stages run in a boxed future
//! freed once the relay starts, so what an open connection keeps for its lifetime is only
//! the relay's state and what its record needs.

use std::net::SocketAddr;
use std::time::SystemTime;

use tokio::time::Instant;

use crate::frontend::{self, Accepted, Failed};
use crate::listener::{ListenerCtx, Permit};
use crate::net::{self, Sock};
use crate::observe::{Outcome, Record};
use crate::policy::ClientPermit;
use crate::relay::{self, End, Stream};
use crate::route::{Alpn, Facts};
use crate::tls::TlsInfo;
use crate::upstream::connect::{self, Client, Upstream};
use crate::workers::Assignment;

/// Where in the pipeline a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The front-end handshake (PROXY header, ClientHello, TLS) failed.
    Handshake,
    /// The ACL or a per-client limit refused the real client.
    Admission,
    /// No route matched and the listener has no default upstream.
    Route,
    /// No server could be claimed or connected to.
    Connect,
}

/// Why a connection ends before its relay starts.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub stage: Stage,
    pub outcome: Outcome,
    /// More than the outcome says, for the record's `reason`.
    pub reason: Option<String>,
    /// The server last tried (stage `Connect`).
    pub server: Option<SocketAddr>,
}

/// Serves one accepted client connection to its end, on the worker it was assigned to
/// (`on`, its place in that worker's count, held until the end). `permit` holds the
/// connection's place under the listener's and the global connection limits until it is
/// dropped here; `client_permit` its place under the per-client limits, when the accept
/// loop already checked the client (without a PROXY header to read).
pub async fn serve(
    client: std::net::TcpStream,
    peer: SocketAddr,
    permit: Permit,
    client_permit: Option<ClientPermit>,
    on: Assignment,
) {
    // Every place the connection holds (listener and global limits, per-client limits,
    // server slot, worker count) is given up before its last record is written, so that
    // whoever reads the record can count on the place being free.
    let l = permit.ctx();
    let ts = SystemTime::now();
    let start = Instant::now();
    // Registered here, with the reactor of the worker that serves it.
    let sock: Sock = match net::register(client) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(listener = %l.name, client = %peer, "cannot register the connection: {e}");
            drop((permit, client_permit, on));
            let mut rec = Record::new(ts, &l.name, peer, Outcome::Limited);
            rec.reason = Some("cannot register the socket");
            return l.refuse(&rec);
        }
    };

    let set_up = match Box::pin(set_up(&l, sock, peer, client_permit)).await {
        Ok(c) => c,
        Err(SetUpFailed {
            peer,
            refusal,
            front,
        }) => {
            drop((permit, on));
            let mut rec = Record::new(ts, &l.name, peer, refusal.outcome);
            rec.reason = refusal.reason.as_deref();
            rec.server = refusal.server;
            front.describe(&mut rec);
            rec.duration_ms = start.elapsed();
            if refusal.stage == Stage::Connect {
                rec.upstream = front.upstream.as_deref();
                return finish(&l, rec);
            }
            return l.refuse(&rec);
        }
    };
    let Connected {
        upstream,
        client,
        front,
        client_permit,
        replayed,
    } = set_up;
    let server = upstream.guard.server().clone();
    // Bytes the front end read (a ClientHello to route on) went to the server in the
    // connect stage: they count as relayed, like everything after them.
    if replayed > 0 {
        l.stats
            .bytes_up
            .fetch_add(replayed, std::sync::atomic::Ordering::Relaxed);
        server
            .stats
            .bytes_up
            .fetch_add(replayed, std::sync::atomic::Ordering::Relaxed);
    }
    let upstream_name = front.upstream.as_deref();
    let connect_time = upstream.connect_time;
    let base = |result| {
        let mut rec = Record::new(ts, &l.name, front.peer, result);
        rec.upstream = upstream_name;
        rec.server = Some(server.addr);
        rec.connect_ms = Some(connect_time);
        front.describe(&mut rec);
        rec
    };
    if l.access_log.on_connect {
        let mut rec = base(Outcome::Open);
        rec.event = Some("connect");
        rec.duration_ms = start.elapsed();
        l.access_log.write(&rec);
    }

    let meters = relay::Meters {
        up: [&l.stats.bytes_up, &server.stats.bytes_up],
        down: [&l.stats.bytes_down, &server.stats.bytes_down],
    };
    let mut report = |up: u64, down: u64| {
        let mut rec = base(Outcome::Open);
        rec.event = Some("progress");
        rec.bytes_up = replayed + up;
        rec.bytes_down = down;
        rec.duration_ms = start.elapsed();
        l.access_log.write(&rec);
    };
    let progress = l.access_log.interval.map(|every| relay::Progress {
        every,
        report: &mut report,
    });
    let r = relay::relay(
        client,
        upstream.stream,
        l.idle_timeout,
        l.stop_token(),
        l.engine,
        meters,
        progress,
    )
    .await;
    drop((upstream.guard, client_permit, permit, on));
    let mut rec = Record::new(ts, &l.name, front.peer, end_outcome(r.end));
    rec.upstream = upstream_name;
    rec.server = Some(server.addr);
    rec.connect_ms = Some(connect_time);
    front.describe(&mut rec);
    rec.bytes_up = replayed + r.bytes_up;
    rec.bytes_down = r.bytes_down;
    rec.reason = r.reason.as_deref();
    rec.duration_ms = start.elapsed();
    finish(&l, rec);
}

fn end_outcome(end: End) -> Outcome {
    match end {
        End::Done => Outcome::Ok,
        End::IdleTimeout => Outcome::IdleTimeout,
        End::ClientReset => Outcome::ClientReset,
        End::ServerReset => Outcome::ServerReset,
        End::Drained => Outcome::Drained,
    }
}

/// What the front end learned that the record shows, kept for the connection's life.
struct Front {
    /// The client: the real one behind a PROXY header.
    peer: SocketAddr,
    sni: Option<Box<str>>,
    /// The first ALPN protocol offered (mode tcp), when routes looked at it.
    alpn_offered: Option<Box<str>>,
    tls: Option<TlsInfo>,
    /// The upstream the connection was routed to.
    upstream: Option<Box<str>>,
}

impl Front {
    fn describe<'a>(&'a self, rec: &mut Record<'a>) {
        rec.sni = self.sni.as_deref();
        rec.alpn = self.alpn_offered.as_deref();
        if let Some(t) = &self.tls {
            rec.alpn = t.alpn.as_deref();
            rec.tls_version = Some(t.version);
            rec.tls_cipher = Some(t.cipher);
            rec.client_cert = t.peer_subject.as_deref();
        }
    }
}

/// A connection whose server connection is up.
struct Connected {
    upstream: Upstream,
    client: Stream,
    front: Front,
    client_permit: Option<ClientPermit>,
    /// Bytes read from the client before the relay and sent to the server at connect.
    replayed: u64,
}

struct SetUpFailed {
    peer: SocketAddr,
    refusal: Refusal,
    front: Front,
}

/// Handshake, route and connect.
async fn set_up(
    l: &ListenerCtx,
    sock: Sock,
    peer: SocketAddr,
    client_permit: Option<ClientPermit>,
) -> Result<Connected, SetUpFailed> {
    let a: Accepted = frontend::handshake(l, sock, peer, client_permit)
        .await
        .map_err(|f: Failed| SetUpFailed {
            peer: f.peer,
            front: Front {
                peer: f.peer,
                sni: f.sni,
                alpn_offered: None,
                tls: None,
                upstream: None,
            },
            refusal: f.refusal,
        })?;
    let mut front = Front {
        peer: a.peer,
        sni: a.sni,
        alpn_offered: a
            .alpn_offered
            .first()
            .map(|p| String::from_utf8_lossy(p).into()),
        tls: a.tls,
        upstream: None,
    };

    let client_sock = match &a.stream {
        Stream::Plain(s) => s,
        Stream::Tls(t) => t.sock(),
    };
    let port = if l.router.needs_port() {
        a.destination
            .or_else(|| client_sock.get_ref().local_addr().ok())
            .map_or(0, |d| d.port())
    } else {
        0
    };
    let facts = Facts {
        sni: front.sni.as_deref(),
        alpn: match &front.tls {
            Some(t) => Alpn::Agreed(t.alpn.as_deref()),
            None => Alpn::Offered(&a.alpn_offered),
        },
        source: a.peer.ip(),
        port,
    };
    let Some(routed) = l.router.route(&facts) else {
        close(a.stream);
        return Err(SetUpFailed {
            peer: a.peer,
            refusal: Refusal {
                stage: Stage::Route,
                outcome: Outcome::NoServer,
                reason: Some("no route matched".into()),
                server: None,
            },
            front,
        });
    };
    let pool = routed.pool.clone();
    front.upstream = Some(pool.name.as_str().into());
    let client = Client {
        peer: a.peer,
        destination: a.destination,
        sock: client_sock,
        replay: &a.replay,
    };
    match connect::connect(&pool, client, l.stop_token()).await {
        Ok(upstream) => Ok(Connected {
            upstream,
            client: a.stream,
            front,
            client_permit: a.client_permit,
            replayed: a.replay.len() as u64,
        }),
        Err(refusal) => {
            close(a.stream);
            Err(SetUpFailed {
                peer: a.peer,
                refusal,
                front,
            })
        }
    }
}

/// Closes a client refused after its handshake: with a reset for a plain socket, as every
/// refused connection; a TLS client gets a close_notify first.
fn close(s: Stream) {
    match s {
        Stream::Plain(s) => net::close_with_reset(s),
        Stream::Tls(mut t) => t.close_now(),
    }
}

fn finish(l: &ListenerCtx, rec: Record<'_>) {
    l.stats.finish(rec.result);
    l.access_log.write(&rec);
}
