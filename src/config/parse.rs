//! TOML text → [`Config`], collecting every error with its position.
//!
//! The file is parsed into toml's spanned tree and walked by hand rather than through serde:
//! serde stops at the first error, and an operator fixing a config wants all of them at once,
//! each pointing at the exact key or value.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

use super::units::{parse_duration, parse_size};
use super::*;
use crate::destinations::{self, Destinations};

type Val<'i> = Spanned<DeValue<'i>>;

/// Parses and validates config text. `file` names it in errors; `base` is the folder that
/// relative paths in it are relative to.
pub fn parse_str(text: &str, file: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let mut cx = Cx {
        src: text,
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            cx.err(e.span().unwrap_or(0..0), e.message().trim().to_string());
        }
        return Err(cx.into_errors());
    }
    let cfg = build(&mut cx, root.get_ref(), root.span(), base);
    match cfg {
        Some(mut cfg) if cx.errors.is_empty() => {
            let warnings = std::mem::take(&mut cx.warnings);
            cfg.warnings = cx.located(warnings);
            Ok(cfg)
        }
        _ => Err(cx.into_errors()),
    }
}

/// Error collector; turns byte offsets into `line:col`.
struct Cx<'s> {
    src: &'s str,
    file: &'s str,
    errors: Vec<(usize, String)>,
    /// What is allowed but unwise (a private key every user can read).
    warnings: Vec<(usize, String)>,
}

impl Cx<'_> {
    fn err(&mut self, span: Range<usize>, msg: impl Into<String>) {
        self.errors.push((span.start, msg.into()));
    }

    fn warn(&mut self, span: Range<usize>, msg: impl Into<String>) {
        self.warnings.push((span.start, msg.into()));
    }

    /// Messages with their `file:line:col`.
    fn located(&self, mut msgs: Vec<(usize, String)>) -> Vec<ConfigError> {
        msgs.sort_by_key(|(pos, _)| *pos);
        msgs.dedup();
        msgs.into_iter()
            .map(|(pos, message)| {
                let (line, col) = line_col(self.src, pos);
                ConfigError {
                    file: self.file.to_string(),
                    line,
                    col,
                    message,
                }
            })
            .collect()
    }

    /// Warns if `path` (a secret: a key, a token, a password) can be read by every user.
    fn secret_file(&mut self, span: Range<usize>, path: &Path, what: &str) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o004 != 0
        {
            self.warn(
                span,
                format!(
                    "{what} {} can be read by every user: make it readable by ferry only (chmod 600, or 640 with ferry's group)",
                    path.display()
                ),
            );
        }
    }

    /// Reads a secret from `path`: its first line, without the line end; never empty.
    fn read_secret(&mut self, span: Range<usize>, path: &Path, what: &str) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let line = text.lines().next().unwrap_or("").to_string();
                if line.is_empty() {
                    self.err(span, format!("{what} {} is empty", path.display()));
                    return None;
                }
                self.secret_file(span, path, what);
                Some(line)
            }
            Err(e) => {
                self.err(span, format!("cannot read {what} {}: {e}", path.display()));
                None
            }
        }
    }

    fn into_errors(mut self) -> ConfigErrors {
        let errors = std::mem::take(&mut self.errors);
        ConfigErrors(self.located(errors))
    }
}

/// 1-based line and character column of byte offset `pos`.
fn line_col(src: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(src.len());
    let before = &src[..src.floor_char_boundary(pos)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A table being read: keys are taken one by one; whatever is left over at
/// [`Tab::finish`] is an unknown key.
struct Tab<'a, 'i> {
    /// How the table is named in messages, e.g. `[[listener]]`.
    what: String,
    span: Range<usize>,
    entries: Vec<(&'a str, Range<usize>, &'a Val<'i>, Cell<bool>)>,
}

impl<'a, 'i> Tab<'a, 'i> {
    fn new(what: impl Into<String>, t: &'a DeTable<'i>, span: Range<usize>) -> Self {
        Tab {
            what: what.into(),
            span,
            entries: t
                .iter()
                .map(|(k, v)| (k.get_ref().as_ref(), k.span(), v, Cell::new(false)))
                .collect(),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Val<'i>> {
        self.entries.iter().find(|e| e.0 == key).map(|e| {
            e.3.set(true);
            e.2
        })
    }

    /// Reports keys nobody took. `later` lists keys of the SPEC that this build does not
    /// implement yet: they get a clear "not supported yet" rather than "unknown key".
    fn finish(self, cx: &mut Cx<'_>, known: &[&str], later: &[&str]) {
        for (key, span, _, used) in &self.entries {
            if used.get() {
                continue;
            }
            if later.contains(key) {
                cx.err(
                    span.clone(),
                    format!("`{key}` in {} is not supported yet", self.what),
                );
            } else {
                cx.err(
                    span.clone(),
                    format!(
                        "unknown key `{key}` in {}; expected one of: {}",
                        self.what,
                        known.join(", ")
                    ),
                );
            }
        }
    }

    fn required(&self, cx: &mut Cx<'_>, key: &str) -> Option<&'a Val<'i>> {
        let v = self.get(key);
        if v.is_none() {
            cx.err(
                self.span.clone(),
                format!("{} is missing the required key `{key}`", self.what),
            );
        }
        v
    }

    fn string(&self, cx: &mut Cx<'_>, key: &str) -> Option<(&'a str, Range<usize>)> {
        let v = self.get(key)?;
        as_str(cx, key, v).map(|s| (s, v.span()))
    }

    fn bool(&self, cx: &mut Cx<'_>, key: &str) -> Option<bool> {
        let v = self.get(key)?;
        as_bool(cx, key, v)
    }

    /// An integer in `min..=max`.
    fn uint(&self, cx: &mut Cx<'_>, key: &str, min: u64, max: u64) -> Option<u64> {
        let v = self.get(key)?;
        as_uint(cx, key, v, min, max)
    }

    fn duration(&self, cx: &mut Cx<'_>, key: &str) -> Option<Duration> {
        let (s, span) = self.string(cx, key)?;
        match parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                cx.err(span, format!("`{key}`: {e}"));
                None
            }
        }
    }

    /// A duration that must not be zero.
    fn positive_duration(&self, cx: &mut Cx<'_>, key: &str) -> Option<Duration> {
        let d = self.duration(cx, key)?;
        if d.is_zero() {
            cx.err(
                self.get(key)?.span(),
                format!("`{key}` must be more than 0"),
            );
            return None;
        }
        Some(d)
    }

    /// A size: a string with a unit (`"64KiB"`), or an integer of bytes.
    fn size(&self, cx: &mut Cx<'_>, key: &str) -> Option<usize> {
        let v = self.get(key)?;
        if let DeValue::Integer(i) = v.get_ref() {
            let n = u64::from_str_radix(i.as_str(), i.radix())
                .ok()
                .and_then(|n| usize::try_from(n).ok());
            if n.is_none() {
                cx.err(
                    v.span(),
                    format!(
                        "`{key}` must be a number of bytes (0 or more) or a string like \"64KiB\""
                    ),
                );
            }
            return n;
        }
        let (s, span) = self.string(cx, key)?;
        match parse_size(s) {
            Ok(n) => Some(n),
            Err(e) => {
                cx.err(span, format!("`{key}`: {e}"));
                None
            }
        }
    }

    /// A size in `min..=max` bytes.
    fn size_in(&self, cx: &mut Cx<'_>, key: &str, min: usize, max: usize) -> Option<usize> {
        let n = self.size(cx, key)?;
        if !(min..=max).contains(&n) {
            cx.err(
                self.get(key)?.span(),
                format!(
                    "`{key}` must be from {} to {}, not {n} bytes",
                    show_size(min),
                    show_size(max)
                ),
            );
            return None;
        }
        Some(n)
    }

    fn table(&self, cx: &mut Cx<'_>, key: &str, what: &str) -> Option<Tab<'a, 'i>> {
        let v = self.get(key)?;
        as_table(cx, key, v, what)
    }
}

/// A size as the config would write it: in the largest binary unit that divides it.
fn show_size(n: usize) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

fn as_str<'a>(cx: &mut Cx<'_>, key: &str, v: &'a Val<'_>) -> Option<&'a str> {
    match v.get_ref() {
        DeValue::String(s) => Some(s.as_ref()),
        other => {
            cx.err(
                v.span(),
                format!("`{key}` must be a string, not {}", type_name(other)),
            );
            None
        }
    }
}

fn as_bool(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<bool> {
    match v.get_ref() {
        DeValue::Boolean(b) => Some(*b),
        other => {
            cx.err(
                v.span(),
                format!("`{key}` must be true or false, not {}", type_name(other)),
            );
            None
        }
    }
}

fn as_uint(cx: &mut Cx<'_>, key: &str, v: &Val<'_>, min: u64, max: u64) -> Option<u64> {
    match v.get_ref() {
        DeValue::Integer(i) => match u64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                cx.err(
                    v.span(),
                    format!("`{key}` must be an integer from {min} to {max}"),
                );
                None
            }
        },
        other => {
            cx.err(
                v.span(),
                format!("`{key}` must be an integer, not {}", type_name(other)),
            );
            None
        }
    }
}

fn as_table<'a, 'i>(cx: &mut Cx<'_>, key: &str, v: &'a Val<'i>, what: &str) -> Option<Tab<'a, 'i>> {
    match v.get_ref() {
        DeValue::Table(t) => Some(Tab::new(what, t, v.span())),
        other => {
            cx.err(
                v.span(),
                format!("`{key}` must be a table, not {}", type_name(other)),
            );
            None
        }
    }
}

/// `key = "x"` or `key = ["x", "y"]`, as a list of spanned strings.
fn str_list<'a>(cx: &mut Cx<'_>, key: &str, v: &'a Val<'_>) -> Vec<(&'a str, Range<usize>)> {
    match v.get_ref() {
        DeValue::String(s) => vec![(s.as_ref(), v.span())],
        DeValue::Array(items) => items
            .iter()
            .filter_map(|item| as_str(cx, key, item).map(|s| (s, item.span())))
            .collect(),
        other => {
            cx.err(
                v.span(),
                format!(
                    "`{key}` must be a string or an array of strings, not {}",
                    type_name(other)
                ),
            );
            Vec::new()
        }
    }
}

/// An array of tables (`[[listener]]`), or an error if the key holds something else.
fn table_array<'a, 'i>(cx: &mut Cx<'_>, key: &str, v: &'a Val<'i>) -> Option<&'a DeArray<'i>> {
    match v.get_ref() {
        DeValue::Array(a) => Some(a),
        other => {
            cx.err(
                v.span(),
                format!(
                    "`{key}` must be an array of tables (write `[[{key}]]`), not {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}

/// Parses `ip:port` (IPv6 as `[::1]:port`). Host names are refused with a hint.
pub(super) fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    match s.rsplit_once(':') {
        None => Err(format!(
            "bad address {s:?}: expected host:port, e.g. \"127.0.0.1:7000\""
        )),
        Some((host, port)) => {
            if port.parse::<u16>().is_err() {
                Err(format!(
                    "bad address {s:?}: port {port:?} is not a number from 0 to 65535"
                ))
            } else if host.contains(':') {
                Err(format!(
                    "bad address {s:?}: write IPv6 addresses in brackets, e.g. \"[::1]:{port}\""
                ))
            } else if host.chars().all(|c| c.is_ascii_digit() || c == '.') {
                Err(format!(
                    "bad address {s:?}: {host:?} is not a valid IPv4 address"
                ))
            } else {
                Err(format!("bad address {s:?}: {host:?} is not an IP address"))
            }
        }
    }
}

const ROOT_KEYS: &[&str] = &["global", "admin", "log", "listener", "upstream"];
const GLOBAL_KEYS: &[&str] = &[
    "max_connections",
    "drain_timeout",
    "workers",
    "splice",
    "pipe_size",
    "resolvers",
    "io_uring",
    "udp_kernel",
];
/// Bounds of `[global] pipe_size`: one page, and far more than a pipe needs to keep a
/// fast stream moving (root may grow pipes past `fs.pipe-max-size`).
const PIPE_SIZE_MIN: usize = 4 * 1024;
const PIPE_SIZE_MAX: usize = 64 * 1024 * 1024;
const LOG_KEYS: &[&str] = &["access", "format", "level", "on_connect", "interval"];
const LISTENER_KEYS: &[&str] = &[
    "name",
    "listen",
    "mode",
    "upstream",
    "idle_timeout",
    "max_connections",
    "reuse_port",
    "allow",
    "deny",
    "per_client",
    "proxy_protocol",
    "tcp",
    "handshake_timeout",
    "tls",
    "route",
    "destinations",
    "users",
    "udp",
    "sni_must_match",
    "transparent",
    "mark",
    "connect_timeout",
    "protocol",
    "responses",
    "requests",
    "max_sessions",
];
const USER_KEYS: &[&str] = &[
    "name",
    "password",
    "password_file",
    "password_hash",
    "destinations",
];
const LISTENER_LATER: &[&str] = &[];
const LISTENER_TCP_KEYS: &[&str] = &["send_buffer", "recv_buffer"];
const LISTEN_TLS_KEYS: &[&str] = &[
    "cert",
    "key",
    "certs",
    "client_ca",
    "client_auth",
    "alpn",
    "min_version",
];
const ROUTE_KEYS: &[&str] = &["sni", "alpn", "source", "port", "upstream"];
const UPSTREAM_TLS_KEYS: &[&str] = &["sni", "ca", "cert", "key", "verify", "alpn"];
const UPSTREAM_KEYS: &[&str] = &[
    "name",
    "balance",
    "hash_balance_factor",
    "servers",
    "resolve_interval",
    "connect_timeout",
    "retries",
    "max_connections_per_server",
    "queue",
    "sticky",
    "health",
    "tcp",
    "proxy_protocol",
    "tls",
];
const UPSTREAM_LATER: &[&str] = &[];
const SERVER_KEYS: &[&str] = &["addr", "weight", "backup"];
const HEALTH_KEYS: &[&str] = &[
    "active",
    "interval",
    "timeout",
    "rise",
    "fall",
    "send",
    "expect",
    "send_hex",
    "expect_hex",
    "port",
    "passive",
    "fail_open",
    "send_proxy",
];
const TCP_KEYS: &[&str] = &["nodelay", "keepalive", "send_buffer", "recv_buffer"];

fn build(cx: &mut Cx<'_>, root: &DeTable<'_>, span: Range<usize>, base: &Path) -> Option<Config> {
    let root = Tab::new("the config", root, span);

    let (global, resolvers) = match root.table(cx, "global", "[global]") {
        Some(t) => global(cx, t),
        None => (Global::default(), Vec::new()),
    };
    let log = match root.table(cx, "log", "[log]") {
        Some(t) => log(cx, t, base),
        None => LogConfig::default(),
    };

    // Upstreams first: listeners refer to them by name.
    let mut upstreams = Vec::new();
    // Every upstream name defined, with its index if the upstream itself is valid: a
    // listener naming an invalid upstream is not reported again.
    let mut upstream_names: HashMap<String, Option<usize>> = HashMap::new();
    let mut fits: Vec<Fit> = Vec::new();
    if let Some(v) = root.get("upstream")
        && let Some(items) = table_array(cx, "upstream", v)
    {
        for item in items.iter() {
            let Some(t) = as_table(cx, "upstream", item, "[[upstream]]") else {
                continue;
            };
            let (name, u, fit) = upstream(cx, t, base, &resolvers);
            let Some((name, name_span)) = name else {
                continue;
            };
            if upstream_names.contains_key(&name) {
                cx.err(name_span, format!("duplicate upstream name {name:?}"));
                continue;
            }
            let index = u.map(|u| {
                upstreams.push(u);
                fits.push(fit);
                upstreams.len() - 1
            });
            upstream_names.insert(name, index);
        }
    }

    let mut listeners: Vec<Listener> = Vec::new();
    let mut listener_names = std::collections::HashSet::new();
    // Addresses taken, by protocol (a TCP and a UDP listener may share one).
    let mut bound: HashMap<(Protocol, SocketAddr), String> = HashMap::new();
    let mut uses: Vec<Use> = Vec::new();
    match root.get("listener") {
        None => cx.err(
            0..0,
            "the config has no [[listener]]: there is nothing to serve",
        ),
        Some(v) => {
            if let Some(items) = table_array(cx, "listener", v) {
                for item in items.iter() {
                    let Some(t) = as_table(cx, "listener", item, "[[listener]]") else {
                        continue;
                    };
                    let (name, l) = listener(cx, t, &upstream_names, &mut bound, base, &mut uses);
                    let Some((name, name_span)) = name else {
                        continue;
                    };
                    if !listener_names.insert(name.clone()) {
                        cx.err(name_span, format!("duplicate listener name {name:?}"));
                        continue;
                    }
                    if let Some(l) = l {
                        listeners.push(l);
                    }
                }
            }
        }
    }
    protocols(cx, &mut upstreams, &fits, &uses);
    let admin = root
        .table(cx, "admin", "[admin]")
        .and_then(|t| admin(cx, t, base));
    root.finish(cx, ROOT_KEYS, &[]);
    Some(Config {
        global,
        admin,
        log,
        listeners,
        upstreams,
        warnings: Vec::new(),
    })
}

/// A listener's use of an upstream: which, over what, where it is named.
struct Use {
    upstream: usize,
    protocol: Protocol,
    listener: String,
    span: Range<usize>,
}

/// Gives each upstream the protocol of the listeners that use it, and reports what does
/// not fit it: an upstream is TCP or UDP, never both.
fn protocols(cx: &mut Cx<'_>, upstreams: &mut [Upstream], fits: &[Fit], uses: &[Use]) {
    for (i, u) in upstreams.iter_mut().enumerate() {
        let mut mine = uses.iter().filter(|x| x.upstream == i);
        let Some(first) = mine.next() else { continue };
        if let Some(other) = mine.find(|x| x.protocol != first.protocol) {
            let (udp, tcp) = if first.protocol == Protocol::Udp {
                (first, other)
            } else {
                (other, first)
            };
            cx.err(
                other.span.clone(),
                format!(
                    "upstream {:?} is used by UDP listener {:?} and TCP listener {:?}: an upstream is one or the other; give each its own",
                    u.name, udp.listener, tcp.listener
                ),
            );
            continue;
        }
        u.protocol = first.protocol;
        let problems = match u.protocol {
            Protocol::Udp => &fits[i].udp,
            Protocol::Tcp => &fits[i].tcp,
        };
        for (span, msg) in problems {
            let what = match u.protocol {
                Protocol::Udp => "UDP",
                Protocol::Tcp => "TCP",
            };
            cx.err(
                span.clone(),
                format!(
                    "{msg} (upstream {:?} serves {what} listener {:?})",
                    u.name, first.listener
                ),
            );
        }
    }
}

/// `[global]`, and its `resolvers` (which the upstreams carry).
fn global(cx: &mut Cx<'_>, t: Tab<'_, '_>) -> (Global, Vec<SocketAddr>) {
    let d = Global::default();
    let resolvers = resolvers(cx, &t);
    let g = Global {
        max_connections: t
            .uint(cx, "max_connections", 1, 10_000_000)
            .map_or(d.max_connections, |n| n as usize),
        drain_timeout: t.duration(cx, "drain_timeout").unwrap_or(d.drain_timeout),
        workers: t
            .uint(cx, "workers", 0, 1024)
            .map_or(d.workers, |n| n as usize),
        splice: t.bool(cx, "splice").unwrap_or(d.splice),
        pipe_size: t
            .size_in(cx, "pipe_size", PIPE_SIZE_MIN, PIPE_SIZE_MAX)
            .unwrap_or(d.pipe_size),
        io_uring: t.bool(cx, "io_uring").unwrap_or(d.io_uring),
        udp_kernel: t.bool(cx, "udp_kernel").unwrap_or(d.udp_kernel),
    };
    t.finish(cx, GLOBAL_KEYS, &[]);
    (g, resolvers)
}

/// Why a build without the `dns` feature refuses what needs it.
const NO_DNS_FEATURE: &str =
    "this build of ferry has no DNS resolver of its own (built without the `dns` feature)";

/// `[global] resolvers`: DNS servers as `IP` (port 53) or `IP:PORT`; empty when absent.
fn resolvers(cx: &mut Cx<'_>, t: &Tab<'_, '_>) -> Vec<SocketAddr> {
    let Some(v) = t.get("resolvers") else {
        return Vec::new();
    };
    if !cfg!(feature = "dns") {
        cx.err(
            v.span(),
            format!("`resolvers` cannot be used: {NO_DNS_FEATURE}"),
        );
        return Vec::new();
    }
    if matches!(v.get_ref(), DeValue::Array(a) if a.is_empty()) {
        cx.err(
            v.span(),
            "`resolvers` must list at least one DNS server (leave it out to use the system's)",
        );
    }
    let mut out: Vec<SocketAddr> = Vec::new();
    for (s, span) in str_list(cx, "resolvers", v) {
        match resolver_addr(s) {
            Ok(a) if out.contains(&a) => cx.err(span, format!("`resolvers`: {a} is listed twice")),
            Ok(a) => out.push(a),
            Err(e) => cx.err(span, format!("`resolvers`: {e}")),
        }
    }
    out
}

/// A DNS server: `IP` (port 53), `IP:PORT` or `[IPv6]:PORT`.
pub(super) fn resolver_addr(s: &str) -> Result<SocketAddr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    match socket_addr(s) {
        Ok(a) if a.port() == 0 => Err(format!("{a}: port 0 cannot be asked")),
        Ok(a) => Ok(a),
        Err(e) => Err(format!(
            "{e}; a DNS server is an IP address, with a port if not 53 (\"127.0.0.1:8600\")"
        )),
    }
}

fn log(cx: &mut Cx<'_>, t: Tab<'_, '_>, base: &Path) -> LogConfig {
    let d = LogConfig::default();
    let access = match t.string(cx, "access") {
        None => d.access,
        Some(("stdout", _)) => AccessTarget::Stdout,
        Some(("stderr", _)) => AccessTarget::Stderr,
        Some(("off", _)) => AccessTarget::Off,
        Some(("syslog", _)) => AccessTarget::Syslog(SyslogTarget::Local("/dev/log".into())),
        Some((s, span)) if s.starts_with("syslog:") => match syslog_target(s) {
            Ok(t) => AccessTarget::Syslog(t),
            Err(e) => {
                cx.err(span, e);
                d.access
            }
        },
        Some(("", span)) => {
            cx.err(
                span,
                "`access` must be \"stdout\", \"stderr\", \"off\", \"syslog\" (or \"syslog:…\") or a file path",
            );
            d.access
        }
        Some((path, _)) => AccessTarget::File(base.join(path)),
    };
    let format = match t.string(cx, "format") {
        None => d.format,
        Some(("json", _)) => LogFormat::Json,
        Some(("text", _)) => LogFormat::Text,
        Some((other, span)) => {
            cx.err(
                span,
                format!("`format` must be \"json\" or \"text\", not {other:?}"),
            );
            d.format
        }
    };
    let level = match t.string(cx, "level") {
        None => d.level,
        Some((s, span)) => match s.parse::<tracing::Level>() {
            Ok(l) => l,
            Err(_) => {
                cx.err(
                    span,
                    format!("`level` must be one of error, warn, info, debug, trace; not {s:?}"),
                );
                d.level
            }
        },
    };
    let on_connect = t.bool(cx, "on_connect").unwrap_or(false);
    let interval = t.positive_duration(cx, "interval");
    t.finish(cx, LOG_KEYS, &[]);
    LogConfig {
        access,
        format,
        level,
        on_connect,
        interval,
    }
}

/// `"syslog:udp://HOST:PORT"` (an IP address or a name) or `"syslog:unix:PATH"`.
fn syslog_target(s: &str) -> Result<SyslogTarget, String> {
    if let Some(addr) = s.strip_prefix("syslog:udp://") {
        if let Some((host, port)) = name_port(addr) {
            return Ok(SyslogTarget::Udp {
                host: host.to_string(),
                port,
            });
        }
        return socket_addr(addr)
            .map(|a| SyslogTarget::Udp {
                host: a.ip().to_string(),
                port: a.port(),
            })
            .map_err(|e| format!("`access` {s:?}: {e} (or a name: \"logs.example.net:514\")"));
    }
    if let Some(path) = s.strip_prefix("syslog:unix:")
        && path.starts_with('/')
    {
        return Ok(SyslogTarget::Local(path.into()));
    }
    Err(format!(
        "`access` {s:?}: a syslog target is \"syslog\", \"syslog:udp://HOST:PORT\" or \"syslog:unix:/PATH\""
    ))
}

/// A listener or upstream: its name and where it is (if it has one), and the object if it
/// is valid. The name counts (for duplicates and references) even when the rest is wrong.
type Named<T> = (Option<(String, Range<usize>)>, Option<T>);

/// The required, non-empty `name` of a table: as a string, and with its position.
fn name_of<'a>(
    cx: &mut Cx<'_>,
    t: &Tab<'a, '_>,
) -> (Option<&'a str>, Option<(String, Range<usize>)>) {
    let name_v = t.required(cx, "name");
    let name = name_v.and_then(|v| as_str(cx, "name", v));
    if let (Some(""), Some(v)) = (name, name_v) {
        cx.err(v.span(), "`name` must not be empty");
    }
    let named = name
        .filter(|n| !n.is_empty())
        .zip(name_v)
        .map(|(n, v)| (n.to_string(), v.span()));
    (name, named)
}

fn listener(
    cx: &mut Cx<'_>,
    t: Tab<'_, '_>,
    upstreams: &HashMap<String, Option<usize>>,
    bound: &mut HashMap<(Protocol, SocketAddr), String>,
    base: &Path,
    uses: &mut Vec<Use>,
) -> Named<Listener> {
    let (name, named) = name_of(cx, &t);
    let who = name.unwrap_or("?").to_string();
    let udp_listener = match t.string(cx, "protocol") {
        None | Some(("tcp", _)) => false,
        Some(("udp", _)) => true,
        Some((other, span)) => {
            cx.err(
                span,
                format!("`protocol` must be \"tcp\" or \"udp\", not {other:?}"),
            );
            false
        }
    };
    if udp_listener {
        // What only TCP listeners have: said once, here, with what to use instead.
        for (key, instead) in [
            ("mode", "a UDP listener relays datagrams to its `upstream`"),
            ("tls", "datagrams are relayed as they are"),
            (
                "route",
                "a UDP listener sends every session to its `upstream`",
            ),
            ("handshake_timeout", "UDP has no handshake"),
            ("proxy_protocol", "clients' datagrams carry no PROXY header"),
            ("tcp", "a UDP listener's sockets are not TCP"),
            ("max_connections", "use `max_sessions`"),
            (
                "destinations",
                "a UDP listener sends every session to its `upstream`",
            ),
            ("users", "a UDP listener has no authentication"),
            ("udp", "it applies to mode \"socks5\""),
            ("sni_must_match", "it applies to mode \"http-connect\""),
            ("transparent", "it applies to mode \"transparent\""),
            ("mark", "it applies to the forward-proxy modes"),
            ("connect_timeout", "a UDP session has no connect"),
        ] {
            if let Some(v) = t.get(key) {
                cx.err(
                    v.span(),
                    format!(
                        "`{key}` does not apply to a UDP listener (protocol = \"udp\"): {instead}"
                    ),
                );
            }
        }
    } else {
        for key in ["responses", "requests", "max_sessions"] {
            if let Some(v) = t.get(key) {
                cx.err(
                    v.span(),
                    format!("`{key}` applies to UDP listeners (protocol = \"udp\")"),
                );
            }
        }
    }

    let mut listen = Vec::new();
    if let Some(v) = t.required(cx, "listen") {
        let items = str_list(cx, "listen", v);
        if items.is_empty() && matches!(v.get_ref(), DeValue::Array(_)) {
            cx.err(v.span(), "`listen` must name at least one address");
        }
        for (s, span) in items {
            match socket_addr(s) {
                Ok(a) => {
                    // Port 0 (an ephemeral port) never clashes.
                    if a.port() != 0 {
                        let proto = if udp_listener {
                            Protocol::Udp
                        } else {
                            Protocol::Tcp
                        };
                        if let Some(other) = bound.get(&(proto, a)) {
                            cx.err(
                                span,
                                format!("address {a} is already used by listener {other:?}"),
                            );
                            continue;
                        }
                        bound.insert((proto, a), who.clone());
                    }
                    if listen.contains(&a) {
                        cx.err(span, format!("address {a} is listed twice"));
                        continue;
                    }
                    listen.push(a);
                }
                Err(e) => cx.err(span, format!("`listen`: {e}")),
            }
        }
    }

    let tls_v = t.get("tls").filter(|_| !udp_listener);
    let mode_v = if udp_listener {
        None
    } else {
        t.string(cx, "mode")
    };
    let mode_name = if udp_listener {
        "udp"
    } else {
        mode_v.as_ref().map_or("tcp", |m| m.0)
    };
    let forward_mode = matches!(mode_name, "socks5" | "http-connect" | "transparent");
    // The forward-proxy keys, each read whatever the mode (so that it is reported where it
    // does not apply rather than as unknown).
    let only_for = |cx: &mut Cx<'_>, key: &str, modes: &[&str]| -> Option<&Val<'_>> {
        let v = t.get(key)?;
        if modes.contains(&mode_name) {
            return Some(v);
        }
        if udp_listener {
            // Reported above.
            return None;
        }
        let list = modes
            .iter()
            .map(|m| format!("{m:?}"))
            .collect::<Vec<_>>()
            .join(" or ");
        cx.err(
            v.span(),
            format!("`{key}` applies to mode {list}, not to mode {mode_name:?}"),
        );
        None
    };
    const FWD: &[&str] = &["socks5", "http-connect", "transparent"];
    let destinations_v = only_for(cx, "destinations", FWD);
    let destinations = destinations_v.and_then(|v| destinations(cx, "destinations", v));
    let users = only_for(cx, "users", &["socks5", "http-connect"])
        .map(|v| users(cx, v, base))
        .unwrap_or_default();
    let udp = only_for(cx, "udp", &["socks5"]).and_then(|v| as_bool(cx, "udp", v));
    let sni_must_match = only_for(cx, "sni_must_match", &["http-connect"])
        .and_then(|v| as_bool(cx, "sni_must_match", v));
    let interception = only_for(cx, "transparent", &["transparent"]).and_then(|v| {
        match as_str(cx, "transparent", v)? {
            "redirect" => Some(Interception::Redirect),
            "tproxy" => Some(Interception::Tproxy),
            other => {
                cx.err(
                    v.span(),
                    format!("`transparent` must be \"redirect\" or \"tproxy\", not {other:?}"),
                );
                None
            }
        }
    });
    let mut dial = Dial::default();
    if only_for(cx, "mark", FWD).is_some() {
        dial.mark = t.uint(cx, "mark", 1, u32::MAX as u64).map(|n| n as u32);
    }
    if only_for(cx, "connect_timeout", FWD).is_some()
        && let Some(d) = t.positive_duration(cx, "connect_timeout")
    {
        dial.connect_timeout = d;
    }
    // A forward listener without `destinations` would be an open proxy.
    let open_proxy = |cx: &mut Cx<'_>, span: Range<usize>| {
        cx.err(
            span,
            format!(
                "listener {who:?} would be an open proxy: mode {mode_name:?} needs `destinations` (e.g. destinations = [\"10.0.0.0/8:443\", \"*.example.com:443\"]); nothing is reachable otherwise"
            ),
        );
    };
    let mode_span = mode_v.map_or(t.span.clone(), |m| m.1);
    if forward_mode && let Some(v) = tls_v {
        cx.err(
            v.span(),
            format!("`tls` does not apply to mode {mode_name:?}"),
        );
    }
    let forward = |cx: &mut Cx<'_>, destinations: Option<Destinations>| -> Option<Forward> {
        if destinations_v.is_none() {
            open_proxy(cx, mode_span.clone());
        }
        Some(Forward {
            destinations: destinations?,
            users: users.clone(),
            dial,
        })
    };
    let mode = match mode_name {
        "tcp" => {
            if let Some(v) = tls_v {
                cx.err(
                    v.span(),
                    "`tls` applies to mode = \"tls\" (TLS terminated here); with mode \"tcp\" TLS passes through, and routes can still match its SNI",
                );
            }
            Some(ListenerMode::Tcp)
        }
        "tls" => match tls_v {
            None => {
                cx.err(
                    mode_span.clone(),
                    "mode \"tls\" needs `tls` with at least a certificate: tls = { cert = \"…\", key = \"…\" }",
                );
                None
            }
            Some(v) => as_table(cx, "tls", v, "`tls`")
                .and_then(|tt| listen_tls(cx, tt, base))
                .map(|t| ListenerMode::Tls(Box::new(t))),
        },
        "socks5" => forward(cx, destinations.clone()).map(|forward| {
            ListenerMode::Socks5(Box::new(Socks5Listen {
                forward,
                udp: udp.unwrap_or(false),
            }))
        }),
        "http-connect" => forward(cx, destinations.clone()).map(|forward| {
            ListenerMode::HttpConnect(Box::new(HttpConnectListen {
                forward,
                sni_must_match: sni_must_match.unwrap_or(false),
            }))
        }),
        "transparent" => {
            // Checked below, once `upstream` is known: without it, `destinations` is required.
            Some(ListenerMode::Transparent(Box::new(TransparentListen {
                interception: interception.unwrap_or(Interception::Redirect),
                destinations: destinations.clone(),
                dial,
            })))
        }
        "udp" => {
            let count = |cx: &mut Cx<'_>, key: &str| {
                t.uint(cx, key, 1, u64::from(u32::MAX)).map(|n| n as u32)
            };
            Some(ListenerMode::Udp(Box::new(UdpListen {
                responses: count(cx, "responses"),
                requests: count(cx, "requests"),
            })))
        }
        other => {
            cx.err(
                mode_span.clone(),
                format!(
                    "`mode` must be one of \"tcp\", \"tls\", \"socks5\", \"http-connect\", \"transparent\"; not {other:?}"
                ),
            );
            None
        }
    };

    let upstream_ref = |cx: &mut Cx<'_>, v: &Val<'_>| -> Option<usize> {
        let u = as_str(cx, "upstream", v)?;
        match upstreams.get(u) {
            Some(i) => *i,
            None => {
                cx.err(
                    v.span(),
                    format!("listener {who:?} names upstream {u:?}, which is not defined"),
                );
                None
            }
        }
    };
    // `Some(None)`: given but invalid (already reported).
    let upstream = t.get("upstream").map(|v| upstream_ref(cx, v));
    let protocol = if udp_listener {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    if let (Some(Some(u)), Some(v)) = (upstream, t.get("upstream")) {
        uses.push(Use {
            upstream: u,
            protocol,
            listener: who.clone(),
            span: v.span(),
        });
    }
    let mut routes = Vec::new();
    let mut routes_ok = true;
    if let Some(v) = t.get("route").filter(|_| !udp_listener)
        && let Some(items) = table_array(cx, "route", v)
    {
        for item in items.iter() {
            let Some(rt) = as_table(cx, "route", item, "[[listener.route]]") else {
                routes_ok = false;
                continue;
            };
            match route(cx, rt, item.span(), &upstream_ref) {
                Some(r) => {
                    uses.push(Use {
                        upstream: r.upstream,
                        protocol,
                        listener: who.clone(),
                        span: item.span(),
                    });
                    routes.push(r)
                }
                None => routes_ok = false,
            }
        }
    }
    match mode_name {
        "socks5" | "http-connect" => {
            for key in ["upstream", "route"] {
                if let Some(v) = t.get(key) {
                    cx.err(
                        v.span(),
                        format!(
                            "`{key}` does not apply to mode {mode_name:?}: its clients name their destinations, which `destinations` restricts"
                        ),
                    );
                }
            }
        }
        "transparent" => {
            if let Some(v) = t.get("route") {
                cx.err(
                    v.span(),
                    "`route` does not apply to mode \"transparent\": connections go to their original destination, or to the listener's `upstream`",
                );
            }
            if upstream.is_none() && destinations_v.is_none() {
                open_proxy(cx, mode_span.clone());
            }
        }
        "udp" => {
            if upstream.is_none() {
                cx.err(
                    t.span.clone(),
                    format!(
                        "UDP listener {who:?} has nowhere to send datagrams: give it `upstream`"
                    ),
                );
            }
        }
        _ => {
            if upstream.is_none() && routes.is_empty() && routes_ok {
                cx.err(
                    t.span.clone(),
                    format!(
                        "listener {who:?} has nowhere to send connections: give it `upstream` (and, if you like, [[listener.route]] entries)"
                    ),
                );
            }
        }
    }
    let handshake_timeout = t
        .positive_duration(cx, "handshake_timeout")
        .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
    let idle_timeout = t
        .positive_duration(cx, "idle_timeout")
        .unwrap_or(if udp_listener {
            DEFAULT_UDP_IDLE_TIMEOUT
        } else {
            DEFAULT_IDLE_TIMEOUT
        });
    // A UDP listener's sessions are its connections.
    let max_connections = t
        .uint(
            cx,
            if udp_listener {
                "max_sessions"
            } else {
                "max_connections"
            },
            1,
            10_000_000,
        )
        .map(|n| n as usize);
    let reuse_port = t.bool(cx, "reuse_port").unwrap_or(true);
    let allow = t.get("allow").map(|v| cidr_list(cx, "allow", v));
    let deny = t
        .get("deny")
        .map(|v| cidr_list(cx, "deny", v))
        .unwrap_or_default();
    let per_client = t
        .table(cx, "per_client", "`per_client`")
        .map(|p| per_client(cx, p, udp_listener));
    let proxy_protocol = if udp_listener {
        None
    } else {
        t.table(cx, "proxy_protocol", "`proxy_protocol`")
            .and_then(|p| proxy_accept(cx, p))
    };
    let buffers = match t.table(cx, "tcp", "`tcp`").filter(|_| !udp_listener) {
        Some(tt) => {
            let b = socket_buffers(cx, &tt);
            tt.finish(cx, LISTENER_TCP_KEYS, &[]);
            b
        }
        None => SocketBuffers::default(),
    };
    t.finish(cx, LISTENER_KEYS, LISTENER_LATER);

    let l = (|| {
        if !routes_ok {
            return None;
        }
        Some(Listener {
            name: name?.to_string(),
            listen,
            mode: mode?,
            upstream: match upstream {
                None => None,
                Some(u) => Some(u?),
            },
            routes,
            handshake_timeout,
            idle_timeout,
            max_connections,
            reuse_port,
            allow,
            deny,
            per_client,
            proxy_protocol,
            buffers,
        })
    })();
    (named, l)
}

/// One `[[listener.route]]`.
fn route(
    cx: &mut Cx<'_>,
    t: Tab<'_, '_>,
    span: Range<usize>,
    upstream_ref: &dyn Fn(&mut Cx<'_>, &Val<'_>) -> Option<usize>,
) -> Option<Route> {
    // An empty list would never match (and `sni = []` would still make a tcp listener
    // wait for a ClientHello): refused.
    for key in ["sni", "alpn", "source", "port"] {
        if let Some(v) = t.get(key)
            && matches!(v.get_ref(), DeValue::Array(a) if a.is_empty())
        {
            cx.err(
                v.span(),
                format!(
                    "`{key}` is empty: a route's `{key}` needs at least one value (or leave it out)"
                ),
            );
        }
    }
    let sni = t.get("sni").map(|v| {
        str_list(cx, "sni", v)
            .into_iter()
            .filter_map(|(s, span)| match NamePattern::parse(s) {
                Ok(p) => Some(p),
                Err(e) => {
                    cx.err(span, format!("`sni`: {e}"));
                    None
                }
            })
            .collect::<Vec<_>>()
    });
    let alpn = t.get("alpn").map(|v| alpn_list(cx, "alpn", v));
    let source = t.get("source").map(|v| cidr_list(cx, "source", v));
    let port = t.get("port").map(|v| port_list(cx, v));
    let upstream = t.required(cx, "upstream").map(|v| upstream_ref(cx, v));
    if sni.is_none() && alpn.is_none() && source.is_none() && port.is_none() {
        cx.err(
            span,
            "a route needs at least one matcher: `sni`, `alpn`, `source` or `port` (the listener's `upstream` is the route for everything else)",
        );
    }
    t.finish(cx, ROUTE_KEYS, &[]);
    Some(Route {
        sni,
        alpn,
        source,
        port,
        upstream: upstream??,
    })
}

/// `port = 443` or `port = [443, 8443]`.
fn port_list(cx: &mut Cx<'_>, v: &Val<'_>) -> Vec<u16> {
    match v.get_ref() {
        DeValue::Array(items) => items
            .iter()
            .filter_map(|i| as_uint(cx, "port", i, 1, 65535).map(|n| n as u16))
            .collect(),
        _ => as_uint(cx, "port", v, 1, 65535)
            .map(|n| vec![n as u16])
            .unwrap_or_default(),
    }
}

/// ALPN protocol names: 1 to 255 bytes each.
fn alpn_list(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for (s, span) in str_list(cx, key, v) {
        if s.is_empty() || s.len() > 255 {
            cx.err(span, format!("`{key}`: a protocol name is 1 to 255 bytes"));
        } else {
            out.push(s.to_string());
        }
    }
    out
}

/// A path as written in the config: relative to the config file's folder.
fn path_in(base: &Path, s: &str) -> PathBuf {
    let p = Path::new(s);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// `cert` and `key` of one table: both required when either is given; loaded and checked.
fn cert_files(cx: &mut Cx<'_>, t: &Tab<'_, '_>, base: &Path) -> Option<CertFiles> {
    let cert = t.string(cx, "cert");
    let key = t.string(cx, "key");
    let ((cert, cert_span), (key, key_span)) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => return None,
        (Some(_), None) => {
            cx.err(
                t.span.clone(),
                format!("{} has `cert` but no `key`", t.what),
            );
            return None;
        }
        (None, Some(_)) => {
            cx.err(
                t.span.clone(),
                format!("{} has `key` but no `cert`", t.what),
            );
            return None;
        }
    };
    let (cert, key) = (path_in(base, cert), path_in(base, key));
    match crate::tls::certs::load_cert_key(&cert, &key) {
        Ok(loaded) => {
            cx.secret_file(key_span, &key, "the private key");
            Some(CertFiles { cert, key, loaded })
        }
        Err(crate::tls::certs::KeyError::Cert(e)) => {
            cx.err(cert_span, format!("`cert`: {e}"));
            None
        }
        Err(crate::tls::certs::KeyError::Key(e)) => {
            cx.err(key_span, format!("`key`: {e}"));
            None
        }
    }
}

/// A CA bundle file.
fn ca_file(
    cx: &mut Cx<'_>,
    t: &Tab<'_, '_>,
    key: &str,
    base: &Path,
) -> Option<(PathBuf, Vec<rustls::pki_types::CertificateDer<'static>>)> {
    let (s, span) = t.string(cx, key)?;
    let path = path_in(base, s);
    match crate::tls::certs::load_certs(&path) {
        Ok(c) => Some((path, c)),
        Err(e) => {
            cx.err(span, format!("`{key}`: {e}"));
            None
        }
    }
}

/// `tls` of a `mode = "tls"` listener.
fn listen_tls(cx: &mut Cx<'_>, t: Tab<'_, '_>, base: &Path) -> Option<TlsListen> {
    // Given but failed to load (already reported), or not given at all.
    let top_given = t.get("cert").is_some() || t.get("key").is_some();
    let top = cert_files(cx, &t, base);
    let mut certs = Vec::new();
    let mut certs_ok = true;
    if let Some(v) = t.get("certs")
        && let Some(items) = table_array(cx, "certs", v)
    {
        for item in items.iter() {
            let Some(ct) = as_table(cx, "certs", item, "[[listener.tls.certs]]") else {
                certs_ok = false;
                continue;
            };
            let name = ct.required(cx, "name").and_then(|v| {
                let s = as_str(cx, "name", v)?;
                match NamePattern::parse(s) {
                    Ok(p) => Some((p, v.span())),
                    Err(e) => {
                        cx.err(v.span(), format!("`name`: {e}"));
                        None
                    }
                }
            });
            let files = cert_files(cx, &ct, base);
            if files.is_none() && ct.get("cert").is_none() && ct.get("key").is_none() {
                cx.err(
                    ct.span.clone(),
                    "[[listener.tls.certs]] needs `cert` and `key`",
                );
            }
            ct.finish(cx, &["name", "cert", "key"], &[]);
            match (name, files) {
                (Some((name, span)), Some(files)) => {
                    if !crate::tls::certs::covers(&files.loaded, &name.to_string()) {
                        cx.err(
                            span,
                            format!(
                                "the certificate in {} is not valid for {name} (it is for: {})",
                                files.cert.display(),
                                files.loaded.info.names.join(", ")
                            ),
                        );
                        certs_ok = false;
                    } else if certs.iter().any(|(n, _)| *n == name) {
                        cx.err(span, format!("a certificate for {name} is listed twice"));
                        certs_ok = false;
                    } else {
                        certs.push((name, files));
                    }
                }
                _ => certs_ok = false,
            }
        }
    }
    let client_auth_mode = match t.string(cx, "client_auth") {
        None => None,
        Some(("required", _)) => Some((true, None)),
        Some(("optional", span)) => Some((false, Some(span))),
        Some((other, span)) => {
            cx.err(
                span,
                format!("`client_auth` must be \"required\" or \"optional\", not {other:?}"),
            );
            None
        }
    };
    let client_auth = match (ca_file(cx, &t, "client_ca", base), client_auth_mode) {
        (Some((ca, roots)), mode) => Some(ClientAuth {
            ca,
            roots,
            required: mode.is_none_or(|(r, _)| r),
        }),
        (None, Some((_, span))) if t.get("client_ca").is_none() => {
            let span = span.unwrap_or_else(|| t.get("client_auth").map_or(0..0, |v| v.span()));
            cx.err(
                span,
                "`client_auth` needs `client_ca`: the CA that signs client certificates",
            );
            None
        }
        (None, _) => None,
    };
    let alpn = t
        .get("alpn")
        .map(|v| alpn_list(cx, "alpn", v))
        .unwrap_or_default();
    let min_version = match t.string(cx, "min_version") {
        None | Some(("1.2", _)) => Some(TlsVersion::V1_2),
        Some(("1.3", _)) => Some(TlsVersion::V1_3),
        Some((other, span)) => {
            cx.err(
                span,
                format!("`min_version` must be \"1.2\" or \"1.3\", not {other:?}"),
            );
            None
        }
    };
    let whole = t.span.clone();
    t.finish(cx, LISTEN_TLS_KEYS, &[]);
    if !certs_ok {
        return None;
    }
    let default_cert = match top {
        Some(c) => c,
        None if top_given => return None,
        None if !certs.is_empty() => certs[0].1.clone(),
        None => {
            cx.err(
                whole,
                "`tls` needs a certificate: `cert` and `key`, or [[listener.tls.certs]] entries",
            );
            return None;
        }
    };
    Some(TlsListen {
        default_cert,
        certs,
        client_auth,
        alpn,
        min_version: min_version?,
    })
}

/// `tls` of an upstream.
fn upstream_tls(cx: &mut Cx<'_>, t: Tab<'_, '_>, base: &Path) -> Option<UpstreamTls> {
    let sni = t.string(cx, "sni").and_then(|(s, span)| {
        if rustls::pki_types::ServerName::try_from(s).is_ok() && !s.is_empty() {
            Some(s.trim_end_matches('.').to_ascii_lowercase())
        } else {
            cx.err(span, format!("`sni`: {s:?} is not a host name"));
            None
        }
    });
    let ca = ca_file(cx, &t, "ca", base);
    let client_cert = cert_files(cx, &t, base);
    let verify = t.bool(cx, "verify").unwrap_or(true);
    if !verify && ca.is_some() {
        let span = t.get("verify").map_or(0..0, |v| v.span());
        cx.err(
            span,
            "`verify = false` and `ca` contradict each other: drop one",
        );
    }
    let alpn = t
        .get("alpn")
        .map(|v| alpn_list(cx, "alpn", v))
        .unwrap_or_default();
    t.finish(cx, UPSTREAM_TLS_KEYS, &[]);
    Some(UpstreamTls {
        sni,
        ca,
        client_cert,
        verify,
        alpn,
    })
}

fn upstream(
    cx: &mut Cx<'_>,
    t: Tab<'_, '_>,
    base: &Path,
    resolvers: &[SocketAddr],
) -> NamedUpstream {
    let (name, named) = name_of(cx, &t);
    let factor = t
        .uint(cx, "hash_balance_factor", 101, 10_000)
        .map(|n| n as u32);
    let balance = match t.string(cx, "balance").map(|(s, span)| (s.parse(), span)) {
        None => Some(Balance::RoundRobin),
        Some((Ok(Balance::RingHash { .. }), _)) => Some(Balance::RingHash {
            balance_factor: factor,
        }),
        Some((Ok(b), _)) => Some(b),
        Some((Err(e), span)) => {
            cx.err(span, format!("`balance` {e}"));
            None
        }
    };
    if factor.is_some() && !matches!(balance, Some(Balance::RingHash { .. }) | None) {
        let span = t
            .get("hash_balance_factor")
            .map(|v| v.span())
            .unwrap_or(0..0);
        cx.err(
            span,
            "`hash_balance_factor` applies only to balance = \"ring_hash\"",
        );
    }

    let mut servers: Vec<ServerSpec> = Vec::new();
    if let Some(v) = t.required(cx, "servers") {
        match v.get_ref() {
            DeValue::Array(items) => {
                if items.is_empty() {
                    cx.err(v.span(), "`servers` must list at least one server");
                }
                for item in items.iter() {
                    if let Some(s) = server(cx, item) {
                        if servers.iter().any(|o| o.addr == s.addr) {
                            cx.err(item.span(), format!("server {} is listed twice", s.addr));
                            continue;
                        }
                        servers.push(s);
                    }
                }
                if !servers.is_empty() && servers.iter().all(|s| s.backup) {
                    cx.err(
                        v.span(),
                        "every server is a backup: at least one must be a primary",
                    );
                }
            }
            other => cx.err(
                v.span(),
                format!("`servers` must be an array, not {}", type_name(other)),
            ),
        }
    }
    let resolve_interval = t
        .positive_duration(cx, "resolve_interval")
        .unwrap_or(DEFAULT_RESOLVE_INTERVAL);
    let connect_timeout = t
        .positive_duration(cx, "connect_timeout")
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    let retries = t
        .uint(cx, "retries", 0, 100)
        .map_or(DEFAULT_RETRIES, |n| n as u32);
    let max_connections_per_server = t
        .uint(cx, "max_connections_per_server", 1, 10_000_000)
        .map(|n| n as usize);
    let queue = t.table(cx, "queue", "`queue`").and_then(|q| {
        let size = q
            .required(cx, "size")
            .and_then(|v| as_uint(cx, "size", v, 1, 10_000_000));
        let timeout = q
            .required(cx, "timeout")
            .and(q.positive_duration(cx, "timeout"));
        q.finish(cx, &["size", "timeout"], &[]);
        Some(QueueConfig {
            size: size? as usize,
            timeout: timeout?,
        })
    });
    if queue.is_some() && max_connections_per_server.is_none() {
        let span = t.get("queue").map(|v| v.span()).unwrap_or(0..0);
        cx.err(
            span,
            "`queue` needs `max_connections_per_server`: without a per-server limit nothing ever waits",
        );
    }
    let sticky = t.table(cx, "sticky", "`sticky`").and_then(|st| {
        let ttl = st.required(cx, "ttl").and(st.positive_duration(cx, "ttl"));
        let max_entries = st
            .uint(cx, "max_entries", 1, 100_000_000)
            .map_or(DEFAULT_STICKY_ENTRIES, |n| n as usize);
        st.finish(cx, &["ttl", "max_entries"], &[]);
        Some(StickyConfig {
            ttl: ttl?,
            max_entries,
        })
    });
    let health = t
        .table(cx, "health", "[upstream.health]")
        .and_then(|h| health(cx, h));
    let tcp = t
        .table(cx, "tcp", "`tcp`")
        .map(|tt| tcp_options(cx, tt))
        .unwrap_or_default();
    // `proxy_protocol = "v2"`, or `{ send = "v2", every = true }` (UDP: on every datagram).
    let mut proxy_every_datagram = false;
    let version = |cx: &mut Cx<'_>, key: &str, v: &str, span: Range<usize>| match v {
        "v1" => Some(crate::wire::proxy::Version::V1),
        "v2" => Some(crate::wire::proxy::Version::V2),
        other => {
            cx.err(
                span,
                format!("`{key}` must be \"v1\" or \"v2\", not {other:?}"),
            );
            None
        }
    };
    let mut fit = Fit::default();
    let proxy_protocol = match t.get("proxy_protocol").map(|v| v.get_ref()) {
        None => None,
        Some(DeValue::Table(_)) => t
            .table(cx, "proxy_protocol", "`proxy_protocol`")
            .and_then(|p| {
                let v = p
                    .required(cx, "send")
                    .and_then(|_| p.string(cx, "send"))
                    .and_then(|(v, span)| version(cx, "send", v, span));
                proxy_every_datagram = p.bool(cx, "every").unwrap_or(false);
                if proxy_every_datagram && let Some(e) = p.get("every") {
                    fit.tcp.push((
                        e.span(),
                        "`every` (a PROXY header on every datagram) applies to upstreams of UDP listeners".into(),
                    ));
                }
                p.finish(cx, &["send", "every"], &[]);
                v
            }),
        Some(_) => t
            .string(cx, "proxy_protocol")
            .and_then(|(v, span)| version(cx, "proxy_protocol", v, span)),
    };
    if proxy_protocol == Some(crate::wire::proxy::Version::V1)
        && let Some(v) = t.get("proxy_protocol")
    {
        fit.udp
            .push((v.span(), "PROXY protocol v1 has no UDP: use \"v2\"".into()));
    }
    for (key, why) in [
        ("tls", "datagrams are relayed as they are"),
        ("queue", "a datagram does not wait for a server"),
        ("tcp", "its servers are reached over UDP"),
        (
            "retries",
            "a session's server is not connected to, so there is nothing to retry",
        ),
        ("connect_timeout", "a session's server is not connected to"),
    ] {
        if let Some(v) = t.get(key) {
            fit.udp.push((
                v.span(),
                format!("`{key}` does not apply to a UDP upstream: {why}"),
            ));
        }
    }
    if let Some(h) = &health
        && let Some(v) = t.get("health")
    {
        if h.active && h.send.is_none() && h.port.is_none() {
            fit.udp.push((
                v.span(),
                "a UDP upstream's health check needs `send` (or `send_hex`: a datagram whose reply is awaited) or `port` (a TCP port to connect to); or `active = false`".into(),
            ));
        }
        if h.send_proxy {
            fit.udp.push((
                v.span(),
                "`send_proxy` does not apply to a UDP upstream's health checks".into(),
            ));
        }
    }
    if health.as_ref().is_some_and(|h| h.send_proxy) && proxy_protocol.is_none() {
        let span = t.get("health").map(|v| v.span()).unwrap_or(0..0);
        cx.err(
            span,
            "`send_proxy` in [upstream.health] needs the upstream's `proxy_protocol`",
        );
    }
    let tls = t
        .table(cx, "tls", "`tls`")
        .and_then(|tt| upstream_tls(cx, tt, base));
    t.finish(cx, UPSTREAM_KEYS, UPSTREAM_LATER);

    let u = (|| {
        Some(Upstream {
            name: name?.to_string(),
            balance: balance?,
            servers,
            resolve_interval,
            resolvers: resolvers.to_vec(),
            connect_timeout,
            retries,
            max_connections_per_server,
            queue,
            sticky,
            health,
            tcp,
            proxy_protocol,
            proxy_every_datagram,
            tls,
            protocol: Protocol::Tcp,
        })
    })();
    (named, u, fit)
}

/// An upstream as [`Named`] says, and what would not fit it.
type NamedUpstream = (Option<(String, Range<usize>)>, Option<Upstream>, Fit);

/// What would be wrong with an upstream if it served UDP listeners, or TCP ones: reported
/// once the listeners that use it are known.
#[derive(Default)]
struct Fit {
    udp: Vec<(Range<usize>, String)>,
    tcp: Vec<(Range<usize>, String)>,
}

fn health(cx: &mut Cx<'_>, h: Tab<'_, '_>) -> Option<HealthConfig> {
    let interval = h
        .positive_duration(cx, "interval")
        .unwrap_or(Duration::from_secs(2));
    let timeout = h
        .positive_duration(cx, "timeout")
        .unwrap_or(Duration::from_secs(1));
    let rise = h.uint(cx, "rise", 1, 1000).unwrap_or(2) as u32;
    let fall = h.uint(cx, "fall", 1, 1000).unwrap_or(3) as u32;
    // Text, or bytes in hex (`send_hex`, `expect_hex`: a DNS query, a binary protocol).
    let bytes = |cx: &mut Cx<'_>, key: &str| -> Option<Vec<u8>> {
        let hex_key = format!("{key}_hex");
        let text = h
            .string(cx, key)
            .map(|(s, span)| (s.as_bytes().to_vec(), span));
        let hex = h
            .string(cx, &hex_key)
            .and_then(|(s, span)| match parse_hex(s) {
                Ok(b) => Some((b, span)),
                Err(e) => {
                    cx.err(span, format!("`{hex_key}`: {e}"));
                    None
                }
            });
        match (text, hex) {
            (Some(_), Some((_, span))) => {
                cx.err(span, format!("give `{key}` or `{hex_key}`, not both"));
                None
            }
            (t, x) => t.or(x).map(|(b, _)| b),
        }
    };
    let send = bytes(cx, "send");
    let expect = bytes(cx, "expect");
    if let Some(v) = h.get("expect").or_else(|| h.get("expect_hex"))
        && expect.as_ref().is_some_and(|e| e.is_empty())
    {
        cx.err(v.span(), "`expect` must not be empty");
    }
    let port = h.uint(cx, "port", 1, 65535).map(|n| n as u16);
    let passive = h.table(cx, "passive", "`passive`").map(|p| {
        let failures = p.uint(cx, "failures", 1, 1000).unwrap_or(5) as u32;
        let eject = p
            .positive_duration(cx, "eject")
            .unwrap_or(Duration::from_secs(30));
        p.finish(cx, &["failures", "eject"], &[]);
        PassiveConfig { failures, eject }
    });
    let fail_open = h.bool(cx, "fail_open").unwrap_or(false);
    let active = h.bool(cx, "active").unwrap_or(true);
    let send_proxy = h.bool(cx, "send_proxy").unwrap_or(false);
    h.finish(cx, HEALTH_KEYS, &[]);
    Some(HealthConfig {
        active,
        interval,
        timeout,
        rise,
        fall,
        send,
        expect,
        port,
        passive,
        fail_open,
        send_proxy,
    })
}

/// Bytes written as hex digits, optionally separated by spaces: `"0001 0100"`.
fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.is_empty() {
        return Err("no bytes".into());
    }
    if !digits.len().is_multiple_of(2) {
        return Err("an odd number of hex digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .filter(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("{:?} is not a hex byte", String::from_utf8_lossy(pair)))
        })
        .collect()
}

fn server(cx: &mut Cx<'_>, v: &Val<'_>) -> Option<ServerSpec> {
    let addr_of = |cx: &mut Cx<'_>, s: &str, span: Range<usize>| match server_addr(s) {
        Ok(a) => Some(a),
        Err(e) => {
            cx.err(span, format!("server: {e}"));
            None
        }
    };
    match v.get_ref() {
        DeValue::String(s) => addr_of(cx, s, v.span()).map(|addr| ServerSpec {
            addr,
            weight: 1,
            backup: false,
        }),
        DeValue::Table(t) => {
            let t = Tab::new("a server", t, v.span());
            let addr = t.required(cx, "addr").and_then(|a| {
                let s = as_str(cx, "addr", a)?;
                addr_of(cx, s, a.span())
            });
            let weight = t.uint(cx, "weight", 1, MAX_WEIGHT as u64).unwrap_or(1) as u32;
            if let (Some(ServerAddr::Srv { .. }), Some(w)) = (&addr, t.get("weight")) {
                cx.err(
                    w.span(),
                    "`weight` does not apply to a srv: server: each SRV record's weight is used",
                );
            }
            let backup = t.bool(cx, "backup").unwrap_or(false);
            t.finish(cx, SERVER_KEYS, &[]);
            Some(ServerSpec {
                addr: addr?,
                weight,
                backup,
            })
        }
        other => {
            cx.err(
                v.span(),
                format!(
                    "a server must be \"host:port\" or {{ addr = \"host:port\", weight = N }}, not {}",
                    type_name(other)
                ),
            );
            None
        }
    }
}

/// A server address: `ip:port`, `[v6]:port`, `name:port` (resolved at run time), or
/// `srv:NAME` (an SRV name, looked up at run time).
pub(super) fn server_addr(s: &str) -> Result<ServerAddr, String> {
    if s.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("srv:")) {
        return srv_name(&s[4..]);
    }
    match socket_addr(s) {
        Ok(a) if a.port() == 0 => Err(format!("{a}: port 0 cannot be connected to")),
        Ok(a) => Ok(ServerAddr::Ip(a)),
        Err(e) => match (
            s.rsplit_once(':').map(|(_, p)| p.parse::<u16>()),
            name_port(s),
        ) {
            (Some(Ok(0)), _) => Err(format!("bad address {s:?}: port 0 cannot be connected to")),
            (_, Some((host, port))) => Ok(ServerAddr::Name {
                host: host.to_ascii_lowercase(),
                port,
            }),
            _ => Err(e),
        },
    }
}

/// The name of a `srv:NAME` server: a DNS name whose labels may start with `_`
/// (`_pg._tcp.db.service.consul`), without a port (the records give them); a final dot
/// (a fully qualified name, not tried with the search domains) is kept.
fn srv_name(name: &str) -> Result<ServerAddr, String> {
    if !cfg!(feature = "dns") {
        return Err(format!(
            "\"srv:{name}\": SRV discovery is not available: {NO_DNS_FEATURE}"
        ));
    }
    if name.is_empty() {
        return Err("\"srv:\" needs an SRV name, e.g. \"srv:_pg._tcp.db.service.consul\"".into());
    }
    if let Some((host, port)) = name.rsplit_once(':')
        && port.parse::<u16>().is_ok()
    {
        return Err(format!(
            "bad SRV name {name:?}: the records give the ports; write \"srv:{host}\""
        ));
    }
    let bare = name.strip_suffix('.').unwrap_or(name);
    let valid = dns_name(bare, true);
    if !valid {
        return Err(format!(
            "bad SRV name {name:?}: expected a DNS name such as \"_pg._tcp.db.service.consul\""
        ));
    }
    Ok(ServerAddr::Srv {
        name: name.to_ascii_lowercase(),
    })
}

/// A DNS name: labels of 1 to 63 letters, digits and hyphens (and underscores, for SRV
/// names' `_service._proto` labels, with `underscore`), 253 bytes at most.
fn dns_name(name: &str, underscore: bool) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || (underscore && b == b'_'))
        })
}

/// `name:port` with a valid DNS name (letters, digits, `-`, dot-separated labels; not all
/// digits and dots, which would be a malformed IPv4 address), or `None`.
pub(super) fn name_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let valid_name = dns_name(host, false) && !host.chars().all(|c| c.is_ascii_digit() || c == '.');
    match port.parse::<u16>() {
        Ok(port) if valid_name => Some((host, port)),
        _ => None,
    }
}

/// A socket buffer size: a size from 4 KiB to 64 MiB, or `"auto"` (the kernel's
/// autotuning, unbounded up to its `tcp_wmem`/`tcp_rmem` maximum). Absent: the default cap.
/// `"adaptive"` (the default), `"auto"`, or a size from 4 KiB to 64 MiB. `None`: an error
/// was reported.
fn buffer_size(cx: &mut Cx<'_>, t: &Tab<'_, '_>, key: &str) -> Option<BufferSize> {
    match t.get(key).map(Val::get_ref) {
        None => Some(BufferSize::Adaptive),
        Some(DeValue::String(s)) if s.as_ref() == "adaptive" => Some(BufferSize::Adaptive),
        Some(DeValue::String(s)) if s.as_ref() == "auto" => Some(BufferSize::Auto),
        Some(DeValue::String(s)) if parse_size(s).is_err() => {
            let span = t.get(key)?.span();
            cx.err(
                span,
                format!(
                    "`{key}` must be \"adaptive\", \"auto\" or a size like \"256KiB\", not {s:?}"
                ),
            );
            None
        }
        Some(_) => t.size_in(cx, key, 4 << 10, 64 << 20).map(BufferSize::Fixed),
    }
}

fn socket_buffers(cx: &mut Cx<'_>, t: &Tab<'_, '_>) -> SocketBuffers {
    let d = SocketBuffers::default();
    SocketBuffers {
        send: buffer_size(cx, t, "send_buffer").unwrap_or(d.send),
        recv: buffer_size(cx, t, "recv_buffer").unwrap_or(d.recv),
    }
}

fn tcp_options(cx: &mut Cx<'_>, t: Tab<'_, '_>) -> TcpOptions {
    let d = TcpOptions::default();
    let o = TcpOptions {
        nodelay: t.bool(cx, "nodelay").unwrap_or(d.nodelay),
        keepalive: t.positive_duration(cx, "keepalive"),
        buffers: socket_buffers(cx, &t),
        mark: None,
    };
    t.finish(cx, TCP_KEYS, &[]);
    o
}

/// A list of networks: `"10.0.0.0/8"`, `"2001:db8::/32"`, or a bare address (one host).
fn cidr_list(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for (s, span) in str_list(cx, key, v) {
        if let Ok(n) = s.parse::<ipnet::IpNet>() {
            out.push(n.trunc());
        } else if let Ok(ip) = s.parse::<std::net::IpAddr>() {
            out.push(ipnet::IpNet::from(ip));
        } else {
            cx.err(
                span,
                format!("`{key}`: {s:?} is not a network (e.g. \"10.0.0.0/8\") or an IP address"),
            );
        }
    }
    out
}

/// `destinations = ["10.0.0.0/8:443", "*.internal:*", …]`: `None` if any entry is wrong
/// (each reported) or the list is empty.
fn destinations(cx: &mut Cx<'_>, key: &str, v: &Val<'_>) -> Option<Destinations> {
    let items = str_list(cx, key, v);
    if items.is_empty() {
        if matches!(v.get_ref(), DeValue::Array(_)) {
            cx.err(
                v.span(),
                format!("`{key}` is empty: nothing would be reachable"),
            );
        }
        return None;
    }
    let mut rules = Vec::new();
    let mut ok = true;
    for (s, span) in items {
        match destinations::parse_rule(s) {
            Ok(r) => rules.push(r),
            Err(e) => {
                cx.err(span, format!("`{key}`: {e}"));
                ok = false;
            }
        }
    }
    ok.then(|| Destinations::new(rules))
}

/// `users = [{ name = "alice", password = "…" }, { name = "bob", password_hash = "$2y$…" }]`.
fn users(cx: &mut Cx<'_>, v: &Val<'_>, base: &Path) -> Vec<User> {
    let Some(items) = table_array(cx, "users", v) else {
        return Vec::new();
    };
    if items.is_empty() {
        cx.err(
            v.span(),
            "`users` is empty: leave it out for no authentication, or list at least one user",
        );
    }
    let mut out: Vec<User> = Vec::new();
    for item in items.iter() {
        let Some(u) = as_table(cx, "users", item, "a user") else {
            continue;
        };
        let name = u.required(cx, "name").and_then(|v| {
            let n = as_str(cx, "name", v)?;
            let problem = if n.is_empty() || n.len() > 255 {
                Some("a user name is 1 to 255 bytes (SOCKS5 carries no more)")
            } else if n.contains(':') {
                Some("a user name cannot contain ':' (HTTP Basic authentication splits at it)")
            } else {
                None
            };
            if let Some(p) = problem {
                cx.err(v.span(), p);
                return None;
            }
            if out.iter().any(|o| o.name == n) {
                cx.err(v.span(), format!("user {n:?} is listed twice"));
                return None;
            }
            Some(n.to_string())
        });
        let password = u.get("password").or_else(|| u.get("password_file"));
        if let (Some(_), Some(f)) = (u.get("password"), u.get("password_file")) {
            cx.err(
                f.span(),
                "give a user `password` or `password_file`, not both",
            );
        }
        let hash = u.get("password_hash");
        let secret = match (password, hash) {
            (Some(_), Some(h)) => {
                cx.err(
                    h.span(),
                    "give a user `password` or `password_hash`, not both",
                );
                None
            }
            (None, None) => {
                cx.err(
                    item.span(),
                    "a user needs `password`, `password_file` or `password_hash` (bcrypt, as `htpasswd -B` writes it)",
                );
                None
            }
            (Some(p), None) => {
                let pw = if u.get("password").is_some() {
                    as_str(cx, "password", p).map(str::to_string)
                } else {
                    as_str(cx, "password_file", p)
                        .map(|f| path_in(base, f))
                        .and_then(|f| cx.read_secret(p.span(), &f, "the password file"))
                };
                pw.and_then(|pw| {
                if pw.is_empty() || pw.len() > 255 {
                    cx.err(p.span(), "a password is 1 to 255 bytes (SOCKS5 carries no more)");
                    return None;
                }
                Some(Secret::Password(pw))
            })
            }
            (None, Some(h)) => as_str(cx, "password_hash", h).and_then(|hs| {
                match hs.parse::<bcrypt::HashParts>() {
                    Ok(_) => Some(Secret::Bcrypt(hs.to_string())),
                    Err(_) => {
                        cx.err(
                            h.span(),
                            "`password_hash` is not a bcrypt hash (\"$2y$10$…\", as `htpasswd -nB user` prints it)",
                        );
                        None
                    }
                }
            }),
        };
        let dests = u
            .get("destinations")
            .map(|v| destinations(cx, "destinations", v));
        u.finish(cx, USER_KEYS, &[]);
        if let (Some(name), Some(secret)) = (name, secret)
            && dests.as_ref().is_none_or(Option::is_some)
        {
            out.push(User {
                name,
                secret,
                destinations: dests.flatten(),
            });
        }
    }
    out
}

/// `"20/s"`, `"600/m"`, `"1000/h"` → connections per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    let (n, unit) = s
        .split_once('/')
        .ok_or_else(|| format!("bad rate {s:?}: expected e.g. \"20/s\" or \"600/m\""))?;
    let n: f64 = n
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .ok_or_else(|| format!("bad rate {s:?}: {n:?} is not a positive number"))?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        u => return Err(format!("bad rate {s:?}: unit {u:?} must be s, m or h")),
    };
    let r = n / per;
    // From one an hour to a billion a second: the limiter counts in nanoseconds.
    if !(1.0 / 3600.0..=1e9).contains(&r) {
        return Err(format!(
            "rate {s:?} is out of range: from \"1/h\" to \"1000000000/s\""
        ));
    }
    Ok(r)
}

/// `per_client`; a UDP listener's counts sessions (`max_sessions`) and datagrams (`rate`).
fn per_client(cx: &mut Cx<'_>, p: Tab<'_, '_>, udp: bool) -> PerClient {
    let (concurrent, other) = if udp {
        ("max_sessions", "max_connections")
    } else {
        ("max_connections", "max_sessions")
    };
    if let Some(v) = p.get(other) {
        let msg = if udp {
            "a UDP listener limits `max_sessions` per client"
        } else {
            "`max_sessions` applies to UDP listeners; a TCP listener limits `max_connections` per client"
        };
        cx.err(v.span(), msg);
    }
    let max_connections = p.uint(cx, concurrent, 1, 10_000_000).map(|n| n as u32);
    let rate = p
        .string(cx, "rate")
        .and_then(|(s, span)| match parse_rate(s) {
            Ok(r) => Some(r),
            Err(e) => {
                cx.err(span, format!("`rate`: {e}"));
                None
            }
        });
    let burst = p.uint(cx, "burst", 1, 10_000_000).map(|n| n as u32);
    // (A `rate` given but invalid has its own error.)
    if burst.is_some() && p.get("rate").is_none() {
        let span = p.get("burst").map(|v| v.span()).unwrap_or(0..0);
        cx.err(span, "`burst` needs a `rate`");
    }
    let max_tracked = p
        .uint(cx, "max_tracked", 1, 100_000_000)
        .map_or(DEFAULT_MAX_TRACKED, |n| n as usize);
    let ipv6_prefix = p.uint(cx, "ipv6_prefix", 1, 128).map_or(64, |n| n as u8);
    p.finish(
        cx,
        &[
            "max_connections",
            "max_sessions",
            "rate",
            "burst",
            "max_tracked",
            "ipv6_prefix",
        ],
        &[],
    );
    PerClient {
        max_connections,
        // Without a burst, one second's worth may arrive at once.
        rate: rate.map(|r| (r, burst.unwrap_or_else(|| r.ceil().max(1.0) as u32))),
        max_tracked,
        ipv6_prefix,
    }
}

fn proxy_accept(cx: &mut Cx<'_>, p: Tab<'_, '_>) -> Option<ProxyAccept> {
    use crate::wire::proxy::Accept;
    let accept = match p.string(cx, "accept") {
        None | Some(("any", _)) => Some(Accept::Any),
        Some(("v1", _)) => Some(Accept::V1),
        Some(("v2", _)) => Some(Accept::V2),
        Some((other, span)) => {
            cx.err(
                span,
                format!("`accept` must be \"v1\", \"v2\" or \"any\", not {other:?}"),
            );
            None
        }
    };
    let trusted = match p.get("trusted") {
        Some(v) => Some(cidr_list(cx, "trusted", v)),
        None => {
            cx.err(
                p.span.clone(),
                "`proxy_protocol` needs `trusted`: the networks of the proxies allowed to send the header",
            );
            None
        }
    };
    let timeout = p
        .positive_duration(cx, "timeout")
        .unwrap_or(DEFAULT_PROXY_TIMEOUT);
    p.finish(cx, &["accept", "trusted", "timeout"], &[]);
    Some(ProxyAccept {
        accept: accept?,
        trusted: trusted?,
        timeout,
    })
}

fn admin(cx: &mut Cx<'_>, t: Tab<'_, '_>, base: &Path) -> Option<Admin> {
    let listen = t.required(cx, "listen").and_then(|v| {
        let s = as_str(cx, "listen", v)?;
        match socket_addr(s) {
            Ok(a) => Some(a),
            Err(e) => {
                cx.err(v.span(), format!("`listen`: {e}"));
                None
            }
        }
    });
    let mut token = t.string(cx, "token").and_then(|(s, span)| {
        if s.is_empty() {
            cx.err(
                span,
                "`token` must not be empty (leave it out for no token)",
            );
            None
        } else {
            Some(s.to_string())
        }
    });
    // The token kept outside the config: the file's first line.
    if let Some((path, span)) = t.string(cx, "token_file") {
        if t.get("token").is_some() {
            cx.err(span.clone(), "give `token` or `token_file`, not both");
        }
        token = cx.read_secret(span, &path_in(base, path), "the token file");
    }
    t.finish(cx, &["listen", "token", "token_file"], &[]);
    Some(Admin {
        listen: listen?,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRV_CONFIG: &str = "[global]\nresolvers = [\"127.0.0.1:8600\"]\n\n\
        [[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n\n\
        [[upstream]]\nname = \"u\"\nservers = [\"srv:_pg._tcp.DB.service.consul\"]\n";

    /// A syslog collector over UDP: an IP address (IPv6 in brackets) or a name and a
    /// port; anything else is refused.
    #[test]
    fn syslog_collectors_by_address_or_name() {
        let target = |s: &str| syslog_target(&format!("syslog:udp://{s}"));
        let udp = |host: &str, port| {
            Ok(SyslogTarget::Udp {
                host: host.into(),
                port,
            })
        };
        assert_eq!(target("10.0.0.5:514"), udp("10.0.0.5", 514));
        assert_eq!(target("[::1]:6514"), udp("::1", 6514));
        assert_eq!(target("logs.example.net:514"), udp("logs.example.net", 514));
        for bad in [
            "",
            "logs",
            "logs.example.net",
            "logs:99999",
            ":514",
            "a..b:514",
            "1.2.3:514",
        ] {
            assert!(target(bad).is_err(), "{bad:?}");
        }
    }

    #[cfg(feature = "dns")]
    #[test]
    fn srv_servers_and_resolvers() {
        let cfg = parse_str(SRV_CONFIG, "f.toml", Path::new(".")).unwrap();
        let u = &cfg.upstreams[0];
        assert_eq!(
            u.servers[0].addr,
            ServerAddr::Srv {
                name: "_pg._tcp.db.service.consul".into()
            }
        );
        assert_eq!(
            u.servers[0].addr.to_string(),
            "srv:_pg._tcp.db.service.consul"
        );
        assert_eq!(u.resolvers, vec!["127.0.0.1:8600".parse().unwrap()]);
        // What the admin API parses the same way.
        assert_eq!(
            "srv:_x._udp.example.".parse::<ServerAddr>(),
            Ok(ServerAddr::Srv {
                name: "_x._udp.example.".into()
            })
        );
        assert_eq!(
            resolver_addr("10.0.0.1"),
            Ok("10.0.0.1:53".parse().unwrap())
        );
        assert_eq!(resolver_addr("[::1]"), Ok("[::1]:53".parse().unwrap()));
    }

    /// A build without the `dns` feature refuses both, where they are written.
    #[cfg(not(feature = "dns"))]
    #[test]
    fn srv_needs_the_dns_feature() {
        let e = parse_str(SRV_CONFIG, "f.toml", Path::new("."))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "f.toml:2:13: `resolvers` cannot be used: this build of ferry has no DNS resolver of its own (built without the `dns` feature)\n\
             f.toml:11:12: server: \"srv:_pg._tcp.DB.service.consul\": SRV discovery is not available: this build of ferry has no DNS resolver of its own (built without the `dns` feature)"
        );
        assert!("srv:_x._tcp.example".parse::<ServerAddr>().is_err());
    }
}
