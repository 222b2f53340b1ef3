//! The destination policy of the forward-proxy modes (`socks5`, `http-connect`,
//! `transparent`): which destinations a client may ask for. Nothing is reachable unless an
//! entry allows it.
//!
//! Entries are `CIDR:ports`, `name:ports` or `*.domain:ports` (IPv6 as
//! `[2001:db8::/32]:443`; ports `443`, `8000-8100` or `*`). The rules:
//! - An IP literal is matched against CIDR entries only, never against names.
//! - A name is checked twice: before it is resolved (some entry could allow it at all:
//!   otherwise it is refused without a lookup), and then each address it resolves to,
//!   which is dialled only if allowed: an exact name entry allows whatever the name
//!   resolves to; a name matched by a wildcard entry may not resolve to an internal
//!   address (loopback, link-local, private, shared, multicast, unspecified, reserved)
//!   unless a CIDR entry allows that address; a name no name entry matches is allowed
//!   only where a CIDR entry allows the address. So a name an attacker controls cannot
//!   point the proxy at the inside (DNS rebinding, SSRF to the cloud metadata address).
//!
//! Immutable once parsed; a reload builds a new one.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use crate::config::NamePattern;

/// Ports of an entry: an inclusive range (`*` is `1..=65535`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub first: u16,
    pub last: u16,
}

impl Ports {
    fn contains(self, p: u16) -> bool {
        (self.first..=self.last).contains(&p)
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first, self.last) {
            (1, 65535) => f.write_str("*"),
            (a, b) if a == b => write!(f, "{a}"),
            (a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// One entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Net(IpNet, Ports),
    Name(NamePattern, Ports),
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Net(IpNet::V6(n), p) => write!(f, "[{n}]:{p}"),
            Rule::Net(n, p) => write!(f, "{n}:{p}"),
            Rule::Name(n, p) => write!(f, "{n}:{p}"),
        }
    }
}

/// A list of entries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Destinations {
    rules: Vec<Rule>,
}

/// How a name matched the name entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NameMatch {
    /// An exact entry: any address it resolves to.
    Exact,
    /// Only a wildcard entry: not to internal addresses.
    Wildcard,
    /// No name entry: CIDR entries decide.
    None,
}

impl Destinations {
    pub fn new(rules: Vec<Rule>) -> Destinations {
        Destinations { rules }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether a CIDR entry allows `addr` (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn allows_addr(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        self.rules.iter().any(|r| match r {
            Rule::Net(n, p) => p.contains(addr.port()) && n.contains(&ip),
            Rule::Name(..) => false,
        })
    }

    fn name_match(&self, name: &str, port: u16) -> NameMatch {
        let mut m = NameMatch::None;
        for r in &self.rules {
            if let Rule::Name(pat, p) = r
                && p.contains(port)
                && pat.matches(name)
            {
                match pat {
                    NamePattern::Exact(_) => return NameMatch::Exact,
                    NamePattern::Wildcard(_) => m = NameMatch::Wildcard,
                }
            }
        }
        m
    }

    /// Whether some entry could allow `name` (lowercase) at `port`, before it is resolved:
    /// a name entry matches it, or a CIDR entry covers the port. When not, the name is
    /// refused without a lookup.
    pub fn may_allow_name(&self, name: &str, port: u16) -> bool {
        self.name_match(name, port) != NameMatch::None
            || self
                .rules
                .iter()
                .any(|r| matches!(r, Rule::Net(_, p) if p.contains(port)))
    }

    /// Whether `addr`, which `name` (lowercase) resolved to, may be dialled.
    pub fn allows_resolved(&self, name: &str, addr: SocketAddr) -> bool {
        match self.name_match(name, addr.port()) {
            NameMatch::Exact => true,
            NameMatch::Wildcard => !is_internal(addr.ip()) || self.allows_addr(addr),
            NameMatch::None => self.allows_addr(addr),
        }
    }
}

impl fmt::Display for Destinations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they stand for.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Addresses a name matched only by a wildcard may not resolve to: anything that is not a
/// public unicast address.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(a) => internal_v4(a),
        IpAddr::V6(a) => internal_v6(a),
    }
}

fn internal_v4(a: Ipv4Addr) -> bool {
    let [b0, b1, b2, _] = a.octets();
    a.is_unspecified()
        || b0 == 0 // "this network"
        || a.is_loopback()
        || a.is_private()
        || a.is_link_local() // 169.254.0.0/16, cloud metadata among them
        || (b0 == 100 && (64..128).contains(&b1)) // shared address space (CGNAT)
        || (b0 == 192 && b1 == 0 && b2 == 0) // IETF protocol assignments
        || (b0 == 198 && (b1 == 18 || b1 == 19)) // benchmarking
        || a.is_multicast()
        || b0 >= 240 // reserved, and the broadcast address
}

fn internal_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        // IPv4 embedded by NAT64 (64:ff9b::/96) or IPv4-compatible (::/96): judged as IPv4.
        || (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..6] == [0; 6])
            && internal_v4(Ipv4Addr::new(
                (s[6] >> 8) as u8,
                s[6] as u8,
                (s[7] >> 8) as u8,
                s[7] as u8,
            ))
        || s[0] == 0x2001 && s[1] == 0x0db8 // documentation
}

/// Parses one entry as the config writes it.
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    let hint = "expected CIDR:ports, name:ports or *.domain:ports, e.g. \"10.0.0.0/8:443\", \"db.example.com:5432\", \"*.internal:*\", \"[2001:db8::/32]:8000-8100\"";
    let Some((host, ports)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} has no port: {hint}"));
    };
    let ports = parse_ports(ports).map_err(|e| format!("{s:?}: {e}"))?;
    if let Some(inner) = host.strip_prefix('[') {
        let inner = inner
            .strip_suffix(']')
            .ok_or_else(|| format!("{s:?}: unbalanced brackets"))?;
        let net = parse_net(inner)
            .filter(|n| matches!(n, IpNet::V6(_)))
            .ok_or_else(|| format!("{s:?}: {inner:?} is not an IPv6 address or network"))?;
        return Ok(Rule::Net(net, ports));
    }
    if host.contains(':') {
        return Err(format!(
            "{s:?}: write IPv6 addresses in brackets, e.g. \"[2001:db8::/32]:443\""
        ));
    }
    if let Some(net) = parse_net(host) {
        return Ok(Rule::Net(net, ports));
    }
    if host
        .bytes()
        .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
    {
        return Err(format!(
            "{s:?}: {host:?} is not a valid IPv4 address or network"
        ));
    }
    let pat = NamePattern::parse(host).map_err(|e| format!("{e}; {hint}"))?;
    Ok(Rule::Name(pat, ports))
}

fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(n.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

fn parse_ports(s: &str) -> Result<Ports, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("port {p:?} is not a number from 1 to 65535")),
        }
    };
    if s == "*" {
        return Ok(Ports {
            first: 1,
            last: 65535,
        });
    }
    match s.split_once('-') {
        None => port(s).map(|p| Ports { first: p, last: p }),
        Some((a, b)) => {
            let (first, last) = (port(a)?, port(b)?);
            if first > last {
                return Err(format!("the port range {s:?} is empty"));
            }
            Ok(Ports { first, last })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(rules: &[&str]) -> Destinations {
        Destinations::new(rules.iter().map(|r| parse_rule(r).unwrap()).collect())
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_form() {
        for (s, shown) in [
            ("10.0.0.0/8:443", "10.0.0.0/8:443"),
            ("10.1.2.3/8:443", "10.0.0.0/8:443"),
            ("10.0.0.1:80-90", "10.0.0.1/32:80-90"),
            ("db.Example.com:5432", "db.example.com:5432"),
            ("*.internal:*", "*.internal:*"),
            ("[2001:db8::/32]:8000-8100", "[2001:db8::/32]:8000-8100"),
            ("[::1]:22", "[::1/128]:22"),
            ("0.0.0.0/0:443", "0.0.0.0/0:443"),
        ] {
            assert_eq!(parse_rule(s).unwrap().to_string(), shown, "{s}");
        }
        for bad in [
            "10.0.0.0/8",
            "example.com",
            "10.0.0.0/8:0",
            "10.0.0.0/8:70000",
            "10.0.0.0/8:90-80",
            "10.0.0.0/33:1",
            "2001:db8::/32:443",
            "[10.0.0.0/8]:443",
            "[2001:db8::/32:443",
            "300.1.1.1:80",
            "exa mple.com:80",
            "*:80",
            "a.*.com:80",
            ":80",
        ] {
            assert!(parse_rule(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn ip_literals_match_cidr_entries_only() {
        let p = d(&["10.0.0.0/8:443", "localhost:*", "[2001:db8::/32]:8000-8100"]);
        assert!(p.allows_addr(sa("10.9.9.9:443")));
        assert!(!p.allows_addr(sa("10.9.9.9:444")));
        assert!(!p.allows_addr(sa("11.0.0.1:443")));
        // Names never allow an address given as such.
        assert!(!p.allows_addr(sa("127.0.0.1:80")));
        assert!(p.allows_addr(sa("[2001:db8::1]:8050")));
        assert!(!p.allows_addr(sa("[2001:db8::1]:443")));
        // IPv4-mapped IPv6 is IPv4.
        assert!(p.allows_addr(sa("[::ffff:10.0.0.1]:443")));
    }

    #[test]
    fn exact_names_allow_what_they_resolve_to() {
        let p = d(&["db.example.com:5432", "*.example.com:*"]);
        assert!(p.may_allow_name("db.example.com", 5432));
        assert!(p.allows_resolved("db.example.com", sa("127.0.0.1:5432")));
        // On another port only the wildcard matches: not to loopback.
        assert!(!p.allows_resolved("db.example.com", sa("127.0.0.1:5433")));
        assert!(p.allows_resolved("db.example.com", sa("93.184.216.34:5433")));
    }

    #[test]
    fn wildcards_never_reach_the_inside_unless_a_cidr_allows_it() {
        let p = d(&["*.example.com:*"]);
        assert!(p.may_allow_name("a.example.com", 443));
        assert!(!p.may_allow_name("example.com", 443));
        assert!(!p.may_allow_name("a.b.example.com", 443));
        for inside in [
            "127.0.0.1:443",
            "10.1.1.1:443",
            "172.16.0.1:443",
            "192.168.1.1:443",
            "169.254.169.254:80",
            "100.64.0.1:443",
            "0.0.0.0:443",
            "224.0.0.1:443",
            "255.255.255.255:443",
            "[::1]:443",
            "[::]:443",
            "[fe80::1]:443",
            "[fd00::1]:443",
            "[ff02::1]:443",
            "[::ffff:127.0.0.1]:443",
            "[64:ff9b::a9fe:a9fe]:80",
            "[::127.0.0.1]:443",
        ] {
            assert!(
                !p.allows_resolved("a.example.com", sa(inside)),
                "{inside} allowed"
            );
        }
        for outside in [
            "93.184.216.34:443",
            "[2606:2800:220:1::1]:443",
            "[64:ff9b::5db8:d822]:443",
        ] {
            assert!(
                p.allows_resolved("a.example.com", sa(outside)),
                "{outside} refused"
            );
        }
        let with_net = d(&["*.example.com:*", "10.0.0.0/8:443"]);
        assert!(with_net.allows_resolved("a.example.com", sa("10.1.1.1:443")));
        assert!(!with_net.allows_resolved("a.example.com", sa("10.1.1.1:80")));
    }

    #[test]
    fn names_without_a_name_entry_go_by_cidr_entries() {
        let p = d(&["10.0.0.0/8:443"]);
        assert!(p.may_allow_name("db.internal", 443));
        assert!(!p.may_allow_name("db.internal", 80));
        assert!(p.allows_resolved("db.internal", sa("10.0.0.5:443")));
        assert!(!p.allows_resolved("db.internal", sa("127.0.0.1:443")));
        assert!(!d(&["example.com:443"]).may_allow_name("other.com", 443));
        assert!(!Destinations::default().may_allow_name("example.com", 443));
        assert!(!Destinations::default().allows_addr(sa("1.1.1.1:443")));
    }
}
