//! Quick mode (`ferry run --listen … --upstream … [--admin …]`): each command-line value is
//! checked on its own (so an error names the one that is wrong), then written into the
//! config file it stands for, which the config parser reads like any other.

use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;

use super::parse::{name_port, server_addr, socket_addr};
use super::{Config, ConfigErrors, parse_str};

/// A `--listen` value: `IP:PORT`, `[IPv6]:PORT`, `:PORT` (every IPv4 address:
/// `0.0.0.0:PORT`), or `HOST:PORT` (every address HOST resolves to now, e.g. `localhost`).
pub fn listen_addrs(s: &str) -> Result<Vec<SocketAddr>, String> {
    if let Some(port) = s.strip_prefix(':')
        && !port.contains(':')
    {
        return match port.parse::<u16>() {
            Ok(p) => Ok(vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, p))]),
            Err(_) => Err(format!(
                "bad address {s:?}: port {port:?} is not a number from 0 to 65535"
            )),
        };
    }
    resolve(s)
}

/// An `--admin` value: `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` (the first address HOST
/// resolves to). A bare `:PORT` is refused: quick mode sets no admin token, so the address
/// the admin API is open on is chosen explicitly.
pub fn admin_addr(s: &str) -> Result<SocketAddr, String> {
    if let Some(port) = s.strip_prefix(':')
        && !port.contains(':')
    {
        return Err(format!(
            "bad address {s:?}: give the IP address to serve the admin API on, e.g. \"127.0.0.1{s}\" (it has no token in quick mode)"
        ));
    }
    Ok(resolve(s)?[0])
}

/// An `--upstream` value: `IP:PORT`, `[IPv6]:PORT` or `NAME:PORT`, as a config file's
/// `servers` takes it (a name is resolved at run time and re-resolved every
/// `resolve_interval`, not here).
pub fn server(s: &str) -> Result<(), String> {
    server_addr(s).map(|_| ())
}

/// `s` as an IP address, or as a name looked up now (addresses in the resolver's order,
/// each once).
fn resolve(s: &str) -> Result<Vec<SocketAddr>, String> {
    let err = match socket_addr(s) {
        Ok(a) => return Ok(vec![a]),
        Err(e) => e,
    };
    let Some((host, port)) = name_port(s) else {
        // Say that a name would do too, where the parser's hint says "not an IP address".
        return Err(match err.strip_suffix(" is not an IP address") {
            Some(e) => format!("{e} is neither an IP address nor a host name"),
            None => err,
        });
    };
    let found = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host:?}: {e}"))?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in found {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.is_empty() {
        return Err(format!("{host:?} resolves to no address"));
    }
    Ok(addrs)
}

/// `s` as a TOML basic string, escaped: a value can never end the string early.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl Config {
    /// The quick-mode config: one listener on `listen`, one round-robin pool of `servers`
    /// (addresses or names, as a config file's `servers` takes them), the admin server on
    /// `admin` if given, everything else at its default. Made by the config parser from the
    /// file it stands for, so quick mode and a config file cannot disagree on a default
    /// (nor on how a server name is resolved).
    pub fn quick(
        listen: &[SocketAddr],
        servers: &[String],
        admin: Option<SocketAddr>,
    ) -> Result<Config, ConfigErrors> {
        let mut unique: Vec<SocketAddr> = Vec::new();
        for a in listen {
            if !unique.contains(a) {
                unique.push(*a);
            }
        }
        let list = |items: Vec<String>| {
            let quoted: Vec<String> = items.iter().map(|s| toml_string(s)).collect();
            quoted.join(", ")
        };
        let mut text = String::new();
        if let Some(a) = admin {
            text.push_str(&format!(
                "[admin]\nlisten = {}\n\n",
                toml_string(&a.to_string())
            ));
        }
        text.push_str(&format!(
            "[[listener]]\nname = \"quick\"\nlisten = [{}]\nupstream = \"quick\"\n\n\
             [[upstream]]\nname = \"quick\"\nservers = [{}]\n",
            list(unique.iter().map(|a| a.to_string()).collect()),
            list(servers.to_vec())
        ));
        parse_str(&text, "(command line)", Path::new("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServerAddr;

    #[test]
    fn listen_forms() {
        let one = |s: &str| listen_addrs(s).unwrap();
        assert_eq!(one(":7000"), vec!["0.0.0.0:7000".parse().unwrap()]);
        assert_eq!(one("[::]:7000"), vec!["[::]:7000".parse().unwrap()]);
        assert_eq!(one("127.0.0.1:0"), vec!["127.0.0.1:0".parse().unwrap()]);
        let local = one("localhost:7000");
        assert!(
            local
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 7000)
        );
        for bad in [
            ":",
            ":x",
            ":70000",
            "7000",
            "nonsense",
            "a\"b:1",
            "host:port",
            "1.2.3:4",
            "::1:7000",
            "x\n[admin]:1",
        ] {
            assert!(listen_addrs(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn admin_forms() {
        assert_eq!(
            admin_addr("127.0.0.1:9900").unwrap(),
            "127.0.0.1:9900".parse().unwrap()
        );
        assert!(admin_addr("localhost:9900").unwrap().ip().is_loopback());
        let e = admin_addr(":9900").unwrap_err();
        assert!(e.contains("127.0.0.1:9900"), "{e}");
    }

    #[test]
    fn servers_by_name_pass_through() {
        for ok in [
            "localhost:6379",
            "db.internal:5432",
            "10.0.0.1:5432",
            "[::1]:1",
        ] {
            server(ok).unwrap();
        }
        for bad in [
            "db.internal",
            "db.internal:0",
            "a\"b:1",
            "x:1\n[admin]",
            "a b:1",
        ] {
            assert!(server(bad).is_err(), "{bad:?}");
        }
        let cfg = Config::quick(
            &["127.0.0.1:7000".parse().unwrap()],
            &["DB.internal:5432".into()],
            Some("127.0.0.1:9900".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(
            cfg.upstreams[0].servers[0].addr,
            ServerAddr::Name {
                host: "db.internal".into(),
                port: 5432
            }
        );
        assert_eq!(
            cfg.admin.unwrap().listen,
            "127.0.0.1:9900".parse::<SocketAddr>().unwrap()
        );
    }

    /// A value that reaches `Config::quick` unchecked still cannot add TOML of its own.
    #[test]
    fn values_are_escaped() {
        for evil in ["a\"]\n[admin]\nlisten = \"0.0.0.0:1\"\n#", "x\\\"", "x\n"] {
            let r = Config::quick(
                &["127.0.0.1:7000".parse().unwrap()],
                &[evil.to_string()],
                None,
            );
            let errs = r.expect_err("an invalid server");
            assert_eq!(errs.0.len(), 1, "{errs:?}");
        }
    }
}
