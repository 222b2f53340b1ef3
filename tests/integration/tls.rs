//! TLS termination (`mode = "tls"`) with real clients: curl and `openssl s_client` through
//! ferry to in-process backends, and a rustls client for what needs a close look
//! (the certificate served, the handshake kind, close_notify). Covered: certificates by
//! SNI, client certificates (required and optional, expired, re-checked on resumption),
//! ALPN, the minimum version, session resumption (tickets, session IDs, across reloads),
//! half-close both ways through TLS, certificate swaps by reload, config errors from
//! `ferry check`, the handshake deadline, many short handshakes, expiry warnings and
//! metrics, big and slow transfers, a ClientHello in pieces, KeyUpdate, a PROXY header
//! before TLS, routes on SNI and ALPN, close_notify on ends ferry decides, key formats.
//!
//! Every wait is bounded; certificates and keys are made by rcgen in each test's own
//! temporary folder.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::pki::{self, Ca, ClientOpts, Leaf, Tls};
use crate::common::*;
use crate::ops_support::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// Helpers: configs, files, clients.

/// A config with `[admin]`, the access log, one `mode = "tls"` listener `web` (with
/// `listener_extra` lines, then `tls`, which may be an inline `tls = {...}` or a
/// `[listener.tls]` table) in front of the single server `backend`.
fn tls_config(listener_extra: &str, tls: &str, backend: SocketAddr) -> String {
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[log]
access = "@LOG@"

[[listener]]
name = "web"
listen = "127.0.0.1:0"
mode = "tls"
upstream = "back"
{listener_extra}
{tls}

[[upstream]]
name = "back"
servers = ["{backend}"]
"#
    )
}

/// `tls = { cert = "DIR/NAME.pem", key = "DIR/NAME.key" }`.
fn inline_tls(dir: &Path, name: &str) -> String {
    format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        dir.join(format!("{name}.pem")).display(),
        dir.join(format!("{name}.key")).display()
    )
}

/// A client's settings, owned (so they can move into a blocking task).
#[derive(Clone, Default)]
struct Client {
    sni: Option<String>,
    /// Trust anchors, PEM.
    roots: Vec<String>,
    cert: Option<Leaf>,
    alpn: Vec<String>,
    /// A config to reuse (sessions are kept in it), or a custom one.
    config: Option<Arc<rustls::ClientConfig>>,
}

impl Client {
    /// Verifies the server against `ca`, sending `sni`.
    fn new(ca: &Ca, sni: &str) -> Client {
        Client {
            sni: Some(sni.to_string()),
            roots: vec![ca.pem()],
            ..Client::default()
        }
    }

    fn with<T>(&self, f: impl FnOnce(&ClientOpts<'_>) -> T) -> T {
        let alpn: Vec<&str> = self.alpn.iter().map(String::as_str).collect();
        f(&ClientOpts {
            sni: self.sni.as_deref(),
            roots: &self.roots,
            client_cert: self.cert.as_ref(),
            alpn: &alpn,
            config: self.config.clone(),
        })
    }

    /// Builds this client's config once, so that connections made with the result share
    /// their sessions (resumption).
    fn keep_sessions(mut self) -> Client {
        let cfg = self.with(pki::client_config);
        self.config = Some(cfg);
        self
    }

    /// A client that accepts any server certificate (to look at which one was served).
    fn any_server(mut self) -> Client {
        let cfg = self.with(pki::client_config_any_server);
        self.config = Some(cfg);
        self
    }
}

/// Connects from a known local address and completes a handshake (blocking).
fn tls_try(addr: SocketAddr, c: &Client) -> (SocketAddr, Result<Tls, String>) {
    let sock = std::net::TcpStream::connect_timeout(&addr, WAIT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let local = sock.local_addr().unwrap();
    (local, c.with(|o| pki::tls_handshake(sock, o, WAIT)))
}

/// A handshake and one echo round trip (blocking). A TLS 1.3 client finishes its side of
/// the handshake before the server has checked its certificate: a refusal then shows on
/// the first read, so both count as the attempt failing.
fn tls_attempt(addr: SocketAddr, c: &Client, msg: &[u8]) -> (SocketAddr, Result<Tls, String>) {
    let (local, r) = tls_try(addr, c);
    let r = r.and_then(|mut t| {
        let back = pki::tls_echo(&mut t, msg)?;
        if back != msg {
            return Err(format!("echo differs: sent {msg:?}, got {back:?}"));
        }
        Ok(t)
    });
    (local, r)
}

/// Like [`tls_attempt`], panicking if it fails.
fn tls_served(addr: SocketAddr, c: &Client, msg: &[u8]) -> (SocketAddr, Tls) {
    let (local, r) = tls_attempt(addr, c, msg);
    let t = r.unwrap_or_else(|e| panic!("client {local} (SNI {:?}) not served: {e}", c.sni));
    (local, t)
}

/// Ends a session cleanly: our close_notify, then the server's (which comes once the
/// echo backend has seen EOF and closed): the read must end with `Ok(0)`, not an error.
fn tls_finish(mut t: Tls) {
    t.conn.send_close_notify();
    t.flush().expect("send close_notify");
    let mut rest = Vec::new();
    match t.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "data after our close_notify: {rest:?}"),
        Err(e) => panic!("the session did not end with the server's close_notify: {e}"),
    }
}

/// The DER of the certificate a session was served.
fn served_cert(t: &Tls) -> Vec<u8> {
    t.conn
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the server sent no certificate")
        .to_vec()
}

/// Sends `n` pseudo-random bytes from `seed` through an echo backend while reading the
/// echo at the same time, then close_notify; returns the count and SHA-256 of what came
/// back before the server's close_notify. With `key_update_every`, the client also sends
/// a TLS 1.3 KeyUpdate (asking the server to update too) every that many bytes.
fn tls_duplex(t: Tls, n: u64, seed: u64, key_update_every: Option<u64>) -> (u64, [u8; 32]) {
    // One session, two threads: the writer encrypts under the lock and writes outside
    // it; the reader reads outside it and decrypts under it.
    let rustls::StreamOwned { conn, sock } = t;
    let conn = Arc::new(Mutex::new(conn));
    let wsock = sock.try_clone().unwrap();
    let wconn = conn.clone();
    let writer = std::thread::spawn(move || {
        let mut wsock = wsock;
        let mut rng = Prng::new(seed);
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = n;
        let mut out = Vec::new();
        let mut closed = false;
        let mut since_update = 0u64;
        loop {
            {
                let mut c = wconn.lock().unwrap();
                if left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    rng.fill(&mut buf[..k]);
                    c.writer().write_all(&buf[..k]).unwrap();
                    left -= k as u64;
                    since_update += k as u64;
                    if key_update_every.is_some_and(|e| since_update >= e) {
                        c.refresh_traffic_keys().expect("KeyUpdate");
                        since_update = 0;
                    }
                } else if !closed {
                    c.send_close_notify();
                    closed = true;
                }
                while c.wants_write() {
                    c.write_tls(&mut out).unwrap();
                }
            }
            wsock.write_all(&out).expect("write to ferry");
            out.clear();
            if closed {
                return;
            }
        }
    });
    let mut rsock = sock;
    let mut h = Sha256::new();
    let mut got = 0u64;
    let mut raw = vec![0u8; 64 * 1024];
    let mut plain = vec![0u8; 64 * 1024];
    'read: loop {
        let k = rsock.read(&mut raw).expect("read from ferry");
        let mut c = conn.lock().unwrap();
        if k == 0 {
            panic!("TCP EOF without close_notify after {got} bytes");
        }
        let mut input = &raw[..k];
        while !input.is_empty() {
            c.read_tls(&mut input).unwrap();
            c.process_new_packets()
                .unwrap_or_else(|e| panic!("TLS after {got} bytes: {e}"));
            loop {
                match c.reader().read(&mut plain) {
                    Ok(0) => break 'read,
                    Ok(m) => {
                        got += m as u64;
                        h.update(&plain[..m]);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("reading plaintext: {e}"),
                }
            }
        }
    }
    writer.join().expect("the writer thread");
    (got, h.finalize().into())
}

/// `n` pseudo-random bytes from `seed`, made 64 KiB at a time as [`prng_sha256`] and
/// [`write_prng`] make them (each `Prng::fill` call draws one extra number).
fn prng_bytes(n: u64, seed: u64) -> Vec<u8> {
    let mut rng = Prng::new(seed);
    let mut data = vec![0u8; n as usize];
    for chunk in data.chunks_mut(64 * 1024) {
        rng.fill(chunk);
    }
    data
}

/// Runs `f` on the blocking pool, bounded by `3 * WAIT`; a panic in it fails the test.
async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match within(3 * WAIT, what, tokio::task::spawn_blocking(f)).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// The access-log records, at least `n`, of those `clients` (a record each, in order).
async fn records_of(ferry: &Ferry, n: usize, clients: &[SocketAddr]) -> Vec<Value> {
    let recs = ferry.records(n, WAIT).await;
    clients
        .iter()
        .map(|c| record_for(&recs, *c).clone())
        .collect()
}

/// The listener `name` in `/api/status`.
async fn listener_status(admin: SocketAddr, name: &str) -> Value {
    let st = status(admin).await;
    st["listeners"]
        .as_array()
        .expect("listeners[]")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name:?} in {st:#}"))
        .clone()
}

/// `ferry_tls_handshakes_total{listener, result}`.
async fn handshakes(admin: SocketAddr, listener: &str, result: &str) -> f64 {
    metric_must(
        &metrics(admin).await,
        "ferry_tls_handshakes_total",
        &[("listener", listener), ("result", result)],
    )
}

/// Asserts a record is a refused handshake: `protocol_error`, a `reason` containing
/// `reason_has` (case-insensitive), nothing relayed.
#[track_caller]
fn assert_refused(rec: &Value, reason_has: &str) {
    assert_eq!(rec["result"], "protocol_error", "{rec}");
    let reason = rec["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("no reason: {rec}"));
    assert!(
        reason.to_lowercase().contains(&reason_has.to_lowercase()),
        "reason {reason:?} does not mention {reason_has:?}: {rec}"
    );
    assert_eq!(rec["bytes_up"], 0, "{rec}");
    assert_eq!(rec["bytes_down"], 0, "{rec}");
    assert!(rec.get("client_cert").is_none(), "{rec}");
}

/// Writes `text` as ferry's config (with `@LOG@` as at start).
fn rewrite_config(ferry: &Ferry, text: &str) {
    let text = text.replace("@LOG@", &ferry.log_path.display().to_string());
    std::fs::write(&ferry.config_path, text).expect("rewrite config");
}

/// Sends SIGHUP and waits for the `n`th stderr line containing `mark`.
async fn sighup_and_wait(ferry: &Ferry, n: usize, mark: &str) {
    ferry.signal("HUP");
    ferry
        .stderr
        .wait_count(n, WAIT, |l| l.contains(mark))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no {mark:?} (#{n}) after SIGHUP; stderr:\n{}",
                ferry.stderr.text()
            )
        });
}

// ---------------------------------------------------------------------------------------
// Helpers: child processes (curl, openssl).

/// A child process whose stdout is read by a thread into a channel.
struct Proc {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out: std::sync::mpsc::Receiver<Vec<u8>>,
    stdout: Vec<u8>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// The thread copying stderr: `finish` waits for it, so that no line is missed.
    stderr_reader: std::thread::JoinHandle<()>,
    what: String,
}

impl Proc {
    fn spawn(mut cmd: Command, with_stdin: bool) -> Proc {
        let what = format!("{cmd:?}");
        cmd.stdin(if with_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        let (tx, out) = std::sync::mpsc::channel();
        let mut so = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = so.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let e = stderr.clone();
        let mut se = child.stderr.take().unwrap();
        let stderr_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = se.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Proc {
            stdin: child.stdin.take(),
            child,
            out,
            stdout: Vec::new(),
            stderr,
            stderr_reader,
            what,
        }
    }

    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Kills the child (by its id) and panics with what it printed.
    fn fail(&mut self, why: &str) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!(
            "{}: {why}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.stdout_text(),
            self.stderr_text()
        );
    }

    /// Reads stdout until it contains `needle`, within `WAIT`.
    fn wait_stdout(&mut self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.stdout_text().contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(chunk) => self.stdout.extend_from_slice(&chunk),
                Err(_) => self.fail(&format!("{needle:?} did not show on stdout")),
            }
        }
    }

    /// Closes stdin and waits (within `WAIT`) for the child to exit and close stdout.
    fn finish(mut self) -> (ExitStatus, String, String) {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(chunk) => self.stdout.extend_from_slice(&chunk),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    self.fail("did not exit in time")
                }
            }
        }
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() >= deadline {
                self.fail("did not exit in time");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The child has exited, so its stderr is at its end; the copy may lag behind.
        while !self.stderr_reader.is_finished() {
            if Instant::now() >= deadline {
                self.fail("its stderr did not close in time");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (out, err) = (self.stdout_text(), self.stderr_text());
        (st, out, err)
    }
}

/// Runs a command without input to completion (within `WAIT`).
fn run(cmd: Command) -> (ExitStatus, String, String) {
    Proc::spawn(cmd, false).finish()
}

/// `openssl s_client -connect ADDR ARGS...` sending `line` to an echo backend: waits for
/// the echo, then closes stdin (s_client then sends close_notify and exits). Returns its
/// stdout and stderr; panics if it fails.
fn s_client_echo(addr: SocketAddr, args: &[&str], line: &str) -> (String, String) {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args);
    let mut p = Proc::spawn(cmd, true);
    let sent = format!("{line}\n");
    if let Err(e) = p.stdin.as_mut().unwrap().write_all(sent.as_bytes()) {
        p.fail(&format!("writing its stdin: {e}"));
    }
    p.wait_stdout(line);
    let (st, out, err) = p.finish();
    assert!(st.success(), "s_client {args:?}: {st}\n{out}\n{err}");
    (out, err)
}

/// `openssl s_client -connect ADDR ARGS...` with no input: for handshakes that must fail.
/// Returns its exit status and stdout + stderr.
fn s_client_no_input(addr: SocketAddr, args: &[&str]) -> (ExitStatus, String) {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args);
    let (st, out, err) = run(cmd);
    (st, format!("{out}\n{err}"))
}

// ---------------------------------------------------------------------------------------
// Backends.

/// A minimal HTTP/1.1 server: `GET /` answers `PAGE`, `GET /big` answers `big`; each
/// answer closes the connection. Every request's length and answer's length go to `seen`.
async fn http_server(
    big: Arc<Vec<u8>>,
    seen: Arc<Mutex<Vec<(String, usize, usize)>>>,
) -> SocketAddr {
    serve_on("127.0.0.1", move |mut s| {
        let big = big.clone();
        let seen = seen.clone();
        async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&req).into_owned();
            let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, body): (&str, &[u8]) = match path.as_str() {
                "/" => ("200 OK", PAGE),
                "/big" => ("200 OK", &big),
                _ => ("404 Not Found", b"no such page\n"),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            seen.lock()
                .unwrap()
                .push((path, req.len(), head.len() + body.len()));
            if s.write_all(head.as_bytes()).await.is_ok() && s.write_all(body).await.is_ok() {
                let _ = s.shutdown().await;
                // Wait for the client to close, so its bytes are all counted.
                let _ = s.read(&mut buf).await;
            }
        }
    })
    .await
}

const PAGE: &[u8] = b"<!doctype html><title>ferry</title><p>terminated by ferry</p>\n";

// ---------------------------------------------------------------------------------------
// 1. Termination with real clients: curl (an HTTP page and 5 MiB) and openssl s_client.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_through_termination() {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry test CA");
    let ca_path = ca.write(files.path(), "ca");
    // The site's certificate is issued by an intermediate CA: the file holds both, and the
    // clients trust the root only, so the whole chain must be served.
    let inter = ca.intermediate("ferry test intermediate");
    let site = inter.server(&["localhost", "127.0.0.1"]);
    site.write(files.path(), "site");
    std::fs::write(
        files.path().join("site.pem"),
        format!("{}{}", site.cert_pem, inter.pem()),
    )
    .unwrap();
    let mut big = vec![0u8; 5 << 20];
    Prng::new(42).fill(&mut big);
    let big_sha = sha256(&big);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let web = http_server(Arc::new(big), seen.clone()).await;
    let echo = echo_server().await;
    let cfg = tls_config(
        "",
        &inline_tls(files.path(), "site").replace("tls = {", "tls = { alpn = [\"http/1.1\"],"),
        web,
    ) + &format!(
        r#"
[[listener]]
name = "echo"
listen = "127.0.0.1:0"
mode = "tls"
upstream = "echo"
{}

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#,
        inline_tls(files.path(), "site")
    );
    let ferry = Ferry::start(&cfg, 2).await;
    let port = ferry.addr("web").port();

    // curl verifies the certificate against the CA for "localhost"; the page, then 5 MiB.
    let ca_s = ca_path.display().to_string();
    let out_path = files.path().join("big.out");
    let (ca2, out2) = (ca_s.clone(), out_path.clone());
    let (page, big_out) = blocking("curl", move || {
        let curl = |path: &str, out: Option<&Path>| {
            let mut cmd = Command::new("curl");
            cmd.args(["-sS", "--fail", "--max-time", "20", "--cacert", &ca2])
                .arg("--resolve")
                .arg(format!("localhost:{port}:127.0.0.1"))
                .arg("-w")
                .arg("\n%{http_version} %{ssl_verify_result}")
                .arg(format!("https://localhost:{port}{path}"));
            if let Some(o) = out {
                cmd.arg("-o").arg(o);
            }
            let (st, out, err) = run(cmd);
            assert!(st.success(), "curl {path}: {st}\n{out}\n{err}");
            out
        };
        (curl("/", None), curl("/big", Some(&out2)))
    })
    .await;
    let expected_page = format!("{}\n1.1 0", String::from_utf8_lossy(PAGE));
    assert_eq!(
        page, expected_page,
        "the page through curl (then HTTP version, verify result)"
    );
    assert_eq!(big_out, "\n1.1 0");
    let got = std::fs::read(&out_path).unwrap();
    assert_eq!(got.len(), 5 << 20, "5 MiB through curl");
    assert_eq!(sha256(&got), big_sha, "the 5 MiB differ");

    // openssl s_client: the chain verifies, a line comes back from the echo server.
    let echo_addr = ferry.addr("echo");
    let (out, err) = blocking("openssl s_client", move || {
        s_client_echo(
            echo_addr,
            &[
                "-servername",
                "localhost",
                "-CAfile",
                &ca_s,
                "-verify_return_error",
            ],
            "hello through ferry",
        )
    })
    .await;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}\n{err}");
    assert!(out.contains("New, TLSv1.3"), "{out}");
    assert!(
        out.contains("1 s:CN = ferry test intermediate") && out.contains("i:CN = ferry test CA"),
        "the chain served: {out}"
    );

    // The records: SNI, version, cipher, ALPN (agreed with curl), plaintext byte counts.
    let recs = ferry.records(3, WAIT).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (path, up, down) in &seen {
        let rec = recs
            .iter()
            .find(|r| r["listener"] == "web" && r["bytes_down"] == *down as u64)
            .unwrap_or_else(|| panic!("no record for GET {path} ({down} bytes down): {recs:#?}"));
        assert_eq!(rec["result"], "ok", "{rec}");
        assert_eq!(rec["sni"], "localhost", "{rec}");
        assert_eq!(rec["tls_version"], "TLSv1.3", "{rec}");
        assert!(
            rec["tls_cipher"]
                .as_str()
                .is_some_and(|c| c.starts_with("TLS13_")),
            "{rec}"
        );
        assert_eq!(rec["alpn"], "http/1.1", "{rec}");
        assert_eq!(
            rec["bytes_up"], *up as u64,
            "GET {path}: plaintext bytes up: {rec}"
        );
        assert!(rec.get("client_cert").is_none(), "{rec}");
    }
    let rec = recs
        .iter()
        .find(|r| r["listener"] == "echo")
        .expect("the s_client record");
    assert_eq!(rec["result"], "ok", "{rec}");
    assert_eq!(rec["sni"], "localhost", "{rec}");
    assert_eq!(rec["tls_version"], "TLSv1.3", "{rec}");
    let line = "hello through ferry\n".len() as u64;
    assert_eq!(rec["bytes_up"], line, "{rec}");
    assert_eq!(rec["bytes_down"], line, "{rec}");
    assert!(rec.get("alpn").is_none(), "s_client offered no ALPN: {rec}");
}

// ---------------------------------------------------------------------------------------
// 2. The certificate is chosen by SNI: exact name, then one-label wildcard, else default.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_per_sni() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("ferry test CA");
    let default = ca.server(&["default.test"]);
    let exact = ca.server(&["exact.test"]);
    let wild = ca.server(&["*.wild.test"]);
    default.write(d, "default");
    exact.write(d, "exact");
    wild.write(d, "wild");
    let echo = echo_server().await;
    let tls = format!(
        r#"[listener.tls]
cert = "{d}/default.pem"
key = "{d}/default.key"

[[listener.tls.certs]]
name = "exact.test"
cert = "{d}/exact.pem"
key = "{d}/exact.key"

[[listener.tls.certs]]
name = "*.wild.test"
cert = "{d}/wild.pem"
key = "{d}/wild.key"
"#,
        d = d.display()
    );
    let ferry = Ferry::start(&tls_config("", &tls, echo), 1).await;
    let addr = ferry.addr("web");

    // (SNI sent, the certificate expected)
    let cases: Vec<(Option<&str>, &Leaf, &str)> = vec![
        (Some("exact.test"), &exact, "exact"),
        (Some("a.wild.test"), &wild, "wildcard"),
        (Some("zz-9.wild.test"), &wild, "wildcard"),
        (
            Some("wild.test"),
            &default,
            "default: the wildcard does not cover its parent",
        ),
        (
            Some("a.b.wild.test"),
            &default,
            "default: the wildcard covers one label",
        ),
        (Some("unknown.test"), &default, "default: unknown name"),
        (Some("default.test"), &default, "default: its own name"),
        (None, &default, "default: no SNI"),
    ];
    let ca_pem = ca.pem();
    let owned: Vec<(Option<String>, Vec<u8>, String)> = cases
        .iter()
        .map(|(s, l, w)| (s.map(str::to_string), l.cert_der().to_vec(), w.to_string()))
        .collect();
    let clients = blocking("SNI handshakes", move || {
        let mut clients = Vec::new();
        for (sni, want, what) in &owned {
            let c = Client {
                sni: sni.clone(),
                ..Client::default()
            }
            .any_server();
            let (local, t) = tls_served(addr, &c, b"which cert?");
            assert!(
                served_cert(&t) == *want,
                "SNI {sni:?}: expected the {what} certificate"
            );
            tls_finish(t);
            clients.push(local);
        }
        // Where the name matches, a client that verifies the chain and the name is served
        // too (the exact and the wildcard certificates are valid for what they serve).
        for name in ["exact.test", "a.wild.test", "default.test"] {
            let c = Client {
                sni: Some(name.into()),
                roots: vec![ca_pem.clone()],
                ..Client::default()
            };
            let (_, t) = tls_served(addr, &c, b"verified");
            tls_finish(t);
        }
        clients
    })
    .await;

    // SNI is case-insensitive: openssl sending names in capitals gets the same
    // certificates (its subject printed), and the record has the name in lower case.
    let ca_path = ca.write(d, "ca").display().to_string();
    let subjects = blocking("openssl with SNI in capitals", move || {
        ["EXACT.TEST", "B.Wild.Test"].map(|sni| {
            let (st, out) = s_client_no_input(
                addr,
                &[
                    "-servername",
                    sni,
                    "-CAfile",
                    &ca_path,
                    "-verify_return_error",
                ],
            );
            assert!(st.success(), "SNI {sni}: {out}");
            out.lines()
                .find(|l| l.starts_with("subject="))
                .unwrap_or_else(|| panic!("no subject in {out}"))
                .to_string()
        })
    })
    .await;
    assert_eq!(
        subjects,
        ["subject=CN = exact.test", "subject=CN = *.wild.test"]
    );

    let recs = ferry.records(cases.len() + 3 + 2, WAIT).await;
    let mut lower: Vec<&str> = recs
        .iter()
        .filter(|r| r["sni"] == "exact.test" || r["sni"] == "b.wild.test")
        .map(|r| r["sni"].as_str().unwrap())
        .collect();
    lower.sort();
    assert_eq!(
        lower,
        ["b.wild.test", "exact.test", "exact.test", "exact.test"],
        "SNI recorded in lower case"
    );
    let recs: Vec<Value> = clients
        .iter()
        .map(|c| record_for(&recs, *c).clone())
        .collect();
    for ((sni, _, _), rec) in cases.iter().zip(&recs) {
        assert_eq!(rec["result"], "ok", "{rec}");
        match sni {
            Some(s) => assert_eq!(rec["sni"], *s, "{rec}"),
            None => assert!(rec["sni"].is_null(), "{rec}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Client certificates: required, then optional; none, another CA's, an expired one,
//    a valid one.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_required_and_optional() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("ferry test CA");
    let other = Ca::new("another CA");
    ca.server(&["localhost"]).write(d, "site");
    let clients_ca = Ca::new("client CA");
    let ca_file = clients_ca.write(d, "clients-ca");
    let alice = clients_ca.client("alice");
    let mallory = other.client("mallory");
    // Alice's old certificate, from the right CA, expired yesterday.
    let expired = clients_ca.leaf(&[], |p| {
        let now = time::OffsetDateTime::now_utc();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "alice");
        p.distinguished_name = dn;
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = now - time::Duration::days(30);
        p.not_after = now - time::Duration::days(1);
    });
    let echo = echo_server().await;
    let listener = |name: &str, auth: &str| {
        format!(
            r#"
[[listener]]
name = "{name}"
listen = "127.0.0.1:0"
mode = "tls"
upstream = "back"
[listener.tls]
cert = "{d}/site.pem"
key = "{d}/site.key"
client_ca = "{ca}"
{auth}
"#,
            d = d.display(),
            ca = ca_file.display()
        )
    };
    let cfg = format!(
        "[log]\naccess = \"@LOG@\"\n{}{}\n[[upstream]]\nname = \"back\"\nservers = [\"{echo}\"]\n",
        listener("required", ""),
        listener("optional", "client_auth = \"optional\"")
    );
    let ferry = Ferry::start(&cfg, 2).await;
    let (req, opt) = (ferry.addr("required"), ferry.addr("optional"));

    let base = Client::new(&ca, "localhost");
    let as_alice = Client {
        cert: Some(alice),
        ..base.clone()
    };
    let as_mallory = Client {
        cert: Some(mallory),
        ..base.clone()
    };
    let as_expired = Client {
        cert: Some(expired),
        ..base.clone()
    };
    let (b, a, m, x) = (
        base.clone(),
        as_alice.clone(),
        as_mallory.clone(),
        as_expired,
    );
    let (refused, served) = blocking("client-certificate handshakes", move || {
        let mut refused = Vec::new();
        let mut served = Vec::new();
        for (addr, c, what) in [
            (req, &b, "no certificate, required"),
            (req, &m, "another CA's certificate, required"),
            (opt, &m, "another CA's certificate, optional"),
            (req, &x, "an expired certificate, required"),
            (opt, &x, "an expired certificate, optional"),
        ] {
            let (local, r) = tls_attempt(addr, c, b"let me in");
            if let Ok(t) = r {
                drop(t);
                panic!("{what}: served");
            }
            refused.push((local, r.err().unwrap()));
        }
        for (addr, c) in [(req, &a), (opt, &b), (opt, &a)] {
            let (local, t) = tls_served(addr, c, b"hello");
            tls_finish(t);
            served.push(local);
        }
        (refused, served)
    })
    .await;

    // The client learns why: rustls reports the server's alert.
    assert!(
        refused[0].1.contains("CertificateRequired"),
        "no certificate: {}",
        refused[0].1
    );
    for (_, e) in &refused[1..3] {
        assert!(
            e.contains("UnknownCA") || e.contains("BadCertificate"),
            "{e}"
        );
    }
    for (_, e) in &refused[3..] {
        assert!(
            e.contains("CertificateExpired"),
            "an expired certificate: {e}"
        );
    }
    let locals: Vec<SocketAddr> = refused
        .iter()
        .map(|(l, _)| *l)
        .chain(served.iter().copied())
        .collect();
    let recs = records_of(&ferry, 8, &locals).await;
    for rec in &recs[..3] {
        assert_refused(rec, "certificate");
    }
    for rec in &recs[3..5] {
        assert_refused(rec, "expired");
    }
    assert_eq!(recs[0]["listener"], "required");
    let (req_alice, opt_none, opt_alice) = (&recs[5], &recs[6], &recs[7]);
    // Required, alice: served, her certificate's subject recorded.
    assert_eq!(req_alice["result"], "ok", "{req_alice}");
    assert_eq!(req_alice["client_cert"], "CN=alice", "{req_alice}");
    // Optional, no certificate: served, no client_cert.
    assert_eq!(opt_none["result"], "ok", "{opt_none}");
    assert!(opt_none.get("client_cert").is_none(), "{opt_none}");
    // Optional, alice: served with client_cert.
    assert_eq!(opt_alice["result"], "ok", "{opt_alice}");
    assert_eq!(opt_alice["client_cert"], "CN=alice", "{opt_alice}");
    for rec in &recs[5..] {
        assert_eq!(rec["bytes_up"], 5, "{rec}");
        assert_eq!(rec["bytes_down"], 5, "{rec}");
    }
}

// ---------------------------------------------------------------------------------------
// 4. ALPN: the protocol is agreed and recorded; a client offering none of the listener's
//    protocols is refused with no_application_protocol.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_agreed_or_refused() {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(files.path(), "site");
    let echo = echo_server().await;
    let tls = format!(
        "[listener.tls]\ncert = \"{d}/site.pem\"\nkey = \"{d}/site.key\"\nalpn = [\"h2\", \"http/1.1\"]\n",
        d = files.path().display()
    );
    let ferry = Ferry::start(&tls_config("", &tls, echo), 1).await;
    let admin = admin_addr(&ferry).await;
    let addr = ferry.addr("web");

    let base = Client::new(&ca, "localhost");
    let offers = |p: &[&str]| Client {
        alpn: p.iter().map(|s| s.to_string()).collect(),
        ..base.clone()
    };
    let (http11, none, unknown) = (
        offers(&["http/1.1"]),
        offers(&[]),
        offers(&["spdy/3", "x-unknown"]),
    );
    let (ok, refused) = blocking("ALPN handshakes", move || {
        let mut ok = Vec::new();
        for (c, want) in [(&http11, Some(&b"http/1.1"[..])), (&none, None)] {
            let (local, t) = tls_served(addr, c, b"alpn");
            assert_eq!(t.conn.alpn_protocol(), want, "client offering {:?}", c.alpn);
            tls_finish(t);
            ok.push(local);
        }
        let (local, r) = tls_attempt(addr, &unknown, b"alpn");
        let err = match r {
            Ok(t) => panic!(
                "a client offering only unknown protocols was served (ALPN {:?})",
                t.conn.alpn_protocol()
            ),
            Err(e) => e,
        };
        (ok, (local, err))
    })
    .await;
    assert!(
        refused.1.contains("NoApplicationProtocol"),
        "the client should get the no_application_protocol alert: {}",
        refused.1
    );
    let recs = records_of(&ferry, 3, &[ok[0], ok[1], refused.0]).await;
    assert_eq!(recs[0]["result"], "ok");
    assert_eq!(recs[0]["alpn"], "http/1.1", "{}", recs[0]);
    assert_eq!(recs[1]["result"], "ok");
    assert!(recs[1].get("alpn").is_none(), "{}", recs[1]);
    // rustls says "peer doesn't support any known protocol".
    assert_refused(&recs[2], "known protocol");
    assert_eq!(handshakes(admin, "web", "ok").await, 2.0);
    assert_eq!(handshakes(admin, "web", "failed").await, 1.0);
}

// ---------------------------------------------------------------------------------------
// 4b. Cipher suites: ferry's order (AES-128-GCM first) for most clients; ChaCha20-Poly1305
//     for a client that lists it first (a device without AES instructions).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_suite_choice() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("ferry test CA");
    let ca_path = ca.write(d, "ca").display().to_string();
    ca.server(&["localhost"]).write(d, "site");
    let echo = echo_server().await;
    let ferry = Ferry::start(&tls_config("", &inline_tls(d, "site"), echo), 1).await;
    let addr = ferry.addr("web");
    let cases: [(&[&str], &str); 5] = [
        // OpenSSL's own order puts AES-256-GCM first: ferry's order wins.
        (&["-tls1_3"], "TLS_AES_128_GCM_SHA256"),
        (
            &[
                "-tls1_3",
                "-ciphersuites",
                "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
            ],
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
        // Only what the client offers: its choice stands.
        (
            &["-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"],
            "TLS_AES_256_GCM_SHA384",
        ),
        (&["-tls1_2"], "ECDHE-ECDSA-AES128-GCM-SHA256"),
        (
            &[
                "-tls1_2",
                "-cipher",
                "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
            ],
            "ECDHE-ECDSA-CHACHA20-POLY1305",
        ),
    ];
    for (args, want) in cases {
        let ca_s = ca_path.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (out, _) = blocking("openssl s_client", move || {
            let mut all = vec![
                "-servername",
                "localhost",
                "-CAfile",
                &ca_s,
                "-verify_return_error",
            ];
            all.extend(args.iter().map(String::as_str));
            s_client_echo(addr, &all, "cipher")
        })
        .await;
        assert!(
            out.contains(&format!("Cipher is {want}")),
            "expected {want}:\n{out}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 5. min_version: "1.3" refuses a TLS 1.2 client; the default accepts it.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("ferry test CA");
    let ca_path = ca.write(d, "ca").display().to_string();
    ca.server(&["localhost"]).write(d, "site");
    let echo = echo_server().await;
    let cfg = tls_config(
        "",
        &format!(
            "[listener.tls]\ncert = \"{d}/site.pem\"\nkey = \"{d}/site.key\"\nmin_version = \"1.3\"\n",
            d = d.display()
        ),
        echo,
    ) + &format!(
        "\n[[listener]]\nname = \"default\"\nlisten = \"127.0.0.1:0\"\nmode = \"tls\"\nupstream = \"back\"\n{}\n",
        inline_tls(d, "site")
    );
    let ferry = Ferry::start(&cfg, 2).await;
    let (strict, default) = (ferry.addr("web"), ferry.addr("default"));

    let ca_s = ca_path.clone();
    let (refused, v13, v12) = blocking("openssl -tls1_2 / -tls1_3", move || {
        let common = [
            "-servername",
            "localhost",
            "-CAfile",
            &ca_s,
            "-verify_return_error",
        ];
        let refused = s_client_no_input(strict, &[&common[..], &["-tls1_2"]].concat());
        let v13 = s_client_echo(strict, &[&common[..], &["-tls1_3"]].concat(), "v1.3 ok");
        let v12 = s_client_echo(default, &[&common[..], &["-tls1_2"]].concat(), "v1.2 ok");
        (refused, v13, v12)
    })
    .await;
    assert!(
        !refused.0.success(),
        "a TLS 1.2 client got through min_version = 1.3:\n{}",
        refused.1
    );
    assert!(
        refused.1.contains("alert protocol version"),
        "{}",
        refused.1
    );
    assert!(v13.0.contains("New, TLSv1.3"), "{}", v13.0);
    assert!(v12.0.contains("New, TLSv1.2"), "{}", v12.0);

    let recs = ferry.records(3, WAIT).await;
    let on = |l: &str| -> Vec<&Value> { recs.iter().filter(|r| r["listener"] == l).collect() };
    let web = on("web");
    assert_eq!(web.len(), 2, "{recs:#?}");
    let bad = web
        .iter()
        .find(|r| r["result"] != "ok")
        .expect("the refused record");
    assert_refused(bad, "version");
    let good = web.iter().find(|r| r["result"] == "ok").unwrap();
    assert_eq!(good["tls_version"], "TLSv1.3", "{good}");
    let d12 = on("default");
    assert_eq!(d12.len(), 1, "{recs:#?}");
    assert_eq!(d12[0]["result"], "ok", "{}", d12[0]);
    assert_eq!(d12[0]["tls_version"], "TLSv1.2", "{}", d12[0]);
    assert!(
        d12[0]["tls_cipher"]
            .as_str()
            .is_some_and(|c| c.starts_with("TLS_ECDHE_ECDSA_WITH_")),
        "{}",
        d12[0]
    );
}

// ---------------------------------------------------------------------------------------
// 6. Session resumption: openssl (TLS 1.3 and 1.2, by ticket and by session ID) and
//    rustls resume; across a reload that changed nothing TLS-related they still do; a
//    change of `client_ca` ends them.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resumption() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path().to_path_buf();
    let ca = Ca::new("ferry test CA");
    let ca_path = ca.write(&d, "ca").display().to_string();
    ca.server(&["localhost"]).write(&d, "site");
    let clients_ca = Ca::new("client CA");
    let other_ca = Ca::new("other client CA");
    let ca_file = d.join("clients-ca.pem");
    std::fs::write(&ca_file, clients_ca.pem()).unwrap();
    let alice = clients_ca.client("alice");
    let echo = echo_server().await;
    let cfg = |idle: &str| {
        tls_config(idle, &inline_tls(&d, "site"), echo)
            + &format!(
                r#"
[[listener]]
name = "mtls"
listen = "127.0.0.1:0"
mode = "tls"
upstream = "back"
tls = {{ cert = "{d}/site.pem", key = "{d}/site.key", client_ca = "{ca}" }}
"#,
                d = d.display(),
                ca = ca_file.display()
            )
    };
    let ferry = Ferry::start(&cfg(""), 2).await;
    let admin = admin_addr(&ferry).await;
    let (web, mtls) = (ferry.addr("web"), ferry.addr("mtls"));

    // openssl, TLS 1.3, TLS 1.2 with a ticket, TLS 1.2 by session ID (no ticket: from
    // the server's session cache): a session saved, then resumed.
    let runs = [
        ("-tls1_3", "", "TLSv1.3"),
        ("-tls1_2", "", "TLSv1.2"),
        ("-tls1_2", "-no_ticket", "TLSv1.2"),
    ];
    for (i, (version, ticket, v)) in runs.into_iter().enumerate() {
        let sess = d.join(format!("session{i}.pem")).display().to_string();
        let ca_s = ca_path.clone();
        let (first, second) = blocking("openssl resumption", move || {
            let mut args = vec!["-servername", "localhost", "-CAfile", &ca_s, version];
            if !ticket.is_empty() {
                args.push(ticket);
            }
            let first = s_client_echo(web, &[&args[..], &["-sess_out", &sess]].concat(), "first");
            let second = s_client_echo(web, &[&args[..], &["-sess_in", &sess]].concat(), "again");
            (first.0, second.0)
        })
        .await;
        assert!(first.contains(&format!("New, {v}")), "{first}");
        assert!(
            second.contains(&format!("Reused, {v}")),
            "openssl {version} {ticket} did not resume:\n{second}"
        );
        assert_eq!(
            handshakes(admin, "web", "resumed").await,
            (i + 1) as f64,
            "after openssl {version} {ticket}"
        );
    }
    assert_eq!(handshakes(admin, "web", "ok").await, 3.0);

    // rustls, one config (its session store) for every connection.
    use rustls::HandshakeKind::{Full, Resumed};
    let plain = Client::new(&ca, "localhost").keep_sessions();
    let with_cert = Client {
        cert: Some(alice),
        ..Client::new(&ca, "localhost")
    }
    .keep_sessions();
    let kinds = |addr: SocketAddr, c: &Client, n: usize| {
        let c = c.clone();
        blocking("rustls handshakes", move || {
            (0..n)
                .map(|_| {
                    // The echo also brings the TLS 1.3 tickets, sent after the handshake.
                    let (_, t) = tls_served(addr, &c, b"resume?");
                    let k = t.conn.handshake_kind().unwrap();
                    tls_finish(t);
                    k
                })
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(kinds(web, &plain, 2).await, [Full, Resumed]);
    assert_eq!(kinds(mtls, &with_cert, 2).await, [Full, Resumed]);
    assert_eq!(handshakes(admin, "web", "resumed").await, 4.0);
    assert_eq!(handshakes(admin, "mtls", "resumed").await, 1.0);

    // A reload that changes nothing about TLS (an idle timeout): sessions still resume.
    rewrite_config(&ferry, &cfg("idle_timeout = \"61s\""));
    sighup_and_wait(&ferry, 1, "reload: listener \"web\" changed").await;
    assert_eq!(
        kinds(web, &plain, 1).await,
        [Resumed],
        "after a reload that changed no TLS setting"
    );
    assert_eq!(
        kinds(mtls, &with_cert, 1).await,
        [Resumed],
        "after a reload that did not touch this listener"
    );

    // A reload that changes `client_ca` (alice's CA still in it): sessions verified under
    // the old settings are not resumed; a full handshake verifies her certificate anew.
    std::fs::write(&ca_file, format!("{}{}", clients_ca.pem(), other_ca.pem())).unwrap();
    sighup_and_wait(&ferry, 1, "reload: listener \"mtls\" changed").await;
    assert_eq!(
        kinds(mtls, &with_cert, 2).await,
        [Full, Resumed],
        "after client_ca changed"
    );
    assert_eq!(
        kinds(web, &plain, 1).await,
        [Resumed],
        "the other listener keeps its sessions"
    );
    assert_eq!(handshakes(admin, "mtls", "ok").await, 2.0);
    assert_eq!(handshakes(admin, "mtls", "resumed").await, 3.0);
    assert_eq!(handshakes(admin, "web", "resumed").await, 6.0);
    assert_eq!(handshakes(admin, "web", "failed").await, 0.0);
    assert_eq!(handshakes(admin, "mtls", "failed").await, 0.0);
    let st = listener_status(admin, "mtls").await;
    assert_eq!(st["mode"], "tls", "{st}");
    assert_eq!(st["tls"]["handshakes"]["ok"], 2, "{st}");
    assert_eq!(st["tls"]["handshakes"]["resumed"], 3, "{st}");
    // The resumed sessions still carry the client certificate for the record.
    // 6 by openssl, then 4, 2 and 3 by rustls.
    let recs = ferry.records(6 + 4 + 2 + 3, WAIT).await;
    for r in recs.iter().filter(|r| r["listener"] == "mtls") {
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["client_cert"], "CN=alice", "{r}");
    }
}

// ---------------------------------------------------------------------------------------
// 7. Half-close through TLS, both ways, and a client whose close_notify comes with its
//    Finished.

/// Sends `n` pseudo-random bytes, shuts its write side, then reads to EOF and reports the
/// count and SHA-256 of what it read on `report`.
async fn source_then_sink(
    n: u64,
    seed: u64,
    report: tokio::sync::mpsc::UnboundedSender<(u64, [u8; 32])>,
) -> SocketAddr {
    serve_on("127.0.0.1", move |mut s| {
        let report = report.clone();
        async move {
            if write_prng(&mut s, n, seed).await.is_err() || s.shutdown().await.is_err() {
                return;
            }
            if let Ok(r) = read_hash(&mut s).await {
                let _ = report.send(r);
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_both_ways() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(d, "site");
    let sink = sink_server().await;
    const DOWN: u64 = 300_000;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let source = source_then_sink(DOWN, 7, tx).await;
    let cfg = tls_config("", &inline_tls(d, "site"), sink)
        + &format!(
            "\n[[listener]]\nname = \"source\"\nlisten = \"127.0.0.1:0\"\nmode = \"tls\"\nupstream = \"source\"\n{}\n\n[[upstream]]\nname = \"source\"\nservers = [\"{source}\"]\n",
            inline_tls(d, "site")
        );
    let ferry = Ferry::start(&cfg, 2).await;
    let client = Client::new(&ca, "localhost");

    // (a) The client sends 1 MiB, then close_notify and a FIN: the sink sees EOF and its
    // answer (count and hash) still reaches the client, followed by a clean close_notify.
    const UP: u64 = 1 << 20;
    let (addr, c) = (ferry.addr("web"), client.clone());
    let (a_local, reply) = blocking("half-close from the client", move || {
        let (local, r) = tls_try(addr, &c);
        let mut t = r.unwrap_or_else(|e| panic!("handshake: {e}"));
        t.write_all(&prng_bytes(UP, 3)).unwrap();
        t.conn.send_close_notify();
        t.flush().unwrap();
        t.sock.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        t.read_to_end(&mut reply).unwrap_or_else(|e| {
            panic!(
                "after our close_notify: {e} (got {} bytes of the reply)",
                reply.len()
            )
        });
        (local, reply)
    })
    .await;
    let (n, h) = sink_reply(&reply);
    assert_eq!(n, UP, "the sink's count");
    assert_eq!(h, prng_sha256(UP, 3), "the sink's hash");

    // (b) The server sends 300,000 bytes and shuts its write side: the client reads them
    // all, then a close_notify (a clean end, not a truncation); it can still send, and the
    // server gets what it sends.
    const AFTER: u64 = 123_457;
    let (addr, c) = (ferry.addr("source"), client.clone());
    let (b_local, (n, h)) = blocking("half-close from the server", move || {
        let (local, r) = tls_try(addr, &c);
        let mut t = r.unwrap_or_else(|e| panic!("handshake: {e}"));
        let mut got = Vec::new();
        t.read_to_end(&mut got).unwrap_or_else(|e| {
            panic!(
                "the server's half-close did not end in close_notify: {e} (after {} bytes)",
                got.len()
            )
        });
        t.write_all(&prng_bytes(AFTER, 9))
            .expect("write after the server's close_notify");
        t.flush().unwrap();
        t.conn.send_close_notify();
        t.flush().unwrap();
        (local, (got.len() as u64, sha256(&got)))
    })
    .await;
    assert_eq!(n, DOWN);
    assert_eq!(h, prng_sha256(DOWN, 7));
    let (n, h) = within(WAIT, "the server to get the client's data", rx.recv())
        .await
        .expect("the source server reports");
    assert_eq!(n, AFTER, "bytes the server got after its half-close");
    assert_eq!(h, prng_sha256(AFTER, 9));

    let recs = records_of(&ferry, 2, &[a_local, b_local]).await;
    assert_eq!(recs[0]["result"], "ok", "{}", recs[0]);
    assert_eq!(recs[0]["bytes_up"], UP, "{}", recs[0]);
    assert_eq!(recs[0]["bytes_down"], 40, "{}", recs[0]);
    assert_eq!(recs[1]["result"], "ok", "{}", recs[1]);
    assert_eq!(recs[1]["bytes_up"], AFTER, "{}", recs[1]);
    assert_eq!(recs[1]["bytes_down"], DOWN, "{}", recs[1]);

    // (c) The client's last handshake flight carries its Finished, its data and its
    // close_notify, written at once (a one-shot client): the handshake completes, the sink
    // gets the data then EOF, and its answer comes back.
    const ONE_SHOT: u64 = 1000;
    let (addr, c) = (ferry.addr("web"), client.clone());
    let (c_local, reply) = blocking("data and close_notify with the Finished", move || {
        let mut sock = std::net::TcpStream::connect_timeout(&addr, WAIT).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        sock.set_write_timeout(Some(WAIT)).unwrap();
        let local = sock.local_addr().unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(c.with(pki::client_config), name).unwrap();
        // The ClientHello, then the server's flight, until only our Finished is left to send.
        while conn.is_handshaking() {
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            if conn.is_handshaking() {
                conn.read_tls(&mut sock).unwrap();
                conn.process_new_packets()
                    .unwrap_or_else(|e| panic!("handshake: {e}"));
            }
        }
        conn.writer().write_all(&prng_bytes(ONE_SHOT, 21)).unwrap();
        conn.send_close_notify();
        let mut flight = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut flight).unwrap();
        }
        sock.write_all(&flight).unwrap();
        let mut t = rustls::StreamOwned::new(conn, sock);
        let mut reply = Vec::new();
        let r = t.read_to_end(&mut reply);
        (local, r.map(|_| reply).map_err(|e| e.to_string()))
    })
    .await;
    let all = ferry.records(3, WAIT).await;
    let rec = record_for(&all, c_local);
    let reply = reply
        .unwrap_or_else(|e| panic!("the one-shot client got no answer ({e}); its record: {rec}"));
    let (n, h) = sink_reply(&reply);
    assert_eq!(n, ONE_SHOT, "{rec}");
    assert_eq!(h, prng_sha256(ONE_SHOT, 21));
    assert_eq!(rec["result"], "ok", "{rec}");
    assert_eq!(rec["bytes_up"], ONE_SHOT, "{rec}");
    assert_eq!(rec["bytes_down"], 40, "{rec}");
}

// ---------------------------------------------------------------------------------------
// 8. A reload swaps the certificate: open sessions carry on, new ones get the new
//    certificate; a reload with a broken key is rejected and the certificate stays.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_certificate() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path().to_path_buf();
    let ca = Ca::new("ferry test CA");
    let a = ca.server(&["localhost"]);
    let b = ca.server(&["localhost", "b.localhost"]);
    a.write(&d, "site");
    let echo = echo_server().await;
    let ferry = Ferry::start(&tls_config("", &inline_tls(&d, "site"), echo), 1).await;
    let admin = admin_addr(&ferry).await;
    let addr = ferry.addr("web");

    // A session with certificate A, open across everything below; and a client keeping
    // sessions, to see one resumed after the swap.
    let client = Client::new(&ca, "localhost");
    let keeper = client.clone().keep_sessions();
    let (c, k) = (client.clone(), keeper.clone());
    let (a_der, b_der) = (a.cert_der().to_vec(), b.cert_der().to_vec());
    let a2 = a_der.clone();
    let open = blocking("the first session", move || {
        let (_, t) = tls_served(addr, &c, b"before the swap");
        assert!(served_cert(&t) == a2, "the first session has certificate A");
        let (_, s) = tls_served(addr, &k, b"keep a session");
        tls_finish(s);
        t
    })
    .await;

    b.write(&d, "site");
    sighup_and_wait(&ferry, 1, "reload: listener \"web\" changed").await;
    let st = listener_status(admin, "web").await;
    assert_eq!(
        st["tls"]["certificates"][0]["names"],
        serde_json::json!(["localhost", "b.localhost"]),
        "{st}"
    );

    let (c, k, b2) = (client.clone(), keeper.clone(), b_der.clone());
    let open = blocking("after the swap", move || {
        let mut open = open;
        let back = pki::tls_echo(&mut open, b"after the swap").expect("the open session");
        assert_eq!(back, b"after the swap");
        assert!(
            served_cert(&open) == a_der,
            "the open session keeps its certificate"
        );
        let (_, t) = tls_served(addr, &c, b"new");
        assert!(served_cert(&t) == b2, "a new session gets certificate B");
        tls_finish(t);
        // Resumption state survives a certificate change (client settings unchanged).
        let (_, s) = tls_served(addr, &k, b"resumed");
        assert_eq!(
            s.conn.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        tls_finish(s);
        open
    })
    .await;

    // A broken key: the reload is rejected, B keeps serving, the open session too.
    std::fs::write(
        d.join("site.key"),
        "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    ferry.signal("HUP");
    // The log says why: the key file, and what is wrong with it.
    let why = ferry
        .stderr
        .wait_count(1, WAIT, |l| {
            l.contains("reload rejected") && l.contains("site.key")
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "no rejection naming site.key; stderr:\n{}",
                ferry.stderr.text()
            )
        });
    assert!(
        why[0].contains("`key`") && why[0].contains("unusable key"),
        "{}",
        why[0]
    );
    let m = metrics(admin).await;
    assert_eq!(
        metric_must(&m, "ferry_config_reloads_total", &[("result", "failed")]),
        1.0
    );
    assert_eq!(
        metric_must(&m, "ferry_config_reloads_total", &[("result", "ok")]),
        1.0
    );
    let c = client.clone();
    blocking("after the rejected reload", move || {
        let mut open = open;
        let back = pki::tls_echo(&mut open, b"still here").expect("the open session");
        assert_eq!(back, b"still here");
        tls_finish(open);
        let (_, t) = tls_served(addr, &c, b"new");
        assert!(served_cert(&t) == b_der, "certificate B still serves");
        tls_finish(t);
    })
    .await;
    let recs = ferry.records(5, WAIT).await;
    assert!(recs.iter().all(|r| r["result"] == "ok"), "{recs:#?}");
}

// ---------------------------------------------------------------------------------------
// 9. Bad TLS configs: `ferry check` says where and why.

/// Runs `ferry check` on `text` written to `dir/ferry.toml`; checks exit 1 and exactly
/// the `expected` errors (`line:col: message`, `@DIR@` standing for `dir`). Returns what
/// differs, so that one run shows every case.
fn check_errors(what: &str, dir: &Path, text: &str, expected: &[&str]) -> Option<String> {
    let c = check_config_in(Some(dir), text);
    let errors: Vec<String> = c
        .errors
        .iter()
        .map(|l| l.replace(&dir.display().to_string(), "@DIR@"))
        .collect();
    let ok = c.code == Some(1) && errors == expected;
    (!ok).then(|| {
        format!(
            "{what}: exit {:?}\n  expected: {expected:#?}\n  got: {errors:#?}\n--- config ---\n{text}",
            c.code
        )
    })
}

/// One TLS listener with `tls` (lines 6 on), for `ferry check`.
fn check_config(mode: &str, tls: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:8443\"\nmode = \"{mode}\"\nupstream = \"pool\"\n{tls}\n\n[[upstream]]\nname = \"pool\"\nservers = [\"127.0.0.1:9000\"]\n"
    )
}

#[test]
fn check_reports_tls_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("ferry test CA");
    ca.write(d, "ca");
    ca.server(&["site.test"]).write(d, "site");
    ca.server(&["other.test"]).write(d, "other");
    ca.server(&["*.wild.test"]).write(d, "wild");
    std::fs::write(d.join("garbage.pem"), "this is not a certificate\n").unwrap();
    // The site key, encrypted by openssl.
    let (st, out, err) = run({
        let mut c = Command::new("openssl");
        c.args(["pkcs8", "-topk8", "-passout", "pass:secret", "-in"])
            .arg(d.join("site.key"))
            .arg("-out")
            .arg(d.join("encrypted.key"));
        c
    });
    assert!(st.success(), "openssl pkcs8: {out}{err}");

    // Good: relative paths are relative to the config file's folder (not the cwd).
    let good = check_config(
        "tls",
        "[listener.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\nclient_ca = \"ca.pem\"\nclient_auth = \"optional\"\nalpn = [\"h2\"]\nmin_version = \"1.3\"\n[[listener.tls.certs]]\nname = \"*.wild.test\"\ncert = \"wild.pem\"\nkey = \"wild.key\"",
    );
    let path = write_file(d, "ferry.toml", &good).display().to_string();
    let out = run_ferry(&["check", "--config", &path]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a good TLS config fails the check:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("listener \"web\" (tls) on 127.0.0.1:8443 -> upstream \"pool\""),
        "{stdout}"
    );

    let inline = |cert: &str, key: &str| format!("tls = {{ cert = \"{cert}\", key = \"{key}\" }}");
    // Line 6 is `tls`: in the inline form the value of `cert` is at column 16, that of
    // `key` at 34.
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "a missing key file: at the `key` value",
            check_config("tls", &inline("site.pem", "missing.key")),
            vec![
                "6:34: `key`: cannot read @DIR@/missing.key: No such file or directory (os error 2)",
            ],
        ),
        (
            "garbage in the certificate file: at the `cert` value",
            check_config("tls", &inline("garbage.pem", "site.key")),
            vec![
                "6:16: `cert`: @DIR@/garbage.pem: no certificate in it (expected a -----BEGIN CERTIFICATE----- block)",
            ],
        ),
        (
            "a key that belongs to another certificate: at the `key` value",
            check_config("tls", &inline("site.pem", "other.key")),
            vec![
                "6:34: `key`: the key in @DIR@/other.key does not belong to the certificate in @DIR@/site.pem",
            ],
        ),
        (
            "an encrypted key: at the `key` value",
            check_config("tls", &inline("site.pem", "encrypted.key")),
            vec![
                "6:34: `key`: @DIR@/encrypted.key: the key is encrypted; ferry needs it unencrypted (protect the file instead)",
            ],
        ),
        (
            "a certs entry whose certificate does not cover its name: at the `name` value",
            check_config(
                "tls",
                "[listener.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\n[[listener.tls.certs]]\nname = \"a.other.test\"\ncert = \"other.pem\"\nkey = \"other.key\"",
            ),
            vec![
                "10:8: the certificate in @DIR@/other.pem is not valid for a.other.test (it is for: other.test)",
            ],
        ),
        (
            "mode = \"tls\" without `tls`: at the mode",
            check_config("tls", ""),
            vec![
                "4:8: mode \"tls\" needs `tls` with at least a certificate: tls = { cert = \"…\", key = \"…\" }",
            ],
        ),
        (
            "`tls` on a mode = \"tcp\" listener: at its value",
            check_config("tcp", &inline("site.pem", "site.key")),
            vec![
                "6:7: `tls` applies to mode = \"tls\" (TLS terminated here); with mode \"tcp\" TLS passes through, and routes can still match its SNI",
            ],
        ),
        (
            "client_auth without client_ca: at the `client_auth` value",
            check_config(
                "tls",
                "[listener.tls]\ncert = \"site.pem\"\nkey = \"site.key\"\nclient_auth = \"optional\"",
            ),
            vec!["9:15: `client_auth` needs `client_ca`: the CA that signs client certificates"],
        ),
        (
            "`min_version` other than 1.2 or 1.3",
            check_config(
                "tls",
                "tls = { cert = \"site.pem\", key = \"site.key\", min_version = \"1.1\" }",
            ),
            vec!["6:60: `min_version` must be \"1.2\" or \"1.3\", not \"1.1\""],
        ),
        (
            "`client_auth` other than required or optional",
            check_config(
                "tls",
                "tls = { cert = \"site.pem\", key = \"site.key\", client_ca = \"ca.pem\", client_auth = \"maybe\" }",
            ),
            vec!["6:82: `client_auth` must be \"required\" or \"optional\", not \"maybe\""],
        ),
        (
            "a `client_ca` file with no certificate",
            check_config(
                "tls",
                "tls = { cert = \"site.pem\", key = \"site.key\", client_ca = \"garbage.pem\" }",
            ),
            vec![
                "6:58: `client_ca`: @DIR@/garbage.pem: no certificate in it (expected a -----BEGIN CERTIFICATE----- block)",
            ],
        ),
        (
            "`cert` without `key`: one error, at the table",
            check_config("tls", "tls = { cert = \"site.pem\" }"),
            vec!["6:7: `tls` has `cert` but no `key`"],
        ),
        (
            "a certs name that is neither a host name nor a one-label wildcard",
            check_config(
                "tls",
                "tls = { cert = \"site.pem\", key = \"site.key\", certs = [{ name = \"a.*.wild.test\", cert = \"wild.pem\", key = \"wild.key\" }] }",
            ),
            vec![
                "6:64: `name`: \"a.*.wild.test\" is not a host name or a wildcard such as \"*.example.com\"",
            ],
        ),
        (
            "the same name twice, in different case",
            check_config(
                "tls",
                "tls = { cert = \"site.pem\", key = \"site.key\", certs = [{ name = \"*.wild.test\", cert = \"wild.pem\", key = \"wild.key\" }, { name = \"*.WILD.test\", cert = \"wild.pem\", key = \"wild.key\" }] }",
            ),
            vec!["6:127: a certificate for *.wild.test is listed twice"],
        ),
        (
            "a certs entry without `cert` and `key`",
            check_config("tls", "tls = { certs = [{ name = \"site.test\" }] }"),
            vec!["6:18: [[listener.tls.certs]] needs `cert` and `key`"],
        ),
        (
            "an unknown key in `tls`",
            check_config(
                "tls",
                "tls = { cert = \"site.pem\", key = \"site.key\", colour = 1 }",
            ),
            vec![
                "6:46: unknown key `colour` in `tls`; expected one of: cert, key, certs, client_ca, client_auth, alpn, min_version",
            ],
        ),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter_map(|(what, text, expected)| check_errors(what, d, text, expected))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} case(s) wrong:\n\n{}",
        wrong.len(),
        wrong.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------
// 10. The handshake deadline: silent, half-hello and non-TLS clients are closed with
//     protocol_error, and the listener serves others meanwhile; an idle session ends with
//     close_notify; every refused handshake is counted as failed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_deadline() {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(files.path(), "site");
    let echo = echo_server().await;
    let ferry = Ferry::start(
        &tls_config(
            "handshake_timeout = \"1s\"\nidle_timeout = \"1s\"",
            &inline_tls(files.path(), "site"),
            echo,
        ),
        1,
    )
    .await;
    let admin = admin_addr(&ferry).await;
    let addr = ferry.addr("web");
    const HELLO: &[u8] =
        include_bytes!("../../src/wire/testdata/client_hello/openssl-tls13-sni-alpn.bin");

    // (a) Silent clients and (b) clients that send the first 50 bytes of a ClientHello.
    let mut stalled = Vec::new();
    for i in 0..10 {
        let (local, r) = connect_from(addr).await;
        let mut s = r.unwrap_or_else(|e| panic!("connect: {e}"));
        if i % 2 == 1 {
            s.write_all(&HELLO[..50]).await.unwrap();
        }
        stalled.push((local, s));
    }
    // Meanwhile a good client is served, and the stalled ones are still open.
    let c = Client::new(&ca, "localhost");
    let good = blocking("a good client", move || {
        let (local, t) = tls_served(addr, &c, b"not stalled");
        tls_finish(t);
        local
    })
    .await;
    for (local, s) in &stalled {
        let mut b = [0u8; 1];
        match s.try_read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("stalled client {local} was closed before its deadline: {other:?}"),
        }
    }
    // An established session left idle (idle_timeout, not the handshake deadline): it
    // ends with ferry's close_notify, a clean end for the client.
    let c = Client::new(&ca, "localhost");
    let idle = tokio::task::spawn_blocking(move || {
        let (local, mut t) = tls_served(addr, &c, b"idle");
        let mut rest = Vec::new();
        t.read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("an idle session did not end with close_notify: {e}"));
        assert!(rest.is_empty());
        local
    });
    // Then each stalled client is closed without a byte sent to it.
    for (local, s) in &mut stalled {
        let (data, _how) = read_until_closed(s, WAIT).await;
        assert!(data.is_empty(), "{local} got {data:?}");
    }
    let idle = within(WAIT, "the idle session to end", idle).await.unwrap();
    // (c) A client that speaks HTTP, not TLS, is closed at once.
    let (plain_local, r) = connect_from(addr).await;
    let mut s = r.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (data, _how) = read_until_closed(&mut s, WAIT).await;
    assert!(data.is_empty(), "a non-TLS client got {data:?}");
    // (d) A client that closes in the middle of its ClientHello.
    let (half_local, r) = connect_from(addr).await;
    let mut s = r.unwrap();
    s.write_all(&HELLO[..50]).await.unwrap();
    s.shutdown().await.unwrap();
    let (data, _how) = read_until_closed(&mut s, WAIT).await;
    assert!(data.is_empty(), "{data:?}");

    let all = ferry.records(14, WAIT).await;
    for (local, _) in &stalled {
        assert_refused(record_for(&all, *local), "handshake not complete within 1s");
    }
    assert_eq!(record_for(&all, good)["result"], "ok");
    let rec = record_for(&all, idle);
    assert_eq!(rec["result"], "idle_timeout", "{rec}");
    assert_eq!(rec["bytes_up"], 4, "{rec}");
    assert_eq!(rec["bytes_down"], 4, "{rec}");
    assert_refused(record_for(&all, plain_local), "not TLS");
    assert_refused(
        record_for(&all, half_local),
        "closed in the middle of the ClientHello",
    );
    // Every refused connection is a failed handshake in the metric and the status, not
    // only those that timed out.
    let refused = all
        .iter()
        .filter(|r| r["result"] == "protocol_error")
        .count();
    assert_eq!(refused, 12);
    assert_eq!(handshakes(admin, "web", "ok").await, 2.0);
    let st = listener_status(admin, "web").await;
    assert_eq!(st["connections_active"], 0, "{st}");
    assert_eq!(
        handshakes(admin, "web", "failed").await,
        refused as f64,
        "ferry_tls_handshakes_total{{result=\"failed\"}} against {refused} protocol_error records (10 timed out, 1 not TLS, 1 closed mid-ClientHello)"
    );
}

// ---------------------------------------------------------------------------------------
// 11. Many short TLS connections: all served, counted once each, none left open.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_short_handshakes() {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(files.path(), "site");
    let echo = echo_server().await;
    let ferry = Ferry::start(&tls_config("", &inline_tls(files.path(), "site"), echo), 1).await;
    let admin = admin_addr(&ferry).await;
    let addr = ferry.addr("web");
    const N: usize = 200;
    // Half the clients share one config (so they resume), half start afresh.
    let shared = Client::new(&ca, "localhost").keep_sessions();
    let fresh = Client::new(&ca, "localhost");
    let (full, resumed) = blocking("200 connections", move || {
        let (mut full, mut resumed) = (0, 0);
        for i in 0..N {
            let c = if i % 2 == 0 { &shared } else { &fresh };
            let line = format!("connection {i}\n");
            let (_, t) = tls_served(addr, c, line.as_bytes());
            match t.conn.handshake_kind() {
                Some(rustls::HandshakeKind::Resumed) => resumed += 1,
                _ => full += 1,
            }
            tls_finish(t);
        }
        (full, resumed)
    })
    .await;
    assert!(
        resumed >= N / 2 - 1,
        "the shared config resumed only {resumed} times"
    );
    let recs = ferry.records(N, WAIT).await;
    assert_eq!(recs.len(), N);
    assert!(recs.iter().all(|r| r["result"] == "ok"), "{recs:#?}");
    // Once every record is written, nothing is open; the counts match the clients' view.
    let st = listener_status(admin, "web").await;
    assert_eq!(st["connections_active"], 0, "{st}");
    assert_eq!(st["tls"]["handshakes"]["ok"], full, "{st}");
    assert_eq!(st["tls"]["handshakes"]["resumed"], resumed, "{st}");
    assert_eq!(handshakes(admin, "web", "ok").await, full as f64);
    assert_eq!(handshakes(admin, "web", "resumed").await, resumed as f64);
    assert_eq!(handshakes(admin, "web", "failed").await, 0.0);
    let m = metrics(admin).await;
    let count = metric_must(
        &m,
        "ferry_tls_handshake_duration_seconds_count",
        &[("listener", "web")],
    );
    assert_eq!(
        count, N as f64,
        "one handshake-duration sample per handshake"
    );
}

// ---------------------------------------------------------------------------------------
// 12. Certificate expiry: warned about at start, exported as a metric and in the status.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_expiry() {
    use time::{Duration as TDuration, OffsetDateTime};
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("ferry test CA");
    let now = OffsetDateTime::now_utc().unix_timestamp();
    // Five and a half days left (whole seconds: X.509 times have no fraction), and one
    // that expired yesterday.
    let soon_at = now + 5 * 86400 + 12 * 3600;
    let soon = ca.leaf(&["soon.test"], |p| {
        p.not_after = OffsetDateTime::from_unix_timestamp(soon_at).unwrap();
    });
    let expired_at = now - 86400;
    let expired = ca.leaf(&["expired.test"], |p| {
        p.not_before = OffsetDateTime::from_unix_timestamp(now).unwrap() - TDuration::days(30);
        p.not_after = OffsetDateTime::from_unix_timestamp(expired_at).unwrap();
    });
    soon.write(d, "soon");
    expired.write(d, "expired");
    let echo = echo_server().await;
    let tls = format!(
        "[listener.tls]\ncert = \"{d}/soon.pem\"\nkey = \"{d}/soon.key\"\n[[listener.tls.certs]]\nname = \"expired.test\"\ncert = \"{d}/expired.pem\"\nkey = \"{d}/expired.key\"\n",
        d = d.display()
    );
    let ferry = Ferry::start(&tls_config("", &tls, echo), 1).await;
    let admin = admin_addr(&ferry).await;

    let warned = |what: &'static str| ferry.stderr.wait_count(1, WAIT, move |l| l.contains(what));
    let soon_line = warned("certificate expires in")
        .await
        .unwrap_or_else(|| panic!("no expiry warning; stderr:\n{}", ferry.stderr.text()));
    assert!(
        soon_line[0].contains("expires in 5 day(s)"),
        "{}",
        soon_line[0]
    );
    assert!(soon_line[0].contains("CN=soon.test"), "{}", soon_line[0]);
    let expired_line = warned("certificate has expired").await.unwrap_or_else(|| {
        panic!(
            "no warning about the expired certificate; stderr:\n{}",
            ferry.stderr.text()
        )
    });
    assert!(
        expired_line[0].contains("CN=expired.test"),
        "{}",
        expired_line[0]
    );

    let m = metrics(admin).await;
    let expiry = |name| {
        metric_must(
            &m,
            "ferry_tls_certificate_expiry_seconds",
            &[("listener", "web"), ("name", name)],
        )
    };
    assert_eq!(expiry("default"), soon_at as f64);
    assert_eq!(expiry("expired.test"), expired_at as f64);

    let st = listener_status(admin, "web").await;
    let certs = st["tls"]["certificates"]
        .as_array()
        .expect("certificates[]");
    assert_eq!(certs.len(), 2, "{st}");
    assert_eq!(certs[0]["name"], "default");
    assert_eq!(certs[0]["subject"], "CN=soon.test");
    assert_eq!(certs[0]["names"], serde_json::json!(["soon.test"]));
    assert_eq!(certs[0]["expires_in_days"], 5, "{st}");
    assert_eq!(
        certs[0]["not_after"],
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_secs(soon_at as u64)
        )
        .to_string(),
        "{st}"
    );
    assert_eq!(certs[1]["name"], "expired.test");
    assert!(
        certs[1]["expires_in_days"].as_i64().is_some_and(|n| n < 0),
        "{st}"
    );

    // A reload that brings a certificate with two and a half days left: warned about,
    // and the metric follows.
    let sooner_at = now + 2 * 86400 + 12 * 3600;
    ca.leaf(&["soon.test"], |p| {
        p.not_after = OffsetDateTime::from_unix_timestamp(sooner_at).unwrap();
    })
    .write(d, "soon");
    ferry.signal("HUP");
    let line = ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("certificate expires in 2 day(s)"))
        .await
        .unwrap_or_else(|| panic!("no warning at reload; stderr:\n{}", ferry.stderr.text()));
    assert!(line[0].contains("CN=soon.test"), "{}", line[0]);
    let m = metrics(admin).await;
    assert_eq!(
        metric_must(
            &m,
            "ferry_tls_certificate_expiry_seconds",
            &[("listener", "web"), ("name", "default")]
        ),
        sooner_at as f64
    );

    // A reload that changes nothing: the certificates that expire soon (or have expired)
    // are warned about again, as at every reload.
    let count = |what: &str| {
        ferry
            .stderr
            .all()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    };
    let (soon_before, expired_before) = (
        count("certificate expires in"),
        count("certificate has expired"),
    );
    sighup_and_wait(&ferry, 1, "reload: nothing changed").await;
    assert_eq!(
        (
            count("certificate expires in"),
            count("certificate has expired")
        ),
        (soon_before + 1, expired_before + 1),
        "a reload that changed nothing did not warn again about the certificates expiring soon; stderr:\n{}",
        ferry.stderr.text()
    );
}

// ---------------------------------------------------------------------------------------
// 13. A big transfer both ways at once through TLS: 20 MiB up while 20 MiB come back.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_transfer_both_ways() {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(files.path(), "site");
    let echo = echo_server().await;
    let ferry = Ferry::start(&tls_config("", &inline_tls(files.path(), "site"), echo), 1).await;
    let addr = ferry.addr("web");
    const N: u64 = 20 << 20;
    let c = Client::new(&ca, "localhost");
    let (local, (n, h)) = blocking("20 MiB each way", move || {
        let (local, r) = tls_try(addr, &c);
        let t = r.unwrap_or_else(|e| panic!("handshake: {e}"));
        (local, tls_duplex(t, N, 11, None))
    })
    .await;
    assert_eq!(n, N, "bytes echoed back");
    assert_eq!(h, prng_sha256(N, 11), "the echo differs");
    let recs = records_of(&ferry, 1, &[local]).await;
    assert_eq!(recs[0]["result"], "ok", "{}", recs[0]);
    assert_eq!(recs[0]["bytes_up"], N, "{}", recs[0]);
    assert_eq!(recs[0]["bytes_down"], N, "{}", recs[0]);
}

// ---------------------------------------------------------------------------------------
// 14. A ClientHello in pieces: split over many TLS records (the client's maximum fragment
//     size) and dribbled a few bytes per TCP segment. The certificate is still chosen by
//     its SNI, and a session made of tiny records relays intact.

/// A socket that sends at most 5 bytes per write (with Nagle off: one segment each).
struct Dribble<'a>(&'a std::net::TcpStream);

impl Read for Dribble<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&mut &*self.0).read(buf)
    }
}

impl Write for Dribble<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&mut &*self.0).write(&buf[..buf.len().min(5)])
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_in_pieces_and_tiny_records() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("ferry test CA");
    ca.server(&["default.test"]).write(d, "default");
    let exact = ca.server(&["exact.test"]);
    exact.write(d, "exact");
    let echo = echo_server().await;
    let tls = format!(
        "[listener.tls]\ncert = \"{d}/default.pem\"\nkey = \"{d}/default.key\"\nalpn = [\"h2\", \"http/1.1\"]\n[[listener.tls.certs]]\nname = \"exact.test\"\ncert = \"{d}/exact.pem\"\nkey = \"{d}/exact.key\"\n",
        d = d.display()
    );
    let ferry = Ferry::start(&tls_config("", &tls, echo), 1).await;
    let addr = ferry.addr("web");
    let c = Client {
        alpn: vec!["http/1.1".into()],
        ..Client::new(&ca, "exact.test")
    };
    const N: u64 = 1 << 20;
    let exact_der = exact.cert_der().to_vec();
    let (local, (n, h)) = blocking("a ClientHello in pieces", move || {
        let mut cfg = (*c.with(pki::client_config)).clone();
        // 64-byte records: the ClientHello takes several, as does everything after it.
        cfg.max_fragment_size = Some(64);
        let sock = std::net::TcpStream::connect_timeout(&addr, WAIT).unwrap();
        sock.set_nodelay(true).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        sock.set_write_timeout(Some(WAIT)).unwrap();
        let local = sock.local_addr().unwrap();
        let name = rustls::pki_types::ServerName::try_from("exact.test").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut Dribble(&sock))
                .unwrap_or_else(|e| panic!("handshake in pieces: {e}"));
        }
        let t = rustls::StreamOwned::new(conn, sock);
        assert!(
            served_cert(&t) == exact_der,
            "the SNI in a fragmented ClientHello chose the certificate"
        );
        assert_eq!(t.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        (local, tls_duplex(t, N, 5, None))
    })
    .await;
    assert_eq!(n, N, "bytes echoed back");
    assert_eq!(h, prng_sha256(N, 5), "the echo differs");
    let recs = records_of(&ferry, 1, &[local]).await;
    assert_eq!(recs[0]["result"], "ok", "{}", recs[0]);
    assert_eq!(recs[0]["sni"], "exact.test", "{}", recs[0]);
    assert_eq!(recs[0]["alpn"], "http/1.1", "{}", recs[0]);
    assert_eq!(recs[0]["bytes_up"], N, "{}", recs[0]);
    assert_eq!(recs[0]["bytes_down"], N, "{}", recs[0]);
}

// ---------------------------------------------------------------------------------------
// 15. TLS 1.3 KeyUpdate from the client (asking the server to update its keys too): once
//     between echoes, and every MiB of a transfer both ways.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_update_mid_session() {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(files.path(), "site");
    let echo = echo_server().await;
    let ferry = Ferry::start(&tls_config("", &inline_tls(files.path(), "site"), echo), 1).await;
    let addr = ferry.addr("web");
    const N: u64 = 8 << 20;
    let c = Client::new(&ca, "localhost");
    let (a, (b, (n, h))) = blocking("KeyUpdate", move || {
        let (a, mut t) = tls_served(addr, &c, b"before the update");
        t.conn.refresh_traffic_keys().expect("KeyUpdate");
        for i in 0..3 {
            let msg = format!("after the update {i}");
            let back = pki::tls_echo(&mut t, msg.as_bytes())
                .unwrap_or_else(|e| panic!("echo after a KeyUpdate: {e}"));
            assert_eq!(back, msg.as_bytes());
        }
        tls_finish(t);
        let (b, r) = tls_try(addr, &c);
        let t = r.unwrap_or_else(|e| panic!("handshake: {e}"));
        (a, (b, tls_duplex(t, N, 13, Some(1 << 20))))
    })
    .await;
    assert_eq!(n, N, "bytes echoed back");
    assert_eq!(h, prng_sha256(N, 13), "the echo differs");
    let recs = records_of(&ferry, 2, &[a, b]).await;
    for rec in &recs {
        assert_eq!(rec["result"], "ok", "{rec}");
    }
    assert_eq!(recs[1]["bytes_up"], N, "{}", recs[1]);
    assert_eq!(recs[1]["bytes_down"], N, "{}", recs[1]);
}

// ---------------------------------------------------------------------------------------
// 16. A PROXY header before the TLS handshake: the header and the ClientHello arrive in
//     one segment; the header's source is the client, the handshake is intact.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_header_then_tls() {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(files.path(), "site");
    let echo = echo_server().await;
    let ferry = Ferry::start(
        &tls_config(
            "proxy_protocol = { accept = \"any\", trusted = [\"127.0.0.1/32\"] }",
            &inline_tls(files.path(), "site"),
            echo,
        ),
        1,
    )
    .await;
    let addr = ferry.addr("web");
    let c = Client::new(&ca, "localhost");
    blocking("PROXY header + TLS", move || {
        let mut sock = std::net::TcpStream::connect_timeout(&addr, WAIT).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        sock.set_write_timeout(Some(WAIT)).unwrap();
        let cfg = c.with(pki::client_config);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
        let mut first = format!(
            "PROXY TCP4 192.0.2.7 {} 40000 {}\r\n",
            addr.ip(),
            addr.port()
        )
        .into_bytes();
        conn.write_tls(&mut first).unwrap();
        sock.write_all(&first).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)
                .unwrap_or_else(|e| panic!("handshake after a PROXY header: {e}"));
        }
        let mut t = rustls::StreamOwned::new(conn, sock);
        let back = pki::tls_echo(&mut t, b"proxied").unwrap();
        assert_eq!(back, b"proxied");
        tls_finish(t);
    })
    .await;
    let recs = ferry.records(1, WAIT).await;
    let rec = &recs[0];
    assert_eq!(rec["result"], "ok", "{rec}");
    assert_eq!(rec["client"], "192.0.2.7:40000", "{rec}");
    assert_eq!(rec["sni"], "localhost", "{rec}");
    assert_eq!(rec["tls_version"], "TLSv1.3", "{rec}");
    assert_eq!(rec["bytes_up"], 7, "{rec}");
}

// ---------------------------------------------------------------------------------------
// 17. Routes on a TLS listener: on the SNI and on the protocol agreed by ALPN; the first
//     matching route wins, else the listener's upstream; matches are counted.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_on_sni_and_agreed_alpn() {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry test CA");
    ca.server(&["www.test", "*.api.test"])
        .write(files.path(), "site");
    let (web, h2, api) = (
        tagged_echo("web").await,
        tagged_echo("h2").await,
        tagged_echo("api").await,
    );
    let cfg = format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[log]
access = "@LOG@"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
mode = "tls"
upstream = "web"
[listener.tls]
cert = "{d}/site.pem"
key = "{d}/site.key"
alpn = ["h2", "http/1.1"]
[[listener.route]]
alpn = "h2"
upstream = "h2"
[[listener.route]]
sni = "*.api.test"
upstream = "api"

[[upstream]]
name = "web"
servers = ["{web}"]
[[upstream]]
name = "h2"
servers = ["{h2}"]
[[upstream]]
name = "api"
servers = ["{api}"]
"#,
        d = files.path().display()
    );
    let ferry = Ferry::start(&cfg, 1).await;
    let admin = admin_addr(&ferry).await;
    let addr = ferry.addr("front");
    // (SNI, ALPN offered, the upstream expected)
    let cases = [
        ("x.api.test", vec!["http/1.1"], "api"),
        ("x.api.test", vec!["h2", "http/1.1"], "h2"),
        ("www.test", vec!["h2"], "h2"),
        ("www.test", vec![], "web"),
        ("a.b.api.test", vec!["http/1.1"], "web"),
    ];
    let ca_pem = ca.pem();
    let tags = blocking("routed sessions", move || {
        cases
            .iter()
            .map(|(sni, alpn, want)| {
                let c = Client {
                    sni: Some(sni.to_string()),
                    roots: vec![ca_pem.clone()],
                    alpn: alpn.iter().map(|s| s.to_string()).collect(),
                    ..Client::default()
                };
                // a.b.api.test is in no certificate: the client accepts any for it.
                let c = if sni.starts_with("a.b.") {
                    c.any_server()
                } else {
                    c
                };
                let (local, r) = tls_try(addr, &c);
                let mut t = r.unwrap_or_else(|e| panic!("{sni}: {e}"));
                let mut tag = Vec::new();
                let mut b = [0u8; 1];
                while tag.last() != Some(&b'\n') {
                    t.read_exact(&mut b).expect("the backend's tag");
                    tag.push(b[0]);
                }
                tls_finish(t);
                let tag = String::from_utf8(tag).unwrap();
                assert_eq!(tag.trim_end(), *want, "SNI {sni}, ALPN {alpn:?}");
                local
            })
            .collect::<Vec<_>>()
    })
    .await;
    let recs = records_of(&ferry, 5, &tags).await;
    for (rec, want) in recs.iter().zip(["api", "h2", "h2", "web", "web"]) {
        assert_eq!(rec["result"], "ok", "{rec}");
        assert_eq!(rec["upstream"], want, "{rec}");
    }
    let m = metrics(admin).await;
    let matches = |route, upstream| {
        metric(
            &m,
            "ferry_route_matches_total",
            &[
                ("listener", "front"),
                ("route", route),
                ("upstream", upstream),
            ],
        )
    };
    assert_eq!(matches("1", "h2"), Some(2.0), "{m}");
    assert_eq!(matches("2", "api"), Some(1.0), "{m}");
    assert_eq!(matches("default", "web"), Some(2.0), "{m}");
}

// ---------------------------------------------------------------------------------------
// 18. A resumed session's client certificate is verified again: a session made while
//     the certificate was valid is not accepted once it has expired.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_session_client_certificate_checked_again() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(d, "site");
    let clients_ca = Ca::new("client CA");
    let ca_file = clients_ca.write(d, "clients-ca");
    let echo = echo_server().await;
    let tls = format!(
        "tls = {{ cert = \"{d}/site.pem\", key = \"{d}/site.key\", client_ca = \"{}\" }}",
        ca_file.display(),
        d = d.display()
    );
    let ferry = Ferry::start(&tls_config("", &tls, echo), 1).await;
    let admin = admin_addr(&ferry).await;
    let addr = ferry.addr("web");
    // Made once ferry is up (only the client holds it), valid for a few seconds more: the
    // first handshake must come within them, however loaded the machine.
    let expires = time::OffsetDateTime::now_utc().unix_timestamp() + 4;
    let short = clients_ca.leaf(&[], |p| {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "brief");
        p.distinguished_name = dn;
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = time::OffsetDateTime::from_unix_timestamp(expires - 3600).unwrap();
        p.not_after = time::OffsetDateTime::from_unix_timestamp(expires).unwrap();
    });
    let c = Client {
        cert: Some(short),
        ..Client::new(&ca, "localhost")
    }
    .keep_sessions();
    let (first, later) = blocking(
        "before and after the client certificate expires",
        move || {
            let (first, t) = tls_served(addr, &c, b"while valid");
            assert_eq!(t.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
            tls_finish(t);
            // Wait (bounded) until the certificate has expired: the wall clock is what this
            // test is about.
            let deadline = Instant::now() + WAIT;
            while time::OffsetDateTime::now_utc().unix_timestamp() <= expires {
                assert!(Instant::now() < deadline);
                std::thread::sleep(Duration::from_millis(50));
            }
            let (later, r) = tls_attempt(addr, &c, b"expired");
            assert!(
                r.is_err(),
                "a session resumed with an expired client certificate was served"
            );
            (first, later)
        },
    )
    .await;
    let all = ferry.records(2, WAIT).await;
    assert_eq!(record_for(&all, first)["result"], "ok");
    assert_eq!(record_for(&all, first)["client_cert"], "CN=brief");
    // Refused after the resumption (rustls does not look at the certificate in a ticket;
    // ferry checks it again), for the expiry.
    let rec = record_for(&all, later);
    assert_refused(rec, "resumed session's client certificate");
    assert_refused(rec, "expired");
    assert_eq!(handshakes(admin, "web", "ok").await, 1.0);
    assert_eq!(handshakes(admin, "web", "resumed").await, 0.0);
    assert_eq!(handshakes(admin, "web", "failed").await, 1.0);
}

// ---------------------------------------------------------------------------------------
// 19. Ends that are not the client's: an upstream that refuses the connection, and a
//     drain (SIGTERM) that times out, both close the session with a close_notify, and the
//     records keep the TLS fields.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_and_drain_send_close_notify() {
    let files = tempfile::tempdir().unwrap();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(files.path(), "site");
    let echo = echo_server().await;
    let cfg = tls_config("", &inline_tls(files.path(), "site"), refused_addr())
        + &format!(
            "\n[[listener]]\nname = \"up\"\nlisten = \"127.0.0.1:0\"\nmode = \"tls\"\nupstream = \"echo\"\n{}\n\n[[upstream]]\nname = \"echo\"\nservers = [\"{echo}\"]\n\n[global]\ndrain_timeout = \"1s\"\n",
            inline_tls(files.path(), "site")
        );
    let mut ferry = Ferry::start(&cfg, 2).await;
    let (down, up) = (ferry.addr("web"), ferry.addr("up"));
    let c = Client::new(&ca, "localhost");
    let (down_local, open) = blocking(
        "a session to a dead upstream, and one to drain",
        move || {
            let (local, r) = tls_try(down, &c);
            let mut t = r.unwrap_or_else(|e| panic!("handshake: {e}"));
            let mut rest = Vec::new();
            t.read_to_end(&mut rest)
                .unwrap_or_else(|e| panic!("no close_notify when the upstream is down: {e}"));
            assert!(rest.is_empty());
            let (_, open) = tls_served(up, &c, b"drain me");
            (local, open)
        },
    )
    .await;
    ferry.signal("TERM");
    let open_local = blocking("the drained session", move || {
        let mut t = open;
        let local = t.sock.local_addr().unwrap();
        let mut rest = Vec::new();
        t.read_to_end(&mut rest)
            .unwrap_or_else(|e| panic!("no close_notify at the end of the drain: {e}"));
        assert!(rest.is_empty());
        local
    })
    .await;
    within(WAIT, "ferry to exit", ferry.wait_exit(WAIT))
        .await
        .expect("ferry exits");
    let recs = records_of(&ferry, 2, &[down_local, open_local]).await;
    assert_eq!(recs[0]["result"], "connect_failed", "{}", recs[0]);
    assert_eq!(recs[1]["result"], "drained", "{}", recs[1]);
    for rec in &recs {
        assert_eq!(rec["sni"], "localhost", "{rec}");
        assert_eq!(rec["tls_version"], "TLSv1.3", "{rec}");
    }
}

// ---------------------------------------------------------------------------------------
// 20. Slow ends: a server with a tiny receive buffer reading 1 KiB at a time under a TLS
//     upload, and a client with a tiny receive buffer reading 1 KiB at a time under a TLS
//     download. Every partial write and held-back record in ferry is exercised; the bytes
//     arrive intact.

/// Like [`sink_server`], with 4 KiB socket buffers and 1 KiB reads, yielding between them.
async fn slow_sink_server() -> SocketAddr {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(16).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut h = Sha256::new();
                let mut n = 0u64;
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => {
                            n += k as u64;
                            h.update(&buf[..k]);
                        }
                        Err(_) => return,
                    }
                    tokio::task::yield_now().await;
                }
                let mut reply = h.finalize().to_vec();
                reply.extend_from_slice(&n.to_le_bytes());
                let _ = s.write_all(&reply).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_ends_through_tls() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path();
    let ca = Ca::new("ferry test CA");
    ca.server(&["localhost"]).write(d, "site");
    const N: u64 = 4 << 20;
    let sink = slow_sink_server().await;
    let source = source_server(N, 17).await;
    let cfg = tls_config("", &inline_tls(d, "site"), sink)
        + &format!(
            "\n[[listener]]\nname = \"source\"\nlisten = \"127.0.0.1:0\"\nmode = \"tls\"\nupstream = \"source\"\n{}\n\n[[upstream]]\nname = \"source\"\nservers = [\"{source}\"]\n",
            inline_tls(d, "site")
        );
    let ferry = Ferry::start(&cfg, 2).await;
    let (up_addr, down_addr) = (ferry.addr("web"), ferry.addr("source"));
    let c = Client::new(&ca, "localhost");
    let c2 = c.clone();
    let upload = blocking("an upload to a slow server", move || {
        let (_, r) = tls_try(up_addr, &c);
        let mut t = r.unwrap_or_else(|e| panic!("handshake: {e}"));
        t.write_all(&prng_bytes(N, 19)).expect("upload");
        t.conn.send_close_notify();
        t.flush().unwrap();
        let mut reply = Vec::new();
        t.read_to_end(&mut reply)
            .expect("the sink's answer, then close_notify");
        reply
    });
    let download = blocking("a download to a slow client", move || {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.connect_timeout(&down_addr.into(), WAIT).unwrap();
        let mut t = c2
            .with(|o| pki::tls_handshake(sock.into(), o, WAIT))
            .unwrap_or_else(|e| panic!("handshake: {e}"));
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut buf = [0u8; 1024];
        loop {
            match t.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    n += k as u64;
                    h.update(&buf[..k]);
                }
                Err(e) => panic!("download after {n} bytes: {e}"),
            }
        }
        let d: [u8; 32] = h.finalize().into();
        (n, d)
    });
    let (reply, (n, h)) = tokio::join!(upload, download);
    let (un, uh) = sink_reply(&reply);
    assert_eq!(un, N, "bytes the slow server got");
    assert_eq!(uh, prng_sha256(N, 19), "the upload differs");
    assert_eq!(n, N, "bytes the slow client got");
    assert_eq!(h, prng_sha256(N, 17), "the download differs");
    let recs = ferry.records(2, WAIT).await;
    assert!(recs.iter().all(|r| r["result"] == "ok"), "{recs:#?}");
}

// ---------------------------------------------------------------------------------------
// 21. Key formats and key types: an EC key in SEC1 form (`EC PRIVATE KEY`) and an RSA key
//     in PKCS#1 form (`RSA PRIVATE KEY`), both made by openssl; each serves over TLS 1.3
//     and 1.2. And a listener with `certs` entries only: the first is the default.

/// Runs openssl with `args`, panicking if it fails.
fn openssl(args: &[&str]) {
    let mut cmd = Command::new("openssl");
    cmd.args(args);
    let (st, out, err) = run(cmd);
    assert!(st.success(), "openssl {args:?}: {out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_formats_and_certs_only() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path().to_path_buf();
    let ca = Ca::new("ferry test CA");
    let ec = ca.server(&["ec.test"]);
    ec.write(&d, "ec");
    let p = |name: &str| d.join(name).display().to_string();
    let dd = d.clone();
    blocking("openssl key conversions", move || {
        let p = |name: &str| dd.join(name).display().to_string();
        openssl(&["ec", "-in", &p("ec.key"), "-out", &p("ec-sec1.key")]);
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &p("rsa8.key"),
            "-out",
            &p("rsa.pem"),
            "-subj",
            "/CN=rsa.test",
            "-addext",
            "subjectAltName=DNS:rsa.test",
            "-days",
            "30",
        ]);
        openssl(&[
            "rsa",
            "-in",
            &p("rsa8.key"),
            "-traditional",
            "-out",
            &p("rsa.key"),
        ]);
    })
    .await;
    let sec1 = std::fs::read_to_string(p("ec-sec1.key")).unwrap();
    assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"), "{sec1}");
    let pkcs1 = std::fs::read_to_string(p("rsa.key")).unwrap();
    assert!(
        pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "{pkcs1}"
    );
    let rsa_der = rustls::pki_types::pem::PemObject::from_pem_slice(
        std::fs::read(p("rsa.pem")).unwrap().as_slice(),
    )
    .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
    .unwrap();

    let echo = echo_server().await;
    let tls = format!(
        "[listener.tls]\ncert = \"{ec}\"\nkey = \"{sec1}\"\n[[listener.tls.certs]]\nname = \"rsa.test\"\ncert = \"{rsa}\"\nkey = \"{pkcs1}\"\n",
        ec = p("ec.pem"),
        sec1 = p("ec-sec1.key"),
        rsa = p("rsa.pem"),
        pkcs1 = p("rsa.key")
    );
    // The second listener has `certs` entries only: RSA first, so it is the default.
    let cfg = tls_config("", &tls, echo)
        + &format!(
            "\n[[listener]]\nname = \"certs-only\"\nlisten = \"127.0.0.1:0\"\nmode = \"tls\"\nupstream = \"back\"\n[[listener.tls.certs]]\nname = \"rsa.test\"\ncert = \"{}\"\nkey = \"{}\"\n[[listener.tls.certs]]\nname = \"ec.test\"\ncert = \"{}\"\nkey = \"{}\"\n",
            p("rsa.pem"),
            p("rsa.key"),
            p("ec.pem"),
            p("ec-sec1.key")
        );
    let ferry = Ferry::start(&cfg, 2).await;
    let (web, only) = (ferry.addr("web"), ferry.addr("certs-only"));
    let ec_der = ec.cert_der().to_vec();
    let clients = blocking("EC and RSA sessions", move || {
        let mut clients = Vec::new();
        let v12 = [&rustls::version::TLS12];
        let v13 = [&rustls::version::TLS13];
        for versions in [&v13[..], &v12[..]] {
            for (addr, sni, want) in [
                (web, Some("ec.test"), &ec_der),
                (web, Some("rsa.test"), &rsa_der),
                (web, None, &ec_der),
                (only, None, &rsa_der),
                (only, Some("unknown.test"), &rsa_der),
                (only, Some("ec.test"), &ec_der),
            ] {
                let mut c = Client {
                    sni: sni.map(str::to_string),
                    ..Client::default()
                };
                c.config = Some(c.with(|o| pki::client_config_with(o, versions, true)));
                let (local, t) = tls_served(addr, &c, b"keys");
                assert!(
                    served_cert(&t) == *want,
                    "{addr} SNI {sni:?} {versions:?}: the wrong certificate"
                );
                tls_finish(t);
                clients.push(local);
            }
        }
        clients
    })
    .await;
    let recs = records_of(&ferry, clients.len(), &clients).await;
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(rec["result"], "ok", "{rec}");
        let (version, prefix) = if i < 6 {
            ("TLSv1.3", "TLS13_")
        } else if [1, 3, 4].contains(&(i - 6)) {
            ("TLSv1.2", "TLS_ECDHE_RSA_WITH_")
        } else {
            ("TLSv1.2", "TLS_ECDHE_ECDSA_WITH_")
        };
        assert_eq!(rec["tls_version"], version, "{rec}");
        assert!(
            rec["tls_cipher"]
                .as_str()
                .is_some_and(|c| c.starts_with(prefix)),
            "{rec}"
        );
    }
}
