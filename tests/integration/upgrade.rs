//! Upgrades without a dropped connection: `ferry upgrade` takes over the listening sockets
//! of the ferry serving a config while a steady stream of new connections and 50 long-lived
//! ones run (none refused, none broken; the long-lived ones finish on the old process,
//! which exits after the last); SIGUSR2 starts the binary again in place (the new file at
//! the path, after a package replaced it) and tells systemd the new main pid; and an upgrade that cannot start leaves the old process serving.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use crate::common::*;
use crate::ops_support::{admin_addr, metric_must, metrics, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A ferry started by `ferry upgrade` (a child of the test), killed on drop.
struct Successor {
    child: Child,
    stderr: Lines,
}

impl Successor {
    fn start(config: &std::path::Path) -> Successor {
        Successor::start_with(
            ferry_bin(),
            &["upgrade", "--config", config.to_str().unwrap()],
        )
    }

    /// `program` with `args` (which run `ferry upgrade` one way or another).
    fn start_with(program: &str, args: &[&str]) -> Successor {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG")
            .spawn()
            .expect("spawn ferry upgrade");
        let stderr = Lines::capture(child.stderr.take().unwrap());
        Successor { child, stderr }
    }

    /// Waits for the line saying it has taken over; panics with its output otherwise.
    async fn taken_over(&self) {
        self.stderr
            .expect("the new ferry did not take over", |l| {
                l.contains("took over from pid")
            })
            .await;
    }

    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        within(WAIT, "the new ferry's exit", async {
            loop {
                if let Some(st) = self.child.try_wait().unwrap() {
                    return st;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A process the test did not start (the successor SIGUSR2 starts), ended on drop.
struct Stray(u32);

impl Stray {
    fn alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.0))
            .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim().starts_with('Z'))
    }

    fn signal(&self, sig: &str) {
        signal_pid(self.0, sig);
    }
}

impl Drop for Stray {
    fn drop(&mut self) {
        if self.alive() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(self.0.to_string())
                .status();
        }
    }
}

fn config(echo: SocketAddr, admin: bool) -> String {
    let admin = if admin {
        "[admin]\nlisten = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    format!(
        r#"
[global]
drain_timeout = "5m"
workers = 2
{admin}
[log]
access = "@LOG@"

[[listener]]
name = "front"
listen = ["127.0.0.1:0"]
upstream = "echo"

[[upstream]]
name = "echo"
servers = ["{echo}"]
"#
    )
}

/// The config with its listener on `front` (the port the first start chose), so that the
/// new process finds the passed socket by address.
fn pin(config: &str, front: SocketAddr, admin: Option<SocketAddr>) -> String {
    let mut c = config.replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!("listen = [\"{front}\"]"),
    );
    if let Some(a) = admin {
        c = c.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{a}\""));
    }
    c
}

/// Starts ferry with the config, then rewrites its file with the ports it chose: what an
/// operator's file says, and what an upgrade reads.
async fn start_pinned(echo: SocketAddr) -> (Ferry, SocketAddr, SocketAddr) {
    let text = config(echo, true);
    let ferry = Ferry::start(&text, 1).await;
    let front = ferry.addr("front");
    let admin = admin_addr(&ferry).await;
    let pinned =
        pin(&text, front, Some(admin)).replace("@LOG@", &ferry.log_path.display().to_string());
    std::fs::write(&ferry.config_path, pinned).unwrap();
    (ferry, front, admin)
}

/// A UDP echo server on loopback, until the test ends.
async fn udp_echo() -> SocketAddr {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let _ = sock.send_to(&buf[..n], from).await;
        }
    });
    addr
}

/// The config with a UDP listener "dns" too, to `uecho` (its `listen` spelled apart from
/// the TCP one's, for [`pin_udp`]).
fn with_udp(config: &str, uecho: SocketAddr) -> String {
    format!(
        "{config}\n[[listener]]\nname = \"dns\"\nprotocol = \"udp\"\nlisten = [ \"127.0.0.1:0\" ]\nresponses = 1\nupstream = \"uecho\"\n\n[[upstream]]\nname = \"uecho\"\nservers = [\"{uecho}\"]\n"
    )
}

fn pin_udp(config: &str, udp: SocketAddr) -> String {
    config.replace(
        "listen = [ \"127.0.0.1:0\" ]",
        &format!("listen = [\"{udp}\"]"),
    )
}

/// `clients` new client sockets each send a datagram to `addr` and get it back.
async fn udp_round_trips(addr: SocketAddr, clients: usize, what: &str) {
    for i in 0..clients {
        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(addr).await.unwrap();
        let msg = format!("{what} {i}");
        c.send(msg.as_bytes()).await.unwrap();
        let mut buf = [0u8; 256];
        let n = within(WAIT, &format!("the UDP echo of {msg:?}"), c.recv(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf[..n], msg.as_bytes());
    }
}

/// Waits until the admin server answers from process `pid` (the old process's admin
/// server may answer a request or two it had accepted as the hand-over happened).
async fn wait_pid(admin: SocketAddr, pid: u32) {
    within(WAIT, "the admin server of the new process", async {
        loop {
            if status(admin).await["process"]["pid"] == pid {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Opens, uses and closes connections to `addr` until `stop`, counting the good ones and
/// keeping every failure (a refused connect, a reset, a short echo).
struct Load {
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Clients that each make at most `bound` connections.
    fn start(addr: SocketAddr, clients: usize, bound: u64) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|i| {
                let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
                tokio::spawn(async move {
                    for n in 0..bound {
                        if stop.load(SeqCst) {
                            return;
                        }
                        let msg = format!("client {i} connection {n:>8}");
                        match tokio::time::timeout(WAIT, one(addr, msg.as_bytes())).await {
                            Ok(Ok(())) => {
                                ok.fetch_add(1, SeqCst);
                            }
                            Ok(Err(e)) => failures.lock().unwrap().push(format!("{msg}: {e}")),
                            Err(_) => failures.lock().unwrap().push(format!("{msg}: timed out")),
                        }
                    }
                })
            })
            .collect();
        Load {
            ok,
            failures,
            stop,
            tasks,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(SeqCst)
    }

    /// Waits until `n` more connections have succeeded.
    async fn more(&self, n: u64, what: &str) {
        let target = self.ok() + n;
        wait_until(WAIT, what, || {
            self.ok() >= target || !self.failures.lock().unwrap().is_empty()
        })
        .await;
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            within(WAIT, "the load clients", t).await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(SeqCst), failures)
    }
}

/// One connection: connect, an echo of `msg`, close.
async fn one(addr: SocketAddr, msg: &[u8]) -> std::io::Result<()> {
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    c.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).await?;
    if back != msg {
        return Err(std::io::Error::other("the echo differs"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_refuses_nothing_and_old_connections_finish_on_the_old_process() {
    let echo = echo_server().await;
    let uecho = udp_echo().await;
    let text = with_udp(&config(echo, true), uecho);
    let mut old = Ferry::start(&text, 2).await;
    let (front, udp) = (old.addr("front"), old.addr("dns"));
    let admin = admin_addr(&old).await;
    let pinned = pin_udp(&pin(&text, front, Some(admin)), udp)
        .replace("@LOG@", &old.log_path.display().to_string());
    std::fs::write(&old.config_path, &pinned).unwrap();
    let old_pid = old.pid();
    assert_eq!(status(admin).await["process"]["pid"], old_pid);
    udp_round_trips(udp, 20, "before").await;

    // 50 long-lived connections, each shown to work.
    let mut long = Vec::new();
    for i in 0..50 {
        let mut c = connect(front).await;
        echo_round_trip(&mut c, format!("long {i} before").as_bytes()).await;
        long.push(c);
    }
    let load = Load::start(front, 4, 1_000_000);
    load.more(200, "connections before the upgrade").await;

    let mut new = Successor::start(&old.config_path);
    new.taken_over().await;
    let new_pid = new.child.id();
    // The old process hands over and stops accepting.
    old.stderr
        .expect("the old ferry did not start draining", |l| {
            l.contains("stopped accepting; waiting up to")
        })
        .await;
    load.more(500, "connections after the upgrade").await;
    // New UDP clients are served (by the new process: the old one reads no more).
    udp_round_trips(udp, 20, "after").await;
    // The admin socket went over too.
    wait_pid(admin, new_pid).await;
    let served = status(admin).await["listeners"][0]["connections_total"]
        .as_u64()
        .unwrap();
    assert!(served > 0, "the new process served none of the load");

    // The long-lived connections still work, on the old process, which waits for them.
    for (i, c) in long.iter_mut().enumerate() {
        echo_round_trip(c, format!("long {i} after").as_bytes()).await;
    }
    assert_eq!(
        old.try_exit(),
        None,
        "the old process left before its connections"
    );
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed of {}: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
    drop(long);
    let st = old
        .wait_exit(WAIT)
        .await
        .expect("the old process exits after its last connection");
    assert!(st.success(), "{st:?}\n{}", old.stderr.text());
    // (Its last lines may reach the test's reader just after it exits.)
    old.stderr
        .expect("the old process did not drain", |l| {
            l.contains("drained (Drained)")
        })
        .await;

    // The new process goes on alone, and can itself be upgraded (it listens on the control
    // socket now), to a config with one worker: it gets the two sockets of each address's
    // SO_REUSEPORT group, and must serve both (the kernel gives each its share).
    one(front, b"after").await.unwrap();
    // (And `reuse_port = false`, which a passed socket cannot take on: it keeps its option,
    // with a warning.)
    std::fs::write(
        &old.config_path,
        pinned.replace("workers = 2", "workers = 1").replace(
            "name = \"front\"\n",
            "name = \"front\"\nreuse_port = false\n",
        ),
    )
    .unwrap();
    let load = Load::start(front, 4, 1_000_000);
    load.more(200, "connections before the second upgrade")
        .await;
    let newer = Successor::start(&old.config_path);
    newer.taken_over().await;
    newer
        .stderr
        .expect("no warning of the kept option", |l| {
            l.contains("reuse_port = false takes effect at a restart")
        })
        .await;
    assert_eq!(new.wait_exit().await.code(), Some(0));
    wait_pid(admin, newer.child.id()).await;
    load.more(500, "connections after the second upgrade").await;
    udp_round_trips(udp, 20, "after again").await;
    let (ok, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed of {}: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_binary_again_and_tells_systemd_the_new_main_pid() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let echo = echo_server().await;
    // ferry runs from a copy of its binary, which a new version then replaces (as a package
    // upgrade does: a new file renamed over the old path).
    // Hard links, not copies: a file open for writing cannot be run (and a copy's
    // descriptor may be inherited by another test's child for a moment).
    let bins = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let bin = bins.path().join("ferry");
    std::fs::hard_link(ferry_bin(), &bin).unwrap();
    let script = format!(
        "exec env NOTIFY_SOCKET={} {} \"$@\"",
        notify.display(),
        bin.display()
    );
    let text = config(echo, true);
    let old = Ferry::start_wrapped(&text, 1, &["sh", "-c", &script]).await;
    // The new version: another file (renaming a link of the same file would do nothing).
    // It is run only at the upgrade, long after its writing ended.
    let replacement = bins.path().join("ferry.new");
    std::fs::copy(ferry_bin(), &replacement).unwrap();
    std::fs::rename(&replacement, &bin).unwrap();
    let exe = std::fs::read_link(format!("/proc/{}/exe", old.pid())).unwrap();
    assert!(exe.to_string_lossy().ends_with(" (deleted)"), "{exe:?}");
    let admin = admin_addr(&old).await;
    let notes = |want: &str| -> Vec<String> {
        let mut seen = Vec::new();
        notes_until(&sock, want, &mut seen);
        seen
    };
    tokio::task::block_in_place(|| notes("READY=1"));
    // Port 0 in the file: the new process must bind the same port, so the file says it.
    let front = old.addr("front");
    let pinned =
        pin(&text, front, Some(admin)).replace("@LOG@", &old.log_path.display().to_string());
    std::fs::write(&old.config_path, pinned).unwrap();
    let mut c = connect(front).await;
    echo_round_trip(&mut c, b"before").await;

    old.signal("USR2");
    let seen = tokio::task::block_in_place(|| notes("MAINPID="));
    let main: u32 = seen
        .last()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .unwrap()
        .parse()
        .unwrap();
    let new = Stray(main);
    assert_ne!(main, old.pid());
    // The main process (the old one) announces its successor ready, as main.
    let handover = seen.last().unwrap();
    assert!(
        handover.lines().any(|l| l == "READY=1") && handover.contains("took over from pid"),
        "{handover}"
    );
    wait_pid(admin, main).await;
    // The binary now at the path the old one was started from, with the same arguments.
    assert_eq!(
        std::fs::read_link(format!("/proc/{main}/exe")).unwrap(),
        bin
    );
    let cmdline = std::fs::read(format!("/proc/{main}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("run\0--config\0"),
        "{cmdline:?}"
    );

    // The open connection finishes on the old process, which then exits.
    echo_round_trip(&mut c, b"after").await;
    one(front, b"new").await.unwrap();
    let mut old = old;
    assert_eq!(old.try_exit(), None);
    drop(c);
    let st = old.wait_exit(WAIT).await.expect("the old process exits");
    assert!(st.success(), "{st:?}");
    one(front, b"still").await.unwrap();
    // Nothing said the service was stopping, from the hand-over to the old one's exit.
    sock.set_nonblocking(true).unwrap();
    let mut later = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..1000 {
        match sock.recv(&mut buf) {
            Ok(n) => later.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    assert!(
        !seen.iter().chain(&later).any(|n| n.contains("STOPPING=1")),
        "the service is not stopping: {seen:?} {later:?}"
    );

    new.signal("TERM");
    wait_until(WAIT, "the new process's exit", || !new.alive()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_cannot_start_leaves_the_old_process_serving() {
    // Nothing serves this file: `ferry upgrade` says so.
    let dir = tempfile::tempdir().unwrap();
    let lonely = write_file(
        dir.path(),
        "lonely.toml",
        &config(echo_server().await, false).replace("@LOG@", "off"),
    );
    let out = run_ferry(&["upgrade", "--config", lonely.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no ferry serving"),
        "{out:?}"
    );

    let echo = echo_server().await;
    let (old, front, admin) = start_pinned(echo).await;
    let good = std::fs::read_to_string(&old.config_path).unwrap();

    // A new config that binds an address someone else holds: the new process fails after
    // taking the sockets, and the old one goes on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = format!(
        "{good}\n[[listener]]\nname = \"extra\"\nlisten = [\"{}\"]\nupstream = \"echo\"\n",
        taken.local_addr().unwrap()
    );
    std::fs::write(&old.config_path, &bad).unwrap();
    let mut failed = Successor::start(&old.config_path);
    assert_eq!(
        failed.wait_exit().await.code(),
        Some(2),
        "{}",
        failed.stderr.text()
    );
    old.stderr
        .expect("the old ferry did not report the failure", |l| {
            l.contains("failed") && l.contains("goes on serving")
        })
        .await;
    one(front, b"still the old").await.unwrap();
    assert_eq!(status(admin).await["process"]["pid"], old.pid());

    // SIGUSR2 with a config that does not load: the new process exits 1, the old serves.
    std::fs::write(&old.config_path, "[[listener]\n").unwrap();
    old.signal("USR2");
    old.stderr
        .expect("the failed successor was not reaped", |l| {
            l.contains("exited: exit status: 1")
        })
        .await;
    one(front, b"still the old").await.unwrap();
    assert_eq!(status(admin).await["process"]["pid"], old.pid());

    // Another user may not take the sockets.
    std::fs::write(&old.config_path, &good).unwrap();
    let dirp = old.config_path.parent().unwrap();
    std::fs::set_permissions(dirp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        &old.config_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    // (Switching users takes root, as CI runs; elsewhere this part is skipped.)
    if rustix::process::geteuid().is_root() {
        let mut as_nobody = Successor::start_with(
            "python3",
            &[
                "-c",
                "import os, sys; os.setgroups([]); os.setgid(65534); os.setuid(65534); os.execv(sys.argv[1], sys.argv[1:])",
                ferry_bin(),
                "upgrade",
                "--config",
                old.config_path.to_str().unwrap(),
            ],
        );
        assert_eq!(
            as_nobody.wait_exit().await.code(),
            Some(2),
            "{}",
            as_nobody.stderr.text()
        );
        old.stderr
            .expect("no refusal logged", |l| {
                l.contains("refused an upgrade from pid")
            })
            .await;
    } else {
        eprintln!("not root: the refusal of another user is not tested");
    }

    // With the file good again, the upgrade goes through.
    let new = Successor::start(&old.config_path);
    new.taken_over().await;
    wait_pid(admin, new.child.id()).await;
    one(front, b"the new one").await.unwrap();
}

/// A UDP session the kernel relays in the old process is handed over with its socket: the
/// old process takes its entries out of the kernel at the hand-over, so the client's next
/// datagrams reach the new process (a new session there), and the old session ends at its
/// idle timeout, letting the old process exit while the client is still sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_udp_session_moves_to_the_new_process_at_an_upgrade() {
    let echo = echo_server().await;
    let uecho = udp_echo().await;
    let text =
        with_udp(&config(echo, true), uecho).replace("responses = 1\n", "idle_timeout = \"1s\"\n");
    let mut old = Ferry::start(&text, 2).await;
    let (front, udp) = (old.addr("front"), old.addr("dns"));
    let admin = admin_addr(&old).await;
    let pinned = pin_udp(&pin(&text, front, Some(admin)), udp)
        .replace("@LOG@", &old.log_path.display().to_string());
    std::fs::write(&old.config_path, &pinned).unwrap();
    assert!(
        old.stderr.text().contains("relayed in the kernel"),
        "the kernel's UDP path is not loaded:\n{}",
        old.stderr.text()
    );
    let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.connect(udp).await.unwrap();
    let ask = |i: u32| {
        let c = &c;
        async move {
            let msg = format!("datagram {i}");
            c.send(msg.as_bytes()).await.unwrap();
            let mut buf = [0u8; 256];
            let n = within(WAIT, &format!("the echo of {msg:?}"), c.recv(&mut buf))
                .await
                .unwrap();
            assert_eq!(&buf[..n], msg.as_bytes());
        }
    };
    // In the kernel after the first exchange.
    for i in 0..3 {
        ask(i).await;
    }
    let m = metrics(admin).await;
    assert_eq!(
        metric_must(
            &m,
            "ferry_udp_kernel_datagrams_total",
            &[("listener", "dns")]
        ),
        4.0
    );
    let new = Successor::start(&old.config_path);
    new.taken_over().await;
    // The client goes on, a datagram every 200 ms (never idle for the 1 s timeout); the old
    // process's session must end all the same, and the old process with it.
    let mut every = tokio::time::interval(Duration::from_millis(200));
    let mut exited = None;
    for i in 3..200 {
        every.tick().await;
        ask(i).await;
        exited = old.try_exit();
        if exited.is_some() {
            break;
        }
    }
    let st = exited.expect("the old process kept the client's session while it sent");
    assert!(st.success(), "{st:?}\n{}", old.stderr.text());
    // The new process serves the client now.
    wait_pid(admin, new.child.id()).await;
    let st = status(admin).await;
    let dns = st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "dns")
        .unwrap();
    assert_eq!(dns["udp"]["sessions_active"], 1, "{dns}");
}
