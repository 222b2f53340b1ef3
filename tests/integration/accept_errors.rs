//! The accept loop under descriptor exhaustion: EMFILE backs off (no spinning, no exit)
//! and ferry recovers as soon as descriptors free up.

use std::time::Duration;

use crate::common::*;

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emfile_backs_off_and_recovers() {
    let echo = echo_server().await;
    let config = echo_config("", echo);
    let mut ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("front");
    let pid = ferry.pid();

    // Warm up before the limit, then allow only a few more descriptors than ferry holds.
    let mut warm = connect(addr).await;
    echo_round_trip(&mut warm, b"warm").await;
    drop(warm);
    let open_now = fd_count(pid);
    let limit = open_now + 12;
    let status = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("run prlimit");
    assert!(status.success(), "prlimit failed");

    // Each relayed connection costs ferry two descriptors: a few are served, the rest
    // wait in the backlog while accept fails with EMFILE.
    let mut held = Vec::new();
    for i in 0..4u32 {
        let mut s = connect(addr).await;
        echo_round_trip(&mut s, format!("held {i}").as_bytes()).await;
        held.push(s);
    }
    // The rest: some get a descriptor for the client but none for the server (closed with
    // a reset, `connect_failed`), the others wait in the backlog.
    for _ in 0..36u32 {
        if let Ok(s) = tokio::net::TcpStream::connect(addr).await {
            held.push(s);
        }
    }
    let warned = ferry
        .stderr
        .wait_count(1, Duration::from_secs(10), |l| l.contains("backing off"))
        .await;
    assert!(
        warned.is_some(),
        "no back-off warning; stderr:\n{}",
        ferry.stderr.text()
    );

    // While the limit holds, ferry waits rather than spins: well under half a core.
    let before = cpu_ticks(pid);
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    let elapsed_ticks = t0.elapsed().as_secs_f64() * 100.0;
    assert!(
        (used as f64) < elapsed_ticks * 0.5,
        "ferry used {used} ticks in {elapsed_ticks:.0}: spinning on EMFILE?"
    );

    // Descriptors free up: the connections that waited are served, and new ones too.
    drop(held);
    // (While the backlog drains, a connection may still meet the limit and be reset.)
    within(Duration::from_secs(10), "recovery after EMFILE", async {
        loop {
            if round_trip_ok(addr).await {
                break;
            }
        }
    })
    .await;
    assert!(ferry.try_exit().is_none(), "ferry exited");
}

/// One echo round trip that reports failure instead of panicking.
async fn round_trip_ok(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"back").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await?;
        Ok::<bool, std::io::Error>(&buf == b"back")
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(true))
    )
}
