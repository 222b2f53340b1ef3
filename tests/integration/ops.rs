//! Operations (issue 6): Prometheus metrics checked by the reference parser, the status
//! API, server drain/enable/disable through the API, the admin token, hot reload under
//! load (POST /api/reload and SIGHUP), rejected reloads, listeners removed and added by a
//! reload, on_connect/progress access-log records, and the stats page in headless
//! Chromium.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::ops_support::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `[admin]` on an ephemeral loopback port, with an optional token.
fn admin_section(token: Option<&str>) -> String {
    match token {
        Some(t) => format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{t}\"\n"),
        None => "[admin]\nlisten = \"127.0.0.1:0\"\n".to_string(),
    }
}

/// One listener `front` in front of upstream `echo` with `servers` (TOML array items).
fn front_config(servers: &str) -> String {
    front_config_with(servers, "")
}

/// [`front_config`] with `upstream_extra` appended to the upstream's table.
fn front_config_with(servers: &str, upstream_extra: &str) -> String {
    format!(
        r#"
{}

[log]
access = "@LOG@"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "echo"

[[upstream]]
name = "echo"
servers = [{servers}]
{upstream_extra}
"#,
        admin_section(None)
    )
}

/// Rewrites ferry's config file (with `@LOG@` replaced as at start).
fn rewrite_config(ferry: &Ferry, text: &str) {
    let text = text.replace("@LOG@", &ferry.log_path.display().to_string());
    std::fs::write(&ferry.config_path, text).expect("rewrite config");
}

fn drain_path(upstream: &str, server: SocketAddr, action: &str) -> String {
    format!("/api/upstreams/{upstream}/servers/{server}/{action}")
}

fn assert_json_error(r: &HttpResp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {r:?}");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{what}: not JSON: {r:?}"
    );
    let v = r.json();
    assert!(
        v["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: no `error` in {v}"
    );
}

/// A relayed connection: `n` bytes up, echoed back, then closed by the client.
async fn relay_bytes(addr: SocketAddr, n: usize) -> SocketAddr {
    let mut s = connect(addr).await;
    let client = s.local_addr().unwrap();
    echo_round_trip(&mut s, &vec![b'z'; n]).await;
    s.shutdown().await.unwrap();
    read_until_closed(&mut s, WAIT).await;
    client
}

// ---------------------------------------------------------------------------------------
// 1. /metrics

/// A ferry with a health-checked upstream and an admin server, for the metrics tests.
async fn metrics_ferry() -> (Ferry, SocketAddr, SocketAddr) {
    let echo = echo_server().await;
    let cfg = front_config_with(
        &format!("\"{echo}\""),
        "[upstream.health]\ninterval = \"200ms\"",
    );
    let ferry = Ferry::start(&cfg, 1).await;
    let admin = admin_addr(&ferry).await;
    (ferry, echo, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_the_reference_parser() {
    ensure_prometheus_client();
    let (ferry, _, admin) = metrics_ferry().await;
    let addr = ferry.addr("front");

    // A plain request (a browser, curl) gets the Prometheus text format ...
    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8"),
        "{r:?}"
    );
    let fams = parse_with_prometheus_client(&r.body, false);
    // ... and a scraper that asks for OpenMetrics (as Prometheus does) gets it: the same
    // families, typed the same.
    let accept =
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1";
    let om = http(admin, "GET", "/metrics", &[("Accept", accept)], b"").await;
    assert_eq!(om.status, 200);
    assert!(
        om.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{om:?}"
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    let om_fams = parse_with_prometheus_client(&om.body, true);
    for (family, v) in fams.as_object().unwrap() {
        assert_eq!(
            om_fams[family]["type"], v["type"],
            "{family}: {om_fams:#}\n{fams:#}"
        );
    }
    assert_eq!(
        om_fams.as_object().unwrap().len(),
        fams.as_object().unwrap().len()
    );
    for (family, ty) in [
        ("ferry_connections", "counter"),
        ("ferry_connections_active", "gauge"),
        ("ferry_bytes", "counter"),
        ("ferry_server_up", "gauge"),
        ("ferry_server_connections_active", "gauge"),
        ("ferry_connect_duration_seconds", "histogram"),
        ("ferry_health_checks", "counter"),
        ("ferry_config_reloads", "counter"),
    ] {
        assert_eq!(
            fams[family]["type"], ty,
            "family {family} in {fams:#}\n{}",
            r.body
        );
    }
    // With traffic, an open connection and a reload behind it: still valid.
    relay_bytes(addr, 1000).await;
    let mut open = connect(addr).await;
    echo_round_trip(&mut open, b"open").await;
    assert_eq!(post(admin, "/api/reload", None).await.status, 200);
    parse_with_prometheus_client(&metrics(admin).await, false);
}

/// Checks histogram `name` for `upstream`: cumulative buckets in rising `le` order, the
/// last one `le="+Inf"`, holding `_count`. Returns `_count`.
fn assert_histogram(m: &str, name: &str, upstream: &str) -> f64 {
    let labels = [("upstream", upstream)];
    let count = metric_must(m, &format!("{name}_count"), &labels);
    let buckets = samples(m, &format!("{name}_bucket"), &labels);
    assert!(buckets.len() >= 2, "{name}: no buckets:\n{m}");
    let mut prev = (f64::NEG_INFINITY, 0.0);
    for (l, v) in &buckets {
        let le = &l["le"];
        let bound: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        assert!(
            bound > prev.0,
            "{name}: bucket le={le:?} out of order or not a number:\n{m}"
        );
        assert!(
            *v >= prev.1,
            "{name}: buckets not cumulative at le={le}:\n{m}"
        );
        assert!(
            *v <= count,
            "{name}: bucket le={le} holds {v}, more than _count {count}:\n{m}"
        );
        prev = (bound, *v);
    }
    let (last, v) = buckets.last().unwrap();
    assert_eq!(
        last["le"], "+Inf",
        "{name}: the last bucket must be le=\"+Inf\":\n{m}"
    );
    assert_eq!(*v, count, "{name}: the +Inf bucket must equal _count:\n{m}");
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic() {
    let (ferry, echo, admin) = metrics_ferry().await;
    let addr = ferry.addr("front");
    let m0 = metrics(admin).await;
    let ok = |m: &str| {
        metric_must(
            m,
            "ferry_connections_total",
            &[("listener", "front"), ("result", "ok")],
        )
    };
    let bytes = |m: &str, dir| {
        metric_must(
            m,
            "ferry_bytes_total",
            &[("listener", "front"), ("direction", dir)],
        )
    };
    let srv = echo.to_string();
    let server_bytes = |m: &str, dir| {
        metric_must(
            m,
            "ferry_server_bytes_total",
            &[("upstream", "echo"), ("server", &srv), ("direction", dir)],
        )
    };
    let active = |m: &str| metric_must(m, "ferry_connections_active", &[("listener", "front")]);
    assert_eq!(
        metric_must(&m0, "ferry_server_up", &[("server", &srv)]),
        1.0
    );

    // A finished connection: counted once, its bytes exactly.
    relay_bytes(addr, 1000).await;
    ferry.records_with("ok", 1, WAIT).await;
    let m1 = metrics(admin).await;
    assert_eq!(ok(&m1), ok(&m0) + 1.0);
    assert_eq!(bytes(&m1, "up"), bytes(&m0, "up") + 1000.0);
    assert_eq!(bytes(&m1, "down"), bytes(&m0, "down") + 1000.0);
    assert_eq!(server_bytes(&m1, "up"), server_bytes(&m0, "up") + 1000.0);

    // A long connection: its bytes show while it is open.
    let mut long = connect(addr).await;
    echo_round_trip(&mut long, &[1u8; 4096]).await;
    let m2 = metrics(admin).await;
    assert_eq!(active(&m2), 1.0);
    assert_eq!(
        metric_must(&m2, "ferry_server_connections_active", &[("server", &srv)]),
        1.0
    );
    assert_eq!(
        bytes(&m2, "up"),
        bytes(&m1, "up") + 4096.0,
        "bytes of an open connection"
    );
    assert_eq!(bytes(&m2, "down"), bytes(&m1, "down") + 4096.0);
    assert_eq!(ok(&m2), ok(&m1), "nothing finished yet");
    echo_round_trip(&mut long, &[2u8; 8192]).await;
    let m3 = metrics(admin).await;
    assert_eq!(bytes(&m3, "up"), bytes(&m2, "up") + 8192.0);
    assert_eq!(bytes(&m3, "down"), bytes(&m2, "down") + 8192.0);
    long.shutdown().await.unwrap();
    read_until_closed(&mut long, WAIT).await;
    ferry.records_with("ok", 2, WAIT).await;
    let m4 = metrics(admin).await;
    assert_eq!(ok(&m4), ok(&m1) + 1.0);
    assert_eq!(active(&m4), 0.0);
    // Health checks count too (the first one comes within the first 200 ms interval).
    let checks = |m: &str| {
        metric_must(
            m,
            "ferry_health_checks_total",
            &[("server", &srv), ("result", "ok")],
        )
    };
    let deadline = Instant::now() + WAIT;
    while checks(&metrics(admin).await) < 2.0 {
        assert!(Instant::now() < deadline, "health checks are not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connect-time histogram: one observation per connection, and consistent.
    let after = assert_histogram(&m4, "ferry_connect_duration_seconds", "echo");
    let before = assert_histogram(&m0, "ferry_connect_duration_seconds", "echo");
    assert_eq!(after, before + 2.0);
}

// ---------------------------------------------------------------------------------------
// 2. /api/status

fn assert_u64(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a non-negative integer in {v:#}"))
}

/// Per-server metrics name a server as configured (`server`) and by the address it
/// resolved to (`address`); a name that resolves to an address also given literally adds
/// no second server (nor a duplicate series).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_label_is_the_address_as_configured() {
    let echo = echo_server().await;
    let named = format!("localhost:{}", echo.port());
    let f = Ferry::start(
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "named"

[[listener]]
name = "both"
listen = "127.0.0.1:0"
upstream = "both"

[[upstream]]
name = "named"
servers = ["{named}"]

[[upstream]]
name = "both"
servers = ["{named}", "{echo}"]
"#
        ),
        2,
    )
    .await;
    let admin = admin_addr(&f).await;
    let m = metrics(admin).await;
    let resolved = echo.to_string();
    let series = |upstream: &str, server: &str| {
        samples(
            &m,
            "ferry_server_connections_total",
            &[
                ("upstream", upstream),
                ("server", server),
                ("address", resolved.as_str()),
            ],
        )
        .len()
    };
    assert_eq!(series("named", &named), 1, "{m}");
    assert_eq!(series("both", &resolved), 1, "{m}");
    assert_eq!(series("both", &named), 0, "{m}");
    let mut c = connect(f.addr("both")).await;
    echo_round_trip(&mut c, b"served").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_api_shape() {
    let echo = echo_server().await;
    let dead = refused_addr();
    let cfg = format!(
        r#"
{}
[log]
access = "@LOG@"

[[listener]]
name = "front"
listen = ["127.0.0.1:0", "[::1]:0"]
upstream = "echo"

[[listener]]
name = "other"
listen = "127.0.0.1:0"
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["{echo}", {{ addr = "{dead}", weight = 2 }}]
retries = 1

[upstream.health]
interval = "100ms"
rise = 1
fall = 1
"#,
        admin_section(None)
    );
    // Uptime is wall-clock time since ferry started: bounded by the test's own clock.
    let spawned = std::time::SystemTime::now();
    let ferry = Ferry::start(&cfg, 3).await;
    let admin = admin_addr(&ferry).await;

    // Wait for the health checks to decide: the dead server down, the echo server up.
    let deadline = Instant::now() + WAIT;
    let (st, st_answered) = loop {
        let st = status(admin).await;
        let answered = std::time::SystemTime::now();
        let d = server_status(&st, "echo", dead);
        let e = server_status(&st, "echo", echo);
        if d["state"] == "down" && e["last_check"].is_object() {
            break (st, answered);
        }
        assert!(
            Instant::now() < deadline,
            "health checks never decided: {st:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let front = ferry.addr("front");
    relay_bytes(front, 300).await;
    ferry.records_with("ok", 1, WAIT).await;
    let st2_asked = std::time::SystemTime::now();
    let st2 = status(admin).await;

    assert_eq!(st2["version"], env!("CARGO_PKG_VERSION"));
    let up1 = st["uptime_seconds"].as_f64().expect("uptime_seconds");
    let up2 = st2["uptime_seconds"].as_f64().expect("uptime_seconds");
    // Ferry started after `spawned` and answered before `st_answered`; the second answer
    // came after `st2_asked`. (1e-9 s for the rounding of seconds as floats.)
    let secs = |later: std::time::SystemTime, earlier| {
        later.duration_since(earlier).unwrap().as_secs_f64()
    };
    let since_spawn = secs(st_answered, spawned);
    let between = secs(st2_asked, st_answered);
    assert!(
        up1 > 0.0 && up1 <= since_spawn + 1e-9,
        "uptime {up1} s, {since_spawn} s after ferry was started"
    );
    assert!(
        up2 > up1 && up2 - up1 >= between - 1e-9,
        "uptime {up1} s then {up2} s, {between} s later"
    );

    let p = &st2["process"];
    for k in [
        "connections_active",
        "connections_total",
        "bytes_up",
        "bytes_down",
        "max_connections",
    ] {
        assert_u64(p, k);
    }
    assert_eq!(p["connections_total"], 1, "{p}");
    assert_eq!(p["bytes_up"], 300);
    assert_eq!(p["bytes_down"], 300);
    assert_eq!(p["connections_active"], 0);

    let ls = st2["listeners"].as_array().expect("listeners[]");
    let names: Vec<&str> = ls.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["front", "other"]);
    for l in ls {
        let name = l["name"].as_str().unwrap();
        let addrs: Vec<SocketAddr> = l["addrs"]
            .as_array()
            .expect("addrs[]")
            .iter()
            .map(|a| a.as_str().unwrap().parse().expect("an address"))
            .collect();
        let announced: Vec<SocketAddr> = ferry
            .listening
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .collect();
        assert_eq!(addrs, announced, "listener {name}");
        assert_eq!(l["mode"], "tcp");
        assert_eq!(l["upstream"], "echo");
        for k in [
            "connections_active",
            "connections_total",
            "bytes_up",
            "bytes_down",
        ] {
            assert_u64(l, k);
        }
        let results = l["results"].as_object().expect("results{}");
        for r in [
            "ok",
            "denied",
            "limited",
            "no_server",
            "queue_timeout",
            "connect_failed",
            "connect_timeout",
            "idle_timeout",
            "client_reset",
            "server_reset",
            "protocol_error",
            "drained",
        ] {
            assert!(results[r].is_u64(), "results.{r} of {name}: {l:#}");
        }
        assert!(
            !results.contains_key("open"),
            "`open` is not a final result"
        );
    }
    assert_eq!(ls[0]["results"]["ok"], 1);
    assert_eq!(ls[0]["connections_total"], 1);
    assert_eq!(ls[0]["bytes_up"], 300);

    let us = st2["upstreams"].as_array().expect("upstreams[]");
    assert_eq!(us.len(), 1);
    let u = &us[0];
    assert_eq!(u["name"], "echo");
    assert_eq!(u["balance"], "round_robin");
    assert_u64(u, "queued");
    assert_u64(u, "sticky_entries");
    let servers = u["servers"].as_array().expect("servers[]");
    assert_eq!(servers.len(), 2);
    for s in servers {
        assert!(s["addr"].is_string() && s["configured"].is_string(), "{s}");
        assert!(s["backup"].is_boolean(), "{s}");
        for k in [
            "weight",
            "connections_active",
            "connections_total",
            "bytes_up",
            "bytes_down",
            "connect_failures",
        ] {
            assert_u64(s, k);
        }
        let c = &s["last_check"];
        assert!(c["ok"].is_boolean(), "last_check of {s:#}");
        assert!(c["reason"].is_string(), "{s:#}");
        assert!(c["duration_ms"].is_number(), "{s:#}");
        let at = c["at"].as_str().expect("last_check.at");
        assert!(
            at.len() >= 20 && at.as_bytes()[10] == b'T',
            "not RFC 3339: {at}"
        );
    }
    let e = server_status(&st2, "echo", echo);
    assert_eq!(e["state"], "up");
    assert_eq!(e["configured"], echo.to_string());
    assert_eq!(e["weight"], 1);
    assert_eq!(e["backup"], false);
    assert_eq!(e["last_check"]["ok"], true);
    assert_eq!(e["connections_total"], 1);
    assert_eq!(e["bytes_up"], 300);
    let d = server_status(&st2, "echo", dead);
    assert_eq!(d["state"], "down");
    assert_eq!(d["weight"], 2);
    assert_eq!(d["last_check"]["ok"], false);
    assert!(
        !d["last_check"]["reason"].as_str().unwrap().is_empty(),
        "a failed check says why: {d:#}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. drain / enable / disable through the API

/// Opens connections until one reaches the server tagged `tag`.
async fn connect_to_tag(addr: SocketAddr, tag: &str) -> TcpStream {
    for _ in 0..8 {
        let (s, t) = connect_tagged(addr).await;
        if t == tag {
            return s;
        }
    }
    panic!("no connection reached server {tag}");
}

/// The tags of `n` new connections (each closed again).
async fn tags_of_new(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut tags = Vec::new();
    for _ in 0..n {
        let (mut s, t) = connect_tagged(addr).await;
        echo_round_trip(&mut s, b"new").await;
        tags.push(t);
    }
    tags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_enable_disable_through_the_api() {
    let a = tagged_echo("A").await;
    let b = tagged_echo("B").await;
    let ferry = Ferry::start(&front_config(&format!("\"{a}\", \"{b}\"")), 1).await;
    let addr = ferry.addr("front");
    let admin = admin_addr(&ferry).await;

    let mut held = connect_to_tag(addr, "A").await;
    echo_round_trip(&mut held, b"before").await;

    // Drain A: new connections go to B only; the open one on A carries on.
    let r = post(admin, &drain_path("echo", a, "drain"), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["upstream"], "echo");
    assert_eq!(v["servers"][0]["addr"], a.to_string());
    assert_eq!(v["servers"][0]["state"], "draining");
    assert_eq!(tags_of_new(addr, 6).await, vec!["B"; 6]);
    echo_round_trip(&mut held, b"still served while draining").await;
    let st = status(admin).await;
    let sa = server_status(&st, "echo", a);
    assert_eq!(sa["state"], "draining");
    assert_eq!(sa["connections_active"], 1);
    let m = metrics(admin).await;
    assert_eq!(
        metric_must(&m, "ferry_server_up", &[("server", &a.to_string())]),
        0.0
    );

    // Enable: A takes new connections again.
    let r = post(admin, &drain_path("echo", a, "enable"), None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["servers"][0]["state"], "up");
    let tags = tags_of_new(addr, 4).await;
    assert_eq!(tags.iter().filter(|t| *t == "A").count(), 2, "{tags:?}");

    // Disable (with the address percent-encoded): as drain, shown as disabled.
    let enc = a.to_string().replace(':', "%3A");
    let r = post(
        admin,
        &format!("/api/upstreams/echo/servers/{enc}/disable"),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["servers"][0]["state"], "disabled");
    assert_eq!(tags_of_new(addr, 4).await, vec!["B"; 4]);
    echo_round_trip(&mut held, b"still served while disabled").await;
    assert_eq!(
        server_status(&status(admin).await, "echo", a)["state"],
        "disabled"
    );
    post(admin, &drain_path("echo", a, "enable"), None).await;
    assert_eq!(
        server_status(&status(admin).await, "echo", a)["state"],
        "up"
    );
    held.shutdown().await.unwrap();
    read_until_closed(&mut held, WAIT).await;

    // Errors.
    let r = post(admin, &drain_path("nope", a, "drain"), None).await;
    assert_json_error(&r, 404, "unknown upstream");
    let r = post(admin, &drain_path("echo", refused_addr(), "drain"), None).await;
    assert_json_error(&r, 404, "unknown server");
    let r = post(admin, &drain_path("echo", a, "explode"), None).await;
    assert_json_error(&r, 404, "unknown action");
    let r = get(admin, &drain_path("echo", a, "drain")).await;
    assert_json_error(&r, 405, "GET on a server action");
    assert_eq!(r.header("allow"), Some("POST"), "{r:?}");
    let r = get(admin, "/api/reload").await;
    assert_json_error(&r, 405, "GET /api/reload");
    assert_eq!(r.header("allow"), Some("POST"));
    let r = post(admin, "/api/status", None).await;
    assert_json_error(&r, 405, "POST /api/status");
    assert_eq!(r.header("allow"), Some("GET"));
    let r = http(admin, "DELETE", "/metrics", &[], b"").await;
    assert_json_error(&r, 405, "DELETE /metrics");
    assert_eq!(r.header("allow"), Some("GET"));
    let r = get(admin, "/no/such/thing").await;
    assert_json_error(&r, 404, "unknown path");
    let r = get(admin, "/api/upstreams").await;
    assert_json_error(&r, 404, "a prefix of a path");
    // Nothing above changed a server.
    let st = status(admin).await;
    assert_eq!(server_status(&st, "echo", a)["state"], "up");
    assert_eq!(server_status(&st, "echo", b)["state"], "up");
}

// ---------------------------------------------------------------------------------------
// 4. the admin token

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_required_on_every_post() {
    let echo = echo_server().await;
    let cfg = front_config(&format!("\"{echo}\"")).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &admin_section(Some("s3cret")),
    );
    let ferry = Ferry::start(&cfg, 1).await;
    let admin = admin_addr(&ferry).await;
    let reloads = |m: &str, r| metric_must(m, "ferry_config_reloads_total", &[("result", r)]);

    let posts = [
        drain_path("echo", echo, "drain"),
        drain_path("echo", echo, "disable"),
        drain_path("echo", echo, "enable"),
        "/api/reload".to_string(),
    ];
    let bad_auth: [&[(&str, &str)]; 5] = [
        &[],
        &[("Authorization", "Bearer wrong")],
        &[("Authorization", "Bearer s3cret2")],
        &[("Authorization", "Basic czNjcmV0")],
        &[("Authorization", "s3cret")],
    ];
    for path in &posts {
        for headers in bad_auth {
            let r = http(admin, "POST", path, headers, b"").await;
            assert_json_error(&r, 401, &format!("POST {path} with {headers:?}"));
            assert!(r.header("www-authenticate").is_some(), "{r:?}");
        }
    }
    // Nothing changed: the server is up, no reload happened.
    let st = status(admin).await;
    assert_eq!(server_status(&st, "echo", echo)["state"], "up");
    let m = metrics(admin).await;
    assert_eq!(reloads(&m, "ok") + reloads(&m, "failed"), 0.0);
    // Reading needs no token.
    assert_eq!(get(admin, "/").await.status, 200);

    // With the token: done.
    let r = post(admin, &drain_path("echo", echo, "drain"), Some("s3cret")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        server_status(&status(admin).await, "echo", echo)["state"],
        "draining"
    );
    let r = post(admin, &drain_path("echo", echo, "enable"), Some("s3cret")).await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = post(admin, "/api/reload", Some("s3cret")).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["result"], "applied");
    assert_eq!(reloads(&metrics(admin).await, "ok"), 1.0);
    assert_eq!(
        server_status(&status(admin).await, "echo", echo)["state"],
        "up"
    );
}

// ---------------------------------------------------------------------------------------
// 5. reload under load

/// What a short connection saw: when it began, and the server's tag with when it arrived
/// (the server was picked before that), or what failed.
struct Short {
    started: Instant,
    outcome: Result<(String, Instant), String>,
}

async fn short_connection(addr: SocketAddr) -> Result<(String, Instant), String> {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let fut = async {
        let mut tag = Vec::new();
        let mut b = [0u8; 1];
        loop {
            let n = s.read(&mut b).await.map_err(|e| format!("read tag: {e}"))?;
            if n == 0 {
                return Err(format!("closed before the tag (got {tag:?})"));
            }
            if b[0] == b'\n' {
                break;
            }
            tag.push(b[0]);
        }
        let tagged = Instant::now();
        s.write_all(b"short")
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut back = [0u8; 5];
        s.read_exact(&mut back)
            .await
            .map_err(|e| format!("read echo: {e}"))?;
        if &back != b"short" {
            return Err(format!("echo differs: {back:?}"));
        }
        s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .await
            .map_err(|e| format!("read to close: {e}"))?;
        Ok((String::from_utf8_lossy(&tag).into_owned(), tagged))
    };
    tokio::time::timeout(WAIT, fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

type LongTask = tokio::task::JoinHandle<Result<u32, String>>;

/// Waits until every long-lived connection has echoed `more` rounds past `base` and `n`
/// short connections begun after `since` have finished (or a long-lived one has stopped:
/// its result says why). Returns the long-lived connections' rounds.
#[allow(clippy::too_many_arguments)]
async fn wait_load(
    what: &str,
    long: &[LongTask],
    rounds: &[AtomicU32],
    base: &[u32],
    more: u32,
    shorts: &Mutex<Vec<Short>>,
    since: Instant,
    n: usize,
) -> Vec<u32> {
    within(WAIT, what, async {
        loop {
            let now: Vec<u32> = rounds.iter().map(|r| r.load(SeqCst)).collect();
            let echoed = now.iter().zip(base).all(|(r, b)| *r >= b + more);
            let finished = shorts
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s.started > since)
                .count();
            if long.iter().any(|h| h.is_finished()) || (echoed && finished >= n) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// With no short connection under way (`gate` held for writing: the ones under way hold
/// it for reading), opens `n` connections one after the other; returns their tags. Nothing
/// else picks a server meanwhile, so these are `n` consecutive round-robin picks.
async fn consecutive_picks(
    addr: SocketAddr,
    gate: &tokio::sync::RwLock<()>,
    n: usize,
) -> Vec<String> {
    let _alone = within(
        WAIT,
        "the short connections under way to finish",
        gate.write(),
    )
    .await;
    let mut tags = Vec::new();
    for i in 0..n {
        let (tag, _) = short_connection(addr)
            .await
            .unwrap_or_else(|e| panic!("consecutive connection {i}: {e}"));
        tags.push(tag);
    }
    tags
}

/// The tags of the short connections that `pred` (given each one and when its tag came)
/// selects.
fn tags_where(shorts: &[Short], pred: impl Fn(&Short, Instant) -> bool) -> Vec<&str> {
    shorts
        .iter()
        .filter_map(|s| {
            let (tag, tagged) = s.outcome.as_ref().expect("a failed short connection");
            pred(s, *tagged).then_some(tag.as_str())
        })
        .collect()
}

/// `tags` are spread evenly over `servers`: no other tag, and one server has at most one
/// more than another (what a run of round-robin picks over equal weights gives).
fn assert_even(tags: &[String], servers: &[&str], what: &str) {
    let counts: Vec<usize> = servers
        .iter()
        .map(|s| tags.iter().filter(|t| t.as_str() == *s).count())
        .collect();
    assert!(
        counts.iter().sum::<usize>() == tags.len()
            && counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{what}: {servers:?} got {counts:?} of {tags:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_nothing() {
    const LONG: usize = 20;
    /// In each phase (before, between and after the reloads): rounds each long-lived
    /// connection echoes, and short connections begun and finished.
    const ROUNDS: u32 = 3;
    const SHORTS: usize = 40;
    let a = tagged_echo("A").await;
    let b = tagged_echo("B").await;
    let c = tagged_echo("C").await;
    let servers_a = format!("\"{a}\"");
    let ferry = Ferry::start(&front_config(&servers_a), 1).await;
    let addr = ferry.addr("front");
    let admin = admin_addr(&ferry).await;
    let stop = Arc::new(AtomicBool::new(false));

    // 20 long-lived connections, each echoing every 50 ms; `rounds[i]` counts i's rounds.
    let rounds: Arc<Vec<AtomicU32>> = Arc::new((0..LONG).map(|_| AtomicU32::new(0)).collect());
    let mut long: Vec<LongTask> = Vec::new();
    for i in 0..LONG {
        let (mut s, tag) = connect_tagged(addr).await;
        assert_eq!(tag, "A");
        let (stop, rounds) = (stop.clone(), rounds.clone());
        long.push(tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(SeqCst) {
                let msg = format!("long {i} round {n}");
                let r = tokio::time::timeout(WAIT, async {
                    s.write_all(msg.as_bytes()).await?;
                    let mut back = vec![0u8; msg.len()];
                    s.read_exact(&mut back).await?;
                    Ok::<_, std::io::Error>(back)
                })
                .await;
                match r {
                    Ok(Ok(back)) if back == msg.as_bytes() => {}
                    other => return Err(format!("long {i}, round {n}: {other:?}")),
                }
                n += 1;
                rounds[i].store(n, SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(n)
        }));
    }

    // New short connections, one every ~10 ms; each holds `gate` for reading while it
    // runs, so that holding it for writing waits for those under way and holds back new
    // ones.
    let done: Arc<Mutex<Vec<Short>>> = Arc::new(Mutex::new(Vec::new()));
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let load_began = Instant::now();
    let shorts = tokio::spawn({
        let (stop, done, gate) = (stop.clone(), done.clone(), gate.clone());
        async move {
            let mut under_way = Vec::new();
            while !stop.load(SeqCst) {
                let running = gate.clone().read_owned().await;
                let done = done.clone();
                under_way.push(tokio::spawn(async move {
                    let started = Instant::now();
                    let outcome = short_connection(addr).await;
                    done.lock().unwrap().push(Short { started, outcome });
                    drop(running);
                }));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            for h in under_way {
                h.await.expect("short connection task");
            }
        }
    });

    let zero = vec![0; LONG];
    let base = wait_load(
        "load on A",
        &long,
        &rounds,
        &zero,
        ROUNDS,
        &done,
        load_began,
        SHORTS,
    )
    .await;
    // Reload through the API: add B.
    rewrite_config(&ferry, &front_config(&format!("\"{a}\", \"{b}\"")));
    let before_api = Instant::now();
    let r = post(admin, "/api/reload", None).await;
    let after_api = Instant::now();
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["result"], "applied", "{v}");
    assert!(
        v["changes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c.as_str().unwrap().contains("upstream \"echo\" changed")),
        "{v}"
    );
    let base = wait_load(
        "load on A and B",
        &long,
        &rounds,
        &base,
        ROUNDS,
        &done,
        after_api,
        SHORTS,
    )
    .await;
    // Round robin over the new set: a run of consecutive picks is even. (A run as long as
    // a whole number of cycles, so that the load's picks around it stay even too.)
    let picks_ab = consecutive_picks(addr, &gate, 20).await;
    assert_even(&picks_ab, &["A", "B"], "after adding B");

    // Reload with SIGHUP: add C.
    rewrite_config(&ferry, &front_config(&format!("\"{a}\", \"{b}\", \"{c}\"")));
    let hup_sent = Instant::now();
    ferry.signal("HUP");
    ferry
        .stderr
        .wait_count(2, WAIT, |l| l.contains("reload: upstream \"echo\" changed"))
        .await
        .unwrap_or_else(|| panic!("SIGHUP reload not applied:\n{}", ferry.stderr.text()));
    let after_hup = Instant::now();
    wait_load(
        "load on A, B and C",
        &long,
        &rounds,
        &base,
        ROUNDS,
        &done,
        after_hup,
        SHORTS,
    )
    .await;
    let picks_abc = consecutive_picks(addr, &gate, 30).await;
    assert_even(&picks_abc, &["A", "B", "C"], "after adding C");
    stop.store(true, SeqCst);

    for (i, t) in long.into_iter().enumerate() {
        let n = within(WAIT, "a long-lived connection", t)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("an established connection broke across the reloads: {e}"));
        assert!(n >= 3 * ROUNDS, "long connection {i} echoed only {n} times");
    }
    within(Duration::from_secs(30), "the short connections", shorts)
        .await
        .unwrap();
    let shorts = std::mem::take(&mut *done.lock().unwrap());
    let failed: Vec<&String> = shorts
        .iter()
        .filter_map(|s| s.outcome.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed across the reloads: {failed:?}",
        failed.len(),
        shorts.len()
    );
    // Each went to a server of the config in force: what was picked before the API reload
    // was sent had only A; what began after it answered and was picked before the SIGHUP
    // was sent, A or B; what began after the SIGHUP reload was logged, any of the three.
    let before = tags_where(&shorts, |_, tagged| tagged < before_api);
    let between = tags_where(&shorts, |s, tagged| {
        s.started > after_api && tagged < hup_sent
    });
    let after = tags_where(&shorts, |s, _| s.started > after_hup);
    let n = |tags: &[&str], t: &str| tags.iter().filter(|x| **x == t).count();
    eprintln!(
        "{} short connections; before the reloads A={}; between A={} B={}; after A={} B={} C={}",
        shorts.len(),
        n(&before, "A"),
        n(&between, "A"),
        n(&between, "B"),
        n(&after, "A"),
        n(&after, "B"),
        n(&after, "C"),
    );
    assert!(
        before.iter().all(|t| *t == "A"),
        "before adding B: {before:?}"
    );
    assert!(
        between.iter().all(|t| ["A", "B"].contains(t)),
        "between the reloads: {between:?}"
    );
    assert!(
        after.iter().all(|t| ["A", "B", "C"].contains(t)),
        "after adding C: {after:?}"
    );
    assert!(
        before.len() >= SHORTS && between.len() >= SHORTS && after.len() >= SHORTS,
        "{} short connections before the reloads, {} between, {} after",
        before.len(),
        between.len(),
        after.len()
    );
    let m = metrics(admin).await;
    assert_eq!(
        metric_must(&m, "ferry_config_reloads_total", &[("result", "ok")]),
        2.0
    );
    let total = shorts.len() + LONG + picks_ab.len() + picks_abc.len();
    let recs = ferry.records(total, WAIT).await;
    let bad: Vec<&Value> = recs.iter().filter(|r| r["result"] != "ok").collect();
    assert!(bad.is_empty(), "connections that did not end ok: {bad:#?}");
}

// ---------------------------------------------------------------------------------------
// 6. a broken config on reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_config_is_rejected_and_the_old_one_keeps_serving() {
    let echo = echo_server().await;
    let good = front_config(&format!("\"{echo}\""));
    let ferry = Ferry::start(&good, 1).await;
    let addr = ferry.addr("front");
    let admin = admin_addr(&ferry).await;
    let mut open = connect(addr).await;
    echo_round_trip(&mut open, b"before").await;

    // Two errors: a bad duration (line 10) and an unknown key (line 11).
    let broken = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess = \"@LOG@\"\n\n[[listener]]\nname = \"front\"\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"forever\"\ncolour = \"red\"\nupstream = \"echo\"\n\n[[upstream]]\nname = \"echo\"\nservers = [\"{echo}\"]\n"
    );
    rewrite_config(&ferry, &broken);
    let r = post(admin, "/api/reload", None).await;
    assert_eq!(r.status, 400, "{r:?}");
    let v = r.json();
    assert_eq!(v["result"], "rejected", "{v}");
    assert!(v["error"].is_string(), "{v}");
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .expect("errors[]")
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let file = ferry.config_path.display().to_string();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].starts_with(&format!("{file}:10:")) && errors[0].contains("idle_timeout"),
        "{errors:#?}"
    );
    assert!(
        errors[1].starts_with(&format!("{file}:11:1: ")) && errors[1].contains("colour"),
        "{errors:#?}"
    );

    // The old config keeps serving, old and new connections alike.
    echo_round_trip(&mut open, b"after a rejected reload").await;
    let mut fresh = connect(addr).await;
    echo_round_trip(&mut fresh, b"a new one").await;
    let reloads = |m: &str, r| metric_must(m, "ferry_config_reloads_total", &[("result", r)]);
    let m = metrics(admin).await;
    assert_eq!(reloads(&m, "failed"), 1.0);
    assert_eq!(reloads(&m, "ok"), 0.0);

    // SIGHUP with the same file: rejected too, logged, counted.
    ferry.signal("HUP");
    ferry
        .stderr
        .wait_count(4, WAIT, |l| l.contains("reload rejected"))
        .await
        .unwrap_or_else(|| panic!("no 'reload rejected' lines:\n{}", ferry.stderr.text()));
    assert_eq!(reloads(&metrics(admin).await, "failed"), 2.0);
    echo_round_trip(&mut open, b"after SIGHUP").await;

    // Fixed: applied.
    rewrite_config(&ferry, &good);
    let r = post(admin, "/api/reload", None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let m = metrics(admin).await;
    assert_eq!(reloads(&m, "failed"), 2.0);
    assert_eq!(reloads(&m, "ok"), 1.0);
    echo_round_trip(&mut open, b"after the fix").await;
}

// ---------------------------------------------------------------------------------------
// 7. listeners removed and added by a reload

/// Listener `a` on an ephemeral port and listener `second` on `second_listen`.
fn two_listeners(second: &str, second_listen: &str, echo: SocketAddr) -> String {
    format!(
        r#"
{}
[log]
access = "@LOG@"

[[listener]]
name = "a"
listen = "127.0.0.1:0"
upstream = "echo"

[[listener]]
name = "{second}"
listen = "{second_listen}"
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#,
        admin_section(None)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_listener_drains_and_added_listener_serves() {
    let echo = echo_server().await;
    let (pb, pc) = (free_port(), free_port());
    let ferry = Ferry::start(&two_listeners("b", &format!("127.0.0.1:{pb}"), echo), 2).await;
    let (a, b) = (ferry.addr("a"), ferry.addr("b"));
    assert_eq!(b.port(), pb);
    let admin = admin_addr(&ferry).await;
    let mut on_b = connect(b).await;
    let on_b_client = on_b.local_addr().unwrap();
    echo_round_trip(&mut on_b, b"before").await;

    rewrite_config(
        &ferry,
        &two_listeners("c", &format!("127.0.0.1:{pc}"), echo),
    );
    let r = post(admin, "/api/reload", None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let changes = r.json()["changes"].to_string();
    assert!(changes.contains("listener \\\"b\\\" removed"), "{changes}");
    assert!(changes.contains("listener \\\"c\\\" added"), "{changes}");

    // b's port refuses new connects from the moment the reload has answered: a reset
    // instead would mean the handshake completed on a listening socket still open, and
    // was cut when that socket closed later.
    for _ in 0..3 {
        match within(
            WAIT,
            "connect to the removed listener",
            TcpStream::connect(b),
        )
        .await
        {
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused,
                "after the reload removed listener b, a connect to it must be refused: {e}"
            ),
            Ok(mut s) => {
                let (_, how) = read_until_closed(&mut s, WAIT).await;
                panic!(
                    "a connect to the removed listener b succeeded after the reload answered (then: {how:?})"
                );
            }
        }
    }
    // Its open connection carries on until closed.
    echo_round_trip(&mut on_b, b"after the reload").await;

    // c binds and serves; a is untouched.
    let line = ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("listener \"c\" listening on "))
        .await
        .expect("c's address")
        .remove(0);
    let c: SocketAddr = line
        .rsplit_once("listening on ")
        .unwrap()
        .1
        .trim()
        .parse()
        .unwrap();
    assert_eq!(c.port(), pc);
    let mut on_c = connect(c).await;
    echo_round_trip(&mut on_c, b"new listener").await;
    let mut on_a = connect(a).await;
    echo_round_trip(&mut on_a, b"old listener").await;

    let st = status(admin).await;
    let names: Vec<&str> = st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "c"]);
    // ... still, once the reload is over: c serving, b gone from the status.
    echo_round_trip(&mut on_b, b"still").await;

    on_b.shutdown().await.unwrap();
    read_until_closed(&mut on_b, WAIT).await;
    let oks = ferry.records_with("ok", 1, WAIT).await;
    let r = record_for(&oks, on_b_client);
    assert_eq!(r["listener"], "b");
    assert_eq!(
        r["bytes_up"],
        (b"before".len() + b"after the reload".len() + b"still".len())
    );
}

/// Port 0 means "any free port": a listener added by a reload on `127.0.0.1:0` does not
/// clash with another listener on `127.0.0.1:0` (nor does it at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_a_listener_on_an_ephemeral_port() {
    let echo = echo_server().await;
    let one = format!(
        "{}\n[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"echo\"\n\n[[upstream]]\nname = \"echo\"\nservers = [\"{echo}\"]\n",
        admin_section(None)
    );
    let ferry = Ferry::start(&one, 1).await;
    let admin = admin_addr(&ferry).await;
    rewrite_config(&ferry, &two_listeners("c", "127.0.0.1:0", echo));
    let r = post(admin, "/api/reload", None).await;
    assert_eq!(r.status, 200, "adding a listener on 127.0.0.1:0: {r:?}");
    let line = ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("listener \"c\" listening on "))
        .await
        .expect("c's address")
        .remove(0);
    let c: SocketAddr = line
        .rsplit_once("listening on ")
        .unwrap()
        .1
        .trim()
        .parse()
        .unwrap();
    let mut on_c = connect(c).await;
    echo_round_trip(&mut on_c, b"new listener").await;
    let mut on_a = connect(ferry.addr("a")).await;
    echo_round_trip(&mut on_a, b"old listener").await;
}

// ---------------------------------------------------------------------------------------
// 8. on_connect and progress records

/// The access-log records of `client` so far.
fn client_records(ferry: &Ferry, client: SocketAddr) -> Vec<Value> {
    let c = client.to_string();
    parse_records(&ferry.log_lines_now())
        .into_iter()
        .filter(|r| r["client"] == c.as_str())
        .collect()
}

/// Waits until the access log holds a record of `client` that `pred` accepts.
async fn wait_client_record(
    ferry: &Ferry,
    client: SocketAddr,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let recs = client_records(ferry, client);
        if recs.iter().any(&pred) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} record for {client} within {WAIT:?}: {recs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_connect_and_interval_records() {
    const INTERVAL_MS: f64 = 300.0;
    let echo = echo_server().await;
    let cfg = format!(
        r#"
[log]
access = "@LOG@"
on_connect = true
interval = "300ms"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#
    );
    let ferry = Ferry::start(&cfg, 1).await;
    let addr = ferry.addr("front");

    // 100 bytes each way, then a progress record that shows them; 200 more, then one
    // that shows 300.
    let progress_at = |n: u64| {
        move |r: &Value| r["event"] == "progress" && r["bytes_up"] == n && r["bytes_down"] == n
    };
    let mut s = connect(addr).await;
    let client = s.local_addr().unwrap();
    echo_round_trip(&mut s, &[1u8; 100]).await;
    wait_client_record(&ferry, client, "progress at 100 bytes", progress_at(100)).await;
    echo_round_trip(&mut s, &[2u8; 200]).await;
    wait_client_record(&ferry, client, "progress at 300 bytes", progress_at(300)).await;
    s.shutdown().await.unwrap();
    read_until_closed(&mut s, WAIT).await;

    ferry.records_with("ok", 1, WAIT).await;
    let recs = client_records(&ferry, client);
    let summary: Vec<String> = recs
        .iter()
        .map(|r| {
            format!(
                "{}/{} up={} down={} after {} ms",
                r["result"], r["event"], r["bytes_up"], r["bytes_down"], r["duration_ms"]
            )
        })
        .collect();
    eprintln!("{summary:#?}");
    assert!(
        recs.len() >= 4,
        "expected connect, progress..., final: {summary:#?}"
    );

    let first = &recs[0];
    assert_eq!(first["result"], "open", "{summary:#?}");
    assert_eq!(first["event"], "connect");
    assert_eq!(first["bytes_up"], 0);
    assert_eq!(first["bytes_down"], 0);
    assert_eq!(first["server"], echo.to_string());
    assert!(first["connect_ms"].is_number(), "{first}");

    let last = recs.last().unwrap();
    assert_eq!(last["result"], "ok", "{summary:#?}");
    assert!(
        last.get("event").is_none(),
        "the final record has no event: {last}"
    );
    assert_eq!(last["bytes_up"], 300);
    assert_eq!(last["bytes_down"], 300);

    let progress = &recs[1..recs.len() - 1];
    let ms = |r: &Value| r["duration_ms"].as_f64().expect("duration_ms");
    let (mut prev_up, mut prev_down) = (0, 0);
    for (k, p) in progress.iter().enumerate() {
        assert_eq!(p["result"], "open", "{p}");
        assert_eq!(p["event"], "progress", "{p}");
        assert_eq!(p["ts"], first["ts"], "one connection, one start: {p}");
        assert_eq!(p["server"], echo.to_string());
        // The k-th record comes no sooner than k intervals in: at most one an interval.
        assert!(
            ms(p) >= INTERVAL_MS * (k + 1) as f64,
            "progress record {} after {} ms, interval 300 ms: {summary:#?}",
            k + 1,
            ms(p)
        );
        let up = p["bytes_up"].as_u64().unwrap();
        let down = p["bytes_down"].as_u64().unwrap();
        assert!(
            [0, 100, 300].contains(&up) && [0, 100, 300].contains(&down) && down <= up,
            "bytes so far (an echo at most one message behind): {p}"
        );
        assert!(
            up >= prev_up && down >= prev_down,
            "progress went backwards: {summary:#?}"
        );
        (prev_up, prev_down) = (up, down);
    }
    assert!(
        ms(last) >= progress.last().map_or(0.0, ms),
        "the final record's duration: {summary:#?}"
    );
    // The ones waited for, in order: 100 bytes both ways, then 300.
    let at = |n: u64| progress.iter().position(progress_at(n));
    assert!(
        matches!((at(100), at(300)), (Some(i), Some(j)) if i < j),
        "progress at 100 bytes, then at 300: {summary:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// 9. the stats page in headless Chromium

fn chromium_bin() -> PathBuf {
    let found = || {
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = found() {
        return p;
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "chromium"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status();
    found().unwrap_or_else(|| {
        panic!(
            "Chromium is not installed and `apt-get install -y chromium` failed ({st:?}); run scripts/setup-test-deps"
        )
    })
}

/// Runs headless Chromium on `url` with `extra` flags (at most 60 s); returns stdout and
/// stderr.
fn run_chromium(url: &str, extra: &[String]) -> (String, String) {
    let bin = chromium_bin();
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=6000",
        "--window-size=1400,1000",
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!(
        "--user-data-dir={}",
        dir.path().join("profile").display()
    ))
    .args(extra)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&out_path).unwrap())
    .stderr(std::fs::File::create(&err_path).unwrap());
    let mut child = cmd.spawn().expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within 60 s:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert!(status.success(), "chromium failed ({status}):\n{err}");
    (out, err)
}

/// Where test artifacts go: the cargo target folder.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_page_renders_in_headless_chromium() {
    let a = echo_server().await;
    let b = echo_server().await;
    let c = echo_server().await;
    let cfg = format!(
        r#"
{}
[log]
access = "@LOG@"

[[listener]]
name = "web-front"
listen = "127.0.0.1:0"
upstream = "web-pool"

[[listener]]
name = "db-front"
listen = "127.0.0.1:0"
upstream = "db-pool"

[[upstream]]
name = "web-pool"
servers = ["{a}", "{b}"]

[[upstream]]
name = "db-pool"
servers = ["{c}"]
"#,
        admin_section(None)
    );
    let ferry = Ferry::start(&cfg, 2).await;
    let admin = admin_addr(&ferry).await;
    relay_bytes(ferry.addr("web-front"), 100).await;
    relay_bytes(ferry.addr("db-front"), 100).await;
    let _held = connect(ferry.addr("web-front")).await;

    let r = get(admin, "/").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "{r:?}"
    );
    assert!(
        r.body.to_ascii_lowercase().contains("<html")
            || r.body.to_ascii_lowercase().contains("<!doctype html")
    );

    let url = format!("http://{admin}/");
    let shot = target_dir().join("stats-page.png");
    let _ = std::fs::remove_file(&shot);
    let (dom, dom_err, shot_err) = {
        let url = url.clone();
        let shot = shot.clone();
        tokio::task::spawn_blocking(move || {
            let (dom, dom_err) = run_chromium(&url, &["--dump-dom".to_string()]);
            let (_, shot_err) = run_chromium(&url, &[format!("--screenshot={}", shot.display())]);
            (dom, dom_err, shot_err)
        })
        .await
        .unwrap()
    };

    // No JavaScript errors while the page loaded and updated itself.
    for (what, err) in [("--dump-dom", &dom_err), ("--screenshot", &shot_err)] {
        let uncaught: Vec<&str> = err.lines().filter(|l| l.contains("Uncaught")).collect();
        assert!(
            uncaught.is_empty(),
            "JavaScript errors ({what}):\n{}",
            uncaught.join("\n")
        );
    }

    // The screenshot is a real PNG with something in it.
    let png = std::fs::read(&shot)
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}\n{shot_err}", shot.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 4096, "a {}-byte screenshot is blank", png.len());
    eprintln!(
        "stats page screenshot: {} ({} bytes)",
        shot.display(),
        png.len()
    );

    // The rendered page shows every listener and every server of the running ferry.
    let st = status(admin).await;
    let mut expected: Vec<String> = vec!["web-front".into(), "db-front".into()];
    for u in st["upstreams"].as_array().unwrap() {
        for s in u["servers"].as_array().unwrap() {
            expected.push(s["addr"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(expected.len(), 5);
    let missing: Vec<&String> = expected
        .iter()
        .filter(|e| !dom.contains(e.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the rendered stats page does not show {missing:?}; rendered DOM:\n{dom}"
    );
}

/// Two worker threads share the connections evenly (within the hand-off slack), whatever
/// the kernel's SO_REUSEPORT hash did; the metrics and the status show each one's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_the_workers() {
    let echo = echo_server().await;
    let cfg = format!(
        "[global]\nworkers = 2\n{}",
        front_config(&format!("\"{echo}\""))
    );
    let ferry = Ferry::start(&cfg, 1).await;
    let admin = admin_addr(&ferry).await;
    let addr = ferry.addr("front");
    let mut open = Vec::new();
    for i in 0..24u8 {
        let mut c = connect(addr).await;
        echo_round_trip(&mut c, &[i; 8]).await;
        open.push(c);
    }
    let m = metrics(admin).await;
    let w: Vec<f64> = ["0", "1"]
        .iter()
        .map(|i| metric_must(&m, "ferry_worker_connections", &[("worker", i)]))
        .collect();
    assert_eq!(w[0] + w[1], 24.0, "{m}");
    assert!((w[0] - w[1]).abs() <= 2.0, "uneven workers: {w:?}");
    let st = status(admin).await;
    let per_worker = st["process"]["worker_connections"]
        .as_array()
        .expect("process.worker_connections")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect::<Vec<_>>();
    assert_eq!(per_worker.len(), 2);
    assert_eq!(per_worker.iter().sum::<u64>(), 24, "{st:#}");

    // A connection leaves its worker's count before its record is written.
    drop(open);
    ferry.records(24, WAIT).await;
    let m = metrics(admin).await;
    for i in ["0", "1"] {
        assert_eq!(
            metric_must(&m, "ferry_worker_connections", &[("worker", i)]),
            0.0,
            "{m}"
        );
    }
}

/// The inode of every socket listening on `addr` (IPv4), from /proc/net/tcp.
fn listening_inodes(addr: SocketAddr) -> Vec<u64> {
    let SocketAddr::V4(a) = addr else {
        panic!("IPv4 only")
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(a.ip().octets()),
        a.port()
    );
    let mut out: Vec<u64> = std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .collect();
    out.sort();
    out
}

/// Connections that finished their handshake while ferry was stopped: they wait in the
/// kernel's accept queue. Each has sent a line.
async fn queue_connections(addr: SocketAddr, n: usize, tag: &str) -> Vec<TcpStream> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut c = connect(addr).await;
        c.write_all(format!("{tag} {i}\n").as_bytes())
            .await
            .unwrap();
        out.push(c);
    }
    out
}

/// Each queued connection is served: its line echoed back.
async fn assert_served(conns: &mut [TcpStream], tag: &str) {
    for (i, c) in conns.iter_mut().enumerate() {
        let want = format!("{tag} {i}\n");
        let mut got = vec![0u8; want.len()];
        within(WAIT, "a queued connection's echo", c.read_exact(&mut got))
            .await
            .unwrap_or_else(|e| panic!("{tag} {i}: {e}"));
        assert_eq!(got, want.as_bytes());
    }
}

/// A reload that changes a listener's addresses keeps the sockets of the addresses that
/// stay (and the connections waiting in their queues), and takes the connections waiting
/// on an address it stops listening on instead of resetting them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changing_addresses_keeps_the_ones_that_stay() {
    let echo = echo_server().await;
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let config = |ports: [u16; 2]| {
        format!(
            r#"
[global]
workers = 2

[[listener]]
name = "front"
listen = ["127.0.0.1:{}", "127.0.0.1:{}"]
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#,
            ports[0], ports[1]
        )
    };
    let ferry = Ferry::start(&config([pa, pb]), 2).await;
    let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{pa}").parse().unwrap(),
        format!("127.0.0.1:{pb}").parse().unwrap(),
        format!("127.0.0.1:{pc}").parse().unwrap(),
    );
    let sockets_a = listening_inodes(a);
    assert_eq!(sockets_a.len(), 2, "a socket per worker on {a}");
    let mut open = connect(a).await;
    echo_round_trip(&mut open, b"before").await;

    // Stopped, ferry accepts nothing: connections wait in the queues of a and b.
    ferry.signal("STOP");
    let mut on_a = queue_connections(a, 10, "a").await;
    let mut on_b = queue_connections(b, 10, "b").await;
    std::fs::write(&ferry.config_path, config([pa, pc])).unwrap();
    ferry.signal("HUP");
    ferry.signal("CONT");
    ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("stopped listening on"))
        .await
        .unwrap_or_else(|| panic!("no reload; stderr:\n{}", ferry.stderr.text()));

    assert_served(&mut on_a, "a").await;
    assert_served(&mut on_b, "b").await;
    assert_eq!(
        listening_inodes(a),
        sockets_a,
        "{a}'s sockets were replaced"
    );
    assert!(listening_inodes(b).is_empty(), "{b} still listening");
    let mut on_c = connect(c).await;
    echo_round_trip(&mut on_c, b"new address").await;
    echo_round_trip(&mut open, b"after").await;
    let text = ferry.stderr.text();
    assert!(
        text.contains(&format!("listener \"front\" now listens on {c}")),
        "{text}"
    );
}
