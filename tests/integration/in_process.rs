//! The proxy inside the test process, on the test's own single-threaded runtime with the
//! clock paused (`Workers::on_current_runtime`): idle timeouts, the queue, handshake
//! deadlines and the drain, tested in virtual time. Timers fire when the runtime has
//! nothing else to do, at the instant they are due, so these tests assert what is open and
//! what is closed at a given virtual time, however loaded the machine is.

use std::future::pending;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::common::echo_server;
use ferry::listener::{Binder, SystemBinder};
use ferry::observe::Outcome;
use ferry::runtime::{Proxy, ReloadOutcome, Stopped};
use ferry::workers::Workers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::sleep;

/// `text` (with the access log off), parsed.
fn parse(text: &str) -> ferry::config::Config {
    let text = format!("[log]\naccess = \"off\"\n{text}");
    ferry::config::parse_str(&text, "test.toml", std::path::Path::new("/"))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Starts the proxy of `text` on the current runtime, binding through `binder`.
async fn start_with(text: &str, binder: Arc<dyn Binder>) -> std::io::Result<Proxy> {
    Proxy::start(
        &parse(text),
        None,
        Arc::new(Workers::on_current_runtime()),
        &ferry::admin::Server,
        binder,
    )
    .await
}

/// Starts the proxy of `text` (with the access log off) on the current runtime.
async fn start(text: &str) -> Proxy {
    start_with(text, Arc::new(SystemBinder))
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

/// Binds with the system's sockets, except on the ports in `refuse` (as if the address
/// were not available), and remembers every address it bound.
struct FaultyBinder {
    refuse: Vec<u16>,
    bound: std::sync::Mutex<Vec<SocketAddr>>,
}

impl FaultyBinder {
    fn new(refuse: &[u16]) -> Arc<FaultyBinder> {
        Arc::new(FaultyBinder {
            refuse: refuse.to_vec(),
            bound: std::sync::Mutex::new(Vec::new()),
        })
    }

    fn bound(&self) -> Vec<SocketAddr> {
        self.bound.lock().unwrap().clone()
    }
}

impl Binder for FaultyBinder {
    fn bind(
        &self,
        addr: SocketAddr,
        reuse_port: bool,
        transparent: bool,
        exclusive: bool,
    ) -> std::io::Result<std::net::TcpListener> {
        if self.refuse.contains(&addr.port()) {
            return Err(std::io::ErrorKind::AddrNotAvailable.into());
        }
        let s = SystemBinder.bind(addr, reuse_port, transparent, exclusive)?;
        self.bound.lock().unwrap().push(addr);
        Ok(s)
    }
}

/// A port nothing listens on now (bound, then closed).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True if `port` on loopback can be bound now: nothing holds it.
fn is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

const TWO_LISTENERS: &str = r#"
[[listener]]
name = "a"
listen = "127.0.0.1:PORT_A"
upstream = "echo"

[[listener]]
name = "b"
listen = "127.0.0.1:PORT_B"
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["ECHO"]
"#;

fn two_listeners(a: u16, b: u16, echo: SocketAddr) -> String {
    TWO_LISTENERS
        .replace("PORT_A", &a.to_string())
        .replace("PORT_B", &b.to_string())
        .replace("ECHO", &echo.to_string())
}

/// A start that cannot bind one address fails, and leaves nothing bound: the address
/// bound before it is closed again.
#[tokio::test]
async fn start_that_cannot_bind_leaves_nothing_bound() {
    let echo = echo_server().await;
    let (a, b) = (free_port(), free_port());
    let binder = FaultyBinder::new(&[b]);
    let e = start_with(&two_listeners(a, b, echo), binder.clone())
        .await
        .err()
        .expect("the start fails");
    assert!(
        e.to_string()
            .contains(&format!("cannot listen on 127.0.0.1:{b}")),
        "{e}"
    );
    assert_eq!(binder.bound(), vec![SocketAddr::from(([127, 0, 0, 1], a))]);
    assert!(is_free(a), "127.0.0.1:{a} was left bound");
}

/// A reload that cannot bind one of its new addresses is rejected, leaves nothing bound
/// (the new address bound before the failure is closed again) and changes nothing: the
/// running listener still serves.
#[tokio::test]
async fn reload_that_cannot_bind_leaves_nothing_bound() {
    let echo = echo_server().await;
    let (a, b) = (free_port(), free_port());
    let binder = FaultyBinder::new(&[b]);
    let p = start_with(&config(echo, "", ""), binder.clone())
        .await
        .expect("start");
    let running = p.bound[0].1;
    let before = binder.bound().len();
    // The running listener as it is, and two new ones.
    let mut text = config(echo, "", "");
    text.push_str(
        two_listeners(a, b, echo)
            .split("[[upstream]]")
            .next()
            .unwrap(),
    );
    match p.shared.apply(parse(&text)).await {
        ReloadOutcome::Rejected(errors) => assert!(
            errors
                .iter()
                .any(|e| e.contains(&format!("cannot listen on 127.0.0.1:{b}"))),
            "{errors:?}"
        ),
        ReloadOutcome::Applied(changes) => panic!("applied: {changes:?}"),
    }
    assert_eq!(
        binder.bound()[before..],
        [SocketAddr::from(([127, 0, 0, 1], a))],
        "what the reload bound"
    );
    assert!(is_free(a), "127.0.0.1:{a} was left bound");
    assert_eq!(p.shared.view.load().listeners.len(), 1);
    let mut c = TcpStream::connect(running).await.unwrap();
    round_trip(&mut c, b"still served").await;
}
