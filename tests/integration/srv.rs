//! DNS SRV discovery against a real DNS server: dnsmasq on loopback, serving SRV records the
//! test writes (TTL 1 s), restarted on the same port with new records to change them.
//! ferry is pointed at it with `[global] resolvers` and a `resolve_interval` of 10 minutes,
//! so every change it follows comes from the records' TTL running out.
//!
//! Shown: the records' targets and ports become servers, priorities make primaries and
//! backups, weights are mapped, connections reach them (never a backup while a primary is
//! up); a record added is followed, one removed too; with the DNS server gone the last good
//! servers stay (and a warning says why); an NXDOMAIN answer removes them; an SRV name and a
//! plain name (through `resolvers`) added through the admin API, and what it refuses; TLS
//! to SRV servers sends and verifies the service's domain.

#![cfg(feature = "dns")]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use crate::common::dns::Dnsmasq;
use crate::common::*;
use crate::ops_support::{
    admin_addr, connect_tagged, http, metric, metrics, read_line, status, tagged_echo_on,
};
use serde_json::Value;

const SVC: &str = "_echo._tcp.test.internal";

/// An SRV record: target (a name under `test.internal`), its address, port, priority,
/// weight. With `along`, dnsmasq sends the target's address along with the SRV records
/// (in the additional section, as Consul does); without, ferry must ask for it.
#[derive(Clone, Copy)]
struct Srv {
    target: &'static str,
    addr: SocketAddr,
    priority: u16,
    weight: u16,
    along: bool,
}

/// dnsmasq on 127.0.0.1 (on `port`: a restart, the previous one was dropped; or on a free
/// one), authoritative for `test.internal` (a name it has no record of is NXDOMAIN), every
/// answer with TTL 1 s, serving `records` of [`SVC`] and `hosts` (`name,ip`).
fn dnsmasq(port: Option<u16>, records: &[Srv], hosts: &[(&str, &str)]) -> Dnsmasq {
    let mut args: Vec<String> = [
        "--local=/test.internal/",
        "--local-ttl=1",
        "--host-record=ready.test.internal,127.0.0.99",
    ]
    .map(String::from)
    .to_vec();
    for r in records {
        args.push(format!(
            "--srv-host={SVC},{}.test.internal,{},{},{}",
            r.target,
            r.addr.port(),
            r.priority,
            r.weight
        ));
        args.push(if r.along {
            format!("--host-record={}.test.internal,{}", r.target, r.addr.ip())
        } else {
            // Answered when asked, never sent along.
            format!("--address=/{}.test.internal/{}", r.target, r.addr.ip())
        });
    }
    for (name, ip) in hosts {
        args.push(format!("--host-record={name},{ip}"));
    }
    Dnsmasq::start(port, &args, ("ready.test.internal", "127.0.0.99"))
}

/// Connects through `front`: the tag of the server reached.
async fn reach(front: SocketAddr) -> String {
    connect_tagged(front).await.1
}

/// Connects through `front` until `tag` answers (at most 64 tries); the tags seen.
async fn reach_tag(front: SocketAddr, tag: &str) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..64 {
        let t = reach(front).await;
        let done = t == tag;
        seen.push(t);
        if done {
            return seen;
        }
    }
    panic!("no connection reached {tag:?}; reached {seen:?}");
}

/// `(address, configured, weight, backup)` of upstream `upstream`'s servers, sorted.
fn servers_of(st: &Value, upstream: &str) -> BTreeSet<(String, String, u64, bool)> {
    let u = st["upstreams"]
        .as_array()
        .expect("upstreams[]")
        .iter()
        .find(|u| u["name"] == upstream)
        .unwrap_or_else(|| panic!("no upstream {upstream:?}: {st:#}"));
    u["servers"]
        .as_array()
        .expect("servers[]")
        .iter()
        .map(|s| {
            (
                s["addr"].as_str().unwrap().to_string(),
                s["configured"].as_str().unwrap().to_string(),
                s["weight"].as_u64().unwrap(),
                s["backup"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// One expected server: `(addr, configured, weight, backup)`.
fn srv_server(addr: SocketAddr, weight: u64, backup: bool) -> (String, String, u64, bool) {
    (addr.to_string(), format!("srv:{SVC}"), weight, backup)
}

/// Polls `/api/status` until upstream `upstream`'s servers are `want` (within [`WAIT`]).
async fn wait_servers(
    ferry: &Ferry,
    admin: SocketAddr,
    upstream: &str,
    want: &BTreeSet<(String, String, u64, bool)>,
    what: &str,
) {
    let mut last = BTreeSet::new();
    let done = tokio::time::timeout(WAIT, async {
        loop {
            last = servers_of(&status(admin).await, upstream);
            if last == *want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        done.is_ok(),
        "{what}: servers are\n{last:#?}\nnot\n{want:#?}\nstderr:\n{}",
        ferry.stderr.text()
    );
}

fn config(dns_port: u16, servers: &str, resolve_interval: &str) -> String {
    format!(
        r#"
[global]
resolvers = ["127.0.0.1:{dns_port}"]
workers = 1
[log]
access = "@LOG@"
[admin]
listen = "127.0.0.1:0"
[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "pool"
[[upstream]]
name = "pool"
servers = [{servers}]
resolve_interval = "{resolve_interval}"
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_added_and_removed_are_followed() {
    let a = tagged_echo_on("127.0.0.2", "a").await;
    let b = tagged_echo_on("127.0.0.3", "b").await;
    let c = tagged_echo_on("127.0.0.4", "c").await;
    let d = tagged_echo_on("127.0.0.5", "d").await;
    let rec = |target, addr, priority, weight| Srv {
        target,
        addr,
        priority,
        weight,
        along: target != "c",
    };
    let (ra, rb, rc, rd) = (
        rec("a", a, 10, 100),
        rec("b", b, 10, 300),
        // A higher priority value: a backup.
        // Its address not sent along: ferry asks for it.
        rec("c", c, 20, 1),
        rec("d", d, 10, 100),
    );
    let dns = dnsmasq(None, &[ra, rb, rc], &[]);
    let port = dns.port;
    let ferry = Ferry::start(&config(port, &format!("\"srv:{SVC}\""), "10m"), 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");

    // The records' servers: priority 10 the primaries, 20 a backup; weights 100 and 300
    // beyond ferry's 256 are scaled (300 → 256, 100 → 85), 1 stays 1.
    let want: BTreeSet<_> = [
        srv_server(a, 85, false),
        srv_server(b, 256, false),
        srv_server(c, 1, true),
    ]
    .into();
    wait_servers(&ferry, admin, "pool", &want, "the records' servers").await;

    // Connections reach both primaries, never the backup while they are up.
    let mut tags = BTreeSet::new();
    for _ in 0..24 {
        tags.insert(reach(front).await);
    }
    assert_eq!(tags, ["a", "b"].map(String::from).into(), "{tags:?}");
    // The metrics name the SRV name as the server, with each address.
    let m = metrics(admin).await;
    let label = format!("srv:{SVC}");
    for addr in [a, b, c] {
        let up = metric(
            &m,
            "ferry_server_up",
            &[
                ("upstream", "pool"),
                ("server", &label),
                ("address", &addr.to_string()),
            ],
        );
        assert_eq!(up, Some(1.0), "ferry_server_up of {addr}:\n{m}");
    }

    // A record added: its server joins (the TTL ran out; the interval is 10 minutes) and
    // gets connections.
    drop(dns);
    let dns = dnsmasq(Some(port), &[ra, rb, rc, rd], &[]);
    let want: BTreeSet<_> = [
        srv_server(a, 85, false),
        srv_server(b, 256, false),
        srv_server(c, 1, true),
        srv_server(d, 85, false),
    ]
    .into();
    wait_servers(&ferry, admin, "pool", &want, "a record added").await;
    reach_tag(front, "d").await;

    // A record removed: its server leaves, and gets no more connections.
    drop(dns);
    let dns = dnsmasq(Some(port), &[rb, rc, rd], &[]);
    let want: BTreeSet<_> = [
        srv_server(b, 256, false),
        srv_server(c, 1, true),
        srv_server(d, 85, false),
    ]
    .into();
    wait_servers(&ferry, admin, "pool", &want, "a record removed").await;
    let mut tags = BTreeSet::new();
    for _ in 0..8 {
        tags.insert(reach(front).await);
    }
    assert_eq!(tags, ["b", "d"].map(String::from).into(), "{tags:?}");

    // The primaries unavailable (disabled): the backup takes the connections.
    for addr in [b, d] {
        let r = http(
            admin,
            "POST",
            &format!("/api/upstreams/pool/servers/{addr}/disable"),
            &[],
            b"",
        )
        .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(reach(front).await, "c");
    ferry
        .stderr
        .expect("no log of the new servers", |l| l.contains("servers now:"))
        .await;
    drop(dns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_lookup_keeps_the_last_servers_and_nxdomain_removes_them() {
    let a = tagged_echo_on("127.0.0.2", "a").await;
    let b = tagged_echo_on("127.0.0.3", "b").await;
    let records = [
        Srv {
            target: "a",
            addr: a,
            priority: 0,
            weight: 0,
            along: true,
        },
        Srv {
            target: "b",
            addr: b,
            priority: 0,
            weight: 0,
            along: true,
        },
    ];
    let dns = dnsmasq(None, &records, &[]);
    let port = dns.port;
    // A failed lookup is tried again within 5 s; a definite "none" at the interval.
    let ferry = Ferry::start(&config(port, &format!("\"srv:{SVC}\""), "2s"), 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");
    // Weight 0 is ferry's smallest, 1.
    let want: BTreeSet<_> = [srv_server(a, 1, false), srv_server(b, 1, false)].into();
    wait_servers(&ferry, admin, "pool", &want, "the records' servers").await;

    // The DNS server gone: lookups fail, a warning says so, the servers stay and serve.
    drop(dns);
    ferry
        .stderr
        .expect("no warning", |l| {
            l.contains(&format!("cannot resolve srv:{SVC}")) && l.contains("keeping its last")
        })
        .await;
    assert_eq!(servers_of(&status(admin).await, "pool"), want);
    let mut tags = BTreeSet::new();
    for _ in 0..4 {
        tags.insert(reach(front).await);
    }
    assert_eq!(tags, ["a", "b"].map(String::from).into());

    // Back, without the service: NXDOMAIN, a definite answer; its servers go.
    let dns = dnsmasq(Some(port), &[], &[]);
    wait_servers(&ferry, admin, "pool", &BTreeSet::new(), "after NXDOMAIN").await;
    ferry
        .stderr
        .expect("no log of the removal", |l| {
            l.contains("has no records now")
        })
        .await;

    // No server: a client is closed at once.
    expect_closed_at_once(front, WAIT).await;

    // The service back: its servers too.
    drop(dns);
    let _dns = dnsmasq(Some(port), &records, &[]);
    wait_servers(&ferry, admin, "pool", &want, "the service back").await;
    reach(front).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_and_names_added_through_the_admin_api() {
    let x = tagged_echo_on("127.0.0.1", "x").await;
    let a = tagged_echo_on("127.0.0.2", "a").await;
    let n = tagged_echo_on("127.0.0.6", "n").await;
    let records = [Srv {
        target: "a",
        addr: a,
        priority: 1,
        weight: 7,
        along: false,
    }];
    // `n.test.internal` exists only in this DNS server: found through `resolvers`.
    let _dns = dnsmasq(None, &records, &[("n.test.internal", "127.0.0.6")]);
    let ferry = Ferry::start(&config(_dns.port, &format!("\"{x}\""), "10m"), 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");
    let call = |method: &'static str, path: String, body: String| async move {
        http(
            admin,
            method,
            &path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await
    };
    let servers = "/api/upstreams/pool/servers".to_string();

    // An SRV name: its records' servers join, marked as the API's.
    let r = call(
        "POST",
        servers.clone(),
        format!(r#"{{"addr": "srv:{SVC}"}}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let x_server = (x.to_string(), x.to_string(), 1, false);
    let want: BTreeSet<_> = [x_server.clone(), srv_server(a, 7, false)].into();
    wait_servers(&ferry, admin, "pool", &want, "an SRV name added").await;
    let st = status(admin).await;
    let a_status = st["upstreams"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["addr"] == a.to_string())
        .unwrap()
        .clone();
    assert_eq!(a_status["source"], "api", "{a_status}");
    reach_tag(front, "a").await;

    // A plain name, looked up through `resolvers` too.
    let r = call(
        "POST",
        servers.clone(),
        format!(r#"{{"addr": "n.test.internal:{}"}}"#, n.port()),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let named = (
        n.to_string(),
        format!("n.test.internal:{}", n.port()),
        1,
        false,
    );
    let want: BTreeSet<_> = [x_server, srv_server(a, 7, false), named].into();
    wait_servers(&ferry, admin, "pool", &want, "a name added").await;
    reach_tag(front, "n").await;

    // Refused, with the reason: a weight for an SRV name (its records give them), at
    // adding or after; an SRV name without a name.
    let r = call(
        "POST",
        servers.clone(),
        r#"{"addr": "srv:_other._tcp.test.internal", "weight": 3}"#.into(),
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("takes no weight"), "{r:?}");
    let r = call(
        "PUT",
        format!("{servers}/srv:{SVC}/weight"),
        r#"{"weight": 3}"#.into(),
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("takes no weight"), "{r:?}");
    let r = call("POST", servers.clone(), r#"{"addr": "srv:"}"#.into()).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("needs an SRV name"), "{r:?}");
    // An SRV name with no records: added, and said not to resolve (yet).
    let r = call(
        "POST",
        servers.clone(),
        r#"{"addr": "srv:_none._tcp.test.internal"}"#.into(),
    )
    .await;
    assert_eq!(r.status, 202, "{r:?}");
    assert!(r.body.contains("does not resolve"), "{r:?}");
}

/// A TLS server on `ip` (std threads) with `leaf`'s certificate: after the handshake it
/// sends `tls\n` and echoes; records each handshake's SNI.
fn tls_tagged_echo_on(
    ip: &str,
    leaf: &crate::common::pki::Leaf,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = std::sync::Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.cert_der()], leaf.key_der())
            .unwrap(),
    );
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let snis = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = snis.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let (config, seen) = (config.clone(), seen.clone());
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(WAIT));
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, s);
                if tls.write_all(b"tls\n").and_then(|()| tls.flush()).is_err() {
                    return;
                }
                let sni = tls.conn.server_name().unwrap_or("(none)").to_string();
                seen.lock().unwrap().push(sni);
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf) {
                    if n == 0 || tls.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, snis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_srv_servers_sends_and_verifies_the_services_domain() {
    // A certificate for the service's domain only: verifying any other name would fail.
    let ca = crate::common::pki::Ca::new("srv test CA");
    let (t, snis) = tls_tagged_echo_on("127.0.0.2", &ca.server(&["test.internal"]));
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let dns = dnsmasq(
        None,
        &[Srv {
            target: "t",
            addr: t,
            priority: 0,
            weight: 1,
            along: true,
        }],
        &[],
    );
    let cfg = format!(
        "{}tls = {{ ca = \"{}\" }}\n",
        config(dns.port, &format!("\"srv:{SVC}\""), "10m"),
        ca_path.display()
    );
    let ferry = Ferry::start(&cfg, 1).await;
    let front = ferry.addr("front");
    let mut s = connect(front).await;
    assert_eq!(read_line(&mut s).await, "tls", "{}", ferry.stderr.text());
    echo_round_trip(&mut s, b"through TLS").await;
    assert_eq!(*snis.lock().unwrap(), vec!["test.internal".to_string()]);
}
