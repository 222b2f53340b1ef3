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
use crate::observe::{Outcome, Record, Refusal, Stage};
use crate::policy::ClientPermit;
use crate::relay::{self, End, Stream};
use crate::route::{Alpn, Facts};
use crate::tls::TlsInfo;
use crate::upstream::connect::{self, Client};
use crate::upstream::{Pool, ServerGuard};
use crate::workers::Assignment;

/// Where the bytes of connections to no pool's server (a destination a forward-proxy client
/// named) are counted for the server side: nothing reads it.
static UNPOOLED: std::sync::LazyLock<crate::observe::Counter> =
    std::sync::LazyLock::new(crate::observe::Counter::new);

/// Admits an accepted connection under the limits (and, without a PROXY header to read,
/// the ACL and per-client limits) and starts its session on the worker chosen for it (worker `me` accepted it, or
/// [`Workers::assign`](crate::workers::Workers::assign) hands it to a less busy one), or
/// refuses it at once.
pub fn admit(
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: &crate::listener::Slot,
    tracker: &tokio_util::task::TaskTracker,
    workers: &Arc<crate::workers::Workers>,
    me: usize,
) {
    let l = slot.load_full();
    let Some(permit) = Permit::try_new(&l) else {
        crate::net::close_with_reset(stream);
        l.refuse(&Record::new(
            SystemTime::now(),
            &l.name,
            peer,
            Outcome::Limited,
        ));
        return;
    };
    // With a PROXY header, the session checks the address the header carries.
    let client_permit = if l.proxy.is_none() {
        match l.admit_client(peer.ip()) {
            Ok(p) => p,
            Err(outcome) => {
                crate::net::close_with_reset(stream);
                l.refuse(&Record::new(SystemTime::now(), &l.name, peer, outcome));
                return;
            }
        }
    } else {
        None
    };
    let on = workers.assign(me);
    if on.worker() == me {
        tracker.spawn(serve(stream, peer, permit, client_permit, on));
    } else {
        let handle = on.handle().clone();
        tracker.spawn_on(serve(stream, peer, permit, client_permit, on), &handle);
    }
}

/// Serves one accepted client connection to its end, on the worker it was assigned to
/// (`on`, its place in that worker's count, held until the end). `permit` holds the
/// connection's place under the listener's and the global connection limits until it is
/// dropped here; `client_permit` its place under the per-client limits, when the accept
/// loop already checked the client (without a PROXY header to read).
///
/// Written as a function returning an `async move` block, and with the set-up's result
/// split at once into the two ends and a `Ledger`, so that an open connection's task
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
        // Bounded by default: what a client that never reads can make the kernel hold.
        if let Err(e) = net::set_buffers(&client, l.buffers) {
            tracing::debug!(listener = %l.name, client = %peer, "socket buffers: {e}");
        }
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
                Ok(Next::Relay(c)) => (c.client, c.server, c.ledger),
                Ok(Next::Udp(u)) => {
                    drop((permit, client_permit, on));
                    let mut rec = Record::new(ts, &l.name, u.front.peer, u.outcome);
                    u.front.describe(&mut rec);
                    rec.bytes_up = u.counts.bytes_up;
                    rec.bytes_down = u.counts.bytes_down;
                    rec.datagrams_up = Some(u.counts.datagrams_up);
                    rec.datagrams_down = Some(u.counts.datagrams_down);
                    let note = format!("UDP ASSOCIATE; {} datagram(s) dropped", u.counts.dropped);
                    rec.reason = Some(&note);
                    rec.duration_ms = start.elapsed();
                    return finish(&l, rec);
                }
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
        // A destination a forward-proxy client named is no pool's server: its bytes count
        // for the listener only (and in these, which nothing reads).
        let (server_up, server_down) = match &ledger.guard {
            Some(g) => (&g.server().stats.bytes_up, &g.server().stats.bytes_down),
            None => (&*UNPOOLED, &*UNPOOLED),
        };
        // Bytes the front end read (a ClientHello to route on, what a proxy client sent
        // after its request) went to the server in the connect stage: they count as
        // relayed, like everything after them.
        if ledger.replayed > 0 {
            for c in [&l.stats.bytes_up, server_up] {
                c.add(ledger.replayed);
            }
        }
        if l.access_log.on_connect {
            let mut rec = ledger.record(&l, ts, Outcome::Open);
            rec.event = Some("connect");
            rec.duration_ms = start.elapsed();
            l.access_log.write(&rec);
        }

        let meters = relay::Meters {
            up: [&l.stats.bytes_up, server_up],
            down: [&l.stats.bytes_down, server_down],
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
        let settings = relay::Settings {
            idle_timeout: l.idle_timeout,
            engine: l.engine,
            client_buffers: l.buffers,
            // A destination a forward-proxy client named is dialled with the defaults.
            server_buffers: ledger
                .front
                .pool
                .as_ref()
                .map_or_else(Default::default, |p| p.tcp.buffers),
        };
        let r = relay::relay(
            client,
            server_end,
            settings,
            l.stop_token(),
            meters,
            progress,
        )
        .await;
        let Ledger {
            front,
            guard,
            server: server_addr,
            connect_time,
            replayed,
        } = ledger;
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

#[derive(Default)]
struct Detail {
    sni: Option<Box<str>>,
    /// The first ALPN protocol offered (mode tcp), when routes looked at it.
    alpn_offered: Option<Box<str>>,
    tls: Option<TlsInfo>,
    /// Forward-proxy modes: the user and the destination asked for.
    user: Option<Box<str>>,
    destination: Option<Box<str>>,
}

impl Front {
    fn new(peer: SocketAddr, d: Detail) -> Front {
        let detail = (d.sni.is_some()
            || d.alpn_offered.is_some()
            || d.tls.is_some()
            || d.user.is_some()
            || d.destination.is_some())
        .then(|| Box::new(d));
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
        rec.user = d.user.as_deref();
        rec.destination = d.destination.as_deref();
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
    /// The claim on a pool's server (none for a destination a client named).
    guard: Option<ServerGuard>,
    /// The address connected to.
    server: SocketAddr,
    connect_time: std::time::Duration,
    /// Bytes read from the client before the relay and sent to the server at connect.
    replayed: u64,
}

impl Ledger {
    /// A record with what is known once the server connection is up.
    fn record<'a>(&'a self, l: &'a ListenerCtx, ts: SystemTime, result: Outcome) -> Record<'a> {
        let mut rec = Record::new(ts, &l.name, self.front.peer, result);
        rec.server = Some(self.server);
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

/// What the set-up hands on: a connection to relay, or a SOCKS5 UDP association that has
/// already run its course (it runs within the set-up, whose state is only its own).
enum Next {
    Relay(Connected),
    Udp(UdpDone),
}

struct UdpDone {
    front: Front,
    outcome: Outcome,
    counts: crate::socks_udp::Counts,
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
) -> Result<Next, SetUpFailed> {
    let mut a: Accepted = frontend::handshake(l, sock, peer, client_permit.take())
        .await
        .map_err(|f: Failed| SetUpFailed {
            peer: f.peer,
            front: Front::new(
                f.peer,
                Detail {
                    sni: f.sni,
                    user: f.user,
                    destination: f.destination,
                    ..Detail::default()
                },
            ),
            refusal: f.refusal,
        })?;
    *client_permit = a.client_permit.take();
    let request = a.request.take();
    let mut front = Front::new(
        a.peer,
        Detail {
            sni: a.sni.take(),
            alpn_offered: a
                .alpn_offered
                .first()
                .map(|p| String::from_utf8_lossy(p).into()),
            tls: a.tls.take(),
            user: a.user.take(),
            destination: a.asked.take(),
        },
    );
    if let Some(req) = request {
        // Transparent mode with an upstream goes on to it, once the original destination
        // passed its checks; every other forward request goes where it asked.
        if let Err(e) = forward::check_transparent(l, &req) {
            return Err(forward::refuse(l, a, &req, front, e, None).await);
        }
        if req.associate {
            return forward::associate(l, a, req, front).await;
        }
        if l.router.default().is_none() {
            return forward::connect(l, a, req, front).await.map(Next::Relay);
        }
    }

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
        mark: l.mark(),
    };
    match connect::connect(&pool, client, l.stop_token()).await {
        Ok(up) => Ok(Next::Relay(Connected {
            client: a.stream,
            server: up.stream,
            ledger: Ledger {
                front,
                server: up.guard.server().addr,
                guard: Some(up.guard),
                connect_time: up.connect_time,
                replayed: a.replay.len() as u64,
            },
        })),
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

/// The forward-proxy modes' connect stage: to the destination the client asked for.
mod forward {
    use super::*;
    use crate::frontend::forward::Reply;
    use crate::frontend::{FrontEnd, Request};
    use crate::upstream::dial::{self, DialError, Host, Policy};

    /// Transparent mode: a connection to ferry itself (not redirected, or looping back) is
    /// refused, and with an upstream, `destinations` (if given) filters original
    /// destinations.
    pub(super) fn check_transparent(l: &ListenerCtx, req: &Request) -> Result<(), DialError> {
        let FrontEnd::Transparent(t) = &l.front else {
            return Ok(());
        };
        let Host::Ip(ip) = req.target.host else {
            return Ok(());
        };
        let dst = SocketAddr::new(ip, req.target.port);
        if t.own.load().contains(dst) {
            return Err(DialError::Denied(format!(
                "the original destination {dst} is ferry's own listening address (a connection made to it directly, or a redirect loop)"
            )));
        }
        if l.router.default().is_some()
            && let Some(d) = &t.destinations
            && !d.allows_addr(dst)
        {
            return Err(DialError::Denied(format!(
                "the original destination {dst} is not allowed by `destinations`"
            )));
        }
        Ok(())
    }

    /// Answers the client that its request failed, closes it and makes the refusal.
    pub(super) async fn refuse(
        l: &ListenerCtx,
        a: Accepted,
        req: &Request,
        front: Front,
        e: DialError,
        server: Option<SocketAddr>,
    ) -> SetUpFailed {
        let client = plain(&a.stream);
        if let Some(c) = client {
            let _ = tokio::time::timeout(l.handshake_timeout, req.reply.failed(c, &e)).await;
        }
        // After an answer, a FIN (so that the client reads it); otherwise a reset.
        match (req.reply, a.stream) {
            (Reply::None, s) => close(s),
            (_, s) => drop(s),
        }
        let (stage, outcome) = match e {
            DialError::Denied(_) => (Stage::Route, Outcome::Denied),
            DialError::Timeout(_) => (Stage::Connect, Outcome::ConnectTimeout),
            _ => (Stage::Connect, Outcome::ConnectFailed),
        };
        SetUpFailed {
            peer: a.peer,
            refusal: Refusal {
                stage,
                outcome,
                reason: Some(e.reason().to_string()),
                server,
            },
            front,
        }
    }

    fn plain(s: &Stream) -> Option<&Sock> {
        match s {
            Stream::Plain(s) => Some(s),
            Stream::Tls(t) => Some(t.sock()),
        }
    }

    /// SOCKS5 UDP ASSOCIATE: binds the relay socket, answers with its address, and relays
    /// datagrams until the control connection closes.
    pub(super) async fn associate(
        l: &ListenerCtx,
        a: Accepted,
        req: Request,
        front: Front,
    ) -> Result<Next, SetUpFailed> {
        use crate::socks_udp::{Association, End};
        let FrontEnd::Socks5 { forward, .. } = &l.front else {
            let e = DialError::Denied("UDP ASSOCIATE on a listener that is not SOCKS5".into());
            return Err(refuse(l, a, &req, front, e, None).await);
        };
        let Some(control) = plain(&a.stream) else {
            let e = DialError::Failed("no control connection".into());
            return Err(refuse(l, a, &req, front, e, None).await);
        };
        let hint = match req.target.host {
            Host::Ip(ip) => SocketAddr::new(ip, req.target.port),
            Host::Name(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let local = control
            .get_ref()
            .local_addr()
            .map(|a| crate::destinations::canonical(a.ip()));
        let bound = match local {
            Ok(ip) => Association::bind(ip, a.peer, hint).await,
            Err(e) => Err(e),
        };
        let assoc = match bound.and_then(|s| s.bound().map(|b| (s, b))) {
            Ok(x) => x,
            Err(e) => {
                let e = DialError::Failed(format!("cannot bind the UDP relay socket: {e}"));
                return Err(refuse(l, a, &req, front, e, None).await);
            }
        };
        let (assoc, bound) = assoc;
        let answered =
            tokio::time::timeout(l.handshake_timeout, req.reply.succeeded(control, bound)).await;
        if !matches!(answered, Ok(Ok(()))) {
            close(a.stream);
            return Ok(Next::Udp(UdpDone {
                front,
                outcome: Outcome::ClientReset,
                counts: Default::default(),
            }));
        }
        let own = forward.own.load_full();
        let policy = forward.policy(req.user, &own);
        let (end, counts) = assoc
            .run(
                control,
                &policy,
                &forward.dial,
                l.idle_timeout,
                l.stop_token(),
            )
            .await;
        l.stats.bytes_up.add(counts.bytes_up);
        l.stats.bytes_down.add(counts.bytes_down);
        let outcome = match end {
            End::Done => Outcome::Ok,
            End::IdleTimeout => Outcome::IdleTimeout,
            End::ClientReset => Outcome::ClientReset,
            End::Drained => Outcome::Drained,
        };
        if outcome == Outcome::Ok {
            drop(a.stream);
        } else {
            close(a.stream);
        }
        Ok(Next::Udp(UdpDone {
            front,
            outcome,
            counts,
        }))
    }

    /// Dials the destination, answers the client, sends what it sent ahead.
    pub(super) async fn connect(
        l: &ListenerCtx,
        mut a: Accepted,
        req: Request,
        front: Front,
    ) -> Result<Connected, SetUpFailed> {
        let t0 = tokio::time::Instant::now();
        let (dial_cfg, own, sni_must_match) = match &l.front {
            FrontEnd::Socks5 { forward, .. } => (forward.dial, forward.own.load_full(), false),
            FrontEnd::HttpConnect {
                forward,
                sni_must_match,
            } => (forward.dial, forward.own.load_full(), *sni_must_match),
            FrontEnd::Transparent(t) => (t.dial, t.own.load_full(), false),
            _ => {
                let e = DialError::Denied("not a forward-proxy listener".into());
                return Err(refuse(l, a, &req, front, e, None).await);
            }
        };
        let empty = crate::destinations::Destinations::default();
        let policy = match &l.front {
            FrontEnd::Socks5 { forward, .. } | FrontEnd::HttpConnect { forward, .. } => {
                forward.policy(req.user, &own)
            }
            FrontEnd::Transparent(t) => Policy {
                listener: t.destinations.as_ref().unwrap_or(&empty),
                user: None,
                own: &own,
            },
            _ => Policy {
                listener: &empty,
                user: None,
                own: &own,
            },
        };
        let dialled = tokio::select! {
            r = dial::dial(&req.target, &policy, &dial_cfg) => r,
            () = l.stop_token().cancelled() => Err(DialError::Failed("ferry is shutting down".into()).into()),
        };
        let d = match dialled {
            Ok(d) => d,
            Err(f) => return Err(refuse(l, a, &req, front, f.error, f.server).await),
        };
        let connect_time = t0.elapsed();
        let server_addr = d.addr;
        let failed =
            |front: Front, peer: SocketAddr, outcome: Outcome, reason: String| SetUpFailed {
                peer,
                refusal: Refusal {
                    stage: Stage::Connect,
                    outcome,
                    reason: Some(reason),
                    server: Some(server_addr),
                },
                front,
            };
        let Some(client) = plain(&a.stream) else {
            close(a.stream);
            return Err(failed(
                front,
                a.peer,
                Outcome::ProtocolError,
                "no client socket".into(),
            ));
        };
        let bound = d.sock.get_ref().local_addr().unwrap_or(server_addr);
        let answered =
            tokio::time::timeout(l.handshake_timeout, req.reply.succeeded(client, bound)).await;
        if !matches!(answered, Ok(Ok(()))) {
            close(a.stream);
            return Err(failed(
                front,
                a.peer,
                Outcome::ClientReset,
                "the client went away before the answer".into(),
            ));
        }
        // HTTP CONNECT with `sni_must_match`: the TLS ClientHello that opens the tunnel must
        // name the host the client asked for.
        if sni_must_match && req.reply == Reply::HttpTunnel {
            let r = tokio::time::timeout(
                l.handshake_timeout,
                crate::frontend::read_hello(client, &mut a.replay),
            )
            .await;
            let verdict = match r {
                Err(_) => Err(format!(
                    "no ClientHello in the tunnel within {:?}",
                    l.handshake_timeout
                )),
                Ok(Err(refusal)) => Err(refusal.reason.unwrap_or_default()),
                Ok(Ok(None)) => Err(
                    "the tunnel does not start with a TLS ClientHello (`sni_must_match`)".into(),
                ),
                Ok(Ok(Some(sni))) => match (&req.target.host, sni) {
                    (_, None) => Ok(()),
                    (Host::Name(n), Some(s)) if **n == *s => Ok(()),
                    (_, Some(s)) => Err(format!(
                        "the TLS SNI {s:?} differs from the CONNECT host {} (`sni_must_match`)",
                        req.target
                    )),
                },
            };
            if let Err(reason) = verdict {
                close(a.stream);
                return Err(failed(front, a.peer, Outcome::Denied, reason));
            }
        }
        if !a.replay.is_empty()
            && let Err(e) = net::write_all(&d.sock, &a.replay).await
        {
            close(a.stream);
            return Err(failed(
                front,
                a.peer,
                Outcome::ServerReset,
                format!("writing to the server: {e}"),
            ));
        }
        Ok(Connected {
            client: a.stream,
            server: Stream::Plain(d.sock),
            ledger: Ledger {
                front,
                guard: None,
                server: server_addr,
                connect_time,
                replayed: a.replay.len() as u64,
            },
        })
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
