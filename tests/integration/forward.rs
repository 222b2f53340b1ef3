//! The forward-proxy listener modes, `socks5` and `http-connect`: clients name their
//! destinations, which `destinations` (and a user's own list) restrict.
//!
//! - Real clients: `curl --socks5`, `--socks5-hostname`, `-x` and `-p -x`, with and without
//!   credentials (a password and a bcrypt hash), to HTTP and HTTPS origins (an
//!   `openssl s_server` whose certificate curl verifies end to end through the tunnel), and
//!   `http_proxy` plain-HTTP forwarding.
//! - Raw clients (bytes by hand) for the exact answers: every SOCKS5 reply code that can be
//!   provoked (0x02 to 0x08; 0x03 and 0x04 in a network namespace with no route and an
//!   `unreachable` route; 0x01, general failure, has no cause a test can set up), method
//!   negotiation and RFC 1929 authentication; every HTTP status (200, 400, 403, 405, 407,
//!   502, 504), absolute-form forwarding rewritten for the origin, bytes pipelined after
//!   the CONNECT head, `sni_must_match`.
//! - The destination policy: IP literals against CIDR entries only, an exact name served
//!   whatever it resolves to, a name matched only by a wildcard refused when it resolves to
//!   loopback (ferry runs in a mount namespace with its own /etc/hosts for that) unless a
//!   CIDR entry allows the address, ferry's own listening addresses refused, per-user lists.
//!   A refused destination is never contacted: the would-be server is probed after the
//!   refusal is logged and has seen no connection but the probe.
//! - A client that stops mid-handshake is closed at `handshake_timeout` (`protocol_error`).
//!
//! Each test checks the access-log record of every connection it makes: `result`, `reason`
//! where it says something, `user`, `destination` (as asked) and `server` (the address
//! dialled). Every wait is bounded; nothing waits on a clock to synchronise.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::netns::Netns;
use crate::common::pki::{self, Ca, ClientOpts};
use crate::common::*;
use crate::ops_support::{Peer, free_port};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------
// Configs and users.

/// Alice's password, given in the config as `password`.
const ALICE_PW: &str = "al1ce-pw";
/// Bob's password; the config holds only its bcrypt hash, [`BOB_HASH`].
const BOB_PW: &str = "b0b-hashed";
/// A bcrypt hash of [`BOB_PW`] as `htpasswd -B` writes it (`$2y$`), at cost 4 (the least
/// bcrypt has, so that checking it takes no time worth mentioning).
const BOB_HASH: &str = "$2y$04$0c7JNHVYgyNi2QWbO.KixuhYLyGpRcDNaTN8QGSwq7VamicQIKHra";

/// `users = [...]`: alice with a password, bob with a bcrypt hash.
fn users() -> String {
    format!(
        r#"users = [{{ name = "alice", password = "{ALICE_PW}" }}, {{ name = "bob", password_hash = "{BOB_HASH}" }}]"#
    )
}

/// A listener `name` of `mode` on `127.0.0.1:0` with `extra` lines (its `destinations`,
/// `users`, timeouts).
fn listener(name: &str, mode: &str, extra: &str) -> String {
    format!(
        "\n[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nmode = \"{mode}\"\n{extra}\n"
    )
}

/// A config of `listeners`, the access log to the test's file.
fn config(listeners: &[String]) -> String {
    format!("[log]\naccess = \"@LOG@\"\n{}", listeners.concat())
}

/// `destinations = [...]` of `entries`.
fn destinations(entries: &[String]) -> String {
    let quoted: Vec<String> = entries.iter().map(|e| format!("{e:?}")).collect();
    format!("destinations = [{}]", quoted.join(", "))
}

/// The `destinations` entry allowing exactly `a` (a CIDR entry of one address).
fn cidr(a: SocketAddr) -> String {
    match a.ip() {
        IpAddr::V4(ip) => format!("{ip}/32:{}", a.port()),
        IpAddr::V6(ip) => format!("[{ip}/128]:{}", a.port()),
    }
}

/// Starts ferry in a mount namespace of its own where `/etc/hosts` is `hosts` and names
/// are looked up there only (`/etc/nsswitch.conf`: `hosts: files`): names resolve the same
/// on every machine, and no DNS server is asked. The returned folder holds the two files.
async fn start_with_hosts(
    config: &str,
    listening: usize,
    hosts: &str,
) -> (Ferry, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let hosts_path = write_file(dir.path(), "hosts", hosts);
    let nss_path = write_file(dir.path(), "nsswitch.conf", "hosts: files\n");
    let script = format!(
        "mount --bind '{}' /etc/hosts && mount --bind '{}' /etc/nsswitch.conf && exec \"$0\" \"$@\"",
        hosts_path.display(),
        nss_path.display()
    );
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ];
    (Ferry::start_wrapped(config, listening, &wrapper).await, dir)
}

// ---------------------------------------------------------------------------------------
// Destinations: servers that show who contacted them.

/// An echo server that remembers the address of every peer it accepted (in order).
struct Watched {
    addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    probes: usize,
}

impl Watched {
    async fn on(ip: &str) -> Watched {
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let p = peers.clone();
        let addr = serve_on(ip, move |mut s| {
            p.lock().unwrap().push(s.peer_addr().unwrap());
            async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            }
        })
        .await;
        Watched {
            addr,
            peers,
            probes: 0,
        }
    }

    async fn new() -> Watched {
        Watched::on("127.0.0.1").await
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap().clone()
    }

    /// How many connections anyone but this test's probes made to the server, counting
    /// every connection completed before this call: a probe is connected and echoed first,
    /// and the server accepts in order, so an earlier connection has been counted by then.
    async fn contacts(&mut self) -> usize {
        let mut s = connect(self.addr).await;
        echo_round_trip(&mut s, b"probe").await;
        self.probes += 1;
        self.peers().len() - self.probes
    }
}

/// What [`Origin`] answers every request with.
const ORIGIN_BODY: &str = "hello from the origin\n";

/// A tiny HTTP/1.1 origin server: reads one request head, keeps it, answers
/// [`ORIGIN_BODY`] and closes. Counts the connections it accepted.
struct Origin {
    addr: SocketAddr,
    accepted: Arc<Mutex<usize>>,
    heads: Arc<Mutex<Vec<String>>>,
    probes: usize,
}

impl Origin {
    async fn new() -> Origin {
        let accepted: Arc<Mutex<usize>> = Arc::default();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let (a, h) = (accepted.clone(), heads.clone());
        let addr = serve_on("127.0.0.1", move |mut s| {
            *a.lock().unwrap() += 1;
            let heads = h.clone();
            async move {
                let Some(head) = read_head_of(&mut s).await else {
                    return;
                };
                heads.lock().unwrap().push(head);
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{ORIGIN_BODY}",
                    ORIGIN_BODY.len()
                );
                if s.write_all(resp.as_bytes()).await.is_ok() {
                    let _ = s.shutdown().await;
                }
            }
        })
        .await;
        Origin {
            addr,
            accepted,
            heads,
            probes: 0,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// The last request head whose request line is `GET path ...`.
    fn head_for(&self, path: &str) -> String {
        let want = format!("GET {path} ");
        self.heads()
            .into_iter()
            .rev()
            .find(|h| h.starts_with(&want))
            .unwrap_or_else(|| panic!("the origin got no GET {path}: {:#?}", self.heads()))
    }

    /// As [`Watched::contacts`], with an HTTP request as the probe.
    async fn contacts(&mut self) -> usize {
        let mut s = connect(self.addr).await;
        within(WAIT, "a probe request to the origin", async {
            s.write_all(b"GET /probe HTTP/1.1\r\nHost: probe\r\n\r\n")
                .await
                .unwrap();
        })
        .await;
        let (resp, _) = read_until_closed(&mut s, WAIT).await;
        assert!(
            String::from_utf8_lossy(&resp).ends_with(ORIGIN_BODY),
            "probe answer: {resp:?}"
        );
        self.probes += 1;
        *self.accepted.lock().unwrap() - self.probes
    }
}

/// Reads a request head (through the blank line, at most 64 KiB); `None` if the peer closes
/// first.
async fn read_head_of(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// An echo server that keeps everything each connection sent, one entry per connection, once
/// the connection ends.
async fn capture_server() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let caps: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let c = caps.clone();
    let addr = serve_on("127.0.0.1", move |mut s| {
        let caps = c.clone();
        async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            caps.lock().unwrap().push(got);
        }
    })
    .await;
    (addr, caps)
}

/// Waits until the capture server has seen `n` connections end; returns what each sent.
async fn captured(caps: &Arc<Mutex<Vec<Vec<u8>>>>, n: usize) -> Vec<Vec<u8>> {
    within(WAIT, "the capture server's connections to end", async {
        loop {
            let c = caps.lock().unwrap().clone();
            if c.len() >= n {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// `openssl s_server -www` (answers a request with a status page naming itself) with a
/// certificate for `localhost` issued by `ca`, on a free loopback port; killed on drop.
async fn https_origin(dir: &Path, ca: &Ca) -> (Peer, SocketAddr) {
    let (cert, key) = ca.server(&["localhost"]).write(dir, "localhost");
    let port = free_port();
    let mut cmd = Command::new("openssl");
    cmd.args(["s_server", "-www", "-accept", &format!("127.0.0.1:{port}")])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key);
    let mut p = Peer::spawn("openssl s_server", cmd, tempfile::tempdir().unwrap());
    p.wait_listening(&[port]).await;
    (p, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// What the `openssl s_server -www` status page contains.
const S_SERVER_PAGE: &str = "s_server -www";

// ---------------------------------------------------------------------------------------
// The access log.

/// Waits for ferry's record of the connection from `client`.
async fn record(f: &Ferry, client: SocketAddr) -> Value {
    let want = client.to_string();
    let deadline = Instant::now() + WAIT;
    loop {
        let recs = parse_records(&f.log_lines_now());
        if let Some(r) = recs.into_iter().find(|r| r["client"] == want.as_str()) {
            return r;
        }
        if Instant::now() >= deadline {
            panic!(
                "no access-log record for client {want} after {WAIT:?}:\n{}\nstderr:\n{}",
                f.log_lines_now().join("\n"),
                f.stderr.text()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the access log holds `n` records; returns the `n`th (for clients run one
/// after another, whose addresses the test does not know: curl).
async fn nth_record(f: &Ferry, n: usize) -> Value {
    let recs = f.records(n, WAIT).await;
    assert_eq!(
        recs.len(),
        n,
        "more records than connections made: {recs:#?}"
    );
    recs[n - 1].clone()
}

/// Checks a record's `result`, `user` (`None`: absent), `destination` and `server`
/// (`None`: absent, nothing was connected).
#[track_caller]
fn assert_record(
    r: &Value,
    result: &str,
    user: Option<&str>,
    destination: &str,
    server: Option<SocketAddr>,
) {
    assert_eq!(r["result"], result, "result: {r}");
    match user {
        Some(u) => assert_eq!(r["user"], u, "user: {r}"),
        None => assert!(r["user"].is_null(), "a user where none was given: {r}"),
    }
    assert_eq!(r["destination"], destination, "destination: {r}");
    match server {
        Some(s) => assert_eq!(
            r["server"],
            s.to_string(),
            "server (the address dialled): {r}"
        ),
        None => assert!(
            r["server"].is_null(),
            "a server where none was dialled: {r}"
        ),
    }
}

/// Checks that a record's `reason` contains `part`.
#[track_caller]
fn assert_reason(r: &Value, part: &str) {
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains(part), "reason should contain {part:?}: {r}");
}

// ---------------------------------------------------------------------------------------
// A raw SOCKS5 client.

const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const CONNECT: u8 = 0x01;
const BIND: u8 = 0x02;
const UDP_ASSOCIATE: u8 = 0x03;

/// A SOCKS5 destination.
#[derive(Clone, Copy, Debug)]
enum Dst<'a> {
    Addr(SocketAddr),
    Name(&'a str, u16),
}

/// A request: `cmd` for `dst`.
fn socks_request(cmd: u8, dst: Dst<'_>) -> Vec<u8> {
    let mut v = vec![5, cmd, 0];
    let port = match dst {
        Dst::Addr(a) => {
            match a.ip() {
                IpAddr::V4(ip) => {
                    v.push(1);
                    v.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    v.push(4);
                    v.extend_from_slice(&ip.octets());
                }
            }
            a.port()
        }
        Dst::Name(n, port) => {
            v.push(3);
            v.push(n.len() as u8);
            v.extend_from_slice(n.as_bytes());
            port
        }
    };
    v.extend_from_slice(&port.to_be_bytes());
    v
}

/// A failure reply with code `code`, as ferry sends it: the bound address `0.0.0.0:0`.
fn failure_reply(code: u8) -> Vec<u8> {
    vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

async fn read_exactly(s: &mut TcpStream, n: usize, what: &str) -> Vec<u8> {
    within(WAIT, what, async {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b)
            .await
            .unwrap_or_else(|e| panic!("reading {what}: {e}"));
        b
    })
    .await
}

async fn write(s: &mut TcpStream, bytes: &[u8]) {
    within(WAIT, "a write to ferry", s.write_all(bytes))
        .await
        .expect("write to ferry");
}

/// Greets offering `methods`; returns ferry's choice (two bytes: version, method).
async fn greet(s: &mut TcpStream, methods: &[u8]) -> Vec<u8> {
    let mut g = vec![5, methods.len() as u8];
    g.extend_from_slice(methods);
    write(s, &g).await;
    read_exactly(s, 2, "the SOCKS5 method choice").await
}

/// RFC 1929: sends `user` and `password`; returns the status reply (two bytes).
async fn authenticate(s: &mut TcpStream, user: &str, password: &str) -> Vec<u8> {
    let mut m = vec![1, user.len() as u8];
    m.extend_from_slice(user.as_bytes());
    m.push(password.len() as u8);
    m.extend_from_slice(password.as_bytes());
    write(s, &m).await;
    read_exactly(s, 2, "the RFC 1929 status").await
}

/// Negotiates (no authentication, or `user`'s credentials), asserting each answer.
async fn socks_open(s: &mut TcpStream, user: Option<(&str, &str)>) {
    match user {
        None => assert_eq!(greet(s, &[NO_AUTH]).await, [5, NO_AUTH], "method choice"),
        Some((u, p)) => {
            assert_eq!(
                greet(s, &[USER_PASS]).await,
                [5, USER_PASS],
                "method choice"
            );
            assert_eq!(authenticate(s, u, p).await, [1, 0], "RFC 1929 status");
        }
    }
}

/// Reads a reply: the code and the bound address.
async fn socks_reply(s: &mut TcpStream) -> (u8, SocketAddr) {
    let h = read_exactly(s, 4, "the SOCKS5 reply").await;
    assert_eq!(
        (h[0], h[2]),
        (5, 0),
        "reply version and reserved byte: {h:?}"
    );
    let ip: IpAddr = match h[3] {
        1 => {
            let b: [u8; 4] = read_exactly(s, 4, "the bound IPv4 address")
                .await
                .try_into()
                .unwrap();
            b.into()
        }
        4 => {
            let b: [u8; 16] = read_exactly(s, 16, "the bound IPv6 address")
                .await
                .try_into()
                .unwrap();
            b.into()
        }
        t => panic!("reply with address type {t}: {h:?}"),
    };
    let p = read_exactly(s, 2, "the bound port").await;
    (h[1], SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])))
}

/// Connects to the SOCKS5 listener at `proxy`, negotiates as `user` and asks to CONNECT to
/// `dst`. Returns the stream, the client address, the reply code and the bound address.
async fn socks_connect(
    proxy: SocketAddr,
    user: Option<(&str, &str)>,
    dst: Dst<'_>,
) -> (TcpStream, SocketAddr, u8, SocketAddr) {
    let mut s = connect(proxy).await;
    let client = s.local_addr().unwrap();
    socks_open(&mut s, user).await;
    write(&mut s, &socks_request(CONNECT, dst)).await;
    let (code, bound) = socks_reply(&mut s).await;
    (s, client, code, bound)
}

/// Asserts that ferry, after `reply` (exact bytes), closes the connection without sending
/// anything more.
async fn expect_reply_then_close(s: &mut TcpStream, reply: &[u8], what: &str) {
    let got = read_exactly(s, reply.len(), what).await;
    assert_eq!(got, reply, "{what}: reply bytes");
    let (more, _) = read_until_closed(s, WAIT).await;
    assert!(more.is_empty(), "{what}: bytes after the reply: {more:?}");
}

/// Negotiates as `user`, sends `cmd` for `dst`, and expects the failure reply `code` and
/// the connection closed. Returns the client address.
async fn socks_refused(
    proxy: SocketAddr,
    user: Option<(&str, &str)>,
    cmd: u8,
    dst: Dst<'_>,
    code: u8,
) -> SocketAddr {
    let mut s = connect(proxy).await;
    let client = s.local_addr().unwrap();
    socks_open(&mut s, user).await;
    write(&mut s, &socks_request(cmd, dst)).await;
    let what = format!("reply {code:#04x} to command {cmd:#04x} for {dst:?}");
    expect_reply_then_close(&mut s, &failure_reply(code), &what).await;
    client
}

// ---------------------------------------------------------------------------------------
// A raw HTTP proxy client.

/// Standard base64 (RFC 4648, padded).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `Proxy-Authorization: <scheme> base64(user:password)\r\n`.
fn proxy_auth(scheme: &str, user: &str, password: &str) -> String {
    format!(
        "Proxy-Authorization: {scheme} {}\r\n",
        base64(format!("{user}:{password}").as_bytes())
    )
}

/// `CONNECT authority HTTP/1.1` with a Host header and `extra` header lines.
fn connect_head(authority: &str, extra: &str) -> String {
    format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n")
}

/// Reads a response head, one byte at a time (so nothing after it is consumed).
async fn read_response_head(s: &mut TcpStream) -> String {
    within(WAIT, "the response head", read_head_of(s))
        .await
        .expect("ferry closed before a complete response head")
}

/// Connects to the HTTP proxy at `proxy`, sends `request` in one write and reads the
/// response head. Returns the stream, the client address and the head.
async fn http_request(proxy: SocketAddr, request: &[u8]) -> (TcpStream, SocketAddr, String) {
    let mut s = connect(proxy).await;
    let client = s.local_addr().unwrap();
    write(&mut s, request).await;
    let head = read_response_head(&mut s).await;
    (s, client, head)
}

/// Sends `request` and expects a response with `status`, then the connection closed.
/// Returns the client address and the whole response.
async fn http_refused(proxy: SocketAddr, request: &[u8], status: u16) -> (SocketAddr, String) {
    let mut s = connect(proxy).await;
    let client = s.local_addr().unwrap();
    write(&mut s, request).await;
    let (resp, _) = read_until_closed(&mut s, WAIT).await;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    assert!(
        resp.starts_with(&format!("HTTP/1.1 {status} ")),
        "expected status {status} for {:?}, got {resp:?}",
        String::from_utf8_lossy(&request[..request.len().min(200)])
    );
    (client, resp)
}

const ESTABLISHED: &str = "HTTP/1.1 200 Connection established\r\n\r\n";

/// The value of header `name` in a response head (case-insensitive name).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ---------------------------------------------------------------------------------------
// curl.

struct CurlOut {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `curl -q -sS --max-time 10 ARGS` with `env` (and no proxy variables from the test's
/// own environment).
async fn curl(args: &[&str], env: &[(&str, &str)]) -> CurlOut {
    let mut cmd = Command::new("curl");
    cmd.args(["-q", "-sS", "--max-time", "10"]).args(args);
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "socks_proxy",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let what = format!("curl {args:?}");
    let out = within(
        2 * WAIT,
        &what,
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("cannot run curl: {e}"));
    CurlOut {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs curl and expects `body` (all of it) on its stdout.
async fn curl_ok(args: &[&str], env: &[(&str, &str)], body: &str) {
    let out = curl(args, env).await;
    assert!(
        out.ok && out.stdout.contains(body),
        "curl {args:?} (env {env:?}) failed or got the wrong body:\nstdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
}

/// Runs curl and expects it to fail.
async fn curl_fails(args: &[&str], env: &[(&str, &str)]) -> CurlOut {
    let out = curl(args, env).await;
    assert!(
        !out.ok,
        "curl {args:?} should have failed:\nstdout: {}",
        out.stdout
    );
    out
}

/// Runs `f` (blocking socket work: the rustls client) on the blocking pool, bounded by
/// twice [`WAIT`]; a panic in `f` is the test's panic.
async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match within(2 * WAIT, what, tokio::task::spawn_blocking(f)).await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("{what}: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// 1. SOCKS5: connecting, methods, authentication.

/// CONNECT to an IPv4 literal allowed by a CIDR entry: reply 0x00 with the bound address
/// (ferry's end of its connection to the destination, as the destination sees it), then a
/// raw relay. The record: `ok`, no user, the destination as asked, the server dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_connect_to_an_ipv4_literal() {
    let mut echo = Watched::new().await;
    let f = Ferry::start(
        &config(&[listener(
            "socks",
            "socks5",
            &destinations(&[cidr(echo.addr)]),
        )]),
        1,
    )
    .await;
    let (mut s, client, code, bound) =
        socks_connect(f.addr("socks"), None, Dst::Addr(echo.addr)).await;
    assert_eq!(code, 0, "reply code");
    echo_round_trip(&mut s, b"through socks5").await;
    // Once the echo is back, the destination has accepted ferry's connection.
    assert_eq!(
        echo.peers(),
        [bound],
        "the bound address is ferry's end of the connection to the destination"
    );
    echo_round_trip(&mut s, &[0u8, 1, 2, 255, 254]).await;
    s.shutdown().await.unwrap();
    let (rest, how) = read_until_closed(&mut s, WAIT).await;
    assert!(rest.is_empty() && how == Closed::Eof, "{rest:?} {how:?}");
    let r = record(&f, client).await;
    assert_record(&r, "ok", None, &echo.addr.to_string(), Some(echo.addr));
    assert_eq!(echo.contacts().await, 1);
}

/// CONNECT to an IPv6 literal (`[::1/128]:port` entry, ATYP 4, bound address IPv6) and to a
/// name with an exact entry (ATYP 3: `localhost`, resolved by ferry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_connect_to_an_ipv6_literal_and_to_a_name() {
    let echo6 = Watched::on("::1").await;
    let echo4 = Watched::new().await;
    let f = Ferry::start(
        &config(&[listener(
            "socks",
            "socks5",
            &destinations(&[cidr(echo6.addr), format!("localhost:{}", echo4.addr.port())]),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("socks");

    let (mut s, client, code, bound) = socks_connect(proxy, None, Dst::Addr(echo6.addr)).await;
    assert_eq!(code, 0, "reply code (IPv6)");
    echo_round_trip(&mut s, b"over IPv6").await;
    assert_eq!(echo6.peers(), [bound], "bound address (IPv6)");
    drop(s);
    let r = record(&f, client).await;
    assert_eq!(
        echo6.addr.to_string(),
        format!("[::1]:{}", echo6.addr.port())
    );
    assert_record(&r, "ok", None, &echo6.addr.to_string(), Some(echo6.addr));

    let port = echo4.addr.port();
    let (mut s, client, code, bound) =
        socks_connect(proxy, None, Dst::Name("localhost", port)).await;
    assert_eq!(code, 0, "reply code (name)");
    echo_round_trip(&mut s, b"by name").await;
    assert_eq!(echo4.peers(), [bound], "bound address (name)");
    drop(s);
    let r = record(&f, client).await;
    assert_record(
        &r,
        "ok",
        None,
        &format!("localhost:{port}"),
        Some(echo4.addr),
    );
}

/// A client that sends its greeting, its request and its first data in one write (without
/// waiting for the answers): the data reaches the destination after the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_greeting_request_and_data_in_one_write() {
    let (dst, caps) = capture_server().await;
    let f = Ferry::start(
        &config(&[listener("socks", "socks5", &destinations(&[cidr(dst)]))]),
        1,
    )
    .await;
    let mut s = connect(f.addr("socks")).await;
    let client = s.local_addr().unwrap();
    let mut all = vec![5, 1, NO_AUTH];
    all.extend_from_slice(&socks_request(CONNECT, Dst::Addr(dst)));
    all.extend_from_slice(b"early data");
    write(&mut s, &all).await;
    assert_eq!(
        read_exactly(&mut s, 2, "the method choice").await,
        [5, NO_AUTH]
    );
    let (code, _) = socks_reply(&mut s).await;
    assert_eq!(code, 0, "reply code");
    assert_eq!(
        read_exactly(&mut s, 10, "the early data echoed").await,
        b"early data"
    );
    s.shutdown().await.unwrap();
    read_until_closed(&mut s, WAIT).await;
    assert_eq!(captured(&caps, 1).await, [b"early data".to_vec()]);
    let r = record(&f, client).await;
    assert_record(&r, "ok", None, &dst.to_string(), Some(dst));
}

/// Methods: without `users`, NO_AUTH only (a client offering only username/password gets
/// 0xFF); with `users`, USER_PASS only (a client offering only NO_AUTH gets 0xFF, one
/// offering both gets USER_PASS). A refused greeting is closed and logged `denied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_method_negotiation() {
    let mut echo = Watched::new().await;
    let dst = destinations(&[cidr(echo.addr)]);
    let f = Ferry::start(
        &config(&[
            listener("open", "socks5", &dst),
            listener("auth", "socks5", &format!("{dst}\n{}", users())),
        ]),
        2,
    )
    .await;

    for (name, offered) in [("open", USER_PASS), ("auth", NO_AUTH)] {
        let mut s = connect(f.addr(name)).await;
        let client = s.local_addr().unwrap();
        write(&mut s, &[5, 1, offered]).await;
        expect_reply_then_close(&mut s, &[5, 0xFF], &format!("{name}: no acceptable method")).await;
        let r = record(&f, client).await;
        assert_eq!(r["result"], "denied", "{name}: {r}");
        assert!(r["server"].is_null(), "{name}: {r}");
    }

    // Offering both: the listener with users picks username/password.
    let mut s = connect(f.addr("auth")).await;
    assert_eq!(greet(&mut s, &[NO_AUTH, USER_PASS]).await, [5, USER_PASS]);
    assert_eq!(authenticate(&mut s, "alice", ALICE_PW).await, [1, 0]);
    // And the listener without users picks none.
    let mut s2 = connect(f.addr("open")).await;
    assert_eq!(greet(&mut s2, &[USER_PASS, NO_AUTH]).await, [5, NO_AUTH]);
    drop((s, s2));
    assert_eq!(echo.contacts().await, 0);
}

/// RFC 1929: alice (password) and bob (bcrypt hash) get status 0x00 and are served, and
/// the record names them; a wrong password or an unknown user gets status 0x01 and the
/// connection closed (`denied`, "authentication failed", the name given), nothing dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_username_password() {
    let mut echo = Watched::new().await;
    let f = Ferry::start(
        &config(&[listener(
            "socks",
            "socks5",
            &format!("{}\n{}", destinations(&[cidr(echo.addr)]), users()),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("socks");

    for (user, pw) in [("alice", ALICE_PW), ("bob", BOB_PW)] {
        let (mut s, client, code, _) =
            socks_connect(proxy, Some((user, pw)), Dst::Addr(echo.addr)).await;
        assert_eq!(code, 0, "{user}: reply code");
        echo_round_trip(&mut s, user.as_bytes()).await;
        drop(s);
        let r = record(&f, client).await;
        assert_record(
            &r,
            "ok",
            Some(user),
            &echo.addr.to_string(),
            Some(echo.addr),
        );
    }

    for (user, pw) in [("alice", "wrong"), ("bob", ALICE_PW), ("mallory", ALICE_PW)] {
        let mut s = connect(proxy).await;
        let client = s.local_addr().unwrap();
        assert_eq!(greet(&mut s, &[USER_PASS]).await, [5, USER_PASS]);
        let mut m = vec![1, user.len() as u8];
        m.extend_from_slice(user.as_bytes());
        m.push(pw.len() as u8);
        m.extend_from_slice(pw.as_bytes());
        write(&mut s, &m).await;
        expect_reply_then_close(&mut s, &[1, 1], &format!("{user}: authentication failure")).await;
        let r = record(&f, client).await;
        assert_eq!(r["result"], "denied", "{user}: {r}");
        assert_eq!(r["reason"], "authentication failed", "{user}: {r}");
        assert_eq!(r["user"], user, "{user}: {r}");
        assert!(r["server"].is_null(), "{user}: {r}");
    }
    assert_eq!(
        echo.contacts().await,
        2,
        "only the two authenticated clients"
    );
}

/// A user's own `destinations` narrow the listener's: alice may reach A only; bob (no list
/// of his own) reaches A and B. Alice asking for B is refused (SOCKS 0x02, HTTP 403) and B
/// sees no connection from her.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_destinations_narrow_the_listener() {
    let a = Watched::new().await;
    let mut b = Watched::new().await;
    let users = format!(
        r#"users = [{{ name = "alice", password = "{ALICE_PW}", destinations = ["{}"] }}, {{ name = "bob", password_hash = "{BOB_HASH}" }}]"#,
        cidr(a.addr)
    );
    let extra = format!("{}\n{users}", destinations(&[cidr(a.addr), cidr(b.addr)]));
    let f = Ferry::start(
        &config(&[
            listener("socks", "socks5", &extra),
            listener("http", "http-connect", &extra),
        ]),
        2,
    )
    .await;
    let alice = Some(("alice", ALICE_PW));

    let (mut s, client, code, _) = socks_connect(f.addr("socks"), alice, Dst::Addr(a.addr)).await;
    assert_eq!(code, 0);
    echo_round_trip(&mut s, b"alice to A").await;
    drop(s);
    assert_record(
        &record(&f, client).await,
        "ok",
        Some("alice"),
        &a.addr.to_string(),
        Some(a.addr),
    );

    let client = socks_refused(f.addr("socks"), alice, CONNECT, Dst::Addr(b.addr), 0x02).await;
    assert_record(
        &record(&f, client).await,
        "denied",
        Some("alice"),
        &b.addr.to_string(),
        None,
    );
    let req = connect_head(&b.addr.to_string(), &proxy_auth("Basic", "alice", ALICE_PW));
    let (client, _) = http_refused(f.addr("http"), req.as_bytes(), 403).await;
    assert_record(
        &record(&f, client).await,
        "denied",
        Some("alice"),
        &b.addr.to_string(),
        None,
    );
    assert_eq!(b.contacts().await, 0, "alice's refused requests reached B");

    let (mut s, client, code, _) =
        socks_connect(f.addr("socks"), Some(("bob", BOB_PW)), Dst::Addr(b.addr)).await;
    assert_eq!(code, 0);
    echo_round_trip(&mut s, b"bob to B").await;
    drop(s);
    assert_record(
        &record(&f, client).await,
        "ok",
        Some("bob"),
        &b.addr.to_string(),
        Some(b.addr),
    );
}

// ---------------------------------------------------------------------------------------
// 2. SOCKS5: every reply code that can be provoked.

/// 0x02: destinations not allowed — an IP literal whose address only a name entry covers
/// (IP literals match CIDR entries only, also when sent as a name), a name no entry
/// matches, a port outside the entries. Each is logged `denied` with nothing
/// dialled, and the would-be server sees no connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_destination_not_allowed_is_never_contacted() {
    let mut echo = Watched::new().await;
    let port = echo.addr.port();
    let f = Ferry::start(
        &config(&[listener(
            "socks",
            "socks5",
            &destinations(&[
                // Another port of the same address, and the destination's port by name.
                format!("127.0.0.1/32:{}", port.wrapping_add(1).max(1)),
                format!("localhost:{port}"),
            ]),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("socks");
    let cases = [
        (Dst::Addr(echo.addr), echo.addr.to_string()),
        (
            Dst::Name("elsewhere.invalid", port),
            format!("elsewhere.invalid:{port}"),
        ),
        (
            Dst::Name("localhost", port.wrapping_add(2).max(1)),
            format!("localhost:{}", port.wrapping_add(2).max(1)),
        ),
        // An address sent as a name (ATYP 3) is still an address: CIDR entries only.
        (Dst::Name("127.0.0.1", port), echo.addr.to_string()),
    ];
    for (dst, shown) in cases {
        let client = socks_refused(proxy, None, CONNECT, dst, 0x02).await;
        let r = record(&f, client).await;
        assert_record(&r, "denied", None, &shown, None);
        assert_reason(&r, "not allowed");
    }
    assert_eq!(
        echo.contacts().await,
        0,
        "a refused destination was contacted"
    );
    // The same server by the name its entry allows is served.
    let (_s, _, code, _) = socks_connect(proxy, None, Dst::Name("localhost", port)).await;
    assert_eq!(code, 0);
}

/// 0x05 (connection refused: `connect_failed`) and 0x06 (no answer to the SYN within
/// `connect_timeout`: `connect_timeout`). The record names the address dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_connection_refused_and_timed_out() {
    let refused = refused_addr();
    let hole = black_hole();
    let f = Ferry::start(
        &config(&[listener(
            "socks",
            "socks5",
            &format!(
                "{}\nconnect_timeout = \"1s\"",
                destinations(&[cidr(refused), cidr(hole.addr)])
            ),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("socks");

    let client = socks_refused(proxy, None, CONNECT, Dst::Addr(refused), 0x05).await;
    let r = record(&f, client).await;
    assert_record(
        &r,
        "connect_failed",
        None,
        &refused.to_string(),
        Some(refused),
    );

    let client = socks_refused(proxy, None, CONNECT, Dst::Addr(hole.addr), 0x06).await;
    let r = record(&f, client).await;
    assert_record(
        &r,
        "connect_timeout",
        None,
        &hole.addr.to_string(),
        Some(hole.addr),
    );
}

/// 0x07 (command not supported: BIND, and an unknown command) and 0x08 (address type not
/// supported: ATYP 5). Nothing is dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_unsupported_command_and_address_type() {
    let mut echo = Watched::new().await;
    let f = Ferry::start(
        &config(&[listener(
            "socks",
            "socks5",
            &destinations(&[cidr(echo.addr)]),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("socks");

    for cmd in [BIND, 0x09] {
        let client = socks_refused(proxy, None, cmd, Dst::Addr(echo.addr), 0x07).await;
        let r = record(&f, client).await;
        assert_eq!(r["result"], "protocol_error", "command {cmd:#04x}: {r}");
        assert!(r["server"].is_null(), "{r}");
    }

    let mut s = connect(proxy).await;
    let client = s.local_addr().unwrap();
    socks_open(&mut s, None).await;
    let mut req = socks_request(CONNECT, Dst::Addr(echo.addr));
    req[3] = 5;
    write(&mut s, &req).await;
    expect_reply_then_close(&mut s, &failure_reply(0x08), "ATYP 5").await;
    let r = record(&f, client).await;
    assert_eq!(r["result"], "protocol_error", "ATYP 5: {r}");
    assert!(r["server"].is_null(), "{r}");
    assert_eq!(echo.contacts().await, 0);
}

/// UDP ASSOCIATE on a listener without `udp = true`: 0x02, `denied`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_udp_associate_is_refused_without_udp() {
    let f = Ferry::start(
        &config(&[listener(
            "socks",
            "socks5",
            &destinations(&["127.0.0.0/8:*".to_string()]),
        )]),
        1,
    )
    .await;
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let client = socks_refused(f.addr("socks"), None, UDP_ASSOCIATE, Dst::Addr(any), 0x02).await;
    let r = record(&f, client).await;
    assert_record(&r, "denied", None, "0.0.0.0:0", None);
}

/// 0x04 for a name that does not resolve (`nonexistent.invalid`, allowed by an exact
/// entry). ferry looks names up in a hosts file only here, so no DNS server is involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_unresolvable_name_is_host_unreachable() {
    let cfg = config(&[listener(
        "socks",
        "socks5",
        &destinations(&["nonexistent.invalid:80".to_string()]),
    )]);
    let (f, _hosts) = start_with_hosts(&cfg, 1, "127.0.0.1 localhost\n").await;
    let client = socks_refused(
        f.addr("socks"),
        None,
        CONNECT,
        Dst::Name("nonexistent.invalid", 80),
        0x04,
    )
    .await;
    let r = record(&f, client).await;
    assert_record(&r, "connect_failed", None, "nonexistent.invalid:80", None);
}

/// 0x03 (network unreachable) and 0x04 (host unreachable), and HTTP 502 for both: ferry and
/// the client in a network namespace with loopback only, where 203.0.113.1 has no route
/// (ENETUNREACH) and 198.51.100.0/24 an `unreachable` route (EHOSTUNREACH).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_network_and_host_unreachable() {
    let ns = Netns::new();
    ns.ip(&["route", "add", "unreachable", "198.51.100.0/24"]);
    let extra = format!(
        "{}\nconnect_timeout = \"5s\"",
        destinations(&["203.0.113.0/24:*".into(), "198.51.100.0/24:*".into()])
    );
    let f = ns
        .start_ferry(
            &config(&[
                listener("socks", "socks5", &extra),
                listener("http", "http-connect", &extra),
            ]),
            2,
        )
        .await;
    let net: SocketAddr = "203.0.113.1:443".parse().unwrap();
    let host: SocketAddr = "198.51.100.1:443".parse().unwrap();

    for (dst, code) in [(net, 0x03), (host, 0x04)] {
        let mut s = ns.connect(f.addr("socks"));
        let client = s.local_addr().unwrap();
        socks_open(&mut s, None).await;
        write(&mut s, &socks_request(CONNECT, Dst::Addr(dst))).await;
        expect_reply_then_close(&mut s, &failure_reply(code), &format!("{dst}")).await;
        let r = record(&f, client).await;
        assert_record(&r, "connect_failed", None, &dst.to_string(), Some(dst));
    }
    for dst in [net, host] {
        let mut s = ns.connect(f.addr("http"));
        let client = s.local_addr().unwrap();
        write(&mut s, connect_head(&dst.to_string(), "").as_bytes()).await;
        let (resp, _) = read_until_closed(&mut s, WAIT).await;
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 502 "), "{dst}: {resp:?}");
        let r = record(&f, client).await;
        assert_record(&r, "connect_failed", None, &dst.to_string(), Some(dst));
    }
}

// ---------------------------------------------------------------------------------------
// 3. HTTP proxy: CONNECT, forwarding, every status.

/// `CONNECT host:port` (an IPv4 literal, an IPv6 literal, a name) answered `200 Connection
/// established`, then a raw tunnel; bytes the client wrote right after the head, in the
/// same write, reach the destination first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_tunnel_and_pipelined_bytes() {
    let (dst, caps) = capture_server().await;
    let echo6 = Watched::on("::1").await;
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &destinations(&[
                cidr(dst),
                format!("localhost:{}", dst.port()),
                cidr(echo6.addr),
            ]),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("http");

    // An IPv6 literal, `[::1]:port`.
    let (mut s, client, head) =
        http_request(proxy, connect_head(&echo6.addr.to_string(), "").as_bytes()).await;
    assert_eq!(head, ESTABLISHED);
    echo_round_trip(&mut s, b"over IPv6").await;
    drop(s);
    assert_record(
        &record(&f, client).await,
        "ok",
        None,
        &echo6.addr.to_string(),
        Some(echo6.addr),
    );

    // Plain: the head, the answer, then data.
    let (mut s, client, head) =
        http_request(proxy, connect_head(&dst.to_string(), "").as_bytes()).await;
    assert_eq!(head, ESTABLISHED);
    echo_round_trip(&mut s, b"through the tunnel").await;
    s.shutdown().await.unwrap();
    read_until_closed(&mut s, WAIT).await;
    assert_record(
        &record(&f, client).await,
        "ok",
        None,
        &dst.to_string(),
        Some(dst),
    );

    // Pipelined, to a name: the head and the first bytes in one write.
    let authority = format!("localhost:{}", dst.port());
    let mut req = connect_head(&authority, "").into_bytes();
    req.extend_from_slice(b"sent with the head");
    let (mut s, client, head) = http_request(proxy, &req).await;
    assert_eq!(head, ESTABLISHED);
    assert_eq!(
        read_exactly(&mut s, 18, "the pipelined bytes echoed").await,
        b"sent with the head"
    );
    echo_round_trip(&mut s, b"and after").await;
    s.shutdown().await.unwrap();
    read_until_closed(&mut s, WAIT).await;
    assert_record(&record(&f, client).await, "ok", None, &authority, Some(dst));
    let caps = captured(&caps, 2).await;
    assert_eq!(caps[1], b"sent with the headand after");
}

/// 400 for malformed requests: CONNECT without a port, bytes that are no HTTP, and a head
/// that has not ended after 16 KiB. Logged `protocol_error`; nothing dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_malformed_requests_get_400() {
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &destinations(&["127.0.0.0/8:*".to_string(), "*.example:*".to_string()]),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("http");
    let mut long = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nX-Pad: ".to_vec();
    long.resize(16 * 1024, b'a');
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "no port",
            b"CONNECT nohostport HTTP/1.1\r\nHost: nohostport\r\n\r\n".to_vec(),
        ),
        ("garbage", b"\x16\x03\x01\x00\x05hello\r\n\r\n".to_vec()),
        ("a head longer than 16 KiB", long),
    ];
    for (what, req) in cases {
        let (client, _) = http_refused(proxy, &req, 400).await;
        let r = record(&f, client).await;
        assert_eq!(r["result"], "protocol_error", "{what}: {r}");
        assert!(r["server"].is_null(), "{what}: {r}");
    }
}

/// 405 for a request in origin form (`GET / HTTP/1.1`): a proxy forwards only absolute-form
/// requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_origin_form_request_gets_405() {
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &destinations(&["127.0.0.0/8:*".to_string()]),
        )]),
        1,
    )
    .await;
    let (client, _) = http_refused(
        f.addr("http"),
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        405,
    )
    .await;
    let r = record(&f, client).await;
    assert_eq!(r["result"], "protocol_error", "{r}");
    assert!(r["server"].is_null(), "{r}");
}

/// 403 for destinations not allowed (CONNECT and absolute form; an IP literal only a name
/// entry covers; a name no entry matches), logged `denied`; the would-be server sees no
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_destination_not_allowed_gets_403_and_is_never_contacted() {
    let mut echo = Watched::new().await;
    let port = echo.addr.port();
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &destinations(&[format!("localhost:{port}")]),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("http");
    let cases = [
        (
            connect_head(&echo.addr.to_string(), ""),
            echo.addr.to_string(),
        ),
        (
            format!("GET http://{}/x HTTP/1.1\r\nHost: {0}\r\n\r\n", echo.addr),
            echo.addr.to_string(),
        ),
        (
            connect_head(&format!("other.invalid:{port}"), ""),
            format!("other.invalid:{port}"),
        ),
    ];
    for (req, shown) in cases {
        let (client, _) = http_refused(proxy, req.as_bytes(), 403).await;
        let r = record(&f, client).await;
        assert_record(&r, "denied", None, &shown, None);
    }
    assert_eq!(
        echo.contacts().await,
        0,
        "a refused destination was contacted"
    );
}

/// 407 with `Proxy-Authenticate: Basic realm="ferry"` when credentials are missing, wrong
/// or not Basic; the scheme name is case-insensitive (`basic` works); bob's bcrypt hash
/// works. Refusals are `denied` (wrong password: "authentication failed", the name given).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_authentication() {
    let mut echo = Watched::new().await;
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &format!("{}\n{}", destinations(&[cidr(echo.addr)]), users()),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("http");
    let target = echo.addr.to_string();

    let refusals = [
        ("no credentials", String::new(), None),
        (
            "a wrong password",
            proxy_auth("Basic", "alice", "wrong"),
            Some("alice"),
        ),
        (
            "an unknown user",
            proxy_auth("Basic", "mallory", ALICE_PW),
            Some("mallory"),
        ),
        (
            "another scheme",
            "Proxy-Authorization: Bearer abc\r\n".to_string(),
            None,
        ),
    ];
    for (what, auth, user) in refusals {
        let (client, resp) =
            http_refused(proxy, connect_head(&target, &auth).as_bytes(), 407).await;
        assert_eq!(
            header(&resp, "Proxy-Authenticate"),
            Some("Basic realm=\"ferry\""),
            "{what}: {resp:?}"
        );
        let r = record(&f, client).await;
        assert_eq!(r["result"], "denied", "{what}: {r}");
        assert!(r["server"].is_null(), "{what}: {r}");
        if let Some(u) = user {
            assert_eq!(r["user"], u, "{what}: {r}");
            assert_eq!(r["reason"], "authentication failed", "{what}: {r}");
        }
    }
    assert_eq!(echo.contacts().await, 0);

    for (scheme, user, pw) in [
        ("Basic", "alice", ALICE_PW),
        ("basic", "alice", ALICE_PW),
        ("BASIC", "bob", BOB_PW),
    ] {
        let req = connect_head(&target, &proxy_auth(scheme, user, pw));
        let (mut s, client, head) = http_request(proxy, req.as_bytes()).await;
        assert_eq!(head, ESTABLISHED, "{scheme} {user}");
        echo_round_trip(&mut s, b"authenticated").await;
        drop(s);
        assert_record(
            &record(&f, client).await,
            "ok",
            Some(user),
            &target,
            Some(echo.addr),
        );
    }
}

/// 502 when the destination refuses the connection (`connect_failed`), 504 when it does
/// not answer within `connect_timeout` (`connect_timeout`); the record names the address
/// dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_refused_gets_502_and_timed_out_504() {
    let refused = refused_addr();
    let hole = black_hole();
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &format!(
                "{}\nconnect_timeout = \"1s\"",
                destinations(&[cidr(refused), cidr(hole.addr)])
            ),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("http");

    let (client, _) = http_refused(
        proxy,
        connect_head(&refused.to_string(), "").as_bytes(),
        502,
    )
    .await;
    assert_record(
        &record(&f, client).await,
        "connect_failed",
        None,
        &refused.to_string(),
        Some(refused),
    );

    let (client, _) = http_refused(
        proxy,
        connect_head(&hole.addr.to_string(), "").as_bytes(),
        504,
    )
    .await;
    assert_record(
        &record(&f, client).await,
        "connect_timeout",
        None,
        &hole.addr.to_string(),
        Some(hole.addr),
    );
}

/// An absolute-form request (`GET http://host:port/path`) is forwarded: the origin gets
/// `GET /path HTTP/1.1` with `Connection: close` and without `Proxy-Authorization` or
/// `Proxy-Connection`, the client its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_absolute_form_is_forwarded_in_origin_form() {
    let origin = Origin::new().await;
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &format!("{}\n{}", destinations(&[cidr(origin.addr)]), users()),
        )]),
        1,
    )
    .await;
    let req = format!(
        "GET http://{0}/some/path?q=1 HTTP/1.1\r\nHost: {0}\r\nUser-Agent: forward-test\r\n\
         {1}Proxy-Connection: keep-alive\r\n\r\n",
        origin.addr,
        proxy_auth("Basic", "alice", ALICE_PW)
    );
    let mut s = connect(f.addr("http")).await;
    let client = s.local_addr().unwrap();
    write(&mut s, req.as_bytes()).await;
    let (resp, _) = read_until_closed(&mut s, WAIT).await;
    drop(s);
    let resp = String::from_utf8_lossy(&resp);
    assert!(
        resp.starts_with("HTTP/1.1 200 OK\r\n") && resp.ends_with(ORIGIN_BODY),
        "{resp:?}"
    );
    let head = origin.head_for("/some/path?q=1");
    assert!(
        head.starts_with("GET /some/path?q=1 HTTP/1.1\r\n"),
        "{head:?}"
    );
    assert_eq!(header(&head, "Connection"), Some("close"), "{head:?}");
    assert_eq!(
        header(&head, "User-Agent"),
        Some("forward-test"),
        "{head:?}"
    );
    assert_eq!(
        header(&head, "Host"),
        Some(origin.addr.to_string().as_str()),
        "{head:?}"
    );
    for h in ["Proxy-Authorization", "Proxy-Connection"] {
        assert_eq!(header(&head, h), None, "{h} reached the origin: {head:?}");
    }
    assert_record(
        &record(&f, client).await,
        "ok",
        Some("alice"),
        &origin.addr.to_string(),
        Some(origin.addr),
    );
}

/// `sni_must_match = true`: a tunnel whose TLS ClientHello names the CONNECT host works
/// (the client verifies the origin's certificate through it); one whose SNI names another
/// host is closed after the 200 and logged `denied`, and the destination gets none of the
/// client's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connect_sni_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry forward test CA");
    let (_server, tls_addr) = https_origin(dir.path(), &ca).await;
    let (capture, caps) = capture_server().await;
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &format!(
                "{}\nsni_must_match = true",
                destinations(&[
                    format!("localhost:{}", tls_addr.port()),
                    format!("localhost:{}", capture.port()),
                ])
            ),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("http");

    // Matching: TLS to the origin through the tunnel, certificate verified for `localhost`.
    let authority = format!("localhost:{}", tls_addr.port());
    let (a, ca_pem) = (authority.clone(), ca.pem());
    let (client, page) = blocking("TLS through the tunnel", move || {
        use std::io::{Read, Write};
        let mut sock = std::net::TcpStream::connect_timeout(&proxy, WAIT).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let client = sock.local_addr().unwrap();
        sock.write_all(connect_head(&a, "").as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            sock.read_exact(&mut b).expect("the CONNECT answer");
            head.push(b[0]);
        }
        assert_eq!(head, ESTABLISHED.as_bytes());
        let roots = [ca_pem];
        let o = ClientOpts {
            sni: Some("localhost"),
            roots: &roots,
            ..ClientOpts::default()
        };
        let mut tls = pki::tls_handshake(sock, &o, WAIT)
            .unwrap_or_else(|e| panic!("TLS handshake through the tunnel: {e}"));
        tls.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut page = Vec::new();
        let _ = tls.read_to_end(&mut page);
        (client, String::from_utf8_lossy(&page).into_owned())
    })
    .await;
    assert!(page.contains(S_SERVER_PAGE), "{page:?}");
    assert_record(
        &record(&f, client).await,
        "ok",
        None,
        &authority,
        Some(tls_addr),
    );

    // Not matching: closed after the 200, nothing passed on.
    let authority = format!("localhost:{}", capture.port());
    let (mut s, client, head) = http_request(proxy, connect_head(&authority, "").as_bytes()).await;
    assert_eq!(head, ESTABLISHED);
    write(&mut s, &pki::client_hello(Some("elsewhere.example"), &[])).await;
    let (more, _) = read_until_closed(&mut s, WAIT).await;
    assert!(more.is_empty(), "{more:?}");
    let r = record(&f, client).await;
    assert_eq!(r["result"], "denied", "{r}");
    assert_eq!(r["destination"], authority.as_str(), "{r}");
    assert_eq!(
        captured(&caps, 1).await,
        [Vec::<u8>::new()],
        "the destination got bytes of a refused tunnel"
    );
}

// ---------------------------------------------------------------------------------------
// 4. The destination policy.

/// Names under one domain that all resolve to 127.0.0.1 (ferry's own /etc/hosts): with
/// `["good.test.example:PORT", "*.test.example:*"]`, the exact name is served and the name
/// matched only by the wildcard is refused (SOCKS 0x02 through curl and a raw client, HTTP
/// 403), as it resolves to loopback; a listener whose CIDR entry allows 127.0.0.1 serves
/// it. The origin sees the served connections only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_name_resolving_to_loopback_is_refused_exact_name_served() {
    let mut origin = Origin::new().await;
    let port = origin.addr.port();
    let names = destinations(&[
        format!("good.test.example:{port}"),
        "*.test.example:*".to_string(),
    ]);
    let cfg = config(&[
        listener("socks", "socks5", &names),
        listener("http", "http-connect", &names),
        listener(
            "socks-cidr",
            "socks5",
            &destinations(&["*.test.example:*".to_string(), cidr(origin.addr)]),
        ),
    ]);
    let hosts = "127.0.0.1 localhost\n127.0.0.1 good.test.example\n127.0.0.1 evil.test.example\n";
    let (f, _hosts) = start_with_hosts(&cfg, 3, hosts).await;
    let socks = f.addr("socks").to_string();
    let good = format!("good.test.example:{port}");
    let evil = format!("evil.test.example:{port}");

    // curl, the proxy resolving: good served, evil refused.
    curl_ok(
        &["--socks5-hostname", &socks, &format!("http://{good}/good")],
        &[],
        ORIGIN_BODY,
    )
    .await;
    assert_record(
        &nth_record(&f, 1).await,
        "ok",
        None,
        &good,
        Some(origin.addr),
    );
    let out = curl_fails(
        &["--socks5-hostname", &socks, &format!("http://{evil}/evil")],
        &[],
    )
    .await;
    let r = nth_record(&f, 2).await;
    assert_record(&r, "denied", None, &evil, None);
    assert_reason(&r, "127.0.0.1");
    assert!(
        out.stderr.contains("SOCKS5"),
        "curl's error: {}",
        out.stderr
    );

    // A raw client: reply 0x02.
    let client = socks_refused(
        f.addr("socks"),
        None,
        CONNECT,
        Dst::Name("evil.test.example", port),
        0x02,
    )
    .await;
    assert_record(&record(&f, client).await, "denied", None, &evil, None);

    // HTTP: 403 for evil, 200 for good.
    let (client, _) = http_refused(f.addr("http"), connect_head(&evil, "").as_bytes(), 403).await;
    assert_record(&record(&f, client).await, "denied", None, &evil, None);
    let (mut s, client, head) =
        http_request(f.addr("http"), connect_head(&good, "").as_bytes()).await;
    assert_eq!(head, ESTABLISHED);
    write(&mut s, b"GET /good-http HTTP/1.1\r\nHost: good\r\n\r\n").await;
    let (resp, _) = read_until_closed(&mut s, WAIT).await;
    drop(s);
    assert!(String::from_utf8_lossy(&resp).ends_with(ORIGIN_BODY));
    assert_record(
        &record(&f, client).await,
        "ok",
        None,
        &good,
        Some(origin.addr),
    );

    assert_eq!(
        origin.contacts().await,
        2,
        "the origin saw a connection for a refused name"
    );

    // A CIDR entry allowing the address lets the wildcard name through.
    let (mut s, client, code, _) = socks_connect(
        f.addr("socks-cidr"),
        None,
        Dst::Name("evil.test.example", port),
    )
    .await;
    assert_eq!(code, 0, "wildcard name with a CIDR entry for its address");
    write(&mut s, b"GET /evil-cidr HTTP/1.1\r\nHost: evil\r\n\r\n").await;
    let (resp, _) = read_until_closed(&mut s, WAIT).await;
    drop(s);
    assert!(String::from_utf8_lossy(&resp).ends_with(ORIGIN_BODY));
    assert_record(
        &record(&f, client).await,
        "ok",
        None,
        &evil,
        Some(origin.addr),
    );
    assert_eq!(origin.contacts().await, 3);
}

/// ferry's own listening addresses are never destinations, even where `destinations`
/// allows them: a listener's own address, another listener's, and a name resolving to one
/// (SOCKS 0x02, HTTP 403, `denied`). Another port on the same address is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferry_own_listening_addresses_are_refused() {
    let echo = Watched::new().await;
    let all = destinations(&["127.0.0.0/8:*".to_string(), "localhost:*".to_string()]);
    let f = Ferry::start(
        &config(&[
            listener("socks", "socks5", &all),
            listener("http", "http-connect", &all),
        ]),
        2,
    )
    .await;
    let (socks, http) = (f.addr("socks"), f.addr("http"));

    for (dst, shown) in [
        (Dst::Addr(socks), socks.to_string()),
        (Dst::Addr(http), http.to_string()),
        (
            Dst::Name("localhost", http.port()),
            format!("localhost:{}", http.port()),
        ),
    ] {
        let client = socks_refused(socks, None, CONNECT, dst, 0x02).await;
        assert_record(&record(&f, client).await, "denied", None, &shown, None);
    }
    let (client, _) =
        http_refused(http, connect_head(&socks.to_string(), "").as_bytes(), 403).await;
    let r = record(&f, client).await;
    assert_record(&r, "denied", None, &socks.to_string(), None);
    assert_reason(&r, "own listening address");
    // Every refusal above is one record; none came from a connection ferry made to itself.
    assert_eq!(
        f.records(4, WAIT).await.len(),
        4,
        "{:#?}",
        f.log_lines_now()
    );

    let (mut s, client, code, _) = socks_connect(socks, None, Dst::Addr(echo.addr)).await;
    assert_eq!(code, 0);
    echo_round_trip(&mut s, b"not ferry").await;
    drop(s);
    assert_record(
        &record(&f, client).await,
        "ok",
        None,
        &echo.addr.to_string(),
        Some(echo.addr),
    );
}

// ---------------------------------------------------------------------------------------
// 5. Deadlines.

/// A client that stops mid-handshake (half a SOCKS5 greeting; a complete greeting and half
/// a request; half an HTTP head) is closed at `handshake_timeout` and logged
/// `protocol_error`, having been served for at least that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stopping_mid_handshake_is_closed_at_the_deadline() {
    let mut echo = Watched::new().await;
    let extra = format!(
        "{}\nhandshake_timeout = \"1s\"",
        destinations(&[cidr(echo.addr)])
    );
    let f = Ferry::start(
        &config(&[
            listener("socks", "socks5", &extra),
            listener("http", "http-connect", &extra),
        ]),
        2,
    )
    .await;

    // Each client in its own task, so that the three deadlines run at once.
    let half_greeting = async {
        let mut s = connect(f.addr("socks")).await;
        write(&mut s, &[5, 2, NO_AUTH]).await;
        let (data, _) = read_until_closed(&mut s, WAIT).await;
        assert!(data.is_empty(), "half greeting: {data:?}");
        s.local_addr().unwrap()
    };
    let half_request = async {
        let mut s = connect(f.addr("socks")).await;
        assert_eq!(greet(&mut s, &[NO_AUTH]).await, [5, NO_AUTH]);
        write(&mut s, &socks_request(CONNECT, Dst::Addr(echo.addr))[..6]).await;
        let (data, _) = read_until_closed(&mut s, WAIT).await;
        assert!(data.is_empty(), "half request: {data:?}");
        s.local_addr().unwrap()
    };
    let half_head = async {
        let mut s = connect(f.addr("http")).await;
        let head = connect_head(&echo.addr.to_string(), "");
        write(&mut s, &head.as_bytes()[..head.len() - 4]).await;
        let (data, _) = read_until_closed(&mut s, WAIT).await;
        assert!(
            !String::from_utf8_lossy(&data).starts_with("HTTP/1.1 200"),
            "half head: {data:?}"
        );
        s.local_addr().unwrap()
    };
    let (a, b, c) = tokio::join!(half_greeting, half_request, half_head);
    for (what, client) in [("half greeting", a), ("half request", b), ("half head", c)] {
        let r = record(&f, client).await;
        assert_eq!(r["result"], "protocol_error", "{what}: {r}");
        let ms = r["duration_ms"].as_f64().unwrap();
        assert!(
            ms >= 1000.0,
            "{what}: closed after {ms} ms, before handshake_timeout: {r}"
        );
    }
    assert_eq!(echo.contacts().await, 0);
}

// ---------------------------------------------------------------------------------------
// 6. Real clients: curl.

/// curl through SOCKS5 without credentials: `--socks5` (curl resolves `localhost`, ferry
/// gets 127.0.0.1, allowed by a CIDR entry) and `--socks5-hostname` (ferry resolves the
/// name, allowed by an exact entry), to an HTTP origin and to an HTTPS one whose
/// certificate curl verifies through the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_socks5_to_http_and_https_origins() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry forward test CA");
    let ca_path = ca.write(dir.path(), "ca");
    let ca_path = ca_path.to_str().unwrap();
    let (_server, tls_addr) = https_origin(dir.path(), &ca).await;
    let origin = Origin::new().await;
    let (o, t) = (origin.addr.port(), tls_addr.port());
    let f = Ferry::start(
        &config(&[listener(
            "socks",
            "socks5",
            &destinations(&[
                cidr(origin.addr),
                cidr(tls_addr),
                format!("localhost:{o}"),
                format!("localhost:{t}"),
            ]),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("socks").to_string();

    let http = format!("http://localhost:{o}/socks5");
    curl_ok(&["--socks5", &proxy, &http], &[], ORIGIN_BODY).await;
    assert_record(
        &nth_record(&f, 1).await,
        "ok",
        None,
        &origin.addr.to_string(),
        Some(origin.addr),
    );
    let http_h = format!("http://localhost:{o}/socks5-hostname");
    curl_ok(&["--socks5-hostname", &proxy, &http_h], &[], ORIGIN_BODY).await;
    assert_record(
        &nth_record(&f, 2).await,
        "ok",
        None,
        &format!("localhost:{o}"),
        Some(origin.addr),
    );
    assert!(
        origin
            .head_for("/socks5")
            .contains(&format!("Host: localhost:{o}"))
    );
    origin.head_for("/socks5-hostname");

    let https = format!("https://localhost:{t}/");
    curl_ok(
        &["--socks5", &proxy, "--cacert", ca_path, &https],
        &[],
        S_SERVER_PAGE,
    )
    .await;
    assert_record(
        &nth_record(&f, 3).await,
        "ok",
        None,
        &tls_addr.to_string(),
        Some(tls_addr),
    );
    curl_ok(
        &["--socks5-hostname", &proxy, "--cacert", ca_path, &https],
        &[],
        S_SERVER_PAGE,
    )
    .await;
    assert_record(
        &nth_record(&f, 4).await,
        "ok",
        None,
        &format!("localhost:{t}"),
        Some(tls_addr),
    );
}

/// curl through SOCKS5 with credentials (`--proxy-user`): alice (password) to the HTTP
/// origin, bob (bcrypt) to the HTTPS one, verified; without credentials curl is refused
/// (no acceptable method), with a wrong password too (`authentication failed`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_socks5_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry forward test CA");
    let ca_path = ca.write(dir.path(), "ca");
    let ca_path = ca_path.to_str().unwrap();
    let (_server, tls_addr) = https_origin(dir.path(), &ca).await;
    let mut origin = Origin::new().await;
    let (o, t) = (origin.addr.port(), tls_addr.port());
    let f = Ferry::start(
        &config(&[listener(
            "socks",
            "socks5",
            &format!(
                "{}\n{}",
                destinations(&[
                    cidr(tls_addr),
                    format!("localhost:{o}"),
                    format!("localhost:{t}"),
                ]),
                users()
            ),
        )]),
        1,
    )
    .await;
    let proxy = f.addr("socks").to_string();
    let alice = format!("alice:{ALICE_PW}");
    let bob = format!("bob:{BOB_PW}");
    let http = format!("http://localhost:{o}/alice");
    let https = format!("https://localhost:{t}/");

    curl_ok(
        &["--socks5-hostname", &proxy, "--proxy-user", &alice, &http],
        &[],
        ORIGIN_BODY,
    )
    .await;
    assert_record(
        &nth_record(&f, 1).await,
        "ok",
        Some("alice"),
        &format!("localhost:{o}"),
        Some(origin.addr),
    );
    curl_ok(
        &[
            "--socks5",
            &proxy,
            "--proxy-user",
            &bob,
            "--cacert",
            ca_path,
            &https,
        ],
        &[],
        S_SERVER_PAGE,
    )
    .await;
    assert_record(
        &nth_record(&f, 2).await,
        "ok",
        Some("bob"),
        &tls_addr.to_string(),
        Some(tls_addr),
    );

    curl_fails(&["--socks5-hostname", &proxy, &http], &[]).await;
    let r = nth_record(&f, 3).await;
    assert_eq!(r["result"], "denied", "{r}");
    let wrong = "alice:wrong".to_string();
    curl_fails(
        &["--socks5-hostname", &proxy, "--proxy-user", &wrong, &http],
        &[],
    )
    .await;
    let r = nth_record(&f, 4).await;
    assert_eq!(r["result"], "denied", "{r}");
    assert_eq!(r["user"], "alice", "{r}");
    assert_eq!(r["reason"], "authentication failed", "{r}");
    assert_eq!(origin.contacts().await, 1, "only alice's request");
}

/// curl through the HTTP proxy without credentials: `-x` to an HTTPS origin (CONNECT,
/// certificate verified), `-p -x` to an HTTP origin (CONNECT forced), and `http_proxy` to
/// an HTTP origin (absolute form forwarded: the origin gets origin form, `Connection:
/// close`, no `Proxy-Connection`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http_proxy_to_http_and_https_origins() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry forward test CA");
    let ca_path = ca.write(dir.path(), "ca");
    let ca_path = ca_path.to_str().unwrap();
    let (_server, tls_addr) = https_origin(dir.path(), &ca).await;
    let origin = Origin::new().await;
    let (o, t) = (origin.addr.port(), tls_addr.port());
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &destinations(&[format!("localhost:{o}"), format!("localhost:{t}")]),
        )]),
        1,
    )
    .await;
    let proxy = format!("http://{}", f.addr("http"));

    curl_ok(
        &[
            "-x",
            &proxy,
            "--cacert",
            ca_path,
            &format!("https://localhost:{t}/"),
        ],
        &[],
        S_SERVER_PAGE,
    )
    .await;
    assert_record(
        &nth_record(&f, 1).await,
        "ok",
        None,
        &format!("localhost:{t}"),
        Some(tls_addr),
    );

    curl_ok(
        &["-p", "-x", &proxy, &format!("http://localhost:{o}/tunnel")],
        &[],
        ORIGIN_BODY,
    )
    .await;
    assert_record(
        &nth_record(&f, 2).await,
        "ok",
        None,
        &format!("localhost:{o}"),
        Some(origin.addr),
    );
    let head = origin.head_for("/tunnel");
    assert!(head.starts_with("GET /tunnel HTTP/1.1\r\n"), "{head:?}");

    curl_ok(
        &[&format!("http://localhost:{o}/plain")],
        &[("http_proxy", &proxy)],
        ORIGIN_BODY,
    )
    .await;
    assert_record(
        &nth_record(&f, 3).await,
        "ok",
        None,
        &format!("localhost:{o}"),
        Some(origin.addr),
    );
    let head = origin.head_for("/plain");
    assert!(head.starts_with("GET /plain HTTP/1.1\r\n"), "{head:?}");
    assert_eq!(header(&head, "Connection"), Some("close"), "{head:?}");
    assert_eq!(header(&head, "Proxy-Connection"), None, "{head:?}");
}

/// curl through the HTTP proxy with credentials: `-x` with `--proxy-user` (alice) to the
/// HTTPS origin, `-p -x` (bob, bcrypt) to the HTTP one, `http_proxy=http://alice:…@…`
/// forwarding (the origin gets no `Proxy-Authorization`); without credentials and with a
/// wrong password curl gets 407.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http_proxy_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry forward test CA");
    let ca_path = ca.write(dir.path(), "ca");
    let ca_path = ca_path.to_str().unwrap();
    let (_server, tls_addr) = https_origin(dir.path(), &ca).await;
    let mut origin = Origin::new().await;
    let (o, t) = (origin.addr.port(), tls_addr.port());
    let f = Ferry::start(
        &config(&[listener(
            "http",
            "http-connect",
            &format!(
                "{}\n{}",
                destinations(&[format!("localhost:{o}"), format!("localhost:{t}")]),
                users()
            ),
        )]),
        1,
    )
    .await;
    let ferry = f.addr("http");
    let proxy = format!("http://{ferry}");
    let alice = format!("alice:{ALICE_PW}");
    let bob = format!("bob:{BOB_PW}");
    let https = format!("https://localhost:{t}/");

    curl_ok(
        &[
            "-x",
            &proxy,
            "--proxy-user",
            &alice,
            "--cacert",
            ca_path,
            &https,
        ],
        &[],
        S_SERVER_PAGE,
    )
    .await;
    assert_record(
        &nth_record(&f, 1).await,
        "ok",
        Some("alice"),
        &format!("localhost:{t}"),
        Some(tls_addr),
    );

    curl_ok(
        &[
            "-p",
            "-x",
            &proxy,
            "--proxy-user",
            &bob,
            &format!("http://localhost:{o}/bob"),
        ],
        &[],
        ORIGIN_BODY,
    )
    .await;
    assert_record(
        &nth_record(&f, 2).await,
        "ok",
        Some("bob"),
        &format!("localhost:{o}"),
        Some(origin.addr),
    );

    let with_user = format!("http://alice:{ALICE_PW}@{ferry}");
    curl_ok(
        &[&format!("http://localhost:{o}/forwarded")],
        &[("http_proxy", &with_user)],
        ORIGIN_BODY,
    )
    .await;
    assert_record(
        &nth_record(&f, 3).await,
        "ok",
        Some("alice"),
        &format!("localhost:{o}"),
        Some(origin.addr),
    );
    let head = origin.head_for("/forwarded");
    assert_eq!(header(&head, "Proxy-Authorization"), None, "{head:?}");

    let out = curl_fails(&["-x", &proxy, "--cacert", ca_path, &https], &[]).await;
    assert!(out.stderr.contains("407"), "curl's error: {}", out.stderr);
    let r = nth_record(&f, 4).await;
    assert_eq!(r["result"], "denied", "{r}");
    let wrong = "alice:wrong".to_string();
    let out = curl_fails(
        &[
            "-x",
            &proxy,
            "--proxy-user",
            &wrong,
            "--cacert",
            ca_path,
            &https,
        ],
        &[],
    )
    .await;
    assert!(out.stderr.contains("407"), "curl's error: {}", out.stderr);
    let r = nth_record(&f, 5).await;
    assert_eq!(r["result"], "denied", "{r}");
    assert_eq!(r["user"], "alice", "{r}");
    assert_eq!(r["reason"], "authentication failed", "{r}");
    assert_eq!(
        origin.contacts().await,
        2,
        "bob's and the forwarded request"
    );
}

// ---------------------------------------------------------------------------------------
// 7. Config.

/// A forward listener without `destinations` is refused ("would be an open proxy"), and so
/// are `upstream` and routes on these modes.
#[test]
fn forward_listener_config_errors() {
    for mode in ["socks5", "http-connect"] {
        let c = check_config_in(
            None,
            &format!("[[listener]]\nname = \"fwd\"\nlisten = \"127.0.0.1:0\"\nmode = \"{mode}\"\n"),
        );
        assert_eq!(c.code, Some(1), "{mode}: {}", c.stderr);
        assert!(
            c.errors
                .iter()
                .any(|e| e.contains("would be an open proxy")),
            "{mode}: {}",
            c.stderr
        );

        let with = |extra: &str| {
            format!(
                "[[listener]]\nname = \"fwd\"\nlisten = \"127.0.0.1:0\"\nmode = \"{mode}\"\n\
                 destinations = [\"10.0.0.0/8:443\"]\n{extra}\n\
                 [[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:1\"]\n"
            )
        };
        let c = check_config_in(None, &with("upstream = \"u\""));
        assert_eq!(c.code, Some(1), "{mode} with upstream: {}", c.stderr);
        assert!(
            c.errors.iter().any(|e| e.contains("`upstream`")),
            "{mode} with upstream: {}",
            c.stderr
        );
        let c = check_config_in(
            None,
            &with("[[listener.route]]\nsni = \"a.example\"\nupstream = \"u\""),
        );
        assert_eq!(c.code, Some(1), "{mode} with a route: {}", c.stderr);
        assert!(!c.errors.is_empty(), "{mode} with a route: {}", c.stderr);
    }
}

/// The longest durations `ferry check` accepts never panic the dial or the UDP relay
/// (the deadline arithmetic saturates): a refused destination is still answered 0x05, and
/// the worker goes on serving.
#[tokio::test]
async fn longest_durations_never_panic() {
    let f = Ferry::start(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "socks"
listen = "127.0.0.1:0"
mode = "socks5"
udp = true
connect_timeout = "3650d"
idle_timeout = "3650d"
handshake_timeout = "3650d"
destinations = ["127.0.0.0/8:*"]
[global]
workers = 1
"#,
        1,
    )
    .await;
    let refused = refused_addr();
    for round in 0..2 {
        let mut c = connect(f.addr("socks")).await;
        within(WAIT, "SOCKS5 exchange", async {
            c.write_all(b"\x05\x01\x00").await.unwrap();
            let mut m = [0u8; 2];
            c.read_exact(&mut m).await.unwrap();
            assert_eq!(m, [5, 0]);
            let mut req = b"\x05\x01\x00\x01\x7f\x00\x00\x01".to_vec();
            req.extend_from_slice(&refused.port().to_be_bytes());
            c.write_all(&req).await.unwrap();
            let mut r = [0u8; 10];
            c.read_exact(&mut r).await.unwrap();
            assert_eq!(&r[..2], &[5, 5], "round {round}: 0x05 connection refused");
        })
        .await;
    }
    let recs = f.records_with("connect_failed", 2, WAIT).await;
    assert_eq!(recs.len(), 2);
    assert!(!f.stderr.text().contains("panicked"), "{}", f.stderr.text());
}
