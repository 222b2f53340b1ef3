//! Short-connection load: connect, write N bytes, read them back, close; repeat.
//! With `--proxy socks5|http --dest ADDR` each connection first opens a tunnel to ADDR
//! through the forward proxy at `--target` (new tunnels per second).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_bench_tools::{
    connect_from, json_str, parse_sources, proxy_handshake, quantile, raise_nofile, ProxyKind,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(about = "Measure TCP connections/s against an echo server (direct or via a proxy)")]
struct Args {
    /// Address to connect to: the echo server, or the forward proxy with --proxy.
    #[arg(long)]
    target: SocketAddr,
    /// Open a tunnel through the proxy at --target first: SOCKS5 (no auth) CONNECT or
    /// HTTP CONNECT, to --dest. "none": --target is the echo server.
    #[arg(long, value_enum, default_value = "none")]
    proxy: ProxyKind,
    /// The tunnel's destination (the echo server) with --proxy socks5|http.
    #[arg(long)]
    dest: Option<SocketAddr>,
    /// Concurrent workers (each runs connections back to back).
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Test duration in seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Bytes written (and read back) per connection.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Close with SO_LINGER 0 (RST) instead of FIN; avoids client TIME_WAIT.
    #[arg(long)]
    zero_linger: bool,
    /// Source addresses: "auto" (127.0.0.2-127.0.0.9 for a loopback target),
    /// "none", or a list like 127.0.0.2,127.0.0.3 or 127.0.0.2-127.0.0.9.
    #[arg(long, default_value = "auto")]
    sources: String,
    /// Per-connection timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

struct WorkerResult {
    completed: u64,
    errors: u64,
    latencies_us: Vec<u64>,
    first_error: Option<String>,
}

async fn one(
    src: Option<IpAddr>,
    args: &Args,
    payload: &[u8],
    back: &mut [u8],
) -> std::io::Result<()> {
    let mut s = connect_from(src, args.target, args.zero_linger).await?;
    if let Some(dest) = args.dest {
        proxy_handshake(&mut s, args.proxy, dest).await?;
    }
    s.write_all(payload).await?;
    s.read_exact(back).await?;
    if back != payload {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

async fn worker(
    id: usize,
    args: std::sync::Arc<Args>,
    sources: std::sync::Arc<Vec<IpAddr>>,
    deadline: Instant,
) -> WorkerResult {
    let src = if sources.is_empty() {
        None
    } else {
        Some(sources[id % sources.len()])
    };
    let payload: Vec<u8> = (0..args.size).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; args.size];
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut r = WorkerResult {
        completed: 0,
        errors: 0,
        latencies_us: Vec::new(),
        first_error: None,
    };
    while Instant::now() < deadline {
        let start = Instant::now();
        let res = match tokio::time::timeout(timeout, one(src, &args, &payload, &mut back)).await {
            Ok(res) => res,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connection timed out",
            )),
        };
        match res {
            Ok(()) => {
                r.completed += 1;
                r.latencies_us.push(start.elapsed().as_micros() as u64);
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
            eprintln!("connrate: --sources: {e}");
            std::process::exit(2);
        }
    };
    if !(args.duration > 0.0 && args.duration < 3600.0) || args.workers == 0 {
        eprintln!("connrate: need 0 < --duration < 3600 and --workers > 0");
        std::process::exit(2);
    }
    if (args.proxy == ProxyKind::None) != args.dest.is_none() {
        eprintln!("connrate: --dest goes with --proxy socks5|http (and only with it)");
        std::process::exit(2);
    }
    let args = std::sync::Arc::new(args);
    let sources = std::sync::Arc::new(sources);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let handles: Vec<_> = (0..args.workers)
        .map(|id| tokio::spawn(worker(id, args.clone(), sources.clone(), deadline)))
        .collect();
    let mut completed = 0u64;
    let mut errors = 0u64;
    let mut lat = Vec::new();
    let mut first_error = None;
    for h in handles {
        if let Ok(r) = h.await {
            completed += r.completed;
            errors += r.errors;
            lat.extend(r.latencies_us);
            if first_error.is_none() {
                first_error = r.first_error;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let fe = first_error
        .map(|e| json_str(&e))
        .unwrap_or_else(|| "null".into());
    println!(
        "{{\"target\":{},\"proxy\":{},\"dest\":{},\"workers\":{},\"sources\":{},\"duration_s\":{:.3},\"completed\":{},\"errors\":{},\"rate_per_s\":{:.1},\"latency_us\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"first_error\":{}}}",
        json_str(&args.target.to_string()),
        json_str(args.proxy.as_str()),
        args.dest.map(|d| json_str(&d.to_string())).unwrap_or_else(|| "null".into()),
        args.workers,
        sources.len(),
        elapsed,
        completed,
        errors,
        completed as f64 / elapsed,
        quantile(&lat, 0.5),
        quantile(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
        fe
    );
}
