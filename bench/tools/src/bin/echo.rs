//! TCP echo server: the backend for the connection-rate and idle-memory tests.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(about = "Multi-threaded TCP echo server")]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:9000 (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
}

async fn serve(mut stream: TcpStream) {
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

async fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve(stream));
            }
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
    let mut tasks = Vec::new();
    for addr in args.listen {
        let listener = match TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("echo: bind {addr}: {e}");
                std::process::exit(1);
            }
        };
        tasks.push(tokio::spawn(accept_loop(listener)));
    }
    for t in tasks {
        let _ = t.await;
    }
}
