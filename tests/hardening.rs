//! Hardening: values at the limits `ferry check` allows, abusive admin clients, slow
//! readers, and the other faults a proxy at the edge meets. Each test shows that the fault
//! costs only the connection (or request) that caused it.

mod common;
mod ops_support;

use common::*;
use ops_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every duration at the longest `check` allows and the slowest rate with the largest
/// burst: connections are relayed, queued and limited on one worker, round after round,
/// and nothing panics (before the bounds, `idle_timeout = "300000000000y"` killed the
/// worker on its first connection).
#[tokio::test]
async fn longest_durations_and_slowest_rates_are_served() {
    let echo = echo_server().await;
    let f = Ferry::start(
        &format!(
            r#"
[global]
workers = 1
drain_timeout = "3650d"

[log]
access = "@LOG@"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
upstream = "pool"
idle_timeout = "3650d"
handshake_timeout = "3650d"
per_client = {{ rate = "1/h", burst = 10000000, max_connections = 10000000 }}

[[upstream]]
name = "pool"
servers = ["{echo}"]
connect_timeout = "3650d"
resolve_interval = "3650d"
max_connections_per_server = 1
queue = {{ size = 10, timeout = "3650d" }}
health = {{ interval = "3650d", timeout = "3650d", passive = {{ failures = 1, eject = "3650d" }} }}
"#
        ),
        1,
    )
    .await;
    for round in 0..3 {
        // Two at once: the second waits in the queue for the first to finish.
        let mut a = connect(f.addr("web")).await;
        echo_round_trip(&mut a, format!("first {round}").as_bytes()).await;
        let mut b = connect(f.addr("web")).await;
        b.write_all(b"second").await.unwrap();
        drop(a);
        let mut got = [0u8; 6];
        within(WAIT, "queued connection served", b.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(&got, b"second");
    }
    let recs = f.records_with("ok", 6, WAIT).await;
    assert_eq!(recs.len(), 6);
    assert!(!f.stderr.text().contains("panicked"), "{}", f.stderr.text());
}

/// 300 idle connections to the admin server do not keep out a scrape (they used to: 64
/// held every slot until the 10 s header timeout), the idlest are closed to make room and
/// counted, and the token's scheme is case-insensitive.
#[tokio::test]
async fn admin_answers_through_idle_connections() {
    let echo = echo_server().await;
    let f = Ferry::start(
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
token = "s3cret"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["{echo}"]
"#
        ),
        1,
    )
    .await;
    let admin = admin_addr(&f).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(connect(admin).await);
    }
    // A real scraper: curl, as an operator would type it.
    let mut curl = std::process::Command::new("curl");
    curl.args(["-q", "-sS", "-i", "--noproxy", "*", "--max-time", "10"])
        .arg(format!("http://{admin}/metrics"));
    let out = within(
        2 * WAIT,
        "curl /metrics",
        tokio::task::spawn_blocking(move || curl.output()),
    )
    .await
    .unwrap()
    .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    let evicted = metric(
        &text,
        "ferry_admin_connections_closed_total",
        &[("reason", "evicted")],
    )
    .expect("evicted counter");
    assert!(evicted >= 300.0 - 64.0, "{evicted} evicted\n{text}");
    let active = metric(&text, "ferry_admin_connections_active", &[]).expect("active gauge");
    assert!(active <= 64.0, "{text}");
    // The oldest idle connection was closed by ferry.
    let mut b = [0u8; 1];
    let n = within(
        WAIT,
        "the oldest idle connection closed",
        idle[0].read(&mut b),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0);
    // `bearer`, `BEARER`: the scheme is case-insensitive; a wrong token is still refused.
    for (auth, status) in [
        ("bearer s3cret", 200),
        ("BEARER  s3cret", 200),
        ("bearer wrong", 401),
    ] {
        let r = http(
            admin,
            "POST",
            "/api/reload",
            &[("Authorization", auth)],
            b"",
        )
        .await;
        assert_eq!(r.status, status, "{auth}: {r:?}");
    }
}
