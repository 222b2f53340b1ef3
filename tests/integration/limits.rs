//! Load and limits: backpressure from a client that never reads, many connections at
//! once, and `max_connections` on a listener and across listeners.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_gets_backpressure_and_does_not_slow_others() {
    stalled_reader(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_gets_backpressure_and_does_not_slow_others_copy_engine() {
    stalled_reader(false).await;
}

async fn stalled_reader(splice: bool) {
    const ATTEMPT: u64 = 256 << 20;
    let echo = echo_server().await;
    // One worker thread: A and B share it, so fairness is ferry's, not the scheduler's.
    let config = format!(
        "[global]\nworkers = 1\nsplice = {splice}\n{}",
        echo_config("", echo)
    );
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("front");

    // Warm up (thread-local buffers, pools) so the baseline is a working ferry.
    let mut w = connect(addr).await;
    echo_round_trip(&mut w, &[1u8; 256 * 1024]).await;
    drop(w);
    let rss_before = ferry.rss_kib();

    // Client A writes to the echo server and never reads what comes back.
    let a = tokio::spawn(async move {
        let mut a = TcpStream::connect(addr).await.expect("connect A");
        let buf = vec![b'a'; 64 * 1024];
        let mut written = 0u64;
        let mut blocked = false;
        while written < ATTEMPT {
            match tokio::time::timeout(Duration::from_secs(1), a.write(&buf)).await {
                Ok(Ok(n)) => written += n as u64,
                Ok(Err(e)) => panic!("A: write failed: {e}"),
                Err(_) => {
                    blocked = true;
                    break;
                }
            }
        }
        (a, written, blocked)
    });

    // Meanwhile client B does a 16 MiB echo round trip.
    let b_size = 16u64 << 20;
    let t = Instant::now();
    let mut b = connect(addr).await;
    let (sent, got) = within(Duration::from_secs(20), "B's 16 MiB round trip", async {
        let (mut r, mut w) = b.split();
        let send = async {
            let h = send_prng(&mut w, b_size, 77).await.expect("B send");
            w.shutdown().await.expect("B shutdown");
            h
        };
        tokio::join!(send, read_hash(&mut r))
    })
    .await;
    let b_secs = t.elapsed().as_secs_f64();
    let (n, h) = got.expect("B read");
    assert_eq!(n, b_size);
    assert_eq!(hex(&h), hex(&sent));

    let (a_stream, written, blocked) = within(Duration::from_secs(120), "A to block", a)
        .await
        .expect("A task");
    let rss_after = ferry.rss_kib();
    eprintln!(
        "splice = {splice}: A wrote {:.1} MiB before blocking; B's round trip took {b_secs:.2} s; ferry RSS {rss_before} KiB -> {rss_after} KiB",
        written as f64 / (1024.0 * 1024.0)
    );
    assert!(
        blocked,
        "A wrote all {ATTEMPT} bytes without blocking: no backpressure"
    );
    assert!(
        written < ATTEMPT / 2,
        "A wrote {written} bytes before blocking: far more than socket buffers hold"
    );
    let growth = rss_after.saturating_sub(rss_before);
    assert!(
        growth < 64 * 1024,
        "ferry's RSS grew by {growth} KiB ({rss_before} -> {rss_after}) with a stalled reader"
    );
    drop(a_stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections() {
    const N: usize = 1000;
    let echo = echo_server().await;
    let config = format!("[global]\nworkers = 2\n{}", echo_config("", echo));
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("front");
    let fds_before = fd_count(ferry.pid());
    let rss_before = ferry.rss_kib();

    let mut tasks = Vec::new();
    for i in 0..N {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let msg = format!("message {i:04} from connection {i}\n");
            s.write_all(msg.as_bytes()).await.expect("write");
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.expect("read");
            assert_eq!(back, msg.as_bytes(), "connection {i} got another's bytes");
            s
        }));
    }
    // Every stream stays open until all have been checked: N connections at once.
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(
            within(Duration::from_secs(60), "1000 connections", t)
                .await
                .expect("connection task"),
        );
    }
    assert_eq!(streams.len(), N);
    // Still open: nothing has been closed by ferry yet.
    for s in &streams {
        let mut b = [0u8; 1];
        match s.try_read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a held connection is not open and quiet: {other:?}"),
        }
    }
    assert!(
        ferry.log_lines_now().is_empty(),
        "records written while all connections were open"
    );
    // An idle connection holds no relay buffer: 1000 of them cost far less than one 64 KiB
    // buffer each (which would be over 60 MiB).
    let rss_open = ferry.rss_kib();
    eprintln!("ferry RSS: {rss_before} KiB before, {rss_open} KiB with {N} idle connections open");
    assert!(
        rss_open.saturating_sub(rss_before) < 32 * 1024,
        "RSS grew by {} KiB for {N} idle connections",
        rss_open.saturating_sub(rss_before)
    );
    drop(streams);

    let recs = ferry.records(N, Duration::from_secs(30)).await;
    assert_eq!(recs.len(), N);
    assert!(recs.iter().all(|r| r["result"] == "ok"), "not all ok");

    // Every connection's sockets are closed again. Allow for pooled splice pipes (up to 64
    // per worker thread, 2 descriptors each) and a little more.
    let fds_after = fd_count(ferry.pid());
    eprintln!("ferry's descriptors: {fds_before} before, {fds_after} after {N} connections");
    assert!(
        fds_after <= fds_before + 2 * 64 * 2 + 16,
        "descriptors leaked: {fds_before} before, {fds_after} after {N} connections"
    );
}

/// Opens a connection and checks that it is served (an echo round trip).
async fn served(addr: SocketAddr, tag: &str) -> TcpStream {
    let mut s = connect(addr).await;
    echo_round_trip(&mut s, tag.as_bytes()).await;
    s
}

/// Opens a connection and checks that ferry closes it at once without serving it.
async fn refused(addr: SocketAddr) -> SocketAddr {
    expect_closed_at_once(addr, Duration::from_secs(2)).await
}

fn count(recs: &[Value], result: &str) -> usize {
    recs.iter().filter(|r| r["result"] == result).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_max_connections_is_exact() {
    let (echo, accepted) = counting_echo_server().await;
    let ferry = Ferry::start(&echo_config("max_connections = 10", echo), 1).await;
    let addr = ferry.addr("front");

    let mut open = Vec::new();
    for i in 0..10 {
        open.push(served(addr, &format!("conn {i}")).await);
    }
    // All ten still work.
    for (i, s) in open.iter_mut().enumerate() {
        echo_round_trip(s, format!("again {i}").as_bytes()).await;
    }

    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 10);
    let eleventh = refused(addr).await;
    let limited = ferry.records_with("limited", 1, WAIT).await;
    assert_eq!(limited.len(), 1);
    let r = &limited[0];
    assert_eq!(r["client"], eleventh.to_string());
    assert_eq!(r["listener"], "front");
    assert!(
        r["server"].is_null(),
        "no server for a refused connection: {r}"
    );
    assert_eq!(r["bytes_up"], 0);
    // Refused before any server was contacted.
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 10);

    // Close one; once ferry has finished it (its record), there is room for one more.
    let mut one = open.pop().unwrap();
    one.shutdown().await.unwrap();
    read_until_closed(&mut one, WAIT).await;
    drop(one);
    ferry.records_with("ok", 1, WAIT).await;
    open.push(served(addr, "the new one").await);

    // And only one: the limit is back at 10.
    refused(addr).await;
    ferry.records_with("limited", 2, WAIT).await;
    for s in open.iter_mut() {
        echo_round_trip(s, b"all still fine").await;
    }
    drop(open);
    // Ten served at first, one closed, one more served; two refused.
    let recs2 = ferry.records(13, WAIT).await;
    assert_eq!(count(&recs2, "ok"), 11, "{recs2:#?}");
    assert_eq!(count(&recs2, "limited"), 2, "{recs2:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_max_connections_spans_listeners() {
    let echo = echo_server().await;
    let config = format!(
        r#"
[global]
max_connections = 10

[log]
access = "@LOG@"

[[listener]]
name = "a"
listen = "127.0.0.1:0"
upstream = "echo"

[[listener]]
name = "b"
listen = "127.0.0.1:0"
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#
    );
    let ferry = Ferry::start(&config, 2).await;
    let (a, b) = (ferry.addr("a"), ferry.addr("b"));

    let mut open = Vec::new();
    for i in 0..5 {
        open.push(served(a, &format!("a{i}")).await);
        open.push(served(b, &format!("b{i}")).await);
    }
    // Each listener alone is far from any limit; together they are at the global one.
    let on_a = refused(a).await;
    let on_b = refused(b).await;
    let limited = ferry.records_with("limited", 2, WAIT).await;
    let ra = record_for(&limited, on_a);
    let rb = record_for(&limited, on_b);
    assert_eq!(ra["listener"], "a");
    assert_eq!(rb["listener"], "b");

    // Free a place on listener a; listener b can take it.
    let mut one = open.remove(0);
    one.shutdown().await.unwrap();
    read_until_closed(&mut one, WAIT).await;
    drop(one);
    ferry.records_with("ok", 1, WAIT).await;
    open.push(served(b, "b-new").await);
    refused(a).await;
    ferry.records_with("limited", 3, WAIT).await;

    for s in open.iter_mut() {
        echo_round_trip(s, b"all still fine").await;
    }
    drop(open);
    let recs = ferry.records(14, WAIT).await;
    assert_eq!(count(&recs, "ok"), 11, "{recs:#?}");
    assert_eq!(count(&recs, "limited"), 3, "{recs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_under_a_burst() {
    // 30 clients at once against a limit of 10: exactly 10 are served.
    const CLIENTS: usize = 30;
    let (echo, accepted) = counting_echo_server().await;
    let ferry = Ferry::start(&echo_config("max_connections = 10", echo), 1).await;
    let addr = ferry.addr("front");
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let (_, r) = connect_from(addr).await;
            match r {
                Ok(mut s) => {
                    let msg = format!("client {i}");
                    let ok = s.write_all(msg.as_bytes()).await.is_ok() && {
                        let mut back = vec![0u8; msg.len()];
                        matches!(
                            tokio::time::timeout(WAIT, s.read_exact(&mut back)).await,
                            Ok(Ok(_))
                        ) && back == msg.as_bytes()
                    };
                    // Hold the connection until every client knows where it stands.
                    barrier.wait().await;
                    ok
                }
                Err(_) => {
                    barrier.wait().await;
                    false
                }
            }
        }));
    }
    let mut served = 0;
    for t in tasks {
        if within(Duration::from_secs(30), "burst client", t)
            .await
            .unwrap()
        {
            served += 1;
        }
    }
    assert_eq!(served, 10, "clients served with max_connections = 10");
    let recs = ferry.records(CLIENTS, WAIT).await;
    assert_eq!(count(&recs, "limited"), CLIENTS - 10, "{recs:#?}");
    assert_eq!(count(&recs, "ok"), 10, "{recs:#?}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 10);
}
