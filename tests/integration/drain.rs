//! Graceful shutdown: SIGTERM/SIGINT stop accepting at once, open connections get up to
//! `drain_timeout`, then ferry exits 0.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn config(drain_timeout: &str, echo: SocketAddr) -> String {
    format!(
        r#"
[global]
drain_timeout = "{drain_timeout}"

[log]
access = "@LOG@"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#
    )
}

/// Waits for ferry's "stopped accepting" line, then checks that a new connect is refused.
async fn assert_not_accepting(ferry: &Ferry, addr: SocketAddr) {
    ferry
        .stderr
        .wait_count(1, Duration::from_secs(2), |l| {
            l.contains("stopped accepting")
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no 'stopped accepting' line; stderr:\n{}",
                ferry.stderr.text()
            )
        });
    let r = within(
        Duration::from_secs(2),
        "connect after drain",
        TcpStream::connect(addr),
    )
    .await;
    // A reset instead of a refusal means the handshake completed on a listening socket
    // that was still open, and was reset when that socket closed later.
    match r {
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "after 'stopped accepting' a connect must be refused: {e}"
        ),
        Ok(_) => panic!(
            "a connect succeeded after 'stopped accepting': the listening socket is still open"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_connection_finish() {
    let echo = echo_server().await;
    let mut ferry = Ferry::start(&config("10s", echo), 1).await;
    let addr = ferry.addr("front");
    let mut c = connect(addr).await;
    echo_round_trip(&mut c, b"before").await;

    ferry.signal("TERM");
    assert_not_accepting(&ferry, addr).await;
    assert!(ferry.try_exit().is_none(), "exited with a connection open");

    // The open connection carries on as if nothing happened.
    echo_round_trip(&mut c, b"during the drain").await;
    assert!(ferry.try_exit().is_none(), "exited with a connection open");
    c.shutdown().await.unwrap();
    let (_, how) = read_until_closed(&mut c, WAIT).await;
    assert_eq!(how, Closed::Eof);
    let closed = Instant::now();

    let st = ferry
        .wait_exit(Duration::from_secs(3))
        .await
        .expect("ferry did not exit after its last connection ended");
    eprintln!("exited {:?} after the last connection", closed.elapsed());
    assert_eq!(st.code(), Some(0), "stderr:\n{}", ferry.stderr.text());

    // The record was flushed before exit.
    let recs = parse_records(&ferry.log_lines_now());
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["result"], "ok");
    assert_eq!(recs[0]["bytes_up"], 6 + 16);
    assert_eq!(recs[0]["bytes_down"], 6 + 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nothing_open_exits_at_once() {
    let echo = echo_server().await;
    let mut ferry = Ferry::start(&config("30s", echo), 1).await;
    let mut c = connect(ferry.addr("front")).await;
    echo_round_trip(&mut c, b"one").await;
    drop(c);
    ferry.records(1, WAIT).await;

    ferry.signal("TERM");
    let st = ferry
        .wait_exit(Duration::from_secs(3))
        .await
        .expect("ferry did not exit with no connection open");
    assert_eq!(st.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_the_rest() {
    const OPEN: usize = 20;
    let echo = echo_server().await;
    let mut ferry = Ferry::start(&config("500ms", echo), 1).await;
    let addr = ferry.addr("front");
    let mut open = Vec::new();
    for _ in 0..OPEN {
        let mut c = connect(addr).await;
        echo_round_trip(&mut c, b"hold").await;
        open.push(c);
    }

    let t = Instant::now();
    ferry.signal("TERM");
    assert_not_accepting(&ferry, addr).await;
    // The clients stay silent: ferry closes them when the drain timeout runs out.
    let mut clients = Vec::new();
    for c in &mut open {
        clients.push(c.local_addr().unwrap());
        let (data, _how) = read_until_closed(c, Duration::from_secs(5)).await;
        assert!(data.is_empty());
    }
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "closed after {waited:?}, before the drain timeout"
    );
    let st = ferry
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("ferry did not exit after the drain timeout");
    assert_eq!(st.code(), Some(0), "stderr:\n{}", ferry.stderr.text());

    // Every record was written before exit.
    let recs = parse_records(&ferry.log_lines_now());
    assert_eq!(recs.len(), OPEN, "records after exit: {recs:#?}");
    for client in clients {
        let r = record_for(&recs, client);
        assert_eq!(r["result"], "drained", "{r}");
        assert_eq!(r["bytes_up"], 4);
        assert_eq!(r["bytes_down"], 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigint_exits_at_once() {
    let echo = echo_server().await;
    let mut ferry = Ferry::start(&config("60s", echo), 1).await;
    let addr = ferry.addr("front");
    let mut c = connect(addr).await;
    echo_round_trip(&mut c, b"hold").await;

    ferry.signal("INT");
    assert_not_accepting(&ferry, addr).await;
    assert!(ferry.try_exit().is_none(), "exited with a connection open");
    ferry.signal("INT");
    let (_, _how) = read_until_closed(&mut c, Duration::from_secs(3)).await;
    let st = ferry
        .wait_exit(Duration::from_secs(3))
        .await
        .expect("ferry did not exit on the second SIGINT");
    assert_eq!(st.code(), Some(0), "stderr:\n{}", ferry.stderr.text());
    let recs = parse_records(&ferry.log_lines_now());
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["result"], "drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_serving() {
    let echo = echo_server().await;
    let mut ferry = Ferry::start(&config("10s", echo), 1).await;
    let addr = ferry.addr("front");
    let mut c = connect(addr).await;
    echo_round_trip(&mut c, b"before").await;
    ferry.signal("HUP");
    ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("SIGHUP"))
        .await
        .unwrap_or_else(|| panic!("no SIGHUP line; stderr:\n{}", ferry.stderr.text()));
    assert!(ferry.try_exit().is_none(), "SIGHUP stopped ferry");
    // The open connection and new ones are served as before.
    echo_round_trip(&mut c, b"after").await;
    let mut d = connect(addr).await;
    echo_round_trip(&mut d, b"new").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_cuts_a_pending_connect() {
    // The connection is still waiting for its server when the drain timeout runs out.
    let hole = black_hole();
    let config =
        config("300ms", hole.addr).replace("servers = [", "connect_timeout = \"30s\"\nservers = [");
    let mut ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("front");
    let mut c = connect(addr).await;
    let client = c.local_addr().unwrap();
    // Signal only once ferry is trying to reach the server.
    within(WAIT, "ferry to connect to the server", async {
        while !connecting_to(hole.addr) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    ferry.signal("TERM");
    assert_not_accepting(&ferry, addr).await;
    let (data, _how) = read_until_closed(&mut c, Duration::from_secs(5)).await;
    assert!(data.is_empty());
    let st = ferry
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("ferry did not exit after the drain timeout");
    assert_eq!(st.code(), Some(0), "stderr:\n{}", ferry.stderr.text());
    let recs = parse_records(&ferry.log_lines_now());
    assert_eq!(recs.len(), 1, "records after exit: {recs:#?}");
    let r = record_for(&recs, client);
    assert_eq!(r["result"], "drained", "{r}");
    assert_eq!(r["server"], hole.addr.to_string());
}

/// Connections that finished their handshake but were not yet accepted when the drain
/// began are served, not reset by the listening socket closing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_to_be_accepted_are_served() {
    use tokio::io::AsyncReadExt;
    let echo = echo_server().await;
    let mut ferry = Ferry::start(&config("10s", echo), 1).await;
    let addr = ferry.addr("front");
    // Stopped, ferry accepts nothing: the connections wait in the accept queue.
    ferry.signal("STOP");
    let mut waiting = Vec::new();
    for i in 0..20 {
        let mut c = connect(addr).await;
        c.write_all(format!("waiting {i}\n").as_bytes())
            .await
            .unwrap();
        waiting.push(c);
    }
    ferry.signal("TERM");
    ferry.signal("CONT");
    for (i, c) in waiting.iter_mut().enumerate() {
        let want = format!("waiting {i}\n");
        let mut got = vec![0u8; want.len()];
        within(WAIT, "a waiting connection's echo", c.read_exact(&mut got))
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(got, want.as_bytes());
        c.shutdown().await.unwrap();
    }
    assert_not_accepting(&ferry, addr).await;
    drop(waiting);
    let st = ferry
        .wait_exit(WAIT)
        .await
        .expect("ferry did not exit after its last connection");
    assert_eq!(st.code(), Some(0), "stderr:\n{}", ferry.stderr.text());
    let recs = parse_records(&ferry.log_lines_now());
    assert_eq!(recs.len(), 20, "{recs:#?}");
}
