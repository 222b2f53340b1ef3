//! `ferry check`: every error of a broken config as `file:line:col: message` and exit 1;
//! a good config gives a summary and exit 0.

use crate::common::*;

const GOOD: &str = r#"[global]
max_connections = 1000
drain_timeout = "5s"
workers = 2

[log]
access = "access.log"
format = "text"
level = "warn"

[[listener]]
name = "web"
listen = ["127.0.0.1:8080", "[::1]:8080"]
mode = "tcp"
upstream = "pool"
idle_timeout = "15m"
max_connections = 100
reuse_port = true

[[upstream]]
name = "pool"
balance = "round_robin"
servers = ["127.0.0.1:9000", { addr = "127.0.0.1:9001", weight = 3 }]
connect_timeout = "250ms"
tcp = { nodelay = true, keepalive = "60s", send_buffer = "256KiB", recv_buffer = "256KiB" }
"#;

#[test]
fn good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "ferry.toml", GOOD);
    let path = path.display().to_string();
    let out = run_ferry(&["check", "--config", &path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#"listener "web" on 127.0.0.1:8080, [::1]:8080 -> upstream "pool""#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"upstream "pool": 2 server(s), balance round_robin"#),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("{path}: ok")), "{stdout}");
    // `check` validates only: nothing is bound, nothing is written.
    assert!(!dir.path().join("access.log").exists());
}

#[test]
fn unknown_key() {
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"
colour = "blue"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#,
        &[
            "5:1: unknown key `colour` in [[listener]]; expected one of: name, listen, mode, upstream, idle_timeout, max_connections, reuse_port…",
        ],
    );
    assert_check_errors(
        r#"[global]
max_conections = 10

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#,
        &[
            "2:1: unknown key `max_conections` in [global]; expected one of: max_connections, drain_timeout, workers…",
        ],
    );
}

#[test]
fn bad_address() {
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:99999"
upstream = "pool"

[[listener]]
name = "named"
listen = "localhost:8080"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000", "127.0.0.300:9001", "::1:9002", "nohost"]
"#,
        &[
            r#"3:10: `listen`: bad address "127.0.0.1:99999": port "99999" is not a number from 0 to 65535"#,
            r#"8:10: `listen`: bad address "localhost:8080": "localhost" is not an IP address"#,
            r#"13:30: server: bad address "127.0.0.300:9001": "127.0.0.300" is not a valid IPv4 address"#,
            r#"13:50: server: bad address "::1:9002": write IPv6 addresses in brackets, e.g. "[::1]:9002""#,
            r#"13:62: server: bad address "nohost": expected host:port, e.g. "127.0.0.1:7000""#,
        ],
    );
}

#[test]
fn bad_duration() {
    assert_check_errors(
        r#"[global]
drain_timeout = "10"

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"
idle_timeout = "0s"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
connect_timeout = 5
"#,
        &[
            r#"2:17: `drain_timeout`: duration "10" has no unit: write e.g. "10s" or "10ms""#,
            "8:16: `idle_timeout` must be more than 0",
            "13:19: `connect_timeout` must be a string, not an integer",
        ],
    );
}

#[test]
fn listener_names_missing_upstream() {
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pol"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#,
        &[r#"4:12: listener "web" names upstream "pol", which is not defined"#],
    );
}

#[test]
fn duplicate_names() {
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[listener]]
name = "web"
listen = "127.0.0.1:8081"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9001"]
"#,
        &[
            r#"7:8: duplicate listener name "web""#,
            r#"16:8: duplicate upstream name "pool""#,
        ],
    );
}

#[test]
fn empty_server_list() {
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[upstream]]
name = "pool"
servers = []
"#,
        &["8:11: `servers` must list at least one server"],
    );
}

#[test]
fn two_listeners_on_one_address() {
    assert_check_errors(
        r#"[[listener]]
name = "a"
listen = ["127.0.0.1:8080", "127.0.0.1:0"]
upstream = "pool"

[[listener]]
name = "b"
listen = ["127.0.0.1:0", "127.0.0.1:8080"]
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#,
        // Port 0 (an ephemeral port each time) never clashes.
        &[r#"8:26: address 127.0.0.1:8080 is already used by listener "a""#],
    );
}

#[test]
fn toml_syntax_error() {
    assert_check_errors(
        r#"[[listener]]
name = "web
listen = "127.0.0.1:8080"
"#,
        &["2:12: invalid basic string, expected `\"`"],
    );
}

/// `protocol = "udp"`: the keys of TCP listeners are refused with what to use instead,
/// and the keys of UDP listeners on TCP ones; an upstream serves TCP or UDP listeners, not
/// both, and what does not apply to UDP servers is refused where it is written.
#[test]
fn udp_listener_and_upstream_errors() {
    assert_check_errors(
        r#"[[listener]]
name = "dns"
listen = "127.0.0.1:8053"
protocol = "udp"
mode = "tls"
max_connections = 10
upstream = "pool"
per_client = { max_connections = 2 }
tcp = { send_buffer = "1MiB" }

[[listener]]
name = "web"
listen = "127.0.0.1:8053"
responses = 1
upstream = "pool"

[[listener]]
name = "quic"
listen = "127.0.0.1:8443"
protocol = "quic"
upstream = "tcp"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]

[[upstream]]
name = "tcp"
servers = ["127.0.0.1:9000"]
proxy_protocol = { send = "v2", every = true }
health = { send_hex = "abc" }

[[listener]]
name = "dns2"
listen = "127.0.0.1:8054"
protocol = "udp"
upstream = "u2"

[[upstream]]
name = "u2"
servers = ["127.0.0.1:9000"]
tls = {}
retries = 2
proxy_protocol = "v1"
health = { interval = "1s" }
"#,
        &[
            r#"5:8: `mode` does not apply to a UDP listener (protocol = "udp"): a UDP listener relays datagrams to its `upstream`"#,
            r#"6:19: `max_connections` does not apply to a UDP listener (protocol = "udp"): use `max_sessions`"#,
            r#"8:34: a UDP listener limits `max_sessions` per client"#,
            r#"9:7: `tcp` does not apply to a UDP listener (protocol = "udp"): a UDP listener's sockets are not TCP"#,
            r#"14:13: `responses` applies to UDP listeners (protocol = "udp")"#,
            r#"15:12: upstream "pool" is used by UDP listener "dns" and TCP listener "web": an upstream is one or the other; give each its own"#,
            r#"20:12: `protocol` must be "tcp" or "udp", not "quic""#,
            r#"30:41: `every` (a PROXY header on every datagram) applies to upstreams of UDP listeners (upstream "tcp" serves TCP listener "quic")"#,
            r#"31:23: `send_hex`: an odd number of hex digits"#,
            r#"42:7: `tls` does not apply to a UDP upstream: datagrams are relayed as they are (upstream "u2" serves UDP listener "dns2")"#,
            r#"43:11: `retries` does not apply to a UDP upstream: a session's server is not connected to, so there is nothing to retry (upstream "u2" serves UDP listener "dns2")"#,
            r#"44:18: PROXY protocol v1 has no UDP: use "v2" (upstream "u2" serves UDP listener "dns2")"#,
            r#"45:10: a UDP upstream's health check needs `send` (or `send_hex`: a datagram whose reply is awaited) or `port` (a TCP port to connect to); or `active = false` (upstream "u2" serves UDP listener "dns2")"#,
        ],
    );
}

/// A UDP listener and a TCP one may share an address; a UDP config with every key checks.
#[test]
fn udp_config_checks() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "ferry.toml",
        r#"[[listener]]
name = "dns-tcp"
listen = ["127.0.0.1:8053"]
upstream = "dns-tcp"

[[listener]]
name = "dns"
protocol = "udp"
listen = ["127.0.0.1:8053", "[::1]:8053"]
upstream = "dns"
idle_timeout = "10s"
responses = 1
requests = 1
max_sessions = 10000
per_client = { max_sessions = 100, rate = "1000/s", burst = 2000 }
allow = ["127.0.0.0/8", "::1/128"]

[[upstream]]
name = "dns-tcp"
servers = ["127.0.0.1:53"]

[[upstream]]
name = "dns"
balance = "maglev"
servers = ["127.0.0.1:53", { addr = "127.0.0.2:53", backup = true }]
proxy_protocol = { send = "v2", every = true }
max_connections_per_server = 5000
[upstream.health]
interval = "5s"
send_hex = "abcd 0100 0001 0000 0000 0000 00 0002 0001"
expect_hex = "abcd"
passive = { failures = 3, eject = "30s" }
"#,
    );
    let path = path.display().to_string();
    let out = run_ferry(&["check", "--config", &path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#"listener "dns" (udp) on 127.0.0.1:8053, [::1]:8053 -> upstream "dns""#),
        "{stdout}"
    );
}

#[test]
fn error_in_upstream_does_not_cascade() {
    // The upstream "pool" is defined; only its `balance` is wrong. The listener naming it
    // must not also get "which is not defined".
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
balance = "fastest"
"#,
        &[
            r#"9:11: `balance` must be one of round_robin, least_conn, random, p2c, maglev, ring_hash, first; not "fastest""#,
        ],
    );
}

#[test]
fn listener_with_error_still_counts_for_duplicates() {
    // The first listener "web" has an error; the second one with the same name is still a
    // duplicate, and `check` reports every error at once.
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"
mode = "quic"

[[listener]]
name = "web"
listen = "127.0.0.1:8081"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#,
        &[
            r#"5:8: `mode` must be one of "tcp", "tls", "socks5", "http-connect", "transparent"; not "quic""#,
            r#"8:8: duplicate listener name "web""#,
        ],
    );
}

#[test]
fn many_errors_in_one_run() {
    assert_check_errors(
        r#"[global]
workers = -1
drain_timeout = "soon"

[log]
access = "stdout"
format = "xml"

[[listener]]
name = "web"
listen = "127.0.0.1:80800"
upstream = "missing"
idle_timeout = "1h"
frobnicate = true

[[upstream]]
name = "pool"
servers = []
connect_timeout = "3 fortnights"
"#,
        &[
            "2:11: `workers` must be an integer from 0 to 1024",
            r#"3:17: `drain_timeout`: bad duration "soon": expected number at 0"#,
            r#"7:10: `format` must be "json" or "text", not "xml""#,
            r#"11:10: `listen`: bad address "127.0.0.1:80800": port "80800" is not a number from 0 to 65535"#,
            r#"12:12: listener "web" names upstream "missing", which is not defined"#,
            "14:1: unknown key `frobnicate` in [[listener]]; expected one of: name, listen, mode, upstream, idle_timeout, max_connections, reuse_port…",
            "18:11: `servers` must list at least one server",
            r#"19:19: `connect_timeout`: bad duration "3 fortnights": unknown time unit "fortnights", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)"#,
        ],
    );
}

#[test]
fn no_listener() {
    assert_check_errors(
        "[[upstream]]\nname = \"pool\"\nservers = [\"127.0.0.1:9000\"]\n",
        &["1:1: the config has no [[listener]]: there is nothing to serve"],
    );
}

#[test]
fn check_without_config_exits_1() {
    let out = run_ferry(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config FILE is required"));
}

#[test]
fn pipe_size_out_of_range() {
    assert_check_errors(
        r#"[global]
pipe_size = "1KiB"

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#,
        &["2:13: `pipe_size` must be from 4KiB to 64MiB, not 1024 bytes"],
    );
}

#[test]
fn forward_proxy_listeners_are_closed_by_default() {
    assert_check_errors(
        r#"[[listener]]
name = "open"
listen = "127.0.0.1:1080"
mode = "socks5"

[[listener]]
name = "s"
listen = "127.0.0.1:1081"
mode = "socks5"
destinations = ["10.0.0.0/8", "2001:db8::/32:443", "*.ok.example:*", "bad name:80", "10.0.0.0/8:90-80"]
upstream = "pool"
sni_must_match = true
users = [{ name = "a:b", password = "x" }, { name = "bob", password_hash = "nope" }, { name = "carol" }, { name = "dave", password = "p", password_hash = "$2y$05$abcdefghijklmnopqrstuu5Q2Xq4Z5Y5Z5Y5Z5Y5Z5Y5Z5Y5Z5Y5Z" }]

[[listener]]
name = "h"
listen = "127.0.0.1:3128"
mode = "http-connect"
destinations = []
udp = true
transparent = "tproxy"

[[listener]]
name = "t"
listen = "127.0.0.1:15001"
mode = "transparent"
transparent = "nat"
mark = 0

[[listener]]
name = "plain"
listen = "127.0.0.1:7000"
upstream = "pool"
destinations = ["10.0.0.0/8:1"]

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#,
        &[
            r#"4:8: listener "open" would be an open proxy: mode "socks5" needs `destinations` (e.g. destinations = ["10.0.0.0/8:443", "*.example.com:443"]); nothing is reachable otherwise"#,
            r#"10:17: `destinations`: "10.0.0.0/8" has no port: expected CIDR:ports, name:ports or *.domain:ports, e.g. "10.0.0.0/8:443", "db.example.com:5432", "*.internal:*", "[2001:db8::/32]:8000-8100""#,
            r#"10:31: `destinations`: "2001:db8::/32:443": write IPv6 addresses in brackets, e.g. "[2001:db8::/32]:443""#,
            r#"10:70: `destinations`: "bad name" is not a host name or a wildcard such as "*.example.com"; expected CIDR:ports, name:ports or *.domain:ports, e.g. "10.0.0.0/8:443", "db.example.com:5432", "*.internal:*", "[2001:db8::/32]:8000-8100""#,
            r#"10:85: `destinations`: "10.0.0.0/8:90-80": the port range "90-80" is empty"#,
            r#"11:12: `upstream` does not apply to mode "socks5": its clients name their destinations, which `destinations` restricts"#,
            r#"12:18: `sni_must_match` applies to mode "http-connect", not to mode "socks5""#,
            r#"13:19: a user name cannot contain ':' (HTTP Basic authentication splits at it)"#,
            r#"13:76: `password_hash` is not a bcrypt hash ("$2y$10$…", as `htpasswd -nB user` prints it)"#,
            r#"13:86: a user needs `password`, `password_file` or `password_hash` (bcrypt, as `htpasswd -B` writes it)"#,
            r#"13:155: give a user `password` or `password_hash`, not both"#,
            r#"19:16: `destinations` is empty: nothing would be reachable"#,
            r#"20:7: `udp` applies to mode "socks5", not to mode "http-connect""#,
            r#"21:15: `transparent` applies to mode "transparent", not to mode "http-connect""#,
            r#"26:8: listener "t" would be an open proxy: mode "transparent" needs `destinations` (e.g. destinations = ["10.0.0.0/8:443", "*.example.com:443"]); nothing is reachable otherwise"#,
            r#"27:15: `transparent` must be "redirect" or "tproxy", not "nat""#,
            r#"28:8: `mark` must be an integer from 1 to 4294967295"#,
            r#"34:16: `destinations` applies to mode "socks5" or "http-connect" or "transparent", not to mode "tcp""#,
        ],
    );
}

#[test]
fn forward_proxy_listeners_summary() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "ferry.toml",
        r#"[[listener]]
name = "socks"
listen = "127.0.0.1:1080"
mode = "socks5"
udp = true
destinations = ["10.0.0.0/8:443", "*.internal:*", "[2001:db8::/32]:8000-8100"]
users = [{ name = "alice", password = "secret-alice" }, { name = "bob", password_hash = "$2y$05$9gzxxd7/4tWZB3sCbx0zLOvHFkCzqQFzkq0RO6zmz1kJ0W8v2Quz6", destinations = ["10.1.0.0/16:443"] }]
mark = 0x10
connect_timeout = "2s"

[[listener]]
name = "web"
listen = "127.0.0.1:3128"
mode = "http-connect"
destinations = ["db.example.com:5432"]
sni_must_match = true

[[listener]]
name = "tp"
listen = ["0.0.0.0:15001"]
mode = "transparent"
transparent = "tproxy"
destinations = ["192.168.0.0/16:*"]
"#,
    );
    let out = run_ferry(&["check", "--config", &path.display().to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        r#"listener "socks" (socks5) on 127.0.0.1:1080 -> destinations 10.0.0.0/8:443, *.internal:*, [2001:db8::/32]:8000-8100, for 2 user(s)"#,
        r#"listener "web" (http-connect) on 127.0.0.1:3128 -> destinations db.example.com:5432"#,
        r#"listener "tp" (transparent) on 0.0.0.0:15001 -> original destinations allowed by destinations 192.168.0.0/16:*"#,
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
    // Passwords never appear.
    assert!(!stdout.contains("secret-alice"));
}

/// Durations and rates are bounded where they are written: a value `check` accepts can
/// never overflow the arithmetic that uses it at run time.
#[test]
fn values_too_large_to_use() {
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"
idle_timeout = "300000000000y"
handshake_timeout = "3651d"
per_client = { rate = "1/d", ipv6_prefix = 0 }

[[listener]]
name = "slow"
listen = "127.0.0.1:8081"
upstream = "pool"
per_client = { rate = "0.5/h", burst = 10000000 }

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
connect_timeout = "99999999999999999999999s"
health = { interval = "3650d" }
"#,
        &[
            r#"5:16: `idle_timeout`: duration "300000000000y" is longer than the longest allowed, "3650d" (ten years)"#,
            r#"6:21: `handshake_timeout`: duration "3651d" is longer than the longest allowed, "3650d" (ten years)"#,
            r#"7:23: `rate`: bad rate "1/d": unit "d" must be s, m or h"#,
            "7:44: `ipv6_prefix` must be an integer from 1 to 128",
            r#"13:23: `rate`: rate "0.5/h" is out of range: from "1/h" to "1000000000/s""#,
            r#"18:19: `connect_timeout`: bad duration "99999999999999999999999s": number is too large…"#,
        ],
    );
}

/// A size may be written as an integer of bytes, as the docs say, or as a string with a
/// unit; a negative one is an error where it is written.
#[test]
fn sizes_as_integers() {
    let ok = check_config_in(
        None,
        r#"[global]
pipe_size = 65536

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"
tcp = { send_buffer = 65536, recv_buffer = "auto" }

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
tcp = { recv_buffer = 131072, send_buffer = "adaptive" }
"#,
    );
    assert_eq!(ok.code, Some(0), "{}", ok.stderr);
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"
tcp = { send_buffer = -1, recv_buffer = 1024 }

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#,
        &[
            r#"5:23: `send_buffer` must be a number of bytes (0 or more) or a string like "64KiB""#,
            "5:41: `recv_buffer` must be from 4KiB to 64MiB, not 1024 bytes",
        ],
    );
    assert_check_errors(
        r#"[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"
tcp = { send_buffer = "Auto" }

[[upstream]]
name = "pool"
servers = ["127.0.0.1:9000"]
"#,
        &[r#"5:23: `send_buffer` must be "adaptive", "auto" or a size like "256KiB", not "Auto""#],
    );
}

/// Every error is one line, even when it quotes a key with a newline in it.
#[test]
fn errors_are_one_line() {
    assert_check_errors(
        "\"a\\nb\" = 1\n",
        &[
            "1:1: the config has no [[listener]]: there is nothing to serve",
            r#"1:1: unknown key `a\nb` in the config; expected one of: global, admin, log, listener, upstream"#,
        ],
    );
}

#[cfg(feature = "dns")]
#[test]
fn srv_servers_and_resolvers() {
    assert_check_errors(
        r#"[global]
resolvers = ["127.0.0.1:8600", "dns.internal:53", "10.0.0.1:0", "127.0.0.1:8600"]

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["srv:", "srv:_pg._tcp.db.consul:5432", "srv:bad name", "srv:_pg._tcp.db.service.consul"]

[[upstream]]
name = "weighted"
servers = ["127.0.0.1:9000", { addr = "srv:_pg._tcp.db.service.consul", weight = 3 }, { addr = "srv:_x._tcp.example", backup = true }]

[[upstream]]
name = "twice"
servers = ["srv:_pg._tcp.db.service.consul", "SRV:_PG._tcp.db.service.consul"]
"#,
        &[
            r#"2:32: `resolvers`: bad address "dns.internal:53": "dns.internal" is not an IP address; a DNS server is an IP address, with a port if not 53 ("127.0.0.1:8600")"#,
            r#"2:51: `resolvers`: 10.0.0.1:0: port 0 cannot be asked"#,
            r#"2:65: `resolvers`: 127.0.0.1:8600 is listed twice"#,
            r#"11:12: server: "srv:" needs an SRV name, e.g. "srv:_pg._tcp.db.service.consul""#,
            r#"11:20: server: bad SRV name "_pg._tcp.db.consul:5432": the records give the ports; write "srv:_pg._tcp.db.consul""#,
            r#"11:51: server: bad SRV name "bad name": expected a DNS name such as "_pg._tcp.db.service.consul""#,
            r#"15:82: `weight` does not apply to a srv: server: each SRV record's weight is used"#,
            r#"19:46: server srv:_pg._tcp.db.service.consul is listed twice"#,
        ],
    );
    // Resolvers as addresses, with or without a port; a list of none is refused.
    let good = r#"[global]
resolvers = ["127.0.0.1", "[::1]:8600", "10.0.0.2:53"]

[[listener]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "pool"

[[upstream]]
name = "pool"
servers = ["srv:_pg._tcp.db.service.consul.", { addr = "srv:_pg._udp.backup.example", backup = true }]
"#;
    let c = check_config_in(None, good);
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    assert_check_errors(
        &good.replace(r#"["127.0.0.1", "[::1]:8600", "10.0.0.2:53"]"#, "[]"),
        &["2:13: `resolvers` must list at least one DNS server (leave it out to use the system's)"],
    );
}
