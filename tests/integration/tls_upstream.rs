//! TLS to the servers (`tls` on an upstream): certificates verified against `ca`, the name
//! sent and verified (`sni`, or the server's configured host name, or its IP address), mTLS
//! to the servers, `verify = false`, re-encryption behind a TLS listener, health checks
//! inside TLS, failures counted and retried, handshake timeouts, resumption, and a PROXY
//! header ahead of the handshake.
//!
//! The servers are in-process rustls servers on std threads ([`tls_server`]), which record
//! what each handshake showed them (SNI, ALPN, client certificate, resumption) and how many
//! application bytes they received, and `openssl s_server` where a real peer is wanted.
//! Every wait is bounded.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::pki::{self, Ca, ClientOpts, Leaf};
use crate::common::*;
use crate::ops_support::*;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::server::WebPkiClientVerifier;
use rustls::{HandshakeKind, RootCertStore, ServerConfig, ServerConnection};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// Shared helpers: a rustls server that reports what it saw.

/// What a [`tls_server`] does once its handshake is complete.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Echoes everything.
    Echo,
    /// Answers a first read starting with `PING` with `+PONG\r\n`, then echoes.
    Pong,
    /// Reads exactly this many bytes, then sends as many pseudo-random bytes (seed
    /// [`SOURCE_SEED`]) followed by the SHA-256 of what it read, and closes.
    SinkThenSource(usize),
    /// Sends [`BANNER`] first, then echoes. `half_rtt`: the banner goes with the server's
    /// last handshake flight (TLS 1.3 0.5-RTT data), before the client's Finished.
    Banner { half_rtt: bool },
}

const BANNER: &[u8] = b"220 tls banner\r\n";

const SOURCE_SEED: u64 = 0x5eed;

struct ServerOpts {
    leaf: Leaf,
    /// Require a client certificate issued by this CA (PEM).
    client_ca: Option<String>,
    tls12_only: bool,
    alpn: &'static [&'static str],
    mode: Mode,
    /// Read a PROXY v1 header (up to CRLF) before the TLS handshake.
    proxy_v1: bool,
}

impl ServerOpts {
    fn new(leaf: &Leaf) -> ServerOpts {
        ServerOpts {
            leaf: leaf.clone(),
            client_ca: None,
            tls12_only: false,
            alpn: &[],
            mode: Mode::Echo,
            proxy_v1: false,
        }
    }
}

/// What a [`tls_server`] saw, over all its connections.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    /// Handshakes completed.
    handshakes: AtomicUsize,
    /// Of those, resumed.
    resumed: AtomicUsize,
    /// Why handshakes failed.
    failed: Mutex<Vec<String>>,
    /// The SNI of every handshake that got as far as a ClientHello (`None`: no SNI).
    snis: Mutex<Vec<Option<String>>>,
    /// The ALPN protocol agreed by each completed handshake.
    alpns: Mutex<Vec<Option<String>>>,
    /// The client certificate (DER) of each completed handshake.
    client_certs: Mutex<Vec<Option<Vec<u8>>>>,
    /// PROXY headers read before the handshakes.
    proxy_headers: Mutex<Vec<String>>,
    /// Application data received, in bytes.
    app_bytes: AtomicU64,
    pings: AtomicUsize,
}

impl Seen {
    fn failed(&self) -> Vec<String> {
        self.failed.lock().unwrap().clone()
    }
    fn snis(&self) -> Vec<Option<String>> {
        self.snis.lock().unwrap().clone()
    }
}

struct TlsServer {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

/// A TLS server on 127.0.0.1 (and on [::1] at the same port when it can, for a server
/// configured as `localhost`), a thread per connection.
fn tls_server(o: ServerOpts) -> TlsServer {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if o.tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let b = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap();
    let b = match &o.client_ca {
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            b.with_client_cert_verifier(v)
        }
        None => b.with_no_client_auth(),
    };
    let mut cfg = b
        .with_single_cert(vec![o.leaf.cert_der()], o.leaf.key_der())
        .unwrap();
    cfg.alpn_protocols = o.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    cfg.send_half_rtt_data = o.mode == (Mode::Banner { half_rtt: true });
    let cfg = Arc::new(cfg);
    let seen = Arc::new(Seen::default());

    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = v4.local_addr().unwrap();
    let mut listeners = vec![v4];
    if let Ok(v6) = TcpListener::bind(("::1", addr.port())) {
        listeners.push(v6);
    }
    for l in listeners {
        let (cfg, seen) = (cfg.clone(), seen.clone());
        let (mode, proxy_v1) = (o.mode, o.proxy_v1);
        std::thread::spawn(move || {
            for sock in l.incoming() {
                let Ok(sock) = sock else { continue };
                let (cfg, seen) = (cfg.clone(), seen.clone());
                std::thread::spawn(move || serve_tls(sock, cfg, &seen, mode, proxy_v1));
            }
        });
    }
    TlsServer { addr, seen }
}

fn serve_tls(
    mut sock: std::net::TcpStream,
    cfg: Arc<ServerConfig>,
    seen: &Seen,
    mode: Mode,
    proxy_v1: bool,
) {
    seen.accepted.fetch_add(1, SeqCst);
    let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = sock.set_write_timeout(Some(Duration::from_secs(30)));
    if proxy_v1 {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            if sock.read_exact(&mut b).is_err() {
                return;
            }
            line.push(b[0]);
        }
        seen.proxy_headers
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&line).into_owned());
    }
    let mut conn = ServerConnection::new(cfg).unwrap();
    if mode == (Mode::Banner { half_rtt: true }) {
        conn.writer().write_all(BANNER).unwrap();
    }
    let mut failure = None;
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut sock) {
            failure = Some(e.to_string());
            break;
        }
    }
    // Whatever happened next, a ClientHello that was read shows its SNI.
    if failure.is_none() || conn.server_name().is_some() {
        seen.snis
            .lock()
            .unwrap()
            .push(conn.server_name().map(str::to_string));
    }
    if let Some(f) = failure {
        seen.failed.lock().unwrap().push(f);
        return;
    }
    seen.handshakes.fetch_add(1, SeqCst);
    if conn.handshake_kind() == Some(HandshakeKind::Resumed) {
        seen.resumed.fetch_add(1, SeqCst);
    }
    seen.alpns.lock().unwrap().push(
        conn.alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
    );
    seen.client_certs
        .lock()
        .unwrap()
        .push(conn.peer_certificates().map(|c| c[0].to_vec()));

    let mut s = rustls::StreamOwned::new(conn, sock);
    if mode == (Mode::Banner { half_rtt: false }) && s.write_all(BANNER).is_err() {
        return;
    }
    match mode {
        Mode::Echo | Mode::Pong | Mode::Banner { .. } => {
            let mut buf = vec![0u8; 64 * 1024];
            let mut first = true;
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                seen.app_bytes.fetch_add(n as u64, SeqCst);
                let reply: &[u8] = if first && mode == Mode::Pong && buf[..n].starts_with(b"PING") {
                    seen.pings.fetch_add(1, SeqCst);
                    b"+PONG\r\n"
                } else {
                    &buf[..n]
                };
                first = false;
                if s.write_all(reply).is_err() {
                    break;
                }
            }
        }
        Mode::SinkThenSource(n) => {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut got = 0;
            while got < n {
                let want = (n - got).min(buf.len());
                match s.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => {
                        h.update(&buf[..k]);
                        got += k;
                        seen.app_bytes.fetch_add(k as u64, SeqCst);
                    }
                }
            }
            let mut rng = Prng::new(SOURCE_SEED);
            let mut left = n;
            while left > 0 {
                let k = left.min(buf.len());
                rng.fill(&mut buf[..k]);
                if s.write_all(&buf[..k]).is_err() {
                    return;
                }
                left -= k;
            }
            let digest: [u8; 32] = h.finalize().into();
            if s.write_all(&digest).is_err() {
                return;
            }
        }
    }
    s.conn.send_close_notify();
    let _ = s.flush();
    let _ = s.sock.shutdown(Shutdown::Write);
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    within(WAIT, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Runs `f` (blocking socket work: the rustls client) on the blocking pool, bounded; a
/// panic in `f` is the test's panic.
async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match within(2 * WAIT, what, tokio::task::spawn_blocking(f)).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Files (certificates, keys) for one test.
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Files {
        Files(tempfile::tempdir().unwrap())
    }
    fn dir(&self) -> &Path {
        self.0.path()
    }
    fn ca(&self, ca: &Ca, name: &str) -> String {
        ca.write(self.dir(), name).display().to_string()
    }
    fn leaf(&self, leaf: &Leaf, name: &str) -> (String, String) {
        let (c, k) = leaf.write(self.dir(), name);
        (c.display().to_string(), k.display().to_string())
    }
}

/// `[[listener]]` NAME on 127.0.0.1:0 in front of upstream NAME (mode tcp).
fn listener(name: &str) -> String {
    format!("\n[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{name}\"\n")
}

/// `[[upstream]]` NAME with `servers` and `tls = { TLS }`, then `extra` lines.
fn upstream(name: &str, servers: &[String], tls: &str, extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "\n[[upstream]]\nname = \"{name}\"\nservers = [{}]\ntls = {{ {tls} }}\n{extra}\n",
        list.join(", ")
    )
}

const HEAD: &str = r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"
"#;

/// Connects a plaintext client and expects the connection closed without a byte, after
/// it sent `msg`. Returns the client address.
async fn closed_without_data(addr: SocketAddr, msg: &[u8]) -> SocketAddr {
    let (client, r) = connect_from(addr).await;
    let mut s = match r {
        Ok(s) => s,
        // Refused so fast that the connect itself saw the reset.
        Err(e) if is_reset(&e) => return client,
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    if let Err(e) = s.write_all(msg).await {
        assert!(is_reset(&e), "write: {e}");
        return client;
    }
    let (data, _) = read_until_closed(&mut s, WAIT).await;
    assert!(data.is_empty(), "client {client} got {data:?}");
    client
}

/// Sends `n` pseudo-random bytes through `s` (to an echo server) while reading the echo;
/// asserts the echo's SHA-256 is the data's. Half-closes and reads to the end.
async fn bulk_echo(s: &mut tokio::net::TcpStream, n: u64) {
    within(WAIT, "a bulk echo", async {
        let (mut r, mut w) = s.split();
        let write = async {
            let h = send_prng(&mut w, n, 77).await.expect("write");
            w.shutdown().await.expect("shutdown");
            h
        };
        let (sent, got) = tokio::join!(write, read_hash(&mut r));
        let (len, h) = got.expect("read");
        assert_eq!(len, n, "echoed length");
        assert_eq!(h, sent, "echoed bytes differ");
    })
    .await
}

/// The reason of a record, lowercased.
fn reason(r: &Value) -> String {
    r["reason"].as_str().unwrap_or_default().to_lowercase()
}

/// `ferry_server_connect_failures_total` of one server.
fn connect_failures(m: &str, upstream: &str, server: SocketAddr) -> f64 {
    metric_must(
        m,
        "ferry_server_connect_failures_total",
        &[("upstream", upstream), ("server", &server.to_string())],
    )
}

/// An `openssl s_server -rev` on a free loopback port with `args` added; killed on drop.
async fn s_server(args: &[&str]) -> (Peer, SocketAddr) {
    let port = free_port();
    let mut cmd = Command::new("openssl");
    cmd.args(["s_server", "-accept", &format!("127.0.0.1:{port}"), "-rev"])
        .args(args);
    let mut p = Peer::spawn("openssl s_server", cmd, tempfile::tempdir().unwrap());
    p.wait_listening(&[port]).await;
    (p, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------
// 10. TLS to the server, verified against `ca`.

/// A plaintext client through a tcp listener reaches a TLS server: echo round trips and a
/// 256 KiB bulk echo work; the server saw every handshake with SNI = the configured `sni`
/// and agreed the configured ALPN. A plain-text client on a listener whose routes read the
/// ClientHello has its first bytes (read to route on) sent inside TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verified_against_ca() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let leaf = ca.server(&["good.test"]);
    let backend = tls_server(ServerOpts {
        alpn: &["h2", "http/1.1"],
        ..ServerOpts::new(&leaf)
    });
    let ca_path = files.ca(&ca, "ca");
    let tls = format!(r#"ca = "{ca_path}", sni = "good.test", alpn = ["h2"]"#);
    let config = format!(
        r#"{HEAD}{}
[[listener]]
name = "routed"
listen = "127.0.0.1:0"
upstream = "tls"

[[listener.route]]
sni = "elsewhere.test"
upstream = "tls"
{}"#,
        listener("tls"),
        upstream("tls", &[backend.addr.to_string()], &tls, "")
    );
    let ferry = Ferry::start(&config, 2).await;

    let mut s = connect(ferry.addr("tls")).await;
    let client = s.local_addr().unwrap();
    echo_round_trip(&mut s, b"hello over TLS").await;
    bulk_echo(&mut s, 256 * 1024).await;
    drop(s);

    // A plain-text client on the routed listener: the bytes read to route on are replayed
    // inside TLS.
    let request = b"GET / HTTP/1.1\r\nHost: good.test\r\n\r\n";
    let mut s = connect(ferry.addr("routed")).await;
    s.write_all(request).await.unwrap();
    let mut back = vec![0u8; request.len()];
    within(WAIT, "the request's echo", s.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(back, request);
    drop(s);

    // A client whose first read is large (a ClientHello and 60 KB after it, in one write):
    // all of it, first read included, goes inside TLS intact.
    let hello = pki::client_hello(Some("other.test"), &["h2"]);
    let mut big = hello.clone();
    big.extend_from_slice(&{
        let mut t = vec![0u8; 60_000];
        Prng::new(5).fill(&mut t);
        t
    });
    let mut s = connect(ferry.addr("routed")).await;
    let (mut rd, mut wr) = s.split();
    let (_, back) = within(WAIT, "the big echo", async {
        tokio::join!(
            async {
                wr.write_all(&big).await.unwrap();
                wr.shutdown().await.unwrap();
            },
            async {
                let mut back = Vec::new();
                rd.read_to_end(&mut back).await.unwrap();
                back
            }
        )
    })
    .await;
    assert!(back == big, "{} bytes back of {}", back.len(), big.len());
    drop(s);

    let recs = ferry.records_with("ok", 3, WAIT).await;
    let r = record_for(&recs, client);
    assert_eq!(r["upstream"], "tls", "{r}");
    assert_eq!(r["server"], backend.addr.to_string(), "{r}");
    let n = 14 + 256 * 1024;
    assert_eq!(r["bytes_up"], n, "plaintext bytes up: {r}");
    assert_eq!(r["bytes_down"], n, "plaintext bytes down: {r}");
    assert!(r["connect_ms"].as_f64().is_some(), "{r}");
    // ferry terminated nothing on the client side.
    assert!(r["tls_version"].is_null(), "{r}");

    let seen = &backend.seen;
    assert_eq!(seen.handshakes.load(SeqCst), 3);
    assert!(seen.failed().is_empty(), "{:?}", seen.failed());
    assert_eq!(seen.snis(), vec![Some("good.test".to_string()); 3]);
    assert_eq!(
        *seen.alpns.lock().unwrap(),
        vec![Some("h2".to_string()); 3],
        "the ALPN agreed with the server"
    );
    assert_eq!(
        seen.app_bytes.load(SeqCst),
        (n + request.len() + big.len()) as u64
    );
}

// ---------------------------------------------------------------------------------------
// 11. A server certificate from another CA.

/// The server's certificate is from a CA ferry does not trust: `connect_failed` with a
/// reason about the certificate; the client's connection is closed without a byte; the
/// server's handshake fails and it never receives application data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_fails_the_connect_and_relays_nothing() {
    let files = Files::new();
    let trusted = Ca::new("trusted CA");
    let other = Ca::new("other CA");
    let backend = tls_server(ServerOpts::new(&other.server(&["good.test"])));
    let tls = format!(r#"ca = "{}", sni = "good.test""#, files.ca(&trusted, "ca"));
    let config = format!(
        "{HEAD}{}{}",
        listener("tls"),
        upstream("tls", &[backend.addr.to_string()], &tls, "")
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;

    let client = closed_without_data(ferry.addr("tls"), b"a secret the server must not get").await;
    let recs = ferry.records_with("connect_failed", 1, WAIT).await;
    let r = record_for(&recs, client);
    assert!(reason(r).contains("certificate"), "reason: {r}");
    assert_eq!(r["server"], backend.addr.to_string(), "{r}");
    assert_eq!(r["upstream"], "tls", "{r}");
    assert_eq!(r["bytes_up"], 0, "{r}");

    until("the server's handshake to fail", || {
        !backend.seen.failed().is_empty()
    })
    .await;
    assert_eq!(backend.seen.handshakes.load(SeqCst), 0);
    assert_eq!(backend.seen.app_bytes.load(SeqCst), 0);
    assert_eq!(
        connect_failures(&metrics(admin).await, "tls", backend.addr),
        1.0
    );
}

// ---------------------------------------------------------------------------------------
// 12. The wrong name.

/// `sni = "other.test"` while the certificate is for `good.test`: the server is asked for
/// `other.test` (it saw that SNI), the name does not verify: `connect_failed`, nothing
/// relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_sni_fails_the_connect_and_relays_nothing() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let backend = tls_server(ServerOpts::new(&ca.server(&["good.test"])));
    let tls = format!(r#"ca = "{}", sni = "other.test""#, files.ca(&ca, "ca"));
    let config = format!(
        "{HEAD}{}{}",
        listener("tls"),
        upstream("tls", &[backend.addr.to_string()], &tls, "")
    );
    let ferry = Ferry::start(&config, 1).await;

    let client = closed_without_data(ferry.addr("tls"), b"not for the wrong server").await;
    let recs = ferry.records_with("connect_failed", 1, WAIT).await;
    let r = record_for(&recs, client);
    assert!(reason(r).contains("certificate"), "reason: {r}");
    assert_eq!(r["server"], backend.addr.to_string(), "{r}");

    until("the server's handshake to fail", || {
        !backend.seen.failed().is_empty()
    })
    .await;
    assert_eq!(backend.seen.snis(), vec![Some("other.test".to_string())]);
    assert_eq!(backend.seen.handshakes.load(SeqCst), 0);
    assert_eq!(backend.seen.app_bytes.load(SeqCst), 0);
}

// ---------------------------------------------------------------------------------------
// 13. The name from the server's address.

/// Without `sni`: a server configured as `localhost:PORT` is asked for and verified as
/// `localhost`; one configured by IP address is verified against the IP (no SNI sent), so
/// its certificate needs an IP subjectAltName: without one, `connect_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_name_is_the_configured_host_or_ip() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let by_name = tls_server(ServerOpts::new(&ca.server(&["localhost"])));
    let by_ip = tls_server(ServerOpts::new(&ca.server(&["ip.test", "127.0.0.1"])));
    let no_ip_san = tls_server(ServerOpts::new(&ca.server(&["good.test"])));
    let tls = format!(r#"ca = "{}""#, files.ca(&ca, "ca"));
    let config = format!(
        "{HEAD}{}{}{}{}{}{}",
        listener("byname"),
        upstream(
            "byname",
            &[format!("localhost:{}", by_name.addr.port())],
            &tls,
            ""
        ),
        listener("byip"),
        upstream("byip", &[by_ip.addr.to_string()], &tls, ""),
        listener("noipsan"),
        upstream("noipsan", &[no_ip_san.addr.to_string()], &tls, ""),
    );
    let ferry = Ferry::start(&config, 3).await;

    let mut s = connect(ferry.addr("byname")).await;
    echo_round_trip(&mut s, b"to localhost").await;
    assert_eq!(by_name.seen.snis(), vec![Some("localhost".to_string())]);

    let mut s = connect(ferry.addr("byip")).await;
    echo_round_trip(&mut s, b"to 127.0.0.1").await;
    assert_eq!(by_ip.seen.snis(), vec![None], "no SNI for an IP address");

    let client = closed_without_data(ferry.addr("noipsan"), b"x").await;
    let recs = ferry.records_with("connect_failed", 1, WAIT).await;
    let r = record_for(&recs, client);
    assert_eq!(r["upstream"], "noipsan", "{r}");
    assert!(reason(r).contains("certificate"), "reason: {r}");
    until("the server's handshake to fail", || {
        !no_ip_san.seen.failed().is_empty()
    })
    .await;
    assert_eq!(no_ip_san.seen.app_bytes.load(SeqCst), 0);
}

// ---------------------------------------------------------------------------------------
// 14. mTLS to the servers.

/// Servers that require a client certificate from CA2, and the client certificates.
struct Mtls {
    files: Files,
    servers_ca: Ca,
    clients_ca: Ca,
    client: Leaf,
}

impl Mtls {
    fn new() -> Mtls {
        let clients_ca = Ca::new("clients CA");
        Mtls {
            files: Files::new(),
            servers_ca: Ca::new("servers CA"),
            client: clients_ca.client("ferry-to-servers"),
            clients_ca,
        }
    }

    fn server(&self, tls12_only: bool) -> TlsServer {
        tls_server(ServerOpts {
            client_ca: Some(self.clients_ca.pem()),
            tls12_only,
            ..ServerOpts::new(&self.servers_ca.server(&["good.test"]))
        })
    }

    fn ca(&self) -> String {
        self.files.ca(&self.servers_ca, "servers-ca")
    }
}

/// Upstream `tls = { ca, cert, key }`: the server gets ferry's client certificate and
/// serves; also to `openssl s_server -Verify` (a real peer that requires one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_to_servers_with_a_client_certificate() {
    let m = Mtls::new();
    let backend = m.server(false);
    let (cert, key) = m.files.leaf(&m.client, "client");
    let tls = format!(
        r#"ca = "{}", sni = "good.test", cert = "{cert}", key = "{key}""#,
        m.ca()
    );

    let s_leaf = m.servers_ca.server(&["good.test"]);
    let (s_cert, s_key) = m.files.leaf(&s_leaf, "s_server");
    let clients_ca = m.files.ca(&m.clients_ca, "clients-ca");
    let (_peer, s_addr) = s_server(&[
        "-cert",
        &s_cert,
        "-key",
        &s_key,
        "-Verify",
        "1",
        "-verify_return_error",
        "-CAfile",
        &clients_ca,
    ])
    .await;

    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("mtls"),
        upstream("mtls", &[backend.addr.to_string()], &tls, ""),
        listener("openssl"),
        upstream("openssl", &[s_addr.to_string()], &tls, ""),
    );
    let ferry = Ferry::start(&config, 2).await;

    let mut s = connect(ferry.addr("mtls")).await;
    echo_round_trip(&mut s, b"with a client certificate").await;
    assert_eq!(
        *backend.seen.client_certs.lock().unwrap(),
        vec![Some(m.client.cert_der().to_vec())],
        "the server got ferry's client certificate"
    );

    let mut s = connect(ferry.addr("openssl")).await;
    s.write_all(b"reversed by openssl\n").await.unwrap();
    let line = within(WAIT, "openssl's answer", async {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while s.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
            out.push(b[0]);
        }
        out
    })
    .await;
    let want: String = "reversed by openssl".chars().rev().collect();
    assert_eq!(String::from_utf8_lossy(&line), want);
}

/// Runs a plaintext client against an upstream without a client certificate (or with one
/// from a CA the server does not trust) whose server requires one: `connect_failed` with a
/// reason, the client's connection closed without a byte, no application data at the
/// server.
async fn mtls_refused(tls12_only: bool, wrong_cert: bool) {
    let m = Mtls::new();
    let backend = m.server(tls12_only);
    let mut tls = format!(r#"ca = "{}", sni = "good.test""#, m.ca());
    if wrong_cert {
        let stranger = m.servers_ca.client("not-trusted-by-the-server");
        let (cert, key) = m.files.leaf(&stranger, "stranger");
        tls.push_str(&format!(r#", cert = "{cert}", key = "{key}""#));
    }
    let config = format!(
        "{HEAD}{}{}",
        listener("mtls"),
        upstream("mtls", &[backend.addr.to_string()], &tls, ""),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;

    let client = closed_without_data(ferry.addr("mtls"), b"for a server that wants a cert").await;
    until("the server's handshake to fail", || {
        !backend.seen.failed().is_empty()
    })
    .await;
    assert_eq!(backend.seen.app_bytes.load(SeqCst), 0);
    let recs = ferry.records(1, WAIT).await;
    let r = record_for(&recs, client);
    assert_eq!(
        r["result"],
        "connect_failed",
        "{r}\nstderr:\n{}",
        ferry.stderr.text()
    );
    assert!(!reason(r).is_empty(), "{r}");
    assert_eq!(
        connect_failures(&metrics(admin).await, "mtls", backend.addr),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_without_a_client_certificate_fails_tls12() {
    mtls_refused(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_without_a_client_certificate_fails_tls13() {
    mtls_refused(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_with_an_untrusted_client_certificate_fails_tls13() {
    mtls_refused(false, true).await;
}

// ---------------------------------------------------------------------------------------
// 15. verify = false.

/// `verify = false`: a self-signed server (no CA, no IP subjectAltName) serves; ferry warns
/// about it on stderr at start, and again at a reload that rebuilds the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_false_accepts_any_certificate_and_warns() {
    let backend = tls_server(ServerOpts::new(&pki::self_signed(&["self.test"])));
    let config = |timeout: &str| {
        format!(
            "{HEAD}{}{}",
            listener("insecure"),
            upstream(
                "insecure",
                &[backend.addr.to_string()],
                "verify = false",
                &format!("connect_timeout = \"{timeout}\"")
            ),
        )
    };
    let ferry = Ferry::start(&config("2s"), 1).await;
    let mut s = connect(ferry.addr("insecure")).await;
    echo_round_trip(&mut s, b"to a self-signed server").await;
    assert_eq!(backend.seen.handshakes.load(SeqCst), 1);

    let warned = |l: &str| l.contains("WARN") && l.contains("verify = false");
    ferry
        .stderr
        .wait_count(1, WAIT, warned)
        .await
        .unwrap_or_else(|| panic!("no warning about verify = false:\n{}", ferry.stderr.text()));

    // The upstream changes (its connect_timeout): the warning again.
    let text = config("3s").replace("@LOG@", &ferry.log_path.display().to_string());
    std::fs::write(&ferry.config_path, text).unwrap();
    ferry.signal("HUP");
    ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("reload: upstream \"insecure\""))
        .await
        .unwrap_or_else(|| panic!("reload not applied:\n{}", ferry.stderr.text()));
    ferry
        .stderr
        .wait_count(2, WAIT, warned)
        .await
        .unwrap_or_else(|| {
            panic!(
                "no warning about verify = false at the reload:\n{}",
                ferry.stderr.text()
            )
        });
}

// ---------------------------------------------------------------------------------------
// 16. Re-encrypt.

/// client → ferry (mode "tls", certificate for front.test) → TLS to the server (another
/// CA): 1 MiB each way arrives intact (SHA-256 both ways); the record shows the client-side
/// TLS version and SNI, and the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_from_a_tls_listener() {
    const N: usize = 1024 * 1024;
    let files = Files::new();
    let front_ca = Ca::new("front CA");
    let servers_ca = Ca::new("servers CA");
    let (fcert, fkey) = files.leaf(&front_ca.server(&["front.test"]), "front");
    let backend = tls_server(ServerOpts {
        mode: Mode::SinkThenSource(N),
        ..ServerOpts::new(&servers_ca.server(&["good.test"]))
    });
    let tls = format!(
        r#"ca = "{}", sni = "good.test""#,
        files.ca(&servers_ca, "servers-ca")
    );
    let config = format!(
        r#"{HEAD}
[[listener]]
name = "front"
listen = "127.0.0.1:0"
mode = "tls"
tls = {{ cert = "{fcert}", key = "{fkey}" }}
upstream = "back"
{}"#,
        upstream("back", &[backend.addr.to_string()], &tls, "")
    );
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("front");
    let roots = vec![front_ca.pem()];

    let (client, sent, got, got_digest) = blocking("1 MiB each way", move || {
        let o = ClientOpts {
            sni: Some("front.test"),
            roots: &roots,
            ..ClientOpts::default()
        };
        let mut s = pki::tls_connect(addr, &o, WAIT).expect("TLS to ferry");
        let client = s.sock.local_addr().unwrap();
        let mut data = vec![0u8; N];
        Prng::new(1).fill(&mut data);
        s.write_all(&data).expect("write 1 MiB");
        s.flush().unwrap();
        let mut back = vec![0u8; N + 32];
        s.read_exact(&mut back).expect("read 1 MiB and the digest");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "more than expected: {} bytes", rest.len());
        let digest: [u8; 32] = back[N..].try_into().unwrap();
        (client, sha256(&data), sha256(&back[..N]), digest)
    })
    .await;
    assert_eq!(got_digest, sent, "what the server received (its SHA-256)");
    assert_eq!(
        got,
        prng_sha256(N as u64, SOURCE_SEED),
        "what the client received"
    );

    let recs = ferry.records(1, WAIT).await;
    let r = record_for(&recs, client);
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["server"], backend.addr.to_string(), "{r}");
    assert_eq!(r["upstream"], "back", "{r}");
    assert_eq!(r["sni"], "front.test", "{r}");
    assert!(
        r["tls_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("TLSv1.")),
        "{r}"
    );
    assert_eq!(r["bytes_up"], N, "{r}");
    assert_eq!(r["bytes_down"], N + 32, "{r}");
    assert_eq!(backend.seen.snis(), vec![Some("good.test".to_string())]);
}

// ---------------------------------------------------------------------------------------
// 17. Health checks through TLS.

/// Health checks of a TLS pool complete the handshake and send/expect inside TLS: a server
/// that answers `+PONG` is up (its last check ok; it counted the PINGs, which it can only
/// read decrypted); a server whose certificate does not verify is down with a reason about
/// the certificate, `ferry_server_up` 0, and its clients get `no_server`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_go_through_tls() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let other = Ca::new("other CA");
    let good = tls_server(ServerOpts {
        mode: Mode::Pong,
        ..ServerOpts::new(&ca.server(&["good.test"]))
    });
    let bad = tls_server(ServerOpts {
        mode: Mode::Pong,
        ..ServerOpts::new(&other.server(&["good.test"]))
    });
    let tls = format!(r#"ca = "{}", sni = "good.test""#, files.ca(&ca, "ca"));
    let health = r#"
[upstream.health]
interval = "200ms"
timeout = "1s"
rise = 1
fall = 1
send = "PING\r\n"
expect = "+PONG"
"#;
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("good"),
        upstream("good", &[good.addr.to_string()], &tls, health),
        listener("bad"),
        upstream("bad", &[bad.addr.to_string()], &tls, health),
    );
    let ferry = Ferry::start(&config, 2).await;
    let admin = admin_addr(&ferry).await;

    within(WAIT, "the bad server marked down", async {
        loop {
            let st = status(admin).await;
            if server_status(&st, "bad", bad.addr)["state"] == "down" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The good server answered a check, and ferry recorded it as passed.
    within(WAIT, "a passed check of the good server", async {
        loop {
            let st = status(admin).await;
            if server_status(&st, "good", good.addr)["last_check"]["ok"] == true {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        good.seen.pings.load(SeqCst) >= 1,
        "the check's PING went inside TLS"
    );

    let st = status(admin).await;
    let b = server_status(&st, "bad", bad.addr);
    assert_eq!(b["last_check"]["ok"], false, "{b}");
    assert!(
        b["last_check"]["reason"]
            .as_str()
            .is_some_and(|r| r.to_lowercase().contains("certificate")),
        "{b}"
    );
    let g = server_status(&st, "good", good.addr);
    assert_eq!(g["state"], "up", "{g}");
    assert_eq!(g["last_check"]["ok"], true, "{g}");
    assert_eq!(bad.seen.pings.load(SeqCst), 0);
    assert_eq!(bad.seen.app_bytes.load(SeqCst), 0);
    assert!(good.seen.failed().is_empty(), "{:?}", good.seen.failed());

    let m = metrics(admin).await;
    let up = |u: &str, a: SocketAddr| {
        metric_must(
            &m,
            "ferry_server_up",
            &[("upstream", u), ("server", &a.to_string())],
        )
    };
    assert_eq!(up("good", good.addr), 1.0);
    assert_eq!(up("bad", bad.addr), 0.0);

    let client = closed_without_data(ferry.addr("bad"), b"x").await;
    let refused = ferry.records_with("no_server", 1, WAIT).await;
    record_for(&refused, client);
    let mut s = connect(ferry.addr("good")).await;
    echo_round_trip(&mut s, b"served by the healthy one").await;
}

/// A health check without `send`/`expect` is a completed handshake: a server that refuses
/// ferry's missing client certificate fails it (TLS 1.2, where the refusal comes inside the
/// handshake, and TLS 1.3, where it comes right after ferry's last flight) and is marked
/// down, like the clients' connects to it fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_fails_when_the_server_refuses_the_client_certificate() {
    let m = Mtls::new();
    let v12 = m.server(true);
    let v13 = m.server(false);
    let tls = format!(r#"ca = "{}", sni = "good.test""#, m.ca());
    let health =
        "\n[upstream.health]\ninterval = \"100ms\"\ntimeout = \"1s\"\nrise = 1\nfall = 1\n";
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("v12"),
        upstream("v12", &[v12.addr.to_string()], &tls, health),
        listener("v13"),
        upstream("v13", &[v13.addr.to_string()], &tls, health),
    );
    let ferry = Ferry::start(&config, 2).await;
    let admin = admin_addr(&ferry).await;
    // Both servers refused at least two checks.
    until("two refused checks on each server", || {
        v12.seen.failed().len() >= 2 && v13.seen.failed().len() >= 2
    })
    .await;
    // A check is recorded just after the server saw it fail: look again until both have a
    // last check.
    let st = within(WAIT, "both servers checked", async {
        loop {
            let st = status(admin).await;
            let checked =
                |u: &str, a: SocketAddr| !server_status(&st, u, a)["last_check"].is_null();
            if checked("v12", v12.addr) && checked("v13", v13.addr) {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let v12s = server_status(&st, "v12", v12.addr);
    let v13s = server_status(&st, "v13", v13.addr);
    assert!(
        v12s["state"] == "down" && v13s["state"] == "down",
        "servers that refuse every handshake of ferry's must be down:\nTLS 1.2: {v12s}\nTLS 1.3: {v13s}\nwhat the TLS 1.3 server said: {:?}",
        v13.seen.failed()
    );
}

// ---------------------------------------------------------------------------------------
// 18. Retries.

/// Two servers, the first with a certificate that does not verify, `retries = 1`: every
/// client is served by the second; each failed attempt on the first is counted
/// (`ferry_server_connect_failures_total`, `/api/status`). With `retries = 0` the client gets
/// `connect_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_is_retried_on_another_server() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let other = Ca::new("other CA");
    let bad = tls_server(ServerOpts::new(&other.server(&["good.test"])));
    let good = tls_server(ServerOpts::new(&ca.server(&["good.test"])));
    let tls = format!(r#"ca = "{}", sni = "good.test""#, files.ca(&ca, "ca"));
    let servers = [bad.addr.to_string(), good.addr.to_string()];
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("retry"),
        upstream("retry", &servers, &tls, "balance = \"first\"\nretries = 1"),
        listener("noretry"),
        upstream(
            "noretry",
            &servers,
            &tls,
            "balance = \"first\"\nretries = 0"
        ),
    );
    let ferry = Ferry::start(&config, 2).await;
    let admin = admin_addr(&ferry).await;

    let mut clients = Vec::new();
    for i in 0..3 {
        let mut s = connect(ferry.addr("retry")).await;
        clients.push(s.local_addr().unwrap());
        echo_round_trip(&mut s, format!("client {i}").as_bytes()).await;
    }
    let recs = ferry.records_with("ok", 3, WAIT).await;
    for c in &clients {
        let r = record_for(&recs, *c);
        assert_eq!(r["server"], good.addr.to_string(), "{r}");
    }
    let m = metrics(admin).await;
    assert_eq!(connect_failures(&m, "retry", bad.addr), 3.0);
    assert_eq!(connect_failures(&m, "retry", good.addr), 0.0);
    let st = status(admin).await;
    assert_eq!(server_status(&st, "retry", bad.addr)["connect_failures"], 3);
    until("the bad server's 3 failed handshakes", || {
        bad.seen.failed().len() == 3
    })
    .await;
    assert_eq!(bad.seen.app_bytes.load(SeqCst), 0);
    assert_eq!(good.seen.handshakes.load(SeqCst), 3);

    let client = closed_without_data(ferry.addr("noretry"), b"x").await;
    let failed = ferry.records_with("connect_failed", 1, WAIT).await;
    let r = record_for(&failed, client);
    assert_eq!(r["server"], bad.addr.to_string(), "{r}");
    assert!(reason(r).contains("certificate"), "{r}");
}

/// Passive health counts failed TLS handshakes: after `failures = 2` of them the server is
/// ejected, and the next clients go straight to the other server (no third attempt on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_count_for_passive_ejection() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let other = Ca::new("other CA");
    let bad = tls_server(ServerOpts::new(&other.server(&["good.test"])));
    let good = tls_server(ServerOpts::new(&ca.server(&["good.test"])));
    let tls = format!(r#"ca = "{}", sni = "good.test""#, files.ca(&ca, "ca"));
    let extra = r#"balance = "first"
retries = 1

[upstream.health]
active = false
passive = { failures = 2, eject = "60s" }
"#;
    let config = format!(
        "{HEAD}{}{}",
        listener("pool"),
        upstream(
            "pool",
            &[bad.addr.to_string(), good.addr.to_string()],
            &tls,
            extra
        ),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    for i in 0..4 {
        let mut s = connect(ferry.addr("pool")).await;
        echo_round_trip(&mut s, format!("client {i}").as_bytes()).await;
    }
    assert_eq!(good.seen.handshakes.load(SeqCst), 4);
    let m = metrics(admin).await;
    assert_eq!(connect_failures(&m, "pool", bad.addr), 2.0);
    let st = status(admin).await;
    assert_eq!(server_status(&st, "pool", bad.addr)["state"], "down");
    ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("server ejected"))
        .await
        .unwrap_or_else(|| panic!("no ejection logged:\n{}", ferry.stderr.text()));
    until("the bad server's 2 failed handshakes", || {
        bad.seen.failed().len() == 2
    })
    .await;
    assert_eq!(
        bad.seen.accepted.load(SeqCst),
        2,
        "a third attempt on an ejected server"
    );
}

// ---------------------------------------------------------------------------------------
// A server that never finishes the handshake.

/// A server that accepts TCP but never answers the ClientHello: the handshake is bounded by
/// `connect_timeout`, counted as a failed connect, and retried on the next server; without
/// a retry the client gets `connect_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_bounded_by_connect_timeout() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let good = tls_server(ServerOpts::new(&ca.server(&["good.test"])));
    // Reads and discards, never answers.
    let mute = serve_on("127.0.0.1", |mut s| async move {
        let _ = read_count(&mut s).await;
    })
    .await;
    let tls = format!(r#"ca = "{}", sni = "good.test""#, files.ca(&ca, "ca"));
    let servers = [mute.to_string(), good.addr.to_string()];
    let extra = |retries: u32| {
        format!("balance = \"first\"\nretries = {retries}\nconnect_timeout = \"500ms\"")
    };
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("retry"),
        upstream("retry", &servers, &tls, &extra(1)),
        listener("noretry"),
        upstream("noretry", &servers, &tls, &extra(0)),
    );
    let ferry = Ferry::start(&config, 2).await;
    let admin = admin_addr(&ferry).await;

    let mut s = connect(ferry.addr("retry")).await;
    let client = s.local_addr().unwrap();
    echo_round_trip(&mut s, b"served after the stalled one").await;
    drop(s);
    let recs = ferry.records_with("ok", 1, WAIT).await;
    assert_eq!(record_for(&recs, client)["server"], good.addr.to_string());
    assert_eq!(connect_failures(&metrics(admin).await, "retry", mute), 1.0);

    let client = closed_without_data(ferry.addr("noretry"), b"x").await;
    let recs = ferry.records_with("connect_timeout", 1, WAIT).await;
    let r = record_for(&recs, client);
    assert_eq!(r["server"], mute.to_string(), "{r}");
    assert!(!reason(r).is_empty(), "{r}");
}

// ---------------------------------------------------------------------------------------
// Resumption.

/// Sessions with the servers are resumed: the second connection's handshake with the same
/// server is a resumption, with TLS 1.3 (tickets, which arrive after the handshake) and
/// TLS 1.2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_servers_are_resumed() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let v13 = tls_server(ServerOpts::new(&ca.server(&["good.test"])));
    let v12 = tls_server(ServerOpts {
        tls12_only: true,
        ..ServerOpts::new(&ca.server(&["good.test"]))
    });
    let tls = format!(r#"ca = "{}", sni = "good.test""#, files.ca(&ca, "ca"));
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("v13"),
        upstream("v13", &[v13.addr.to_string()], &tls, ""),
        listener("v12"),
        upstream("v12", &[v12.addr.to_string()], &tls, ""),
    );
    let ferry = Ferry::start(&config, 2).await;
    for (name, backend) in [("v13", &v13), ("v12", &v12)] {
        for i in 0..2 {
            let mut s = connect(ferry.addr(name)).await;
            echo_round_trip(&mut s, format!("{name} connection {i}").as_bytes()).await;
            drop(s);
        }
        assert_eq!(backend.seen.handshakes.load(SeqCst), 2, "{name}");
        assert_eq!(
            backend.seen.resumed.load(SeqCst),
            1,
            "{name}: the second handshake was not a resumption"
        );
    }
}

// ---------------------------------------------------------------------------------------
// A PROXY header ahead of the handshake.

/// An upstream with `proxy_protocol = "v1"` and `tls`: the PROXY header goes first, in the
/// clear, then the TLS handshake; the header carries the real client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_goes_before_the_handshake() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let backend = tls_server(ServerOpts {
        proxy_v1: true,
        ..ServerOpts::new(&ca.server(&["good.test"]))
    });
    let tls = format!(r#"ca = "{}", sni = "good.test""#, files.ca(&ca, "ca"));
    let config = format!(
        "{HEAD}{}{}",
        listener("pp"),
        upstream(
            "pp",
            &[backend.addr.to_string()],
            &tls,
            "proxy_protocol = \"v1\""
        ),
    );
    let ferry = Ferry::start(&config, 1).await;
    let mut s = connect(ferry.addr("pp")).await;
    let client = s.local_addr().unwrap();
    echo_round_trip(&mut s, b"behind a PROXY header").await;
    let headers = backend.seen.proxy_headers.lock().unwrap().clone();
    assert_eq!(headers.len(), 1, "{headers:?}");
    assert!(
        headers[0].starts_with(&format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} ",
            client.port()
        )),
        "{headers:?}"
    );
    assert_eq!(backend.seen.handshakes.load(SeqCst), 1);
}

// ---------------------------------------------------------------------------------------
// Server speaks first over TLS.

/// A TLS server that speaks first (a banner right after the handshake, or even with its
/// last handshake flight as TLS 1.3 0.5-RTT data): the banner reaches a client that sends
/// nothing, then the relay echoes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_over_tls() {
    let files = Files::new();
    let ca = Ca::new("servers CA");
    let after = tls_server(ServerOpts {
        mode: Mode::Banner { half_rtt: false },
        ..ServerOpts::new(&ca.server(&["good.test"]))
    });
    let half_rtt = tls_server(ServerOpts {
        mode: Mode::Banner { half_rtt: true },
        ..ServerOpts::new(&ca.server(&["good.test"]))
    });
    let tls = format!(r#"ca = "{}", sni = "good.test""#, files.ca(&ca, "ca"));
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("after"),
        upstream("after", &[after.addr.to_string()], &tls, ""),
        listener("halfrtt"),
        upstream("halfrtt", &[half_rtt.addr.to_string()], &tls, ""),
    );
    let ferry = Ferry::start(&config, 2).await;
    for name in ["after", "halfrtt"] {
        let mut s = connect(ferry.addr(name)).await;
        let mut banner = vec![0u8; BANNER.len()];
        within(WAIT, "the banner", s.read_exact(&mut banner))
            .await
            .unwrap_or_else(|e| panic!("{name}: reading the banner: {e}"));
        assert_eq!(banner, BANNER, "{name}");
        echo_round_trip(&mut s, b"after the banner").await;
    }
}

// ---------------------------------------------------------------------------------------
// Config errors of an upstream's `tls`.

#[test]
fn upstream_tls_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca").write(dir.path(), "ca");
    let text = format!(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
tls = {{ ca = "{}", verify = false, sni = "not a name", cert = "client.pem", colour = 1 }}
"#,
        path_str(&ca)
    );
    let Checked {
        code,
        errors,
        stderr,
        ..
    } = check_config_in(Some(dir.path()), &text);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        errors,
        [
            "9:7: `tls` has `cert` but no `key`",
            "9:49: `verify = false` and `ca` contradict each other: drop one",
            r#"9:62: `sni`: "not a name" is not a host name"#,
            "9:97: unknown key `colour` in `tls`; expected one of: sni, ca, cert, key, verify, alpn",
        ],
        "{stderr}"
    );
}
