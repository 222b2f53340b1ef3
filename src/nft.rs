//! `ferry nft-rules`: the nftables rules that send traffic to the config's transparent
//! listeners, printed for the operator to review and load (`nft -f`).
//!
//! What is intercepted follows each listener's `destinations`: a CIDR entry becomes a match
//! on that network and its ports; a name entry, which nftables cannot match, its ports
//! alone; a listener without `destinations` (it sends to an upstream) takes all TCP. Traffic
//! to the host's own addresses is never intercepted. Locally generated traffic is
//! intercepted only for a listener with a `mark`, so that ferry's own outbound connections
//! (which carry it) can be let through instead of coming back to ferry.

use std::fmt::Write;
use std::net::SocketAddr;

use crate::config::{Config, Interception, Listener, ListenerMode, TransparentListen};
use crate::destinations::{Ports, Rule};

/// The routing mark TPROXY'd packets get, for the policy route that delivers them locally.
pub const TPROXY_MARK: u32 = 0x4665;
/// The routing table of that policy route.
pub const TPROXY_TABLE: u32 = 4665;

/// The rules for every transparent listener of `cfg`, or why there are none.
pub fn rules(cfg: &Config) -> Result<String, String> {
    let listeners: Vec<(&Listener, &TransparentListen)> = cfg
        .listeners
        .iter()
        .filter_map(|l| match &l.mode {
            ListenerMode::Transparent(t) => Some((l, &**t)),
            _ => None,
        })
        .collect();
    if listeners.is_empty() {
        return Err("the config has no listener with mode = \"transparent\"".into());
    }
    let mut nat_pre = String::new();
    let mut nat_out = String::new();
    let mut tp_pre = String::new();
    let mut tp_out = String::new();
    let mut notes = Vec::new();
    for (l, t) in &listeners {
        let head = format!(
            "        # listener {:?} ({})\n",
            l.name,
            match t.interception {
                Interception::Redirect => "redirect",
                Interception::Tproxy => "tproxy",
            }
        );
        let matches = matches_for(t);
        if t.interception == Interception::Redirect && l.listen.iter().any(|a| a.ip().is_loopback())
        {
            notes.push(format!(
                "listener {:?} listens on a loopback address, but REDIRECT in prerouting sends connections to the address of the interface they came in on: listen on 0.0.0.0 / [::] for them",
                l.name
            ));
        }
        let (pre, out) = match t.interception {
            Interception::Redirect => (&mut nat_pre, &mut nat_out),
            Interception::Tproxy => (&mut tp_pre, &mut tp_out),
        };
        pre.push_str(&head);
        if t.dial.mark.is_some() {
            out.push_str(&head);
        } else {
            notes.push(format!(
                "listener {:?} has no `mark`: connections made on this host are not intercepted (ferry's own would loop back); set `mark` to intercept them",
                l.name
            ));
        }
        for m in &matches {
            for fam in [Fam::V4, Fam::V6] {
                if !m.fam.is_none_or(|f| f == fam) {
                    continue;
                }
                let Some(addr) = listen_addr(&l.listen, fam) else {
                    continue;
                };
                let port = addr.port();
                // TPROXY hands the packet to the socket at this address (the packet's own
                // destination when it is a wildcard).
                let to = match addr {
                    a if a.ip().is_unspecified() => format!(":{port}"),
                    SocketAddr::V4(a) => a.to_string(),
                    SocketAddr::V6(a) => format!("[{}]:{port}", a.ip()),
                };
                let sel = format!("{} {}", fam.nfproto(), m.text);
                match t.interception {
                    Interception::Redirect => {
                        let _ = writeln!(pre, "        {sel} redirect to :{port}");
                        if t.dial.mark.is_some() {
                            let _ = writeln!(out, "        {sel} redirect to :{port}");
                        }
                    }
                    Interception::Tproxy => {
                        let _ = writeln!(
                            pre,
                            "        {sel} tproxy {} to {to} meta mark set {TPROXY_MARK:#x} accept",
                            fam.tproxy()
                        );
                        if t.dial.mark.is_some() {
                            let _ = writeln!(out, "        {sel} meta mark set {TPROXY_MARK:#x}");
                        }
                    }
                }
            }
        }
    }
    // ferry's own outbound connections carry their listener's mark: never intercepted.
    let marks: Vec<u32> = {
        let mut m: Vec<u32> = listeners.iter().filter_map(|(_, t)| t.dial.mark).collect();
        m.sort_unstable();
        m.dedup();
        m
    };
    let mark_return: String = marks
        .iter()
        .map(|m| format!("        meta mark {m:#x} return\n"))
        .collect();

    let mut s = String::new();
    s.push_str("# nftables rules for ferry's transparent listeners, from `ferry nft-rules`.\n");
    s.push_str("# Load with `nft -f FILE`; loading again replaces them (table inet ferry).\n");
    for n in &notes {
        let _ = writeln!(s, "# Note: {n}.");
    }
    s.push_str("table inet ferry\ndelete table inet ferry\ntable inet ferry {\n");
    if !nat_pre.is_empty() {
        let _ = write!(
            s,
            "    chain redirect_prerouting {{\n        type nat hook prerouting priority dstnat; policy accept;\n{nat_pre}    }}\n"
        );
    }
    if !nat_out.is_empty() {
        let _ = write!(
            s,
            "    chain redirect_output {{\n        type nat hook output priority -100; policy accept;\n{mark_return}{nat_out}    }}\n"
        );
    }
    if !tp_pre.is_empty() {
        let _ = write!(
            s,
            "    chain tproxy_prerouting {{\n        type filter hook prerouting priority mangle; policy accept;\n        meta l4proto tcp socket transparent 1 meta mark set {TPROXY_MARK:#x} accept\n{tp_pre}    }}\n"
        );
    }
    if !tp_out.is_empty() {
        let _ = write!(
            s,
            "    chain tproxy_output {{\n        type route hook output priority mangle; policy accept;\n{mark_return}{tp_out}    }}\n"
        );
    }
    s.push_str("}\n");
    if !tp_pre.is_empty() {
        let _ = write!(
            s,
            "# TPROXY also needs packets marked {TPROXY_MARK:#x} routed to this host (once, as root):\n#   ip rule add fwmark {TPROXY_MARK:#x} lookup {TPROXY_TABLE}\n#   ip route add local 0.0.0.0/0 dev lo table {TPROXY_TABLE}\n#   ip -6 rule add fwmark {TPROXY_MARK:#x} lookup {TPROXY_TABLE}\n#   ip -6 route add local ::/0 dev lo table {TPROXY_TABLE}\n"
        );
    }
    Ok(s)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn nfproto(self) -> &'static str {
        match self {
            Fam::V4 => "meta nfproto ipv4",
            Fam::V6 => "meta nfproto ipv6",
        }
    }

    fn tproxy(self) -> &'static str {
        match self {
            Fam::V4 => "ip",
            Fam::V6 => "ip6",
        }
    }
}

/// One thing to intercept: a match expression, for one family or both.
struct Match {
    fam: Option<Fam>,
    text: String,
}

fn matches_for(t: &TransparentListen) -> Vec<Match> {
    const NOT_LOCAL: &str = "fib daddr type != local";
    let dport = |p: &Ports| match (p.first, p.last) {
        (1, 65535) => String::new(),
        (a, b) if a == b => format!(" tcp dport {a}"),
        (a, b) => format!(" tcp dport {a}-{b}"),
    };
    let Some(d) = &t.destinations else {
        return vec![Match {
            fam: None,
            text: format!("meta l4proto tcp {NOT_LOCAL}"),
        }];
    };
    let mut out: Vec<Match> = Vec::new();
    for r in d.rules() {
        let m = match r {
            Rule::Net(ipnet::IpNet::V4(n), p) => Match {
                fam: Some(Fam::V4),
                text: format!("ip daddr {n} meta l4proto tcp{} {NOT_LOCAL}", dport(p)),
            },
            Rule::Net(ipnet::IpNet::V6(n), p) => Match {
                fam: Some(Fam::V6),
                text: format!("ip6 daddr {n} meta l4proto tcp{} {NOT_LOCAL}", dport(p)),
            },
            // Names are not known to the firewall: their ports.
            Rule::Name(_, p) => Match {
                fam: None,
                text: format!("meta l4proto tcp{} {NOT_LOCAL}", dport(p)),
            },
        };
        if !out.iter().any(|o| o.text == m.text && o.fam == m.fam) {
            out.push(m);
        }
    }
    out
}

/// The listener's address for `fam` (ferry binds `[::]` IPv6-only, so each family needs
/// an address of its own).
fn listen_addr(listen: &[SocketAddr], fam: Fam) -> Option<SocketAddr> {
    listen
        .iter()
        .find(|a| a.is_ipv4() == (fam == Fam::V4))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        crate::config::parse_str(text, "t.toml", std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn redirect_and_tproxy() {
        let c = cfg(r#"
[[listener]]
name = "r"
listen = ["0.0.0.0:15001", "[::]:15001"]
mode = "transparent"
destinations = ["10.0.0.0/8:443", "[2001:db8::/32]:8000-8100", "*.example.com:80"]
mark = 0x1

[[listener]]
name = "t"
listen = "127.0.0.1:15002"
mode = "transparent"
transparent = "tproxy"
destinations = ["192.168.0.0/16:*"]
"#);
        let r = rules(&c).unwrap();
        for want in [
            "chain redirect_prerouting",
            "meta nfproto ipv4 ip daddr 10.0.0.0/8 meta l4proto tcp tcp dport 443 fib daddr type != local redirect to :15001",
            "meta nfproto ipv6 ip6 daddr 2001:db8::/32 meta l4proto tcp tcp dport 8000-8100 fib daddr type != local redirect to :15001",
            "meta nfproto ipv4 meta l4proto tcp tcp dport 80 fib daddr type != local redirect to :15001",
            "meta nfproto ipv6 meta l4proto tcp tcp dport 80 fib daddr type != local redirect to :15001",
            "chain redirect_output",
            "meta mark 0x1 return",
            "chain tproxy_prerouting",
            "meta nfproto ipv4 ip daddr 192.168.0.0/16 meta l4proto tcp fib daddr type != local tproxy ip to 127.0.0.1:15002 meta mark set 0x4665 accept",
            "ip rule add fwmark 0x4665 lookup 4665",
            "listener \"t\" has no `mark`",
        ] {
            assert!(r.contains(want), "missing {want:?} in\n{r}");
        }
        // The tproxy listener listens on IPv4 only, and has no mark: no IPv6 or output rules.
        assert!(!r.contains("tproxy ip6"), "{r}");
        assert!(!r.contains("chain tproxy_output"), "{r}");
    }

    #[test]
    fn none_without_transparent_listeners() {
        let c = cfg(r#"
[[listener]]
name = "a"
listen = "127.0.0.1:0"
upstream = "u"
[[upstream]]
name = "u"
servers = ["127.0.0.1:1"]
"#);
        assert!(rules(&c).is_err());
    }
}
