//! One client connection, from accept to the access-log record: pick a server, connect,
//! relay, account.

use std::net::SocketAddr;
use std::time::SystemTime;

use tokio::time::Instant;

use crate::listener::{ListenerCtx, Permit};
use crate::net::{self, ConnectError, Sock};
use crate::observe::{Outcome, Record};
use crate::policy::{self, ClientPermit};
use crate::relay::{self, End};
use crate::upstream::{AcquireError, ServerGuard};
use crate::wire::proxy::{self, Accept, Addresses, Parsed};
use crate::workers::Assignment;

/// Serves one accepted client connection to its end, on the worker it was assigned to
/// (`on`, its place in that worker's count, held until the end). `permit` holds the
/// connection's place under the listener's and the global connection limits until it is
/// dropped here; `client_permit` its place under the per-client limits, when the accept
/// loop already checked the client (without a PROXY header to read).
///
/// Two phases: setting up (PROXY header, admission, picking and connecting, with retries)
/// runs in a boxed future that is freed once the server connection is up, so the state an
/// open connection keeps for its lifetime is only the relay's and a few addresses.
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
    let client: Sock = match net::register(client) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(listener = %l.name, client = %peer, "cannot register the connection: {e}");
            drop((permit, client_permit, on));
            return l.refuse(peer, Outcome::Limited, ts, start.elapsed());
        }
    };

    let c = match Box::pin(set_up(&client, peer, &permit, client_permit)).await {
        Ok(c) => c,
        Err(refused) => {
            net::close_with_reset(client);
            drop((permit, on));
            let mut rec = record(&l, ts, refused.peer, refused.server);
            rec.result = refused.outcome;
            if refused.before_pool {
                rec.upstream = None;
                rec.duration_ms = start.elapsed();
                return l.refuse(rec.client, rec.result, ts, rec.duration_ms);
            }
            return finish(&l, rec, start);
        }
    };
    let server = c.guard.server();
    if l.access_log.on_connect {
        let mut rec = record(&l, ts, c.peer, Some(server.addr));
        rec.result = Outcome::Open;
        rec.event = Some("connect");
        rec.connect_ms = Some(c.connect_time);
        rec.duration_ms = start.elapsed();
        l.access_log.write(&rec);
    }

    let meters = relay::Meters {
        up: [&l.stats.bytes_up, &server.stats.bytes_up],
        down: [&l.stats.bytes_down, &server.stats.bytes_down],
    };
    let mut report = |up: u64, down: u64| {
        let mut rec = record(&l, ts, c.peer, Some(server.addr));
        rec.result = Outcome::Open;
        rec.event = Some("progress");
        rec.connect_ms = Some(c.connect_time);
        rec.bytes_up = up;
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
        c.upstream,
        l.idle_timeout,
        l.stop_token(),
        l.engine,
        meters,
        progress,
    )
    .await;
    let server_addr = server.addr;
    drop((c.guard, c._client_permit, permit, on));
    let mut rec = record(&l, ts, c.peer, Some(server_addr));
    rec.connect_ms = Some(c.connect_time);
    rec.bytes_up = r.bytes_up;
    rec.bytes_down = r.bytes_down;
    rec.result = match r.end {
        End::Done => Outcome::Ok,
        End::IdleTimeout => Outcome::IdleTimeout,
        End::ClientReset => Outcome::ClientReset,
        End::ServerReset => Outcome::ServerReset,
        End::Drained => Outcome::Drained,
    };
    finish(&l, rec, start);
}

/// A connection whose server connection is up.
struct Connected {
    upstream: Sock,
    guard: ServerGuard,
    /// The client: the real one behind a PROXY header.
    peer: SocketAddr,
    connect_time: std::time::Duration,
    _client_permit: Option<ClientPermit>,
}

/// Why set-up ended without a server connection.
struct Refused {
    peer: SocketAddr,
    server: Option<SocketAddr>,
    outcome: Outcome,
    /// Refused at the door (ACL, limits, PROXY header): no upstream was involved.
    before_pool: bool,
}

/// PROXY header, admission, server pick and connect (with retries on other servers).
async fn set_up(
    client: &Sock,
    peer: SocketAddr,
    permit: &Permit,
    client_permit: Option<ClientPermit>,
) -> Result<Connected, Refused> {
    let l = permit.listener();
    let refuse = |peer, outcome| Refused {
        peer,
        server: None,
        outcome,
        before_pool: true,
    };

    // The PROXY header, from trusted sources only; its source address then stands for the
    // client everywhere (ACL, limits, hashing, affinity, logs).
    let mut peer = peer;
    let mut destination = None;
    let mut client_permit = client_permit;
    if let Some(pp) = &l.proxy {
        let header = if !policy::contains(&pp.trusted, peer.ip()) {
            Err(format!("{peer} is not a trusted PROXY protocol source"))
        } else {
            match tokio::time::timeout(pp.timeout, read_proxy_header(client, pp.accept)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no complete PROXY header within {:?}", pp.timeout)),
            }
        };
        match header {
            Ok(Addresses::Proxied {
                source,
                destination: d,
            }) => {
                peer = source;
                destination = Some(d);
            }
            Ok(Addresses::Local) => {}
            Err(reason) => {
                tracing::debug!(listener = %l.name, client = %peer, "protocol error: {reason}");
                return Err(refuse(peer, Outcome::ProtocolError));
            }
        }
        client_permit = l.admit_client(peer.ip()).map_err(|o| refuse(peer, o))?;
    }

    // Connect, retrying on other servers: never the one that just failed, and never once
    // a byte has been relayed (nothing has been, before the relay starts).
    let pool = &l.pool;
    let stop = l.stop_token();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_failure = None;
    let t0 = Instant::now();
    loop {
        let acquired = tokio::select! {
            biased;
            r = pool.acquire(peer.ip(), &tried) => r,
            () = stop.cancelled() => Err(AcquireError::NoServer),
            // A client that hangs up while queued gives its place to the next.
            () = net::hung_up(client) => {
                return Err(Refused {
                    peer,
                    server: None,
                    outcome: Outcome::ClientReset,
                    before_pool: false,
                });
            }
        };
        let fail = |server, outcome| Refused {
            peer,
            server,
            outcome,
            before_pool: false,
        };
        let guard = match acquired {
            Ok(g) => g,
            Err(_) if stop.is_cancelled() => {
                return Err(fail(tried.last().copied(), Outcome::Drained));
            }
            // After failed attempts, the failure is what the client got.
            Err(_) if last_failure.is_some() => {
                return Err(fail(
                    tried.last().copied(),
                    last_failure.unwrap_or(Outcome::ConnectFailed),
                ));
            }
            Err(e) => {
                let outcome = match e {
                    AcquireError::NoServer => Outcome::NoServer,
                    AcquireError::Full => Outcome::Limited,
                    AcquireError::QueueTimeout => Outcome::QueueTimeout,
                };
                return Err(fail(None, outcome));
            }
        };
        let server = guard.server().clone();
        let connected = tokio::select! {
            r = net::connect(server.addr, pool.connect_timeout, &pool.tcp) => r,
            () = stop.cancelled() => return Err(fail(Some(server.addr), Outcome::Drained)),
        };
        match connected {
            Ok(s) => {
                pool.connect_succeeded(&server);
                if let Some(v) = pool.proxy_protocol {
                    let dst = destination
                        .or_else(|| client.get_ref().local_addr().ok())
                        .unwrap_or(peer);
                    if net::write_all(&s, &proxy::encode(v, peer, dst))
                        .await
                        .is_err()
                    {
                        return Err(fail(Some(server.addr), Outcome::ServerReset));
                    }
                }
                let connect_time = t0.elapsed();
                pool.connect_hist.observe(connect_time);
                return Ok(Connected {
                    upstream: s,
                    guard,
                    peer,
                    connect_time,
                    _client_permit: client_permit,
                });
            }
            Err(e) => {
                pool.connect_failed(&server);
                last_failure = Some(match &e {
                    ConnectError::Timeout => Outcome::ConnectTimeout,
                    ConnectError::Failed(_) => Outcome::ConnectFailed,
                });
                if let ConnectError::Failed(e) = &e {
                    tracing::debug!(listener = %l.name, server = %server.addr, "connect failed: {e}");
                }
                tried.push(server.addr);
                if tried.len() > pool.retries as usize {
                    return Err(fail(
                        Some(server.addr),
                        last_failure.unwrap_or(Outcome::ConnectFailed),
                    ));
                }
            }
        }
    }
}

/// A record for this connection with the fields every record has.
fn record(
    l: &ListenerCtx,
    ts: SystemTime,
    client: SocketAddr,
    server: Option<SocketAddr>,
) -> Record<'_> {
    Record {
        ts,
        listener: &l.name,
        client,
        upstream: Some(&l.pool.name),
        server,
        sni: None,
        bytes_up: 0,
        bytes_down: 0,
        connect_ms: None,
        duration_ms: Default::default(),
        result: Outcome::Ok,
        event: None,
    }
}

fn finish(l: &ListenerCtx, mut rec: Record<'_>, start: Instant) {
    rec.duration_ms = start.elapsed();
    l.stats.finish(rec.result);
    l.access_log.write(&rec);
}

/// Reads a PROXY header off the front of `client`, consuming exactly its bytes: what is
/// available is peeked at, and only bytes known to belong to the header are read.
async fn read_proxy_header(client: &Sock, accept: Accept) -> Result<Addresses, String> {
    let mut header: Vec<u8> = Vec::new();
    // On the heap: a buffer here would be part of every connection's future for its lifetime.
    let mut peeked = vec![0u8; 512];
    loop {
        let n = net::peek(client, &mut peeked)
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if n == 0 {
            return Err("closed before a complete PROXY header".into());
        }
        let have = header.len();
        header.extend_from_slice(&peeked[..n]);
        match proxy::parse(&header, accept) {
            Parsed::Complete { len, addresses } => {
                let mut rest = vec![0u8; len - have];
                net::read_exact(client, &mut rest)
                    .await
                    .map_err(|e| format!("reading the PROXY header: {e}"))?;
                return Ok(addresses);
            }
            Parsed::Incomplete if header.len() < proxy::MAX_HEADER => {
                // All of it is header so far: take it off the socket and wait for more.
                let mut sink = vec![0u8; n];
                net::read_exact(client, &mut sink)
                    .await
                    .map_err(|e| format!("reading the PROXY header: {e}"))?;
            }
            Parsed::Incomplete => return Err("PROXY header too long".into()),
            Parsed::Invalid(reason) => return Err(reason),
        }
    }
}
