//! Hardening: values at the limits `ferry check` allows, abusive admin clients, slow
//! readers, and the other faults a proxy at the edge meets. Each test shows that the fault
//! costs only the connection (or request) that caused it.

use crate::common::*;
use crate::ops_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every duration at the longest `check` allows and the slowest rate with the largest
/// burst: connections are relayed, queued and limited on one worker, round after round,
/// and nothing panics (before the bounds, `idle_timeout = "300000000000y"` killed the
/// worker on its first connection).
#[tokio::test]
async fn longest_durations_and_slowest_rates_are_served() {
    let echo = echo_server().await;
    let f = Ferry::start(
        &format!(
            r#"
[global]
workers = 1
drain_timeout = "3650d"

[log]
access = "@LOG@"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
upstream = "pool"
idle_timeout = "3650d"
handshake_timeout = "3650d"
per_client = {{ rate = "1/h", burst = 10000000, max_connections = 10000000 }}

[[upstream]]
name = "pool"
servers = ["{echo}"]
connect_timeout = "3650d"
resolve_interval = "3650d"
max_connections_per_server = 1
queue = {{ size = 10, timeout = "3650d" }}
health = {{ interval = "3650d", timeout = "3650d", passive = {{ failures = 1, eject = "3650d" }} }}
"#
        ),
        1,
    )
    .await;
    for round in 0..3 {
        // Two at once: the second waits in the queue for the first to finish.
        let mut a = connect(f.addr("web")).await;
        echo_round_trip(&mut a, format!("first {round}").as_bytes()).await;
        let mut b = connect(f.addr("web")).await;
        b.write_all(b"second").await.unwrap();
        drop(a);
        let mut got = [0u8; 6];
        within(WAIT, "queued connection served", b.read_exact(&mut got))
            .await
            .unwrap();
        assert_eq!(&got, b"second");
    }
    let recs = f.records_with("ok", 6, WAIT).await;
    assert_eq!(recs.len(), 6);
    assert!(!f.stderr.text().contains("panicked"), "{}", f.stderr.text());
}

/// 300 idle connections to the admin server do not keep out a scrape (they used to: 64
/// held every slot until the 10 s header timeout), the idlest are closed to make room and
/// counted, and the token's scheme is case-insensitive.
#[tokio::test]
async fn admin_answers_through_idle_connections() {
    let echo = echo_server().await;
    let f = Ferry::start(
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
token = "s3cret"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["{echo}"]
"#
        ),
        1,
    )
    .await;
    let admin = admin_addr(&f).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(connect(admin).await);
    }
    // A real scraper: curl, as an operator would type it.
    let mut curl = std::process::Command::new("curl");
    curl.args(["-q", "-sS", "-i", "--noproxy", "*", "--max-time", "10"])
        .arg(format!("http://{admin}/metrics"));
    let out = within(
        2 * WAIT,
        "curl /metrics",
        tokio::task::spawn_blocking(move || curl.output()),
    )
    .await
    .unwrap()
    .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("content-type: text/plain; version=0.0.4"),
        "{text}"
    );
    let evicted = metric(
        &text,
        "ferry_admin_connections_closed_total",
        &[("reason", "evicted")],
    )
    .expect("evicted counter");
    assert!(evicted >= 300.0 - 64.0, "{evicted} evicted\n{text}");
    let active = metric(&text, "ferry_admin_connections_active", &[]).expect("active gauge");
    assert!(active <= 64.0, "{text}");
    // The oldest idle connection was closed by ferry.
    let mut b = [0u8; 1];
    let n = within(
        WAIT,
        "the oldest idle connection closed",
        idle[0].read(&mut b),
    )
    .await
    .unwrap_or(0);
    assert_eq!(n, 0);
    // `bearer`, `BEARER`: the scheme is case-insensitive; a wrong token is still refused.
    for (auth, status) in [
        ("bearer s3cret", 200),
        ("BEARER  s3cret", 200),
        ("bearer wrong", 401),
    ] {
        let r = http(
            admin,
            "POST",
            "/api/reload",
            &[("Authorization", auth)],
            b"",
        )
        .await;
        assert_eq!(r.status, status, "{auth}: {r:?}");
    }
}

/// Bytes each slow-reader test connection carries.
const PUSH: u64 = 6 << 20;
/// Connections in the slow-reader tests.
const SLOW: usize = 200;
/// What one connection may hold in flight, end to end, with ferry's default buffer caps:
/// the test's own small buffers at either end, ferry's two socket buffers (256 KiB each,
/// doubled by the kernel for its bookkeeping) and the pipe between them, with room to spare.
const IN_FLIGHT_BOUND: u64 = 2 << 20;

/// Waits until `total` has stopped growing (a stall: every connection blocked), for at
/// most 30 s. Returns its value then.
async fn stalled(total: &std::sync::atomic::AtomicU64) -> u64 {
    use std::sync::atomic::Ordering::SeqCst;
    let mut last = u64::MAX;
    let mut still = 0;
    for _ in 0..300 {
        let now = total.load(SeqCst);
        if now == last {
            still += 1;
            if still == 5 {
                return now;
            }
        } else {
            still = 0;
            last = now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "the transfer never stalled: {} bytes and counting",
        total.load(SeqCst)
    );
}

/// The `rb` (receive) and `tb` (send) buffer limits of ferry's established sockets matching
/// the `ss` filter `filter`, as `ss -m` reports them.
fn socket_buffers(filter: &str) -> Vec<(u64, u64)> {
    let out = std::process::Command::new("ss")
        .args(["-tmnH", "state", "established"])
        .args(filter.split(' '))
        .output()
        .expect("run ss");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |s: &str, key: &str| -> Option<u64> {
        let i = s.find(key)? + key.len();
        s[i..]
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    text.split("skmem:(")
        .skip(1)
        .filter_map(|s| Some((field(s, ",rb")?, field(s, ",tb")?)))
        .collect()
}

/// A listener whose accepted sockets have small send and receive buffers: the test's end
/// holds little, so what piles up is ferry's.
fn small_buffer_listener() -> tokio::net::TcpListener {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_send_buffer_size(64 << 10).unwrap();
    s.set_recv_buffer_size(64 << 10).unwrap();
    s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    s.listen(1024).unwrap()
}

async fn small_buffer_connect(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.set_send_buffer_size(64 << 10).unwrap();
    s.set_recv_buffer_size(64 << 10).unwrap();
    within(WAIT, "connect", s.connect(addr)).await.unwrap()
}

fn slow_config(server: std::net::SocketAddr, echo: std::net::SocketAddr) -> String {
    format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "bulk"
listen = "127.0.0.1:0"
upstream = "bulk"

[[listener]]
name = "echo"
listen = "127.0.0.1:0"
upstream = "echo"

[[upstream]]
name = "bulk"
servers = ["{server}"]

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#
    )
}

/// 200 clients that never read while their servers push: ferry takes in only what its
/// capped socket buffers hold (it used to take ~9 MiB a connection into autotuned kernel
/// buffers, 1.8 GB for 200), the servers are held back, an unrelated client is served, and
/// once the clients read, every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_pin_bounded_memory() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    let written = Arc::new(AtomicU64::new(0));
    let listener = small_buffer_listener();
    let server = listener.local_addr().unwrap();
    {
        let written = written.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let written = written.clone();
                tokio::spawn(async move {
                    let block = vec![0x5au8; 64 << 10];
                    let mut left = PUSH;
                    while left > 0 {
                        let k = left.min(block.len() as u64) as usize;
                        if s.write_all(&block[..k]).await.is_err() {
                            return;
                        }
                        written.fetch_add(k as u64, SeqCst);
                        left -= k as u64;
                    }
                    let _ = s.shutdown().await;
                });
            }
        });
    }
    let echo = echo_server().await;
    let f = Ferry::start(&slow_config(server, echo), 2).await;
    let rss_before = f.rss_kib();
    let mut clients = Vec::new();
    for _ in 0..SLOW {
        clients.push(small_buffer_connect(f.addr("bulk")).await);
    }
    let held = stalled(&written).await;
    assert!(
        held <= SLOW as u64 * IN_FLIGHT_BOUND,
        "{} MiB taken from the servers for {SLOW} clients that read nothing",
        held >> 20
    );
    let port = f.addr("bulk").port();
    let bufs = socket_buffers(&format!("sport = :{port}"));
    assert_eq!(bufs.len(), SLOW, "ferry's client sockets");
    for (rb, tb) in &bufs {
        assert!(*rb <= 512 << 10 && *tb <= 512 << 10, "rb {rb} tb {tb}");
    }
    let bufs = socket_buffers(&format!("dport = :{}", server.port()));
    assert_eq!(bufs.len(), SLOW, "ferry's server sockets");
    for (rb, tb) in &bufs {
        assert!(*rb <= 512 << 10 && *tb <= 512 << 10, "rb {rb} tb {tb}");
    }
    // ferry's own memory: flat.
    let grown = f.rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 << 10, "ferry grew by {grown} KiB");
    // Another client on another listener is served meanwhile.
    let mut other = connect(f.addr("echo")).await;
    echo_round_trip(&mut other, b"still here").await;
    // The clients read: every byte arrives.
    let reads = clients
        .into_iter()
        .map(|mut c| tokio::spawn(async move { read_count(&mut c).await.unwrap() }));
    for r in reads {
        let n = within(4 * WAIT, "client reads everything", r)
            .await
            .unwrap();
        assert_eq!(n, PUSH);
    }
    assert_eq!(written.load(SeqCst), SLOW as u64 * PUSH);
}

/// The reverse: 200 clients push to servers that do not read. ferry holds back the
/// clients with bounded buffers, and once the servers read, every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_that_never_read_pin_bounded_memory() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    let received = Arc::new(AtomicU64::new(0));
    let go = Arc::new(tokio::sync::Notify::new());
    let listener = small_buffer_listener();
    let server = listener.local_addr().unwrap();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    {
        let received = received.clone();
        let go = go.clone();
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            while accepted.len() < SLOW {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                accepted.push(s);
            }
            go.notified().await;
            for mut s in accepted {
                let received = received.clone();
                let done = done_tx.clone();
                tokio::spawn(async move {
                    let n = read_count(&mut s).await.unwrap_or(0);
                    received.fetch_add(n, SeqCst);
                    let _ = done.send(n);
                });
            }
        });
    }
    let echo = echo_server().await;
    let f = Ferry::start(&slow_config(server, echo), 2).await;
    let sent = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..SLOW {
        let mut c = small_buffer_connect(f.addr("bulk")).await;
        let sent = sent.clone();
        writers.push(tokio::spawn(async move {
            let block = vec![0xa5u8; 64 << 10];
            let mut left = PUSH;
            while left > 0 {
                let k = left.min(block.len() as u64) as usize;
                c.write_all(&block[..k]).await.unwrap();
                sent.fetch_add(k as u64, SeqCst);
                left -= k as u64;
            }
            c.shutdown().await.unwrap();
            c
        }));
    }
    let held = stalled(&sent).await;
    assert!(
        held <= SLOW as u64 * IN_FLIGHT_BOUND,
        "{} MiB taken from clients for {SLOW} servers that read nothing",
        held >> 20
    );
    for filter in [
        format!("sport = :{}", f.addr("bulk").port()),
        format!("dport = :{}", server.port()),
    ] {
        let bufs = socket_buffers(&filter);
        assert_eq!(bufs.len(), SLOW, "{filter}");
        for (rb, tb) in &bufs {
            assert!(
                *rb <= 512 << 10 && *tb <= 512 << 10,
                "{filter}: rb {rb} tb {tb}"
            );
        }
    }
    let mut other = connect(f.addr("echo")).await;
    echo_round_trip(&mut other, b"still here").await;
    go.notify_one();
    for _ in 0..SLOW {
        let n = within(4 * WAIT, "server reads everything", done_rx.recv())
            .await
            .unwrap();
        assert_eq!(n, PUSH);
    }
    for w in writers {
        within(WAIT, "writer done", w).await.unwrap();
    }
    assert_eq!(received.load(SeqCst), SLOW as u64 * PUSH);
}

/// The default buffers are "adaptive": capped while a peer has taken little (above: the
/// clients and servers that never read stay within the caps), handed to the kernel's
/// autotuning once a direction has delivered 4 MiB, so a bulk transfer is not held to the
/// caps. Only that direction's buffers are released (the source's receive buffer, the
/// destination's send buffer); buffers given a size stay at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adaptive_buffers_are_released_to_a_reading_peer_and_fixed_ones_stay() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    const CAP: u64 = 512 << 10; // 256 KiB, doubled by the kernel
    const CHUNK: u64 = 8 << 20;
    let received = Arc::new(AtomicU64::new(0));
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_addr = sink.local_addr().unwrap();
    {
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = sink.accept().await {
                let received = received.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 256 << 10];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        received.fetch_add(n as u64, SeqCst);
                    }
                });
            }
        });
    }
    let f = Ferry::start(
        &format!(
            r#"
[[listener]]
name = "adaptive"
listen = "127.0.0.1:0"
upstream = "adaptive"

[[listener]]
name = "fixed"
listen = "127.0.0.1:0"
upstream = "fixed"
tcp = {{ send_buffer = "256KiB", recv_buffer = "256KiB" }}

[[upstream]]
name = "adaptive"
servers = ["{sink_addr}"]

[[upstream]]
name = "fixed"
servers = ["{sink_addr}"]
tcp = {{ send_buffer = "256KiB", recv_buffer = "256KiB" }}
"#
        ),
        2,
    )
    .await;
    // ferry's two sockets of the one connection open at a time: (client side, server side).
    let sockets = |listener: &str| {
        let client = socket_buffers(&format!("sport = :{}", f.addr(listener).port()));
        let server = socket_buffers(&format!("dport = :{}", sink_addr.port()));
        assert_eq!(
            (client.len(), server.len()),
            (1, 1),
            "{client:?} {server:?}"
        );
        (client[0], server[0])
    };
    let block = vec![0x3cu8; CHUNK as usize];
    // Adaptive: push until the client socket's receive buffer and the server socket's send
    // buffer have grown past the cap (bounded: 64 chunks, 512 MiB).
    let mut c = connect(f.addr("adaptive")).await;
    let mut sent = 0;
    let mut released = false;
    for _ in 0..64 {
        within(WAIT, "push a chunk", c.write_all(&block))
            .await
            .unwrap();
        sent += CHUNK;
        let ((client_rb, client_tb), (server_rb, server_tb)) = sockets("adaptive");
        // The other direction carried nothing: its buffers stay capped.
        assert_eq!((client_tb, server_rb), (CAP, CAP), "down direction");
        if client_rb > CAP && server_tb > CAP {
            released = true;
            break;
        }
    }
    assert!(released, "{sent} bytes up and the buffers are still capped");
    c.shutdown().await.unwrap();
    drop(c);
    wait_until(WAIT, "the sink has everything", || {
        received.load(SeqCst) == sent
    })
    .await;
    wait_until(WAIT, "the connection is gone", || {
        socket_buffers(&format!("dport = :{}", sink_addr.port())).is_empty()
    })
    .await;
    // Fixed: as many bytes, and the caps hold.
    received.store(0, SeqCst);
    let mut c = connect(f.addr("fixed")).await;
    for _ in 0..sent / CHUNK {
        within(WAIT, "push a chunk", c.write_all(&block))
            .await
            .unwrap();
    }
    let (client, server) = sockets("fixed");
    assert_eq!((client, server), ((CAP, CAP), (CAP, CAP)), "fixed buffers");
    c.shutdown().await.unwrap();
    wait_until(WAIT, "the sink has everything", || {
        received.load(SeqCst) == sent
    })
    .await;
}

/// A DNS server that takes queries and never answers, on a loopback address of its own,
/// and a `resolv.conf` naming it. `wrapper()` runs ferry in a mount namespace where that
/// file is `/etc/resolv.conf`.
struct DeafResolver {
    sock: std::net::UdpSocket,
    dir: tempfile::TempDir,
}

impl DeafResolver {
    fn new() -> DeafResolver {
        let sock = std::net::UdpSocket::bind("127.83.0.1:53").expect("bind 127.83.0.1:53");
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // glibc would wait 30 s × 5 attempts: far beyond ferry's own lookup timeout.
        std::fs::write(
            dir.path().join("resolv.conf"),
            "nameserver 127.83.0.1\noptions timeout:30 attempts:5\n",
        )
        .unwrap();
        DeafResolver { sock, dir }
    }

    fn wrapper(&self) -> Vec<String> {
        let conf = self.dir.path().join("resolv.conf");
        vec![
            "unshare".into(),
            "-m".into(),
            "sh".into(),
            "-c".into(),
            format!(
                "mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
                conf.display()
            ),
        ]
    }

    /// Waits for a query for `label` (and leaves it unanswered).
    async fn query(&self, label: &'static str) -> bool {
        let sock = self.sock.try_clone().unwrap();
        tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 512];
            // Queries for other names (earlier lookups retrying, AAAA beside A) are skipped.
            for _ in 0..100 {
                let Ok((n, _)) = sock.recv_from(&mut b) else {
                    return false;
                };
                if b[..n].windows(label.len()).any(|w| w == label.as_bytes()) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap()
    }
}

/// A listener on `echo`, and with `named`, one more whose upstream is that name.
fn resolver_config(echo: std::net::SocketAddr, named: Option<&str>) -> String {
    let mut c = format!(
        r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#
    );
    if let Some(name) = named {
        c.push_str(&format!(
            r#"
[[listener]]
name = "{name}"
listen = "127.0.0.1:0"
upstream = "{name}"

[[upstream]]
name = "{name}"
servers = ["{name}.ferry-test:5432"]
"#
        ));
    }
    c
}

/// A resolver that never answers: a reload that needs it runs beside everything else.
/// Scrapes answer while it waits, connections are served, the lookup gives up after its
/// timeout (the reload then applies with the name unresolved), and a second SIGINT exits
/// even while a reload waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_that_never_answers_stalls_nothing() {
    let resolver = DeafResolver::new();
    let wrapper = resolver.wrapper();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let echo = echo_server().await;
    let mut f = Ferry::start_wrapped(&resolver_config(echo, None), 1, &wrapper).await;
    let admin = admin_addr(&f).await;
    let front = f.addr("front");

    // A reload naming a server only the deaf resolver could resolve.
    let log = f.log_path.display().to_string();
    let write = |name| {
        std::fs::write(
            &f.config_path,
            resolver_config(echo, Some(name)).replace("@LOG@", &log),
        )
        .unwrap()
    };
    write("named");
    f.signal("HUP");
    assert!(
        resolver.query("named").await,
        "ferry never asked the resolver"
    );

    // The lookup is pending: scrapes and connections do not wait for it.
    let text = metrics(admin).await;
    let reloads =
        |text: &str| metric(text, "ferry_config_reloads_total", &[("result", "ok")]).unwrap_or(0.0);
    assert_eq!(reloads(&text), 0.0, "the reload ended already:\n{text}");
    let mut c = connect(front).await;
    echo_round_trip(&mut c, b"served while the resolver hangs").await;
    let text = metrics(admin).await;
    assert_eq!(reloads(&text), 0.0, "the reload ended already:\n{text}");

    // The lookup gives up; the reload applies, keeping what it could not resolve empty.
    f.stderr
        .wait_count(1, 4 * WAIT, |l| {
            l.contains("cannot resolve named.ferry-test:5432") && l.contains("no answer within")
        })
        .await
        .unwrap_or_else(|| panic!("no lookup timeout; stderr:\n{}", f.stderr.text()));
    f.stderr
        .wait_count(1, WAIT, |l| l.contains("listener \"named\" added"))
        .await
        .unwrap_or_else(|| panic!("reload not applied; stderr:\n{}", f.stderr.text()));
    let named = f
        .stderr
        .all()
        .iter()
        .find_map(|l| {
            l.split_once("listener \"named\" listening on ")
                .and_then(|(_, a)| a.trim().parse::<std::net::SocketAddr>().ok())
        })
        .expect("the new listener's address");
    // No server: the client is closed, and the record says why.
    let _ = expect_closed_at_once(named, WAIT).await;
    let recs = f.records_with("no_server", 1, WAIT).await;
    assert_eq!(recs[0]["listener"], "named", "{recs:?}");

    // Another reload waits on the resolver again; a stop does not wait for it.
    write("other");
    f.signal("HUP");
    assert!(
        resolver.query("other").await,
        "ferry never asked the resolver again"
    );
    f.signal("INT");
    f.stderr
        .wait_count(1, WAIT, |l| l.contains("SIGINT"))
        .await
        .expect("SIGINT seen");
    f.signal("INT");
    let st = f
        .wait_exit(WAIT)
        .await
        .unwrap_or_else(|| panic!("no exit on a second SIGINT; stderr:\n{}", f.stderr.text()));
    assert_eq!(st.code(), Some(0), "stderr:\n{}", f.stderr.text());
    // The open connection was closed, and logged, on the way out; the reload never applied.
    let (_, _how) = read_until_closed(&mut c, WAIT).await;
    let text = f.stderr.text();
    assert!(!text.contains("listener \"other\" added"), "{text}");
    let recs = parse_records(&f.log_lines_now());
    assert!(
        recs.iter()
            .any(|r| r["listener"] == "front" && r["result"] == "drained"),
        "{recs:#?}"
    );
}

/// An access log nobody reads (a FIFO whose reader never reads): connections are still
/// served, reloads (which reopen the log and let go of the old one) still finish, scrapes
/// answer, and a stop still exits, saying the log could not be flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_access_log_writer_blocks_nothing() {
    use rustix::fs::{Mode, OFlags};
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    // Held open for reading (so ferry's writes do not fail) and never read; the smallest
    // pipe, so that it fills after a few records.
    let reader = rustix::fs::open(&fifo, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()).unwrap();
    let size = rustix::pipe::fcntl_setpipe_size(&reader, 4096).unwrap();
    let echo = echo_server().await;
    let mut f = Ferry::start(
        &format!(
            r#"
[log]
access = "{}"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#,
            fifo.display()
        ),
        1,
    )
    .await;
    let admin = admin_addr(&f).await;
    let front = f.addr("front");

    // Connections until the writer thread is blocked writing to the full pipe.
    let writer_blocked = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                let read = |f: &str| std::fs::read_to_string(t.path().join(f)).unwrap_or_default();
                read("comm").starts_with("ferry-access") && read("wchan").ends_with("pipe_write")
            })
    };
    let mut full = false;
    for _ in 0..1000 {
        let mut c = connect(front).await;
        echo_round_trip(&mut c, b"fill the log").await;
        drop(c);
        if writer_blocked(f.pid()) {
            full = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        full,
        "the access log writer never blocked: {} bytes in the pipe of {size}",
        rustix::io::ioctl_fionread(&reader).unwrap(),
    );

    for round in 0..3 {
        for _ in 0..50 {
            let mut c = connect(front).await;
            echo_round_trip(&mut c, b"served with the log stalled").await;
        }
        // A reload reopens the log file and lets go of the stalled one.
        f.signal("HUP");
        f.stderr
            .wait_count(round + 1, WAIT, |l| l.contains("reload: nothing changed"))
            .await
            .unwrap_or_else(|| {
                panic!(
                    "reload {round} never finished; stderr:\n{}",
                    f.stderr.text()
                )
            });
        let text = metrics(admin).await;
        assert!(text.contains("ferry_access_log_dropped_total"), "{text}");
    }

    f.signal("TERM");
    let st = f
        .wait_exit(3 * WAIT)
        .await
        .unwrap_or_else(|| panic!("no exit with the log stalled; stderr:\n{}", f.stderr.text()));
    assert_eq!(st.code(), Some(0), "stderr:\n{}", f.stderr.text());
    assert!(
        f.stderr.text().contains("could not be flushed"),
        "{}",
        f.stderr.text()
    );
    drop(reader);
}

/// Round trips on one connection until `stop`; each checks what came back. Returns the
/// round trips made, or the first failure.
async fn keep_talking(
    mut c: tokio::net::TcpStream,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tag: usize,
) -> Result<u64, String> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut n = 0u64;
    while !stop.load(Relaxed) {
        let msg = format!("long {tag} {n}\n");
        let mut got = vec![0u8; msg.len()];
        let r = tokio::time::timeout(WAIT, async {
            c.write_all(msg.as_bytes()).await?;
            c.read_exact(&mut got).await
        })
        .await;
        match r {
            Ok(Ok(_)) if got == msg.as_bytes() => n += 1,
            Ok(Ok(_)) => return Err(format!("{tag}: wrong bytes after {n}")),
            Ok(Err(e)) => return Err(format!("{tag}: {e} after {n}")),
            Err(_) => return Err(format!("{tag}: no answer within {WAIT:?} after {n}")),
        }
        tokio::task::yield_now().await;
    }
    Ok(n)
}

/// New connections, one after another, until `stop`: each makes a round trip and closes.
async fn keep_connecting(
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tag: usize,
) -> Result<u64, String> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut n = 0u64;
    while !stop.load(Relaxed) {
        let msg = format!("short {tag} {n}\n");
        let r = tokio::time::timeout(WAIT, async {
            let mut c = tokio::net::TcpStream::connect(addr).await?;
            c.write_all(msg.as_bytes()).await?;
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).await?;
            Ok::<_, std::io::Error>(got)
        })
        .await;
        match r {
            Ok(Ok(got)) if got == msg.as_bytes() => n += 1,
            Ok(Ok(_)) => return Err(format!("{tag}: wrong bytes on connection {n}")),
            Ok(Err(e)) => return Err(format!("{tag}: connection {n}: {e}")),
            Err(_) => return Err(format!("{tag}: connection {n}: no answer within {WAIT:?}")),
        }
    }
    Ok(n)
}

/// 100 reloads under load (each changes the pool, its balancing and the listener's
/// settings, and reopens the access log): no connection is refused or broken, open ones
/// carry on, and descriptors and memory come back to where they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_under_load() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    const RELOADS: usize = 100;
    const LONG: usize = 20;
    const SHORT: usize = 4;
    let (e1, e2) = (echo_server().await, echo_server().await);
    let config = |i: usize| {
        let servers = if i.is_multiple_of(2) {
            format!("\"{e1}\"")
        } else {
            format!("\"{e1}\", \"{e2}\"")
        };
        let balance = ["round_robin", "least_conn", "p2c"][i % 3];
        format!(
            r#"
[global]
workers = 2

[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "pool"
idle_timeout = "{}s"

[[upstream]]
name = "pool"
balance = "{balance}"
servers = [{servers}]
"#,
            60 + i % 2
        )
    };
    let f = Ferry::start(&config(0), 1).await;
    let admin = admin_addr(&f).await;
    let front = f.addr("front");
    let pid = f.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let mut long = Vec::new();
    for i in 0..LONG {
        let mut c = connect(front).await;
        echo_round_trip(&mut c, b"open").await;
        long.push(tokio::spawn(keep_talking(c, stop.clone(), i)));
    }
    let short: Vec<_> = (0..SHORT)
        .map(|i| tokio::spawn(keep_connecting(front, stop.clone(), i)))
        .collect();
    // Warm: every worker has served, the log is open, the pools are up.
    let fds_before = fd_count(pid);
    let rss_before = f.rss_kib();

    let log = f.log_path.display().to_string();
    for i in 1..=RELOADS {
        std::fs::write(&f.config_path, config(i).replace("@LOG@", &log)).unwrap();
        let r = post(admin, "/api/reload", None).await;
        assert_eq!(r.status, 200, "reload {i}: {r:?}");
        assert_eq!(r.json()["result"], "applied", "reload {i}: {r:?}");
    }

    stop.store(true, Relaxed);
    let mut talked = 0;
    for t in long {
        talked += t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("a long connection broke: {e}"));
    }
    let mut connected = 0;
    for t in short {
        connected += t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("a new connection failed: {e}"));
    }
    assert!(talked >= LONG as u64 && connected >= SHORT as u64);
    eprintln!(
        "{RELOADS} reloads; {talked} round trips on open connections, {connected} new connections"
    );

    // The short connections have ended: descriptors come back to where they were (the
    // long ones are still open), within a few for the log and admin connections.
    let settled = within(WAIT, "descriptors back to before the storm", async {
        loop {
            let n = fd_count(pid);
            if n <= fds_before + 4 {
                return n;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let rss_after = f.rss_kib();
    eprintln!("descriptors {fds_before} -> {settled}; RSS {rss_before} KiB -> {rss_after} KiB");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {RELOADS} reloads"
    );
    let text = metrics(admin).await;
    assert_eq!(
        metric(&text, "ferry_config_reloads_total", &[("result", "ok")]),
        Some(RELOADS as f64)
    );
}

/// Refused connections of listener `name` the process log says were counted but not logged
/// one by one.
fn unlogged(stderr: &str, name: &str) -> usize {
    stderr
        .lines()
        .filter(|l| {
            l.contains("were counted but not logged") && l.contains(&format!("listener={name}"))
        })
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "refused")?;
            words.get(i.checked_sub(1)?)?.parse::<usize>().ok()
        })
        .sum()
}

/// 300 clients stalled in the middle of their handshake on each listener that reads one
/// (TLS termination, SNI routing, a PROXY header, SOCKS5, HTTP CONNECT): ferry holds them
/// until `handshake_timeout` and no longer, closes each with a record, serves other clients
/// meanwhile, and gives every descriptor back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_are_closed_at_the_deadline() {
    const STALLED: usize = 300;
    const DEADLINE_MS: f64 = 2000.0;
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new("ferry stall test CA");
    let (cert, key) = ca.server(&["stall.test"]).write(dir.path(), "server");
    let echo = echo_server().await;
    let config = format!(
        r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "plain"
listen = "127.0.0.1:0"
upstream = "echo"

[[listener]]
name = "tls"
listen = "127.0.0.1:0"
mode = "tls"
upstream = "echo"
handshake_timeout = "2s"
tls = {{ cert = "{}", key = "{}" }}

[[listener]]
name = "sni"
listen = "127.0.0.1:0"
upstream = "echo"
handshake_timeout = "2s"

[[listener.route]]
sni = "stall.test"
upstream = "echo"

[[listener]]
name = "proxy"
listen = "127.0.0.1:0"
upstream = "echo"
proxy_protocol = {{ accept = "any", trusted = ["127.0.0.1"], timeout = "2s" }}

[[listener]]
name = "socks"
listen = "127.0.0.1:0"
mode = "socks5"
handshake_timeout = "2s"
destinations = ["{}/32:{}"]

[[listener]]
name = "http"
listen = "127.0.0.1:0"
mode = "http-connect"
handshake_timeout = "2s"
destinations = ["{}/32:{}"]

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#,
        cert.display(),
        key.display(),
        echo.ip(),
        echo.port(),
        echo.ip(),
        echo.port(),
    );
    let f = Ferry::start(&config, 6).await;
    let pid = f.pid();
    let mut plain = connect(f.addr("plain")).await;
    echo_round_trip(&mut plain, b"warm").await;
    let fds_before = fd_count(pid);

    // What each stalled client sends: part of its handshake, then nothing.
    let hello = pki::client_hello(Some("stall.test"), &[]);
    let half_hello = hello[..hello.len() / 2].to_vec();
    let stalls: [(&str, Vec<u8>); 5] = [
        ("tls", half_hello.clone()),
        ("sni", half_hello),
        ("proxy", b"PROXY TCP4 127.0.0.1 ".to_vec()),
        // A greeting offering two methods, with one.
        ("socks", vec![5, 2, 0]),
        (
            "http",
            b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n".to_vec(),
        ),
    ];
    let mut stalled = Vec::new();
    for (name, first) in &stalls {
        let addr = f.addr(name);
        for _ in 0..STALLED {
            let mut s = connect(addr).await;
            s.write_all(first).await.unwrap();
            stalled.push((*name, s));
        }
    }
    // Ferry holds them all (a descriptor each)...
    within(WAIT, "every stalled client accepted", async {
        while fd_count(pid) < fds_before + stalls.len() * STALLED {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    // ...and serves others meanwhile: a plain client and one with a whole PROXY header.
    echo_round_trip(&mut plain, b"served while 1,500 stall").await;
    let mut proxied = connect(f.addr("proxy")).await;
    proxied
        .write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 80\r\n")
        .await
        .unwrap();
    echo_round_trip(&mut proxied, b"a whole header").await;

    // Every stalled client is closed, without a byte of data from a server.
    for (name, s) in &mut stalled {
        let (data, _how) = read_until_closed(s, 3 * WAIT).await;
        // A TLS client may get an alert; none gets data from the server.
        assert!(
            *name == "tls" || data.is_empty(),
            "{name}: got {data:?} before the close"
        );
    }
    drop(stalled);
    // Every one is accounted for: counted in the metrics, and logged one by one (refusals
    // beyond 100 a second per listener are summed up on the process log instead), each
    // record written at the deadline, not before.
    let admin = admin_addr(&f).await;
    let text = metrics(admin).await;
    for (name, _) in &stalls {
        assert_eq!(
            metric(
                &text,
                "ferry_connections_total",
                &[("listener", name), ("result", "protocol_error")]
            ),
            Some(STALLED as f64),
            "{name}:\n{text}"
        );
    }
    let accounted = |name: &str| {
        let logged: Vec<serde_json::Value> = parse_records(&f.log_lines_now())
            .into_iter()
            .filter(|r| r["listener"] == name)
            .collect();
        (logged, unlogged(&f.stderr.text(), name))
    };
    within(
        3 * WAIT,
        "every stalled client logged or summed up",
        async {
            while stalls.iter().any(|(name, _)| {
                let (logged, unlogged) = accounted(name);
                logged.len() + unlogged < STALLED
            }) {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        },
    )
    .await;
    for (name, _) in &stalls {
        let (logged, unlogged) = accounted(name);
        assert_eq!(logged.len() + unlogged, STALLED, "{name}");
        for r in logged {
            assert_eq!(r["result"], "protocol_error", "{name}: {r}");
            assert!(r["server"].is_null(), "{name}: reached a server: {r}");
            let ms = r["duration_ms"].as_f64().unwrap();
            assert!(
                ms >= DEADLINE_MS * 0.99,
                "{name}: closed after {ms} ms: {r}"
            );
        }
    }
    // Every descriptor given back (the two served clients are still open).
    let settled = within(WAIT, "descriptors back to the baseline", async {
        loop {
            let n = fd_count(pid);
            if n <= fds_before + 2 * 2 {
                return n;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    eprintln!("descriptors: {fds_before} before, {settled} after");
    echo_round_trip(&mut plain, b"after").await;
}

/// A connection flood from 200 source addresses against per-client limits (2 open
/// connections each): each source gets exactly its 2, the rest are refused at once; a
/// client from elsewhere is served throughout; ferry's memory stays bounded; and every
/// connection is accounted for, in the metrics and in the log (refusals beyond 100 a second
/// summed up on the process log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_from_200_sources_against_per_client_limits() {
    const SOURCES: usize = 200;
    const EACH: usize = 10;
    const ALLOWED: usize = 2;
    let echo = echo_server().await;
    let f = Ferry::start(
        &format!(
            r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "echo"
per_client = {{ max_connections = {ALLOWED} }}

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#
        ),
        1,
    )
    .await;
    let admin = admin_addr(&f).await;
    let front = f.addr("front");
    let mut other = served_from("127.2.0.1", front, "before").await;
    let rss_before = f.rss_kib();

    // Each source: EACH connections, one after another, holding those that are served.
    let flood: Vec<_> = (0..SOURCES)
        .map(|i| {
            tokio::spawn(async move {
                let src = format!("127.1.{}.{}", i / 250, i % 250 + 1);
                let mut held = Vec::new();
                let mut refused = 0;
                for n in 0..EACH {
                    let (_, r) = connect_src(&src, front).await;
                    let Ok(mut s) = r else {
                        refused += 1;
                        continue;
                    };
                    let msg = format!("{src} {n}\n");
                    let served = tokio::time::timeout(WAIT, async {
                        s.write_all(msg.as_bytes()).await?;
                        let mut got = vec![0u8; msg.len()];
                        s.read_exact(&mut got).await?;
                        Ok::<bool, std::io::Error>(got == msg.as_bytes())
                    })
                    .await;
                    match served {
                        Ok(Ok(true)) => held.push(s),
                        Ok(Ok(false)) => panic!("{src}: wrong bytes"),
                        Ok(Err(_)) => refused += 1,
                        Err(_) => panic!("{src}: connection {n} neither served nor closed"),
                    }
                }
                (held, refused)
            })
        })
        .collect();
    // Meanwhile, the other client is answered.
    echo_round_trip(&mut other, b"during the flood").await;
    let mut held = Vec::new();
    let mut refused = 0;
    for t in flood {
        let (h, r) = within(3 * WAIT, "a source's connections", t).await.unwrap();
        assert_eq!(h.len(), ALLOWED, "a source was served {} times", h.len());
        held.extend(h);
        refused += r;
    }
    assert_eq!(refused, SOURCES * (EACH - ALLOWED));
    echo_round_trip(&mut other, b"after the flood").await;
    let rss_after = f.rss_kib();
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS {rss_before} KiB before the flood, {rss_after} KiB after"
    );

    // Counted: every refusal at once.
    let text = metrics(admin).await;
    assert_eq!(
        metric(
            &text,
            "ferry_connections_total",
            &[("listener", "front"), ("result", "limited")]
        ),
        Some(refused as f64),
        "{text}"
    );
    // Logged: the served ones when they end, the refused ones one by one or summed up.
    drop(held);
    drop(other);
    let served = SOURCES * ALLOWED + 1;
    within(3 * WAIT, "every connection in the log", async {
        loop {
            let recs = parse_records(&f.log_lines_now());
            let ok = recs.iter().filter(|r| r["result"] == "ok").count();
            let limited = recs.iter().filter(|r| r["result"] == "limited").count();
            if ok == served && limited + unlogged(&f.stderr.text(), "front") == refused {
                break;
            }
            assert!(
                ok <= served && limited <= refused,
                "more records than connections"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Sets the soft open-file limit of process `pid` (the hard one stays).
fn set_nofile(pid: u32, n: usize) {
    let st = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:"))
        .status()
        .expect("run prlimit");
    assert!(st.success(), "prlimit failed");
}

/// The descriptor limit reached on connect: ferry accepts a client with its last free
/// descriptor, cannot open a socket to the server, closes the client with a record that
/// says why, and serves again as soon as descriptors are available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_limit_on_connect_fails_that_connection_only() {
    let echo = echo_server().await;
    let f = Ferry::start(&echo_config("", echo), 1).await;
    let front = f.addr("front");
    let pid = f.pid();
    // Warm: pipes for splicing are made and pooled, so the count below is stable.
    for _ in 0..3 {
        let mut c = connect(front).await;
        echo_round_trip(&mut c, b"warm").await;
    }
    let recs = f.records(3, WAIT).await;
    assert_eq!(recs.len(), 3);
    // One descriptor left: enough to accept a client, none for its server socket. The
    // limit bounds descriptor numbers, and a new descriptor takes the lowest free one:
    // a limit of that number + 1 leaves exactly it.
    let used: std::collections::BTreeSet<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !used.contains(n)).unwrap();
    set_nofile(pid, lowest_free + 1);
    let (client, r) = connect_from(front).await;
    // Reset at once: maybe before the connect call even returned.
    if let Ok(mut c) = r {
        let _ = c.write_all(b"no server for me").await;
        let (data, _) = read_until_closed(&mut c, WAIT).await;
        assert!(data.is_empty());
    }
    let recs = f.records(4, WAIT).await;
    let r = record_for(&recs, client);
    assert_eq!(r["result"], "connect_failed", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("Too many open files"), "{r}");

    // Descriptors again: served.
    set_nofile(pid, lowest_free + 100);
    let mut c = connect(front).await;
    echo_round_trip(&mut c, b"served again").await;
}
