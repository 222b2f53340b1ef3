//! One client connection, from accept to the access-log record: pick a server, connect,
//! relay, account.

use std::net::SocketAddr;
use std::time::SystemTime;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::listener::Permit;
use crate::net::{self, ConnectError};
use crate::observe::{Outcome, Record};
use crate::policy::{self, ClientPermit};
use crate::relay::{self, End};
use crate::upstream::AcquireError;
use crate::wire::proxy::{self, Accept, Addresses, Parsed};

/// Serves one accepted client connection to its end. `permit` holds the connection's place
/// under the listener's and the global connection limits until it is dropped here;
/// `client_permit` its place under the per-client limits, when the accept loop already
/// checked the client (without a PROXY header to read).
pub async fn serve(
    mut client: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    client_permit: Option<ClientPermit>,
) {
    let l = permit.listener();
    let ts = SystemTime::now();
    let start = Instant::now();
    let _ = client.set_nodelay(true);

    // The PROXY header, from trusted sources only; its source address then stands for the
    // client everywhere (ACL, limits, hashing, affinity, logs).
    let mut peer = peer;
    let mut destination = None;
    let mut _client_permit = client_permit;
    if let Some(pp) = &l.proxy {
        let header = if !policy::contains(&pp.trusted, peer.ip()) {
            Err(format!("{peer} is not a trusted PROXY protocol source"))
        } else {
            match tokio::time::timeout(pp.timeout, read_proxy_header(&mut client, pp.accept)).await
            {
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
                net::close_with_reset(client);
                return l.refuse(peer, Outcome::ProtocolError, ts, start.elapsed());
            }
        }
        match l.admit_client(peer.ip()) {
            Ok(p) => _client_permit = p,
            Err(outcome) => {
                net::close_with_reset(client);
                return l.refuse(peer, outcome, ts, start.elapsed());
            }
        }
    }

    let pool = &l.pool;
    let mut rec = Record {
        ts,
        listener: &l.name,
        client: peer,
        upstream: Some(&pool.name),
        server: None,
        sni: None,
        bytes_up: 0,
        bytes_down: 0,
        connect_ms: None,
        duration_ms: Default::default(),
        result: Outcome::Ok,
        event: None,
    };

    // Connect, retrying on other servers: never the one that just failed, and never once
    // a byte has been relayed (nothing has been, before the relay starts).
    let mut tried: Vec<SocketAddr> = Vec::new();
    let t0 = Instant::now();
    let (guard, upstream) = loop {
        let acquired = tokio::select! {
            r = pool.acquire(peer.ip(), &tried) => r,
            () = l.stop.cancelled() => Err(AcquireError::NoServer),
        };
        let guard = match acquired {
            Ok(g) => g,
            Err(e) => {
                net::close_with_reset(client);
                // After failed attempts, the failure is what the client got.
                if tried.is_empty() || l.stop.is_cancelled() {
                    rec.result = match e {
                        _ if l.stop.is_cancelled() => Outcome::Drained,
                        AcquireError::NoServer => Outcome::NoServer,
                        AcquireError::Full => Outcome::Limited,
                        AcquireError::QueueTimeout => Outcome::QueueTimeout,
                    };
                }
                return finish(&permit, rec, start);
            }
        };
        let server = guard.server().clone();
        rec.server = Some(server.addr);
        let connected = tokio::select! {
            r = net::connect(server.addr, pool.connect_timeout, &pool.tcp) => r,
            () = l.stop.cancelled() => {
                rec.result = Outcome::Drained;
                return finish(&permit, rec, start);
            }
        };
        match connected {
            Ok(mut s) => {
                pool.connect_succeeded(&server);
                if let Some(v) = pool.proxy_protocol {
                    let dst = destination
                        .or_else(|| client.local_addr().ok())
                        .unwrap_or(peer);
                    if s.write_all(&proxy::encode(v, peer, dst)).await.is_err() {
                        rec.result = Outcome::ServerReset;
                        net::close_with_reset(client);
                        return finish(&permit, rec, start);
                    }
                }
                break (guard, s);
            }
            Err(e) => {
                pool.connect_failed(&server);
                rec.result = match &e {
                    ConnectError::Timeout => Outcome::ConnectTimeout,
                    ConnectError::Failed(_) => Outcome::ConnectFailed,
                };
                if let ConnectError::Failed(e) = &e {
                    tracing::debug!(listener = %l.name, server = %server.addr, "connect failed: {e}");
                }
                tried.push(server.addr);
                if tried.len() > pool.retries as usize {
                    // The client gets a prompt reset: nothing was relayed, nothing will be.
                    net::close_with_reset(client);
                    return finish(&permit, rec, start);
                }
            }
        }
    };
    let server = guard.server().clone();
    let connect_time = t0.elapsed();
    pool.connect_hist.observe(connect_time);
    rec.result = Outcome::Open;
    rec.connect_ms = Some(connect_time);
    if l.access_log.on_connect {
        rec.event = Some("connect");
        rec.duration_ms = start.elapsed();
        l.access_log.write(&rec);
    }

    let meters = relay::Meters {
        up: [&l.stats.bytes_up, &server.stats.bytes_up],
        down: [&l.stats.bytes_down, &server.stats.bytes_down],
    };
    let mut report = |up: u64, down: u64| {
        let mut p = rec.clone();
        p.bytes_up = up;
        p.bytes_down = down;
        p.duration_ms = start.elapsed();
        p.event = Some("progress");
        l.access_log.write(&p);
    };
    let progress = l.access_log.interval.map(|every| relay::Progress {
        every,
        report: &mut report,
    });
    let r = relay::relay(
        client,
        upstream,
        l.idle_timeout,
        &l.stop,
        l.engine,
        meters,
        progress,
    )
    .await;
    rec.event = None;
    rec.bytes_up = r.bytes_up;
    rec.bytes_down = r.bytes_down;
    rec.result = match r.end {
        End::Done => Outcome::Ok,
        End::IdleTimeout => Outcome::IdleTimeout,
        End::ClientReset => Outcome::ClientReset,
        End::ServerReset => Outcome::ServerReset,
        End::Drained => Outcome::Drained,
    };
    finish(&permit, rec, start);
    drop(guard);
}

fn finish(permit: &Permit, mut rec: Record<'_>, start: Instant) {
    rec.duration_ms = start.elapsed();
    let l = permit.listener();
    l.stats.finish(rec.result);
    l.access_log.write(&rec);
}

/// Reads a PROXY header off the front of `client`, consuming exactly its bytes: what is
/// available is peeked at, and only bytes known to belong to the header are read.
async fn read_proxy_header(client: &mut TcpStream, accept: Accept) -> Result<Addresses, String> {
    let mut header: Vec<u8> = Vec::new();
    let mut peeked = [0u8; 512];
    loop {
        let n = client
            .peek(&mut peeked)
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
                client
                    .read_exact(&mut rest)
                    .await
                    .map_err(|e| format!("reading the PROXY header: {e}"))?;
                return Ok(addresses);
            }
            Parsed::Incomplete if header.len() < proxy::MAX_HEADER => {
                // All of it is header so far: take it off the socket and wait for more.
                let mut sink = vec![0u8; n];
                client
                    .read_exact(&mut sink)
                    .await
                    .map_err(|e| format!("reading the PROXY header: {e}"))?;
            }
            Parsed::Incomplete => return Err("PROXY header too long".into()),
            Parsed::Invalid(reason) => return Err(reason),
        }
    }
}
