//! TCP echo (or sink) server: the backend for the connection-rate, idle-memory and
//! TLS tests. With `--tls-cert`/`--tls-key` it speaks TLS itself (rustls, ring): the
//! backend of the `direct-tls` path, where the client talks TLS to the backend.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use ferry_bench_tools::tls::TlsStream;
use ferry_bench_tools::SinkParser;
use rustls::{ServerConfig, ServerConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Write back what is read.
    Echo,
    /// Read and discard; answer each end frame (see tlsbulk) with the byte count.
    Sink,
}

#[derive(Parser, Debug)]
#[command(about = "Multi-threaded TCP echo or sink server, plain or TLS")]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:9000 (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// echo, or sink (the upload target of tlsbulk).
    #[arg(long, value_enum, default_value = "echo")]
    mode: Mode,
    /// Speak TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

async fn serve_echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

async fn serve_sink(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; 256 * 1024];
    let mut p = SinkParser::default();
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                for _ in 0..p.feed(&buf[..n]) {
                    if stream.write_all(&p.payload.to_be_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

async fn serve_tls(stream: TcpStream, cfg: Arc<ServerConfig>, mode: Mode) {
    let _ = stream.set_nodelay(true);
    let conn = match ServerConnection::new(cfg) {
        Ok(c) => c,
        Err(_) => return,
    };
    let mut s = TlsStream::new(stream, conn, if mode == Mode::Sink { 256 * 1024 } else { 16 * 1024 });
    if s.handshake().await.is_err() {
        return;
    }
    let mut buf = vec![0u8; if mode == Mode::Sink { 64 * 1024 } else { 16 * 1024 }];
    let mut p = SinkParser::default();
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => match mode {
                Mode::Echo => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                Mode::Sink => {
                    for _ in 0..p.feed(&buf[..n]) {
                        if s.write_all(&p.payload.to_be_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            },
        }
    }
    let _ = s.close().await;
}

async fn accept_loop(listener: TcpListener, mode: Mode, tls: Option<Arc<ServerConfig>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => match (&tls, mode) {
                (Some(cfg), _) => {
                    tokio::spawn(serve_tls(stream, cfg.clone(), mode));
                }
                (None, Mode::Echo) => {
                    tokio::spawn(serve_echo(stream));
                }
                (None, Mode::Sink) => {
                    tokio::spawn(serve_sink(stream));
                }
            },
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = ferry_bench_tools::raise_nofile() {
        eprintln!("echo: cannot raise RLIMIT_NOFILE: {e}");
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => match ferry_bench_tools::tls::server_config(c, k) {
            Ok(cfg) => Some(cfg),
            Err(e) => {
                eprintln!("echo: TLS: {e}");
                std::process::exit(2);
            }
        },
        _ => None,
    };
    let mut tasks = Vec::new();
    for addr in args.listen {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("echo: bind {addr}: {e}");
                std::process::exit(1);
            }
        };
        tasks.push(tokio::spawn(accept_loop(listener, args.mode, tls.clone())));
    }
    for t in tasks {
        let _ = t.await;
    }
}
