//! The access log to syslog: one RFC 5424 message per record, over UDP to a collector and
//! to a local datagram socket, and a bad target refused by `ferry check`.

use std::os::unix::net::UnixDatagram;

use crate::common::*;
use serde_json::Value;

/// Checks one RFC 5424 message: `<134>1 TIMESTAMP HOST ferry PID access - RECORD`;
/// returns the record.
fn parse_message(msg: &str, pid: u32) -> Value {
    let parts: Vec<&str> = msg.splitn(8, ' ').collect();
    assert_eq!(parts.len(), 8, "{msg}");
    assert_eq!(parts[0], "<134>1", "local0.info, version 1: {msg}");
    assert!(
        humantime::parse_rfc3339(parts[1]).is_ok(),
        "an RFC 3339 timestamp: {msg}"
    );
    assert!(!parts[2].is_empty() && parts[2].chars().all(|c| c.is_ascii_graphic()));
    assert_eq!(
        &parts[3..7],
        ["ferry", &pid.to_string(), "access", "-"],
        "{msg}"
    );
    serde_json::from_str(parts[7]).unwrap_or_else(|e| panic!("a JSON record: {e}: {msg}"))
}

fn config(access: &str, echo: std::net::SocketAddr) -> String {
    echo_config("", echo).replace("access = \"@LOG@\"", &format!("access = \"{access}\""))
}

#[tokio::test]
async fn records_go_to_a_syslog_collector_over_udp() {
    let collector = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    collector.set_read_timeout(Some(WAIT)).unwrap();
    let echo = echo_server().await;
    let cfg = config(
        &format!("syslog:udp://{}", collector.local_addr().unwrap()),
        echo,
    );
    assert!(cfg.contains("syslog:udp://"), "{cfg}");
    let ferry = Ferry::start(&cfg, 1).await;
    let mut c = connect(ferry.addr("front")).await;
    echo_round_trip(&mut c, b"to syslog").await;
    let client = c.local_addr().unwrap();
    drop(c);
    let mut buf = [0u8; 8192];
    let n = tokio::task::spawn_blocking(move || collector.recv(&mut buf).map(|n| (n, buf)))
        .await
        .unwrap()
        .expect("a syslog message");
    let msg = String::from_utf8_lossy(&n.1[..n.0]).into_owned();
    let rec = parse_message(&msg, ferry.pid());
    assert_eq!(rec["client"], client.to_string());
    assert_eq!(rec["result"], "ok");
    assert_eq!(rec["bytes_up"], 9);
}

/// A datagram from `sock`, if there is one; else never.
async fn recv_if(sock: Option<&tokio::net::UdpSocket>, buf: &mut [u8]) -> std::io::Result<usize> {
    match sock {
        Some(s) => s.recv(buf).await,
        None => std::future::pending().await,
    }
}

/// A collector named by its host name (`localhost`), looked up when the log is opened:
/// records reach it on whichever loopback address the name gives first.
#[tokio::test]
async fn a_collector_named_by_host_name() {
    let v4 = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = v4.local_addr().unwrap().port();
    let v6 = tokio::net::UdpSocket::bind(("::1", port)).await.ok();
    let echo = echo_server().await;
    let ferry = Ferry::start(&config(&format!("syslog:udp://localhost:{port}"), echo), 1).await;
    let mut c = connect(ferry.addr("front")).await;
    echo_round_trip(&mut c, b"by name").await;
    drop(c);
    let msg = within(WAIT, "a syslog message", async {
        let (mut b4, mut b6) = ([0u8; 8192], [0u8; 8192]);
        tokio::select! {
            r = v4.recv(&mut b4) => String::from_utf8_lossy(&b4[..r.unwrap()]).into_owned(),
            r = recv_if(v6.as_ref(), &mut b6) => String::from_utf8_lossy(&b6[..r.unwrap()]).into_owned(),
        }
    })
    .await;
    let rec = parse_message(&msg, ferry.pid());
    assert_eq!(rec["listener"], "front");
}

#[tokio::test]
async fn records_go_to_a_local_syslog_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let echo = echo_server().await;
    let ferry = Ferry::start(&config(&format!("syslog:unix:{}", path.display()), echo), 1).await;
    let mut c = connect(ferry.addr("front")).await;
    echo_round_trip(&mut c, b"local").await;
    drop(c);
    let mut buf = [0u8; 8192];
    let (n, buf) = tokio::task::spawn_blocking(move || sock.recv(&mut buf).map(|n| (n, buf)))
        .await
        .unwrap()
        .expect("a syslog message");
    let rec = parse_message(&String::from_utf8_lossy(&buf[..n]), ferry.pid());
    assert_eq!(rec["listener"], "front");
}

#[test]
fn a_bad_syslog_target_is_refused() {
    assert_check_errors(
        r#"[log]
access = "syslog:tcp://127.0.0.1:514"

[[listener]]
name = "l"
listen = "127.0.0.1:1"
upstream = "u"

[[upstream]]
name = "u"
servers = ["127.0.0.1:2"]
"#,
        &[
            r#"2:10: `access` "syslog:tcp://127.0.0.1:514": a syslog target is "syslog", "syslog:udp://HOST:PORT" or "syslog:unix:/PATH""#,
        ],
    );
}
