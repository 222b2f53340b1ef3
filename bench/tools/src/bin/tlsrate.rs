//! TLS handshake load: connect, TLS handshake, write N bytes, read them back, close; repeat.
//!
//! Without `--resume` every handshake is full (resumption disabled in the client
//! config). With `--resume` each worker has its own client config with a session cache,
//! so after its first connection a worker offers a TLS 1.3 ticket from the previous one;
//! how many handshakes really resumed is counted (`handshake_kind()`), so a server that
//! does not resume shows it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_bench_tools::tls::{self, client_config, server_name};
use ferry_bench_tools::{connect_from, json_str, parse_sources, quantile, raise_nofile};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, HandshakeKind};

#[derive(Parser, Debug)]
#[command(about = "Measure TLS handshakes/s (full or resumed) against a TLS endpoint that echoes")]
struct Args {
    /// Address to connect to.
    #[arg(long)]
    target: SocketAddr,
    /// CA certificate (PEM) the server's certificate must chain to.
    #[arg(long)]
    ca: PathBuf,
    /// Server name sent (SNI) and verified.
    #[arg(long, default_value = "bench.test")]
    sni: String,
    /// Resume sessions: one client config with a session cache per worker (TLS 1.3
    /// tickets). Without it, resumption is disabled: every handshake is full.
    #[arg(long)]
    resume: bool,
    /// Also offer TLS 1.2 (default: TLS 1.3 only).
    #[arg(long)]
    allow_tls12: bool,
    /// Concurrent workers (each runs connections back to back).
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Test duration in seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Bytes written (and read back) per connection, inside TLS.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Source addresses: "auto" (127.0.0.2-127.0.0.9 for a loopback target),
    /// "none", or a list like 127.0.0.2,127.0.0.3 or 127.0.0.2-127.0.0.9.
    #[arg(long, default_value = "auto")]
    sources: String,
    /// Per-connection timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

#[derive(Default)]
struct WorkerResult {
    completed: u64,
    errors: u64,
    full: u64,
    full_hrr: u64,
    resumed: u64,
    latencies_us: Vec<u64>,
    handshake_us: Vec<u64>,
    first_error: Option<String>,
    negotiated: Option<String>,
}

struct Done {
    kind: Option<HandshakeKind>,
    handshake_us: u64,
    negotiated: String,
}

async fn one(
    src: Option<IpAddr>,
    args: &Args,
    cfg: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    payload: &[u8],
    back: &mut [u8],
) -> std::io::Result<Done> {
    let tcp = connect_from(src, args.target, false).await?;
    let t0 = Instant::now();
    let mut s = tls::connect(tcp, cfg, name, 16 * 1024).await?;
    let handshake_us = t0.elapsed().as_micros() as u64;
    let kind = s.conn.handshake_kind();
    s.write_all(payload).await?;
    s.read_exact(back).await?;
    if back != payload {
        return Err(std::io::Error::other("echo mismatch"));
    }
    let negotiated = tls::describe(&s.conn);
    let _ = s.close().await;
    Ok(Done {
        kind,
        handshake_us,
        negotiated,
    })
}

async fn worker(
    id: usize,
    args: Arc<Args>,
    sources: Arc<Vec<IpAddr>>,
    shared: Arc<ClientConfig>,
    name: ServerName<'static>,
    deadline: Instant,
) -> WorkerResult {
    let src = if sources.is_empty() {
        None
    } else {
        Some(sources[id % sources.len()])
    };
    // With --resume: this worker's own config, whose session cache carries the tickets
    // of its previous connection to the next.
    let cfg = if args.resume {
        match client_config(&args.ca, Some(64), args.allow_tls12) {
            Ok(c) => c,
            Err(e) => {
                return WorkerResult {
                    errors: 1,
                    first_error: Some(e),
                    ..Default::default()
                }
            }
        }
    } else {
        shared
    };
    let payload: Vec<u8> = (0..args.size).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; args.size];
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut r = WorkerResult::default();
    while Instant::now() < deadline {
        let start = Instant::now();
        let res = match tokio::time::timeout(timeout, one(src, &args, &cfg, &name, &payload, &mut back)).await {
            Ok(res) => res,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection timed out",
            )),
        };
        match res {
            Ok(d) => {
                r.completed += 1;
                r.latencies_us.push(start.elapsed().as_micros() as u64);
                r.handshake_us.push(d.handshake_us);
                match d.kind {
                    Some(HandshakeKind::Resumed) => r.resumed += 1,
                    Some(HandshakeKind::FullWithHelloRetryRequest) => r.full_hrr += 1,
                    _ => r.full += 1,
                }
                if r.negotiated.is_none() {
                    r.negotiated = Some(d.negotiated);
                }
            }
            Err(e) => {
                r.errors += 1;
                if r.first_error.is_none() {
                    r.first_error = Some(e.to_string());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    r
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _ = raise_nofile();
    let sources = match parse_sources(&args.sources, args.target) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tlsrate: --sources: {e}");
            std::process::exit(2);
        }
    };
    if !(args.duration > 0.0 && args.duration < 3600.0) || args.workers == 0 {
        eprintln!("tlsrate: need 0 < --duration < 3600 and --workers > 0");
        std::process::exit(2);
    }
    let shared = match client_config(&args.ca, None, args.allow_tls12) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tlsrate: {e}");
            std::process::exit(2);
        }
    };
    let name = match server_name(&args.sni) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("tlsrate: --sni {e}");
            std::process::exit(2);
        }
    };
    let args = Arc::new(args);
    let sources = Arc::new(sources);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let handles: Vec<_> = (0..args.workers)
        .map(|id| {
            tokio::spawn(worker(
                id,
                args.clone(),
                sources.clone(),
                shared.clone(),
                name.clone(),
                deadline,
            ))
        })
        .collect();
    let mut t = WorkerResult::default();
    for h in handles {
        if let Ok(r) = h.await {
            t.completed += r.completed;
            t.errors += r.errors;
            t.full += r.full;
            t.full_hrr += r.full_hrr;
            t.resumed += r.resumed;
            t.latencies_us.extend(r.latencies_us);
            t.handshake_us.extend(r.handshake_us);
            if t.first_error.is_none() {
                t.first_error = r.first_error;
            }
            if t.negotiated.is_none() {
                t.negotiated = r.negotiated;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    t.latencies_us.sort_unstable();
    t.handshake_us.sort_unstable();
    let opt = |s: Option<String>| s.map(|e| json_str(&e)).unwrap_or_else(|| "null".into());
    let resumed_fraction = if t.completed > 0 {
        t.resumed as f64 / t.completed as f64
    } else {
        0.0
    };
    println!(
        "{{\"target\":{},\"workers\":{},\"sources\":{},\"resume\":{},\"duration_s\":{:.3},\"completed\":{},\"errors\":{},\"rate_per_s\":{:.1},\"handshakes\":{{\"full\":{},\"full_hrr\":{},\"resumed\":{}}},\"resumed_fraction\":{:.4},\"latency_us\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"handshake_us\":{{\"p50\":{},\"p99\":{}}},\"negotiated\":{},\"first_error\":{}}}",
        json_str(&args.target.to_string()),
        args.workers,
        sources.len(),
        args.resume,
        elapsed,
        t.completed,
        t.errors,
        t.completed as f64 / elapsed,
        t.full,
        t.full_hrr,
        t.resumed,
        resumed_fraction,
        quantile(&t.latencies_us, 0.5),
        quantile(&t.latencies_us, 0.99),
        t.latencies_us.last().copied().unwrap_or(0),
        quantile(&t.handshake_us, 0.5),
        quantile(&t.handshake_us, 0.99),
        opt(t.negotiated),
        opt(t.first_error)
    );
}
