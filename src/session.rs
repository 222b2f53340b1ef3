//! One client connection, from accept to the access-log record, as a short pipeline:
//! front-end handshake (PROXY header, ClientHello, TLS) → admission → route → connect
//! (with retries, PROXY header and TLS to the server) → relay → record.
//!
//! Each stage either hands the connection on or refuses it with a [`Refusal`] that says
//! where (its [`Stage`]), how (`Outcome`) and why. The set-up stages run in a boxed future
//! freed once the relay starts, so what an open connection keeps for its lifetime is only
//! the relay's state and what its record needs.

use std::net::SocketAddr;
use std::sync::Arc;
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
use crate::upstream::connect::{self, Client};
use crate::upstream::{Pool, ServerGuard};
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
///
/// Written as a function returning an `async move` block, and with the set-up's result
/// split at once into the two ends and a [`Ledger`], so that an open connection's task
/// keeps each value once: its size is most of what an idle connection costs. (As an
/// `async fn`, parameters that are moved later are kept twice, as the argument and as the
/// local bound to it.)
#[allow(clippy::manual_async_fn)]
pub fn serve(
    client: std::net::TcpStream,
    peer: SocketAddr,
    permit: Permit,
    mut client_permit: Option<ClientPermit>,
    on: Assignment,
) -> impl Future<Output = ()> {
    async move {
        // Every place the connection holds (listener and global limits, per-client
        // limits, server slot, worker count) is given up before its last record is
        // written, so that whoever reads the record can count on the place being free.
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

        let (client, server_end, ledger) =
            match Box::pin(set_up(&l, sock, peer, &mut client_permit)).await {
                Ok(c) => (c.client, c.server, c.ledger),
                Err(SetUpFailed {
                    peer,
                    refusal,
                    front,
                }) => {
                    drop((permit, client_permit, on));
                    let mut rec = Record::new(ts, &l.name, peer, refusal.outcome);
                    rec.reason = refusal.reason.as_deref();
                    rec.server = refusal.server;
                    front.describe(&mut rec);
                    rec.duration_ms = start.elapsed();
                    if refusal.stage == Stage::Connect {
                        return finish(&l, rec);
                    }
                    return l.refuse(&rec);
                }
            };
        let server = ledger.guard.server();
        // Bytes the front end read (a ClientHello to route on) went to the server in the
        // connect stage: they count as relayed, like everything after them.
        if ledger.replayed > 0 {
            for c in [&l.stats.bytes_up, &server.stats.bytes_up] {
                c.fetch_add(ledger.replayed, std::sync::atomic::Ordering::Relaxed);
            }
        }
        if l.access_log.on_connect {
            let mut rec = ledger.record(&l, ts, Outcome::Open);
            rec.event = Some("connect");
            rec.duration_ms = start.elapsed();
            l.access_log.write(&rec);
        }

        let meters = relay::Meters {
            up: [&l.stats.bytes_up, &server.stats.bytes_up],
            down: [&l.stats.bytes_down, &server.stats.bytes_down],
        };
        let mut report = |up: u64, down: u64| {
            let mut rec = ledger.record(&l, ts, Outcome::Open);
            rec.event = Some("progress");
            rec.bytes_up = ledger.replayed + up;
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
            server_end,
            l.idle_timeout,
            l.stop_token(),
            l.engine,
            meters,
            progress,
        )
        .await;
        let Ledger {
            front,
            guard,
            connect_time,
            replayed,
        } = ledger;
        let server_addr = guard.server().addr;
        drop((guard, client_permit, permit, on));
        let mut rec = Record::new(ts, &l.name, front.peer, end_outcome(r.end));
        rec.server = Some(server_addr);
        rec.connect_ms = Some(connect_time);
        front.describe(&mut rec);
        rec.bytes_up = replayed + r.bytes_up;
        rec.bytes_down = r.bytes_down;
        rec.reason = r.reason.as_deref();
        rec.duration_ms = start.elapsed();
        finish(&l, rec);
    }
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
    /// SNI, ALPN and TLS facts: boxed, since a plain TCP connection has none.
    detail: Option<Box<Detail>>,
    /// The pool the connection was routed to.
    pool: Option<Arc<Pool>>,
}

struct Detail {
    sni: Option<Box<str>>,
    /// The first ALPN protocol offered (mode tcp), when routes looked at it.
    alpn_offered: Option<Box<str>>,
    tls: Option<TlsInfo>,
}

impl Front {
    fn new(
        peer: SocketAddr,
        sni: Option<Box<str>>,
        alpn_offered: Option<Box<str>>,
        tls: Option<TlsInfo>,
    ) -> Front {
        let detail = (sni.is_some() || alpn_offered.is_some() || tls.is_some()).then(|| {
            Box::new(Detail {
                sni,
                alpn_offered,
                tls,
            })
        });
        Front {
            peer,
            detail,
            pool: None,
        }
    }

    fn describe<'a>(&'a self, rec: &mut Record<'a>) {
        rec.upstream = self.pool.as_deref().map(|p| p.name.as_str());
        let Some(d) = &self.detail else { return };
        rec.sni = d.sni.as_deref();
        rec.alpn = d.alpn_offered.as_deref();
        if let Some(t) = &d.tls {
            rec.alpn = t.alpn.as_deref();
            rec.tls_version = Some(t.version);
            rec.tls_cipher = Some(t.cipher);
            rec.client_cert = t.peer_subject.as_deref();
        }
    }

    fn sni(&self) -> Option<&str> {
        self.detail.as_ref().and_then(|d| d.sni.as_deref())
    }

    fn tls(&self) -> Option<&TlsInfo> {
        self.detail.as_ref().and_then(|d| d.tls.as_ref())
    }
}

/// What a relayed connection's record needs at its end, and its claim on the server.
struct Ledger {
    front: Front,
    guard: ServerGuard,
    connect_time: std::time::Duration,
    /// Bytes read from the client before the relay and sent to the server at connect.
    replayed: u64,
}

impl Ledger {
    /// A record with what is known once the server connection is up.
    fn record<'a>(&'a self, l: &'a ListenerCtx, ts: SystemTime, result: Outcome) -> Record<'a> {
        let mut rec = Record::new(ts, &l.name, self.front.peer, result);
        rec.server = Some(self.guard.server().addr);
        rec.connect_ms = Some(self.connect_time);
        self.front.describe(&mut rec);
        rec
    }
}

/// A connection whose server connection is up.
struct Connected {
    client: Stream,
    server: Stream,
    ledger: Ledger,
}

struct SetUpFailed {
    peer: SocketAddr,
    refusal: Refusal,
    front: Front,
}

/// Handshake, route and connect. `client_permit` is the connection's place under the
/// per-client limits: checked by the accept loop, or here behind a PROXY header.
async fn set_up(
    l: &ListenerCtx,
    sock: Sock,
    peer: SocketAddr,
    client_permit: &mut Option<ClientPermit>,
) -> Result<Connected, SetUpFailed> {
    let a: Accepted = frontend::handshake(l, sock, peer, client_permit.take())
        .await
        .map_err(|f: Failed| SetUpFailed {
            peer: f.peer,
            front: Front::new(f.peer, f.sni, None, None),
            refusal: f.refusal,
        })?;
    *client_permit = a.client_permit;
    let mut front = Front::new(
        a.peer,
        a.sni,
        a.alpn_offered
            .first()
            .map(|p| String::from_utf8_lossy(p).into()),
        a.tls,
    );

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
        sni: front.sni(),
        alpn: match front.tls() {
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
    front.pool = Some(pool.clone());
    let client = Client {
        peer: a.peer,
        destination: a.destination,
        sock: client_sock,
        replay: &a.replay,
    };
    match connect::connect(&pool, client, l.stop_token()).await {
        Ok(up) => Ok(Connected {
            client: a.stream,
            server: up.stream,
            ledger: Ledger {
                front,
                guard: up.guard,
                connect_time: up.connect_time,
                replayed: a.replay.len() as u64,
            },
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
