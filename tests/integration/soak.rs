//! Soak: minutes of mixed traffic through ferry with random faults, then integrity,
//! descriptors and memory checked. Not in CI's default path (`#[ignore]`): run it with
//! `scripts/soak` (`SOAK_SECONDS`, default 120; `SOAK_SEED` to replay a run).
//!
//! Traffic: bulk transfers (up to 4 MiB each way, checked by SHA-256), short round trips,
//! clients that reset mid-transfer, send garbage and leave, or read slowly. Faults: servers
//! killed and restarted, reloads that change the pool and the listener's settings. A
//! connection broken by a fault is counted; one that delivers wrong bytes fails the run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::ops_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on a fixed address that can be killed (its listener and every
/// connection closed) and started again.
struct Backend {
    addr: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Backend {
    async fn start(addr: SocketAddr) -> Backend {
        let mut b = Backend { addr, task: None };
        b.restart().await;
        b
    }

    async fn restart(&mut self) {
        self.kill();
        // The port may take a moment to be free again after a kill.
        let listener = within(WAIT, "rebind a backend", async {
            loop {
                match TcpListener::bind(self.addr).await {
                    Ok(l) => return l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    a = listener.accept() => {
                        let Ok((mut s, _)) = a else { continue };
                        conns.spawn(async move {
                            let (mut r, mut w) = s.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }));
    }

    /// Closes the listener and every connection (dropping the task drops them).
    fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

#[derive(Default)]
struct Tally {
    bulk_ok: AtomicU64,
    short_ok: AtomicU64,
    /// Broken by a fault (a server killed, a client's own reset): allowed.
    broken: AtomicU64,
    abusive: AtomicU64,
    bytes: AtomicU64,
}

/// One bulk transfer: `n` seeded bytes up, the same back, checked.
async fn bulk(addr: SocketAddr, n: u64, seed: u64, tally: &Tally) -> Result<(), String> {
    let Ok(Ok(s)) = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await else {
        tally.broken.fetch_add(1, Relaxed);
        return Ok(());
    };
    let (mut r, mut w) = s.into_split();
    let send = async move {
        let h = send_prng(&mut w, n, seed).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(h)
    };
    let recv = read_hash(&mut r);
    match tokio::time::timeout(6 * WAIT, async { tokio::join!(send, recv) }).await {
        Ok((Ok(sent), Ok((got, hash)))) if got == n => {
            if hash != sent {
                return Err(format!("{n} bytes (seed {seed}) came back different"));
            }
            tally.bulk_ok.fetch_add(1, Relaxed);
            tally.bytes.fetch_add(2 * n, Relaxed);
        }
        Ok((Ok(_), Ok((got, _)))) if got > n => {
            return Err(format!("{got} bytes came back for {n} sent (seed {seed})"));
        }
        // Cut short by a fault: fewer bytes, a reset, or a stall past the deadline.
        _ => {
            tally.broken.fetch_add(1, Relaxed);
        }
    }
    Ok(())
}

/// A few round trips on one connection.
async fn short(addr: SocketAddr, k: u64, tally: &Tally) -> Result<(), String> {
    let r = tokio::time::timeout(WAIT, async {
        let mut s = TcpStream::connect(addr).await?;
        for i in 0..k {
            let msg = format!("round trip {i}\n");
            s.write_all(msg.as_bytes()).await?;
            let mut got = vec![0u8; msg.len()];
            s.read_exact(&mut got).await?;
            if got != msg.as_bytes() {
                return Ok(false);
            }
        }
        Ok::<bool, std::io::Error>(true)
    })
    .await;
    match r {
        Ok(Ok(true)) => {
            tally.short_ok.fetch_add(1, Relaxed);
            Ok(())
        }
        Ok(Ok(false)) => Err("a round trip came back different".into()),
        _ => {
            tally.broken.fetch_add(1, Relaxed);
            Ok(())
        }
    }
}

/// A client that misbehaves: resets mid-transfer, sends garbage and leaves, or reads
/// slowly for a while.
async fn abusive(addr: SocketAddr, kind: u64, seed: u64, tally: &Tally) {
    let Ok(Ok(mut s)) = tokio::time::timeout(WAIT, TcpStream::connect(addr)).await else {
        return;
    };
    let _ = tokio::time::timeout(WAIT, async {
        match kind {
            0 => {
                let _ = write_prng(&mut s, 256 * 1024, seed).await;
                reset(s);
            }
            1 => {
                let _ = s.write_all(b"\x16\x03\x01\xff\xff garbage").await;
                drop(s);
            }
            _ => {
                let _ = write_prng(&mut s, 2 << 20, seed).await;
                let mut b = [0u8; 4096];
                for _ in 0..20 {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
    .await;
    tally.abusive.fetch_add(1, Relaxed);
}

fn config(servers: &[SocketAddr], round: u64) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "pool"
idle_timeout = "{}s"

[[upstream]]
name = "pool"
balance = "{}"
servers = [{}]
retries = 2
health = {{ interval = "200ms", rise = 1, fall = 1 }}
"#,
        30 + round % 2,
        ["round_robin", "least_conn", "p2c"][(round % 3) as usize],
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: run by scripts/soak"]
async fn soak() {
    let secs: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64);
    eprintln!("soak: {secs} s, seed {seed} (SOAK_SEED={seed} replays the choices)");

    let mut backends = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        backends.push(Backend::start(format!("127.0.0.1:{port}").parse().unwrap()).await);
    }
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let f = Ferry::start(&config(&addrs, 0), 1).await;
    let front = f.addr("front");
    let admin = admin_addr(&f).await;
    let pid = f.pid();
    let mut c = connect(front).await;
    echo_round_trip(&mut c, b"warm").await;
    drop(c);
    let fds_before = fd_count(pid);
    let rss_before = f.rss_kib();

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut clients = Vec::new();
    for w in 0..16u64 {
        let (tally, stop, failure) = (tally.clone(), stop.clone(), failure.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = Prng::new(seed ^ (w + 1).wrapping_mul(0x1234_5678_9abc));
            while !stop.load(Relaxed) {
                let r = match rng.below(10) {
                    0..=3 => {
                        let n = 1 + rng.below(4 << 20);
                        bulk(front, n, rng.next_u64(), &tally).await
                    }
                    4..=7 => short(front, 1 + rng.below(20), &tally).await,
                    _ => {
                        abusive(front, rng.below(3), rng.next_u64(), &tally).await;
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    *failure.lock().unwrap() = Some(e);
                    stop.store(true, Relaxed);
                }
            }
        }));
    }

    // Faults, until the time is up.
    let mut rng = Prng::new(seed);
    let log = f.log_path.display().to_string();
    let end = Instant::now() + Duration::from_secs(secs);
    let (mut kills, mut reloads) = (0u64, 0u64);
    while Instant::now() < end && !stop.load(Relaxed) {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
        match rng.below(3) {
            0 => {
                let i = rng.below(backends.len() as u64) as usize;
                backends[i].kill();
                tokio::time::sleep(Duration::from_millis(200 + rng.below(1500))).await;
                backends[i].restart().await;
                kills += 1;
            }
            _ => {
                reloads += 1;
                let n = 2 + rng.below(2) as usize;
                std::fs::write(
                    &f.config_path,
                    config(&addrs[..n], reloads).replace("@LOG@", &log),
                )
                .unwrap();
                let r = post(admin, "/api/reload", None).await;
                assert_eq!(r.status, 200, "reload {reloads}: {r:?}");
            }
        }
    }
    stop.store(true, Relaxed);
    for t in clients {
        within(10 * WAIT, "a client task to finish", t)
            .await
            .unwrap();
    }
    if let Some(e) = failure.lock().unwrap().take() {
        panic!("integrity failure (SOAK_SEED={seed}): {e}");
    }
    let t = &tally;
    eprintln!(
        "soak: {} bulk transfers ({} MiB), {} short, {} abusive, {} broken by faults; {kills} server kills, {reloads} reloads",
        t.bulk_ok.load(Relaxed),
        t.bytes.load(Relaxed) >> 20,
        t.short_ok.load(Relaxed),
        t.abusive.load(Relaxed),
        t.broken.load(Relaxed)
    );
    assert!(t.bulk_ok.load(Relaxed) > 0 && t.short_ok.load(Relaxed) > 0);

    // Everything is back: no connection open, descriptors and memory where they were.
    for b in &mut backends {
        b.restart().await;
    }
    let text = within(3 * WAIT, "no connection left open", async {
        loop {
            let text = metrics(admin).await;
            if metric(&text, "ferry_connections_active", &[("listener", "front")]) == Some(0.0) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let fds = within(WAIT, "descriptors back to where they were", async {
        loop {
            let n = fd_count(pid);
            if n <= fds_before + 4 {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let rss = f.rss_kib();
    eprintln!("soak: descriptors {fds_before} -> {fds}; RSS {rss_before} KiB -> {rss} KiB");
    assert!(
        rss < rss_before + 64 * 1024,
        "RSS grew from {rss_before} KiB to {rss} KiB"
    );
    let mut c = connect(front).await;
    echo_round_trip(&mut c, b"still serving").await;
    assert!(text.contains("ferry_connections_total"));
}
