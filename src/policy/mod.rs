//! What may come in: address ACLs and per-client limits, checked before any server is
//! contacted.

pub mod clients;

pub use clients::{ClientLimits, ClientPermit, ClientTable};

use std::net::IpAddr;

use ipnet::IpNet;

/// `allow` / `deny` lists of a listener. `deny` is checked first; with an `allow` list, only
/// addresses in it may connect. IPv4-mapped IPv6 clients (`::ffff:a.b.c.d`) match IPv4
/// rules.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    pub allow: Option<Vec<IpNet>>,
    pub deny: Vec<IpNet>,
}

impl Acl {
    pub fn is_empty(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty()
    }

    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        match &self.allow {
            Some(allow) => allow.iter().any(|n| n.contains(&ip)),
            None => true,
        }
    }
}

/// Whether `ip` is in any of `nets` (IPv4-mapped addresses match IPv4 networks).
pub fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn deny_first_then_allow() {
        let acl = Acl {
            allow: Some(nets(&["10.0.0.0/8", "2001:db8::/32"])),
            deny: nets(&["10.9.9.0/24"]),
        };
        assert!(acl.permits("10.1.2.3".parse().unwrap()));
        assert!(!acl.permits("10.9.9.1".parse().unwrap()));
        assert!(!acl.permits("192.168.1.1".parse().unwrap()));
        assert!(acl.permits("2001:db8::5".parse().unwrap()));
        assert!(!acl.permits("2001:db9::5".parse().unwrap()));
        // IPv4-mapped IPv6 matches the IPv4 rules.
        assert!(acl.permits("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!acl.permits("::ffff:10.9.9.9".parse().unwrap()));
    }

    #[test]
    fn deny_only() {
        let acl = Acl {
            allow: None,
            deny: nets(&["127.0.0.2/32"]),
        };
        assert!(acl.permits("127.0.0.1".parse().unwrap()));
        assert!(!acl.permits("127.0.0.2".parse().unwrap()));
    }
}
