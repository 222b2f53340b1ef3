//! Hardening: values at the limits `ferry check` allows, abusive admin clients, slow
//! readers, and the other faults a proxy at the edge meets. Each test shows that the fault
//! costs only the connection (or request) that caused it.

mod common;

use common::*;
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
