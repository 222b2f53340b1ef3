//! One client connection, from accept to the access-log record: pick a server, connect,
//! relay, account.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::listener::Permit;
use crate::net::{self, ConnectError};
use crate::observe::{Outcome, Record};
use crate::relay::{self, End};
use crate::upstream::AcquireError;

/// Serves one accepted client connection to its end. `permit` holds the connection's place
/// under the listener's and the global connection limits until it is dropped here.
pub async fn serve(client: TcpStream, peer: SocketAddr, permit: Permit) {
    let l = permit.listener();
    let ts = SystemTime::now();
    let start = Instant::now();
    let _ = client.set_nodelay(true);
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
            Ok(s) => {
                pool.connect_succeeded(&server);
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
    rec.result = Outcome::Ok;
    rec.connect_ms = Some(t0.elapsed());

    let r = relay::relay(client, upstream, l.idle_timeout, &l.stop, l.engine).await;
    rec.bytes_up = r.bytes_up;
    rec.bytes_down = r.bytes_down;
    server.stats.bytes_up.fetch_add(r.bytes_up, Relaxed);
    server.stats.bytes_down.fetch_add(r.bytes_down, Relaxed);
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
    l.stats.finish(rec.result, rec.bytes_up, rec.bytes_down);
    l.access_log.write(&rec);
}
