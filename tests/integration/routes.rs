//! Routes (`[[listener.route]]`) on plain TCP listeners: SNI and ALPN read from the TLS
//! ClientHello and the hello replayed byte for byte (ferry holds no certificate), the
//! client's source address (behind a PROXY header too) and the local port, the default
//! route and what happens without one, slow and broken ClientHellos, reload, and the config
//! errors of routes. One test looks at routes on a TLS-terminating listener, where `alpn`
//! is what was agreed.
//!
//! Real TLS servers are `openssl s_server` child processes (killed on drop); the clients
//! are rustls (`crate::common::pki`) or raw sockets sending recorded ClientHellos
//! (`src/wire/testdata/client_hello/`). Every wait is bounded.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::pki::{self, Ca, ClientOpts, Leaf};
use crate::common::*;
use crate::ops_support::*;
use rustls::pki_types::CertificateDer;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// Shared helpers.

/// Runs `f` (blocking socket work: the rustls client) on the blocking pool, bounded by
/// twice [`WAIT`]; a panic in `f` is the test's panic.
async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match within(2 * WAIT, what, tokio::task::spawn_blocking(f)).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// A recorded ClientHello from `src/wire/testdata/client_hello/NAME.bin`.
fn recorded(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/wire/testdata/client_hello")
        .join(format!("{name}.bin"));
    std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// `n` pseudo-random bytes from `seed`: what a client sends after its ClientHello.
fn tail(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    Prng::new(seed).fill(&mut v);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `bytes` with the first `from` replaced by `to` (same length).
fn patch(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let i = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("the bytes to patch");
    let mut out = bytes.to_vec();
    out[i..i + to.len()].copy_from_slice(to);
    out
}

/// A one-record ClientHello with a padding extension (type 21) of `n` zero bytes added at
/// the end of its extensions, its record, message and extension lengths fixed.
fn with_padding(hello: &[u8], n: usize) -> Vec<u8> {
    let mut h = hello.to_vec();
    let add = 4 + n;
    // Record length.
    let rec = u16::from_be_bytes([h[3], h[4]]) as usize + add;
    h[3..5].copy_from_slice(&(rec as u16).to_be_bytes());
    // Handshake message length (3 bytes).
    let msg = u32::from_be_bytes([0, h[6], h[7], h[8]]) as usize + add;
    h[6..9].copy_from_slice(&(msg as u32).to_be_bytes()[1..]);
    // The extensions' length: after version (2), random (32), session id, cipher suites
    // and compression methods.
    let mut i = 9 + 2 + 32;
    i += 1 + h[i] as usize;
    i += 2 + u16::from_be_bytes([h[i], h[i + 1]]) as usize;
    i += 1 + h[i] as usize;
    let ext = u16::from_be_bytes([h[i], h[i + 1]]) as usize + add;
    h[i..i + 2].copy_from_slice(&(ext as u16).to_be_bytes());
    h.extend_from_slice(&[0x00, 0x15]);
    h.extend_from_slice(&(n as u16).to_be_bytes());
    h.extend(std::iter::repeat_n(0u8, n));
    h
}

/// Everything each connection to a capture server sent it, one entry per connection, in
/// the order the connections ended.
type Captures = Arc<Mutex<Vec<Vec<u8>>>>;

/// An echo server that also keeps everything each connection sent. The entry is stored
/// before the server closes its side, so a client that has seen EOF can read it at once.
async fn capture_server() -> (SocketAddr, Captures) {
    let caps: Captures = Arc::default();
    let c = caps.clone();
    let addr = serve_on("127.0.0.1", move |mut s| {
        let caps = c.clone();
        async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            caps.lock().unwrap().push(got);
            let _ = s.shutdown().await;
        }
    })
    .await;
    (addr, caps)
}

fn captured(c: &Captures) -> Vec<Vec<u8>> {
    c.lock().unwrap().clone()
}

/// Sends `pieces` (one write each, a few milliseconds apart so that they tend to arrive as
/// separate segments; nothing depends on it), half-closes, and reads everything that comes
/// back until the connection closes. Returns the client address and what came back.
async fn exchange(addr: SocketAddr, pieces: &[&[u8]]) -> (SocketAddr, Vec<u8>) {
    let mut s = connect(addr).await;
    let client = s.local_addr().unwrap();
    let back = within(WAIT, "the echo through ferry", async {
        let (mut r, mut w) = s.split();
        let write = async {
            for (i, p) in pieces.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                w.write_all(p).await.expect("write");
            }
            w.shutdown().await.expect("shutdown");
        };
        let read = async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.expect("read echo");
            back
        };
        tokio::join!(write, read).1
    })
    .await;
    (client, back)
}

/// [`exchange`] with an echoing backend: asserts the echo is exactly what was sent.
async fn send_pieces(addr: SocketAddr, pieces: &[&[u8]]) -> SocketAddr {
    let (client, back) = exchange(addr, pieces).await;
    let sent = pieces.concat();
    assert!(
        back == sent,
        "the echo differs from what was sent ({} bytes sent, {} back)",
        sent.len(),
        back.len()
    );
    client
}

/// [`send_pieces`] with one write.
async fn send_capture(addr: SocketAddr, payload: &[u8]) -> SocketAddr {
    send_pieces(addr, &[payload]).await
}

/// Connects, sends `first` and expects ferry to close the connection (EOF or reset)
/// within `timeout` without a byte. Returns the client address.
async fn refused_after(addr: SocketAddr, first: &[u8], timeout: Duration) -> SocketAddr {
    let (client, r) = connect_from(addr).await;
    let mut s = match r {
        Ok(s) => s,
        Err(e) if is_reset(&e) => return client,
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    if !first.is_empty()
        && let Err(e) = s.write_all(first).await
    {
        assert!(is_reset(&e), "write from {client}: {e}");
        return client;
    }
    let (data, _) = read_until_closed(&mut s, timeout).await;
    assert!(data.is_empty(), "refused client {client} got {data:?}");
    client
}

/// An `openssl s_server` in `-rev` mode (each line it reads comes back reversed) with
/// `leaf` as its certificate, on a free loopback port; killed on drop.
async fn s_server(dir: &Path, name: &str, leaf: &Leaf) -> (Peer, SocketAddr) {
    let (cert, key) = leaf.write(dir, name);
    let port = free_port();
    let mut cmd = Command::new("openssl");
    cmd.args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-rev"])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key);
    let mut p = Peer::spawn(
        &format!("openssl s_server ({name})"),
        cmd,
        tempfile::tempdir().unwrap(),
    );
    p.wait_listening(&[port]).await;
    (p, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// A TLS client through ferry to a `-rev` server: connects with `sni` (`None`: no SNI,
/// the certificate verified against the IP address), trusting only `ca_pem`, sends `line`
/// and checks it comes back reversed, then closes with close_notify. Returns the client
/// address and the certificate the server presented.
async fn tls_rev(
    addr: SocketAddr,
    sni: Option<&str>,
    ca_pem: &str,
    line: &str,
) -> (SocketAddr, CertificateDer<'static>) {
    use std::io::{Read, Write};
    let (sni, ca, line) = (
        sni.map(str::to_string),
        ca_pem.to_string(),
        line.to_string(),
    );
    blocking("a TLS exchange through ferry", move || {
        let roots = [ca];
        let o = ClientOpts {
            sni: sni.as_deref(),
            roots: &roots,
            ..ClientOpts::default()
        };
        let mut s = pki::tls_connect(addr, &o, WAIT)
            .unwrap_or_else(|e| panic!("TLS through ferry with SNI {sni:?}: {e}"));
        let client = s.sock.local_addr().unwrap();
        let cert = s.conn.peer_certificates().expect("a server certificate")[0].clone();
        s.write_all(format!("{line}\n").as_bytes())
            .expect("write line");
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        loop {
            s.read_exact(&mut b)
                .unwrap_or_else(|e| panic!("SNI {sni:?}: reading the answer: {e} (got {got:?})"));
            if b[0] == b'\n' {
                break;
            }
            got.push(b[0]);
        }
        let want: String = line.chars().rev().collect();
        assert_eq!(String::from_utf8_lossy(&got), want, "SNI {sni:?}");
        close_tls(s);
        (client, cert)
    })
    .await
}

/// Closes a TLS client cleanly: close_notify, then reads until the server's own close (so
/// that nothing is left unread, which would make the close a reset), bounded by the
/// socket's read timeout.
fn close_tls(mut s: pki::Tls) {
    use std::io::{Read, Write};
    s.conn.send_close_notify();
    let _ = s.flush();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

/// `ferry_route_matches_total{listener, route, upstream}`.
fn route_matches(m: &str, listener: &str, route: &str, upstream: &str) -> f64 {
    metric_must(
        m,
        "ferry_route_matches_total",
        &[
            ("listener", listener),
            ("route", route),
            ("upstream", upstream),
        ],
    )
}

/// `(route, upstream, matches)` of listener `name` in `/api/status`.
fn status_routes(st: &Value, name: &str) -> Vec<(String, String, u64)> {
    let l = st["listeners"]
        .as_array()
        .expect("listeners[]")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name:?} in {st:#}"));
    l["routes"]
        .as_array()
        .unwrap_or_else(|| panic!("no routes[] in {l:#}"))
        .iter()
        .map(|r| {
            (
                r["route"].as_str().expect("route").to_string(),
                r["upstream"].as_str().expect("upstream").to_string(),
                r["matches"].as_u64().expect("matches"),
            )
        })
        .collect()
}

fn routes(list: &[(&str, &str, u64)]) -> Vec<(String, String, u64)> {
    list.iter()
        .map(|(r, u, n)| (r.to_string(), u.to_string(), *n))
        .collect()
}

/// `[[upstream]]` tables, one server each.
fn upstreams(list: &[(&str, SocketAddr)]) -> String {
    list.iter()
        .map(|(name, addr)| format!("\n[[upstream]]\nname = \"{name}\"\nservers = [\"{addr}\"]\n"))
        .collect()
}

fn json_str(v: Option<&str>) -> Value {
    v.map_or(Value::Null, |s| Value::String(s.to_string()))
}

// ---------------------------------------------------------------------------------------
// 1. SNI passthrough to real TLS servers.

/// Three `openssl s_server`s, each with a certificate for its own names only, behind a tcp
/// listener that holds no certificate: the client, trusting only the test CA and verifying
/// the name, gets the certificate of the server its SNI routes to (exact name, one-label
/// wildcard, default for other names and for no SNI), and talks to that server. The access
/// log shows the SNI and the upstream; `ferry_route_matches_total` and `/api/status` count
/// each route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_passthrough_to_real_tls_servers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry routes test CA");
    let a = ca.server(&["a.test"]);
    let b = ca.server(&["*.b.test"]);
    // C's certificate also covers what must fall through to it: the bare `b.test`, a name two
    // labels under `b.test`, and the IP address a client without SNI verifies.
    let c = ca.server(&["c.test", "b.test", "y.x.b.test", "127.0.0.1"]);
    let (_pa, a_addr) = s_server(dir.path(), "a", &a).await;
    let (_pb, b_addr) = s_server(dir.path(), "b", &b).await;
    let (_pc, c_addr) = s_server(dir.path(), "c", &c).await;

    let config = format!(
        r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "edge"
listen = "127.0.0.1:0"
mode = "tcp"
upstream = "c"

[[listener.route]]
sni = "a.test"
upstream = "a"

[[listener.route]]
sni = "*.b.test"
upstream = "b"
{}"#,
        upstreams(&[("a", a_addr), ("b", b_addr), ("c", c_addr)])
    );
    let ferry = Ferry::start(&config, 1).await;
    let edge = ferry.addr("edge");
    let admin = admin_addr(&ferry).await;

    let cases: [(Option<&str>, &Leaf, &str, SocketAddr); 6] = [
        (Some("a.test"), &a, "a", a_addr),
        (Some("x.b.test"), &b, "b", b_addr),
        (Some("c.test"), &c, "c", c_addr),
        (None, &c, "c", c_addr),
        (Some("b.test"), &c, "c", c_addr),
        (Some("y.x.b.test"), &c, "c", c_addr),
    ];
    let mut seen = Vec::new();
    for (sni, leaf, upstream, server) in cases {
        let (client, cert) = tls_rev(edge, sni, &ca.pem(), &format!("hello {sni:?}")).await;
        assert!(
            cert == leaf.cert_der(),
            "SNI {sni:?}: the client did not get upstream {upstream:?}'s certificate"
        );
        seen.push((client, sni, upstream, server));
    }

    let recs = ferry.records_with("ok", seen.len(), WAIT).await;
    assert_eq!(recs.len(), seen.len(), "{recs:#?}");
    for (client, sni, upstream, server) in &seen {
        let r = record_for(&recs, *client);
        assert_eq!(r["listener"], "edge", "{r}");
        assert_eq!(r["sni"], json_str(*sni), "{r}");
        assert_eq!(r["upstream"], *upstream, "{r}");
        assert_eq!(r["server"], server.to_string(), "{r}");
        assert!(r["bytes_up"].as_u64().unwrap() > 0, "{r}");
        assert!(r["bytes_down"].as_u64().unwrap() > 0, "{r}");
        // Passthrough: ferry terminated nothing.
        assert!(r["tls_version"].is_null(), "{r}");
    }

    let m = metrics(admin).await;
    assert_eq!(route_matches(&m, "edge", "1", "a"), 1.0);
    assert_eq!(route_matches(&m, "edge", "2", "b"), 1.0);
    assert_eq!(route_matches(&m, "edge", "default", "c"), 4.0);
    assert_eq!(
        status_routes(&status(admin).await, "edge"),
        routes(&[("1", "a", 1), ("2", "b", 1), ("default", "c", 4)])
    );
}

// ---------------------------------------------------------------------------------------
// 2. ALPN routing.

/// On a tcp listener `alpn` matches a protocol the ClientHello offers (anywhere in its
/// list); a list of protocols matches any of them; a hello offering none of them takes the
/// default. Each backend gets exactly the bytes its clients sent (hello and what follows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_routes_on_what_the_client_hello_offers() {
    let (h, h_caps) = capture_server().await;
    let (x, x_caps) = capture_server().await;
    let (d, d_caps) = capture_server().await;
    let config = format!(
        r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "alpn"
listen = "127.0.0.1:0"
upstream = "d"

[[listener.route]]
alpn = "h2"
upstream = "h"

[[listener.route]]
alpn = ["x-one", "x-two"]
upstream = "x"
{}"#,
        upstreams(&[("h", h), ("x", x), ("d", d)])
    );
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("alpn");
    let admin = admin_addr(&ferry).await;

    let cases: Vec<(&str, Vec<u8>, &str, Option<&str>)> = vec![
        (
            "h2 and http/1.1",
            pki::client_hello(Some("alpn.test"), &["h2", "http/1.1"]),
            "h",
            Some("h2"),
        ),
        (
            "http/1.1 then h2",
            pki::client_hello(Some("alpn.test"), &["http/1.1", "h2"]),
            "h",
            Some("http/1.1"),
        ),
        (
            "only http/1.1",
            pki::client_hello(Some("alpn.test"), &["http/1.1"]),
            "d",
            Some("http/1.1"),
        ),
        (
            "no ALPN",
            pki::client_hello(Some("alpn.test"), &[]),
            "d",
            None,
        ),
        (
            "x-two",
            pki::client_hello(None, &["x-two"]),
            "x",
            Some("x-two"),
        ),
        ("curl (h2)", recorded("curl-localhost"), "h", Some("h2")),
        (
            "curl --http1.1",
            recorded("curl-http11-localhost"),
            "d",
            Some("http/1.1"),
        ),
    ];
    let mut want: std::collections::HashMap<&str, Vec<Vec<u8>>> = Default::default();
    let mut clients = Vec::new();
    for (i, (what, hello, upstream, _)) in cases.iter().enumerate() {
        let payload = cat(&[hello, format!("after the hello: {what}").as_bytes()]);
        let client = send_capture(addr, &payload).await;
        want.entry(upstream).or_default().push(payload);
        clients.push((i, client));
    }
    assert_eq!(captured(&h_caps), want["h"], "what the h2 backend received");
    assert_eq!(captured(&x_caps), want["x"], "what the x backend received");
    assert_eq!(
        captured(&d_caps),
        want["d"],
        "what the default backend received"
    );

    let recs = ferry.records_with("ok", cases.len(), WAIT).await;
    for (i, client) in clients {
        let (what, _, upstream, first_alpn) = &cases[i];
        let r = record_for(&recs, client);
        assert_eq!(r["upstream"], *upstream, "{what}: {r}");
        // The record's `alpn` on a tcp listener: the first protocol offered.
        assert_eq!(r["alpn"], json_str(*first_alpn), "{what}: {r}");
    }
    let m = metrics(admin).await;
    assert_eq!(route_matches(&m, "alpn", "1", "h"), 3.0);
    assert_eq!(route_matches(&m, "alpn", "2", "x"), 1.0);
    assert_eq!(route_matches(&m, "alpn", "default", "d"), 3.0);
}

// ---------------------------------------------------------------------------------------
// 3. The ClientHello is replayed untouched.

/// Recorded ClientHellos of real clients (OpenSSL 1.2 and 1.3, curl, Python, Chromium with
/// GREASE, ECH GREASE and a post-quantum key share), each followed by 64 KiB of data and
/// written in pieces, plus a hello split over two TLS records and a hello sent in the same
/// write as a PROXY header: each backend receives byte for byte what the client sent
/// (the PROXY header excepted), routed on the hello's SNI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_is_replayed_byte_for_byte() {
    let (ex, ex_caps) = capture_server().await;
    let (lh, lh_caps) = capture_server().await;
    let (py, py_caps) = capture_server().await;
    let (ch, ch_caps) = capture_server().await;
    let (none, none_caps) = capture_server().await;
    let routes_toml = r#"
[[listener.route]]
sni = "example.com"
upstream = "ex"

[[listener.route]]
sni = "localhost"
upstream = "lh"

[[listener.route]]
sni = "py.example"
upstream = "py"

[[listener.route]]
sni = "sni.test"
upstream = "ch"
"#;
    let config = format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "pass"
listen = "127.0.0.1:0"
upstream = "none"
{routes_toml}

[[listener]]
name = "proxied"
listen = "127.0.0.1:0"
upstream = "none"
proxy_protocol = {{ accept = "any", trusted = ["127.0.0.1"] }}
{routes_toml}
{}"#,
        upstreams(&[
            ("ex", ex),
            ("lh", lh),
            ("py", py),
            ("ch", ch),
            ("none", none)
        ])
    );
    let ferry = Ferry::start(&config, 2).await;
    let addr = ferry.addr("pass");

    // The TLS 1.3 OpenSSL hello again, its handshake message split over two records.
    let one = recorded("openssl-tls13-sni-alpn");
    let msg = &one[5..];
    let (m1, m2) = msg.split_at(40);
    let record = |m: &[u8]| cat(&[&[0x16, 0x03, 0x01], &(m.len() as u16).to_be_bytes(), m]);
    let split = cat(&[&record(m1), &record(m2)]);

    let cases: Vec<(&str, Vec<u8>, &str, Option<&str>)> = vec![
        (
            "openssl-tls12-sni-alpn",
            recorded("openssl-tls12-sni-alpn"),
            "ex",
            Some("example.com"),
        ),
        (
            "openssl-tls13-sni-alpn",
            one.clone(),
            "ex",
            Some("example.com"),
        ),
        (
            "openssl-nosni-noalpn",
            recorded("openssl-nosni-noalpn"),
            "none",
            None,
        ),
        (
            "curl-localhost",
            recorded("curl-localhost"),
            "lh",
            Some("localhost"),
        ),
        (
            "curl-http11-localhost",
            recorded("curl-http11-localhost"),
            "lh",
            Some("localhost"),
        ),
        (
            "python-ssl-py-example",
            recorded("python-ssl-py-example"),
            "py",
            Some("py.example"),
        ),
        (
            "chromium-sni-test",
            recorded("chromium-sni-test"),
            "ch",
            Some("sni.test"),
        ),
        ("split over two records", split, "ex", Some("example.com")),
    ];
    let mut want: std::collections::HashMap<&str, Vec<Vec<u8>>> = Default::default();
    let mut clients = Vec::new();
    for (i, (what, hello, upstream, _)) in cases.iter().enumerate() {
        let after = tail(64 * 1024, i as u64 + 1);
        // The first byte alone, then up to the middle of the hello, then the rest of it
        // together with the data that follows.
        let mid = hello.len() / 2;
        let rest = cat(&[&hello[mid..], &after]);
        let client = send_pieces(addr, &[&hello[..1], &hello[1..mid], &rest]).await;
        want.entry(upstream)
            .or_default()
            .push(cat(&[hello, &after]));
        clients.push((
            client,
            *what,
            *upstream,
            cases[i].3,
            hello.len() + after.len(),
        ));
    }

    // Behind a PROXY header, in one write with it: the header is consumed, the hello and
    // what follows arrive intact.
    let hello = recorded("chromium-sni-test");
    let after = tail(10_000, 99);
    let header = b"PROXY TCP4 192.0.2.10 192.0.2.1 40000 443\r\n";
    let (_, back) = exchange(ferry.addr("proxied"), &[&cat(&[header, &hello, &after])]).await;
    assert!(
        back == cat(&[&hello, &after]),
        "behind a PROXY header: the echo differs from the hello and what followed ({} bytes back)",
        back.len()
    );
    want.entry("ch").or_default().push(cat(&[&hello, &after]));

    let by = |c: &Captures| captured(c);
    assert!(
        by(&ex_caps) == want["ex"],
        "example.com backend: bytes differ"
    );
    assert!(
        by(&lh_caps) == want["lh"],
        "localhost backend: bytes differ"
    );
    assert!(
        by(&py_caps) == want["py"],
        "py.example backend: bytes differ"
    );
    assert!(
        by(&none_caps) == want["none"],
        "default backend: bytes differ"
    );
    assert!(by(&ch_caps) == want["ch"], "sni.test backend: bytes differ");

    let recs = ferry.records_with("ok", cases.len() + 1, WAIT).await;
    let proxied = record_for(&recs, "192.0.2.10:40000".parse().unwrap());
    assert_eq!(proxied["listener"], "proxied", "{proxied}");
    assert_eq!(proxied["upstream"], "ch", "{proxied}");
    assert_eq!(proxied["sni"], "sni.test", "{proxied}");
    for (client, what, upstream, sni, _) in &clients {
        let r = record_for(&recs, *client);
        assert_eq!(r["upstream"], *upstream, "{what}: {r}");
        assert_eq!(r["sni"], json_str(*sni), "{what}: {r}");
    }
    // The hello reached the server: it counts in `bytes_up` like the bytes after it.
    let mut counted = Vec::new();
    let mut want = Vec::new();
    for (client, what, _, _, n) in &clients {
        let r = record_for(&recs, *client);
        counted.push((*what, r["bytes_up"].clone(), r["bytes_down"].clone()));
        want.push((*what, Value::from(*n), Value::from(*n)));
    }
    counted.push((
        "behind a PROXY header",
        proxied["bytes_up"].clone(),
        proxied["bytes_down"].clone(),
    ));
    let n = hello.len() + after.len();
    want.push(("behind a PROXY header", n.into(), n.into()));
    assert_eq!(counted, want, "(bytes_up, bytes_down) of each record");
}

/// `sni` matches whatever the case on either side (the record shows the SNI lowercased);
/// a hello larger than one read (9 KB of padding) is read whole and replayed intact; one
/// larger than the limit (16 KiB + 5, over two records) is refused (`protocol_error`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_case_and_large_client_hellos() {
    let (m, m_caps) = capture_server().await;
    let (d, d_caps) = capture_server().await;
    let config = format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "edge"
listen = "127.0.0.1:0"
upstream = "d"

[[listener.route]]
sni = "Mixed.Case.Test"
upstream = "m"
{}"#,
        upstreams(&[("m", m), ("d", d)])
    );
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("edge");

    let lower = pki::client_hello(Some("mixed.case.test"), &[]);
    let upper = patch(&lower, b"mixed.case.test", b"MIXED.CASE.TEST");
    let big = with_padding(&recorded("openssl-tls13-sni-alpn"), 9000);
    // Over the limit: 16.4 KB of hello in two records (each under the 16 KiB record limit).
    let huge = {
        let one = with_padding(&recorded("openssl-tls13-sni-alpn"), 16_200);
        let (m1, m2) = one[5..].split_at(16_000);
        let record = |m: &[u8]| cat(&[&[0x16, 0x03, 0x01], &(m.len() as u16).to_be_bytes(), m]);
        cat(&[&record(m1), &record(m2)])
    };
    assert!(huge.len() > 16 * 1024 + 5);
    let c_lower = send_capture(addr, &lower).await;
    let c_upper = send_capture(addr, &upper).await;
    let c_big = send_capture(addr, &cat(&[&big, b"after a big hello"])).await;
    let c_huge = refused_after(addr, &huge, WAIT).await;

    assert_eq!(
        captured(&m_caps),
        vec![lower, upper],
        "the mixed-case route's server"
    );
    assert_eq!(
        captured(&d_caps),
        vec![cat(&[&big, b"after a big hello"])],
        "the default server"
    );
    let recs = ferry.records_with("ok", 3, WAIT).await;
    for c in [c_lower, c_upper] {
        let r = record_for(&recs, c);
        assert_eq!(r["upstream"], "m", "{r}");
        assert_eq!(r["sni"], "mixed.case.test", "{r}");
    }
    let r = record_for(&recs, c_big);
    assert_eq!(r["sni"], "example.com", "{r}");
    let errs = ferry.records_with("protocol_error", 1, WAIT).await;
    assert_eq!(
        record_for(&errs, c_huge)["reason"],
        "bad ClientHello: ClientHello too long"
    );
}

// ---------------------------------------------------------------------------------------
// 4. A client that does not speak TLS takes the default route.

/// On a listener whose routes read the ClientHello, a plain-text client is routed at its
/// first byte (ferry does not wait for more: the echo of `G` comes back before the rest is
/// sent) to the default upstream, and all its bytes arrive intact; so do a binary first
/// byte and an SSLv2-style one (high bit set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_tls_client_takes_the_default_route() {
    let (a, a_caps) = capture_server().await;
    let (d, d_caps) = capture_server().await;
    let config = format!(
        r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
upstream = "d"

[[listener.route]]
sni = "a.test"
upstream = "a"
{}"#,
        upstreams(&[("a", a), ("d", d)])
    );
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("web");
    let admin = admin_addr(&ferry).await;

    // One byte first: it must come back (through the default server) before the rest is sent.
    let request = b"GET / HTTP/1.1\r\nHost: a.test\r\nUser-Agent: routes-test\r\n\r\n";
    let mut s = connect(addr).await;
    let http_client = s.local_addr().unwrap();
    s.write_all(&request[..1]).await.unwrap();
    let mut g = [0u8; 1];
    within(WAIT, "the first byte's echo", s.read_exact(&mut g))
        .await
        .expect("read the first byte's echo");
    assert_eq!(&g, b"G");
    s.write_all(&request[1..]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(WAIT, "the rest of the echo", s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert_eq!(rest, &request[1..]);

    let binary = cat(&[&[0x00, 0x01, 0x02, 0xff], &tail(20_000, 7)]);
    let binary_client = send_capture(addr, &binary).await;
    let sslv2 = cat(&[&[0x80, 0x2e, 0x01, 0x03, 0x01], &tail(100, 8)]);
    let sslv2_client = send_capture(addr, &sslv2).await;

    assert_eq!(
        captured(&d_caps),
        vec![request.to_vec(), binary.clone(), sslv2.clone()],
        "what the default server received"
    );
    assert!(captured(&a_caps).is_empty());
    let recs = ferry.records_with("ok", 3, WAIT).await;
    let clients = [http_client, binary_client, sslv2_client];
    for c in clients {
        let r = record_for(&recs, c);
        assert_eq!(r["upstream"], "d", "{r}");
        assert!(r["sni"].is_null(), "{r}");
        assert!(r["alpn"].is_null(), "{r}");
    }
    let m = metrics(admin).await;
    assert_eq!(route_matches(&m, "web", "default", "d"), 3.0);
    assert_eq!(route_matches(&m, "web", "1", "a"), 0.0);

    // Every byte the client sent reached the server, the first ones (read to route on, then
    // replayed) included: `bytes_up` and the byte counters count them all.
    let sizes = [request.len(), binary.len(), sslv2.len()];
    let counted: Vec<(Value, Value)> = clients
        .iter()
        .map(|c| {
            let r = record_for(&recs, *c);
            (r["bytes_up"].clone(), r["bytes_down"].clone())
        })
        .collect();
    let want: Vec<(Value, Value)> = sizes.iter().map(|n| ((*n).into(), (*n).into())).collect();
    assert_eq!(counted, want, "(bytes_up, bytes_down) of the three records");
    let total: usize = sizes.iter().sum();
    let up = |name: &str, labels: &[(&str, &str)]| metric_must(&m, name, labels);
    assert_eq!(
        (
            up(
                "ferry_bytes_total",
                &[("listener", "web"), ("direction", "up")]
            ),
            up(
                "ferry_server_bytes_total",
                &[("upstream", "d"), ("direction", "up")]
            ),
        ),
        (total as f64, total as f64),
        "ferry_bytes_total and ferry_server_bytes_total, direction up"
    );
}

// ---------------------------------------------------------------------------------------
// 5. source and port routes.

/// `port` routes on the local port the client reached (a listener on two ports), `source`
/// on the client address (bound to 127.0.0.2), first match wins; behind a PROXY header both
/// look at the header (its source, and its destination port). None of these needs the
/// ClientHello, so ferry reads nothing before connecting: a server-speaks-first backend's
/// banner reaches a client that sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_and_port_routes_read_nothing_from_the_client() {
    let x = banner_server("X\n").await;
    let y = banner_server("Y\n").await;
    let d = banner_server("D\n").await;
    let (p1, p2) = (free_port(), free_port());
    let config = format!(
        r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "multi"
listen = ["127.0.0.1:{p1}", "127.0.0.1:{p2}"]
upstream = "d"
# Longer than WAIT: a ferry that waited for the client's first bytes would fail the test.
handshake_timeout = "30s"

[[listener.route]]
port = {p2}
upstream = "x"

[[listener.route]]
source = ["127.0.0.2/32"]
upstream = "y"

[[listener]]
name = "proxied"
listen = "127.0.0.1:0"
upstream = "d"
proxy_protocol = {{ accept = "v1", trusted = ["127.0.0.1"] }}

[[listener.route]]
source = ["10.0.0.0/8"]
upstream = "y"

[[listener.route]]
port = [8443, 9443]
upstream = "x"
{}"#,
        upstreams(&[("x", x), ("y", y), ("d", d)])
    );
    let ferry = Ferry::start(&config, 3).await;
    let admin = admin_addr(&ferry).await;
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));

    // (source IP, port, the banner expected)
    let direct = [
        ("127.0.0.1", p1, "D"),
        ("127.0.0.1", p2, "X"),
        ("127.0.0.2", p1, "Y"),
        ("127.0.0.2", p2, "X"),
    ];
    let mut seen = Vec::new();
    for (src, port, want) in direct {
        let (client, r) = connect_src(src, at(port)).await;
        let mut s = r.unwrap_or_else(|e| panic!("connect from {src} to port {port}: {e}"));
        // Nothing sent: the banner must come anyway.
        assert_eq!(read_line(&mut s).await, want, "from {src} to port {port}");
        echo_round_trip(&mut s, b"and the relay works").await;
        seen.push((client, want));
    }

    let proxied = ferry.addr("proxied");
    let headers = [
        (
            "PROXY TCP4 10.1.2.3 192.0.2.1 40000 443\r\n",
            "10.1.2.3:40000",
            "Y",
        ),
        (
            "PROXY TCP4 192.0.2.9 192.0.2.1 40001 9443\r\n",
            "192.0.2.9:40001",
            "X",
        ),
        (
            "PROXY TCP4 192.0.2.9 192.0.2.1 40002 443\r\n",
            "192.0.2.9:40002",
            "D",
        ),
    ];
    for (header, client, want) in headers {
        let mut s = connect(proxied).await;
        s.write_all(header.as_bytes()).await.unwrap();
        assert_eq!(read_line(&mut s).await, want, "{header:?}");
        echo_round_trip(&mut s, b"behind the header").await;
        seen.push((client.parse().unwrap(), want));
    }

    let m = metrics(admin).await;
    assert_eq!(route_matches(&m, "multi", "1", "x"), 2.0);
    assert_eq!(route_matches(&m, "multi", "2", "y"), 1.0);
    assert_eq!(route_matches(&m, "multi", "default", "d"), 1.0);
    assert_eq!(route_matches(&m, "proxied", "1", "y"), 1.0);
    assert_eq!(route_matches(&m, "proxied", "2", "x"), 1.0);
    assert_eq!(route_matches(&m, "proxied", "default", "d"), 1.0);
    // The streams are closed (dropped) by now: every connection has its record.
    let recs = ferry.records(seen.len(), WAIT).await;
    for (client, want) in seen {
        let r = record_for(&recs, client);
        assert_eq!(r["upstream"], want.to_lowercase(), "{r}");
        assert!(r["sni"].is_null(), "{r}");
    }
}

// ---------------------------------------------------------------------------------------
// 6. No default route, no match.

/// A listener with routes and no `upstream`: a client whose SNI matches no route, a TLS
/// client without SNI and a plain-text client are refused (`no_server`, reason "no route
/// matched"; the client sees the connection closed without a byte), while a matching
/// client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_default_and_no_match_is_refused() {
    let (a, a_caps) = capture_server().await;
    let config = format!(
        r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "strict"
listen = "127.0.0.1:0"

[[listener.route]]
sni = ["a.test", "*.a.test"]
upstream = "a"
{}"#,
        upstreams(&[("a", a)])
    );
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("strict");
    let admin = admin_addr(&ferry).await;

    let other = refused_after(addr, &pki::client_hello(Some("other.test"), &["h2"]), WAIT).await;
    let no_sni = refused_after(addr, &pki::client_hello(None, &[]), WAIT).await;
    let plain = refused_after(addr, b"GET / HTTP/1.1\r\n\r\n", WAIT).await;
    let served = send_capture(addr, &pki::client_hello(Some("www.a.test"), &[])).await;
    assert_eq!(
        captured(&a_caps).len(),
        1,
        "only the matching client reached the server"
    );

    let refused = ferry.records_with("no_server", 3, WAIT).await;
    assert_eq!(refused.len(), 3, "{refused:#?}");
    for (client, sni) in [(other, Some("other.test")), (no_sni, None), (plain, None)] {
        let r = record_for(&refused, client);
        assert_eq!(r["reason"], "no route matched", "{r}");
        assert_eq!(r["sni"], json_str(sni), "{r}");
        assert!(r["upstream"].is_null(), "{r}");
        assert!(r["server"].is_null(), "{r}");
        assert_eq!(r["bytes_up"], 0, "{r}");
        assert_eq!(r["bytes_down"], 0, "{r}");
    }
    let ok = ferry.records_with("ok", 1, WAIT).await;
    assert_eq!(record_for(&ok, served)["upstream"], "a");

    let m = metrics(admin).await;
    assert_eq!(route_matches(&m, "strict", "1", "a"), 1.0);
    assert!(
        samples(&m, "ferry_route_matches_total", &[("listener", "strict")]).len() == 1,
        "a listener without a default has no `default` route sample:\n{m}"
    );
    let st = status(admin).await;
    assert_eq!(status_routes(&st, "strict"), routes(&[("1", "a", 1)]));
    let l = st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "strict")
        .unwrap();
    assert!(l["upstream"].is_null(), "{l}");
    assert_eq!(l["results"]["no_server"], 3, "{l}");
}

// ---------------------------------------------------------------------------------------
// 7. Slow, partial and broken ClientHellos.

/// With `handshake_timeout = "1s"` on an SNI-routed listener, a client that sends nothing,
/// one that sends a record header only and one that sends half a ClientHello are closed
/// within WAIT without a byte (`protocol_error`, with the reason); meanwhile another client
/// is served. A client that closes in the middle of its hello and one whose hello is not a
/// ClientHello are closed at once, each with its reason. No server ever sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_partial_and_broken_client_hellos_are_closed() {
    let (a, a_caps) = capture_server().await;
    let (d, d_caps) = capture_server().await;
    let config = format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "edge"
listen = "127.0.0.1:0"
upstream = "d"
handshake_timeout = "1s"

[[listener.route]]
sni = "a.test"
upstream = "a"
{}"#,
        upstreams(&[("a", a), ("d", d)])
    );
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("edge");
    let hello = pki::client_hello(Some("a.test"), &[]);

    let open = |first: Vec<u8>| async move {
        let (client, r) = connect_from(addr).await;
        let mut s = r.unwrap_or_else(|e| panic!("connect: {e}"));
        s.write_all(&first).await.unwrap();
        (client, s)
    };
    let (silent, mut silent_s) = open(Vec::new()).await;
    let (header, mut header_s) = open(hello[..5].to_vec()).await;
    let (half, mut half_s) = open(hello[..hello.len() / 2].to_vec()).await;

    // Meanwhile, a complete hello is served.
    let served = send_capture(addr, &cat(&[&hello, b"served meanwhile"])).await;

    for (what, s) in [
        ("silent", &mut silent_s),
        ("record header only", &mut header_s),
        ("half a hello", &mut half_s),
    ] {
        let (data, _) = read_until_closed(s, WAIT).await;
        assert!(data.is_empty(), "{what}: got {data:?}");
    }

    // Closed in the middle of the hello; a handshake message that is not a ClientHello.
    let (closed_mid, r) = connect_from(addr).await;
    let mut s = r.unwrap();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    let (data, _) = read_until_closed(&mut s, WAIT).await;
    assert!(data.is_empty());
    let server_hello = [0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x00];
    let broken = refused_after(addr, &server_hello, WAIT).await;

    let errs = ferry.records_with("protocol_error", 5, WAIT).await;
    assert_eq!(errs.len(), 5, "{errs:#?}");
    for c in [silent, header, half] {
        let r = record_for(&errs, c);
        assert_eq!(r["reason"], "handshake not complete within 1s", "{r}");
        assert!(r["upstream"].is_null() && r["server"].is_null(), "{r}");
    }
    assert_eq!(
        record_for(&errs, closed_mid)["reason"],
        "closed in the middle of the ClientHello"
    );
    let r = record_for(&errs, broken);
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.starts_with("bad ClientHello: ")),
        "{r}"
    );

    let ok = ferry.records_with("ok", 1, WAIT).await;
    assert_eq!(record_for(&ok, served)["upstream"], "a");
    assert_eq!(captured(&a_caps).len(), 1);
    assert!(
        captured(&d_caps).is_empty(),
        "a broken client reached the default server"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Reload replaces routes.

/// A route's upstream changed in the file and SIGHUP: new connections follow the new route,
/// a connection routed before stays with its server; the route counters start again for
/// the changed routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_replaces_routes() {
    let one = tagged_echo("ONE").await;
    let two = tagged_echo("TWO").await;
    let def = tagged_echo("DEF").await;
    let config = |target: &str| {
        format!(
            r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "edge"
listen = "127.0.0.1:0"
upstream = "def"

[[listener.route]]
sni = "a.test"
upstream = "{target}"
{}"#,
            upstreams(&[("one", one), ("two", two), ("def", def)])
        )
    };
    let ferry = Ferry::start(&config("one"), 1).await;
    let addr = ferry.addr("edge");
    let admin = admin_addr(&ferry).await;
    let hello = pki::client_hello(Some("a.test"), &[]);

    // Opens a connection with SNI a.test; returns it and the server's tag.
    let open = |hello: Vec<u8>| async move {
        let mut s = connect(addr).await;
        s.write_all(&hello).await.unwrap();
        let tag = read_line(&mut s).await;
        let mut back = vec![0u8; hello.len()];
        within(WAIT, "the hello's echo", s.read_exact(&mut back))
            .await
            .unwrap();
        assert!(back == hello, "the hello came back changed");
        (s, tag)
    };
    let (mut old, tag) = open(hello.clone()).await;
    assert_eq!(tag, "ONE");
    let old_client = old.local_addr().unwrap();

    let text = config("two").replace("@LOG@", &ferry.log_path.display().to_string());
    std::fs::write(&ferry.config_path, text).unwrap();
    ferry.signal("HUP");
    ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("reload: listener \"edge\""))
        .await
        .unwrap_or_else(|| panic!("reload not applied:\n{}", ferry.stderr.text()));

    let (new, tag) = open(hello.clone()).await;
    assert_eq!(tag, "TWO", "a new connection after the reload");
    // The old connection stays where it was routed.
    echo_round_trip(&mut old, b"still on the old server").await;
    drop(old);
    drop(new);

    let recs = ferry.records_with("ok", 2, WAIT).await;
    let r = record_for(&recs, old_client);
    assert_eq!(r["upstream"], "one", "{r}");
    assert_eq!(r["server"], one.to_string(), "{r}");
    assert!(recs.iter().any(|r| r["upstream"] == "two"), "{recs:#?}");

    let m = metrics(admin).await;
    assert_eq!(route_matches(&m, "edge", "1", "two"), 1.0);
    assert_eq!(
        samples(
            &m,
            "ferry_route_matches_total",
            &[("listener", "edge"), ("upstream", "one")]
        ),
        vec![],
        "the replaced route is gone from the metrics"
    );
    assert_eq!(
        status_routes(&status(admin).await, "edge"),
        routes(&[("1", "two", 1), ("default", "def", 0)])
    );
}

/// A reload that points a route at another upstream starts its counter again and reports
/// the listener changed, also when the new upstream sits where the old one was in the file
/// (the same by position, not by name): `ferry_route_matches_total` must not credit the new
/// upstream with the old one's matches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_retargeting_a_route_resets_its_count() {
    let one = tagged_echo("ONE").await;
    let two = tagged_echo("TWO").await;
    let config = |target: &str, order: [(&'static str, SocketAddr); 2]| {
        format!(
            r#"
[admin]
listen = "127.0.0.1:0"

[[listener]]
name = "edge"
listen = "127.0.0.1:0"

[[listener.route]]
source = ["127.0.0.0/8"]
upstream = "{target}"
{}"#,
            upstreams(&order)
        )
    };
    let ferry = Ferry::start(&config("one", [("one", one), ("two", two)]), 1).await;
    let admin = admin_addr(&ferry).await;
    let (_s, tag) = connect_tagged(ferry.addr("edge")).await;
    assert_eq!(tag, "ONE");
    assert_eq!(
        route_matches(&metrics(admin).await, "edge", "1", "one"),
        1.0
    );

    // "two" now first in the file, and the route's target: the same position as before.
    std::fs::write(
        &ferry.config_path,
        config("two", [("two", two), ("one", one)]),
    )
    .unwrap();
    ferry.signal("HUP");
    ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("reload: "))
        .await
        .unwrap_or_else(|| panic!("reload not applied:\n{}", ferry.stderr.text()));
    let (_t, tag) = connect_tagged(ferry.addr("edge")).await;
    assert_eq!(tag, "TWO", "the new route");
    let count = route_matches(&metrics(admin).await, "edge", "1", "two");
    let reported = ferry
        .stderr
        .text()
        .contains("reload: listener \"edge\" changed");
    assert!(
        count == 1.0 && reported,
        "after the route was pointed at another upstream: its count is {count} (want 1: \
         only its own match), and the reload said the listener changed: {reported}\nstderr:\n{}",
        ferry.stderr.text()
    );
    assert_eq!(
        status_routes(&status(admin).await, "edge"),
        routes(&[("1", "two", 1)])
    );
}

// ---------------------------------------------------------------------------------------
// Routes on a TLS listener (mode "tls").

/// On a `mode = "tls"` listener routes see the terminated handshake: `sni` the name the
/// client asked for, `alpn` the protocol agreed (not merely offered). The record shows the
/// agreed ALPN and the TLS version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_on_a_tls_listener_see_the_agreed_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("front CA");
    let (cert, key) = ca.server(&["a.test", "b.test"]).write(dir.path(), "front");
    let a = tagged_echo("A").await;
    let h = tagged_echo("H").await;
    let d = tagged_echo("D").await;
    let config = format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "tls"
listen = "127.0.0.1:0"
mode = "tls"
tls = {{ cert = "{}", key = "{}", alpn = ["h2", "http/1.1"] }}
upstream = "d"

[[listener.route]]
sni = "a.test"
upstream = "a"

[[listener.route]]
alpn = "h2"
upstream = "h"
{}"#,
        cert.display(),
        key.display(),
        upstreams(&[("a", a), ("h", h), ("d", d)])
    );
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("tls");
    let cases: [(&str, &[&str], &str, Option<&str>); 5] = [
        ("a.test", &["h2"], "A", Some("h2")),
        ("b.test", &["h2", "http/1.1"], "H", Some("h2")),
        ("b.test", &["http/1.1", "h2"], "H", Some("h2")),
        ("b.test", &["http/1.1"], "D", Some("http/1.1")),
        ("b.test", &[], "D", None),
    ];
    let mut seen = Vec::new();
    for (sni, alpn, want, agreed) in cases {
        let (pem, alpn_owned) = (
            ca.pem(),
            alpn.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        let (client, tag) = blocking("a TLS client", move || {
            use std::io::Read;
            let roots = [pem];
            let alpn: Vec<&str> = alpn_owned.iter().map(String::as_str).collect();
            let o = ClientOpts {
                sni: Some(sni),
                roots: &roots,
                alpn: &alpn,
                ..ClientOpts::default()
            };
            let mut s = pki::tls_connect(addr, &o, WAIT).expect("TLS to ferry");
            let mut tag = Vec::new();
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).is_ok() && b[0] != b'\n' {
                tag.push(b[0]);
            }
            let echoed = pki::tls_echo(&mut s, b"through").expect("echo");
            assert_eq!(echoed, b"through");
            let client = s.sock.local_addr().unwrap();
            close_tls(s);
            (client, String::from_utf8(tag).unwrap())
        })
        .await;
        assert_eq!(tag, want, "SNI {sni}, ALPN offered {alpn:?}");
        seen.push((client, sni, agreed, want));
    }
    let recs = ferry.records_with("ok", seen.len(), WAIT).await;
    for (client, sni, agreed, want) in seen {
        let r = record_for(&recs, client);
        assert_eq!(r["upstream"], want.to_lowercase(), "{r}");
        assert_eq!(r["sni"], sni, "{r}");
        assert_eq!(r["alpn"], json_str(agreed), "{r}");
        assert!(r["tls_version"].is_string(), "{r}");
    }
}

// ---------------------------------------------------------------------------------------
// 9. Config errors.

const POOL: &str = r#"
[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#;

#[test]
fn route_without_a_matcher() {
    assert_check_errors(
        &format!(
            r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[listener.route]]
upstream = "pool"
{POOL}"#
        ),
        &[
            "6:1: a route needs at least one matcher: `sni`, `alpn`, `source` or `port` (the listener's `upstream` is the route for everything else)",
        ],
    );
}

#[test]
fn route_names_an_undefined_upstream() {
    assert_check_errors(
        &format!(
            r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[listener.route]]
sni = "a.test"
upstream = "nope"
{POOL}"#
        ),
        &[r#"8:12: listener "web" names upstream "nope", which is not defined"#],
    );
}

#[test]
fn bad_sni_patterns() {
    assert_check_errors(
        &format!(
            r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[listener.route]]
sni = ["ok.test", "a..test", "*.*.b.test", "a.test:443", "*", "b.*.test", ""]
upstream = "pool"
{POOL}"#
        ),
        &[
            r#"7:19: `sni`: "a..test" is not a host name or a wildcard such as "*.example.com""#,
            r#"7:30: `sni`: "*.*.b.test" is not a host name or a wildcard such as "*.example.com""#,
            r#"7:44: `sni`: "a.test:443" is not a host name or a wildcard such as "*.example.com""#,
            r#"7:58: `sni`: "*" is not a host name or a wildcard such as "*.example.com""#,
            r#"7:63: `sni`: "b.*.test" is not a host name or a wildcard such as "*.example.com""#,
            r#"7:75: `sni`: "" is not a host name or a wildcard such as "*.example.com""#,
        ],
    );
}

#[test]
fn bad_ports_sources_and_alpn() {
    assert_check_errors(
        &format!(
            r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[listener.route]]
port = 0
upstream = "pool"

[[listener.route]]
port = [443, 70000]
upstream = "pool"

[[listener.route]]
source = ["10.0.0.0/33"]
alpn = ""
upstream = "pool"
{POOL}"#
        ),
        &[
            "7:8: `port` must be an integer from 1 to 65535",
            "11:14: `port` must be an integer from 1 to 65535",
            r#"15:11: `source`: "10.0.0.0/33" is not a network (e.g. "10.0.0.0/8") or an IP address"#,
            "16:8: `alpn`: a protocol name is 1 to 255 bytes",
        ],
    );
}

#[test]
fn listener_with_neither_upstream_nor_routes() {
    assert_check_errors(
        &format!(
            r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
{POOL}"#
        ),
        &[
            r#"1:1: listener "web" has nowhere to send connections: give it `upstream` (and, if you like, [[listener.route]] entries)"#,
        ],
    );
}

#[test]
fn route_keys_are_checked() {
    assert_check_errors(
        &format!(
            r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[listener.route]]
host = "a.test"
upstream = "pool"

[[listener.route]]
sni = "a.test"
{POOL}"#
        ),
        &[
            // The misspelt key leaves the first route without a matcher: both are said.
            "6:1: a route needs at least one matcher: `sni`, `alpn`, `source` or `port` (the listener's `upstream` is the route for everything else)",
            "7:1: unknown key `host` in [[listener.route]]; expected one of: sni, alpn, source, port, upstream",
            "10:1: [[listener.route]] is missing the required key `upstream`",
        ],
    );
}

/// An empty matcher list (`sni = []`) makes a route that can never match (and, for `sni`
/// and `alpn`, makes every connection wait for a ClientHello for nothing). `listen = []`
/// and `servers = []` are refused; so must these be, each at its value.
#[test]
fn empty_matcher_lists_are_errors() {
    let Checked {
        code,
        errors,
        stderr,
        ..
    } = check_config_in(
        None,
        &format!(
            r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[listener.route]]
sni = []
upstream = "pool"

[[listener.route]]
port = []
alpn = []
source = []
upstream = "pool"
{POOL}"#
        ),
    );
    assert_eq!(
        code,
        Some(1),
        "empty matcher lists were accepted:\n{stderr}"
    );
    for (at, key) in [
        ("7:7", "sni"),
        ("11:8", "port"),
        ("12:8", "alpn"),
        ("13:10", "source"),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(&format!("{at}: ")) && e.contains(&format!("`{key}`"))),
            "no error for the empty `{key}` at {at}:\n{stderr}"
        );
    }
}

#[test]
fn routes_check_ok() {
    let text = format!(
        r#"[[listener]]
name = "web"
listen = ["127.0.0.1:8443", "127.0.0.1:9443"]

[[listener.route]]
sni = ["a.test", "*.B.Test."]
alpn = ["h2", "http/1.1"]
source = ["10.0.0.0/8", "::1/128"]
port = [8443, 9443]
upstream = "pool"
{POOL}"#
    );
    let Checked {
        code,
        errors,
        stderr,
        ..
    } = check_config_in(None, &text);
    assert_eq!(code, Some(0), "{errors:?}\n{stderr}");
}
