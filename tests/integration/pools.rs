//! Upstream pools, end to end with the real binary: balancing algorithms (exact round-robin
//! order, spread of long-held connections, consistent hashing across processes and server
//! removal, bounded load), backups, affinity, retries, the per-server limit and its queue,
//! active health checks (plain and send/expect against a real redis-server), passive
//! ejection, and DNS re-resolution of servers given by name.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::pools_support::*;
use tokio::io::AsyncWriteExt;

/// An `[[upstream]]` named `name` over `servers` (TOML server items), with `extra` lines.
fn upstream(name: &str, balance: &str, servers: &[String], extra: &str) -> String {
    format!(
        r#"
[[upstream]]
name = "{name}"
balance = "{balance}"
servers = [{}]
{extra}
"#,
        servers.join(", ")
    )
}

/// A `[[listener]]` named `name` on an ephemeral loopback port, to `upstream`.
fn listener(name: &str, upstream: &str) -> String {
    format!(
        r#"
[[listener]]
name = "{name}"
listen = "127.0.0.1:0"
upstream = "{upstream}"
"#
    )
}

/// The header every config here starts with: access log to the test's file, admin API on
/// an ephemeral port.
const HEAD: &str = r#"
[log]
access = "@LOG@"

[admin]
listen = "127.0.0.1:0"
"#;

fn quoted(b: &Backend) -> String {
    format!("\"{}\"", b.addr)
}

// ---------------------------------------------------------------------------------------
// 1. round robin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_exact_order_and_smooth_weights() {
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let c = Backend::start("127.0.0.1", "c").await;
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("rr", "rr"),
        upstream(
            "rr",
            "round_robin",
            &[quoted(&a), quoted(&b), quoted(&c)],
            ""
        ),
        listener("weighted", "weighted"),
        upstream(
            "weighted",
            "round_robin",
            &[
                format!("{{ addr = \"{}\", weight = 3 }}", a.addr),
                format!("{{ addr = \"{}\", weight = 1 }}", b.addr),
            ],
            "",
        ),
    );
    let ferry = Ferry::start(&config, 2).await;

    let mut order = Vec::new();
    for _ in 0..9 {
        order.push(who(ferry.addr("rr"), None).await);
    }
    assert_eq!(order, ["a", "b", "c", "a", "b", "c", "a", "b", "c"]);

    // Smooth weighted round robin: 3:1 interleaved, never `a a a b`.
    let mut order = Vec::new();
    for _ in 0..8 {
        order.push(who(ferry.addr("weighted"), None).await);
    }
    assert_eq!(order, ["a", "a", "b", "a", "a", "a", "b", "a"]);
}

// ---------------------------------------------------------------------------------------
// 2. least_conn and p2c with long-held connections

async fn hold_30(balance: &str) -> BTreeMap<String, usize> {
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let c = Backend::start("127.0.0.1", "c").await;
    let config = format!(
        "{HEAD}{}{}",
        listener("front", "pool"),
        upstream("pool", balance, &[quoted(&a), quoted(&b), quoted(&c)], ""),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    let mut held = Vec::new();
    let mut names = Vec::new();
    for _ in 0..30 {
        let (s, name) = open(ferry.addr("front"), None).await;
        held.push(s);
        names.push(name);
    }
    let counts = tally(&names);
    // ferry's own view agrees: 30 live connections on its servers.
    let st = status(admin).await;
    let active: Vec<u64> = [&a, &b, &c]
        .iter()
        .map(|s| {
            server_of(&st, "pool", s.addr).expect("server listed")["connections_active"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        active.iter().sum::<u64>(),
        30,
        "{balance}: status shows {active:?}"
    );
    assert_eq!(
        active,
        ["a", "b", "c"]
            .iter()
            .map(|n| counts.get(*n).copied().unwrap_or(0) as u64)
            .collect::<Vec<_>>(),
        "{balance}: status disagrees with what the clients saw: {counts:?}"
    );
    drop(held);
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_spreads_long_held_connections_exactly() {
    let counts = hold_30("least_conn").await;
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [10, 10, 10],
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_spreads_long_held_connections() {
    let counts = hold_30("p2c").await;
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (name, n) in &counts {
        assert!(n.abs_diff(10) <= 2, "p2c put {n} on {name}: {counts:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 3 and 4. consistent hashing: maglev and ring_hash

/// The 40 client IPs of the hashing tests.
fn hash_clients() -> Vec<IpAddr> {
    (10..50).map(lo).collect()
}

/// Runs a ferry balancing `balance` over `servers`; returns which backend each client IP
/// reaches (each IP connects twice, and must reach the same backend both times).
async fn hash_mapping(balance: &str, servers: &[&Backend]) -> BTreeMap<IpAddr, String> {
    let list: Vec<String> = servers.iter().map(|b| quoted(b)).collect();
    let config = format!(
        "{HEAD}{}{}",
        listener("front", "pool"),
        upstream("pool", balance, &list, ""),
    );
    let ferry = Ferry::start(&config, 1).await;
    let mut map = BTreeMap::new();
    for ip in hash_clients() {
        let first = who(ferry.addr("front"), Some(ip)).await;
        let again = who(ferry.addr("front"), Some(ip)).await;
        assert_eq!(
            first, again,
            "{balance}: client {ip} moved between connections"
        );
        map.insert(ip, first);
    }
    // The log names the client IPs the test bound: hashing saw the right key.
    let recs = ferry.records(80, WAIT).await;
    for r in &recs {
        let client: SocketAddr = r["client"].as_str().unwrap().parse().unwrap();
        assert!(
            hash_clients().contains(&client.ip()),
            "unexpected client in {r}"
        );
    }
    map
}

/// Same config → same mapping in two processes; without server `d` only `d`'s clients move
/// (at most `others_may_move` others).
async fn consistent_hashing(balance: &str, others_may_move: usize) {
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let c = Backend::start("127.0.0.1", "c").await;
    let d = Backend::start("127.0.0.1", "d").await;
    let first = hash_mapping(balance, &[&a, &b, &c, &d]).await;
    let second = hash_mapping(balance, &[&a, &b, &c, &d]).await;
    assert_eq!(first, second, "{balance}: two processes disagree");
    let counts = tally(first.values());
    eprintln!("{balance}: 40 clients over 4 servers: {counts:?}");
    assert!(
        counts.len() >= 3,
        "{balance}: 40 clients reached only {counts:?}"
    );
    assert!(counts.contains_key("d"), "no client on d: {counts:?}");

    let without_d = hash_mapping(balance, &[&a, &b, &c]).await;
    let mut moved = Vec::new();
    for (ip, was) in &first {
        let now = &without_d[ip];
        assert_ne!(now, "d");
        if was != "d" && was != now {
            moved.push(format!("{ip}: {was} -> {now}"));
        }
    }
    eprintln!(
        "{balance}: removing d moved {} of its clients and {} others",
        counts["d"],
        moved.len()
    );
    assert!(
        moved.len() <= others_may_move,
        "{balance}: removing d moved clients that were not on it: {moved:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_is_stable_across_processes_and_removal() {
    consistent_hashing("maglev", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_is_stable_across_processes_and_removal() {
    // On a ring, removing a server's points changes no other key's successor.
    consistent_hashing("ring_hash", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_bounded_load_spreads_a_hot_client() {
    const N: usize = 12;
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let c = Backend::start("127.0.0.1", "c").await;
    let servers = [quoted(&a), quoted(&b), quoted(&c)];
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("plain", "plain"),
        upstream("plain", "ring_hash", &servers, ""),
        listener("bounded", "bounded"),
        upstream(
            "bounded",
            "ring_hash",
            &servers,
            "hash_balance_factor = 125"
        ),
    );
    let ferry = Ferry::start(&config, 2).await;
    let hot = lo(77);

    let mut held = Vec::new();
    let mut plain = Vec::new();
    for _ in 0..N {
        let (s, name) = open(ferry.addr("plain"), Some(hot)).await;
        held.push(s);
        plain.push(name);
    }
    let plain = tally(&plain);
    assert_eq!(
        plain.len(),
        1,
        "without a bound one client's connections all go to its server: {plain:?}"
    );

    let mut bounded = Vec::new();
    for _ in 0..N {
        let (s, name) = open(ferry.addr("bounded"), Some(hot)).await;
        held.push(s);
        bounded.push(name);
    }
    let home = bounded[0].clone();
    let bounded = tally(&bounded);
    eprintln!("hot client, {N} held connections: plain {plain:?}, bounded {bounded:?}");
    // A server takes a new connection only while below 1.25 × the average: with 12 over 3
    // servers none can hold more than 5.
    let bound = (125 * N).div_ceil(3 * 100);
    let max = bounded.values().copied().max().unwrap();
    assert!(
        max <= bound,
        "bounded load put {max} of {N} on one server (bound {bound}): {bounded:?}"
    );
    assert_eq!(bounded.len(), 3, "{bounded:?}");
    assert_eq!(
        plain.keys().next().unwrap(),
        &home,
        "the bounded pool's first pick is the client's own server"
    );
}

// ---------------------------------------------------------------------------------------
// 5. backups

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_takes_over_only_while_every_primary_is_down() {
    let mut p1 = Backend::start("127.0.0.1", "p1").await;
    let mut p2 = Backend::start("127.0.0.1", "p2").await;
    let bk = Backend::start("127.0.0.1", "backup").await;
    let config = format!(
        "{HEAD}{}{}",
        listener("front", "pool"),
        upstream(
            "pool",
            "round_robin",
            &[
                quoted(&p1),
                format!("{{ addr = \"{}\", backup = true }}", bk.addr),
                quoted(&p2),
            ],
            r#"retries = 0
[upstream.health]
interval = "100ms"
timeout = "200ms"
fall = 2
rise = 2
"#,
        ),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");

    let mut names = Vec::new();
    for _ in 0..8 {
        names.push(who(front, None).await);
    }
    assert_eq!(
        tally(&names),
        BTreeMap::from([("p1".to_string(), 4), ("p2".to_string(), 4)]),
        "with the primaries up the backup gets nothing"
    );

    // One primary down: the other takes everything; still not the backup.
    p1.kill().await;
    wait_state(admin, "pool", p1.addr, "down", WAIT).await;
    for _ in 0..4 {
        assert_eq!(who(front, None).await, "p2");
    }

    // Every primary down: the backup.
    p2.kill().await;
    wait_state(admin, "pool", p2.addr, "down", WAIT).await;
    for _ in 0..4 {
        assert_eq!(who(front, None).await, "backup");
    }

    // A primary back on its port: traffic returns to it.
    let _p1 = Backend::start_at(p1.addr, "p1").await;
    wait_state(admin, "pool", p1.addr, "up", WAIT).await;
    for _ in 0..4 {
        assert_eq!(who(front, None).await, "p1");
    }
    let recs = ferry.records(20, WAIT).await;
    assert!(
        recs.iter().all(|r| r["result"] == "ok"),
        "a connection failed: {recs:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// 6. affinity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_client_keeps_its_server_under_round_robin() {
    let a = Backend::start("127.0.0.1", "a").await;
    let b = Backend::start("127.0.0.1", "b").await;
    let c = Backend::start("127.0.0.1", "c").await;
    let config = format!(
        "{HEAD}{}{}",
        listener("front", "pool"),
        upstream(
            "pool",
            "round_robin",
            &[quoted(&a), quoted(&b), quoted(&c)],
            r#"sticky = { ttl = "30s" }"#,
        ),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");
    let sticky = lo(5);
    let mut mine = Vec::new();
    let mut others = Vec::new();
    for i in 0..10 {
        mine.push(who(front, Some(sticky)).await);
        // Other clients in between move the round robin on.
        others.push(who(front, Some(lo(100 + i))).await);
    }
    let t = tally(&mine);
    assert_eq!(t.len(), 1, "the sticky client moved: {mine:?}");
    let others = tally(&others);
    assert!(
        others.len() >= 2,
        "new clients are still balanced round robin: {others:?}"
    );
    let st = status(admin).await;
    assert_eq!(upstream_of(&st, "pool")["sticky_entries"], 11, "{st:#}");
}

// ---------------------------------------------------------------------------------------
// 7. retries

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_hide_a_refusing_server_and_count_its_failures() {
    let good = Backend::start("127.0.0.1", "good").await;
    let refused = refused_addr();
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("front", "pool"),
        upstream(
            "pool",
            "round_robin",
            &[format!("\"{refused}\""), quoted(&good)],
            "retries = 1",
        ),
        listener("bare", "bare"),
        upstream(
            "bare",
            "round_robin",
            &[format!("\"{refused}\"")],
            "retries = 0",
        ),
    );
    let ferry = Ferry::start(&config, 2).await;
    let admin = admin_addr(&ferry).await;

    for _ in 0..10 {
        assert_eq!(who(ferry.addr("front"), None).await, "good");
    }
    let recs = ferry.records(10, WAIT).await;
    assert!(
        recs.iter()
            .all(|r| r["result"] == "ok" && r["upstream"] == "pool"),
        "{recs:#?}"
    );
    let st = status(admin).await;
    let failures = server_of(&st, "pool", refused).expect("listed")["connect_failures"]
        .as_u64()
        .unwrap();
    // Round robin offers the refusing server every other connection (or so).
    assert!(failures >= 4, "connect_failures = {failures}: {st:#}");
    assert_eq!(
        server_of(&st, "pool", good.addr).expect("listed")["connect_failures"],
        0
    );

    // No retries and nothing else to try: the client gets the failure.
    let client = expect_closed_at_once(ferry.addr("bare"), WAIT).await;
    let recs = ferry.records_with("connect_failed", 1, WAIT).await;
    let r = record_for(&recs, client);
    assert_eq!(r["server"], refused.to_string(), "{r}");
    assert_eq!(r["upstream"], "bare", "{r}");
}

// ---------------------------------------------------------------------------------------
// 8. per-server limit and queue

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_waits_for_a_slot_times_out_and_is_bounded() {
    let q = Backend::start("127.0.0.1", "q").await;
    let config = format!(
        "{HEAD}{}{}",
        listener("front", "pool"),
        upstream(
            "pool",
            "round_robin",
            &[quoted(&q)],
            r#"max_connections_per_server = 1
queue = { size = 2, timeout = "2s" }"#,
        ),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");
    let queued = |n: u64| move |st: &serde_json::Value| upstream_of(st, "pool")["queued"] == n;

    // A holds the only slot.
    let (a, name) = open(front, None).await;
    assert_eq!(name, "q");
    // B waits: its bytes are not answered while A holds the slot.
    let (_, b) = connect_from(front).await;
    let mut b = b.expect("connect B");
    b.write_all(b"hello\n").await.unwrap();
    wait_status(admin, "B to be queued", WAIT, queued(1)).await;
    let early = read_line(&mut b, Duration::from_millis(300)).await;
    assert!(
        matches!(&early, Err(e) if e.starts_with("no line")),
        "B was answered (or closed) while A held the slot: {early:?}"
    );
    // A leaves: B proceeds.
    drop(a);
    assert_eq!(read_line(&mut b, WAIT).await.as_deref(), Ok("q"));
    assert_eq!(read_line(&mut b, WAIT).await.as_deref(), Ok("hello"));

    // B holds the slot now; C and D wait; E finds the queue full and is refused at once.
    let t_cd = Instant::now();
    let (c_addr, c) = connect_from(front).await;
    let (d_addr, d) = connect_from(front).await;
    let (mut c, mut d) = (c.expect("connect C"), d.expect("connect D"));
    wait_status(admin, "C and D to be queued", WAIT, queued(2)).await;
    // Refused at once: `limited`, not queued (that would end `queue_timeout` or served).
    let e_addr = expect_closed_at_once(front, Duration::from_secs(1)).await;
    let limited = ferry.records_with("limited", 1, WAIT).await;
    assert_eq!(record_for(&limited, e_addr)["result"], "limited");

    // C and D give up after the queue timeout, without ever reaching the server.
    let (got_c, _) = read_until_closed(&mut c, WAIT).await;
    let (got_d, _) = read_until_closed(&mut d, WAIT).await;
    let waited = t_cd.elapsed();
    assert!(got_c.is_empty() && got_d.is_empty(), "{got_c:?} {got_d:?}");
    assert!(
        waited >= Duration::from_millis(1900),
        "C and D were closed after {waited:?}, before the queue timeout of 2s"
    );
    let timed_out = ferry.records_with("queue_timeout", 2, WAIT).await;
    for client in [c_addr, d_addr] {
        let r = record_for(&timed_out, client);
        assert!(r["server"].is_null(), "{r}");
        let ms = r["duration_ms"].as_f64().expect("duration_ms");
        assert!(
            ms >= 2000.0,
            "queued for {ms} ms, the queue timeout is 2s: {r}"
        );
    }
    // B still works, and the slot is still B's alone.
    echo_round_trip(&mut b, b"still here\n").await;
    let st = status(admin).await;
    assert_eq!(
        server_of(&st, "pool", q.addr).unwrap()["connections_active"],
        1
    );
}

// ---------------------------------------------------------------------------------------
// 9. active health checks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_is_marked_down_in_time_and_up_again_after_rise() {
    const INTERVAL: Duration = Duration::from_millis(200);
    const FALL: u32 = 2;
    const RISE: u32 = 2;
    let mut s1 = Backend::start("127.0.0.1", "s1").await;
    let s2 = Backend::start("127.0.0.1", "s2").await;
    let config = format!(
        "{HEAD}{}{}",
        listener("front", "pool"),
        upstream(
            "pool",
            "round_robin",
            &[quoted(&s1), quoted(&s2)],
            &format!(
                r#"retries = 0
[upstream.health]
interval = "{}ms"
timeout = "500ms"
fall = {FALL}
rise = {RISE}
"#,
                INTERVAL.as_millis()
            ),
        ),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(who(front, None).await);
    }
    assert_eq!(tally(&names).len(), 2, "{names:?}");

    let killed = Instant::now();
    s1.kill().await;
    // Checks every ~200ms (±10% jitter), 2 failures to fall: down after about 440ms,
    // and no sooner than FALL - 1 intervals after the kill (the first failed check may
    // follow it at once).
    let line = &wait_event(&ferry, 1, "server is down", s1.addr, WAIT).await[0];
    let took = killed.elapsed();
    eprintln!("marked down {took:?} after the kill");
    assert!(line.contains(&format!("{FALL} checks failed")), "{line}");
    assert!(
        took >= INTERVAL.mul_f64(0.9 * (FALL - 1) as f64),
        "down after {took:?}: fewer than {FALL} checks"
    );
    assert!(line.contains("refused"), "the reason is logged: {line}");
    let st = status(admin).await;
    assert_eq!(server_of(&st, "pool", s1.addr).unwrap()["state"], "down");
    assert_eq!(server_of(&st, "pool", s2.addr).unwrap()["state"], "up");

    // From now on no client fails, even without retries: everything goes to s2.
    let before = ferry.log_lines_now().len();
    for _ in 0..20 {
        let name = try_open(front, None).await.map(|(_, n)| n);
        assert_eq!(name.as_deref(), Ok("s2"));
    }
    let recs = parse_records(&ferry.log_lines(before + 20, WAIT).await[before..]);
    assert!(recs.iter().all(|r| r["result"] == "ok"), "{recs:#?}");

    // Back on the same port: up after `rise` passing checks.
    let restarted = Instant::now();
    let _s1 = Backend::start_at(s1.addr, "s1").await;
    let line = &wait_event(&ferry, 1, "server is up", s1.addr, WAIT).await[0];
    assert!(line.contains(&format!("{RISE} checks passed")), "{line}");
    let took = restarted.elapsed();
    assert!(
        took >= INTERVAL.mul_f64(0.9 * (RISE - 1) as f64),
        "up after {took:?}: fewer than {RISE} checks"
    );
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(who(front, None).await);
    }
    assert_eq!(
        tally(&names),
        BTreeMap::from([("s1".to_string(), 2), ("s2".to_string(), 2)])
    );
}

// ---------------------------------------------------------------------------------------
// 10. send/expect against redis-server

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_expect_against_redis() {
    let redis = Redis::start().await;
    let health = |expect: &str| {
        format!(
            r#"retries = 0
[upstream.health]
interval = "100ms"
timeout = "500ms"
rise = 1
fall = 1
send = "PING\r\n"
expect = "{expect}"
"#
        )
    };
    let servers = [format!("\"{}\"", redis.addr)];
    let config = format!(
        "{HEAD}{}{}{}{}",
        listener("good", "good"),
        upstream("good", "round_robin", &servers, &health("+PONG")),
        listener("bad", "bad"),
        upstream("bad", "round_robin", &servers, &health("+NOPE")),
    );
    let ferry = Ferry::start(&config, 2).await;
    let admin = admin_addr(&ferry).await;

    // A wrong answer: down, with the reason logged.
    let line = &wait_event(&ferry, 1, "server is down", redis.addr, WAIT).await[0];
    assert!(line.contains("upstream=bad"), "{line}");
    assert!(
        line.contains(r#"expected "+NOPE", got "+PONG""#),
        "the reason names what was expected and what came: {line}"
    );
    // The right answer: checks pass and the server stays up.
    let (st, _) = wait_status(admin, "a passed check on the good upstream", WAIT, |st| {
        server_of(st, "good", redis.addr)
            .is_some_and(|s| s["last_check"]["ok"] == true && s["state"] == "up")
    })
    .await;
    let bad = server_of(&st, "bad", redis.addr).unwrap();
    assert_eq!(bad["state"], "down", "{st:#}");
    assert!(
        bad["last_check"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("+NOPE"),
        "{bad}"
    );
    assert!(
        !ferry
            .stderr
            .all()
            .iter()
            .any(|l| l.contains("upstream=good") && l.contains("server is down")),
        "{}",
        ferry.stderr.text()
    );

    // Through the good pool, a real redis answers.
    let mut s = connect(ferry.addr("good")).await;
    s.write_all(b"PING\r\n").await.unwrap();
    assert_eq!(read_line(&mut s, WAIT).await.as_deref(), Ok("+PONG\r"));
    // Through the bad one, nothing is available.
    let client = expect_closed_at_once(ferry.addr("bad"), WAIT).await;
    let recs = ferry.records_with("no_server", 1, WAIT).await;
    assert_eq!(record_for(&recs, client)["upstream"], "bad");
}

// ---------------------------------------------------------------------------------------
// 11. passive ejection

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_after_failed_connects_then_retried() {
    let good = Backend::start("127.0.0.1", "good").await;
    let flaky = refused_addr();
    let config = format!(
        "{HEAD}{}{}",
        listener("front", "pool"),
        upstream(
            "pool",
            "round_robin",
            &[format!("\"{flaky}\""), quoted(&good)],
            // Active checks far apart: only live connects judge the server here.
            r#"retries = 1
[upstream.health]
interval = "1h"
passive = { failures = 2, eject = "1s" }
"#,
        ),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");
    let failures = |st: &serde_json::Value| {
        server_of(st, "pool", flaky).unwrap()["connect_failures"]
            .as_u64()
            .unwrap()
    };

    // Round robin offers the refusing server every other connection; retries hide it.
    // The connection during which the second connect to it fails ejects it: no sooner
    // than that connection began.
    let mut n = 0;
    let ejected = loop {
        let began = Instant::now();
        assert_eq!(who(front, None).await, "good");
        if failures(&status(admin).await) >= 2 {
            break began;
        }
        n += 1;
        assert!(n <= 10, "not ejected; stderr:\n{}", ferry.stderr.text());
    };
    let line = &wait_event(&ferry, 1, "server ejected", flaky, WAIT).await[0];
    assert!(
        line.contains("after 2 consecutive failed connects"),
        "{line}"
    );
    let st = status(admin).await;
    assert_eq!(failures(&st), 2, "{st:#}");
    assert_eq!(server_of(&st, "pool", flaky).unwrap()["state"], "down");

    // The server comes back at once, but stays ejected for the eject time: not tried. A
    // connection counts as made during the ejection if the status still shows the server
    // down after it (the ejection is one stretch of time, and ends by itself).
    let _back = Backend::start_at(flaky, "flaky").await;
    let mut during = 0;
    for _ in 0..4 {
        let name = who(front, None).await;
        let st = status(admin).await;
        if server_of(&st, "pool", flaky).unwrap()["state"] != "down" {
            break;
        }
        assert_eq!(name, "good", "an ejected server was offered");
        during += 1;
    }
    // (The one check here that needs the machine to keep up: a connection and a status
    // request within the eject time of 1s.)
    assert!(
        during > 0,
        "the ejection was over before a connection could be made: cannot tell"
    );
    assert_eq!(failures(&status(admin).await), 2);

    // After the eject time it is offered connections again.
    wait_state(admin, "pool", flaky, "up", WAIT).await;
    let after = ejected.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "back after {after:?}, eject is 1s"
    );
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(who(front, None).await);
    }
    assert!(names.contains(&"flaky".to_string()), "{names:?}");
}

// ---------------------------------------------------------------------------------------
// 12. DNS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_name_is_re_resolved_and_open_connections_stay() {
    let old = Backend::start("127.0.0.2", "old").await;
    let port = old.addr.port();
    let new = Backend::start_at(SocketAddr::new(lo(3), port), "new").await;
    let config = format!(
        r#"
[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["testhost.ferry:{port}"]
resolve_interval = "300ms"
"#
    );
    let hosts = |ip: &str| format!("127.0.0.1 localhost\n{ip} testhost.ferry\n");
    let ferry = NsFerry::start(&hosts("127.0.0.2"), &config, "front").await;

    let (mut held, name) = open(ferry.listen, None).await;
    assert_eq!(name, "old");
    assert_eq!(who(ferry.listen, None).await, "old");

    let swapped = Instant::now();
    ferry.rewrite_hosts(&hosts("127.0.0.3"));
    let want = format!("servers now: {}", new.addr);
    ferry
        .stderr
        .wait(WAIT, |l| l.contains(&want))
        .await
        .unwrap_or_else(|| {
            panic!(
                "ferry did not pick up the new address; stderr:\n{}",
                ferry.stderr.text()
            )
        });
    eprintln!("new address in use {:?} after the swap", swapped.elapsed());
    for _ in 0..4 {
        assert_eq!(who(ferry.listen, None).await, "new");
    }
    // The connection opened before the swap still reaches the old server.
    echo_round_trip(&mut held, b"still on the old one\n").await;

    // The name stops resolving: a warning, and the last good address keeps serving.
    ferry.rewrite_hosts("127.0.0.1 localhost\n");
    ferry
        .stderr
        .wait(WAIT, |l| l.contains("cannot resolve testhost.ferry"))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no warning for a failed lookup; stderr:\n{}",
                ferry.stderr.text()
            )
        });
    for _ in 0..3 {
        assert_eq!(who(ferry.listen, None).await, "new");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_name_resolves_without_a_namespace() {
    let v4 = Backend::start("127.0.0.1", "v4").await;
    let port = v4.addr.port();
    // If `localhost` also resolves to ::1 here, serve there too.
    let v6 = match std::net::TcpListener::bind(("::1", port)) {
        Ok(l) => {
            drop(l);
            Some(Backend::start_at(format!("[::1]:{port}").parse().unwrap(), "v6").await)
        }
        Err(_) => None,
    };
    let config = format!(
        "{HEAD}{}{}",
        listener("front", "pool"),
        upstream(
            "pool",
            "round_robin",
            &[format!("\"localhost:{port}\"")],
            "retries = 0"
        ),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    for _ in 0..4 {
        let (mut s, name) = open(ferry.addr("front"), None).await;
        assert!(name == "v4" || (v6.is_some() && name == "v6"), "{name}");
        echo_round_trip(&mut s, b"hello\n").await;
    }
    let st = status(admin).await;
    let servers = upstream_of(&st, "pool")["servers"].as_array().unwrap();
    assert!(
        servers
            .iter()
            .any(|s| s["addr"] == v4.addr.to_string()
                && s["configured"] == format!("localhost:{port}")),
        "{st:#}"
    );
}

// ---------------------------------------------------------------------------------------
// ferry check

#[test]
fn check_accepts_every_balance_and_rejects_an_unknown_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = |balance: &str, extra: &str| {
        format!(
            r#"[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "pool"

[[upstream]]
name = "pool"
balance = "{balance}"
servers = ["127.0.0.1:7001", {{ addr = "127.0.0.1:7002", weight = 3 }}, {{ addr = "127.0.0.1:7003", backup = true }}]
{extra}
"#
        )
    };
    let names = [
        "round_robin",
        "least_conn",
        "random",
        "p2c",
        "maglev",
        "ring_hash",
        "first",
    ];
    for (i, balance) in names.iter().enumerate() {
        let path = write_file(dir.path(), &format!("ok{i}.toml"), &config(balance, ""));
        let out = run_ferry(&["check", "--config", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{balance} refused: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("balance {balance}")),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let path = write_file(
        dir.path(),
        "bounded.toml",
        &config("ring_hash", "hash_balance_factor = 150"),
    );
    let out = run_ferry(&["check", "--config", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let text = config("weighted_rr", "");
    let path = write_file(dir.path(), "bad.toml", &text);
    let out = run_ferry(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let (line, col) = text
        .lines()
        .enumerate()
        .find_map(|(i, l)| l.find("\"weighted_rr\"").map(|c| (i + 1, c + 1)))
        .unwrap();
    let want = format!("{}:{line}:{col}: ", path.display());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let msg = all
        .lines()
        .find(|l| l.starts_with(&want))
        .unwrap_or_else(|| panic!("no error at {want:?} in:\n{all}"));
    assert!(
        msg.contains("weighted_rr") && msg.contains("balance"),
        "{msg}"
    );
}

/// A client that hangs up while queued gives its place to the next one at once, and is
/// logged `client_reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_client_that_hangs_up_frees_its_place() {
    let q = Backend::start("127.0.0.1", "q").await;
    let config = format!(
        "{HEAD}{}{}",
        listener("front", "pool"),
        upstream(
            "pool",
            "round_robin",
            &[quoted(&q)],
            r#"max_connections_per_server = 1
queue = { size = 1, timeout = "10s" }"#,
        ),
    );
    let ferry = Ferry::start(&config, 1).await;
    let admin = admin_addr(&ferry).await;
    let front = ferry.addr("front");
    let queued = |n: u64| move |st: &serde_json::Value| upstream_of(st, "pool")["queued"] == n;

    // A holds the only slot; B takes the only queue place, then hangs up.
    let (a, _) = open(front, None).await;
    let (b_addr, b) = connect_from(front).await;
    let b = b.expect("connect B");
    wait_status(admin, "B to be queued", WAIT, queued(1)).await;
    drop(b);
    wait_status(admin, "B's place to be freed", WAIT, queued(0)).await;
    let gone = ferry.records_with("client_reset", 1, WAIT).await;
    assert!(record_for(&gone, b_addr)["server"].is_null());

    // C can queue now (it is not refused as `limited`) and is served when A leaves.
    let (_, c) = connect_from(front).await;
    let mut c = c.expect("connect C");
    c.write_all(b"hi\n").await.unwrap();
    wait_status(admin, "C to be queued", WAIT, queued(1)).await;
    drop(a);
    assert_eq!(read_line(&mut c, WAIT).await.as_deref(), Ok("q"));
    assert_eq!(read_line(&mut c, WAIT).await.as_deref(), Ok("hi"));
}

/// When every server is down, new connections are refused (`no_server`); with
/// `fail_open = true` they are sent to the servers anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_down_refuses_unless_fail_open() {
    // The backend works but fails its health check (it never sends what is expected).
    let s = Backend::start("127.0.0.1", "s").await;
    for fail_open in [false, true] {
        let config = format!(
            "{HEAD}{}{}",
            listener("front", "pool"),
            upstream(
                "pool",
                "round_robin",
                &[quoted(&s)],
                &format!(
                    r#"[upstream.health]
interval = "100ms"
timeout = "200ms"
fall = 1
expect = "NEVER"
fail_open = {fail_open}"#
                ),
            ),
        );
        let ferry = Ferry::start(&config, 1).await;
        let admin = admin_addr(&ferry).await;
        wait_state(admin, "pool", s.addr, "down", WAIT).await;
        let front = ferry.addr("front");
        if fail_open {
            assert_eq!(
                who(front, None).await,
                "s",
                "fail_open sends to a down server"
            );
        } else {
            let client = expect_closed_at_once(front, Duration::from_secs(1)).await;
            let refused = ferry.records_with("no_server", 1, WAIT).await;
            assert!(record_for(&refused, client)["server"].is_null());
        }
    }
}
