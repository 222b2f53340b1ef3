//! Open N relayed connections, prove each one echoes, then hold them idle.
//!
//! Prints one JSON line `{"opened":N,"failed":F,...}`, then `READY`, then holds
//! every connection open until stdin is closed, `--hold-secs` pass, or the
//! process is signalled.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_bench_tools::{connect_from, json_str, parse_sources, raise_nofile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(about = "Open and hold N idle TCP connections through a proxy")]
struct Args {
    /// Address to connect to.
    #[arg(long)]
    target: SocketAddr,
    /// Number of connections to open.
    #[arg(long)]
    count: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Hold at most this many seconds after READY, then exit.
    #[arg(long, default_value_t = 300)]
    hold_secs: u64,
    /// Source addresses: "auto", "none", or a list/range (see connrate).
    #[arg(long, default_value = "auto")]
    sources: String,
    /// Per-connection timeout (connect + 1-byte echo) in milliseconds.
    #[arg(long, default_value_t = 10000)]
    timeout_ms: u64,
}

async fn open_one(src: Option<IpAddr>, target: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = connect_from(src, target, false).await?;
    s.write_all(b"x").await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    if b[0] != b'x' {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(s)
}

struct Opened {
    streams: Vec<TcpStream>,
    failed: usize,
    first_error: Option<String>,
}

async fn opener(lane: usize, args: Arc<Args>, sources: Arc<Vec<IpAddr>>) -> Opened {
    let mut out = Opened {
        streams: Vec::new(),
        failed: 0,
        first_error: None,
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut i = lane;
    while i < args.count {
        let src = if sources.is_empty() {
            None
        } else {
            Some(sources[i % sources.len()])
        };
        match tokio::time::timeout(timeout, open_one(src, args.target)).await {
            Ok(Ok(s)) => out.streams.push(s),
            Ok(Err(e)) => {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
            Err(_) => {
                out.failed += 1;
                out.first_error
                    .get_or_insert_with(|| "timed out".to_string());
            }
        }
        i += args.concurrency;
    }
    out
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let nofile = raise_nofile().unwrap_or(0);
    let sources = match parse_sources(&args.sources, args.target) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("idleconns: --sources: {e}");
            std::process::exit(2);
        }
    };
    if args.concurrency == 0 {
        eprintln!("idleconns: --concurrency must be > 0");
        std::process::exit(2);
    }
    let args = Arc::new(args);
    let sources = Arc::new(sources);
    let start = Instant::now();
    let lanes = args.concurrency.min(args.count.max(1));
    let handles: Vec<_> = (0..lanes)
        .map(|lane| tokio::spawn(opener(lane, args.clone(), sources.clone())))
        .collect();
    let mut streams = Vec::with_capacity(args.count);
    let mut failed = 0;
    let mut first_error = None;
    for h in handles {
        match h.await {
            Ok(o) => {
                streams.extend(o.streams);
                failed += o.failed;
                if first_error.is_none() {
                    first_error = o.first_error;
                }
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let fe = first_error
        .map(|e| json_str(&e))
        .unwrap_or_else(|| "null".into());
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "{{\"opened\":{},\"failed\":{},\"elapsed_s\":{:.3},\"nofile\":{},\"first_error\":{}}}",
        streams.len(),
        failed,
        start.elapsed().as_secs_f64(),
        nofile,
        fe
    );
    let _ = writeln!(stdout, "READY");
    let _ = stdout.flush();
    drop(stdout);

    // Hold until stdin reaches EOF (the harness closes it) or the hold time passes.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut sink) {
            if n == 0 {
                break;
            }
        }
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(args.hold_secs));
    drop(streams);
    // Exit directly: the stdin thread may still be blocked in read().
    std::process::exit(0);
}
