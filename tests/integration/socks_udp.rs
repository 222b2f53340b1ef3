//! SOCKS5 UDP ASSOCIATE (RFC 1928 §7) through ferry, driven by a Python client (the
//! standard library's sockets, bytes by hand) against a UDP echo server in the test: every
//! datagram of 1 to 1,400 bytes comes back whole with the header naming its source; datagrams
//! from another address, fragments, and datagrams to destinations `destinations` does not
//! allow never reach a server; the association ends with its control connection, and its
//! record counts what moved and what was dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::common::*;

/// A UDP echo server on loopback that counts the datagrams it gets.
async fn udp_echo() -> (SocketAddr, Arc<AtomicUsize>) {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((len, from)) = s.recv_from(&mut buf).await else {
                return;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            let _ = s.send_to(&buf[..len], from).await;
        }
    });
    (addr, n)
}

/// The Python client: negotiates, asks for an association, and checks the relay.
const CLIENT: &str = r#"
import socket, struct, sys
proxy_port, echo_port, forbidden_port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lo = socket.inet_aton("127.0.0.1")
def header(port, frag=0):
    return b"\x00\x00" + bytes([frag]) + b"\x01" + lo + struct.pack(">H", port)
c = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
c.sendall(b"\x05\x01\x00")
assert c.recv(2) == b"\x05\x00"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", 0))
u.settimeout(10)
c.sendall(b"\x05\x03\x00\x01" + lo + struct.pack(">H", u.getsockname()[1]))
r = b""
while len(r) < 10:
    r += c.recv(10 - len(r))
assert r[:4] == b"\x05\x00\x00\x01", r.hex()
relay = (socket.inet_ntoa(r[4:8]), struct.unpack(">H", r[8:10])[0])
# Dropped: from another socket, a fragment, a destination not allowed.
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.sendto(header(echo_port) + b"from another address", relay)
u.sendto(header(echo_port, frag=1) + b"a fragment", relay)
u.sendto(header(forbidden_port) + b"not allowed", relay)
# 10 rounds of 1 to 1,400 bytes, each echoed whole, in order.
sizes = [1, 2, 100, 512, 1000, 1200, 1399, 1400, 7, 64]
for i, n in enumerate(sizes):
    payload = bytes((i * 31 + j) % 251 for j in range(n))
    u.sendto(header(echo_port) + payload, relay)
    d, src = u.recvfrom(70000)
    assert src == relay, (src, relay)
    assert d[:10] == header(echo_port), d[:10].hex()
    assert d[10:] == payload, (i, len(d))
print("ok", len(sizes))
c.close()
"#;

#[tokio::test]
async fn udp_associate_relays_datagrams_and_drops_the_rest() {
    let (echo, echoed) = udp_echo().await;
    let (forbidden, forbidden_seen) = udp_echo().await;
    let f = Ferry::start(
        &format!(
            r#"
[log]
access = "@LOG@"

[[listener]]
name = "socks"
listen = "127.0.0.1:0"
mode = "socks5"
udp = true
destinations = ["127.0.0.0/8:{}"]
"#,
            echo.port()
        ),
        1,
    )
    .await;
    let proxy = f.addr("socks");
    let args = [proxy.port(), echo.port(), forbidden.port()].map(|p| p.to_string());
    // The client's own socket timeouts bound it; this bounds the wait for it too.
    let out = within(
        Duration::from_secs(60),
        "the Python client",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .arg("-c")
                .arg(CLIENT)
                .args(args)
                .output()
        }),
    )
    .await
    .unwrap()
    .expect("run python3");
    assert!(
        out.status.success(),
        "client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 10");
    // The association ends with its control connection.
    let recs = f.records_with("ok", 1, WAIT).await;
    let r = &recs[0];
    assert_eq!(r["datagrams_up"], 10, "{r}");
    assert_eq!(r["datagrams_down"], 10, "{r}");
    let bytes: u64 = [1u64, 2, 100, 512, 1000, 1200, 1399, 1400, 7, 64]
        .iter()
        .sum();
    assert_eq!(r["bytes_up"], bytes, "{r}");
    assert_eq!(r["bytes_down"], bytes, "{r}");
    assert_eq!(r["reason"], "UDP ASSOCIATE; 3 datagram(s) dropped", "{r}");
    // Only the client's allowed datagrams reached a server.
    assert_eq!(echoed.load(Ordering::SeqCst), 10);
    assert_eq!(forbidden_seen.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn udp_associate_is_refused_unless_enabled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Ferry::start(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "socks"
listen = "127.0.0.1:0"
mode = "socks5"
destinations = ["127.0.0.0/8:*"]
"#,
        1,
    )
    .await;
    let mut c = connect(f.addr("socks")).await;
    within(WAIT, "SOCKS5 exchange", async {
        c.write_all(b"\x05\x01\x00").await.unwrap();
        let mut m = [0u8; 2];
        c.read_exact(&mut m).await.unwrap();
        assert_eq!(m, [5, 0]);
        c.write_all(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        let mut r = [0u8; 10];
        c.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[..2], &[5, 2], "0x02: not allowed by ruleset");
    })
    .await;
    let recs = f.records_with("denied", 1, WAIT).await;
    assert!(
        recs[0]["reason"]
            .as_str()
            .unwrap()
            .contains("UDP ASSOCIATE is not enabled"),
        "{}",
        recs[0]
    );
}
