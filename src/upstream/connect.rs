//! Connecting a routed connection to a server of its pool: claim a server (balancing,
//! backups, affinity, the wait queue), connect within `connect_timeout`, retry on another
//! server after a failure (never after a byte was relayed), then send what must come
//! before the client's bytes: the PROXY header, the TLS handshake to the server, bytes the
//! front end already read from the client.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::net::{self, ConnectError, Sock};
use crate::observe::Outcome;
use crate::observe::{Refusal, Stage};
use crate::relay::Stream;
use crate::tls::TlsStream;
use crate::upstream::{AcquireError, Pool, ServerGuard};
use crate::wire::proxy;

/// A server connection ready to relay.
pub struct Upstream {
    pub stream: Stream,
    /// The claim on the server: its place under `max_connections_per_server`.
    pub guard: ServerGuard,
    /// From the first pick to the connection being ready (retries and TLS included).
    pub connect_time: Duration,
}

/// What a connect needs to know about the client.
pub struct Client<'a> {
    /// The real client (behind a PROXY header).
    pub peer: SocketAddr,
    /// Where it connected to, for an outgoing PROXY header; `None`: this socket's own
    /// local address.
    pub destination: Option<SocketAddr>,
    /// Its socket: watched while queued (a client that hangs up gives its place up).
    pub sock: &'a Sock,
    /// Bytes the server must get first.
    pub replay: &'a [u8],
    /// SO_MARK for the server connection (a transparent listener's `mark`).
    pub mark: Option<u32>,
}

/// Claims a server of `pool` and connects to it, retrying on others.
pub async fn connect(
    pool: &Pool,
    client: Client<'_>,
    stop: &CancellationToken,
) -> Result<Upstream, Refusal> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_failure: Option<(Outcome, String)> = None;
    let t0 = Instant::now();
    let fail = |server: Option<SocketAddr>, outcome: Outcome, reason: Option<String>| Refusal {
        stage: Stage::Connect,
        outcome,
        reason,
        server,
    };
    loop {
        let acquired = tokio::select! {
            biased;
            r = pool.acquire(client.peer.ip(), &tried) => r,
            () = stop.cancelled() => Err(AcquireError::NoServer),
            // A client that hangs up while queued gives its place to the next.
            () = net::hung_up(client.sock) => {
                return Err(fail(None, Outcome::ClientReset, Some("closed while waiting for a server".into())));
            }
        };
        let guard = match acquired {
            Ok(g) => g,
            Err(_) if stop.is_cancelled() => {
                return Err(fail(tried.last().copied(), Outcome::Drained, None));
            }
            // After failed attempts, the failure is what the client got.
            Err(_) if last_failure.is_some() => {
                let (o, r) = last_failure.unwrap_or((Outcome::ConnectFailed, String::new()));
                return Err(fail(tried.last().copied(), o, Some(r)));
            }
            Err(e) => {
                let outcome = match e {
                    AcquireError::NoServer => Outcome::NoServer,
                    AcquireError::Full => Outcome::Limited,
                    AcquireError::QueueTimeout => Outcome::QueueTimeout,
                };
                return Err(fail(None, outcome, None));
            }
        };
        let server = guard.server().clone();
        let tcp = crate::config::TcpOptions {
            mark: client.mark.or(pool.tcp.mark),
            ..pool.tcp
        };
        let attempt = async {
            let sock = net::connect(server.addr, pool.connect_timeout, &tcp).await?;
            open(pool, &server, sock, &client).await
        };
        let connected = tokio::select! {
            r = attempt => r,
            () = stop.cancelled() => return Err(fail(Some(server.addr), Outcome::Drained, None)),
        };
        match connected {
            Ok(stream) => {
                pool.connect_succeeded(&server);
                let connect_time = t0.elapsed();
                pool.connect_hist.observe(connect_time);
                return Ok(Upstream {
                    stream,
                    guard,
                    connect_time,
                });
            }
            Err(Opening::Sent(reason)) => {
                // The server took bytes of the client's: no retry.
                return Err(fail(Some(server.addr), Outcome::ServerReset, Some(reason)));
            }
            Err(e @ (Opening::Connect(_) | Opening::TlsTimeout)) => {
                pool.connect_failed(&server);
                let failure = match e {
                    Opening::Connect(ConnectError::Timeout) => (
                        Outcome::ConnectTimeout,
                        format!("no connection within {:?}", pool.connect_timeout),
                    ),
                    Opening::TlsTimeout => (
                        Outcome::ConnectTimeout,
                        format!(
                            "TLS handshake not complete within {:?}",
                            pool.connect_timeout
                        ),
                    ),
                    Opening::Connect(ConnectError::Failed(e)) => {
                        (Outcome::ConnectFailed, e.to_string())
                    }
                    Opening::Sent(r) => (Outcome::ServerReset, r),
                };
                tracing::debug!(upstream = %pool.name, server = %server.addr, "connect failed: {}", failure.1);
                last_failure = Some(failure);
                tried.push(server.addr);
                if tried.len() > pool.retries as usize {
                    let (o, r) = last_failure.unwrap_or((Outcome::ConnectFailed, String::new()));
                    return Err(fail(Some(server.addr), o, Some(r)));
                }
            }
        }
    }
}

/// Why a server connection could not be made ready.
enum Opening {
    /// Before any of the client's bytes went out: another server may be tried.
    Connect(ConnectError),
    /// After the client's bytes went out.
    Sent(String),
    /// The TCP connection was made, the TLS handshake did not finish in time.
    TlsTimeout,
}

impl From<ConnectError> for Opening {
    fn from(e: ConnectError) -> Self {
        Opening::Connect(e)
    }
}

fn failed(msg: String) -> Opening {
    Opening::Connect(ConnectError::Failed(std::io::Error::other(msg)))
}

/// Sends what comes before the client's bytes on a connected socket: the PROXY header, the
/// TLS handshake, the bytes to replay.
async fn open(
    pool: &Pool,
    server: &crate::upstream::Server,
    sock: Sock,
    client: &Client<'_>,
) -> Result<Stream, Opening> {
    let mut first = Vec::new();
    if let Some(v) = pool.proxy_protocol {
        let dst = client
            .destination
            .or_else(|| client.sock.get_ref().local_addr().ok())
            .unwrap_or(client.peer);
        first.extend_from_slice(&proxy::encode(v, client.peer, dst));
    }
    let Some(tls) = &pool.tls else {
        // One write for the header and the replayed bytes.
        first.extend_from_slice(client.replay);
        if !first.is_empty() {
            net::write_all(&sock, &first)
                .await
                .map_err(|e| Opening::Sent(format!("writing to the server: {e}")))?;
        }
        return Ok(Stream::Plain(sock));
    };
    if !first.is_empty() {
        net::write_all(&sock, &first)
            .await
            .map_err(|e| failed(format!("sending the PROXY header: {e}")))?;
    }
    let name = tls.server_name(&server.configured, server.addr.ip());
    let mut t =
        Box::new(TlsStream::client(sock, tls.config.clone(), name).map_err(|e| failed(e.0))?);
    let started = Instant::now();
    match tokio::time::timeout(pool.connect_timeout, t.handshake()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(failed(e.0)),
        Err(_) => return Err(Opening::TlsTimeout),
    }
    // A TLS 1.3 server that asked for our certificate may still refuse it.
    let left = pool.connect_timeout.saturating_sub(started.elapsed());
    t.confirm(left).await.map_err(|e| failed(e.0))?;
    if !client.replay.is_empty() {
        t.write_plain(client.replay)
            .map_err(|e| Opening::Sent(e.0))?;
    }
    Ok(Stream::Tls(t))
}
