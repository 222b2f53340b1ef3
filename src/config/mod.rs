//! The configuration: a TOML file (or the quick-mode command line) turned into typed,
//! validated structs. Nothing downstream ever looks a setting up by name.
//!
//! The flow is one way: text → spanned TOML tree (`toml::de::DeTable`) → [`Config`] (every
//! default resolved, every cross-reference checked) → runtime objects (`runtime::build`).
//! Every problem found on the way is a [`ConfigError`] carrying `file:line:col`, and all of
//! them are reported at once.

mod parse;
pub mod quick;
pub mod units;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

pub use parse::parse_str;

/// A fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub global: Global,
    /// The HTTP admin server; off when `None`.
    pub admin: Option<Admin>,
    pub log: LogConfig,
    pub listeners: Vec<Listener>,
    pub upstreams: Vec<Upstream>,
    /// What is allowed but unwise (a private key or a secret file every user can read):
    /// printed by `ferry check`, logged at start and at reloads.
    pub warnings: Vec<ConfigError>,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
    /// Required as `Authorization: Bearer <token>` on every POST when set.
    pub token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Global {
    /// Connections open at once across all listeners; more are refused (`limited`).
    pub max_connections: usize,
    /// How long open connections may take to finish after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// Runtime worker threads; 0 = one per core.
    pub workers: usize,
    /// Relay plain TCP with `splice(2)` (zero-copy) rather than through user space.
    pub splice: bool,
    /// The capacity asked for each splice pipe: the most one direction of a connection
    /// holds in kernel memory while its receiver is slow.
    pub pipe_size: usize,
    /// Send UDP datagrams through io_uring (one system call for a round's datagrams,
    /// whatever socket each leaves from) where the kernel allows it; else `sendmmsg`.
    pub io_uring: bool,
    /// Let the kernel relay established UDP sessions (a TC program rewriting their
    /// datagrams) where the build, the kernel and the process's privileges allow it.
    pub udp_kernel: bool,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            max_connections: 100_000,
            drain_timeout: Duration::from_secs(30),
            workers: 0,
            splice: true,
            pipe_size: 1024 * 1024,
            io_uring: true,
            udp_kernel: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessTarget {
    Stdout,
    Stderr,
    File(PathBuf),
    /// `"syslog"` (the local socket) or `"syslog:udp://HOST:PORT"`: RFC 5424 messages.
    Syslog(SyslogTarget),
    Off,
}

/// Where syslog messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    /// The local syslog socket (`/dev/log`, or a path: `"syslog:unix:/run/x.sock"`).
    Local(PathBuf),
    /// A collector over UDP: an IP address, or a name looked up when the log is opened
    /// (at the start and at each reload).
    Udp { host: String, port: u16 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub access: AccessTarget,
    pub format: LogFormat,
    /// Process log level on stderr.
    pub level: tracing::Level,
    /// Also a record (result `open`) once the server connection is up.
    pub on_connect: bool,
    /// Also a progress record for every connection open this long, and again each time
    /// this long passes.
    pub interval: Option<Duration>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            access: AccessTarget::Stdout,
            format: LogFormat::Json,
            level: tracing::Level::INFO,
            on_connect: false,
            interval: None,
        }
    }
}

/// What a listener does with a connection before routing it. Each mode carries its own
/// settings, so a setting that does not apply to a mode cannot be written for it.
#[derive(Debug, Clone, PartialEq)]
pub enum ListenerMode {
    /// Bytes relayed as they are. Routes may look at a TLS ClientHello (SNI, offered ALPN)
    /// without terminating TLS; the hello is passed on untouched.
    Tcp,
    /// TLS terminated by ferry; routes see the negotiated SNI and ALPN.
    Tls(Box<TlsListen>),
    /// A SOCKS5 server (RFC 1928, RFC 1929): the client names the destination.
    Socks5(Box<Socks5Listen>),
    /// An HTTP proxy: `CONNECT host:port` tunnels, and absolute-form plain-HTTP requests
    /// (one origin per client connection).
    HttpConnect(Box<HttpConnectListen>),
    /// Connections a firewall rule redirected here, to their original destination (or to
    /// the listener's `upstream`).
    Transparent(Box<TransparentListen>),
    /// `protocol = "udp"`: datagrams relayed to the `upstream`, a session per client
    /// address.
    Udp(Box<UdpListen>),
}

impl ListenerMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ListenerMode::Tcp => "tcp",
            ListenerMode::Tls(_) => "tls",
            ListenerMode::Socks5(_) => "socks5",
            ListenerMode::HttpConnect(_) => "http-connect",
            ListenerMode::Transparent(_) => "transparent",
            ListenerMode::Udp(_) => "udp",
        }
    }
}

/// What the forward-proxy modes share: where clients may go, who they are, how ferry
/// dials.
#[derive(Debug, Clone, PartialEq)]
pub struct Forward {
    /// Required: nothing is reachable that these do not allow.
    pub destinations: crate::destinations::Destinations,
    /// When not empty, every client must authenticate as one of these.
    pub users: Vec<User>,
    pub dial: Dial,
}

/// How ferry connects to destinations a client named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dial {
    /// For the whole connect: name resolution and every address tried.
    pub connect_timeout: Duration,
    /// SO_MARK on the outbound sockets, so firewall rules can tell ferry's own traffic.
    pub mark: Option<u32>,
}

impl Default for Dial {
    fn default() -> Self {
        Dial {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            mark: None,
        }
    }
}

/// `users = [{ name, password | password_hash, destinations }]`.
#[derive(Clone, PartialEq)]
pub struct User {
    pub name: String,
    pub secret: Secret,
    /// Narrows the listener's `destinations` for this user.
    pub destinations: Option<crate::destinations::Destinations>,
}

/// A user's password as the config holds it. Never printed.
#[derive(Clone, PartialEq)]
pub enum Secret {
    Password(String),
    /// bcrypt, as `htpasswd -B` writes it (`$2y$…`).
    Bcrypt(String),
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.secret {
            Secret::Password(_) => "password",
            Secret::Bcrypt(_) => "password_hash",
        };
        f.debug_struct("User")
            .field("name", &self.name)
            .field("secret", &kind)
            .field("destinations", &self.destinations)
            .finish()
    }
}

/// `mode = "socks5"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Socks5Listen {
    pub forward: Forward,
    /// Allow UDP ASSOCIATE.
    pub udp: bool,
}

/// `mode = "http-connect"`.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConnectListen {
    pub forward: Forward,
    /// Refuse a tunnel whose TLS SNI differs from the CONNECT host (domain fronting).
    pub sni_must_match: bool,
}

/// `mode = "transparent"`.
#[derive(Debug, Clone, PartialEq)]
pub struct TransparentListen {
    pub interception: Interception,
    /// Where original destinations may go: required without `upstream`; with it, an
    /// optional filter on the original destinations.
    pub destinations: Option<crate::destinations::Destinations>,
    pub dial: Dial,
}

/// How connections reach a transparent listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interception {
    /// nftables/iptables REDIRECT (NAT): the original destination from SO_ORIGINAL_DST.
    Redirect,
    /// TPROXY: the listener has IP_TRANSPARENT and the accepted socket's local address is
    /// the original destination.
    Tproxy,
}

/// `protocol = "udp"`: how a UDP listener's sessions end. (Its `max_sessions` is the
/// listener's [`Listener::max_connections`]; its `per_client.max_sessions`,
/// [`PerClient::max_connections`]; its `per_client.rate` counts datagrams.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpListen {
    /// Replies per client datagram: once all are in, the session ends (`ok`). DNS: 1.
    pub responses: Option<u32>,
    /// Client datagrams per session: the client's next one starts a new session.
    pub requests: Option<u32>,
}

/// Default `idle_timeout` of a UDP listener.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What an upstream's servers speak: decided by the listeners that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    /// Used by `protocol = "udp"` listeners: datagrams, UDP health checks.
    Udp,
}

/// `tls = { .. }` / `[listener.tls]` of a `mode = "tls"` listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsListen {
    /// Served when the client sends no SNI, or one no other certificate is for.
    pub default_cert: CertFiles,
    /// `[[listener.tls.certs]]`: chosen by SNI (exact names before wildcards).
    pub certs: Vec<(NamePattern, CertFiles)>,
    pub client_auth: Option<ClientAuth>,
    /// Protocols offered in ALPN, in order of preference.
    pub alpn: Vec<String>,
    pub min_version: TlsVersion,
}

/// A certificate chain and its key, read and checked at parse time (so a config that
/// `ferry check` accepts serves), and again at every reload.
#[derive(Debug, Clone, PartialEq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub loaded: crate::tls::certs::CertKey,
}

/// mTLS: client certificates verified against `ca`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAuth {
    pub ca: PathBuf,
    pub roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Without a certificate a client is refused; `false`: accepted, but a certificate it
    /// sends must verify.
    pub required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

/// A host name, or a one-label wildcard: `*.example.com` matches `a.example.com`, not
/// `example.com` nor `a.b.example.com`. Stored lowercased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    Exact(String),
    /// The part after `*.`.
    Wildcard(String),
}

impl NamePattern {
    /// Parses a host name or a one-label wildcard (`*.example.com`), lowercased.
    pub fn parse(s: &str) -> Result<NamePattern, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let ok_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(ok_label) {
            return Err(format!(
                "{s:?} is not a host name or a wildcard such as \"*.example.com\""
            ));
        }
        Ok(if wild {
            NamePattern::Wildcard(name.to_string())
        } else {
            NamePattern::Exact(name.to_string())
        })
    }

    /// `name` must already be lowercase (SNI as ferry reads it is).
    pub fn matches(&self, name: &str) -> bool {
        match self {
            NamePattern::Exact(n) => n == name,
            NamePattern::Wildcard(suffix) => name
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == suffix),
        }
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Wildcard(s) => write!(f, "*.{s}"),
        }
    }
}

/// `[[listener.route]]`: every matcher given must match; the first route that matches
/// picks the upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub sni: Option<Vec<NamePattern>>,
    /// Mode tcp: one of these is offered; mode tls: one of these was negotiated.
    pub alpn: Option<Vec<String>>,
    pub source: Option<Vec<IpNet>>,
    /// The local port the client connected to.
    pub port: Option<Vec<u16>>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
}

impl Route {
    /// Whether this route needs the TLS ClientHello (mode tcp reads it to match).
    pub fn needs_hello(&self) -> bool {
        self.sni.is_some() || self.alpn.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub mode: ListenerMode,
    /// The default route: index into [`Config::upstreams`]. `None` when routes are given
    /// and a connection that matches none is refused.
    pub upstream: Option<usize>,
    pub routes: Vec<Route>,
    /// The front-end handshake (PROXY header, ClientHello, TLS handshake) must complete
    /// within this.
    pub handshake_timeout: Duration,
    /// No bytes either way for this long closes both sides.
    pub idle_timeout: Duration,
    /// Connections open at once on this listener; `None` = only the global limit.
    pub max_connections: Option<usize>,
    /// SO_REUSEPORT with one accept socket per worker (the default); otherwise one socket
    /// per address that every worker accepts on.
    pub reuse_port: bool,
    /// If set, only clients in these networks may connect.
    pub allow: Option<Vec<IpNet>>,
    /// Clients in these networks are refused (checked before `allow`).
    pub deny: Vec<IpNet>,
    pub per_client: Option<PerClient>,
    /// Read a PROXY header from (trusted) clients.
    pub proxy_protocol: Option<ProxyAccept>,
    /// The client sockets' buffers (`tcp = { send_buffer, recv_buffer }`).
    pub buffers: SocketBuffers,
}

/// A socket buffer's starting cap under `"adaptive"` (the default), each way and on each
/// side: what a client that never reads (or a server) can make the kernel hold for one
/// connection.
pub const DEFAULT_SOCKET_BUFFER: usize = 256 * 1024;

/// Under `"adaptive"`, the bytes a direction of a relay must have delivered before the
/// sockets it reads and writes go over to the kernel's autotuning: a peer that has taken
/// this much is reading, and from here on a cap would only cost throughput.
pub const ADAPTIVE_AFTER: u64 = 4 << 20;

/// One socket buffer: SO_SNDBUF or SO_RCVBUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferSize {
    /// `"adaptive"` (the default): capped at [`DEFAULT_SOCKET_BUFFER`] until the relay
    /// direction it serves has delivered [`ADAPTIVE_AFTER`] bytes, then the kernel's
    /// autotuning. A peer that never reads (or reads slowly) pins little; a bulk transfer
    /// runs as with `"auto"`.
    Adaptive,
    /// `"auto"`: the kernel's autotuning from the start.
    Auto,
    /// A size: fixed for the connection's life.
    Fixed(usize),
}

impl BufferSize {
    /// The size to set when the socket is made; `None` leaves it to the kernel.
    pub fn initial(self) -> Option<usize> {
        match self {
            BufferSize::Adaptive => Some(DEFAULT_SOCKET_BUFFER),
            BufferSize::Auto => None,
            BufferSize::Fixed(n) => Some(n),
        }
    }
}

/// SO_SNDBUF and SO_RCVBUF of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    pub send: BufferSize,
    pub recv: BufferSize,
}

impl Default for SocketBuffers {
    fn default() -> Self {
        SocketBuffers {
            send: BufferSize::Adaptive,
            recv: BufferSize::Adaptive,
        }
    }
}

/// `per_client = { max_connections, rate, burst, max_tracked, ipv6_prefix }`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerClient {
    pub max_connections: Option<u32>,
    /// Connections per second, and how many may arrive at once.
    pub rate: Option<(f64, u32)>,
    /// Client IPs tracked at most; beyond it new clients are refused (`limited`).
    pub max_tracked: usize,
    /// IPv6 clients are counted per network of this many bits (default 64).
    pub ipv6_prefix: u8,
}

/// Default `per_client.max_tracked`.
pub const DEFAULT_MAX_TRACKED: usize = 100_000;

/// `proxy_protocol = { accept, trusted, timeout }` on a listener.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyAccept {
    pub accept: crate::wire::proxy::Accept,
    /// Only these sources may send a header; any other connection is refused.
    pub trusted: Vec<IpNet>,
    /// The whole header must arrive within this.
    pub timeout: Duration,
}

/// Default `proxy_protocol.timeout`.
pub const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(3);

/// Default `handshake_timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `idle_timeout` when a listener sets none.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default `connect_timeout` when an upstream sets none.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The balancing algorithm of an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin.
    RoundRobin,
    /// Fewest live connections relative to weight.
    LeastConn,
    /// Weighted random.
    Random,
    /// Power of two choices on live connections (weighted).
    P2c,
    /// Maglev consistent hash of the client IP.
    Maglev,
    /// Consistent hash ring of the client IP; with `balance_factor` (percent, > 100), a
    /// server is skipped while it holds more than `factor/100 ×` the average load.
    RingHash { balance_factor: Option<u32> },
    /// The first server in list order that is eligible.
    First,
}

/// A `balance` name that is none of [`Balance::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("must be one of {names}; not {0:?}", names = Balance::NAMES.join(", "))]
pub struct UnknownBalance(pub String);

impl std::str::FromStr for Balance {
    type Err = UnknownBalance;

    /// A balance by its name (`ring_hash` without a balance factor).
    fn from_str(s: &str) -> Result<Balance, UnknownBalance> {
        Ok(match s {
            "round_robin" => Balance::RoundRobin,
            "least_conn" => Balance::LeastConn,
            "random" => Balance::Random,
            "p2c" => Balance::P2c,
            "maglev" => Balance::Maglev,
            "ring_hash" => Balance::RingHash {
                balance_factor: None,
            },
            "first" => Balance::First,
            other => return Err(UnknownBalance(other.to_string())),
        })
    }
}

impl Balance {
    /// Every name `balance` takes, the default first.
    pub const NAMES: [&str; 7] = [
        "round_robin",
        "least_conn",
        "random",
        "p2c",
        "maglev",
        "ring_hash",
        "first",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
            Balance::Random => "random",
            Balance::P2c => "p2c",
            Balance::Maglev => "maglev",
            Balance::RingHash { .. } => "ring_hash",
            Balance::First => "first",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Upstream {
    pub name: String,
    pub balance: Balance,
    pub servers: Vec<ServerSpec>,
    /// How often server names are re-resolved (sooner when the DNS records' TTL ends).
    pub resolve_interval: Duration,
    /// `[global] resolvers`: the DNS servers that names and SRV names are looked up with;
    /// empty: the system's (`/etc/resolv.conf`). Carried by each upstream, so a reload that
    /// changes them rebuilds the pools.
    pub resolvers: Vec<SocketAddr>,
    pub connect_timeout: Duration,
    /// Further connect attempts, each to another server, after a failed one.
    pub retries: u32,
    /// Connections one server may hold at once; `None` = no limit.
    pub max_connections_per_server: Option<usize>,
    /// Wait for a free server instead of failing at once when every server is full.
    pub queue: Option<QueueConfig>,
    /// Client IP → server affinity.
    pub sticky: Option<StickyConfig>,
    pub health: Option<HealthConfig>,
    pub tcp: TcpOptions,
    /// Send a PROXY header first on every server connection (UDP: on a session's first
    /// datagram).
    pub proxy_protocol: Option<crate::wire::proxy::Version>,
    /// UDP: the PROXY header on every datagram, not only a session's first
    /// (`proxy_protocol = { send = "v2", every = true }`).
    pub proxy_every_datagram: bool,
    /// Connect to the servers over TLS.
    pub tls: Option<UpstreamTls>,
    /// TCP, or UDP when `protocol = "udp"` listeners use it.
    pub protocol: Protocol,
}

/// `tls = { .. }` of an upstream: TLS to its servers.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    /// The name sent as SNI and verified; default: the server's host name as configured
    /// (none for a server given by IP address, which is then verified by that address).
    pub sni: Option<String>,
    /// Trust anchors; `None`: the system's roots.
    pub ca: Option<(PathBuf, Vec<rustls::pki_types::CertificateDer<'static>>)>,
    /// A client certificate for mTLS to the servers.
    pub client_cert: Option<CertFiles>,
    /// `false` (written explicitly, and warned about): accept any server certificate.
    pub verify: bool,
    /// Protocols offered in ALPN.
    pub alpn: Vec<String>,
}

/// Default `resolve_interval`.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default `retries`.
pub const DEFAULT_RETRIES: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Connections that may wait at once; more are refused (`limited`).
    pub size: usize,
    /// A connection that waited this long is closed (`queue_timeout`).
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StickyConfig {
    /// An entry unused for this long is forgotten.
    pub ttl: Duration,
    /// Client IPs remembered at most; the least recently used go first beyond it.
    pub max_entries: usize,
}

/// Default `sticky.max_entries`.
pub const DEFAULT_STICKY_ENTRIES: usize = 100_000;

/// `[upstream.health]`: active checks, passive ejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Run active checks (`false` for passive ejection alone).
    pub active: bool,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes to mark a down server up.
    pub rise: u32,
    /// Consecutive failures to mark an up server down.
    pub fall: u32,
    /// Bytes sent after connecting; with `expect`, the prefix the answer must start with.
    /// UDP: the datagram sent, and the prefix its reply must start with (any reply, without
    /// `expect`).
    pub send: Option<Vec<u8>>,
    pub expect: Option<Vec<u8>>,
    /// Check this port rather than the server's (for a UDP upstream without `send`: a TCP
    /// connect to it).
    pub port: Option<u16>,
    pub passive: Option<PassiveConfig>,
    /// When every server is down, try them anyway rather than refuse (`no_server`).
    pub fail_open: bool,
    /// Send the upstream's PROXY header first on checks too (for servers that require it
    /// on every connection).
    pub send_proxy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveConfig {
    /// Consecutive failed connects that eject a server.
    pub failures: u32,
    /// How long an ejected server gets no connections.
    pub eject: Duration,
}

/// A configured server: an IP address, a name resolved to every A/AAAA record, or a DNS
/// SRV name whose records give the servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    Ip(SocketAddr),
    Name {
        host: String,
        port: u16,
    },
    /// `srv:NAME` (e.g. `srv:_pg._tcp.db.service.consul`): every SRV record's target
    /// (each of its A/AAAA addresses) at the record's port; the records' priorities make
    /// primaries and backups, their weights the servers' weights. Stored lowercased.
    Srv {
        name: String,
    },
}

impl ServerAddr {
    /// Whether the server is looked up in DNS (a name or an SRV name).
    pub fn is_dns(&self) -> bool {
        !matches!(self, ServerAddr::Ip(_))
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerAddr::Ip(a) => write!(f, "{a}"),
            ServerAddr::Name { host, port } => write!(f, "{host}:{port}"),
            ServerAddr::Srv { name } => write!(f, "srv:{name}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    pub addr: ServerAddr,
    /// 1..=256; a server gets `weight / sum(weights)` of new connections. For an SRV name,
    /// 1 and unused: each record's weight is mapped (see `upstream::srv`).
    pub weight: u32,
    /// Takes connections only while no primary server is available. For an SRV name:
    /// every server it gives is a backup, whatever the records' priorities.
    pub backup: bool,
}

/// Maximum server weight (as in HAProxy).
pub const MAX_WEIGHT: u32 = 256;

/// Socket options applied to server connections (and to accepted client sockets where
/// they make sense: `nodelay`, `keepalive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    pub nodelay: bool,
    pub keepalive: Option<Duration>,
    pub buffers: SocketBuffers,
    /// SO_MARK (a forward listener's `mark`, not a key of `tcp`).
    pub mark: Option<u32>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            nodelay: true,
            keepalive: None,
            buffers: SocketBuffers::default(),
            mark: None,
        }
    }
}

impl Config {
    /// Reads and validates a config file. Relative paths inside it are taken relative to
    /// the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.display().to_string(),
                line: 0,
                col: 0,
                message: format!("cannot read config: {e}"),
            }])
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        parse_str(&text, &path.display().to_string(), base)
    }

    /// A one-paragraph summary for `ferry check`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for l in &self.listeners {
            let addrs: Vec<String> = l.listen.iter().map(|a| a.to_string()).collect();
            let mut to = Vec::new();
            if !l.routes.is_empty() {
                to.push(format!("{} route(s)", l.routes.len()));
            }
            if let Some(u) = l.upstream {
                to.push(format!("upstream {:?}", self.upstreams[u].name));
            }
            let forward = match &l.mode {
                ListenerMode::Socks5(m) => Some(&m.forward),
                ListenerMode::HttpConnect(m) => Some(&m.forward),
                _ => None,
            };
            if let Some(f) = forward {
                to.push(format!("destinations {}", f.destinations));
                if !f.users.is_empty() {
                    to.push(format!("for {} user(s)", f.users.len()));
                }
            }
            if let ListenerMode::Transparent(t) = &l.mode {
                let allowed = t
                    .destinations
                    .as_ref()
                    .map(|d| format!(" allowed by destinations {d}"))
                    .unwrap_or_default();
                if l.upstream.is_none() {
                    to.push(format!("original destinations{allowed}"));
                } else if !allowed.is_empty() {
                    to.push(format!("for original destinations{allowed}"));
                }
            }
            let mode = match l.mode {
                ListenerMode::Tcp => String::new(),
                ref m => format!(" ({})", m.as_str()),
            };
            s.push_str(&format!(
                "listener {:?}{mode} on {} -> {}\n",
                l.name,
                addrs.join(", "),
                to.join(if l.routes.is_empty() { ", " } else { ", then " })
            ));
        }
        for u in &self.upstreams {
            s.push_str(&format!(
                "upstream {:?}: {} server(s), balance {}\n",
                u.name,
                u.servers.len(),
                u.balance.as_str()
            ));
        }
        s
    }
}

/// One problem in a config file, pointing at where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the problem has no position (e.g. the file cannot be read).
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// One line: control characters the message quotes from the file (a key with a newline
    /// in it) are escaped.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: ", self.file)?;
        } else {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.col)?;
        }
        for c in self.message.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// Every problem found in one config, in file order.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl std::str::FromStr for ServerAddr {
    type Err = String;

    /// A server as a config file gives it: `IP:PORT`, `[IPv6]:PORT`, `HOST:PORT` or
    /// `srv:NAME` (refused by a build without the `dns` feature).
    fn from_str(s: &str) -> Result<ServerAddr, String> {
        parse::server_addr(s)
    }
}
