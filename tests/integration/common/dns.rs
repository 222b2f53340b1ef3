//! A DNS server of the test's own: dnsmasq on 127.0.0.1, answering only from what the test
//! gives it (nothing is forwarded anywhere), and `dig` to ask it or a proxy in front of it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

/// dnsmasq on 127.0.0.1:`port`. Killed on drop.
pub struct Dnsmasq {
    child: Child,
    pub port: u16,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dnsmasq {
    /// Starts dnsmasq with `records` (its options) on `port` (a restart: the previous one
    /// was dropped) or on a free one; returns once it answers `ready`: a name and the
    /// address it must give.
    pub fn start(port: Option<u16>, records: &[String], ready: (&str, &str)) -> Dnsmasq {
        for _ in 0..20 {
            let port = port.unwrap_or_else(|| {
                std::net::UdpSocket::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            });
            let child = Command::new("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--user=root",
                    "--pid-file=",
                    &format!("--port={port}"),
                ])
                .args(records)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run dnsmasq (scripts/setup-test-deps installs dnsmasq-base)");
            let mut d = Dnsmasq { child, port };
            // Serving once a query is answered; a port taken meanwhile makes it exit.
            for _ in 0..100 {
                if d.child.try_wait().unwrap().is_some() {
                    break;
                }
                if dig(d.addr(), ready.0, 1).as_deref() == Some(ready.1) {
                    return d;
                }
            }
            drop(d);
        }
        panic!("dnsmasq did not start");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

/// `dig +short NAME A` at `server`: the first answer, if any (one try of `secs` seconds).
pub fn dig(server: SocketAddr, name: &str, secs: u32) -> Option<String> {
    let tries = ["+tries=1".to_string(), format!("+time={secs}")];
    ask("dig", "bind9-dnsutils", server, name, &tries)
}

/// `kdig +short NAME A` at `server` over UDP: the first answer, if any (one try, 5 s).
pub fn kdig(server: SocketAddr, name: &str) -> Option<String> {
    let tries = ["+retry=0", "+time=5", "+notcp"].map(String::from);
    ask("kdig", "knot-dnsutils", server, name, &tries)
}

/// Runs `program @IP -p PORT NAME A +short` with `options`: the first line of its answer
/// (a comment is none).
fn ask(
    program: &str,
    package: &str,
    server: SocketAddr,
    name: &str,
    options: &[String],
) -> Option<String> {
    let out = Command::new(program)
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            name,
            "A",
            "+short",
        ])
        .args(options)
        .output()
        .unwrap_or_else(|e| panic!("run {program} ({package}): {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
        .filter(|l| !l.starts_with(';'))
}
