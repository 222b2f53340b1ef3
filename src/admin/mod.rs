//! The HTTP admin server: the stats page, Prometheus metrics, the status API, server
//! drain/enable/disable, and reload. Off unless `[admin]` is configured; bind it to
//! loopback or a management network.
//!
//! Every answer of the API is JSON; errors are `{"error": "..."}` with 400 (bad request),
//! 401 (POST without the configured token), 404 (unknown path or object), 405 (wrong
//! method, with `Allow`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::SystemTime;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::observe::Outcome;
use crate::runtime::{AdminServer, BoxFuture, ReloadOutcome, Shared};
use crate::upstream::AdminState;

/// The stats page: one self-contained file, no external assets.
const STATS_PAGE: &str = include_str!("stats.html");

pub mod metrics;
mod server;

pub use server::{Resp, Stats};

/// The admin server, as [`Proxy::start`](crate::runtime::Proxy::start) binds and serves it.
pub struct Server;

impl AdminServer for Server {
    fn bind(&self, addr: SocketAddr) -> BoxFuture<'static, std::io::Result<TcpListener>> {
        Box::pin(bind(addr))
    }

    fn serve(
        &self,
        listener: TcpListener,
        shared: Arc<Shared>,
        token: Option<String>,
        stop: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        Box::pin(serve(listener, shared, token, stop))
    }
}

/// Binds the admin server's socket (or takes the one an upgraded-from process passed).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let err = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("admin: cannot listen on {addr}: {e}"))
    };
    if let Some(passed) = crate::upgrade::take(addr, false) {
        let sock = passed.map_err(err)?;
        return TcpListener::from_std(sock.into()).map_err(err);
    }
    TcpListener::bind(addr).await.map_err(err)
}

/// Serves the admin API on `listener` until `stop`; returns once its connections have
/// closed (requests in progress are answered first).
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: Option<String>,
    stop: CancellationToken,
) {
    let token: Option<Arc<Token>> = token.map(|t| Arc::new(Token::new(&t)));
    let stats = Arc::new(Stats::default());
    let handler = {
        let stats = stats.clone();
        move |req: Request<Incoming>| {
            let (shared, token, stats) = (shared.clone(), token.clone(), stats.clone());
            async move { handle(req, &shared, token.as_deref(), &stats).await }
        }
    };
    server::serve(listener, handler, stats, stop).await;
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    respond(status, "application/json", v.to_string())
}

fn error(status: StatusCode, msg: impl Into<String>) -> Resp {
    json_resp(status, &json!({ "error": msg.into() }))
}

fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = error(StatusCode::METHOD_NOT_ALLOWED, format!("use {allow}"));
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// The admin token, kept as a digest: a given token is compared digest to digest, in
/// constant time, so neither where it differs nor its length shows in the timing.
pub struct Token(ring::digest::Digest);

impl Token {
    pub fn new(token: &str) -> Token {
        Token(ring::digest::digest(
            &ring::digest::SHA256,
            token.as_bytes(),
        ))
    }

    fn matches(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let d = ring::digest::digest(&ring::digest::SHA256, given);
        bool::from(d.as_ref().ct_eq(self.0.as_ref()))
    }
}

/// The credentials of `Authorization: Bearer TOKEN`; the scheme is case-insensitive and
/// may be followed by more than one space (RFC 7235).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let split = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(rest[start..].trim_ascii_end())
}

fn authorized(req: &Request<Incoming>, token: Option<&Token>) -> bool {
    let Some(token) = token else { return true };
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()))
        .is_some_and(|given| token.matches(given))
}

/// Decodes `%XX` escapes of a path segment (`[::1]:80` arrives as `%5B%3A%3A1%5D%3A80`).
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Answers one request; `stats` are this server's connection counters (for `/metrics`).
async fn handle(
    req: Request<Incoming>,
    shared: &Arc<Shared>,
    token: Option<&Token>,
    stats: &Arc<Stats>,
) -> Resp {
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (segs.as_slice(), &method) {
        ([""], &Method::GET | &Method::HEAD) => {
            respond(StatusCode::OK, "text/html; charset=utf-8", STATS_PAGE)
        }
        ([""], _) => method_not_allowed("GET"),
        (["metrics"], &Method::GET) => {
            let format = metrics::Format::negotiate(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            respond(
                StatusCode::OK,
                format.content_type(),
                metrics::render(shared, stats, format),
            )
        }
        (["metrics"], _) => method_not_allowed("GET"),
        (["api", "status"], &Method::GET) => json_resp(StatusCode::OK, &status(shared)),
        (["api", "status"], _) => method_not_allowed("GET"),
        (["api", "reload"], &Method::POST) => {
            if !authorized(&req, token) {
                return unauthorized();
            }
            match shared.reload().await {
                ReloadOutcome::Applied(changes) => json_resp(
                    StatusCode::OK,
                    &json!({ "result": "applied", "changes": changes }),
                ),
                ReloadOutcome::Rejected(errors) => json_resp(
                    StatusCode::BAD_REQUEST,
                    &json!({
                        "result": "rejected",
                        "error": "the new config was rejected; the old one keeps serving",
                        "errors": errors,
                    }),
                ),
            }
        }
        (["api", "reload"], _) => method_not_allowed("POST"),
        (["api", "upstreams", upstream, "servers"], m) => {
            if m != Method::POST {
                return method_not_allowed("POST");
            }
            if !authorized(&req, token) {
                return unauthorized();
            }
            let Some(upstream) = percent_decode(upstream) else {
                return error(StatusCode::BAD_REQUEST, "bad percent-encoding in the path");
            };
            let body = match read_json(req).await {
                Ok(v) => v,
                Err(r) => return r,
            };
            add_server(shared, &upstream, &body).await
        }
        (["api", "upstreams", upstream, "servers", addr], m) => {
            if m != Method::DELETE {
                return method_not_allowed("DELETE");
            }
            if !authorized(&req, token) {
                return unauthorized();
            }
            let (Some(upstream), Some(addr)) = (percent_decode(upstream), percent_decode(addr))
            else {
                return error(StatusCode::BAD_REQUEST, "bad percent-encoding in the path");
            };
            let Some(pool) = pool_named(shared, &upstream) else {
                return error(StatusCode::NOT_FOUND, format!("no upstream {upstream:?}"));
            };
            match pool.remove_server(&addr) {
                Ok(open) => json_resp(
                    StatusCode::ACCEPTED,
                    &json!({
                        "upstream": upstream,
                        "server": addr,
                        "state": "draining",
                        "connections_active": open,
                        "note": "the server leaves the upstream once its connections have ended",
                    }),
                ),
                Err(e) => runtime_error(&e),
            }
        }
        (["api", "upstreams", upstream, "servers", addr, "weight"], m) => {
            if m != Method::PUT {
                return method_not_allowed("PUT");
            }
            if !authorized(&req, token) {
                return unauthorized();
            }
            let (Some(upstream), Some(addr)) = (percent_decode(upstream), percent_decode(addr))
            else {
                return error(StatusCode::BAD_REQUEST, "bad percent-encoding in the path");
            };
            let body = match read_json(req).await {
                Ok(v) => v,
                Err(r) => return r,
            };
            // `{"weight": N}`, or a bare number.
            let Some(weight) = body
                .get("weight")
                .unwrap_or(&body)
                .as_u64()
                .filter(|w| (1..=u64::from(crate::config::MAX_WEIGHT)).contains(w))
            else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the body must be {{\"weight\": N}} with N from 1 to {}",
                        crate::config::MAX_WEIGHT
                    ),
                );
            };
            let Some(pool) = pool_named(shared, &upstream) else {
                return error(StatusCode::NOT_FOUND, format!("no upstream {upstream:?}"));
            };
            match pool.set_weight(&addr, weight as u32).await {
                Ok(()) => json_resp(
                    StatusCode::OK,
                    &json!({ "upstream": upstream, "server": addr, "weight": weight }),
                ),
                Err(e) => runtime_error(&e),
            }
        }
        (["api", "upstreams", upstream, "servers", addr, action], m) => {
            if m != Method::POST {
                return method_not_allowed("POST");
            }
            if !authorized(&req, token) {
                return unauthorized();
            }
            let state = match *action {
                "drain" => AdminState::Draining,
                "enable" => AdminState::Enabled,
                "disable" => AdminState::Disabled,
                other => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("unknown action {other:?}: use drain, enable or disable"),
                    );
                }
            };
            let (Some(upstream), Some(addr)) = (percent_decode(upstream), percent_decode(addr))
            else {
                return error(StatusCode::BAD_REQUEST, "bad percent-encoding in the path");
            };
            server_action(shared, &upstream, &addr, state)
        }
        _ => error(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// The largest request body the admin API reads.
const MAX_BODY: usize = 16 * 1024;

/// The request's body as JSON (at most [`MAX_BODY`] bytes), or the answer to give.
async fn read_json(req: Request<Incoming>) -> Result<Value, Resp> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body must be JSON of at most {MAX_BODY} bytes"),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body is not JSON: {e}"),
        )
    })
}

fn pool_named(shared: &Shared, upstream: &str) -> Option<Arc<crate::upstream::Pool>> {
    shared
        .view
        .load()
        .pools
        .iter()
        .find(|p| p.name == upstream)
        .cloned()
}

fn runtime_error(e: &crate::upstream::RuntimeError) -> Resp {
    use crate::upstream::RuntimeError as E;
    let status = match e {
        E::Exists(_) => StatusCode::CONFLICT,
        E::NotFound(_) => StatusCode::NOT_FOUND,
        E::Invalid(_) => StatusCode::BAD_REQUEST,
        // Added all the same.
        E::Unresolved(_) => StatusCode::ACCEPTED,
    };
    error(status, e.to_string())
}

/// `POST /api/upstreams/{upstream}/servers` with `{"addr", "weight", "backup"}`.
async fn add_server(shared: &Shared, upstream: &str, body: &Value) -> Resp {
    let Some(pool) = pool_named(shared, upstream) else {
        return error(StatusCode::NOT_FOUND, format!("no upstream {upstream:?}"));
    };
    let addr = match body.get("addr").and_then(Value::as_str) {
        Some(a) => match a.parse::<crate::config::ServerAddr>() {
            Ok(a) => a,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("`addr`: {e}")),
        },
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "the body must be {\"addr\": \"host:port\", \"weight\": 1, \"backup\": false}",
            );
        }
    };
    let weight = match body.get("weight") {
        None => 1,
        Some(w) => match w
            .as_u64()
            .filter(|w| (1..=u64::from(crate::config::MAX_WEIGHT)).contains(w))
        {
            Some(w) => w as u32,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("`weight` must be 1 to {}", crate::config::MAX_WEIGHT),
                );
            }
        },
    };
    let backup = match body.get("backup") {
        None => false,
        Some(b) => match b.as_bool() {
            Some(b) => b,
            None => return error(StatusCode::BAD_REQUEST, "`backup` must be true or false"),
        },
    };
    let label = addr.to_string();
    let spec = crate::config::ServerSpec {
        addr,
        weight,
        backup,
    };
    match pool.add_server(spec).await {
        Ok(()) => json_resp(
            StatusCode::CREATED,
            &json!({ "upstream": upstream, "server": label, "weight": weight, "backup": backup }),
        ),
        Err(e) => runtime_error(&e),
    }
}

fn unauthorized() -> Resp {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "this admin server requires `Authorization: Bearer <token>` on POST",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn server_action(shared: &Shared, upstream: &str, addr: &str, state: AdminState) -> Resp {
    let Some(pool) = pool_named(shared, upstream) else {
        return error(StatusCode::NOT_FOUND, format!("no upstream {upstream:?}"));
    };
    let set = pool.servers();
    let matching: Vec<_> = set
        .servers
        .iter()
        .filter(|s| s.addr.to_string() == addr || &*s.configured == addr)
        .collect();
    if matching.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            format!("upstream {upstream:?} has no server {addr:?}"),
        );
    }
    for s in &matching {
        s.set_admin(state);
        tracing::info!(upstream, server = %s.addr, "server set to {:?} through the admin API", state);
    }
    if state == AdminState::Enabled {
        pool.capacity_changed();
    }
    json_resp(
        StatusCode::OK,
        &json!({
            "upstream": upstream,
            "servers": matching.iter().map(|s| json!({
                "addr": s.addr.to_string(),
                "state": s.state(&pool).as_str(),
            })).collect::<Vec<_>>(),
        }),
    )
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The `/api/status` document.
pub fn status(shared: &Shared) -> Value {
    let view = shared.view.load();
    let mut active = 0;
    let mut total = 0;
    let mut up = 0;
    let mut down = 0;
    let listeners: Vec<Value> = view
        .listeners
        .iter()
        .map(|l| {
            let ctx = l.slot.load();
            let st = &ctx.stats;
            let a = st.active.load(Relaxed);
            let results: serde_json::Map<String, Value> = Outcome::FINAL
                .iter()
                .map(|o| (o.as_str().to_string(), json!(st.finished(*o))))
                .collect();
            let t: u64 = Outcome::FINAL.iter().map(|o| st.finished(*o)).sum();
            let (u, d) = st.bytes();
            active += a;
            total += t;
            up += u;
            down += d;
            let (mode, tls) = match &ctx.front {
                crate::frontend::FrontEnd::Tls(t) => (
                    "tls",
                    json!({
                        "handshakes": {
                            "ok": st.tls_full.load(Relaxed),
                            "resumed": st.tls_resumed.load(Relaxed),
                            "failed": st.tls_failed.load(Relaxed),
                        },
                        "certificates": t.certs.iter().map(|c| json!({
                            "name": c.name,
                            "subject": c.info.subject,
                            "names": c.info.names,
                            "not_before": rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(c.info.not_before.max(0) as u64)),
                            "not_after": rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(c.info.not_after.max(0) as u64)),
                            // Whole days, rounded down: -1 once expired.
                            "expires_in_days": crate::tls::certs::seconds_left(&c.info).div_euclid(86400),
                        })).collect::<Vec<_>>(),
                    }),
                ),
                other => (other.mode(), Value::Null),
            };
            // Where a forward-proxy listener's clients may go (never its users' secrets).
            let forward = match &ctx.front {
                crate::frontend::FrontEnd::Socks5 { forward, .. }
                | crate::frontend::FrontEnd::HttpConnect { forward, .. } => json!({
                    "destinations": forward.destinations.rules().iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                    "users": forward.users.len(),
                }),
                crate::frontend::FrontEnd::Transparent(t) => json!({
                    "destinations": t.destinations.as_ref().map(|d| d.rules().iter().map(|r| r.to_string()).collect::<Vec<_>>()),
                }),
                _ => Value::Null,
            };
            // A UDP listener's sessions (its connections) and datagrams.
            let udp = match &ctx.front {
                crate::frontend::FrontEnd::Udp(u) => {
                    let datagrams = st.datagrams();
                    json!({
                    "sessions_active": a,
                    "sessions_total": t,
                    "idle_timeout_ms": u.idle_timeout.as_millis() as u64,
                    "responses": u.responses,
                    "requests": u.requests,
                    "datagrams_up": datagrams.0,
                    "datagrams_down": datagrams.1,
                    "datagrams_kernel": datagrams.2,
                    "dropped": crate::observe::Dropped::ALL
                        .iter()
                        .map(|d| (d.as_str().to_string(), json!(st.dropped(*d))))
                        .collect::<serde_json::Map<String, Value>>(),
                    })
                }
                _ => Value::Null,
            };
            let routes: Vec<Value> = ctx
                .router
                .counts()
                .into_iter()
                .map(|(route, upstream, n)| json!({"route": route, "upstream": upstream, "matches": n}))
                .collect();
            json!({
                "name": ctx.name,
                "addrs": l.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "mode": mode,
                "upstream": ctx.router.default().map(|p| p.name.clone()),
                "routes": routes,
                "tls": tls,
                "forward": forward,
                "udp": udp,
                "connections_active": a,
                "connections_total": t,
                "bytes_up": u,
                "bytes_down": d,
                "results": results,
            })
        })
        .collect();
    let upstreams: Vec<Value> = view
        .pools
        .iter()
        .map(|p| {
            let set = p.servers();
            let (changes, added, removing) = p.runtime_changes();
            json!({
                "name": p.name,
                "balance": p.balance.as_str(),
                // What the admin API changed; the next reload replaces it with the file.
                "runtime_changes": changes,
                "queued": p.queued(),
                "sticky_entries": p.sticky_entries(),
                "servers": set.servers.iter().map(|s| {
                    let last = s.last_check.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    json!({
                        "addr": s.addr.to_string(),
                        "configured": &*s.configured,
                        "state": s.state(p).as_str(),
                        "weight": s.weight(),
                        "source": if added.contains(&s.configured.to_string()) { "api" } else { "file" },
                        "removing": removing.contains(&s.configured.to_string()),
                        "backup": s.backup,
                        "connections_active": s.stats.active.load(Relaxed),
                        "connections_total": s.stats.total.load(Relaxed),
                        "bytes_up": s.stats.bytes_up.get(),
                        "bytes_down": s.stats.bytes_down.get(),
                        "connect_failures": s.stats.connect_failures.load(Relaxed),
                        "last_check": last.at.map(|at| json!({
                            "ok": last.ok,
                            "reason": last.reason,
                            "at": rfc3339(at),
                            "duration_ms": last.duration.as_secs_f64() * 1e3,
                        })),
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": shared.started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
        "process": {
            "pid": std::process::id(),
            "connections_active": active,
            "connections_total": total,
            "worker_connections": shared.workers().loads(),
            "bytes_up": up,
            "bytes_down": down,
            "max_connections": shared.global.max(),
        },
        "listeners": listeners,
        "upstreams": upstreams,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_paths() {
        assert_eq!(percent_decode("%5B%3A%3A1%5D%3A80").unwrap(), "[::1]:80");
        assert_eq!(percent_decode("127.0.0.1:80").unwrap(), "127.0.0.1:80");
        assert!(percent_decode("%zz").is_none());
        assert!(percent_decode("%4").is_none());
    }

    #[test]
    fn token_compare() {
        let t = Token::new("secret");
        assert!(t.matches(b"secret"));
        assert!(!t.matches(b"secreT"));
        assert!(!t.matches(b"secret2"));
        assert!(!t.matches(b""));
    }

    #[test]
    fn bearer_scheme() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearerabc"), None);
    }
}
