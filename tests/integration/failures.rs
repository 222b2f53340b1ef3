//! Connections that end badly: the server refuses, never answers, goes silent, or either
//! side resets. The client is always closed promptly and the record says why.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMPT: Duration = Duration::from_secs(2);

fn config(listener_extra: &str, upstream_extra: &str, server: SocketAddr) -> String {
    format!(
        r#"
[log]
access = "@LOG@"
format = "json"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "back"
{listener_extra}

[[upstream]]
name = "back"
servers = ["{server}"]
{upstream_extra}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses() {
    let dead = refused_addr();
    let ferry = Ferry::start(&config("", "", dead), 1).await;
    let client = expect_closed_at_once(ferry.addr("front"), PROMPT).await;

    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "connect_failed", "{r}");
    assert_eq!(r["client"], client.to_string());
    assert_eq!(r["server"], dead.to_string());
    assert_eq!(r["upstream"], "back");
    assert_eq!(r["bytes_up"], 0);
    assert_eq!(r["bytes_down"], 0);
    assert!(r["connect_ms"].is_null(), "no connection was made: {r}");
}

#[test]
fn black_hole_really_swallows_connects() {
    // The trick test `connect_timeout` relies on: a listener with a full backlog of 0 drops
    // SYNs on Linux, so a connect to it neither succeeds nor fails for a good while.
    let hole = black_hole();
    let t = Instant::now();
    let r = std::net::TcpStream::connect_timeout(&hole.addr, Duration::from_millis(500));
    assert!(r.is_err(), "connect to the black hole succeeded");
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::TimedOut);
    assert!(t.elapsed() >= Duration::from_millis(450));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_never_accepts() {
    let hole = black_hole();
    let ferry = Ferry::start(&config("", "connect_timeout = \"300ms\"", hole.addr), 1).await;
    let t = Instant::now();
    let client =
        expect_closed_at_once(ferry.addr("front"), PROMPT + Duration::from_millis(300)).await;
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}, before the connect timeout"
    );

    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "connect_timeout", "{r}");
    assert_eq!(r["client"], client.to_string());
    assert_eq!(r["server"], hole.addr.to_string());
    assert!(r["connect_ms"].is_null(), "{r}");
    // No sooner than the connect timeout (how much later is bounded by the client's
    // wait above, not by a clock here).
    let d = r["duration_ms"].as_f64().unwrap();
    assert!(d >= 290.0, "duration_ms {d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_silent_connection() {
    let echo = echo_server().await;
    let ferry = Ferry::start(&config("idle_timeout = \"300ms\"", "", echo), 1).await;
    let mut c = connect(ferry.addr("front")).await;
    let client = c.local_addr().unwrap();
    let t = Instant::now();
    let (data, how) = read_until_closed(&mut c, Duration::from_secs(3)).await;
    let waited = t.elapsed();
    assert!(data.is_empty());
    assert_eq!(how, Closed::Eof, "an idle connection is closed, not reset");
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}, before the idle timeout"
    );

    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "idle_timeout", "{r}");
    assert_eq!(r["client"], client.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_spares_busy_connection() {
    let echo = echo_server().await;
    let ferry = Ferry::start(&config("idle_timeout = \"300ms\"", "", echo), 1).await;
    let mut c = connect(ferry.addr("front")).await;
    // Bytes every 30 ms (a tenth of the idle timeout), 40 times: the pauses alone add up
    // to 4× the idle timeout.
    const ROUNDS: u32 = 40;
    for i in 0..ROUNDS {
        echo_round_trip(&mut c, &i.to_le_bytes()).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    echo_round_trip(&mut c, b"still here").await;
    c.shutdown().await.unwrap();
    let (_, how) = read_until_closed(&mut c, WAIT).await;
    assert_eq!(how, Closed::Eof);

    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["bytes_up"], u64::from(ROUNDS) * 4 + 10);
    assert!(
        r["duration_ms"].as_f64().unwrap() >= f64::from(ROUNDS) * 30.0,
        "{r}"
    );
}

/// A server that reads until its connection ends and reports how it ended.
async fn watching_server() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(u64, Closed)>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = serve_on("127.0.0.1", move |mut s| {
        let tx = tx.clone();
        async move {
            // Keep the client's receive side busy too, so the reset comes mid-stream.
            let _ = s.write_all(&[b'd'; 64 * 1024]).await;
            let mut n = 0u64;
            let mut buf = [0u8; 16 * 1024];
            let how = loop {
                match s.read(&mut buf).await {
                    Ok(0) => break Closed::Eof,
                    Ok(k) => n += k as u64,
                    Err(_) => break Closed::Reset,
                }
            };
            let _ = tx.send((n, how));
        }
    })
    .await;
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reset() {
    let (server, mut closed) = watching_server().await;
    let ferry = Ferry::start(&config("", "", server), 1).await;
    let mut c = connect(ferry.addr("front")).await;
    let client = c.local_addr().unwrap();
    // Mid-stream: some bytes each way, more on the wire.
    c.write_all(&[b'u'; 100_000]).await.unwrap();
    let mut first = [0u8; 1000];
    within(WAIT, "server data", c.read_exact(&mut first))
        .await
        .unwrap();
    reset(c);

    let (n, how) = within(
        PROMPT,
        "the server to see its connection end",
        closed.recv(),
    )
    .await
    .unwrap();
    assert!(n <= 100_000);
    eprintln!("server side saw {how:?} after {n} bytes");

    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "client_reset", "{r}");
    assert_eq!(r["client"], client.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reset() {
    let server = serve_on("127.0.0.1", |mut s| async move {
        let mut buf = [0u8; 5];
        if s.read_exact(&mut buf).await.is_ok() {
            let _ = s.write_all(b"partial answer").await;
            let _ = s.flush().await;
            reset(s);
        }
    })
    .await;
    let ferry = Ferry::start(&config("", "", server), 1).await;
    let mut c = connect(ferry.addr("front")).await;
    c.write_all(b"hello").await.unwrap();
    let (data, how) = read_until_closed(&mut c, PROMPT).await;
    eprintln!("client saw {how:?} after {} bytes", data.len());
    assert!(b"partial answer".starts_with(&data), "{data:?}");

    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "server_reset", "{r}");
    assert_eq!(r["bytes_up"], 5);
}
