//! The relay on packets the size a real network delivers: client, ferry and server each in
//! a network namespace, joined by veth pairs with MTU 1500 and segmentation offload capped,
//! so ferry's sockets receive 1,448-byte segments instead of loopback's 64 KiB ones.
//!
//! The traffic is request/response with pauses, where a byte left in ferry's socket without
//! a wake-up shows as a stall: a server answers 256 KiB to 6 MiB and then waits for the next
//! request (downloads), or takes 256 KiB to 6 MiB and answers with their SHA-256 (uploads).
//! Every answer is checked by SHA-256, for the splice engine (with its default pipes, and
//! with pipes forced small), for the copy engine, and through TLS terminated by ferry
//! (whose reads carry partial records over from one segment to the next). Each round must
//! complete within `netns::SLOW`, far above the normal time (a fraction of a second).

use std::net::SocketAddr;

use crate::common::netns::{Path3, SLOW};
use crate::common::{Prng, WAIT, pki, prng_sha256, send_prng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENTS: u64 = 3;
const ROUNDS: u64 = 12;
const MIN_SIZE: u64 = 256 * 1024;
const MAX_SIZE: u64 = 6 * 1024 * 1024;

/// A request: `D` (send me `size` bytes from `seed`) or `U` (here come `size` bytes; answer
/// their SHA-256), then `size` and `seed` as little-endian u64s.
fn request(op: u8, size: u64, seed: u64) -> [u8; 17] {
    let mut r = [0u8; 17];
    r[0] = op;
    r[1..9].copy_from_slice(&size.to_le_bytes());
    r[9..17].copy_from_slice(&seed.to_le_bytes());
    r
}

/// Serves requests on each connection until the client closes it.
fn start_server(net: &Path3) -> SocketAddr {
    let l = net.server_listener();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = [0u8; 17];
                while s.read_exact(&mut req).await.is_ok() {
                    let size = u64::from_le_bytes(req[1..9].try_into().unwrap());
                    let seed = u64::from_le_bytes(req[9..17].try_into().unwrap());
                    let ok = match req[0] {
                        b'D' => send_prng(&mut s, size, seed).await.is_ok(),
                        b'U' => match read_hashed(&mut s, size).await {
                            Ok(digest) => s.write_all(&digest).await.is_ok(),
                            Err(_) => false,
                        },
                        _ => false,
                    };
                    if !ok {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads exactly `n` bytes; returns their SHA-256. Counts into `got` as it goes.
async fn read_hashed(s: &mut TcpStream, n: u64) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        let got = s.read(&mut buf[..k]).await?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        h.update(&buf[..got]);
        left -= got as u64;
    }
    Ok(h.finalize().into())
}

/// One client: `ROUNDS` downloads and uploads of random sizes on one connection.
async fn client(net: &Path3, front: SocketAddr, id: u64, what: &str) {
    let mut s = net.connect(front);
    let mut rng = Prng::new(0x5EED ^ id);
    for round in 0..ROUNDS {
        for op in [b'D', b'U'] {
            let size = MIN_SIZE + rng.below(MAX_SIZE - MIN_SIZE + 1);
            let seed = rng.next_u64();
            let label = format!(
                "{what}: client {id}, round {round}, {} of {size} bytes",
                if op == b'D' { "download" } else { "upload" }
            );
            let exchange = async {
                s.write_all(&request(op, size, seed)).await?;
                if op == b'D' {
                    read_hashed(&mut s, size).await
                } else {
                    send_prng(&mut s, size, seed).await?;
                    let mut digest = [0u8; 32];
                    s.read_exact(&mut digest).await?;
                    Ok(digest)
                }
            };
            let digest = match tokio::time::timeout(SLOW, exchange).await {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => panic!("{label}: {e}"),
                Err(_) => panic!("{label}: not complete after {SLOW:?} (stalled)"),
            };
            assert_eq!(digest, prng_sha256(size, seed), "{label}: SHA-256 differs");
        }
    }
    s.shutdown().await.unwrap();
}

/// One client as [`client`], through TLS (blocking rustls on a socket of the client's
/// namespace).
fn tls_client(net: &Path3, front: SocketAddr, id: u64, what: &str, roots: &[String]) {
    use std::io::{Read, Write};
    let sock = crate::common::netns::in_ns(&net.client_ns, || {
        std::net::TcpStream::connect_timeout(&front, WAIT).expect("connect")
    });
    sock.set_read_timeout(Some(SLOW)).unwrap();
    sock.set_write_timeout(Some(SLOW)).unwrap();
    let opts = pki::ClientOpts {
        sni: Some("ferry.test"),
        roots,
        ..Default::default()
    };
    let conn =
        rustls::ClientConnection::new(pki::client_config(&opts), "ferry.test".try_into().unwrap())
            .unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    let mut rng = Prng::new(0x5EED ^ id);
    let mut buf = vec![0u8; 64 * 1024];
    for round in 0..ROUNDS {
        for op in [b'D', b'U'] {
            let size = MIN_SIZE + rng.below(MAX_SIZE - MIN_SIZE + 1);
            let seed = rng.next_u64();
            let label = format!(
                "{what}: client {id}, round {round}, {} of {size} bytes",
                if op == b'D' { "download" } else { "upload" }
            );
            s.write_all(&request(op, size, seed))
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            let digest: [u8; 32] = if op == b'D' {
                let mut h = Sha256::new();
                let mut left = size;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    // A read timing out (SLOW) is the stall this test looks for.
                    let n = s
                        .read(&mut buf[..k])
                        .unwrap_or_else(|e| panic!("{label}: {e} with {left} bytes to go"));
                    assert!(n > 0, "{label}: EOF with {left} bytes to go");
                    h.update(&buf[..n]);
                    left -= n as u64;
                }
                h.finalize().into()
            } else {
                let mut r = Prng::new(seed);
                let mut left = size;
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    r.fill(&mut buf[..k]);
                    s.write_all(&buf[..k])
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    left -= k as u64;
                }
                let mut d = [0u8; 32];
                s.read_exact(&mut d)
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                d
            };
            assert_eq!(digest, prng_sha256(size, seed), "{label}: SHA-256 differs");
        }
    }
    s.conn.send_close_notify();
    let _ = s.flush();
}

async fn rounds_through_ferry(global: &str, what: &str) {
    rounds_through(global, what, false).await
}

async fn rounds_through(global: &str, what: &str, tls: bool) {
    let net = std::sync::Arc::new(Path3::new());
    let server = start_server(&net);
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new("mtu test CA");
    let (cert, key) = ca.server(&["ferry.test"]).write(dir.path(), "ferry");
    let tls_lines = if tls {
        format!(
            "mode = \"tls\"\ntls = {{ cert = \"{}\", key = \"{}\" }}",
            cert.display(),
            key.display()
        )
    } else {
        String::new()
    };
    let config = format!(
        r#"
[global]
workers = 2
{global}

[log]
access = "@LOG@"

[[listener]]
name = "front"
listen = "{}:0"
upstream = "back"
{tls_lines}

[[upstream]]
name = "back"
servers = ["{server}"]
"#,
        net.proxy_ip
    );
    let ferry = net.start_ferry(&config, 1).await;
    let front = ferry.addr("front");
    if tls {
        let roots = vec![ca.pem()];
        let handles: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let (net, roots, what) = (net.clone(), roots.clone(), what.to_string());
                std::thread::spawn(move || tls_client(&net, front, id, &what, &roots))
            })
            .collect();
        let joined = tokio::task::spawn_blocking(move || {
            handles.into_iter().map(|h| h.join()).collect::<Vec<_>>()
        })
        .await
        .unwrap();
        for r in joined {
            if let Err(e) = r {
                std::panic::resume_unwind(e);
            }
        }
    } else {
        let clients = (0..CLIENTS).map(|id| {
            let net = &*net;
            async move { client(net, front, id, what).await }
        });
        futures_join_all(clients).await;
    }
    // Each connection ended cleanly and is accounted for, bytes included.
    let records = ferry.records(CLIENTS as usize, WAIT).await;
    assert_eq!(records.len(), CLIENTS as usize);
    for r in &records {
        assert_eq!(r["result"], "ok", "{what}: {r}");
        assert!(
            r["bytes_up"].as_u64().unwrap() > ROUNDS * MIN_SIZE,
            "{what}: {r}"
        );
        assert!(
            r["bytes_down"].as_u64().unwrap() > ROUNDS * MIN_SIZE,
            "{what}: {r}"
        );
    }
}

/// Runs the futures concurrently on this task; returns when all are done.
async fn futures_join_all<F: Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let mut set: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        set.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if set.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_engine_on_mtu_sized_packets() {
    rounds_through_ferry("", "splice, 1 MiB pipes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_engine_with_small_pipes_on_mtu_sized_packets() {
    // 64 KiB: 16 slots, about 23 KB of 1,448-byte segments per splice.
    rounds_through_ferry(r#"pipe_size = "64KiB""#, "splice, 64 KiB pipes").await;
    // Two pages: what a user past `fs.pipe-user-pages-soft` gets.
    rounds_through_ferry(r#"pipe_size = "8KiB""#, "splice, 8 KiB pipes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_engine_on_mtu_sized_packets() {
    rounds_through_ferry("splice = false", "copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_termination_on_mtu_sized_packets() {
    rounds_through("", "TLS terminated", true).await;
}
