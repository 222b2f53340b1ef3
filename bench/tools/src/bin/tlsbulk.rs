//! TLS bulk upload: N streams, each a TLS connection that sends plaintext frames for T
//! seconds to a sink (`echo --mode sink`, directly over TLS or behind a TLS-terminating
//! proxy), then an end frame; the sink answers with the bytes it received, which must
//! equal the bytes sent. Throughput is plaintext payload bytes over the time from the
//! start to the last stream's answer (so data still in flight at T is counted only once
//! it has arrived), like iperf3's receiver-side upload figure.
//!
//! `--plain` sends the same frames without TLS (to `echo --mode sink` or a plain TCP
//! relay in front of it); `--proxy socks5|http --dest ADDR` first opens a tunnel to ADDR
//! through the forward proxy at `--target` (the bulk measurements through SOCKS5 and
//! HTTP CONNECT tunnels).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_bench_tools::tls::{self, client_config, server_name};
use ferry_bench_tools::{connect_from, json_str, parse_sources, proxy_handshake, raise_nofile, ProxyKind};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;

#[derive(Parser, Debug)]
#[command(about = "TLS (or --plain) bulk upload to a sink (echo --mode sink): Gbit/s of payload")]
struct Args {
    /// Address to connect to: the sink or a relay in front of it, or the forward proxy
    /// with --proxy.
    #[arg(long)]
    target: SocketAddr,
    /// CA certificate (PEM) the server's certificate must chain to (not with --plain).
    #[arg(long, required_unless_present = "plain", conflicts_with = "plain")]
    ca: Option<PathBuf>,
    /// No TLS: the frames go over the TCP connection (or tunnel) as they are.
    #[arg(long)]
    plain: bool,
    /// Open a tunnel through the proxy at --target first: SOCKS5 (no auth) CONNECT or
    /// HTTP CONNECT, to --dest. "none": --target is the sink (or a relay).
    #[arg(long, value_enum, default_value = "none")]
    proxy: ProxyKind,
    /// The tunnel's destination (the sink) with --proxy socks5|http.
    #[arg(long)]
    dest: Option<SocketAddr>,
    /// Server name sent (SNI) and verified.
    #[arg(long, default_value = "bench.test")]
    sni: String,
    /// Parallel streams (TLS connections).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Plaintext bytes per frame (one write of the application; rustls cuts it into
    /// 16 KiB records). iperf3 writes 128 KiB.
    #[arg(long, default_value_t = 128 * 1024)]
    frame: usize,
    /// Also offer TLS 1.2 (default: TLS 1.3 only).
    #[arg(long)]
    allow_tls12: bool,
    /// Source addresses: "auto", "none", or a list/range (see connrate).
    #[arg(long, default_value = "auto")]
    sources: String,
}

struct StreamResult {
    bytes: u64,
    end: Instant,
    negotiated: Option<String>,
}

async fn stream(
    src: Option<IpAddr>,
    args: Arc<Args>,
    tls_cfg: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    deadline: Instant,
) -> std::io::Result<StreamResult> {
    let mut tcp = connect_from(src, args.target, false).await?;
    if let Some(dest) = args.dest {
        proxy_handshake(&mut tcp, args.proxy, dest).await?;
    }
    let mut frame = vec![0u8; 4 + args.frame];
    frame[..4].copy_from_slice(&(args.frame as u32).to_be_bytes());
    for (i, b) in frame[4..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut sent = 0u64;
    let mut ack = [0u8; 8];
    let negotiated;
    match tls_cfg {
        Some((cfg, name)) => {
            let mut s = tls::connect(tcp, &cfg, &name, 16 * 1024).await?;
            negotiated = Some(tls::describe(&s.conn));
            while Instant::now() < deadline {
                s.write_all(&frame).await?;
                sent += args.frame as u64;
            }
            s.write_all(&0u32.to_be_bytes()).await?;
            s.read_exact(&mut ack).await?;
            let _ = s.close().await;
        }
        None => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            negotiated = None;
            while Instant::now() < deadline {
                tcp.write_all(&frame).await?;
                sent += args.frame as u64;
            }
            tcp.write_all(&0u32.to_be_bytes()).await?;
            tcp.read_exact(&mut ack).await?;
        }
    }
    let end = Instant::now();
    let got = u64::from_be_bytes(ack);
    if got != sent {
        return Err(std::io::Error::other(format!(
            "sink received {got} bytes, {sent} were sent"
        )));
    }
    Ok(StreamResult {
        bytes: got,
        end,
        negotiated,
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let _ = raise_nofile();
    let sources = match parse_sources(&args.sources, args.target) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tlsbulk: --sources: {e}");
            std::process::exit(2);
        }
    };
    if !(args.duration > 0.0 && args.duration < 3600.0)
        || args.streams == 0
        || args.frame == 0
        || args.frame > u32::MAX as usize
    {
        eprintln!("tlsbulk: need 0 < --duration < 3600, --streams > 0, 0 < --frame < 4 GiB");
        std::process::exit(2);
    }
    if (args.proxy == ProxyKind::None) != args.dest.is_none() {
        eprintln!("tlsbulk: --dest goes with --proxy socks5|http (and only with it)");
        std::process::exit(2);
    }
    let tls_cfg = match &args.ca {
        None => None,
        Some(ca) => {
            let cfg = match client_config(ca, None, args.allow_tls12) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("tlsbulk: {e}");
                    std::process::exit(2);
                }
            };
            let name = match server_name(&args.sni) {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("tlsbulk: --sni {e}");
                    std::process::exit(2);
                }
            };
            Some((cfg, name))
        }
    };
    let args = Arc::new(args);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let limit = Duration::from_secs_f64(args.duration + 30.0);
    let handles: Vec<_> = (0..args.streams)
        .map(|i| {
            let src = if sources.is_empty() {
                None
            } else {
                Some(sources[i % sources.len()])
            };
            let fut = stream(src, args.clone(), tls_cfg.clone(), deadline);
            tokio::spawn(async move {
                match tokio::time::timeout(limit, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "stream timed out")),
                }
            })
        })
        .collect();
    let mut bytes = 0u64;
    let mut per_stream = Vec::new();
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    let mut negotiated: Option<String> = None;
    let mut last_end = start;
    for h in handles {
        match h.await {
            Ok(Ok(r)) => {
                bytes += r.bytes;
                per_stream.push(r.bytes);
                last_end = last_end.max(r.end);
                if negotiated.is_none() {
                    negotiated = r.negotiated;
                }
            }
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let elapsed = (last_end - start).as_secs_f64().max(1e-9);
    let opt = |s: Option<String>| s.map(|e| json_str(&e)).unwrap_or_else(|| "null".into());
    println!(
        "{{\"target\":{},\"tls\":{},\"proxy\":{},\"dest\":{},\"streams\":{},\"frame\":{},\"duration_s\":{:.3},\"bytes\":{},\"gbps\":{:.4},\"per_stream_bytes\":[{}],\"errors\":{},\"negotiated\":{},\"first_error\":{}}}",
        json_str(&args.target.to_string()),
        !args.plain,
        json_str(args.proxy.as_str()),
        args.dest.map(|d| json_str(&d.to_string())).unwrap_or_else(|| "null".into()),
        args.streams,
        args.frame,
        elapsed,
        bytes,
        bytes as f64 * 8.0 / elapsed / 1e9,
        per_stream.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","),
        errors,
        opt(negotiated),
        opt(first_error)
    );
}
