//! The relay through the real binary: bytes arrive intact both ways, half-closes pass
//! through, and every connection gets an access-log record.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A config with one listener `NAME` on `listen` in front of one upstream `UP` of `servers`.
fn one_listener(name: &str, listen: &str, up: &str, servers: &[SocketAddr]) -> String {
    one_listener_with("", name, listen, up, servers)
}

/// The `[global]` lines that pick a relay engine.
fn engine(splice: bool) -> &'static str {
    if splice {
        "[global]\nsplice = true\n"
    } else {
        "[global]\nsplice = false\n"
    }
}

/// [`one_listener`] with `top` (e.g. a `[global]` section) in front.
fn one_listener_with(
    top: &str,
    name: &str,
    listen: &str,
    up: &str,
    servers: &[SocketAddr],
) -> String {
    let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        r#"{top}
[log]
access = "@LOG@"
format = "json"

[[listener]]
name = "{name}"
listen = "{listen}"
upstream = "{up}"

[[upstream]]
name = "{up}"
servers = [{}]
"#,
        servers.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_echo_and_access_record() {
    let echo = echo_server().await;
    let ferry = Ferry::start(&one_listener("front", "127.0.0.1:0", "echoes", &[echo]), 1).await;
    let addr = ferry.addr("front");

    let mut c = connect(addr).await;
    let client = c.local_addr().unwrap();
    echo_round_trip(&mut c, b"hello, ferry\n").await;
    echo_round_trip(&mut c, &[7u8; 1000]).await;
    c.shutdown().await.unwrap();
    let (rest, how) = read_until_closed(&mut c, WAIT).await;
    assert!(rest.is_empty());
    assert_eq!(how, Closed::Eof, "a clean close is passed on as EOF");

    let recs = ferry.records(1, WAIT).await;
    assert_eq!(recs.len(), 1, "{recs:#?}");
    let r = &recs[0];
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["listener"], "front");
    assert_eq!(r["upstream"], "echoes");
    assert_eq!(r["server"], echo.to_string());
    assert_eq!(r["client"], client.to_string());
    assert_eq!(r["bytes_up"], 1013);
    assert_eq!(r["bytes_down"], 1013);
    assert!(r["sni"].is_null());
    // Connecting to the server is part of the connection's time.
    let connect_ms = r["connect_ms"].as_f64().expect("connect_ms is a number");
    let duration_ms = r["duration_ms"].as_f64().expect("duration_ms is a number");
    assert!(connect_ms <= duration_ms, "{r}");
    let ts = r["ts"].as_str().expect("ts is a string");
    assert!(
        ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.contains('T') && ts.ends_with('Z'),
        "ts is not RFC 3339: {ts}"
    );
}

const BIG: u64 = 100 * 1024 * 1024;
/// SHA-256 of `BIG` bytes of `Prng::new(7)` and `Prng::new(42)` (see `crate::common::prng_sha256`),
/// computed once with an optimised build: in a debug build SHA-256 runs at ~35 MiB/s, so
/// each end hashing the same 100 MiB again would dominate the suite's time.
const BIG_SEED_7_SHA256: &str = "c4a520115691d97f6fdb7bf9161decbb8484d275de097a649317658536797f63";
const BIG_SEED_42_SHA256: &str = "6791b2507b898e7cc3db532b1774c5099fc48064ed99a2f4e3ab9d11fdc1ae27";

fn mib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_each_way() {
    hundred_megabytes(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_each_way_copy_engine() {
    hundred_megabytes(false).await;
}

async fn hundred_megabytes(splice: bool) {
    let sink = sink_server().await;
    let source = source_server(BIG, 42).await;
    let discard = discard_server().await;
    let repeat = repeat_server(BIG).await;
    let config = format!(
        r#"{}
[log]
access = "@LOG@"

[[listener]]
name = "up"
listen = "127.0.0.1:0"
upstream = "sink"

[[listener]]
name = "down"
listen = "127.0.0.1:0"
upstream = "source"

[[listener]]
name = "raw-up"
listen = "127.0.0.1:0"
upstream = "discard"

[[listener]]
name = "raw-down"
listen = "127.0.0.1:0"
upstream = "repeat"

[[upstream]]
name = "sink"
servers = ["{sink}"]

[[upstream]]
name = "source"
servers = ["{source}"]

[[upstream]]
name = "discard"
servers = ["{discard}"]

[[upstream]]
name = "repeat"
servers = ["{repeat}"]
"#,
        engine(splice)
    );
    let ferry = Ferry::start(&config, 4).await;
    let big_wait = Duration::from_secs(120);

    // Client → server: a known stream; the sink hashes what arrives.
    let mut c = connect(ferry.addr("up")).await;
    let t = Instant::now();
    let reply = within(big_wait, "100 MiB upload", async {
        write_prng(&mut c, BIG, 7).await.expect("upload");
        c.shutdown().await.expect("shutdown");
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.expect("sink reply");
        reply
    })
    .await;
    let up_secs = t.elapsed().as_secs_f64();
    let (n, h) = sink_reply(&reply);
    assert_eq!(n, BIG, "the sink got a different number of bytes");
    assert_eq!(hex(&h), BIG_SEED_7_SHA256, "upload corrupted");
    drop(c);

    // Server → client: the source sends a known stream; the client hashes it.
    let mut c = connect(ferry.addr("down")).await;
    let t = Instant::now();
    let (n, h) = within(big_wait, "100 MiB download", read_hash(&mut c))
        .await
        .expect("download");
    let down_secs = t.elapsed().as_secs_f64();
    assert_eq!(n, BIG, "the client got a different number of bytes");
    assert_eq!(hex(&h), BIG_SEED_42_SHA256, "download corrupted");
    drop(c);

    // The same without hashing or generating data at the ends: closer to ferry's own speed.
    let mut c = connect(ferry.addr("raw-up")).await;
    let t = Instant::now();
    let reply = within(big_wait, "raw upload", async {
        write_repeated(&mut c, BIG).await.expect("upload");
        c.shutdown().await.expect("shutdown");
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.expect("discard reply");
        reply
    })
    .await;
    let raw_up_secs = t.elapsed().as_secs_f64();
    assert_eq!(reply, BIG.to_le_bytes());
    drop(c);
    let mut c = connect(ferry.addr("raw-down")).await;
    let t = Instant::now();
    let n = within(big_wait, "raw download", read_count(&mut c))
        .await
        .expect("download");
    let raw_down_secs = t.elapsed().as_secs_f64();
    assert_eq!(n, BIG);
    drop(c);

    let engine = if splice { "splice" } else { "copy" };
    eprintln!(
        "{engine} engine: 100 MiB through ferry, hashed at one end: up {up_secs:.2} s ({:.0} MiB/s), down {down_secs:.2} s ({:.0} MiB/s)",
        mib_per_s(BIG, up_secs),
        mib_per_s(BIG, down_secs)
    );
    eprintln!(
        "{engine} engine: 100 MiB through ferry, not hashed: up {raw_up_secs:.2} s ({:.0} MiB/s), down {raw_down_secs:.2} s ({:.0} MiB/s)",
        mib_per_s(BIG, raw_up_secs),
        mib_per_s(BIG, raw_down_secs)
    );

    let recs = ferry.records(4, WAIT).await;
    let rec = |name: &str| recs.iter().find(|r| r["listener"] == name).unwrap();
    for (name, up, down) in [
        ("up", BIG, 40),
        ("down", 0, BIG),
        ("raw-up", BIG, 8),
        ("raw-down", 0, BIG),
    ] {
        let r = rec(name);
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["bytes_up"], up, "{r}");
        assert_eq!(r["bytes_down"], down, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_of_random_sizes() {
    concurrent_streams(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_of_random_sizes_copy_engine() {
    concurrent_streams(false).await;
}

async fn concurrent_streams(splice: bool) {
    const STREAMS: u64 = 64;
    let echo = echo_server().await;
    let config = one_listener_with(engine(splice), "front", "127.0.0.1:0", "echo", &[echo]);
    let ferry = Ferry::start(&config, 1).await;
    let addr = ferry.addr("front");

    let mut rng = Prng::new(2024);
    let sizes: Vec<u64> = (0..STREAMS).map(|_| rng.below(4 << 20)).collect();
    let mut tasks = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            let client = c.local_addr().unwrap();
            let (mut r, mut w) = c.split();
            let send = async {
                let h = send_prng(&mut w, size, 1000 + i as u64)
                    .await
                    .expect("send");
                w.shutdown().await.expect("shutdown");
                h
            };
            let (sent, got) = tokio::join!(send, read_hash(&mut r));
            let (n, h) = got.expect("read back");
            assert_eq!(n, size, "stream {i}: length differs");
            assert_eq!(hex(&h), hex(&sent), "stream {i}: data differs");
            (client, size)
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(
            within(Duration::from_secs(120), "64 streams", t)
                .await
                .expect("stream task"),
        );
    }

    let recs = ferry.records(STREAMS as usize, WAIT).await;
    assert_eq!(recs.len(), STREAMS as usize);
    for (client, size) in done {
        let r = record_for(&recs, client);
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["bytes_up"], size, "{r}");
        assert_eq!(r["bytes_down"], size, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_client_side() {
    half_close_client(true).await;
    half_close_client(false).await;
}

async fn half_close_client(splice: bool) {
    // The client writes, shuts down its write side, and still gets the reply the server
    // sends only after EOF.
    let sink = sink_server().await;
    let config = one_listener_with(engine(splice), "front", "127.0.0.1:0", "sink", &[sink]);
    let ferry = Ferry::start(&config, 1).await;
    let mut c = connect(ferry.addr("front")).await;
    let sent = within(WAIT, "upload", send_prng(&mut c, 1 << 20, 5))
        .await
        .unwrap();
    c.shutdown().await.unwrap();
    let (reply, how) = read_until_closed(&mut c, WAIT).await;
    assert_eq!(how, Closed::Eof);
    let (n, h) = sink_reply(&reply);
    assert_eq!(n, 1 << 20);
    assert_eq!(hex(&h), hex(&sent));

    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["bytes_up"], 1 << 20);
    assert_eq!(r["bytes_down"], 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_server_side() {
    half_close_server(true).await;
    half_close_server(false).await;
}

async fn half_close_server(splice: bool) {
    // The server writes, shuts down its write side, and then still receives what the
    // client sends.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let server = serve_on("127.0.0.1", move |mut s| {
        let tx = tx.clone();
        async move {
            s.write_all(&[b'x'; 100_000]).await.unwrap();
            s.shutdown().await.unwrap();
            let got = read_hash(&mut s).await;
            let _ = tx.send(got.map_err(|e| e.to_string()));
        }
    })
    .await;
    let config = one_listener_with(engine(splice), "front", "127.0.0.1:0", "up", &[server]);
    let ferry = Ferry::start(&config, 1).await;
    let mut c = connect(ferry.addr("front")).await;

    // All of the server's data, then EOF; the connection stays open the other way.
    let mut got = Vec::new();
    within(WAIT, "server data and EOF", c.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, vec![b'x'; 100_000]);

    let sent = within(
        WAIT,
        "upload after the server's EOF",
        send_prng(&mut c, 1 << 20, 9),
    )
    .await
    .expect("the client can still send after the server's EOF");
    c.shutdown().await.unwrap();
    let (n, h) = within(WAIT, "the server's report", rx.recv())
        .await
        .unwrap()
        .expect("server read");
    assert_eq!(n, 1 << 20);
    assert_eq!(hex(&h), hex(&sent));

    let (rest, how) = read_until_closed(&mut c, WAIT).await;
    assert!(rest.is_empty());
    assert_eq!(how, Closed::Eof);
    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["bytes_up"], 1 << 20);
    assert_eq!(r["bytes_down"], 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first() {
    let server = banner_server("220 welcome to the test server\r\n").await;
    let ferry = Ferry::start(&one_listener("smtp", "127.0.0.1:0", "mail", &[server]), 1).await;
    let mut c = connect(ferry.addr("smtp")).await;
    // The client sends nothing: the banner must still arrive.
    let mut banner = vec![0u8; 32];
    within(WAIT, "the banner", c.read_exact(&mut banner))
        .await
        .unwrap();
    assert_eq!(banner, b"220 welcome to the test server\r\n");
    echo_round_trip(&mut c, b"EHLO test\r\n").await;
    drop(c);

    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["bytes_up"], 11);
    assert_eq!(r["bytes_down"], 32 + 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_loopback() {
    let echo = echo_server_on("::1").await;
    assert!(echo.is_ipv6());
    let ferry = Ferry::start(&one_listener("v6", "[::1]:0", "v6pool", &[echo]), 1).await;
    let addr = ferry.addr("v6");
    assert!(addr.is_ipv6(), "listening on {addr}");
    assert_eq!(addr.ip().to_string(), "::1");

    let mut c = connect(addr).await;
    let client = c.local_addr().unwrap();
    echo_round_trip(&mut c, b"over IPv6").await;
    c.shutdown().await.unwrap();
    read_until_closed(&mut c, WAIT).await;

    let r = &ferry.records(1, WAIT).await[0];
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["client"], client.to_string());
    assert!(r["client"].as_str().unwrap().starts_with("[::1]:"), "{r}");
    assert_eq!(r["server"], echo.to_string());
    assert_eq!(r["bytes_up"], 9);
    assert_eq!(r["bytes_down"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_access_log() {
    let echo = echo_server().await;
    // A relative access-log path is relative to the config file's folder.
    let config = one_listener("plain", "127.0.0.1:0", "echo", &[echo])
        .replace("format = \"json\"", "format = \"text\"")
        .replace("access = \"@LOG@\"", "access = \"access.log\"");
    let ferry = Ferry::start(&config, 1).await;
    let mut clients = Vec::new();
    for i in 0..3u8 {
        let mut c = connect(ferry.addr("plain")).await;
        clients.push(c.local_addr().unwrap());
        echo_round_trip(&mut c, &[i; 10]).await;
        c.shutdown().await.unwrap();
        read_until_closed(&mut c, WAIT).await;
    }
    let lines = ferry.log_lines(3, WAIT).await;
    assert_eq!(lines.len(), 3, "{lines:#?}");
    for client in clients {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("client={client} ")))
            .unwrap_or_else(|| panic!("no line for {client}: {lines:#?}"));
        assert!(serde_json::from_str::<serde_json::Value>(line).is_err());
        for part in [
            "listener=plain",
            "upstream=echo",
            &format!("server={echo}"),
            "bytes_up=10",
            "bytes_down=10",
        ] {
            assert!(line.contains(part), "{part:?} missing in {line}");
        }
        assert!(line.ends_with("result=ok"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_addresses_on_one_listener() {
    let echo = echo_server().await;
    let config = one_listener("both", "X", "echo", &[echo])
        .replace("listen = \"X\"", "listen = [\"127.0.0.1:0\", \"[::1]:0\"]");
    let ferry = Ferry::start(&config, 2).await;
    assert_eq!(ferry.listening.len(), 2, "{:?}", ferry.listening);
    assert!(ferry.listening.iter().all(|(n, _)| n == "both"));
    let mut clients = Vec::new();
    for (_, addr) in ferry.listening.clone() {
        let mut c = connect(addr).await;
        clients.push(c.local_addr().unwrap());
        echo_round_trip(&mut c, addr.to_string().as_bytes()).await;
        c.shutdown().await.unwrap();
        read_until_closed(&mut c, WAIT).await;
    }
    assert!(clients[0].is_ipv4() && clients[1].is_ipv6());
    let recs = ferry.records(2, WAIT).await;
    for c in clients {
        let r = record_for(&recs, c);
        assert_eq!(r["listener"], "both");
        assert_eq!(r["result"], "ok", "{r}");
    }
}

/// Starts ferry with `workers` workers and one listener (`reuse_port` as given) in front of
/// an echo server, and relays 40 concurrent connections through it, all `ok`.
async fn forty_through(workers: usize, reuse_port: bool) -> (Ferry, std::net::SocketAddr) {
    let echo = echo_server().await;
    let config = one_listener_with(
        &format!("[global]\nworkers = {workers}\n"),
        "shared",
        "127.0.0.1:0",
        "echo",
        &[echo],
    )
    .replace(
        "upstream = \"echo\"\n",
        &format!("upstream = \"echo\"\nreuse_port = {reuse_port}\n"),
    );
    let ferry = Ferry::start(&config, 1).await;
    // One address announced, however many sockets serve it.
    assert_eq!(ferry.listening.len(), 1, "{:?}", ferry.listening);
    let addr = ferry.addr("shared");
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        tasks.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            echo_round_trip(&mut c, &i.to_le_bytes()).await;
        }));
    }
    for t in tasks {
        within(WAIT, "40 connections", t).await.unwrap();
    }
    let recs = ferry.records(40, WAIT).await;
    assert!(recs.iter().all(|r| r["result"] == "ok"));
    (ferry, addr)
}

/// `reuse_port = false`: one listening socket per address, accepted on by every worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_socket_listener() {
    let (mut ferry, addr) = forty_through(3, false).await;
    // Every worker accepts on the socket; once all have let go of it, it is closed.
    ferry.signal("TERM");
    let st = ferry
        .wait_exit(WAIT)
        .await
        .expect("ferry exits after SIGTERM");
    assert!(st.success(), "{st:?}");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listening socket is closed"
    );
}

/// `reuse_port = true` (the default): a socket per worker on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_port_listener() {
    forty_through(2, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_address_families() {
    let echo4 = echo_server().await;
    let echo6 = echo_server_on("::1").await;
    let config = format!(
        r#"
[log]
access = "@LOG@"

[[listener]]
name = "v4-to-v6"
listen = "127.0.0.1:0"
upstream = "six"

[[listener]]
name = "v6-to-v4"
listen = "[::1]:0"
upstream = "four"

[[upstream]]
name = "six"
servers = ["{echo6}"]

[[upstream]]
name = "four"
servers = ["{echo4}"]
"#
    );
    let ferry = Ferry::start(&config, 2).await;
    for name in ["v4-to-v6", "v6-to-v4"] {
        let mut c = connect(ferry.addr(name)).await;
        echo_round_trip(&mut c, name.as_bytes()).await;
        c.shutdown().await.unwrap();
        read_until_closed(&mut c, WAIT).await;
    }
    let recs = ferry.records(2, WAIT).await;
    let r = recs.iter().find(|r| r["listener"] == "v4-to-v6").unwrap();
    assert_eq!(r["server"], echo6.to_string());
    assert_eq!(r["result"], "ok");
    let r = recs.iter().find(|r| r["listener"] == "v6-to-v4").unwrap();
    assert_eq!(r["server"], echo4.to_string());
    assert_eq!(r["result"], "ok");
}

/// Sends `head`, then `urgent` as TCP urgent data (`MSG_OOB`: its last byte is the urgent
/// one), then `tail`, corked into one segment so that the receiver's queue holds data
/// after the urgent mark by the time it reads.
fn send_with_urgent_byte(s: &TcpStream, head: &[u8], urgent: &[u8], tail: &[u8]) {
    use std::io::Write;
    let sock = socket2::SockRef::from(s);
    sock.set_tcp_cork(true).unwrap();
    (&*sock).write_all(head).unwrap();
    assert_eq!(sock.send_out_of_band(urgent).unwrap(), urgent.len());
    (&*sock).write_all(tail).unwrap();
    sock.set_tcp_cork(false).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_data_is_relayed_in_line_and_strands_nothing() {
    // A read stops short at TCP's urgent mark with data still queued behind it, and a
    // splice cannot pass the mark at all. Each direction first moves 1 MiB (so the splice
    // engine is splicing), then `head`, an urgent byte and `tail` in one segment, then
    // pauses: all of it must arrive, the urgent byte in line.
    const BULK: usize = 1 << 20;
    for splice in [true, false] {
        let server = serve_on("127.0.0.1", |mut s| async move {
            s.write_all(&vec![b'd'; BULK]).await.unwrap();
            send_with_urgent_byte(&s, b"HEAD", b"!", b"TAIL");
            echo_stream(&mut s).await;
        })
        .await;
        let config = one_listener_with(engine(splice), "front", "127.0.0.1:0", "up", &[server]);
        let ferry = Ferry::start(&config, 1).await;
        let mut c = connect(ferry.addr("front")).await;

        let mut down = vec![0u8; BULK + 9];
        within(
            WAIT,
            "the server's bytes after its urgent byte",
            c.read_exact(&mut down),
        )
        .await
        .unwrap();
        assert!(down[..BULK].iter().all(|&b| b == b'd'));
        assert_eq!(&down[BULK..], b"HEAD!TAIL", "splice = {splice}");

        c.write_all(&vec![b'u'; BULK]).await.unwrap();
        send_with_urgent_byte(&c, b"head", b"!", b"tail");
        let mut up = vec![0u8; BULK + 9];
        within(
            WAIT,
            "the client's bytes after its urgent byte, echoed",
            c.read_exact(&mut up),
        )
        .await
        .unwrap();
        assert!(up[..BULK].iter().all(|&b| b == b'u'));
        assert_eq!(&up[BULK..], b"head!tail", "splice = {splice}");
        drop(c);
        let r = &ferry.records(1, WAIT).await[0];
        assert_eq!(r["bytes_up"], BULK as u64 + 9, "{r}");
        assert_eq!(r["bytes_down"], 2 * (BULK as u64 + 9), "{r}");
    }
}

/// Echoes until EOF.
async fn echo_stream(s: &mut TcpStream) {
    let (mut r, mut w) = s.split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}
