//! `ferry demo`: three echo servers on loopback and a proxy in front of them, so a newcomer
//! sees ferry work with nothing else installed.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::config::{Config, ConfigErrors, parse_str};

/// The address the demo listener tries first; if taken, an ephemeral port is used.
pub const DEMO_ADDR: &str = "127.0.0.1:7000";
/// The address the demo's admin server (stats page) tries first.
pub const DEMO_ADMIN_ADDR: &str = "127.0.0.1:9900";

/// `preferred` if it can be bound now, else an ephemeral port on loopback.
pub fn free_or_ephemeral(preferred: &str) -> SocketAddr {
    match std::net::TcpListener::bind(preferred) {
        Ok(_) => preferred,
        Err(_) => "127.0.0.1:0",
    }
    .parse()
    .expect("constant address")
}

/// Starts `n` line-echo servers on `127.0.0.1:0`. Each answers every line with its name
/// and the line, so round robin can be seen from the client.
pub async fn start_echo_servers(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs = Vec::new();
    for i in 1..=n {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(l.local_addr()?);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let _ = w
                        .write_all(format!("hello from echo-{i}\n").as_bytes())
                        .await;
                    while let Ok(Some(line)) = lines.next_line().await {
                        if w.write_all(format!("echo-{i}: {line}\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
    }
    Ok(addrs)
}

/// The demo's config as a file would say it: one listener in front of `servers` with
/// health checks, the admin server on `admin`, access log as text on stdout.
pub fn config_text(listen: SocketAddr, admin: SocketAddr, servers: &[SocketAddr]) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        r#"[admin]
listen = "{admin}"

[log]
access = "stdout"
format = "text"

[[listener]]
name = "demo"
listen = "{listen}"
upstream = "echo"

[[upstream]]
name = "echo"
servers = [{servers}]

[upstream.health]
interval = "2s"
timeout = "1s"
expect = "hello from echo"
"#,
        servers = servers.join(", ")
    )
}

/// The demo's config ([`config_text`]), read by the config parser.
pub fn config(
    listen: SocketAddr,
    admin: SocketAddr,
    servers: &[SocketAddr],
) -> Result<Config, ConfigErrors> {
    parse_str(
        &config_text(listen, admin, servers),
        "(demo)",
        std::path::Path::new("."),
    )
}
