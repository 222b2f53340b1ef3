//! Open N relayed connections, prove each one echoes, then hold them idle.
//!
//! With `--tls` each connection first completes a TLS handshake (TLS 1.3, full, the
//! server's certificate verified against `--ca` for `--sni`), and the byte is echoed
//! inside TLS. The client then drops its own TLS state (no close_notify: the TCP
//! connection stays open and the server sees nothing), so holding thousands costs the
//! client only its sockets.
//!
//! Prints one JSON line `{"opened":N,"failed":F,...}`, then `READY`, then holds
//! every connection open until stdin is closed, `--hold-secs` pass, or the
//! process is signalled.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_bench_tools::tls::{self, client_config, server_name};
use ferry_bench_tools::{connect_from, json_str, parse_sources, raise_nofile};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
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
    /// Speak TLS (needs --ca): handshake, then the 1-byte echo inside TLS.
    #[arg(long, requires = "ca")]
    tls: bool,
    /// CA certificate (PEM) the server's certificate must chain to (with --tls).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Server name sent (SNI) and verified (with --tls).
    #[arg(long, default_value = "bench.test")]
    sni: String,
}

/// With --tls: the client config (no resumption) and the server name.
type TlsClient = Option<(Arc<ClientConfig>, ServerName<'static>)>;

async fn open_one(src: Option<IpAddr>, target: SocketAddr, tls: &TlsClient) -> std::io::Result<TcpStream> {
    let mut s = connect_from(src, target, false).await?;
    if let Some((cfg, name)) = tls {
        let mut t = tls::connect(s, cfg, name, 4096).await?;
        t.write_all(b"x").await?;
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await?;
        if b[0] != b'x' {
            return Err(std::io::Error::other("echo mismatch"));
        }
        return Ok(t.into_tcp());
    }
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

async fn opener(lane: usize, args: Arc<Args>, sources: Arc<Vec<IpAddr>>, tls: Arc<TlsClient>) -> Opened {
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
        match tokio::time::timeout(timeout, open_one(src, args.target, &tls)).await {
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
    let tls: TlsClient = if args.tls {
        let ca = args.ca.as_ref().expect("clap: --tls requires --ca");
        match (client_config(ca, None, false), server_name(&args.sni)) {
            (Ok(c), Ok(n)) => Some((c, n)),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("idleconns: TLS: {e}");
                std::process::exit(2);
            }
        }
    } else {
        None
    };
    let tls = Arc::new(tls);
    let args = Arc::new(args);
    let sources = Arc::new(sources);
    let start = Instant::now();
    let lanes = args.concurrency.min(args.count.max(1));
    let handles: Vec<_> = (0..lanes)
        .map(|lane| tokio::spawn(opener(lane, args.clone(), sources.clone(), tls.clone())))
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
