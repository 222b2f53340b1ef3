//! UDP listeners (`protocol = "udp"`) through the real binary: DNS with dig and kdig to a
//! real dnsmasq, iperf3 -u, echoes from many clients with one backend session each,
//! per-client limits, maglev stickiness across sessions, passive marking on ICMP
//! unreachable, UDP health checks, the PROXY header, IPv6 and the largest datagram,
//! reload and drain, the metrics and status, and datagrams crossing a veth pair with MTU
//! 1500.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::dns::{Dnsmasq, dig, kdig};
use crate::common::*;
use crate::ops_support::{admin_addr, metric_must, metrics, server_status, status};
use serde_json::Value;
use tokio::net::UdpSocket;

/// Large enough for any datagram.
const MAX: usize = 65_536;

/// A UDP server on `ip` that answers every datagram with `tag` (if any) and the datagram,
/// and remembers every peer it heard from (ferry's session sockets).
async fn udp_server(ip: &str, tag: Option<u8>) -> (SocketAddr, Arc<Mutex<HashSet<SocketAddr>>>) {
    let s = UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = s.local_addr().unwrap();
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let p = peers.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX];
        let mut out = Vec::with_capacity(MAX + 1);
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            p.lock().unwrap().insert(from);
            out.clear();
            out.extend(tag);
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, from).await;
        }
    });
    (addr, peers)
}

/// A loopback port free for both TCP and UDP right now.
fn free_port() -> u16 {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// A UDP address nothing listens on (sending there gets ICMP port unreachable).
fn gone_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A client socket on `ip`, connected to `to` (so it takes datagrams from `to` only).
async fn client(ip: &str, to: SocketAddr) -> UdpSocket {
    let c = UdpSocket::bind((ip, 0)).await.unwrap();
    c.connect(to).await.unwrap();
    c
}

/// Sends `msg` and returns the reply.
async fn ask(c: &UdpSocket, msg: &[u8]) -> Vec<u8> {
    c.send(msg).await.unwrap();
    let mut buf = vec![0u8; MAX];
    let n = within(WAIT, "a reply", c.recv(&mut buf)).await.unwrap();
    buf.truncate(n);
    buf
}

/// A UDP listener `udp` in front of upstream `u`, with `listener` and `upstream` extra keys,
/// an admin server and the access log in the test folder.
fn udp_config(listen: &str, listener: &str, upstream: &str, servers: &[SocketAddr]) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "udp"
protocol = "udp"
listen = ["{listen}"]
upstream = "u"
{listener}

[[upstream]]
name = "u"
servers = [{}]
{upstream}
"#,
        servers.join(", ")
    )
}

/// `config` with `[global] io_uring` set.
fn sending(io_uring: bool, config: String) -> String {
    format!("[global]\nio_uring = {io_uring}\n{config}")
}

/// The records with `"listener": "udp"`.
fn udp_records(records: &[Value]) -> Vec<&Value> {
    records.iter().filter(|r| r["listener"] == "udp").collect()
}

/// 10 clients × 100 datagrams of 1 to 1,400 bytes: every one comes back unchanged to its
/// sender, each client has exactly one backend session (one ferry socket seen by the
/// server), and each session's record counts its 100 datagrams each way.
#[tokio::test]
async fn ten_clients_each_get_their_echoes_over_one_session() {
    // Datagrams sent through io_uring, then with sendmmsg (`[global] io_uring`).
    for io_uring in [true, false] {
        let (echo, peers) = udp_server("127.0.0.1", None).await;
        let ferry = Ferry::start(
            &sending(
                io_uring,
                udp_config("127.0.0.1:0", "idle_timeout = \"1s\"", "", &[echo]),
            ),
            1,
        )
        .await;
        let admin = admin_addr(&ferry).await;
        let front = ferry.addr("udp");
        let mut clients = Vec::new();
        for _ in 0..10 {
            clients.push(client("127.0.0.1", front).await);
        }
        let mut sent = [0u64; 10];
        for i in 0..100usize {
            for (k, c) in clients.iter().enumerate() {
                let len = 1 + (i * 37 + k * 101) % 1400;
                let msg: Vec<u8> = (0..len).map(|j| (j + i * 3 + k) as u8).collect();
                assert_eq!(ask(c, &msg).await, msg, "client {k}, datagram {i}");
                sent[k] += len as u64;
            }
        }
        assert_eq!(
            peers.lock().unwrap().len(),
            10,
            "one backend session per client"
        );
        let m = metrics(admin).await;
        assert_eq!(
            metric_must(&m, "ferry_udp_sessions_active", &[("listener", "udp")]),
            10.0
        );
        assert_eq!(
            metric_must(
                &m,
                "ferry_udp_datagrams_total",
                &[("listener", "udp"), ("direction", "up")]
            ),
            1000.0
        );
        assert_eq!(
            metric_must(
                &m,
                "ferry_udp_datagrams_total",
                &[("listener", "udp"), ("direction", "down")]
            ),
            1000.0
        );
        // The sessions end at their idle timeout: one record each.
        let records = ferry.records(10, WAIT).await;
        let records = udp_records(&records);
        assert_eq!(records.len(), 10);
        for r in records {
            assert_eq!(r["result"], "idle_timeout", "{r}");
            assert_eq!(
                (r["datagrams_up"].as_u64(), r["datagrams_down"].as_u64()),
                (Some(100), Some(100))
            );
            let client: SocketAddr = r["client"].as_str().unwrap().parse().unwrap();
            let k = clients
                .iter()
                .position(|c| c.local_addr().unwrap() == client)
                .expect("a record of one of the clients");
            assert_eq!(r["bytes_up"].as_u64(), Some(sent[k]));
            assert_eq!(r["bytes_down"].as_u64(), Some(sent[k]));
            assert_eq!(r["upstream"], "u");
            assert_eq!(r["server"], echo.to_string());
        }
        let st = status(admin).await;
        let l = &st["listeners"][0];
        assert_eq!(l["mode"], "udp");
        assert_eq!(l["udp"]["sessions_active"], 0);
        assert_eq!(l["udp"]["datagrams_up"], 1000);
        assert_eq!(l["results"]["idle_timeout"], 10);
        assert_eq!(l["routes"][0]["matches"], 10, "one match per session: {l}");
    }
}

/// dnsmasq answering `*.udp.test` with 10.11.12.13 from its own data.
fn dnsmasq() -> (Dnsmasq, SocketAddr) {
    let d = Dnsmasq::start(
        None,
        &["--address=/udp.test/10.11.12.13".to_string()],
        ("ready.udp.test", "10.11.12.13"),
    );
    let addr = d.addr();
    (d, addr)
}

/// DNS through ferry with `responses = 1`: dig and kdig get the real server's answers, and
/// each query is a session that ends `ok` at its answer (one datagram each way), so no
/// session is left open.
#[tokio::test]
async fn dns_with_dig_and_kdig_to_dnsmasq_one_session_per_query() {
    let (_dns, dns) = dnsmasq();
    let ferry = Ferry::start(&udp_config("127.0.0.1:0", "responses = 1", "", &[dns]), 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("udp");
    let names = ["a.udp.test", "b.udp.test", "c.udp.test"];
    for n in names {
        assert_eq!(dig(front, n, 2).as_deref(), Some("10.11.12.13"), "dig {n}");
        assert_eq!(kdig(front, n).as_deref(), Some("10.11.12.13"), "kdig {n}");
    }
    let records = ferry.records(6, WAIT).await;
    let records = udp_records(&records);
    assert_eq!(records.len(), 6);
    for r in &records {
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(
            (r["datagrams_up"].as_u64(), r["datagrams_down"].as_u64()),
            (Some(1), Some(1))
        );
    }
    let m = metrics(admin).await;
    assert_eq!(
        metric_must(&m, "ferry_udp_sessions_active", &[("listener", "udp")]),
        0.0
    );
    assert_eq!(
        metric_must(
            &m,
            "ferry_connections_total",
            &[("listener", "udp"), ("result", "ok")]
        ),
        6.0
    );
}

/// iperf3 over UDP through ferry: its control connection through a TCP listener and its
/// datagrams through a UDP listener on the same port. Every datagram the client sent
/// reaches the server, counted by ferry as the server counts them.
#[tokio::test]
async fn iperf3_udp_through_ferry() {
    // A port another test's connection may take meanwhile: then iperf3 exits, and another
    // port is tried.
    let mut started = None;
    for _ in 0..10 {
        let port = free_port();
        let mut server = Command::new("iperf3")
            .args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run iperf3");
        within(WAIT, "iperf3 -s listening or gone", async {
            while !tcp_listening(port) && server.try_wait().unwrap().is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        if tcp_listening(port) {
            started = Some((server, port));
            break;
        }
        let _ = server.wait();
    }
    let (mut server, port) = started.expect("iperf3 -s on a free port");
    let iperf: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let front_port = free_port();
    let config = format!(
        r#"
[log]
access = "@LOG@"
[[listener]]
name = "ctl"
listen = ["127.0.0.1:{front_port}"]
upstream = "ctl"
[[listener]]
name = "udp"
protocol = "udp"
listen = ["127.0.0.1:{front_port}"]
upstream = "data"
idle_timeout = "2s"
[[upstream]]
name = "ctl"
servers = ["{iperf}"]
[[upstream]]
name = "data"
servers = ["{iperf}"]
"#
    );
    let ferry = Ferry::start(&config, 2).await;
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args([
                "60",
                "iperf3",
                "-c",
                "127.0.0.1",
                "-p",
                &front_port.to_string(),
                "-u",
                "-b",
                "20M",
                "-l",
                "1200",
                "-t",
                "2",
                "--json",
            ])
            .output()
            .expect("run iperf3 -c")
    })
    .await
    .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 -c: {e}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(report["error"].is_null(), "{}", report["error"]);
    let sum = &report["end"]["sum"];
    let packets = sum["packets"].as_u64().expect("packets");
    let lost = sum["lost_packets"].as_u64().expect("lost_packets");
    assert!(packets > 1000, "{sum}");
    assert_eq!(lost, 0, "datagrams lost through ferry: {sum}");
    // The data session's record: at least the test's datagrams went up.
    let records = ferry.records(2, Duration::from_secs(20)).await;
    let data = udp_records(&records);
    let up: u64 = data.iter().filter_map(|r| r["datagrams_up"].as_u64()).sum();
    assert!(
        up >= packets,
        "ferry relayed {up} datagrams up, iperf3 counted {packets}"
    );
}

/// Some IPv4 socket on this machine listens on TCP `port` (from /proc/net/tcp; a probe
/// connection would be taken for a test by `iperf3 -s -1`).
fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    let text = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// `per_client = { max_sessions = 2 }`: a third session of one client address is refused,
/// its datagram dropped (counted, logged `limited`) and never answered, while the first
/// two keep working; another client address is not affected.
#[tokio::test]
async fn per_client_session_limit() {
    let (echo, _) = udp_server("127.0.0.1", None).await;
    let ferry = Ferry::start(
        &udp_config(
            "0.0.0.0:0",
            "per_client = { max_sessions = 2 }",
            "",
            &[echo],
        ),
        1,
    )
    .await;
    let admin = admin_addr(&ferry).await;
    let front: SocketAddr = format!("127.0.0.1:{}", ferry.addr("udp").port())
        .parse()
        .unwrap();
    let a = client("127.0.0.2", front).await;
    let b = client("127.0.0.2", front).await;
    assert_eq!(ask(&a, b"a").await, b"a");
    assert_eq!(ask(&b, b"b").await, b"b");
    let third = client("127.0.0.2", front).await;
    third.send(b"c").await.unwrap();
    let dropped = |m: &str| {
        metric_must(
            m,
            "ferry_udp_dropped_total",
            &[("listener", "udp"), ("reason", "client_limit")],
        )
    };
    let mut m = metrics(admin).await;
    for _ in 0..500 {
        if dropped(&m) >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = metrics(admin).await;
    }
    assert_eq!(dropped(&m), 1.0);
    let limited = ferry.records_with("limited", 1, WAIT).await;
    assert_eq!(
        limited[0]["client"],
        third.local_addr().unwrap().to_string()
    );
    assert_eq!(ask(&a, b"a again").await, b"a again");
    let other = client("127.0.0.3", front).await;
    assert_eq!(ask(&other, b"other").await, b"other");
    let mut buf = [0u8; 16];
    assert!(
        third.try_recv(&mut buf).is_err(),
        "the refused client got an answer"
    );
}

/// `balance = "maglev"`: each client address's sessions (one per query, `responses = 1`)
/// all go to one server, chosen by the client's IP; the clients spread over the servers.
#[tokio::test]
async fn maglev_keeps_a_client_on_one_server_across_sessions() {
    let mut servers = Vec::new();
    for tag in 0..3u8 {
        servers.push(udp_server("127.0.0.1", Some(tag)).await.0);
    }
    let ferry = Ferry::start(
        &udp_config(
            "0.0.0.0:0",
            "responses = 1",
            "balance = \"maglev\"",
            &servers,
        ),
        1,
    )
    .await;
    let front: SocketAddr = format!("127.0.0.1:{}", ferry.addr("udp").port())
        .parse()
        .unwrap();
    let mut chosen: HashMap<String, HashSet<u8>> = HashMap::new();
    for host in 1..=16u8 {
        let ip = format!("127.0.1.{host}");
        for i in 0..5u8 {
            // A new source port each time: a new session.
            let c = client(&ip, front).await;
            let reply = ask(&c, &[i; 8]).await;
            assert_eq!(&reply[1..], &[i; 8]);
            chosen.entry(ip.clone()).or_default().insert(reply[0]);
        }
    }
    for (ip, s) in &chosen {
        assert_eq!(s.len(), 1, "{ip} went to servers {s:?}");
    }
    let used: HashSet<u8> = chosen.values().flatten().copied().collect();
    assert!(used.len() > 1, "16 clients all on one server: {used:?}");
}

/// A server that has gone (ICMP port unreachable) ends its session `connect_failed` and,
/// with passive health, is marked down: the sessions after it all go to the server that
/// answers.
#[tokio::test]
async fn unreachable_server_is_passively_marked_down() {
    let (echo, _) = udp_server("127.0.0.1", None).await;
    let gone = gone_udp();
    let upstream = "[upstream.health]\nactive = false\npassive = { failures = 1, eject = \"1h\" }";
    let ferry = Ferry::start(
        &udp_config("127.0.0.1:0", "responses = 1", upstream, &[gone, echo]),
        1,
    )
    .await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("udp");
    // Round robin: the first or second session goes to the gone server.
    for i in 0..2u8 {
        let c = client("127.0.0.1", front).await;
        c.send(&[i]).await.unwrap();
    }
    let failed = ferry.records_with("connect_failed", 1, WAIT).await;
    assert_eq!(failed[0]["server"], gone.to_string());
    assert!(
        failed[0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("refused"),
        "{}",
        failed[0]
    );
    let st = status(admin).await;
    assert_eq!(server_status(&st, "u", gone)["state"], "down");
    for i in 0..6u8 {
        let c = client("127.0.0.1", front).await;
        assert_eq!(ask(&c, &[i; 3]).await, [i; 3]);
    }
    let records = ferry.records(8, WAIT).await;
    let failed = records
        .iter()
        .filter(|r| r["result"] == "connect_failed")
        .count();
    assert_eq!(failed, 1, "only the first session went to the gone server");
}

/// Active UDP health checks: `send_hex` as a datagram, the reply must start with
/// `expect_hex`. A server that answers otherwise, and one that does not answer, are marked
/// down; sessions go to the one that answers as expected.
#[tokio::test]
async fn udp_health_checks_send_and_expect() {
    let (good, _) = udp_server("127.0.0.1", None).await;
    let (wrong, _) = udp_server("127.0.0.1", Some(0xee)).await;
    let gone = gone_udp();
    let upstream = "[upstream.health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\nsend_hex = \"c0ffee 00\"\nexpect_hex = \"c0ff\"";
    let ferry = Ferry::start(
        &udp_config("127.0.0.1:0", "", upstream, &[good, wrong, gone]),
        1,
    )
    .await;
    let admin = admin_addr(&ferry).await;
    let mut down = false;
    for _ in 0..500 {
        let st = status(admin).await;
        if server_status(&st, "u", wrong)["state"] == "down"
            && server_status(&st, "u", gone)["state"] == "down"
        {
            assert_eq!(server_status(&st, "u", good)["state"], "up");
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(down, "the wrong and the gone servers were not marked down");
    let front = ferry.addr("udp");
    for i in 0..4u8 {
        let c = client("127.0.0.1", front).await;
        assert_eq!(ask(&c, &[i]).await, [i], "answered by the healthy server");
    }
}

/// `proxy_protocol = { send = "v2", every = true }`: the server sees a PROXY v2 header
/// (DGRAM, the client's address) before every datagram; with `send = "v2"` alone, before
/// a session's first only.
#[tokio::test]
async fn proxy_v2_header_on_datagrams() {
    // Datagrams sent through io_uring, then with sendmmsg (`[global] io_uring`).
    for io_uring in [true, false] {
        for every in [true, false] {
            let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let upstream = format!("proxy_protocol = {{ send = \"v2\", every = {every} }}");
            let ferry = Ferry::start(
                &sending(
                    io_uring,
                    udp_config(
                        "127.0.0.1:0",
                        "",
                        &upstream,
                        &[server.local_addr().unwrap()],
                    ),
                ),
                1,
            )
            .await;
            let c = client("127.0.0.1", ferry.addr("udp")).await;
            let mut buf = vec![0u8; MAX];
            for (i, msg) in [&b"first"[..], b"second"].iter().enumerate() {
                c.send(msg).await.unwrap();
                let (n, _) = within(WAIT, "a datagram", server.recv_from(&mut buf))
                    .await
                    .unwrap();
                let got = &buf[..n];
                if i == 0 || every {
                    assert_eq!(&got[..12], b"\r\n\r\n\0\r\nQUIT\n", "a v2 signature");
                    assert_eq!((got[12], got[13]), (0x21, 0x12), "v2 PROXY, IPv4 DGRAM");
                    // 16 bytes, then 12 of IPv4 addresses and ports.
                    let src_port = u16::from_be_bytes([got[24], got[25]]);
                    assert_eq!(src_port, c.local_addr().unwrap().port());
                    assert_eq!(&got[28..], *msg);
                } else {
                    assert_eq!(got, *msg, "every = false: only the first datagram has it");
                }
            }
        }
    }
}

/// IPv6, and the largest IPv4 datagram (65,507 bytes) relayed whole both ways.
#[tokio::test]
async fn ipv6_and_the_largest_datagram() {
    // Datagrams sent through io_uring, then with sendmmsg (`[global] io_uring`).
    for io_uring in [true, false] {
        let (echo, _) = udp_server("127.0.0.1", None).await;
        let ferry = Ferry::start(
            &sending(io_uring, udp_config("127.0.0.1:0", "", "", &[echo])),
            1,
        )
        .await;
        let c = client("127.0.0.1", ferry.addr("udp")).await;
        let big: Vec<u8> = (0..65_507usize).map(|i| (i % 251) as u8).collect();
        assert_eq!(ask(&c, &big).await, big);
        drop(ferry);
        let (echo6, _) = udp_server("::1", None).await;
        let ferry6 = Ferry::start(
            &sending(io_uring, udp_config("[::1]:0", "", "", &[echo6])),
            1,
        )
        .await;
        let c6 = client("::1", ferry6.addr("udp")).await;
        assert_eq!(ask(&c6, b"over IPv6").await, b"over IPv6");
        assert_eq!(ask(&c6, &big[..65_000]).await, &big[..65_000]);
    }
}

/// A reload that changes a UDP listener's settings keeps its sessions: the client's next
/// datagram goes over the same backend session. SIGTERM then keeps serving the open
/// session, refuses new clients, and ends it `drained` at `drain_timeout`.
#[tokio::test]
async fn reload_keeps_sessions_and_drain_ends_them() {
    let (echo, peers) = udp_server("127.0.0.1", None).await;
    // A fixed port: a listener whose `listen` changes (port 0 to the port it got) binds
    // new sockets at a reload.
    let listen = format!("127.0.0.1:{}", gone_udp().port());
    let config = |idle: &str| {
        format!(
            "[global]\ndrain_timeout = \"1s\"\n{}",
            udp_config(&listen, &format!("idle_timeout = \"{idle}\""), "", &[echo])
        )
    };
    let mut ferry = Ferry::start(&config("60s"), 1).await;
    let front = ferry.addr("udp");
    let admin = admin_addr(&ferry).await;
    let c = client("127.0.0.1", front).await;
    assert_eq!(ask(&c, b"before").await, b"before");
    let text = std::fs::read_to_string(&ferry.config_path)
        .unwrap()
        .replace("\"60s\"", "\"50s\"");
    std::fs::write(&ferry.config_path, text).unwrap();
    let r = crate::ops_support::post(admin, "/api/reload", None).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.contains("changed"), "{}", r.body);
    assert_eq!(ask(&c, b"after").await, b"after");
    assert_eq!(
        peers.lock().unwrap().len(),
        1,
        "the session survived the reload"
    );

    ferry.signal("TERM");
    // Still served while draining; a new client is not (once the drain has begun: the
    // signal is handled when it is handled).
    ferry
        .stderr
        .expect("the drain did not begin", |l| {
            l.contains("stopped accepting")
        })
        .await;
    assert_eq!(ask(&c, b"draining").await, b"draining");
    let late = client("127.0.0.1", front).await;
    late.send(b"late").await.unwrap();
    let status = ferry.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let records = parse_records(&ferry.log_lines_now());
    let r = record_for(&records, c.local_addr().unwrap());
    assert_eq!(r["result"], "drained");
    assert_eq!(r["datagrams_up"], 3);
    let mut buf = [0u8; 16];
    assert!(
        late.try_recv(&mut buf).is_err(),
        "a new client was answered while draining"
    );
    assert_eq!(peers.lock().unwrap().len(), 1);
}

/// Datagrams across a veth pair with MTU 1500 (client, ferry and server in their own
/// namespaces): 1,400-byte datagrams, and 8,000-byte ones that travel as IP fragments
/// both ways, all come back whole, from several clients.
#[tokio::test]
async fn datagrams_cross_mtu_1500_links_whole() {
    // Datagrams sent through io_uring, then with sendmmsg (`[global] io_uring`).
    for io_uring in [true, false] {
        let net = netns::Path3::new();
        let server_ip = net.server_ip;
        let server = netns::in_ns(&net.server_ns, move || {
            std::net::UdpSocket::bind((server_ip, 0)).expect("bind in the server namespace")
        });
        let server_addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        });
        let listen = SocketAddr::new(net.proxy_ip, 0);
        let ferry = net
            .start_ferry(
                &sending(
                    io_uring,
                    udp_config(&listen.to_string(), "", "", &[server_addr]),
                ),
                1,
            )
            .await;
        let front = ferry.addr("udp");
        let client_ns = net.client_ns.clone();
        let results = tokio::task::spawn_blocking(move || {
            netns::in_ns(&client_ns, move || {
                let mut out = Vec::new();
                for k in 0..4usize {
                    let c = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
                    c.connect(front).unwrap();
                    c.set_read_timeout(Some(netns::SLOW)).unwrap();
                    for (i, len) in [1400usize, 8000, 1, 1472, 8000].into_iter().enumerate() {
                        let msg: Vec<u8> = (0..len).map(|j| (j * 7 + i + k) as u8).collect();
                        c.send(&msg).unwrap();
                        let mut buf = vec![0u8; MAX];
                        let n = c.recv(&mut buf).expect("a reply within the bound");
                        out.push((k, len, buf[..n] == msg[..]));
                    }
                }
                out
            })
        })
        .await
        .unwrap();
        for (k, len, same) in results {
            assert!(
                same,
                "client {k}: a {len}-byte datagram did not come back whole"
            );
        }
    }
}

/// The client sees replies from the address it sent to on a wildcard listener, whichever
/// local address that was.
#[tokio::test]
async fn wildcard_listener_answers_from_the_address_sent_to() {
    // Datagrams sent through io_uring, then with sendmmsg (`[global] io_uring`).
    for io_uring in [true, false] {
        let (echo, _) = udp_server("127.0.0.1", None).await;
        let ferry = Ferry::start(
            &sending(io_uring, udp_config("0.0.0.0:0", "", "", &[echo])),
            1,
        )
        .await;
        let port = ferry.addr("udp").port();
        for ip in ["127.0.0.1", "127.0.0.7", "127.0.0.9"] {
            let to = SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port);
            let c = client("127.0.0.1", to).await;
            assert_eq!(ask(&c, ip.as_bytes()).await, ip.as_bytes());
        }
    }
}

/// A UDP upstream checked by a TCP connect to `port`: its server is up while something
/// listens there and down once nothing does.
#[tokio::test]
async fn udp_upstream_checked_by_tcp_port() {
    let (echo, _) = udp_server("127.0.0.1", None).await;
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let upstream = format!(
        "[upstream.health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\nport = {port}"
    );
    let ferry = Ferry::start(&udp_config("127.0.0.1:0", "", &upstream, &[echo]), 1).await;
    let admin = admin_addr(&ferry).await;
    let state = || async move { server_status(&status(admin).await, "u", echo)["state"].clone() };
    // Checks pass while the port listens (the server starts up and stays so).
    let mut passed = false;
    for _ in 0..500 {
        let st = status(admin).await;
        if server_status(&st, "u", echo)["last_check"]["ok"] == true {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(passed, "no passing check");
    assert_eq!(state().await, "up");
    let c = client("127.0.0.1", ferry.addr("udp")).await;
    assert_eq!(ask(&c, b"up").await, b"up");
    drop(tcp);
    let mut down = false;
    for _ in 0..500 {
        if state().await == "down" {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(down, "the server stayed up with its check port closed");
}

/// `deny`, the listener's `max_sessions` and a per-client datagram `rate`: each drops the
/// datagrams it refuses, counted under its own reason, and answers nothing.
#[tokio::test]
async fn deny_max_sessions_and_rate_drop_and_count() {
    let (echo, _) = udp_server("127.0.0.1", None).await;
    let listener =
        "deny = [\"127.0.0.9/32\"]\nmax_sessions = 2\nper_client = { rate = \"5/s\", burst = 5 }";
    let ferry = Ferry::start(&udp_config("0.0.0.0:0", listener, "", &[echo]), 1).await;
    let admin = admin_addr(&ferry).await;
    let port = ferry.addr("udp").port();
    let front: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dropped = |m: &str, reason: &str| {
        metric_must(
            m,
            "ferry_udp_dropped_total",
            &[("listener", "udp"), ("reason", reason)],
        )
    };
    let wait_dropped = |reason: &'static str, n: f64| async move {
        let mut m = metrics(admin).await;
        for _ in 0..500 {
            if dropped(&m, reason) >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            m = metrics(admin).await;
        }
        assert_eq!(dropped(&m, reason), n, "{reason}");
    };
    // Denied.
    let denied = client("127.0.0.9", front).await;
    denied.send(b"x").await.unwrap();
    wait_dropped("denied", 1.0).await;
    ferry.records_with("denied", 1, WAIT).await;
    // Two sessions, then the third is over the listener's limit.
    let a = client("127.0.0.2", front).await;
    let b = client("127.0.0.3", front).await;
    assert_eq!(ask(&a, b"a").await, b"a");
    assert_eq!(ask(&b, b"b").await, b"b");
    let third = client("127.0.0.4", front).await;
    third.send(b"c").await.unwrap();
    wait_dropped("session_limit", 1.0).await;
    // A burst of 5 a second: `a` has sent 1; 4 more pass, the next ones are dropped.
    for i in 0..4u8 {
        assert_eq!(ask(&a, &[i]).await, [i]);
    }
    for i in 0..3u8 {
        a.send(&[100 + i]).await.unwrap();
    }
    wait_dropped("rate", 3.0).await;
    let mut buf = [0u8; 16];
    for (who, s) in [("denied", &denied), ("third", &third), ("rate-limited", &a)] {
        assert!(
            s.try_recv(&mut buf).is_err(),
            "the {who} client got an answer"
        );
    }
}

/// A UDP listener's metric families pass the reference parser (Prometheus text and
/// OpenMetrics), typed as documented, with one sample per drop reason.
#[tokio::test]
async fn udp_metrics_pass_the_reference_parser() {
    crate::ops_support::ensure_prometheus_client();
    let (echo, _) = udp_server("127.0.0.1", None).await;
    let ferry = Ferry::start(&udp_config("127.0.0.1:0", "", "", &[echo]), 1).await;
    let admin = admin_addr(&ferry).await;
    let c = client("127.0.0.1", ferry.addr("udp")).await;
    assert_eq!(ask(&c, b"m").await, b"m");
    let text = metrics(admin).await;
    for openmetrics in [false, true] {
        let body = if openmetrics {
            let accept = "application/openmetrics-text;version=1.0.0";
            crate::ops_support::http(admin, "GET", "/metrics", &[("Accept", accept)], b"")
                .await
                .body
        } else {
            text.clone()
        };
        let fams = crate::ops_support::parse_with_prometheus_client(&body, openmetrics);
        for (family, ty, samples) in [
            ("ferry_udp_sessions_active", "gauge", 1),
            ("ferry_udp_datagrams", "counter", 2),
            ("ferry_udp_dropped", "counter", 8),
        ] {
            assert_eq!(fams[family]["type"], ty, "{family}: {fams:#}");
            // OpenMetrics counters also have a `_created` sample each (none here).
            assert!(
                fams[family]["samples"].as_u64().unwrap_or(0) >= samples,
                "{family}: {fams:#}"
            );
        }
    }
    assert_eq!(
        metric_must(&text, "ferry_udp_sessions_active", &[("listener", "udp")]),
        1.0
    );
}

/// Fails unless `ferry` has loaded the kernel's UDP path (a build with clang, Linux 6.6,
/// root), with its reason if it could not.
fn kernel_loaded(ferry: &Ferry) {
    let log = ferry.stderr.text();
    assert!(
        log.contains("relayed in the kernel once their server answers"),
        "the kernel's UDP path is not loaded:\n{log}"
    );
}

/// `config` with `[global] udp_kernel` set.
fn in_kernel(on: bool, config: String) -> String {
    format!("[global]\nudp_kernel = {on}\n{config}")
}

/// Established sessions are relayed by the kernel (`udp_kernel`, the default), over IPv4
/// and IPv6: after each session's first datagram and reply, which pass through ferry's
/// sockets, every other datagram comes back unchanged without them. The metrics and the
/// status count them at once (the kernel's counts are read when shown), and each
/// session's record says how many the kernel relayed. None with `udp_kernel = false`, nor
/// for a client and server of different families (no one datagram can be rewritten from
/// one to the other): those sessions stay on the sockets.
#[tokio::test]
async fn established_sessions_are_relayed_in_the_kernel() {
    // (the client's and listener's address, the server's, `udp_kernel`, in the kernel)
    let cases = [
        ("127.0.0.1", "127.0.0.1", true, true),
        ("::1", "::1", true, true),
        ("::1", "127.0.0.1", true, false),
        ("127.0.0.1", "127.0.0.1", false, false),
    ];
    for (front_ip, server_ip, on, kernel_on) in cases {
        let (echo, peers) = udp_server(server_ip, None).await;
        let listen = SocketAddr::new(front_ip.parse().unwrap(), 0).to_string();
        let ferry = Ferry::start(
            &in_kernel(
                on,
                udp_config(&listen, "idle_timeout = \"1s\"", "", &[echo]),
            ),
            1,
        )
        .await;
        if on {
            kernel_loaded(&ferry);
        }
        let admin = admin_addr(&ferry).await;
        let front = ferry.addr("udp");
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(client(front_ip, front).await);
        }
        // Up to the largest datagram loopback's MTU (65,536) takes unfragmented: all of
        // IPv4's, and 65,488 bytes behind IPv6's longer header.
        let largest = if front.is_ipv4() { 65_507 } else { 65_488 };
        let sizes = |i: usize, k: usize| match i {
            47 => largest,
            48 => 9_000,
            _ => 1 + (i * 53 + k * 17) % 1400,
        };
        let mut sent = [0u64; 4];
        for i in 0..50usize {
            for (k, c) in clients.iter().enumerate() {
                let len = sizes(i, k);
                let msg: Vec<u8> = (0..len).map(|j| (j * 7 + i + k) as u8).collect();
                assert_eq!(ask(c, &msg).await, msg, "client {k}, datagram {i}");
                sent[k] += len as u64;
            }
        }
        assert_eq!(
            peers.lock().unwrap().len(),
            4,
            "one backend socket per client"
        );
        let kernel = if kernel_on { 4 * 98 } else { 0 };
        let m = metrics(admin).await;
        for dir in ["up", "down"] {
            assert_eq!(
                metric_must(
                    &m,
                    "ferry_udp_datagrams_total",
                    &[("listener", "udp"), ("direction", dir)]
                ),
                200.0,
                "{dir}"
            );
            assert_eq!(
                metric_must(
                    &m,
                    "ferry_bytes_total",
                    &[("listener", "udp"), ("direction", dir)]
                ),
                sent.iter().sum::<u64>() as f64,
                "{dir}"
            );
        }
        assert_eq!(
            metric_must(
                &m,
                "ferry_udp_kernel_datagrams_total",
                &[("listener", "udp")]
            ),
            f64::from(kernel)
        );
        let st = status(admin).await;
        assert_eq!(st["listeners"][0]["udp"]["datagrams_kernel"], kernel);
        assert_eq!(st["listeners"][0]["udp"]["datagrams_up"], 200);
        let records = ferry.records(4, WAIT).await;
        let records = udp_records(&records);
        assert_eq!(records.len(), 4);
        for r in records {
            assert_eq!(r["result"], "idle_timeout", "{r}");
            assert_eq!(
                (r["datagrams_up"].as_u64(), r["datagrams_down"].as_u64()),
                (Some(50), Some(50)),
                "{r}"
            );
            assert_eq!(
                r["datagrams_kernel"].as_u64(),
                Some(if kernel_on { 98 } else { 0 }),
                "{r}"
            );
            let client: SocketAddr = r["client"].as_str().unwrap().parse().unwrap();
            let k = clients
                .iter()
                .position(|c| c.local_addr().unwrap() == client)
                .expect("a record of one of the clients");
            assert_eq!(r["bytes_up"].as_u64(), Some(sent[k]), "{r}");
            assert_eq!(r["bytes_down"].as_u64(), Some(sent[k]), "{r}");
        }
        // The session's entries are gone with it: the client's next datagram starts a
        // new session, through ferry's sockets again.
        let c = &clients[0];
        assert_eq!(ask(c, b"again").await, b"again");
        let m = metrics(admin).await;
        assert_eq!(
            metric_must(&m, "ferry_udp_sessions_active", &[("listener", "udp")]),
            1.0
        );
        assert_eq!(
            metric_must(
                &m,
                "ferry_udp_datagrams_total",
                &[("listener", "udp"), ("direction", "up")]
            ),
            201.0
        );
        assert_eq!(
            metric_must(
                &m,
                "ferry_udp_kernel_datagrams_total",
                &[("listener", "udp")]
            ),
            f64::from(kernel)
        );
    }
}

/// A session whose datagrams the kernel relays lives as long as they come: it is idle
/// only when the kernel has relayed none for `idle_timeout`.
#[tokio::test]
async fn a_session_in_the_kernel_lives_while_used_then_ends_idle() {
    let (echo, _) = udp_server("127.0.0.1", None).await;
    let ferry = Ferry::start(
        &udp_config("127.0.0.1:0", "idle_timeout = \"3s\"", "", &[echo]),
        1,
    )
    .await;
    kernel_loaded(&ferry);
    let c = client("127.0.0.1", ferry.addr("udp")).await;
    // Ten exchanges 500 ms apart: 4.5 s in all, past the 3 s idle timeout, with never
    // more than half a second (and a loaded machine's delays) between datagrams. The
    // kernel relays all but the first and its reply.
    let mut every = tokio::time::interval(Duration::from_millis(500));
    let (mut first_reply, mut last_send) = (None, None);
    for i in 0..10u8 {
        every.tick().await;
        last_send = Some(std::time::Instant::now());
        assert_eq!(ask(&c, &[i; 20]).await, [i; 20]);
        first_reply = first_reply.or(Some(std::time::Instant::now()));
    }
    let records = ferry.records(1, WAIT).await;
    let r = udp_records(&records);
    assert_eq!(
        r.len(),
        1,
        "one session for the whole exchange: {records:?}"
    );
    assert_eq!(r[0]["result"], "idle_timeout", "{}", r[0]);
    assert_eq!(r[0]["datagrams_up"], 10, "{}", r[0]);
    assert_eq!(r[0]["datagrams_kernel"], 18, "{}", r[0]);
    // It lived through the exchanges, then its idle timeout: it started before the first
    // reply came and the kernel relayed the last datagram after it was sent, so it lasted
    // at least that long plus 3 s (less the millisecond its last-seen time is rounded to).
    let between = last_send.unwrap() - first_reply.unwrap();
    let lived = r[0]["duration_ms"].as_f64().unwrap();
    assert!(
        lived >= between.as_secs_f64() * 1000.0 + 3_000.0 - 1.0,
        "{between:?} of exchanges: {}",
        r[0]
    );
}

/// A server that goes away while the kernel relays its session: the next datagram the
/// kernel passes to it gets ICMP port unreachable back to the session's socket, which
/// ends the session as `connect_failed`, counted against the server.
#[tokio::test]
async fn a_server_gone_ends_its_kernel_session() {
    let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = server.local_addr().unwrap();
    let upstream = "[upstream.health]\nactive = false\npassive = { failures = 1, eject = \"1h\" }";
    let ferry = Ferry::start(
        &udp_config("127.0.0.1:0", "idle_timeout = \"1h\"", upstream, &[addr]),
        1,
    )
    .await;
    kernel_loaded(&ferry);
    let admin = admin_addr(&ferry).await;
    let c = client("127.0.0.1", ferry.addr("udp")).await;
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; MAX];
        for _ in 0..3 {
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            server.send_to(&buf[..n], from).await.unwrap();
        }
        // The socket closes here.
    });
    for i in 0..3u8 {
        assert_eq!(ask(&c, &[i; 8]).await, [i; 8]);
    }
    within(WAIT, "the server closing", echo).await.unwrap();
    c.send(b"anyone there").await.unwrap();
    let failed = ferry.records_with("connect_failed", 1, WAIT).await;
    assert_eq!(failed[0]["server"], addr.to_string());
    assert_eq!(failed[0]["datagrams_up"], 4, "{}", failed[0]);
    // Up: datagrams 2 to 4; down: replies 2 and 3.
    assert_eq!(failed[0]["datagrams_kernel"], 5, "{}", failed[0]);
    let st = status(admin).await;
    assert_eq!(server_status(&st, "u", addr)["state"], "down");
}

/// The kernel's path between namespaces over veth links with MTU 1500, client and server
/// each on their own host, over IPv4 and IPv6: datagrams that fit one packet are relayed
/// by the kernel, out of the interface towards their new destination; larger ones arrive
/// in fragments, which the kernel's path leaves to ferry's sockets. Every one comes back
/// whole, its checksum verified in software where it is received (none is dropped for a
/// bad one: the rewrite mends it right, with the IPv6 pseudo-header too).
#[tokio::test]
async fn kernel_path_across_veth_links_leaves_fragments_to_the_sockets() {
    let net = netns::Path3::new();
    net.checksums_in_software();
    for (proxy_ip, server_ip) in [
        (net.proxy_ip, net.server_ip),
        (net.proxy_ip6, net.server_ip6),
    ] {
        let server = netns::in_ns(&net.server_ns, move || {
            std::net::UdpSocket::bind((server_ip, 0)).expect("bind in the server namespace")
        });
        let server_addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        });
        let listen = SocketAddr::new(proxy_ip, 0);
        let ferry = net
            .start_ferry(
                &udp_config(
                    &listen.to_string(),
                    "idle_timeout = \"1s\"",
                    "",
                    &[server_addr],
                ),
                1,
            )
            .await;
        kernel_loaded(&ferry);
        let front = ferry.addr("udp");
        let client_ns = net.client_ns.clone();
        // The largest payload one 1,500-byte packet holds: behind 28 bytes of headers
        // (IPv4), or 48 (IPv6).
        let fits = if proxy_ip.is_ipv4() { 1472 } else { 1452 };
        // The first exchange sets the session up through the sockets; of the rest, the
        // 4,000-byte datagrams are fragmented.
        let sizes = [1400usize, 4000, 1, fits, 4000, 64];
        let any: IpAddr = if proxy_ip.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let (results, locals) = tokio::task::spawn_blocking(move || {
            netns::in_ns(&client_ns, move || {
                let mut out = Vec::new();
                let mut locals = Vec::new();
                for k in 0..3usize {
                    let c = std::net::UdpSocket::bind((any, 0)).unwrap();
                    c.connect(front).unwrap();
                    c.set_read_timeout(Some(netns::SLOW)).unwrap();
                    for (i, len) in sizes.into_iter().enumerate() {
                        let msg: Vec<u8> = (0..len).map(|j| (j * 7 + i + k) as u8).collect();
                        c.send(&msg).unwrap();
                        let mut buf = vec![0u8; MAX];
                        let n = c.recv(&mut buf).expect("a reply within the bound");
                        out.push((k, len, buf[..n] == msg[..]));
                    }
                    locals.push(c.local_addr().unwrap());
                }
                (out, locals)
            })
        })
        .await
        .unwrap();
        for (k, len, same) in results {
            assert!(
                same,
                "{front}: client {k}: a {len}-byte datagram did not come back whole"
            );
        }
        let records = ferry.records(3, WAIT).await;
        let records = udp_records(&records);
        assert_eq!(records.len(), 3);
        for r in records {
            let client: SocketAddr = r["client"].as_str().unwrap().parse().unwrap();
            assert!(locals.iter().any(|l| l.port() == client.port()), "{r}");
            assert_eq!(r["datagrams_up"], 6, "{r}");
            assert_eq!(r["datagrams_down"], 6, "{r}");
            // 1, `fits` and 64 bytes, both ways.
            assert_eq!(r["datagrams_kernel"], 6, "{r}");
            let bytes: usize = sizes.iter().sum();
            assert_eq!(r["bytes_up"].as_u64(), Some(bytes as u64), "{r}");
        }
        for ns in [&net.client_ns, &net.server_ns] {
            assert_eq!(netns::udp_checksum_errors(ns), 0, "{front}: in {ns}");
        }
    }
}

/// The kernel's path follows the interfaces: one replaced after ferry started (deleted,
/// then made again, with a new index) is let go of and then gets the program again, so
/// its sessions are relayed in the kernel both ways, as before.
#[tokio::test]
async fn an_interface_added_after_the_start_gets_the_kernel_path() {
    let net = netns::Path3::new();
    let server_ip = net.server_ip;
    let server = netns::in_ns(&net.server_ns, move || {
        std::net::UdpSocket::bind((server_ip, 0)).expect("bind in the server namespace")
    });
    let server_addr = server.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; MAX];
        while let Ok((n, from)) = server.recv_from(&mut buf) {
            let _ = server.send_to(&buf[..n], from);
        }
    });
    // A wildcard listener: it outlives its addresses' interface.
    let ferry = net
        .start_ferry(
            &udp_config("0.0.0.0:0", "idle_timeout = \"1s\"", "", &[server_addr]),
            1,
        )
        .await;
    kernel_loaded(&ferry);
    assert!(
        ferry.stderr.text().contains("\"to-client\""),
        "to-client is not among the interfaces at the start:\n{}",
        ferry.stderr.text()
    );

    // The client's link, deleted (both its ends go) and made again.
    netns::ip(&["-n", &net.client_ns, "link", "del", "to-proxy"]);
    ferry
        .stderr
        .expect("to-client let go of", |l| {
            l.contains("interface gone") && l.contains("to-client")
        })
        .await;
    netns::link(
        &net.client_ns,
        "to-proxy",
        "10.77.1.1/24",
        &net.proxy_ns,
        "to-client",
        "10.77.1.2/24",
    );
    netns::ip(&[
        "-n",
        &net.client_ns,
        "route",
        "add",
        "10.77.2.0/24",
        "via",
        "10.77.1.2",
    ]);
    ferry
        .stderr
        .expect("the new to-client did not get the program", |l| {
            l.contains("UDP kernel path attached") && l.contains("to-client")
        })
        .await;

    let front = SocketAddr::new(net.proxy_ip, ferry.addr("udp").port());
    let client_ns = net.client_ns.clone();
    let results = tokio::task::spawn_blocking(move || {
        netns::in_ns(&client_ns, move || {
            let mut out = Vec::new();
            for k in 0..3u8 {
                let c = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
                c.connect(front).unwrap();
                c.set_read_timeout(Some(netns::SLOW)).unwrap();
                for i in 0..4u8 {
                    let msg = [k, i, 7, 7];
                    c.send(&msg).unwrap();
                    let mut buf = [0u8; 64];
                    let n = c.recv(&mut buf).expect("a reply within the bound");
                    out.push(buf[..n] == msg);
                }
            }
            out
        })
    })
    .await
    .unwrap();
    assert!(results.iter().all(|&same| same), "{results:?}");
    let records = ferry.records(3, WAIT).await;
    let records = udp_records(&records);
    assert_eq!(records.len(), 3);
    for r in records {
        assert_eq!(r["datagrams_up"], 4, "{r}");
        // The three after the first, both ways: the client's came in on the new
        // interface, through the program attached to it.
        assert_eq!(r["datagrams_kernel"], 6, "{r}");
    }
}

/// A ferry killed outright leaves nothing in the kernel: its program goes with it (TCX
/// links), so a client of one of its sessions in the kernel reaches a closed port
/// (ICMP port unreachable, `ECONNREFUSED` on its connected socket), not the server.
#[tokio::test]
async fn a_killed_ferry_leaves_no_rewrite_behind() {
    let (echo, _) = udp_server("127.0.0.1", None).await;
    let mut ferry = Ferry::start(
        &udp_config("127.0.0.1:0", "idle_timeout = \"1h\"", "", &[echo]),
        1,
    )
    .await;
    kernel_loaded(&ferry);
    let admin = admin_addr(&ferry).await;
    let c = client("127.0.0.1", ferry.addr("udp")).await;
    for i in 0..3u8 {
        assert_eq!(ask(&c, &[i; 16]).await, [i; 16]);
    }
    let m = metrics(admin).await;
    assert_eq!(
        metric_must(
            &m,
            "ferry_udp_kernel_datagrams_total",
            &[("listener", "udp")]
        ),
        4.0,
        "the session is in the kernel"
    );
    ferry.signal("KILL");
    assert!(ferry.wait_exit(WAIT).await.is_some(), "ferry did not exit");
    c.send(b"still there?").await.unwrap();
    let mut buf = [0u8; 64];
    let r = within(WAIT, "the port unreachable", c.recv(&mut buf)).await;
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the datagram went somewhere"
    );
}
