//! Running under systemd: readiness notifications seen by a test socket standing in for
//! systemd's, in order (READY, RELOADING then READY around a reload, STOPPING at the
//! drain); listeners started on sockets passed as systemd passes them (`LISTEN_FDS`), by
//! a ferry that runs as `nobody` and so could not bind the port below 1024 it serves on;
//! and the unit in `contrib/` accepted by `systemd-analyze verify`.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reload_and_stop_are_notified_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let echo = echo_server().await;
    let config = echo_config("", echo);
    let env = format!("NOTIFY_SOCKET={}", path.display());
    let mut ferry = Ferry::start_wrapped(&config, 1, &["env", &env]).await;
    let mut seen = Vec::new();
    let s = tokio::task::block_in_place(|| {
        notes_until(&sock, "READY=1", &mut seen);
        seen.clone()
    });
    // READY comes once the listener accepts: it was announced before.
    let ready = s.last().unwrap();
    assert!(ready.contains("STATUS=serving; 1 listener(s)"), "{ready}");
    let mut c = connect(ferry.addr("front")).await;
    echo_round_trip(&mut c, b"ready").await;

    ferry.signal("HUP");
    let (reload, after) = tokio::task::block_in_place(|| {
        let mut seen = Vec::new();
        notes_until(&sock, "RELOADING=1", &mut seen);
        let reload = seen.last().unwrap().clone();
        let mut more = Vec::new();
        notes_until(&sock, "READY=1", &mut more);
        (reload, more)
    });
    assert!(
        reload.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{reload}"
    );
    assert!(
        after.last().unwrap().contains("STATUS=reloaded"),
        "{after:?}"
    );

    ferry.signal("TERM");
    let stop = tokio::task::block_in_place(|| {
        let mut seen = Vec::new();
        notes_until(&sock, "STOPPING=1", &mut seen);
        seen
    });
    assert!(stop.last().unwrap().contains("STATUS=draining"), "{stop:?}");
    drop(c);
    assert!(ferry.wait_exit(Duration::from_secs(20)).await.is_some());
}

/// Sockets passed as systemd passes them: a listening TCP socket on a port below 1024 and
/// a UDP socket, descriptors 3 and 4, `LISTEN_FDS=2` and `LISTEN_PID` the process's own;
/// then ferry runs as `nobody`. Its listeners on those addresses serve on them (it could
/// not have bound the low port itself).
#[tokio::test]
async fn listeners_use_sockets_systemd_passes() {
    // A port below 1024 that is free for TCP, and a UDP port.
    let low = (900..1024u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024");
    let udp_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let echo = echo_server().await;
    let udp_echo = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let udp_echo_addr = udp_echo.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = udp_echo.recv_from(&mut buf).await {
            let _ = udp_echo.send_to(&buf[..n], from).await;
        }
    });
    let config = format!(
        r#"
[log]
access = "off"
[[listener]]
name = "tcp"
listen = ["127.0.0.1:{low}"]
upstream = "tcp"
[[listener]]
name = "udp"
protocol = "udp"
listen = ["127.0.0.1:{udp_port}"]
upstream = "udp"
[[upstream]]
name = "tcp"
servers = ["{echo}"]
[[upstream]]
name = "udp"
servers = ["{udp_echo_addr}"]
"#
    );
    // The activator: binds, puts the sockets at 3 and 4, lets nobody read the config, sets
    // the variables for its own pid, becomes nobody, and execs ferry (same pid).
    let activator = format!(
        r#"
import os, socket, sys
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("127.0.0.1", {low})); t.listen(128)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("127.0.0.1", {udp_port}))
os.dup2(t.fileno(), 3); os.dup2(u.fileno(), 4)
os.set_inheritable(3, True); os.set_inheritable(4, True)
cfg = sys.argv[-1]
os.chmod(os.path.dirname(cfg), 0o755); os.chmod(cfg, 0o644)
os.environ["LISTEN_FDS"] = "2"
os.environ["LISTEN_PID"] = str(os.getpid())
os.setgroups([]); os.setgid(65534); os.setuid(65534)
os.execv(sys.argv[1], sys.argv[1:])
"#
    );
    let ferry = Ferry::start_wrapped(&config, 2, &["python3", "-c", &activator]).await;
    ferry
        .stderr
        .expect("no log of the inherited socket", |l| {
            l.contains("inherited a listening TCP socket")
        })
        .await;
    let uid = std::fs::read_to_string(format!("/proc/{}/status", ferry.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap()
        .to_string();
    assert!(uid.contains("65534"), "ferry runs as nobody: {uid}");
    let front: SocketAddr = format!("127.0.0.1:{low}").parse().unwrap();
    let mut c = connect(front).await;
    c.write_all(b"through an inherited socket").await.unwrap();
    let mut buf = [0u8; 27];
    within(WAIT, "the echo", c.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"through an inherited socket");
    let u = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    u.connect(("127.0.0.1", udp_port)).await.unwrap();
    u.send(b"datagram").await.unwrap();
    let mut ubuf = [0u8; 64];
    let n = within(WAIT, "the UDP echo", u.recv(&mut ubuf))
        .await
        .unwrap();
    assert_eq!(&ubuf[..n], b"datagram");
}

/// The unit in `contrib/` passes `systemd-analyze verify` (with `ExecStart` pointing at
/// the binary under test, since /usr/bin/ferry is not installed here).
#[test]
fn unit_file_verifies() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/ferry.service"
    ))
    .unwrap();
    for needed in [
        "Type=notify",
        "ExecReload=",
        "LimitNOFILE=",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "ProtectSystem=strict",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.service");
    std::fs::write(&path, unit.replace("/usr/bin/ferry", ferry_bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (scripts/setup-test-deps installs systemd)");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
