//! Active health checks: per server, a TCP connect (and the TLS handshake, for a pool that
//! speaks TLS to its servers), optionally a `send` and an `expect`ed prefix of the answer;
//! for a UDP pool, `send` as a datagram and a reply (starting with `expect`), or without
//! `send` a TCP connect to the check's `port`; every `interval` (with jitter, so that checks of many servers do
//! not align). `fall` consecutive failures mark an up server down, `rise` consecutive
//! successes mark a down server up; each transition is logged with its reason.
//!
//! Checks go to the server without the PROXY header, even when the upstream sends one on
//! client connections: a check is ferry's own connection, not a client's. For servers that
//! require the header on every connection, `send_proxy = true` sends it, carrying the
//! checker's own addresses.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::HealthConfig;
use crate::tls::{ClientTls, TlsStream};
use crate::upstream::{LastCheck, Pool, Server};

/// Runs the checks of `pool`'s servers until `stop`, following the server set as it
/// changes (DNS): a task per server, started for new servers, ended for removed ones.
pub async fn run(pool: Arc<Pool>, stop: CancellationToken) {
    let Some(cfg) = pool.health.clone().filter(|h| h.active) else {
        return;
    };
    let mut tasks: HashMap<SocketAddr, JoinHandle<()>> = HashMap::new();
    loop {
        tasks.retain(|_, t| !t.is_finished());
        for s in pool.servers().servers.iter() {
            tasks.entry(s.addr).or_insert_with(|| {
                tokio::spawn(check_loop(
                    pool.clone(),
                    Arc::downgrade(s),
                    cfg.clone(),
                    stop.clone(),
                ))
            });
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(cfg.interval.min(pool.resolve_interval)) => {}
        }
    }
    for (_, t) in tasks {
        t.abort();
    }
}

/// `d` scaled by a random factor in [lo, hi).
fn jitter(d: Duration, lo: f64, hi: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * (lo + fastrand::f64() * (hi - lo))).unwrap_or(d)
}

async fn check_loop(
    pool: Arc<Pool>,
    server: Weak<Server>,
    cfg: HealthConfig,
    stop: CancellationToken,
) {
    // Start at a random point of the first interval.
    let mut next = crate::clock::later(jitter(cfg.interval, 0.0, 1.0));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let Some(s) = server.upgrade() else { return };
        // Removed from the set (DNS change): stop checking it.
        if !pool.servers().servers.iter().any(|x| Arc::ptr_eq(x, &s)) {
            return;
        }
        let started = Instant::now();
        let proxy = pool.proxy_protocol.filter(|_| cfg.send_proxy);
        let result = match pool.protocol {
            crate::config::Protocol::Udp if cfg.send.is_some() => check_udp(&s, &cfg).await,
            _ => check_once(&s, &cfg, proxy, pool.tls.as_deref()).await,
        };
        record(&pool, &s, &cfg, result, started.elapsed());
        next = crate::clock::later(jitter(cfg.interval, 0.9, 1.1));
    }
}

fn checks(n: u32) -> &'static str {
    if n == 1 { "check" } else { "checks" }
}

/// Why a health check failed (shown in the status API and the process log).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: timed out")]
    ConnectTimeout,
    #[error("local address: {0}")]
    LocalAddr(std::io::Error),
    #[error("send PROXY header: {0}")]
    ProxyHeader(std::io::Error),
    #[error("send: {0}")]
    Send(std::io::Error),
    #[error("read: {0}")]
    Read(std::io::Error),
    /// The TLS handshake (a TLS pool).
    #[error("{0}")]
    Tls(String),
    #[error("expected {expected:?}, got {got:?}")]
    Unexpected { expected: String, got: String },
    #[error("timeout after {0:?}")]
    Timeout(Duration),
}

/// One check of `server`: a connect (and, for a TLS pool, a completed handshake), then
/// `send` and `expect` if configured (inside TLS for a TLS pool).
pub async fn check_once(
    server: &Server,
    cfg: &HealthConfig,
    proxy: Option<crate::wire::proxy::Version>,
    tls: Option<&ClientTls>,
) -> Result<(), CheckError> {
    let addr = checked_addr(server, cfg);
    let work = async {
        let opts = crate::config::TcpOptions::default();
        let s = crate::net::connect(addr, cfg.timeout, &opts)
            .await
            .map_err(|e| match e {
                crate::net::ConnectError::Failed(e) => CheckError::Connect(e),
                crate::net::ConnectError::Timeout => CheckError::ConnectTimeout,
            })?;
        if let Some(v) = proxy {
            // The checker's own connection: its own addresses.
            let local = s.get_ref().local_addr().map_err(CheckError::LocalAddr)?;
            let header = crate::wire::proxy::encode(v, local, addr);
            crate::net::write_all(&s, &header)
                .await
                .map_err(CheckError::ProxyHeader)?;
        }
        let mut got = Vec::new();
        let want = cfg.expect.as_ref().map_or(0, |e| e.len());
        match tls {
            None => {
                if let Some(send) = &cfg.send {
                    crate::net::write_all(&s, send)
                        .await
                        .map_err(CheckError::Send)?;
                }
                while got.len() < want {
                    let mut buf = vec![0u8; want - got.len()];
                    match crate::net::read_some(&s, &mut buf).await {
                        Ok(0) => break,
                        Ok(k) => got.extend_from_slice(&buf[..k]),
                        Err(e) => return Err(CheckError::Read(e)),
                    }
                }
            }
            Some(tls) => {
                let name = tls.server_name(&server.configured, addr.ip());
                let tls_err = |e: &dyn std::fmt::Display| CheckError::Tls(e.to_string());
                let mut t =
                    TlsStream::client(s, tls.config.clone(), name).map_err(|e| tls_err(&e))?;
                t.handshake().await.map_err(|e| tls_err(&e))?;
                // Bounded by the check's own timeout around all of this.
                t.confirm(cfg.timeout).await.map_err(|e| tls_err(&e))?;
                if let Some(send) = &cfg.send {
                    t.send(send)
                        .await
                        .map_err(|e| tls_err(&format!("send: {e}")))?;
                }
                while got.len() < want {
                    match t.recv(&mut got).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => return Err(tls_err(&format!("read: {e}"))),
                    }
                }
            }
        }
        if let Some(expect) = &cfg.expect {
            let n = got.len().min(expect.len());
            if got[..n] != expect[..] {
                return Err(CheckError::Unexpected {
                    expected: String::from_utf8_lossy(expect).into_owned(),
                    got: String::from_utf8_lossy(&got[..n]).into_owned(),
                });
            }
        }
        Ok(())
    };
    match tokio::time::timeout(cfg.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::Timeout(cfg.timeout)),
    }
}

/// Where a server is checked: its address, or the check's `port` on its host.
fn checked_addr(server: &Server, cfg: &HealthConfig) -> SocketAddr {
    SocketAddr::new(server.addr.ip(), cfg.port.unwrap_or(server.addr.port()))
}

/// One check of a UDP server: `send` as a datagram from a socket connected to it, then a
/// reply that starts with `expect` (any reply, without `expect`) within the timeout. An
/// ICMP port unreachable fails it at once.
pub async fn check_udp(server: &Server, cfg: &HealthConfig) -> Result<(), CheckError> {
    let addr = checked_addr(server, cfg);
    let work = async {
        let any: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = tokio::net::UdpSocket::bind(any)
            .await
            .map_err(CheckError::Connect)?;
        sock.connect(addr).await.map_err(CheckError::Connect)?;
        let send = cfg.send.as_deref().unwrap_or_default();
        sock.send(send).await.map_err(CheckError::Send)?;
        let mut buf = vec![0u8; crate::udp::MAX_DATAGRAM];
        // A reply, or the ICMP error (ECONNREFUSED) the server's host sent instead.
        let n = sock.recv(&mut buf).await.map_err(CheckError::Read)?;
        if let Some(expect) = &cfg.expect {
            let got = &buf[..n.min(expect.len())];
            if got != &expect[..] {
                return Err(CheckError::Unexpected {
                    expected: String::from_utf8_lossy(expect).into_owned(),
                    got: String::from_utf8_lossy(got).into_owned(),
                });
            }
        }
        Ok(())
    };
    match tokio::time::timeout(cfg.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::Timeout(cfg.timeout)),
    }
}

fn record(
    pool: &Pool,
    s: &Server,
    cfg: &HealthConfig,
    result: Result<(), CheckError>,
    took: Duration,
) {
    let ok = result.is_ok();
    if ok {
        s.stats.checks_ok.fetch_add(1, Relaxed);
    } else {
        s.stats.checks_failed.fetch_add(1, Relaxed);
    }
    let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
    {
        let mut last = s.last_check.lock().unwrap_or_else(|e| e.into_inner());
        *last = LastCheck {
            ok,
            reason: reason.clone(),
            at: Some(SystemTime::now()),
            duration: took,
        };
    }
    // `check_streak` counts consecutive results that contradict the current state.
    if ok == s.healthy() {
        s.check_streak.store(0, Relaxed);
        return;
    }
    let streak = s.check_streak.fetch_add(1, Relaxed) + 1;
    if ok && streak >= cfg.rise {
        s.check_streak.store(0, Relaxed);
        s.set_healthy(true);
        tracing::info!(upstream = %pool.name, server = %s.addr, "server is up ({streak} {} passed)", checks(streak));
        pool.capacity_changed();
    } else if !ok && streak >= cfg.fall {
        s.check_streak.store(0, Relaxed);
        s.set_healthy(false);
        tracing::warn!(upstream = %pool.name, server = %s.addr, "server is down ({streak} {} failed; last: {reason})", checks(streak));
        // Connections waiting in the queue re-check: they may have nowhere left to go.
        pool.capacity_changed();
    }
}
