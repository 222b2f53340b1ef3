//! The command line: quick mode, `--version`, bad arguments and exit codes.

use crate::common::*;
use crate::ops_support::{get, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_round_robin() {
    let one = banner_server("server-one\n").await;
    let two = banner_server("server-two\n").await;
    let (one_s, two_s) = (one.to_string(), two.to_string());
    let ferry = Ferry::start_args(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &one_s,
            "--upstream",
            &two_s,
        ],
        1,
    )
    .await;
    let addr = ferry.addr("quick");

    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut c = connect(addr).await;
        let client = c.local_addr().unwrap();
        let mut name = vec![0u8; 11];
        within(WAIT, "the server's name", c.read_exact(&mut name))
            .await
            .unwrap();
        echo_round_trip(&mut c, b"ping").await;
        c.shutdown().await.unwrap();
        read_until_closed(&mut c, WAIT).await;
        seen.push((client, String::from_utf8(name).unwrap()));
    }
    let names: Vec<&str> = seen.iter().map(|(_, n)| n.as_str()).collect();
    assert!(names.contains(&"server-one\n"), "{names:?}");
    for w in names.windows(2) {
        assert_ne!(w[0], w[1], "round robin must alternate: {names:?}");
    }

    // The access log goes to stdout, as JSON, by default.
    let lines = ferry
        .stdout
        .wait_count(4, WAIT, |l| l.starts_with('{'))
        .await
        .unwrap_or_else(|| panic!("stdout: {}", ferry.stdout.text()));
    let recs = parse_records(&lines);
    assert_eq!(recs.len(), 4);
    for (client, name) in &seen {
        let r = record_for(&recs, *client);
        assert_eq!(r["listener"], "quick");
        assert_eq!(r["result"], "ok", "{r}");
        let server = if name == "server-one\n" {
            &one_s
        } else {
            &two_s
        };
        assert_eq!(r["server"], server.as_str(), "{r}");
        assert_eq!(r["bytes_up"], 4);
        assert_eq!(r["bytes_down"], 11 + 4);
    }
}

#[test]
fn version() {
    let out = run_ferry(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        format!("ferry {}", env!("CARGO_PKG_VERSION")),
        "stdout: {stdout}"
    );
}

#[test]
fn unknown_flag_exits_1() {
    let out = run_ferry(&["run", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--no-such-flag"), "stderr: {stderr}");
    let out = run_ferry(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn missing_config_file_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let missing_s = missing.display().to_string();
    let out = run_ferry(&["run", "--config", &missing_s]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&missing_s) && stderr.contains("cannot read config"),
        "stderr: {stderr}"
    );
    // `-c FILE` is the same.
    let out = run_ferry(&["-c", &missing_s]);
    assert_eq!(out.status.code(), Some(1));
}

/// Listeners use SO_REUSEPORT by default (a socket per worker); an address that another
/// socket with SO_REUSEPORT already listens on (a second ferry started by mistake) is still
/// refused, not shared.
#[test]
fn port_taken_by_a_reuse_port_socket_exits_2() {
    let taken = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    taken.set_reuse_address(true).unwrap();
    taken.set_reuse_port(true).unwrap();
    taken
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    taken.listen(16).unwrap();
    let addr = taken.local_addr().unwrap().as_socket().unwrap();
    let addr_s = addr.to_string();
    let out = run_ferry(&["run", "--listen", &addr_s, "--upstream", "127.0.0.1:9"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "stderr: {stderr}"
    );
    drop(taken);
}

#[test]
fn occupied_port_exits_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "ferry.toml",
        &format!(
            r#"
[log]
access = "off"

[[listener]]
name = "clash"
listen = "{addr}"
upstream = "u"

[[upstream]]
name = "u"
servers = ["127.0.0.1:9"]
"#
        ),
    );
    let out = run_ferry(&["run", "--config", &config.display().to_string()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "stderr: {stderr}"
    );
    // Quick mode too.
    let addr_s = addr.to_string();
    let out = run_ferry(&["run", "--listen", &addr_s, "--upstream", "127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(2));
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_balance_option() {
    // The SPEC's quick-mode example: `--balance p2c`.
    let one = banner_server("server-one\n").await;
    let two = banner_server("server-two\n").await;
    let (one_s, two_s) = (one.to_string(), two.to_string());
    let ferry = Ferry::start_args(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &one_s,
            "--upstream",
            &two_s,
            "--balance",
            "p2c",
        ],
        1,
    )
    .await;
    let mut c = connect(ferry.addr("quick")).await;
    let mut name = vec![0u8; 11];
    within(WAIT, "the server's name", c.read_exact(&mut name))
        .await
        .unwrap();
    assert!(name == b"server-one\n" || name == b"server-two\n");
}

#[test]
fn quick_mode_argument_errors_exit_1() {
    let out = run_ferry(&["run", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--upstream"),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_ferry(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:9",
        "--balance",
        "nonsense",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let out = run_ferry(&[
        "run",
        "--listen",
        "not-an-address",
        "--upstream",
        "127.0.0.1:9",
    ]);
    assert_eq!(out.status.code(), Some(1));
}

/// Servers by name, as people type them: `--upstream localhost:PORT` is passed to the config
/// parser as a name (resolved and re-resolved as in a config file) and relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_upstream_by_name() {
    let echo = echo_server().await;
    let by_name = format!("localhost:{}", echo.port());
    let ferry = Ferry::start_args(
        &["run", "--listen", "127.0.0.1:0", "--upstream", &by_name],
        1,
    )
    .await;
    for _ in 0..3 {
        let mut c = connect(ferry.addr("quick")).await;
        echo_round_trip(&mut c, b"hello by name").await;
    }
    let lines = ferry
        .stdout
        .wait_count(3, WAIT, |l| l.starts_with('{'))
        .await
        .unwrap_or_else(|| panic!("stdout: {}", ferry.stdout.text()));
    for r in &parse_records(&lines) {
        assert_eq!(r["result"], "ok", "{r}");
        assert_eq!(r["listener"], "quick", "{r}");
    }
}

/// A free TCP port on every IPv4 address (bound and let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `--listen :PORT` listens on every IPv4 address (`0.0.0.0:PORT`), loopback included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_listen_on_bare_port() {
    let echo = echo_server().await;
    let echo_s = echo.to_string();
    let port = free_port();
    let listen = format!(":{port}");
    let ferry = Ferry::start_args(&["run", "--listen", &listen, "--upstream", &echo_s], 1).await;
    assert_eq!(
        ferry.addr("quick"),
        format!("0.0.0.0:{port}")
            .parse::<std::net::SocketAddr>()
            .unwrap()
    );
    let mut c = connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    echo_round_trip(&mut c, b"on loopback").await;
}

/// `--admin ADDR` adds an `[admin]` section: /metrics and /api/status for a one-liner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_admin() {
    let echo = echo_server().await;
    let echo_s = echo.to_string();
    let ferry = Ferry::start_args(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &echo_s,
            "--admin",
            "127.0.0.1:0",
        ],
        1,
    )
    .await;
    let line = ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("admin listening on http://"))
        .await
        .unwrap_or_else(|| panic!("stderr: {}", ferry.stderr.text()))
        .remove(0);
    let admin = line
        .split("admin listening on http://")
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches('/')
        .to_string();
    let quick = ferry.addr("quick");
    let mut c = connect(quick).await;
    echo_round_trip(&mut c, b"counted").await;

    let admin: std::net::SocketAddr = admin.parse().unwrap();
    let m = get(admin, "/metrics").await;
    assert_eq!(m.status, 200, "{m:?}");
    let ct = m.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "{m:?}");
    assert!(m.body.contains("listener=\"quick\""), "{}", m.body);

    let st = status(admin).await;
    let l = &st["listeners"][0];
    assert_eq!(l["name"], "quick", "{st}");
    assert_eq!(l["addrs"][0], quick.to_string(), "{st}");
    assert_eq!(l["upstream"], "quick", "{st}");
}

/// A malformed quick-mode value: exit 1 and one line on stderr naming the option and the
/// value, before anything is bound.
#[test]
fn quick_mode_malformed_values_exit_1() {
    let cases: &[(&[&str], &str)] = &[
        (&["--listen", ":x", "--upstream", "127.0.0.1:9"], "--listen"),
        (
            &["--listen", ":70000", "--upstream", "127.0.0.1:9"],
            "--listen",
        ),
        (
            &["--listen", "bad host:1", "--upstream", "127.0.0.1:9"],
            "--listen",
        ),
        (
            &["--listen", "::1:7000", "--upstream", "127.0.0.1:9"],
            "--listen",
        ),
        (
            &["--listen", ":0", "--upstream", "db.internal"],
            "--upstream",
        ),
        (
            &["--listen", ":0", "--upstream", "db.internal:0"],
            "--upstream",
        ),
        (
            &[
                "--listen",
                ":0",
                "--upstream",
                "x\"]\n[admin]\nlisten = \"0.0.0.0:1:5",
            ],
            "--upstream",
        ),
        (&["--listen", ":0", "--upstream", "a\nb:1"], "--upstream"),
        (
            &[
                "--listen",
                ":0",
                "--upstream",
                "127.0.0.1:9",
                "--admin",
                ":9900",
            ],
            "--admin",
        ),
        (
            &[
                "--listen",
                ":0",
                "--upstream",
                "127.0.0.1:9",
                "--admin",
                "nope",
            ],
            "--admin",
        ),
    ];
    for (args, flag) in cases {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        let out = run_ferry(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{all:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{all:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("ferry: {flag}: ")),
            "{all:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{all:?}");
    }
}

#[test]
fn no_arguments_exits_1() {
    let out = run_ferry(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.is_empty());
}

#[test]
fn unwritable_access_log_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_file(
        dir.path(),
        "ferry.toml",
        r#"
[log]
access = "no/such/folder/access.log"

[[listener]]
name = "l"
listen = "127.0.0.1:0"
upstream = "u"

[[upstream]]
name = "u"
servers = ["127.0.0.1:9"]
"#,
    );
    let out = run_ferry(&["run", "--config", &config.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("cannot open access log"),
        "stderr: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_echo() {
    let ferry = Ferry::start_args(&["demo"], 1).await;
    let line = ferry
        .stdout
        .wait_count(1, WAIT, |l| l.starts_with("started ferry listener"))
        .await
        .unwrap_or_else(|| panic!("stdout: {}", ferry.stdout.text()))
        .remove(0);
    let addr = ferry.addr("demo");
    assert!(line.contains(&addr.to_string()), "{line}");
    for _ in 0..2 {
        let mut c = connect(addr).await;
        let mut hello = Vec::new();
        within(WAIT, "the demo banner", async {
            let mut b = [0u8; 1];
            while !hello.ends_with(b"\n") {
                c.read_exact(&mut b).await.unwrap();
                hello.push(b[0]);
            }
        })
        .await;
        let hello = String::from_utf8(hello).unwrap();
        assert!(hello.starts_with("hello from echo-"), "{hello}");
        let n = &hello["hello from ".len()..hello.len() - 1];
        c.write_all(b"hi\n").await.unwrap();
        let want = format!("{n}: hi\n");
        let mut back = vec![0u8; want.len()];
        within(WAIT, "the demo echo", c.read_exact(&mut back))
            .await
            .unwrap();
        assert_eq!(String::from_utf8(back).unwrap(), want);
    }
}

/// Whether `cmd` is on the PATH (`command -v`).
fn have(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs `program args…` with `input` on stdin; the exit status and stderr.
fn run_with_stdin(program: &str, args: &[&str], input: &[u8]) -> (Option<i32>, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every subcommand, as the completions and the man page must name them.
const COMMANDS: [&str; 7] = [
    "run",
    "check",
    "upgrade",
    "demo",
    "nft-rules",
    "completions",
    "man",
];

/// `ferry completions SHELL` prints a script generated from the command-line definitions:
/// every command and `--config` are in it, and the shell accepts its syntax.
#[test]
fn completions() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_ferry(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(!script.trim().is_empty(), "{shell}: empty script");
        // Whole words: "man" is inside other words of every script.
        let words: std::collections::HashSet<&str> = script
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .collect();
        for word in COMMANDS {
            assert!(words.contains(word), "{shell}: no {word:?} in\n{script}");
        }
        // fish spells a long option `-l config`.
        let config = if shell == "fish" {
            "-l config"
        } else {
            "--config"
        };
        assert!(
            script.contains(config),
            "{shell}: no {config:?} in\n{script}"
        );
        for flag in ["listen", "upstream", "admin"] {
            assert!(script.contains(flag), "{shell}: no {flag:?} in\n{script}");
        }
        if have(shell) {
            let (code, stderr) = run_with_stdin(shell, &["-n"], script.as_bytes());
            assert_eq!(code, Some(0), "{shell} -n: {stderr}");
            assert!(stderr.is_empty(), "{shell} -n: {stderr}");
        } else {
            println!("note: {shell} is not installed; its script's syntax is not checked");
        }
    }
    let out = run_ferry(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(1));
    let out = run_ferry(&["completions"]);
    assert_eq!(out.status.code(), Some(1));
}

/// `ferry man` prints ferry(1), generated from the same definitions: NAME, SYNOPSIS, every
/// command with its options; man (or groff) renders it without a warning.
#[test]
fn man_page() {
    let out = run_ferry(&["man"]);
    assert_eq!(out.status.code(), Some(0));
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.contains(".TH ferry 1"), "{page}");
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH OPTIONS", ".SH COMMANDS"] {
        assert!(page.contains(section), "no {section:?} in\n{page}");
    }
    for cmd in COMMANDS {
        assert!(
            page.contains(&format!(".SS \"ferry {cmd}\"")),
            "no command {cmd:?} in\n{page}"
        );
    }
    for flag in ["config", "listen", "upstream", "balance", "admin"] {
        assert!(
            page.contains(&format!("\\-\\-{flag}")),
            "no --{flag} in\n{page}"
        );
    }
    // The roff preamble once, at the top.
    assert_eq!(page.matches(".ds Aq").count(), 2, "{page}");

    let checkers: [(&str, &[&str]); 2] = [
        ("man", &["--warnings", "-l", "-"]),
        ("groff", &["-man", "-Tutf8", "-ww", "-z"]),
    ];
    let mut checked = false;
    for (program, args) in checkers {
        if !have(program) {
            println!("note: {program} is not installed");
            continue;
        }
        let (code, stderr) = run_with_stdin(program, args, page.as_bytes());
        assert_eq!(code, Some(0), "{program} {args:?}: {stderr}");
        assert!(
            stderr.trim().is_empty(),
            "{program} {args:?} warns:\n{stderr}"
        );
        checked = true;
    }
    if !checked {
        println!("note: neither man nor groff is installed; the page is not rendered");
    }
}
