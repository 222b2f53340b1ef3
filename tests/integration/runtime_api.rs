//! Servers changed at run time through the admin API, under load: added (new connections
//! reach it), re-weighted (the balancer follows), removed (it drains: its open connection
//! finishes, it gets no new one, then it leaves); every change logged, counted and shown
//! in the status; refused requests answered with the reason; and the next reload puts the
//! file's servers back. No connection of the steady load fails throughout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use crate::common::*;
use crate::ops_support::{HttpResp, admin_addr, http, metric_must, metrics, status};
use serde_json::Value;

const TOKEN: &str = "s3cret-token";

async fn call(admin: SocketAddr, method: &str, path: &str, body: &str) -> HttpResp {
    let auth = format!("Bearer {TOKEN}");
    http(
        admin,
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .await
}

/// An echo server that first sends `tag`, so a client knows which server it reached;
/// counts the connections it accepts.
async fn tagged_echo(tag: u8) -> (SocketAddr, Arc<AtomicU64>) {
    let n = Arc::new(AtomicU64::new(0));
    let count = n.clone();
    let addr = serve_on("127.0.0.1", move |mut s| {
        count.fetch_add(1, SeqCst);
        async move {
            use tokio::io::AsyncWriteExt;
            if s.write_all(&[tag]).await.is_ok() {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        }
    })
    .await;
    (addr, n)
}

/// Connects through `front`: the tag of the server reached.
async fn open(front: SocketAddr) -> std::io::Result<(tokio::net::TcpStream, u8)> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::TcpStream::connect(front).await?;
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).await?;
    Ok((s, tag[0]))
}

fn servers(st: &Value) -> Vec<Value> {
    st["upstreams"][0]["servers"].as_array().unwrap().clone()
}

fn server(list: &[Value], addr: SocketAddr) -> Option<&Value> {
    list.iter().find(|s| s["addr"] == addr.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_reweight_and_remove_servers_under_load() {
    let (a, a_count) = tagged_echo(b'A').await;
    let (b, b_count) = tagged_echo(b'B').await;
    let config = format!(
        r#"
[log]
access = "@LOG@"
[admin]
listen = "127.0.0.1:0"
token = "{TOKEN}"
[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "pool"
[[upstream]]
name = "pool"
servers = ["{a}"]
"#
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");

    // A steady load: one connection after another, each an echo round trip.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(SeqCst) {
                let ok = match tokio::time::timeout(WAIT, open(front)).await {
                    Ok(Ok((mut s, _))) => tokio::time::timeout(WAIT, async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        s.write_all(b"ping").await?;
                        let mut b = [0u8; 4];
                        s.read_exact(&mut b).await?;
                        Ok::<_, std::io::Error>(b == *b"ping")
                    })
                    .await
                    .is_ok_and(|r| r.is_ok_and(|same| same)),
                    _ => false,
                };
                if ok { &done } else { &failed }.fetch_add(1, SeqCst);
            }
        })
    };
    let wait_done = |n: u64| {
        let done = done.clone();
        async move { wait_until(WAIT, "the load to go on", || done.load(SeqCst) >= n).await }
    };
    wait_done(20).await;

    // Refused: no token, a bad body, an unknown upstream, a duplicate.
    let r = http(
        admin,
        "POST",
        "/api/upstreams/pool/servers",
        &[],
        br#"{"addr":"127.0.0.1:1"}"#,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        call(admin, "POST", "/api/upstreams/pool/servers", "{")
            .await
            .status,
        400
    );
    let r = call(
        admin,
        "POST",
        "/api/upstreams/pool/servers",
        r#"{"addr":"not an address"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(
        call(
            admin,
            "POST",
            "/api/upstreams/nope/servers",
            r#"{"addr":"127.0.0.1:1"}"#
        )
        .await
        .status,
        404
    );
    let r = call(
        admin,
        "POST",
        "/api/upstreams/pool/servers",
        &format!(r#"{{"addr":"{a}"}}"#),
    )
    .await;
    assert_eq!(r.status, 409, "{r:?}");

    // Add B: new connections reach it.
    let r = call(
        admin,
        "POST",
        "/api/upstreams/pool/servers",
        &format!(r#"{{"addr":"{b}","weight":1}}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    wait_until(WAIT, "connections on the added server", || {
        b_count.load(SeqCst) >= 5
    })
    .await;
    let st = status(admin).await;
    let list = servers(&st);
    assert_eq!(server(&list, b).unwrap()["source"], "api");
    assert_eq!(server(&list, a).unwrap()["source"], "file");
    assert_eq!(
        st["upstreams"][0]["runtime_changes"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Re-weight B: the status shows it; A keeps its counters.
    let a_total = server(&list, a).unwrap()["connections_total"]
        .as_u64()
        .unwrap();
    let r = call(
        admin,
        "PUT",
        &format!("/api/upstreams/pool/servers/{b}/weight"),
        r#"{"weight": 3}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let list = servers(&status(admin).await);
    assert_eq!(server(&list, b).unwrap()["weight"], 3);
    assert!(
        server(&list, a).unwrap()["connections_total"]
            .as_u64()
            .unwrap()
            >= a_total
    );
    assert_eq!(
        call(
            admin,
            "PUT",
            &format!("/api/upstreams/pool/servers/{b}/weight"),
            r#"{"weight": 0}"#
        )
        .await
        .status,
        400
    );

    // Remove A while a connection to it is open: it drains, then goes.
    let mut held = None;
    for _ in 0..50 {
        let (c, tag) = within(WAIT, "a connection", open(front)).await.unwrap();
        if tag == b'A' {
            held = Some(c);
            break;
        }
    }
    let mut held = held.expect("a connection on A");
    let r = call(
        admin,
        "DELETE",
        &format!("/api/upstreams/pool/servers/{a}"),
        "",
    )
    .await;
    assert_eq!(r.status, 202, "{r:?}");
    let list = servers(&status(admin).await);
    assert_eq!(server(&list, a).unwrap()["state"], "draining");
    assert_eq!(server(&list, a).unwrap()["removing"], true);
    // No new connection goes to A; the held one still works.
    let a_now = a_count.load(SeqCst);
    let d = done.load(SeqCst);
    wait_done(d + 20).await;
    assert_eq!(
        a_count.load(SeqCst),
        a_now,
        "a draining server got a new connection"
    );
    echo_round_trip(&mut held, b"still there").await;
    drop(held);
    let mut gone = false;
    for _ in 0..500 {
        if server(&servers(&status(admin).await), a).is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gone, "A did not leave once its connection ended");
    // The last primary cannot go.
    let r = call(
        admin,
        "DELETE",
        &format!("/api/upstreams/pool/servers/{b}"),
        "",
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");

    let m = metrics(admin).await;
    for (action, n) in [("add", 1.0), ("remove", 1.0), ("weight", 1.0)] {
        assert_eq!(
            metric_must(
                &m,
                "ferry_server_changes_total",
                &[("upstream", "pool"), ("action", action)]
            ),
            n,
            "{action}"
        );
    }
    ferry
        .stderr
        .expect("no log of the addition", |l| {
            l.contains("added through the admin API")
        })
        .await;

    // The next reload puts the file's servers back.
    let r = call(admin, "POST", "/api/reload", "").await;
    assert_eq!(r.status, 200, "{r:?}");
    let st = status(admin).await;
    let list = servers(&st);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["addr"], a.to_string());
    assert_eq!(list[0]["state"], "up");
    assert!(
        st["upstreams"][0]["runtime_changes"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let d = done.load(SeqCst);
    wait_done(d + 10).await;

    stop.store(true, SeqCst);
    load.await.unwrap();
    assert_eq!(
        failed.load(SeqCst),
        0,
        "connections failed during the changes"
    );
    assert!(done.load(SeqCst) > 50);
}

/// A server added by name is resolved at once: every address of the name joins the
/// upstream, shown as configured by that name.
#[tokio::test]
async fn a_server_added_by_name_is_resolved() {
    let (a, _) = tagged_echo(b'A').await;
    let (c, _) = tagged_echo(b'C').await;
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[[listener]]\nname = \"front\"\nlisten = \"127.0.0.1:0\"\nupstream = \"pool\"\n[[upstream]]\nname = \"pool\"\nservers = [\"{a}\"]\nresolve_interval = \"1s\"\n"
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    let name = format!("localhost:{}", c.port());
    let r = call(
        admin,
        "POST",
        "/api/upstreams/pool/servers",
        &format!(r#"{{"addr":"{name}"}}"#),
    )
    .await;
    assert_eq!(r.status, 201, "{r:?}");
    let list = servers(&status(admin).await);
    let named: Vec<&Value> = list
        .iter()
        .filter(|s| s["configured"] == name.as_str())
        .collect();
    assert!(!named.is_empty(), "{list:?}");
    assert!(named.iter().any(|s| s["addr"] == c.to_string()), "{list:?}");
    assert!(named.iter().all(|s| s["source"] == "api"), "{list:?}");
}
