//! Transparent mode (`mode = "transparent"`), for real: three network namespaces made by
//! the test (client ─ proxy ─ server, IPv4 and IPv6), ferry in the proxy's, and the
//! nftables rules that `ferry nft-rules` prints for the config loaded there. The client
//! connects to the server's address; the rules hand the connection to ferry, which learns
//! the original destination (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST after REDIRECT, the
//! socket's own address after TPROXY) and connects to it. The proxy namespace does not
//! forward packets, so a connection the server sees came through ferry.
//!
//! Also: the `mark` exception (ferry's own connections leave through the same output rules
//! that catch the host's other connections), a connection made straight to the listener
//! (its original destination is ferry itself: refused), a transparent listener with an
//! upstream, and `ferry nft-rules` without transparent listeners.
//!
//! Needs root, iproute2 and nftables (installed by scripts/setup-test-deps).

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::common::netns::{Path3, SLOW};
use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Prints the config's rules with `ferry nft-rules` and loads them in `ns`.
fn load_rules(f: &Ferry, ns: &str) -> String {
    let out = Command::new(ferry_bin())
        .args(["nft-rules", "--config"])
        .arg(&f.config_path)
        .output()
        .expect("run ferry nft-rules");
    assert!(
        out.status.success(),
        "ferry nft-rules: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = String::from_utf8(out.stdout).unwrap();
    let mut nft = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft (nftables)");
    use std::io::Write;
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let done = nft.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "nft -f failed: {}\n{rules}",
        String::from_utf8_lossy(&done.stderr)
    );
    rules
}

/// An echo server on `listeners` (in the server's namespace); each accepted peer address is
/// sent on the channel returned.
fn echo_in_server_ns(
    listeners: Vec<tokio::net::TcpListener>,
) -> tokio::sync::mpsc::UnboundedReceiver<SocketAddr> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for l in listeners {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, peer)) = l.accept().await else {
                    return;
                };
                let _ = tx.send(peer);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    }
    rx
}

/// Listeners in the server's namespace on its IPv4 address (a port the kernel picks) and,
/// with `v6`, on its IPv6 address with the same port; kept bound, never re-bound.
fn server_listeners(net: &Path3, v6: bool) -> (u16, Vec<tokio::net::TcpListener>) {
    let l4 = net.server_listener_on(SocketAddr::new(net.server_ip, 0));
    let port = l4.local_addr().unwrap().port();
    let mut ls = vec![l4];
    if v6 {
        ls.push(net.server_listener_on(SocketAddr::new(net.server_ip6, port)));
    }
    (port, ls)
}

async fn round_trip(s: &mut tokio::net::TcpStream, msg: &[u8]) {
    within(SLOW, "echo through the redirect", async {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    })
    .await;
}

fn sysctl(ns: &str, kv: &str) {
    let st = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-q", "-w", kv])
        .status()
        .expect("sysctl");
    assert!(st.success(), "sysctl {kv} in {ns}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_ipv4_and_ipv6_with_the_mark_exception() {
    let net = Path3::new();
    let (port, listeners) = server_listeners(&net, true);
    let v4 = SocketAddr::new(net.server_ip, port);
    let v6 = SocketAddr::new(net.server_ip6, port);
    let mut seen = echo_in_server_ns(listeners);
    let config = format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "tp"
listen = ["0.0.0.0:15001", "[::]:15001"]
mode = "transparent"
destinations = ["{ip4}/32:{port}", "[{ip6}/128]:{port}"]
mark = 0x1
"#,
        ip4 = net.server_ip,
        ip6 = net.server_ip6,
    );
    let f = net.start_ferry(&config, 2).await;
    let rules = load_rules(&f, &net.proxy_ns);
    assert!(rules.contains("meta mark 0x1 return"), "{rules}");

    // From the client's namespace, to the server's addresses: through ferry.
    for (i, dst) in [v4, v6].into_iter().enumerate() {
        let mut c = net.connect_from(&net.client_ns, dst);
        round_trip(&mut c, format!("hello {i} via {dst}").as_bytes()).await;
        drop(c);
        let peer = within(SLOW, "the server's accept", seen.recv())
            .await
            .unwrap();
        // The server's peer is the proxy's address on its side: ferry connected.
        let proxy_side = if dst.is_ipv4() {
            "10.77.2.1"
        } else {
            "fd77:2::1"
        };
        assert_eq!(peer.ip().to_string(), proxy_side);
    }
    let recs = f.records_with("ok", 2, SLOW).await;
    for (r, dst) in recs.iter().zip([v4, v6]) {
        assert_eq!(r["listener"], "tp");
        assert_eq!(r["destination"], dst.to_string(), "{r}");
        assert_eq!(r["server"], dst.to_string(), "{r}");
    }

    // The output rule catches this host's own connections (here one made in the proxy's
    // namespace, unmarked): it reaches ferry, whose own connection to the server carries
    // the mark and so leaves through the same rules instead of coming back.
    let mut local = net.connect_from(&net.proxy_ns, v4);
    round_trip(&mut local, b"from the proxy's host").await;
    drop(local);
    let recs = f.records_with("ok", 3, SLOW).await;
    let r = &recs[2];
    assert_eq!(r["destination"], v4.to_string(), "{r}");
    assert_eq!(
        r["client"].as_str().unwrap().split(':').next(),
        Some("10.77.2.1")
    );
    assert!(within(SLOW, "accept", seen.recv()).await.is_some());

    // Straight to the listener: its original destination is ferry itself. Refused at once
    // (the reset may even beat the end of the client's connect).
    let direct = SocketAddr::new(net.proxy_ip, 15001);
    let c = crate::common::netns::in_ns(&net.client_ns, move || {
        std::net::TcpStream::connect_timeout(&direct, WAIT)
    });
    if let Ok(c) = c {
        c.set_nonblocking(true).unwrap();
        let mut c = tokio::net::TcpStream::from_std(c).unwrap();
        let (got, _) = read_until_closed(&mut c, SLOW).await;
        assert!(got.is_empty());
    }
    let denied = f.records_with("denied", 1, SLOW).await;
    assert!(
        denied[0]["reason"]
            .as_str()
            .unwrap()
            .contains("ferry's own listening address"),
        "{}",
        denied[0]
    );
    assert!(
        seen.try_recv().is_err(),
        "the server saw a connection it should not have"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tproxy_ipv4_and_ipv6() {
    let net = Path3::new();
    let (port, listeners) = server_listeners(&net, true);
    let v4 = SocketAddr::new(net.server_ip, port);
    let v6 = SocketAddr::new(net.server_ip6, port);
    let mut seen = echo_in_server_ns(listeners);
    let config = format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "tp"
listen = ["127.0.0.1:15002", "[::1]:15002"]
mode = "transparent"
transparent = "tproxy"
destinations = ["{ip4}/32:{port}", "[{ip6}/128]:{port}"]
"#,
        ip4 = net.server_ip,
        ip6 = net.server_ip6,
    );
    let f = net.start_ferry(&config, 2).await;
    let rules = load_rules(&f, &net.proxy_ns);
    // The policy routes the printed rules ask for.
    let mark = "0x4665";
    for fam in ["-4", "-6"] {
        net_ip(
            &net.proxy_ns,
            &[fam, "rule", "add", "fwmark", mark, "lookup", "4665"],
        );
    }
    net_ip(
        &net.proxy_ns,
        &[
            "-4",
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "4665",
        ],
    );
    net_ip(
        &net.proxy_ns,
        &[
            "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "4665",
        ],
    );
    assert!(rules.contains("tproxy ip to 127.0.0.1:15002"), "{rules}");
    assert!(rules.contains("tproxy ip6 to [::1]:15002"), "{rules}");
    // Loose reverse-path checks: the TPROXY'd packets arrive for addresses that are not the
    // proxy's.
    sysctl(&net.proxy_ns, "net.ipv4.conf.all.rp_filter=0");

    for (i, dst) in [v4, v6].into_iter().enumerate() {
        let mut c = net.connect_from(&net.client_ns, dst);
        round_trip(&mut c, format!("tproxy {i}").as_bytes()).await;
        drop(c);
        let peer = within(SLOW, "the server's accept", seen.recv())
            .await
            .unwrap();
        let proxy_side = if dst.is_ipv4() {
            "10.77.2.1"
        } else {
            "fd77:2::1"
        };
        assert_eq!(peer.ip().to_string(), proxy_side);
    }
    let recs = f.records_with("ok", 2, SLOW).await;
    for (r, dst) in recs.iter().zip([v4, v6]) {
        assert_eq!(r["destination"], dst.to_string(), "{r}");
        assert_eq!(r["server"], dst.to_string(), "{r}");
    }
}

fn net_ip(ns: &str, args: &[&str]) {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    crate::common::netns::ip(&all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirected_connections_go_to_the_upstream_when_there_is_one() {
    let net = Path3::new();
    let (port, listeners) = server_listeners(&net, false);
    let v4 = SocketAddr::new(net.server_ip, port);
    let mut seen = echo_in_server_ns(listeners);
    // The pool is the same host on another port; the original destination must see
    // nothing.
    let (pool_port, pool) = server_listeners(&net, false);
    let pool_addr = SocketAddr::new(net.server_ip, pool_port);
    let mut pool_seen = echo_in_server_ns(pool);
    let config = format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "tp"
listen = ["0.0.0.0:15003"]
mode = "transparent"
upstream = "pool"
destinations = ["{ip4}/32:{port}"]

[[upstream]]
name = "pool"
servers = ["{pool_addr}"]
"#,
        ip4 = net.server_ip,
    );
    let f = net.start_ferry(&config, 1).await;
    load_rules(&f, &net.proxy_ns);
    let mut c = net.connect_from(&net.client_ns, v4);
    round_trip(&mut c, b"to the pool").await;
    drop(c);
    assert!(
        within(SLOW, "the pool's accept", pool_seen.recv())
            .await
            .is_some()
    );
    let recs = f.records_with("ok", 1, SLOW).await;
    assert_eq!(recs[0]["upstream"], "pool");
    assert_eq!(recs[0]["server"], pool_addr.to_string());
    assert_eq!(recs[0]["destination"], v4.to_string());
    assert!(seen.try_recv().is_err());
}

#[test]
fn nft_rules_needs_a_transparent_listener() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "ferry.toml",
        "[[listener]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\nupstream = \"u\"\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:1\"]\n",
    );
    let out = run_ferry(&["nft-rules", "--config", &path.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no listener with mode = \"transparent\""),
        "{err}"
    );
}
