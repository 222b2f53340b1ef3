//! Helpers shared by `tests/edge.rs` and `tests/ops.rs`: a tiny HTTP/1.1 client for the
//! admin API, clients bound to chosen source addresses, metric lookups, and real peers
//! (HAProxy, nginx) run as child processes that are killed on drop.
//!
//! Used next to `mod common;` (the ferry child process, backends, waits).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::{Ferry, WAIT, echo_round_trip, read_until_closed, within};

// ---------------------------------------------------------------------------------------
// The admin API.

/// Waits for ferry's `admin listening on http://ADDR/` line; returns ADDR.
pub async fn admin_addr(ferry: &Ferry) -> SocketAddr {
    const MARK: &str = "admin listening on http://";
    let lines = ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains(MARK))
        .await
        .unwrap_or_else(|| {
            panic!(
                "ferry did not announce its admin address; stderr:\n{}",
                ferry.stderr.text()
            )
        });
    let line = &lines[0];
    let rest = &line[line.find(MARK).unwrap() + MARK.len()..];
    let addr = rest.trim().trim_end_matches('/');
    addr.parse()
        .unwrap_or_else(|e| panic!("bad admin address in {line:?}: {e}"))
}

/// An HTTP response: status, headers (names lower-cased) and body.
#[derive(Debug, Clone)]
pub struct HttpResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON; panics (with the body) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status, self.body
            )
        })
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); reads the whole
/// answer. Bounded by [`WAIT`].
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResp {
    within(WAIT, &format!("HTTP {method} {path}"), async {
        let mut s = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to admin {addr}: {e}"));
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("write request");
        s.write_all(body).await.expect("write request body");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read response");
        parse_response(&raw)
    })
    .await
}

fn parse_response(raw: &[u8]) -> HttpResp {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of headers in HTTP response: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    HttpResp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

pub async fn get(addr: SocketAddr, path: &str) -> HttpResp {
    http(addr, "GET", path, &[], b"").await
}

/// A POST, with `Authorization: Bearer TOKEN` if `token` is given.
pub async fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> HttpResp {
    match token {
        Some(t) => {
            let auth = format!("Bearer {t}");
            http(addr, "POST", path, &[("Authorization", &auth)], b"").await
        }
        None => http(addr, "POST", path, &[], b"").await,
    }
}

/// `GET /api/status`, checked to be 200 JSON.
pub async fn status(admin: SocketAddr) -> Value {
    let r = get(admin, "/api/status").await;
    assert_eq!(r.status, 200, "GET /api/status: {r:?}");
    r.json()
}

/// The `/api/status` entry of server `addr` of upstream `upstream`.
pub fn server_status(status: &Value, upstream: &str, addr: SocketAddr) -> Value {
    let u = status["upstreams"]
        .as_array()
        .expect("upstreams[]")
        .iter()
        .find(|u| u["name"] == upstream)
        .unwrap_or_else(|| panic!("no upstream {upstream:?} in {status:#}"));
    u["servers"]
        .as_array()
        .expect("servers[]")
        .iter()
        .find(|s| s["addr"] == addr.to_string())
        .unwrap_or_else(|| panic!("no server {addr} in upstream {upstream:?}: {u:#}"))
        .clone()
}

/// `GET /metrics`, checked to be 200.
pub async fn metrics(admin: SocketAddr) -> String {
    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200, "GET /metrics: {r:?}");
    r.body
}

/// Parses one sample line of the text format: `name{k="v",...} value`.
fn parse_sample(line: &str) -> Option<(String, BTreeMap<String, String>, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.to_string(), BTreeMap::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}')?;
            let mut labels = BTreeMap::new();
            // Label values here never hold `",` or escapes.
            for pair in body.split("\",") {
                let (k, v) = pair.split_once("=\"")?;
                labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
            (name.to_string(), labels)
        }
    };
    Some((name, labels, value))
}

/// Every sample `name` whose labels include all of `labels`, in order: labels and value.
pub fn samples(
    text: &str,
    name: &str,
    labels: &[(&str, &str)],
) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter_map(parse_sample)
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, l, v)| (l, v))
        .collect()
}

/// The value of sample `name` whose labels include all of `labels`, if exactly one has.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = text
        .lines()
        .filter_map(parse_sample)
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .collect();
    match found.as_slice() {
        [v] => Some(*v),
        [] => None,
        _ => panic!("{} samples of {name} match {labels:?}", found.len()),
    }
}

/// Like [`metric`], but panics with the metrics text when the sample is missing.
pub fn metric_must(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(text, name, labels)
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in the metrics:\n{text}"))
}

// ---------------------------------------------------------------------------------------
// Clients from chosen source addresses.

/// Connects to `addr` from `src_ip` (an ephemeral port), e.g. `"127.0.0.2"` or `"::1"`.
/// Returns the client address even if the connect fails.
pub async fn connect_src(src_ip: &str, addr: SocketAddr) -> (SocketAddr, io::Result<TcpStream>) {
    let ip: IpAddr = src_ip.parse().expect("source IP");
    let sock = if ip.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .expect("socket");
    sock.bind(SocketAddr::new(ip, 0))
        .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    let client = sock.local_addr().unwrap();
    (client, within(WAIT, "connect", sock.connect(addr)).await)
}

/// Connects from `src_ip` and checks the connection is served (an echo round trip).
pub async fn served_from(src_ip: &str, addr: SocketAddr, tag: &str) -> TcpStream {
    let (client, r) = connect_src(src_ip, addr).await;
    let mut s = r.unwrap_or_else(|e| panic!("connect from {client} to {addr}: {e}"));
    echo_round_trip(&mut s, tag.as_bytes()).await;
    s
}

/// Connects from `src_ip` and checks that the connection is closed (EOF or reset) within
/// `timeout` without a byte. Returns the client address.
pub async fn refused_from(src_ip: &str, addr: SocketAddr, timeout: Duration) -> SocketAddr {
    let (client, r) = connect_src(src_ip, addr).await;
    match r {
        Ok(mut s) => {
            let (data, _) = read_until_closed(&mut s, timeout).await;
            assert!(
                data.is_empty(),
                "refused client {client} got data: {data:?}"
            );
        }
        Err(e) if is_reset(&e) => {}
        Err(e) => panic!("connect from {client} to {addr}: {e}"),
    }
    client
}

pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof
    )
}

/// Whether one attempt from `src_ip` was served: connect, one echo round trip, close.
/// A refused connection (reset or EOF) is `false`; anything else unexpected panics.
pub async fn try_served_from(src_ip: &str, addr: SocketAddr) -> bool {
    let (client, r) = connect_src(src_ip, addr).await;
    let mut s = match r {
        Ok(s) => s,
        Err(e) if is_reset(&e) => return false,
        Err(e) => panic!("connect from {client}: {e}"),
    };
    let ok = within(WAIT, "one echo attempt", async {
        if let Err(e) = s.write_all(b"x").await {
            assert!(is_reset(&e), "write from {client}: {e}");
            return false;
        }
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(1) => true,
            Ok(_) => false,
            Err(e) if is_reset(&e) => false,
            Err(e) => panic!("read from {client}: {e}"),
        }
    })
    .await;
    drop(s);
    ok
}

// ---------------------------------------------------------------------------------------
// Backends.

/// Sends `tag` and a newline on accept, then echoes: a client learns which server it got.
pub async fn tagged_echo(tag: &'static str) -> SocketAddr {
    tagged_echo_on("127.0.0.1", tag).await
}

/// [`tagged_echo`] on `ip`.
pub async fn tagged_echo_on(ip: &str, tag: &'static str) -> SocketAddr {
    crate::common::serve_on(ip, move |mut s| async move {
        if s.write_all(format!("{tag}\n").as_bytes()).await.is_err() {
            return;
        }
        let (mut r, mut w) = s.split();
        if tokio::io::copy(&mut r, &mut w).await.is_ok() {
            let _ = w.shutdown().await;
        }
    })
    .await
}

/// Reads one line (up to `\n`, without it) within [`WAIT`].
pub async fn read_line(s: &mut TcpStream) -> String {
    within(WAIT, "a line", async {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        loop {
            let n = s.read(&mut b).await.expect("read line");
            assert!(n == 1, "closed before a full line; got {out:?}");
            if b[0] == b'\n' {
                return String::from_utf8(out).expect("utf-8 line");
            }
            out.push(b[0]);
        }
    })
    .await
}

/// Connects to a ferry in front of [`tagged_echo`] servers; returns the stream and the
/// tag of the server it reached.
pub async fn connect_tagged(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = crate::common::connect(addr).await;
    let tag = read_line(&mut s).await;
    (s, tag)
}

// ---------------------------------------------------------------------------------------
// Ports and real peers.

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True if a TCP socket is listening on `port` (any address), from /proc/net/tcp{,6}.
pub fn listening_on(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|p| {
        std::fs::read_to_string(p).is_ok_and(|text| {
            text.lines().skip(1).any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
            })
        })
    })
}

/// A peer process (HAProxy, nginx, ...): killed and reaped on drop. Its stdout and stderr
/// go to a file in its temporary folder, shown when it fails to start.
pub struct Peer {
    pub name: String,
    child: Child,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl Peer {
    /// Starts `cmd` (its output captured); `dir` holds its config and is removed on drop.
    pub fn spawn(name: &str, mut cmd: Command, dir: tempfile::TempDir) -> Peer {
        let log = dir.path().join(format!("{name}.out"));
        let out = std::fs::File::create(&log).expect("peer log");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e} (run scripts/setup-test-deps)"));
        Peer {
            name: name.to_string(),
            child,
            dir,
            log,
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until something listens on each of `ports`; panics with the peer's output if
    /// it exits or takes too long.
    pub async fn wait_listening(&mut self, ports: &[u16]) {
        let deadline = Instant::now() + WAIT;
        loop {
            if ports.iter().all(|p| listening_on(*p)) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) before listening:\n{}",
                    self.name,
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} is not listening on {ports:?} after {WAIT:?}:\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds a program on PATH (or in /usr/sbin, where Debian puts nginx and haproxy).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn need_program(name: &str, package: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| {
        panic!("`{name}` is not installed: run scripts/setup-test-deps (Debian package {package})")
    })
}

/// Runs HAProxy on `config` (foreground, `-db`) and waits for `ports`.
pub async fn start_haproxy(config: &str, ports: &[u16]) -> Peer {
    let bin = need_program("haproxy", "haproxy");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("haproxy.cfg");
    std::fs::write(&conf, config).unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg(&conf).arg("-db");
    let mut p = Peer::spawn("haproxy", cmd, dir);
    p.wait_listening(ports).await;
    p
}

/// The nginx `stream` module, from Debian's libnginx-mod-stream.
pub fn nginx_stream_module() -> PathBuf {
    let from_dpkg = Command::new("dpkg")
        .args(["-L", "libnginx-mod-stream"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.ends_with("ngx_stream_module.so"))
                .map(PathBuf::from)
        });
    from_dpkg
        .or_else(|| {
            let p = PathBuf::from("/usr/lib/nginx/modules/ngx_stream_module.so");
            p.exists().then_some(p)
        })
        .expect("the nginx stream module is not installed: run scripts/setup-test-deps (libnginx-mod-stream)")
}

/// Runs nginx (foreground) with `stream_block` as its `stream { ... }` contents, under
/// its own prefix, and waits for `ports`.
pub async fn start_nginx(stream_block: &str, ports: &[u16]) -> Peer {
    let bin = need_program("nginx", "nginx");
    let module = nginx_stream_module();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().to_path_buf();
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module {};\nworker_processes 1;\nevents {{ worker_connections 64; }}\nstream {{\n{stream_block}\n}}\n",
            module.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-e")
        .arg("stderr")
        .arg("-c")
        .arg(&conf)
        .arg("-g")
        .arg(format!(
            "daemon off; master_process off; pid {}/nginx.pid; error_log stderr;",
            prefix.display()
        ));
    let mut p = Peer::spawn("nginx", cmd, dir);
    p.wait_listening(ports).await;
    p
}

// ---------------------------------------------------------------------------------------
// The reference Prometheus parser.

/// Makes sure python3 can import prometheus_client, installing it from PyPI if needed.
pub fn ensure_prometheus_client() {
    let has = || {
        Command::new("python3")
            .args(["-c", "import prometheus_client"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has() {
        return;
    }
    let st = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "prometheus_client",
        ])
        .status();
    assert!(
        has(),
        "python3 cannot import prometheus_client and `pip install prometheus_client` failed ({st:?}); run scripts/setup-test-deps"
    );
}

/// Parses `text` with prometheus_client's parser in python3, OpenMetrics or the Prometheus
/// text format; returns `{family: {"type": ..., "samples": n}}`. Panics with the parser's
/// error if it fails.
pub fn parse_with_prometheus_client(text: &str, openmetrics: bool) -> Value {
    let script = format!(
        r#"
import json, sys
from prometheus_client.{} import text_string_to_metric_families
fams = {{}}"#,
        if openmetrics {
            "openmetrics.parser"
        } else {
            "parser"
        }
    ) + SCRIPT;
    const SCRIPT: &str = r#"
for f in text_string_to_metric_families(sys.stdin.read()):
    fams[f.name] = {"type": f.type, "samples": len(f.samples)}
print(json.dumps(fams))
"#;
    let mut child = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "prometheus_client's parser (openmetrics: {openmetrics}) rejected /metrics: {}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}
