//! Shared helpers for the integration tests: run the real `ferry` binary as a child process,
//! learn its ports from its log, read its access log, and in-process tokio backends.
//!
//! Every wait here is bounded; a helper that times out panics with what ferry printed, so a
//! failing test says why.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod dns;
pub mod netns;
pub mod pki;

/// The default bound on any wait for something ferry should do promptly.
pub const WAIT: Duration = Duration::from_secs(10);

/// The path of the binary under test: the one cargo built, or `$FERRY_TEST_BIN` (to run
/// the suite against another build, e.g. to see a test fail on the build before a fix).
pub fn ferry_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("FERRY_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ferry").into())
    })
}

/// Awaits `fut` for at most `d`; panics naming `what` if it takes longer.
pub async fn within<T>(d: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(d, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {d:?} waiting for {what}"),
    }
}

/// Waits until `cond` holds, checking every 10 ms; panics naming `what` after `d`.
pub async fn wait_until(d: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    within(d, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// Lines captured from a child's stdout or stderr.

/// Lines read from a pipe by a background thread.
#[derive(Clone, Default)]
pub struct Lines {
    inner: Arc<Mutex<(Vec<String>, bool)>>,
}

impl Lines {
    pub fn capture(pipe: impl Read + Send + 'static) -> Lines {
        let lines = Lines::default();
        let l = lines.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let s = String::from_utf8_lossy(&buf).trim_end().to_string();
                        l.inner.lock().unwrap().0.push(s);
                    }
                }
            }
            l.inner.lock().unwrap().1 = true;
        });
        lines
    }

    /// Everything captured so far.
    pub fn all(&self) -> Vec<String> {
        self.inner.lock().unwrap().0.clone()
    }

    /// True once the pipe has been closed (the child exited).
    pub fn closed(&self) -> bool {
        self.inner.lock().unwrap().1
    }

    pub fn text(&self) -> String {
        self.all().join("\n")
    }

    /// Waits (up to [`WAIT`]) until a captured line satisfies `pred`; panics naming `what`,
    /// with everything captured, if none does.
    pub async fn expect(&self, what: &str, pred: impl Fn(&str) -> bool) {
        if self.wait_count(1, WAIT, pred).await.is_none() {
            panic!("{what}; captured:\n{}", self.text());
        }
    }

    /// Waits until at least `n` captured lines satisfy `pred`; returns them. `None` on
    /// timeout or if the pipe closed first.
    pub async fn wait_count(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let (found, closed) = {
                let g = self.inner.lock().unwrap();
                let found: Vec<String> = g.0.iter().filter(|l| pred(l)).cloned().collect();
                (found, g.1)
            };
            if found.len() >= n {
                return Some(found);
            }
            if closed || Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The ferry child process.

/// A running ferry; killed (and reaped) on drop, so a failing test never leaves one behind.
pub struct Ferry {
    child: Child,
    exited: Option<ExitStatus>,
    /// Holds the config file and the access log.
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub stdout: Lines,
    pub stderr: Lines,
    /// `(listener name, address)` for every `listening on` line, in order.
    pub listening: Vec<(String, SocketAddr)>,
}

/// `listener "NAME" listening on ADDR` → `(NAME, ADDR)`.
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let i = line.find("listener \"")?;
    let rest = &line[i + "listener \"".len()..];
    let (name, rest) = rest.split_once('"')?;
    let addr = rest.strip_prefix(" listening on ")?.trim();
    Some((name.to_string(), addr.parse().ok()?))
}

impl Ferry {
    /// Writes `config` (with every `@LOG@` replaced by the access-log path in the test's
    /// temporary folder) to `ferry.toml`, runs `ferry run --config` on it and waits until
    /// `listening` addresses are announced.
    pub async fn start(config: &str, listening: usize) -> Ferry {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("access.log");
        let config_path = dir.path().join("ferry.toml");
        let text = config.replace("@LOG@", &log_path.display().to_string());
        std::fs::write(&config_path, text).expect("write config");
        let mut cmd = Command::new(ferry_bin());
        cmd.arg("run").arg("--config").arg(&config_path);
        Ferry::spawn(cmd, dir, config_path, log_path, listening).await
    }

    /// Runs `ferry` with `args` (quick mode) and waits for `listening` addresses.
    pub async fn start_args(args: &[&str], listening: usize) -> Ferry {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("access.log");
        let config_path = dir.path().join("ferry.toml");
        let mut cmd = Command::new(ferry_bin());
        cmd.args(args);
        Ferry::spawn(cmd, dir, config_path, log_path, listening).await
    }

    /// As [`Ferry::start`], with ferry run by a wrapper: `wrapper[0]` with the rest of
    /// `wrapper` as its first arguments, then the ferry binary, `run --config PATH`. The
    /// wrapper must end by exec'ing ferry (as `ip netns exec NS` and `unshare` do, or
    /// `sh -c '… && exec "$0" "$@"'`), so that the process killed on drop is ferry itself.
    pub async fn start_wrapped(config: &str, listening: usize, wrapper: &[&str]) -> Ferry {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("access.log");
        let config_path = dir.path().join("ferry.toml");
        let text = config.replace("@LOG@", &log_path.display().to_string());
        std::fs::write(&config_path, text).expect("write config");
        let (program, args) = wrapper.split_first().expect("a wrapper program");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .arg(ferry_bin())
            .arg("run")
            .arg("--config")
            .arg(&config_path);
        Ferry::spawn(cmd, dir, config_path, log_path, listening).await
    }

    async fn spawn(
        mut cmd: Command,
        dir: TempDir,
        config_path: PathBuf,
        log_path: PathBuf,
        listening: usize,
    ) -> Ferry {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        let mut child = cmd.spawn().expect("spawn ferry");
        let stdout = Lines::capture(child.stdout.take().unwrap());
        let stderr = Lines::capture(child.stderr.take().unwrap());
        let mut f = Ferry {
            child,
            exited: None,
            dir,
            config_path,
            log_path,
            stdout,
            stderr,
            listening: Vec::new(),
        };
        let found = f
            .stderr
            .wait_count(listening, WAIT, |l| parse_listening(l).is_some())
            .await;
        match found {
            Some(lines) => {
                f.listening = lines.iter().filter_map(|l| parse_listening(l)).collect();
            }
            None => panic!(
                "ferry did not announce {listening} listening address(es); exit: {:?}\nstderr:\n{}",
                f.child.try_wait(),
                f.stderr.text()
            ),
        }
        f
    }

    /// The first address announced for listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listening
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no listener {name:?} in {:?}", self.listening))
            .1
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`"TERM"`, `"INT"`) with kill(1).
    pub fn signal(&self, sig: &str) {
        signal_pid(self.pid(), sig);
    }

    /// The exit status, if ferry has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait");
        }
        self.exited
    }

    /// Waits for ferry to exit; `None` on timeout.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resident set size of the ferry process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// Lines of the access-log file so far.
    pub fn log_lines_now(&self) -> Vec<String> {
        match std::fs::read_to_string(&self.log_path) {
            Ok(s) => s.lines().map(str::to_string).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits until the access-log file holds at least `n` lines; returns all of them.
    pub async fn log_lines(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log_lines_now();
            if lines.len() >= n {
                return lines;
            }
            if Instant::now() >= deadline {
                panic!(
                    "access log has {} line(s), expected {n}:\n{}\nstderr:\n{}",
                    lines.len(),
                    lines.join("\n"),
                    self.stderr.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the access-log file holds at least `n` JSON records; returns them all.
    pub async fn records(&self, n: usize, timeout: Duration) -> Vec<Value> {
        parse_records(&self.log_lines(n, timeout).await)
    }

    /// Waits until at least `n` JSON records have `result == result`; returns those.
    pub async fn records_with(&self, result: &str, n: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let recs: Vec<Value> = parse_records(&self.log_lines_now())
                .into_iter()
                .filter(|r| r["result"] == result)
                .collect();
            if recs.len() >= n {
                return recs;
            }
            if Instant::now() >= deadline {
                panic!(
                    "access log has {} record(s) with result {result:?}, expected {n}:\n{}\nstderr:\n{}",
                    recs.len(),
                    self.log_lines_now().join("\n"),
                    self.stderr.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- ferry's log ---\n{}\n---", self.stderr.text());
        }
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends a signal by name (`"TERM"`, `"USR2"`) to process `pid` with kill(1).
pub fn signal_pid(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

/// The notifications received on `sock` (a test's stand-in for systemd's `NOTIFY_SOCKET`)
/// until one has a line starting with `want` (`READY=1`, `MAINPID=`), appended to `seen`;
/// each waited for up to [`WAIT`].
pub fn notes_until(sock: &std::os::unix::net::UnixDatagram, want: &str, seen: &mut Vec<String>) {
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification with {want:?} (seen: {seen:?}): {e}"));
        let note = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = note.lines().any(|l| l.starts_with(want));
        seen.push(note);
        if done {
            return;
        }
    }
}

/// Parses JSON-lines access-log records, panicking on a line that is not a JSON object.
pub fn parse_records(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("access-log line is not JSON ({e}): {l}"));
            assert!(v.is_object(), "access-log line is not an object: {l}");
            v
        })
        .collect()
}

/// Finds the record whose `client` is `client`.
pub fn record_for(records: &[Value], client: SocketAddr) -> &Value {
    let c = client.to_string();
    records
        .iter()
        .find(|r| r["client"] == c.as_str())
        .unwrap_or_else(|| panic!("no record for client {c} in {records:#?}"))
}

/// What `ferry check --config` said about a config.
pub struct Checked {
    pub code: Option<i32>,
    /// The config file's path, as errors name it.
    pub path: String,
    /// The error lines, without the path: `line:col: message`.
    pub errors: Vec<String>,
    pub stderr: String,
}

/// Runs `ferry check --config` on `text`, written to `dir/ferry.toml` (relative paths in
/// it are relative to `dir`), or to a temporary folder.
pub fn check_config_in(dir: Option<&Path>, text: &str) -> Checked {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.unwrap_or(tmp.path()), "ferry.toml", text)
        .display()
        .to_string();
    let out = run_ferry(&["check", "--config", &path]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let prefix = format!("{path}:");
    let errors = stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect();
    Checked {
        code: out.status.code(),
        path,
        errors,
        stderr,
    }
}

/// Asserts that `text` fails `ferry check` (exit 1) with exactly `expected` (`line:col:
/// message` each, without the file name), in this order, and says how many. A trailing
/// `…` stands for a list that grows with every feature (the keys a table accepts): the
/// text up to it must match exactly.
#[track_caller]
pub fn assert_check_errors(text: &str, expected: &[&str]) {
    let c = check_config_in(None, text);
    let stderr = &c.stderr;
    assert_eq!(c.code, Some(1), "exit code; stderr:\n{stderr}");
    assert_eq!(
        c.errors.len(),
        expected.len(),
        "number of errors; stderr:\n{stderr}"
    );
    for (got, want) in c.errors.iter().zip(expected) {
        match want.strip_suffix('…') {
            Some(prefix) => assert!(
                got.starts_with(prefix),
                "expected {want}\n     got {got}\nstderr:\n{stderr}"
            ),
            None => assert_eq!(got, want, "stderr:\n{stderr}"),
        }
    }
    assert!(
        stderr.contains(&format!("ferry: {} error(s) in {}", expected.len(), c.path)),
        "no error count; stderr:\n{stderr}"
    );
}

/// Runs ferry with `args` to completion (at most `WAIT`), capturing its output.
pub fn run_ferry(args: &[&str]) -> Output {
    let mut child = Command::new(ferry_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .spawn()
        .expect("spawn ferry");
    let out = Lines::capture(child.stdout.take().unwrap());
    let err = Lines::capture(child.stderr.take().unwrap());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ferry {args:?} did not exit within {WAIT:?}; stderr:\n{}",
                err.text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The reader threads finish once the pipes close.
    let deadline = Instant::now() + WAIT;
    while !(out.closed() && err.closed()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let join = |l: &Lines| {
        let mut s = l.all().join("\n");
        if !s.is_empty() {
            s.push('\n');
        }
        s.into_bytes()
    };
    Output {
        status,
        stdout: join(&out),
        stderr: join(&err),
    }
}

/// VmRSS of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status")
}

/// Writes a file into `dir` and returns its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write file");
    p
}

// ---------------------------------------------------------------------------------------
// Data: a fast deterministic pseudo-random stream and SHA-256.

/// xorshift64*: cheap, deterministic pseudo-random bytes.
pub struct Prng(u64);

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&last[..n]);
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `n` pseudo-random bytes from `seed`; returns their SHA-256. Does not shut down.
pub async fn send_prng<W: AsyncWrite + Unpin>(
    w: &mut W,
    n: u64,
    seed: u64,
) -> std::io::Result<[u8; 32]> {
    let mut rng = Prng::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..k]);
        h.update(&buf[..k]);
        w.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    Ok(h.finalize().into())
}

/// Writes `n` pseudo-random bytes from `seed`, without hashing them. Does not shut down.
pub async fn write_prng<W: AsyncWrite + Unpin>(
    w: &mut W,
    n: u64,
    seed: u64,
) -> std::io::Result<()> {
    let mut rng = Prng::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..k]);
        w.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}

/// Writes `n` bytes, repeating one pseudo-random 64 KiB block: as cheap as writing gets.
pub async fn write_repeated<W: AsyncWrite + Unpin>(w: &mut W, n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    Prng::new(n).fill(&mut buf);
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}

/// Reads to EOF; returns the byte count.
pub async fn read_count<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}

/// Reads to EOF; returns the byte count and SHA-256 of what was read.
pub async fn read_hash<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u64, [u8; 32])> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok((n, h.finalize().into()));
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
}

// ---------------------------------------------------------------------------------------
// Client-side helpers.

pub async fn connect(addr: SocketAddr) -> TcpStream {
    within(WAIT, "connect to ferry", TcpStream::connect(addr))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Connects from a port bound first, so the client address is known even if ferry resets
/// the connection before the connect is seen complete (which a refused client may see).
pub async fn connect_from(addr: SocketAddr) -> (SocketAddr, std::io::Result<TcpStream>) {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .unwrap();
    let any: SocketAddr = if addr.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    sock.bind(any).unwrap();
    let client = sock.local_addr().unwrap();
    (client, within(WAIT, "connect", sock.connect(addr)).await)
}

/// Connects and expects ferry to close the connection within `timeout` without sending
/// anything (EOF or reset; a reset may already fail the connect). Returns the client
/// address.
pub async fn expect_closed_at_once(addr: SocketAddr, timeout: Duration) -> SocketAddr {
    let (client, r) = connect_from(addr).await;
    let mut s = match r {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return client,
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    let (data, _how) = read_until_closed(&mut s, timeout).await;
    assert!(data.is_empty(), "a refused connection got data: {data:?}");
    client
}

/// Writes `msg` and reads back exactly as many bytes; asserts they are the same.
pub async fn echo_round_trip(s: &mut TcpStream, msg: &[u8]) {
    within(WAIT, "echo round trip", async {
        s.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.expect("read echo");
        assert_eq!(back, msg, "echoed bytes differ");
    })
    .await
}

/// How a connection ended, seen from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    Eof,
    Reset,
}

/// Reads until the peer closes (EOF or reset); returns the bytes read and how it ended.
/// Panics if that takes longer than `timeout`.
pub async fn read_until_closed(s: &mut TcpStream, timeout: Duration) -> (Vec<u8>, Closed) {
    within(timeout, "the connection to be closed", async {
        let mut data = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return (data, Closed::Eof),
                Ok(n) => data.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return (data, Closed::Reset);
                }
                Err(e) => panic!("unexpected read error: {e}"),
            }
        }
    })
    .await
}

/// Closes `s` with a reset (SO_LINGER 0) rather than a FIN.
pub fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("set linger");
    drop(s);
}

// ---------------------------------------------------------------------------------------
// Backends: in-process tokio servers on loopback.

/// Binds `ip:0` and serves each accepted connection with `serve` on its own task.
pub async fn serve_on<F, Fut>(ip: &str, serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind((ip, 0)).await.expect("bind backend");
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Echoes everything; on EOF shuts down its write side.
pub async fn echo_server() -> SocketAddr {
    echo_server_on("127.0.0.1").await
}

pub async fn echo_server_on(ip: &str) -> SocketAddr {
    serve_on(ip, |mut s| async move { echo(&mut s).await }).await
}

async fn echo(s: &mut TcpStream) {
    let (mut r, mut w) = s.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// An echo server that counts the connections it accepted.
pub async fn counting_echo_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = n.clone();
    let addr = serve_on("127.0.0.1", move |mut s| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move { echo(&mut s).await }
    })
    .await;
    (addr, n)
}

/// True if some socket on this machine is in SYN_SENT towards `addr` (IPv4), i.e. a
/// connect to it is under way. Read from /proc/net/tcp.
pub fn connecting_to(addr: SocketAddr) -> bool {
    let want = format!(":{:04X}", addr.port());
    let text = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    text.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[2].ends_with(&want) && f[3] == "02"
    })
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read /proc fd")
        .count()
}

/// Sends `banner` on accept, then echoes.
pub async fn banner_server(banner: &'static str) -> SocketAddr {
    serve_on("127.0.0.1", move |mut s| async move {
        if s.write_all(banner.as_bytes()).await.is_ok() {
            echo(&mut s).await;
        }
    })
    .await
}

/// Reads and discards everything; when the client half-closes, replies with the SHA-256
/// of what it read (32 bytes) and its length (8 bytes, little endian), then closes.
pub async fn sink_server() -> SocketAddr {
    serve_on("127.0.0.1", |mut s| async move {
        if let Ok((n, h)) = read_hash(&mut s).await {
            let mut reply = h.to_vec();
            reply.extend_from_slice(&n.to_le_bytes());
            let _ = s.write_all(&reply).await;
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// Parses a sink's reply.
pub fn sink_reply(reply: &[u8]) -> (u64, [u8; 32]) {
    assert_eq!(reply.len(), 40, "sink reply length");
    let h: [u8; 32] = reply[..32].try_into().unwrap();
    let n = u64::from_le_bytes(reply[32..].try_into().unwrap());
    (n, h)
}

/// Sends `n` pseudo-random bytes from `seed` on accept, then closes. The SHA-256 of what
/// it sent is `prng_sha256(n, seed)`.
pub async fn source_server(n: u64, seed: u64) -> SocketAddr {
    serve_on("127.0.0.1", move |mut s| async move {
        if write_prng(&mut s, n, seed).await.is_ok() {
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// Reads and discards everything; when the client half-closes, replies with the count
/// (8 bytes, little endian) and closes. No hashing: for throughput.
pub async fn discard_server() -> SocketAddr {
    serve_on("127.0.0.1", |mut s| async move {
        if let Ok(n) = read_count(&mut s).await {
            let _ = s.write_all(&n.to_le_bytes()).await;
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// Sends `n` bytes (one block repeated) on accept, then closes. For throughput.
pub async fn repeat_server(n: u64) -> SocketAddr {
    serve_on("127.0.0.1", move |mut s| async move {
        if write_repeated(&mut s, n).await.is_ok() {
            let _ = s.shutdown().await;
        }
    })
    .await
}

/// The SHA-256 of `n` pseudo-random bytes from `seed`.
pub fn prng_sha256(n: u64, seed: u64) -> [u8; 32] {
    let mut rng = Prng::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..k]);
        h.update(&buf[..k]);
        left -= k as u64;
    }
    h.finalize().into()
}

/// An address where nothing listens: a port bound, then released.
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A listener that never completes a handshake: its accept queue (backlog 0) is already
/// full, so Linux drops further SYNs and a connect to it hangs until the connector gives up.
/// Keep the returned value alive while it is used.
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<std::net::TcpStream>,
}

pub fn black_hole() -> BlackHole {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    // One completed connection fills a backlog of 0; the rest of the SYNs are dropped. Try a
    // couple of fillers, each bounded, until one connect no longer completes.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(c) => fillers.push(c),
            Err(_) => break,
        }
    }
    BlackHole {
        addr,
        _listener: s,
        _fillers: fillers,
    }
}

/// A config with one listener `front` on `127.0.0.1:0` (plus `listener_extra` lines) in
/// front of the single server `echo`, access log to the test's file.
pub fn echo_config(listener_extra: &str, echo: SocketAddr) -> String {
    format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "echo"
{listener_extra}

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#
    )
}
