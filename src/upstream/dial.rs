//! Connecting to a destination a client named (the forward-proxy modes), not to a server
//! of a pool: check it against the destination policy, resolve a name (IPv6 and IPv4),
//! check every address it resolves to, and dial the allowed ones in turn, happy-eyeballs
//! style (RFC 8305: families interleaved, the next attempt started when one fails or
//! 250 ms after the last one started, the first to connect wins). Only an address that was
//! checked is ever dialled, and never one of ferry's own listening addresses.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{Dial, TcpOptions};
use crate::destinations::{Destinations, canonical};
use crate::net::{self, ConnectError, Sock};

/// What a client asked to reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// Lowercase, without a trailing dot.
    Name(Box<str>),
}

impl Target {
    pub fn name(name: &str, port: u16) -> Target {
        let name = name.strip_suffix('.').unwrap_or(name);
        Target {
            host: Host::Name(name.to_ascii_lowercase().into()),
            port,
        }
    }

    pub fn addr(a: SocketAddr) -> Target {
        Target {
            host: Host::Ip(canonical(a.ip())),
            port: a.port(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(a)) => write!(f, "[{a}]:{}", self.port),
            Host::Ip(a) => write!(f, "{a}:{}", self.port),
            Host::Name(n) => write!(f, "{n}:{}", self.port),
        }
    }
}

/// ferry's own listening addresses (every listener's and the admin server's): never a
/// destination, or a client could make ferry connect to itself, over and over.
#[derive(Debug, Default, Clone)]
pub struct OwnAddrs {
    /// Addresses bound as such.
    exact: Vec<SocketAddr>,
    /// Ports bound on a wildcard address (`0.0.0.0`, `[::]`): any local address on them.
    wildcard_ports: Vec<u16>,
}

impl OwnAddrs {
    pub fn new(addrs: impl IntoIterator<Item = SocketAddr>) -> OwnAddrs {
        let mut own = OwnAddrs::default();
        for a in addrs {
            if a.ip().is_unspecified() {
                own.wildcard_ports.push(a.port());
            } else {
                own.exact.push(SocketAddr::new(canonical(a.ip()), a.port()));
            }
        }
        own
    }

    /// Whether a connection to `a` would reach ferry itself.
    pub fn contains(&self, a: SocketAddr) -> bool {
        let a = SocketAddr::new(canonical(a.ip()), a.port());
        if self.exact.contains(&a) {
            return true;
        }
        if self
            .exact
            .iter()
            .any(|e| e.port() == a.port() && a.ip().is_unspecified())
        {
            // Connecting to 0.0.0.0 reaches the local host.
            return true;
        }
        self.wildcard_ports.contains(&a.port()) && is_local(a)
    }
}

/// Whether `a` is an address of this host: the kernel routes to it through the loopback
/// device, so a socket connected to it gets it as its own source address. (A UDP connect
/// sends nothing; it only looks the route up.)
fn is_local(a: SocketAddr) -> bool {
    let ip = a.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        return true;
    }
    let bind: SocketAddr = if a.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    std::net::UdpSocket::bind(bind)
        .and_then(|s| {
            s.connect(a)?;
            s.local_addr()
        })
        .is_ok_and(|l| canonical(l.ip()) == ip)
}

/// The checks a destination must pass.
pub struct Policy<'a> {
    pub listener: &'a Destinations,
    /// The authenticated user's own `destinations`, which narrow the listener's.
    pub user: Option<&'a Destinations>,
    pub own: &'a OwnAddrs,
}

impl Policy<'_> {
    /// Whether `a` may be dialled for `target`.
    pub fn allows(&self, target: &Target, a: SocketAddr) -> bool {
        let ok = |d: &Destinations| match &target.host {
            Host::Ip(_) => d.allows_addr(a),
            Host::Name(n) => d.allows_resolved(n, a),
        };
        ok(self.listener) && self.user.is_none_or(ok) && !self.own.contains(a)
    }

    /// Whether some entry could allow `name` at `port` (checked before resolving it).
    pub fn may_allow_name(&self, name: &str, port: u16) -> bool {
        self.listener.may_allow_name(name, port)
            && self.user.is_none_or(|d| d.may_allow_name(name, port))
    }
}

/// Why a destination was not connected to. Each maps onto the answers of SOCKS5 and HTTP.
#[derive(Debug)]
pub enum DialError {
    /// The policy does not allow it (or it is ferry itself): nothing was contacted.
    Denied(String),
    /// The name does not resolve.
    Resolve(String),
    Refused(String),
    HostUnreachable(String),
    NetworkUnreachable(String),
    /// Not connected within `connect_timeout` (resolution included).
    Timeout(String),
    Failed(String),
}

impl DialError {
    pub fn reason(&self) -> &str {
        match self {
            DialError::Denied(r)
            | DialError::Resolve(r)
            | DialError::Refused(r)
            | DialError::HostUnreachable(r)
            | DialError::NetworkUnreachable(r)
            | DialError::Timeout(r)
            | DialError::Failed(r) => r,
        }
    }
}

/// A dial that failed, and the address it tried last (none when nothing was dialled).
#[derive(Debug)]
pub struct Failure {
    pub error: DialError,
    pub server: Option<SocketAddr>,
}

impl From<DialError> for Failure {
    fn from(error: DialError) -> Failure {
        Failure {
            error,
            server: None,
        }
    }
}

/// A connected destination.
pub struct Dialed {
    pub sock: Sock,
    /// The address dialled.
    pub addr: SocketAddr,
}

/// Attempts start this long after the previous one unless it failed sooner (RFC 8305).
const STAGGER: Duration = Duration::from_millis(250);

/// Checks, resolves and connects to `target` within `dial.connect_timeout`.
pub async fn dial(target: &Target, policy: &Policy<'_>, dial: &Dial) -> Result<Dialed, Failure> {
    let deadline = crate::clock::later(dial.connect_timeout);
    let addrs = match &target.host {
        Host::Ip(ip) => {
            let a = SocketAddr::new(*ip, target.port);
            if policy.own.contains(a) {
                return Err(DialError::Denied(format!(
                    "{target} is ferry's own listening address"
                ))
                .into());
            }
            if !policy.allows(target, a) {
                return Err(DialError::Denied(format!(
                    "{target} is not allowed by `destinations`"
                ))
                .into());
            }
            vec![a]
        }
        Host::Name(name) => {
            if !policy.may_allow_name(name, target.port) {
                return Err(DialError::Denied(format!(
                    "{target} is not allowed by `destinations`"
                ))
                .into());
            }
            let found = match tokio::time::timeout_at(deadline, resolve(name, target.port)).await {
                Err(_) => {
                    return Err(DialError::Timeout(format!(
                        "{name} not resolved within {:?}",
                        dial.connect_timeout
                    ))
                    .into());
                }
                Ok(Err(e)) => {
                    return Err(DialError::Resolve(format!("resolving {name}: {e}")).into());
                }
                Ok(Ok(found)) => found,
            };
            if found.is_empty() {
                return Err(DialError::Resolve(format!("{name} has no address")).into());
            }
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| policy.allows(target, *a))
                .collect();
            if allowed.is_empty() {
                let shown = found
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(DialError::Denied(format!(
                    "{target} resolves to {shown}, which `destinations` does not allow"
                ))
                .into());
            }
            interleave(allowed)
        }
    };
    let tcp = TcpOptions {
        mark: dial.mark,
        ..TcpOptions::default()
    };
    race(&addrs, deadline, &tcp)
        .await
        .map_err(|(e, server)| Failure {
            error: match e {
                ConnectError::Timeout => DialError::Timeout(format!(
                    "{target}: no connection within {:?}",
                    dial.connect_timeout
                )),
                ConnectError::Failed(e) => classify(target, e),
            },
            server,
        })
}

/// Every address of `name`, in the resolver's order (RFC 6724).
async fn resolve(name: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in tokio::net::lookup_host((name, port)).await? {
        let a = SocketAddr::new(canonical(a.ip()), a.port());
        if !out.contains(&a) {
            out.push(a);
        }
    }
    Ok(out)
}

/// Alternates address families, starting with the resolver's first choice (RFC 8305 §4).
fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (a, b): (Vec<SocketAddr>, Vec<SocketAddr>) =
        addrs.into_iter().partition(|x| x.is_ipv6() == first_v6);
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

type Attempt = Pin<Box<dyn Future<Output = Result<Sock, ConnectError>> + Send>>;

/// Connects to the first of `addrs` that answers: an attempt starts when the previous one
/// failed or `STAGGER` after it started, and the first connection made wins (the others
/// are dropped, which closes them).
async fn race(
    addrs: &[SocketAddr],
    deadline: Instant,
    tcp: &TcpOptions,
) -> Result<Dialed, (ConnectError, Option<SocketAddr>)> {
    let mut pending: Vec<(SocketAddr, Attempt)> = Vec::new();
    let mut next = 0;
    // The error to report, and the address it came from.
    let mut last_error: Option<(ConnectError, SocketAddr)> = None;
    let mut stagger = Box::pin(tokio::time::sleep_until(Instant::now()));
    let mut overall = Box::pin(tokio::time::sleep_until(deadline));
    let tcp = *tcp;
    // An attempt failed: the next one starts at once.
    let mut kick = false;
    std::future::poll_fn(|cx| {
        loop {
            let start_next = next < addrs.len()
                && (kick || pending.is_empty() || stagger.as_mut().poll(cx).is_ready());
            kick = false;
            if start_next {
                let a = addrs[next];
                next += 1;
                let left = deadline.saturating_duration_since(Instant::now());
                pending.push((
                    a,
                    Box::pin(async move { net::connect(a, left, &tcp).await }),
                ));
                stagger.as_mut().reset(Instant::now() + STAGGER);
                // Round again: the reset timer must be polled to wake this task.
                continue;
            }
            let mut i = 0;
            let mut failed_one = false;
            while i < pending.len() {
                match pending[i].1.as_mut().poll(cx) {
                    Poll::Ready(Ok(sock)) => {
                        return Poll::Ready(Ok(Dialed {
                            sock,
                            addr: pending[i].0,
                        }));
                    }
                    Poll::Ready(Err(e)) => {
                        // A timeout says less than a refusal seen earlier: keep that.
                        if !matches!(
                            (&e, &last_error),
                            (ConnectError::Timeout, Some((ConnectError::Failed(_), _)))
                        ) {
                            last_error = Some((e, pending[i].0));
                        }
                        drop(pending.swap_remove(i));
                        failed_one = true;
                    }
                    Poll::Pending => i += 1,
                }
            }
            if pending.is_empty() && next >= addrs.len() {
                return Poll::Ready(Err(match last_error.take() {
                    Some((e, a)) => (e, Some(a)),
                    None => (ConnectError::Timeout, None),
                }));
            }
            if overall.as_mut().poll(cx).is_ready() {
                let last = pending
                    .last()
                    .map(|p| p.0)
                    .or(last_error.as_ref().map(|l| l.1));
                return Poll::Ready(Err((ConnectError::Timeout, last)));
            }
            // A failure frees the way for the next address at once.
            if !(failed_one && next < addrs.len()) {
                return Poll::Pending;
            }
            kick = true;
        }
    })
    .await
}

fn classify(target: &Target, e: io::Error) -> DialError {
    let reason = format!("{target}: {e}");
    match e.raw_os_error() {
        Some(libc_errno::ECONNREFUSED) => DialError::Refused(reason),
        Some(libc_errno::EHOSTUNREACH) => DialError::HostUnreachable(reason),
        Some(libc_errno::ENETUNREACH) => DialError::NetworkUnreachable(reason),
        Some(libc_errno::ETIMEDOUT) => DialError::Timeout(reason),
        _ => DialError::Failed(reason),
    }
}

/// The errno values told apart (Linux).
mod libc_errno {
    pub const ECONNREFUSED: i32 = rustix::io::Errno::CONNREFUSED.raw_os_error();
    pub const EHOSTUNREACH: i32 = rustix::io::Errno::HOSTUNREACH.raw_os_error();
    pub const ENETUNREACH: i32 = rustix::io::Errno::NETUNREACH.raw_os_error();
    pub const ETIMEDOUT: i32 = rustix::io::Errno::TIMEDOUT.raw_os_error();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::parse_rule;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn families_alternate_from_the_first() {
        let got = interleave(vec![
            sa("[::1]:1"),
            sa("[::2]:1"),
            sa("[::3]:1"),
            sa("1.1.1.1:1"),
        ]);
        assert_eq!(
            got,
            vec![sa("[::1]:1"), sa("1.1.1.1:1"), sa("[::2]:1"), sa("[::3]:1")]
        );
        assert_eq!(interleave(vec![sa("1.1.1.1:1")]), vec![sa("1.1.1.1:1")]);
    }

    #[test]
    fn own_addresses() {
        let own = OwnAddrs::new([sa("127.0.0.1:1080"), sa("0.0.0.0:8080"), sa("[::]:9090")]);
        assert!(own.contains(sa("127.0.0.1:1080")));
        assert!(own.contains(sa("[::ffff:127.0.0.1]:1080")));
        assert!(own.contains(sa("0.0.0.0:1080")));
        assert!(!own.contains(sa("127.0.0.2:1080")));
        assert!(own.contains(sa("127.0.0.5:8080")));
        assert!(own.contains(sa("[::1]:9090")));
        assert!(!own.contains(sa("192.0.2.1:8080")));
        assert!(!own.contains(sa("127.0.0.1:8081")));
    }

    /// A port nothing listens on.
    fn refused_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    #[tokio::test]
    async fn a_refused_address_makes_way_for_the_next() {
        let good = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let good_addr = good.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let d = race(
            &[refused_port(), good_addr],
            deadline,
            &TcpOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(d.addr, good_addr);
        // All refused: the refusal is what is reported, not a timeout.
        let all_bad = race(
            &[refused_port(), refused_port()],
            deadline,
            &TcpOptions::default(),
        )
        .await;
        assert!(matches!(all_bad, Err((ConnectError::Failed(_), Some(_)))));
    }

    #[tokio::test]
    async fn a_silent_address_does_not_hold_up_the_next() {
        // A listener with a full backlog of 0 drops further SYNs: a connect to it hangs.
        let silent =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        silent.bind(&sa("127.0.0.1:0").into()).unwrap();
        silent.listen(0).unwrap();
        let silent_addr = silent.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..4 {
            match std::net::TcpStream::connect_timeout(&silent_addr, Duration::from_millis(200)) {
                Ok(c) => fillers.push(c),
                Err(_) => break,
            }
        }
        let good = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let good_addr = good.local_addr().unwrap();
        // Far longer than the stagger: the second attempt starts long before it.
        let deadline = Instant::now() + Duration::from_secs(60);
        let d = tokio::time::timeout(
            Duration::from_secs(30),
            race(&[silent_addr, good_addr], deadline, &TcpOptions::default()),
        )
        .await
        .expect("the second address is tried while the first hangs")
        .unwrap();
        assert_eq!(d.addr, good_addr);
    }

    #[tokio::test]
    async fn refused_without_contacting_anything() {
        let d = crate::destinations::Destinations::new(vec![parse_rule("10.0.0.0/8:443").unwrap()]);
        let own = OwnAddrs::new([sa("127.0.0.1:1080")]);
        let p = Policy {
            listener: &d,
            user: None,
            own: &own,
        };
        let dial_cfg = Dial::default();
        for t in [
            Target::addr(sa("127.0.0.1:443")),
            Target::addr(sa("10.0.0.1:80")),
            Target::name("example.invalid", 80),
        ] {
            assert!(
                matches!(
                    dial(&t, &p, &dial_cfg).await,
                    Err(Failure {
                        error: DialError::Denied(_),
                        server: None
                    })
                ),
                "{t}"
            );
        }
        let narrow =
            crate::destinations::Destinations::new(vec![parse_rule("10.1.0.0/16:443").unwrap()]);
        let p = Policy {
            listener: &d,
            user: Some(&narrow),
            own: &own,
        };
        assert!(matches!(
            dial(&Target::addr(sa("10.2.0.1:443")), &p, &dial_cfg).await,
            Err(Failure {
                error: DialError::Denied(_),
                ..
            })
        ));
    }
}
