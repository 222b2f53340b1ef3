//! Private network namespaces joined by veth pairs, for data-path tests on packets the size
//! a real network delivers. Loopback hands a receiver 64 KiB packets; a veth pair with MTU
//! 1500 and segmentation offload capped at 1500 bytes hands it 1,448-byte segments, as a
//! NIC does, so socket queues fill with many small packets.
//!
//! A [`Path3`] is three namespaces in a row: client ─ proxy ─ server. The test's own
//! sockets are made inside a namespace by a short-lived thread that joins it ([`in_ns`]);
//! ferry runs inside the proxy's namespace (`ip netns exec`). Everything is removed when
//! the value is dropped (deleting a namespace deletes its veth ends).
//!
//! Needs root (CI runs as root) and `ip` from iproute2.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

use super::{Ferry, WAIT};

/// Runs `ip ARGS`; panics with its stderr if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (iproute2): {e}"));
    assert!(
        out.status.success(),
        "`ip {}` failed (these tests need root): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Network namespaces deleted on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Client ─ proxy ─ server, each in its own namespace, joined by two veth pairs with MTU
/// 1500 and GSO/GRO capped at 1500 bytes.
pub struct Path3 {
    pub client_ns: String,
    pub proxy_ns: String,
    pub server_ns: String,
    /// The proxy's address on the client side: where ferry listens.
    pub proxy_ip: IpAddr,
    /// The server's address.
    pub server_ip: IpAddr,
    /// The same, IPv6.
    pub proxy_ip6: IpAddr,
    pub server_ip6: IpAddr,
    _ns: Namespaces,
}

impl Path3 {
    pub fn new() -> Path3 {
        static N: AtomicUsize = AtomicUsize::new(0);
        let tag = format!(
            "ferry-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let [c, p, s] = ["c", "p", "s"].map(|x| format!("{tag}-{x}"));
        let mut ns = Namespaces(Vec::new());
        for n in [&c, &p, &s] {
            ip(&["netns", "add", n]);
            ns.0.push(n.clone());
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        // Interface names are per namespace, so they can be fixed.
        link(
            &c,
            "to-proxy",
            "10.77.1.1/24",
            &p,
            "to-client",
            "10.77.1.2/24",
        );
        link(
            &p,
            "to-server",
            "10.77.2.1/24",
            &s,
            "to-proxy",
            "10.77.2.2/24",
        );
        ip(&["-n", &c, "route", "add", "10.77.2.0/24", "via", "10.77.1.2"]);
        ip(&["-n", &s, "route", "add", "10.77.1.0/24", "via", "10.77.2.1"]);
        // IPv6 too, usable at once (no duplicate address detection).
        for (n, dev, addr) in [
            (&c, "to-proxy", "fd77:1::1/64"),
            (&p, "to-client", "fd77:1::2/64"),
            (&p, "to-server", "fd77:2::1/64"),
            (&s, "to-proxy", "fd77:2::2/64"),
        ] {
            ip(&["-n", n, "addr", "add", addr, "dev", dev, "nodad"]);
        }
        ip(&[
            "-n",
            &c,
            "-6",
            "route",
            "add",
            "fd77:2::/64",
            "via",
            "fd77:1::2",
        ]);
        ip(&[
            "-n",
            &s,
            "-6",
            "route",
            "add",
            "fd77:1::/64",
            "via",
            "fd77:2::1",
        ]);
        Path3 {
            client_ns: c,
            proxy_ns: p,
            server_ns: s,
            proxy_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 1, 2)),
            server_ip: IpAddr::V4(Ipv4Addr::new(10, 77, 2, 2)),
            proxy_ip6: "fd77:1::2".parse().unwrap(),
            server_ip6: "fd77:2::2".parse().unwrap(),
            _ns: ns,
        }
    }

    /// Checksums made and checked in software on all four veth ends (`ethtool -K … tx off
    /// rx off`): a datagram's checksum is then verified where it is received, so one that
    /// a rewrite on the way got wrong is dropped and counted ([`udp_checksum_errors`]).
    pub fn checksums_in_software(&self) {
        for (ns, dev) in [
            (&self.client_ns, "to-proxy"),
            (&self.proxy_ns, "to-client"),
            (&self.proxy_ns, "to-server"),
            (&self.server_ns, "to-proxy"),
        ] {
            let out = Command::new("ip")
                .args([
                    "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off",
                ])
                .output()
                .unwrap_or_else(|e| panic!("cannot run `ip netns exec … ethtool`: {e}"));
            assert!(
                out.status.success(),
                "ethtool -K {dev} in {ns}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }

    /// A connection from `ns` to `addr`.
    pub fn connect_from(&self, ns: &str, addr: SocketAddr) -> tokio::net::TcpStream {
        let s = in_ns(ns, move || {
            std::net::TcpStream::connect_timeout(&addr, WAIT)
                .unwrap_or_else(|e| panic!("connect to {addr} from {ns}: {e}"))
        });
        s.set_nonblocking(true).unwrap();
        tokio::net::TcpStream::from_std(s).unwrap()
    }

    /// A listening socket in the server's namespace on `addr`.
    pub fn server_listener_on(&self, addr: SocketAddr) -> tokio::net::TcpListener {
        let l = in_ns(&self.server_ns, move || {
            std::net::TcpListener::bind(addr)
                .unwrap_or_else(|e| panic!("bind {addr} in the server namespace: {e}"))
        });
        l.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(l).unwrap()
    }

    /// Starts ferry inside the proxy's namespace (see [`Ferry::start`]).
    pub async fn start_ferry(&self, config: &str, listening: usize) -> Ferry {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("access.log");
        let config_path = dir.path().join("ferry.toml");
        let text = config.replace("@LOG@", &log_path.display().to_string());
        std::fs::write(&config_path, text).expect("write config");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.proxy_ns,
            super::ferry_bin(),
            "run",
            "--config",
        ])
        .arg(&config_path);
        Ferry::spawn(cmd, dir, config_path, log_path, listening).await
    }

    /// A listening socket on the server's address (port chosen by the kernel).
    pub fn server_listener(&self) -> tokio::net::TcpListener {
        let ip = self.server_ip;
        let l = in_ns(&self.server_ns, move || {
            std::net::TcpListener::bind((ip, 0)).expect("bind in the server namespace")
        });
        l.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(l).unwrap()
    }

    /// A connection from the client's namespace to `addr`.
    pub fn connect(&self, addr: SocketAddr) -> tokio::net::TcpStream {
        let s = in_ns(&self.client_ns, move || {
            std::net::TcpStream::connect_timeout(&addr, WAIT)
                .unwrap_or_else(|e| panic!("connect to {addr} from the client namespace: {e}"))
        });
        s.set_nonblocking(true).unwrap();
        tokio::net::TcpStream::from_std(s).unwrap()
    }
}

/// Two namespaces joined by a veth pair: MTU 1500, and packets built and merged no larger
/// than that (`gso_max_size`, `gro_max_size`), so each segment travels on its own.
pub fn link(a_ns: &str, a: &str, a_ip: &str, b_ns: &str, b: &str, b_ip: &str) {
    ip(&[
        "-n", a_ns, "link", "add", a, "type", "veth", "peer", "name", b, "netns", b_ns,
    ]);
    for (ns, dev, addr) in [(a_ns, a, a_ip), (b_ns, b, b_ip)] {
        ip(&[
            "-n",
            ns,
            "link",
            "set",
            dev,
            "mtu",
            "1500",
            "gso_max_size",
            "1500",
            "gro_max_size",
            "1500",
        ]);
        ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
}

/// UDP datagrams dropped for a bad checksum in namespace `ns`, IPv4 and IPv6
/// (`InCsumErrors` of `/proc/net/snmp`, `Udp6InCsumErrors` of `/proc/net/snmp6`).
pub fn udp_checksum_errors(ns: &str) -> u64 {
    let read = |file: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "cat", file])
            .output()
            .unwrap_or_else(|e| panic!("cannot read {file} in {ns}: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // snmp: a line of names, then one of values, per protocol.
    let snmp = read("/proc/net/snmp");
    let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let v4 = match udp.as_slice() {
        [names, values] => names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == "InCsumErrors")
            .and_then(|(_, v)| v.parse::<u64>().ok()),
        _ => None,
    }
    .unwrap_or_else(|| panic!("no Udp InCsumErrors in {ns}:\n{snmp}"));
    let snmp6 = read("/proc/net/snmp6");
    let v6 = snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Udp6InCsumErrors"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no Udp6InCsumErrors in {ns}:\n{snmp6}"));
    v4 + v6
}

/// Runs `f` on a thread that has joined network namespace `ns`: sockets it makes belong to
/// that namespace and keep doing so wherever they are used afterwards.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&fd),
                    Some(LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|e| panic!("join {ns}: {e}"));
                f()
            })
            .join()
            .expect("namespace thread")
    })
}

/// A bound far above what any wait here normally takes.
pub const SLOW: Duration = Duration::from_secs(30);

/// One network namespace of the test's own, with only loopback (up): for what a host
/// without routes does (`ip -n NAME route add unreachable …` and the like). Deleted on drop.
pub struct Netns {
    pub name: String,
    _ns: Namespaces,
}

impl Netns {
    pub fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ferry-{}-ns{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name]);
        let ns = Namespaces(vec![name.clone()]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns { name, _ns: ns }
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Starts ferry inside the namespace (see [`Ferry::start`]).
    pub async fn start_ferry(&self, config: &str, listening: usize) -> Ferry {
        Ferry::start_wrapped(config, listening, &["ip", "netns", "exec", &self.name]).await
    }

    /// A connection made from inside the namespace to `addr`.
    pub fn connect(&self, addr: SocketAddr) -> tokio::net::TcpStream {
        let s = in_ns(&self.name, move || {
            std::net::TcpStream::connect_timeout(&addr, WAIT)
                .unwrap_or_else(|e| panic!("connect to {addr} in the namespace: {e}"))
        });
        s.set_nonblocking(true).unwrap();
        tokio::net::TcpStream::from_std(s).unwrap()
    }
}
