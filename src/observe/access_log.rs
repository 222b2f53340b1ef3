//! The access log: one record per finished connection, as JSON lines or text.
//!
//! Records are formatted on the connection's task and handed to a dedicated writer thread
//! through a bounded channel, so a slow disk or a blocked stdout pipe never stalls the
//! relay. If the channel is full the record is dropped and counted; the count is reported
//! on the process log.
//!
//! To syslog (`access = "syslog"`, the local `/dev/log`, or `"syslog:udp://HOST:PORT"`),
//! each record is one RFC 5424 message: facility local0, severity info, app name `ferry`,
//! message id `access`, the record (JSON or text) as the message.

use std::fmt::Write as _;
use std::io::{self, BufWriter, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::Outcome;
use crate::config::{AccessTarget, LogFormat};

/// Records waiting for the writer thread before new ones are dropped.
const QUEUE: usize = 64 * 1024;

/// What the writer thread is sent.
enum Msg {
    Line(String),
    /// Write out everything before this, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

/// One access-log record. Field names are the SPEC's.
#[derive(Debug, Clone, Serialize)]
pub struct Record<'a> {
    /// Start of the connection, RFC 3339.
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub listener: &'a str,
    pub client: SocketAddr,
    pub upstream: Option<&'a str>,
    pub server: Option<SocketAddr>,
    pub sni: Option<&'a str>,
    /// The protocol agreed by ALPN (mode tls), or the first one offered (mode tcp routes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpn: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cipher: Option<&'static str>,
    /// The subject of the client's certificate (mTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<&'a str>,
    /// The user a forward-proxy client authenticated as (or tried to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    /// What a forward-proxy client asked for (name or address, and port); in transparent
    /// mode, the original destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<&'a str>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Datagrams relayed each way (a SOCKS5 UDP association).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datagrams_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datagrams_down: Option<u64>,
    /// Of those (a UDP session), how many the kernel relayed without ferry's sockets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub datagrams_kernel: Option<u64>,
    /// Time to establish the server connection; absent when none was made.
    #[serde(serialize_with = "millis")]
    pub connect_ms: Option<Duration>,
    #[serde(serialize_with = "millis_req")]
    pub duration_ms: Duration,
    #[serde(serialize_with = "outcome")]
    pub result: Outcome,
    /// Why it was refused or failed, when there is more to say than `result`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    /// On records that are not the final one: `"connect"` (`on_connect`) or `"progress"`
    /// (`interval`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'static str>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(ms(*d)),
        None => s.serialize_none(),
    }
}

fn millis_req<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(ms(*d))
}

fn outcome<S: serde::Serializer>(o: &Outcome, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(o.as_str())
}

impl<'a> Record<'a> {
    /// A record with the fields every record has; the rest empty.
    pub fn new(ts: SystemTime, listener: &'a str, client: SocketAddr, result: Outcome) -> Self {
        Record {
            ts,
            listener,
            client,
            upstream: None,
            server: None,
            sni: None,
            alpn: None,
            tls_version: None,
            tls_cipher: None,
            client_cert: None,
            user: None,
            destination: None,
            bytes_up: 0,
            bytes_down: 0,
            datagrams_up: None,
            datagrams_down: None,
            datagrams_kernel: None,
            connect_ms: None,
            duration_ms: Duration::ZERO,
            result,
            reason: None,
            event: None,
        }
    }

    /// Appends the record and a newline to `out`.
    pub fn format(&self, format: LogFormat, out: &mut String) {
        match format {
            LogFormat::Json => {
                // Serializing plain fields into a String cannot fail.
                let json = serde_json::to_string(self).unwrap_or_default();
                out.push_str(&json);
            }
            LogFormat::Text => {
                let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
                let _ = write!(
                    out,
                    "{} listener={} client={} upstream={} server={} sni={} bytes_up={} bytes_down={} connect_ms={} duration_ms={} result={}",
                    humantime::format_rfc3339_millis(self.ts),
                    self.listener,
                    self.client,
                    self.upstream.unwrap_or("-"),
                    opt(self.server.map(|s| s.to_string())),
                    self.sni.unwrap_or("-"),
                    self.bytes_up,
                    self.bytes_down,
                    opt(self.connect_ms.map(|d| ms(d).to_string())),
                    ms(self.duration_ms),
                    self.result.as_str(),
                );
                // Fields that apply to some connections only, when they do. Free text is
                // quoted.
                let extra: [(&str, Option<&str>, bool); 8] = [
                    ("event", self.event, false),
                    ("user", self.user, true),
                    ("destination", self.destination, false),
                    ("alpn", self.alpn, false),
                    ("tls_version", self.tls_version, false),
                    ("tls_cipher", self.tls_cipher, false),
                    ("client_cert", self.client_cert, true),
                    ("reason", self.reason, true),
                ];
                for (k, v, quote) in extra {
                    if let Some(v) = v {
                        if quote {
                            let _ = write!(out, " {k}={v:?}");
                        } else {
                            let _ = write!(out, " {k}={v}");
                        }
                    }
                }
            }
        }
        out.push('\n');
    }
}

/// What every access log a process opens shares (a reload reopens the file): the count of
/// dropped records, which only grows, and the writer threads still running.
#[derive(Default)]
pub struct Logs {
    dropped: AtomicU64,
    writers: std::sync::Mutex<usize>,
    writer_ended: std::sync::Condvar,
}

impl Logs {
    /// Records dropped because a writer could not keep up, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    fn writers(&self) -> std::sync::MutexGuard<'_, usize> {
        self.writers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (up to `timeout`) until at most `n` writer threads are left. A writer ends
    /// once every handle to its log is dropped and it has written what was queued.
    pub fn wait_writers(&self, n: usize, timeout: Duration) -> bool {
        let guard = self.writers();
        let (guard, _) = self
            .writer_ended
            .wait_timeout_while(guard, timeout, |w| *w > n)
            .unwrap_or_else(|e| e.into_inner());
        *guard <= n
    }
}

/// The access-log sink. Cheap to share (`Arc`); [`AccessLog::flush`] writes out what is queued.
pub struct AccessLog {
    format: LogFormat,
    /// `[log] interval`: progress records for long connections.
    pub interval: Option<Duration>,
    /// `[log] on_connect`: a record when the server connection is up.
    pub on_connect: bool,
    tx: Option<SyncSender<Msg>>,
    logs: Arc<Logs>,
}

impl AccessLog {
    /// Opens the sink named by `[log] access`. A file is opened for appending (created if
    /// missing); failing to open it is an error the caller reports at start-up.
    pub fn open(
        target: &AccessTarget,
        format: LogFormat,
        interval: Option<Duration>,
        on_connect: bool,
        logs: Arc<Logs>,
    ) -> io::Result<AccessLog> {
        let out: Sink = match target {
            AccessTarget::Off => {
                return Ok(AccessLog {
                    format,
                    interval,
                    on_connect,
                    tx: None,
                    logs,
                });
            }
            AccessTarget::Stdout => Sink::stream(io::stdout()),
            AccessTarget::Stderr => Sink::stream(io::stderr()),
            AccessTarget::File(path) => Sink::stream(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
            AccessTarget::Syslog(to) => Sink::syslog(to)?,
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("ferry-access-log".into())
            .spawn({
                let logs = logs.clone();
                *logs.writers() += 1;
                move || {
                    write_loop(rx, out, &logs.dropped);
                    *logs.writers() -= 1;
                    logs.writer_ended.notify_all();
                }
            })
            .inspect_err(|_| *logs.writers() -= 1)?;
        Ok(AccessLog {
            format,
            interval,
            on_connect,
            tx: Some(tx),
            logs,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one record. Never blocks: if the writer is behind, the record is dropped and
    /// counted.
    pub fn write(&self, rec: &Record<'_>) {
        let Some(tx) = &self.tx else { return };
        let mut line = String::with_capacity(256);
        rec.format(self.format, &mut line);
        match tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.logs.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Waits (up to `timeout`) until every record queued so far is written out: at exit,
    /// so that no record is lost.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(tx) = &self.tx else { return true };
        let start = std::time::Instant::now();
        let left = || timeout.saturating_sub(start.elapsed());
        let (ack_tx, ack_rx) = std::sync::mpsc::channel();
        let mut msg = Msg::Flush(ack_tx);
        // A full queue means a stalled writer: retry until the deadline, never block past it.
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(m)) => {
                    if left().is_zero() {
                        return false;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        ack_rx.recv_timeout(left()).is_ok()
    }
}

/// Where the writer thread puts records.
enum Sink {
    /// Lines on a stream (stdout, stderr, a file).
    Stream(BufWriter<Box<dyn Write + Send>>),
    /// One syslog message per record; `head` is the RFC 5424 header after the timestamp
    /// (`HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA `).
    Syslog {
        to: SyslogSocket,
        head: String,
        buf: String,
    },
}

enum SyslogSocket {
    Local(std::os::unix::net::UnixDatagram),
    Udp(std::net::UdpSocket),
}

/// `<PRI>`: facility local0 (16), severity informational (6).
const SYSLOG_PRI: u8 = 16 * 8 + 6;

impl Sink {
    fn stream(w: impl Write + Send + 'static) -> Sink {
        Sink::Stream(BufWriter::with_capacity(64 * 1024, Box::new(w)))
    }

    fn syslog(to: &crate::config::SyslogTarget) -> io::Result<Sink> {
        let sock = match to {
            crate::config::SyslogTarget::Local(path) => {
                let s = std::os::unix::net::UnixDatagram::unbound()?;
                s.connect(path)?;
                SyslogSocket::Local(s)
            }
            crate::config::SyslogTarget::Udp { host, port } => {
                // A name is looked up here, when the log is opened (at the start and at
                // each reload): its first address.
                let addr = (host.as_str(), *port)
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
                    })?;
                let any: SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = std::net::UdpSocket::bind(any)?;
                s.connect(addr)?;
                SyslogSocket::Udp(s)
            }
        };
        // RFC 5424's HOSTNAME: printable ASCII without spaces, or "-".
        let host: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        let host = if host.is_empty() { "-".into() } else { host };
        Ok(Sink::Syslog {
            to: sock,
            head: format!("{host} ferry {} access - ", std::process::id()),
            buf: String::with_capacity(1024),
        })
    }

    fn write(&mut self, line: &str) {
        match self {
            Sink::Stream(out) => {
                let _ = out.write_all(line.as_bytes());
            }
            Sink::Syslog { to, head, buf } => {
                buf.clear();
                let now = humantime::format_rfc3339_millis(SystemTime::now());
                let _ = write!(buf, "<{SYSLOG_PRI}>1 {now} {head}{}", line.trim_end());
                // A lost message is a lost record, as with a full queue: never retried.
                let _ = match to {
                    SyslogSocket::Local(s) => s.send(buf.as_bytes()),
                    SyslogSocket::Udp(s) => s.send(buf.as_bytes()),
                };
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sink::Stream(out) => out.flush(),
            Sink::Syslog { .. } => Ok(()),
        }
    }
}

/// Dropping the last handle ends the writer thread once it has written what is queued; it
/// is not waited for (a stalled stdout or disk must not block whoever drops the log).
fn write_loop(rx: Receiver<Msg>, mut out: Sink, dropped: &AtomicU64) {
    let mut reported = dropped.load(Relaxed);
    while let Ok(first) = rx.recv() {
        let mut acks = Vec::new();
        let mut handle = |m: Msg, out: &mut Sink| match m {
            Msg::Line(line) => out.write(&line),
            Msg::Flush(ack) => acks.push(ack),
        };
        handle(first, &mut out);
        // Batch whatever else is queued, then flush so records are visible promptly.
        while let Ok(m) = rx.try_recv() {
            handle(m, &mut out);
        }
        let _ = out.flush();
        for ack in acks {
            let _ = ack.send(());
        }
        let d = dropped.load(Relaxed);
        if d != reported {
            tracing::warn!(
                dropped = d - reported,
                "access log writer fell behind; records dropped"
            );
            reported = d;
        }
    }
    let _ = out.flush();
}
