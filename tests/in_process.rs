//! The proxy inside the test process, on the test's own single-threaded runtime with the
//! clock paused (`Workers::on_current_runtime`): idle timeouts, the queue, handshake
//! deadlines and the drain, tested in virtual time. Timers fire when the runtime has
//! nothing else to do, at the instant they are due, so these tests assert what is open and
//! what is closed at a given virtual time, however loaded the machine is.

mod common;

use std::future::pending;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::echo_server;
use ferry::observe::Outcome;
use ferry::runtime::{Proxy, Stopped};
use ferry::workers::Workers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::sleep;

/// Starts the proxy of `text` (with the access log off) on the current runtime.
async fn start(text: &str) -> Proxy {
    let text = format!("[log]\naccess = \"off\"\n{text}");
    let cfg = ferry::config::parse_str(&text, "test.toml", std::path::Path::new("/"))
        .unwrap_or_else(|e| panic!("{e}"));
    Proxy::start(
        &cfg,
        None,
        Arc::new(Workers::on_current_runtime()),
        &ferry::admin::Server,
    )
    .await
    .expect("start the proxy")
}

fn listener_stats(p: &Proxy, i: usize) -> Arc<ferry::observe::ListenerStats> {
    p.shared.view.load().listeners[i].slot.load().stats.clone()
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, msg);
}

/// True if the peer has closed `s` (EOF or reset) by now, without waiting.
fn closed(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.try_read(&mut b) {
        Ok(0) => true,
        Ok(_) => panic!("unexpected data"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// Lets every task that can run, run (the clock does not move while one can).
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

fn config(echo: SocketAddr, listener_extra: &str, upstream_extra: &str) -> String {
    format!(
        r#"
[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "echo"
{listener_extra}

[[upstream]]
name = "echo"
servers = ["{echo}"]
{upstream_extra}
"#
    )
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_at_the_instant_it_is_due() {
    let echo = echo_server().await;
    let p = start(&config(echo, "idle_timeout = \"30s\"", "")).await;
    let mut c = TcpStream::connect(p.bound[0].1).await.unwrap();
    round_trip(&mut c, b"hello").await;
    // Just before the deadline: open.
    sleep(Duration::from_millis(29_900)).await;
    settle().await;
    assert!(!closed(&c), "closed before idle_timeout");
    assert_eq!(listener_stats(&p, 0).finished(Outcome::IdleTimeout), 0);
    // Traffic re-arms it: 29.9 s more, still open.
    round_trip(&mut c, b"again").await;
    sleep(Duration::from_millis(29_900)).await;
    settle().await;
    assert!(!closed(&c), "the deadline was not moved by traffic");
    // Past it: closed, and counted as an idle timeout.
    sleep(Duration::from_millis(200)).await;
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).await.unwrap_or(0), 0);
    settle().await;
    assert_eq!(listener_stats(&p, 0).finished(Outcome::IdleTimeout), 1);
}

#[tokio::test(start_paused = true)]
async fn queued_connection_gives_up_at_the_queue_timeout() {
    let echo = echo_server().await;
    let p = start(&config(
        echo,
        "",
        "max_connections_per_server = 1\nqueue = { size = 10, timeout = \"5s\" }",
    ))
    .await;
    let addr = p.bound[0].1;
    let mut first = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut first, b"holds the only slot").await;
    let second = TcpStream::connect(addr).await.unwrap();
    settle().await;
    let pool = p.shared.view.load().pools[0].clone();
    assert_eq!(pool.queued(), 1);
    sleep(Duration::from_millis(4_900)).await;
    settle().await;
    assert_eq!(pool.queued(), 1, "left the queue before its timeout");
    assert!(!closed(&second));
    sleep(Duration::from_millis(200)).await;
    settle().await;
    assert_eq!(pool.queued(), 0);
    assert!(closed(&second), "still open after the queue timeout");
    assert_eq!(listener_stats(&p, 0).finished(Outcome::QueueTimeout), 1);

    // A third waits, and gets the slot the moment the first lets go of it.
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(b"waiting").await.unwrap();
    settle().await;
    assert_eq!(pool.queued(), 1);
    sleep(Duration::from_secs(2)).await;
    drop(first);
    let mut got = [0u8; 7];
    third.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"waiting");
    assert_eq!(listener_stats(&p, 0).finished(Outcome::QueueTimeout), 1);
}

#[tokio::test(start_paused = true)]
async fn stalled_handshake_is_closed_at_the_deadline() {
    let echo = echo_server().await;
    let p = start(&format!(
        r#"
[[listener]]
name = "socks"
listen = "127.0.0.1:0"
mode = "socks5"
handshake_timeout = "10s"
destinations = ["{}/32:{}"]
"#,
        echo.ip(),
        echo.port()
    ))
    .await;
    let mut c = TcpStream::connect(p.bound[0].1).await.unwrap();
    // Half a greeting: two methods announced, one sent.
    c.write_all(&[5, 2, 0]).await.unwrap();
    sleep(Duration::from_millis(9_900)).await;
    settle().await;
    assert!(!closed(&c), "closed before handshake_timeout");
    sleep(Duration::from_millis(200)).await;
    settle().await;
    assert!(closed(&c), "still open after handshake_timeout");
    assert_eq!(listener_stats(&p, 0).finished(Outcome::ProtocolError), 1);
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_open_connections_until_its_timeout() {
    let echo = echo_server().await;
    let p = start(&format!(
        "[global]\ndrain_timeout = \"60s\"\n{}",
        config(echo, "idle_timeout = \"1h\"", "")
    ))
    .await;
    let addr = p.bound[0].1;
    let mut leaving = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut leaving, b"one").await;
    let mut staying = TcpStream::connect(addr).await.unwrap();
    round_trip(&mut staying, b"two").await;

    let shared = p.shared.clone();
    let drain = tokio::spawn(async move { shared.drain(pending()).await });
    settle().await;
    // Not accepting any more; the open connections carry on.
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    round_trip(&mut staying, b"during the drain").await;
    // One ends by itself within the timeout: drained as `ok`.
    sleep(Duration::from_secs(30)).await;
    drop(leaving);
    settle().await;
    assert_eq!(listener_stats(&p, 0).finished(Outcome::Ok), 1);
    assert!(!drain.is_finished());
    // The other is closed when the timeout runs out, not before.
    sleep(Duration::from_millis(29_900)).await;
    settle().await;
    assert!(!closed(&staying), "closed before drain_timeout");
    sleep(Duration::from_millis(200)).await;
    let stopped = drain.await.unwrap();
    assert_eq!(stopped, Stopped::TimedOut);
    assert!(closed(&staying));
    assert_eq!(listener_stats(&p, 0).finished(Outcome::Drained), 1);
}
