//! Health checks of servers that require a PROXY header on every connection.

use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server that answers "OK\n" only to connections that start with a PROXY header.
async fn proxy_only_server() -> std::net::SocketAddr {
    serve_on("127.0.0.1", |mut s| async move {
        let mut first = [0u8; 6];
        if s.read_exact(&mut first).await.is_ok()
            && (&first == b"PROXY " || first == *b"\r\n\r\n\0\r")
        {
            let _ = s.write_all(b"OK\n").await;
        }
        // Read the rest until the checker closes, as a real server would.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await
}

/// Starts ferry with one server that requires the PROXY header and returns the first
/// health-check verdict from the status API: (passed, reason).
async fn first_check(send_proxy: bool) -> (bool, String) {
    let server = proxy_only_server().await;
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[log]
access = "@LOG@"
[[listener]]
name = "front"
listen = "127.0.0.1:0"
upstream = "pool"
[[upstream]]
name = "pool"
servers = ["{server}"]
proxy_protocol = "v2"
[upstream.health]
interval = "100ms"
timeout = "500ms"
rise = 1
fall = 1
expect = "OK"
send_proxy = {send_proxy}
"#
    );
    let ferry = Ferry::start(&config, 1).await;
    let line = ferry
        .stderr
        .wait_count(1, WAIT, |l| l.contains("admin listening on http://"))
        .await
        .expect("admin address");
    let url = line[0]
        .split("admin listening on ")
        .nth(1)
        .expect("url")
        .trim()
        .to_string();
    within(WAIT, "a first health check", async {
        loop {
            let out = std::process::Command::new("curl")
                .args(["-s", &format!("{url}api/status")])
                .output()
                .expect("run curl");
            if let Ok(st) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                let check = &st["upstreams"][0]["servers"][0]["last_check"];
                if !check.is_null() {
                    return (
                        check["ok"] == true,
                        check["reason"].as_str().unwrap_or("").to_string(),
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_send_the_proxy_header_only_when_asked() {
    let (ok, reason) = first_check(true).await;
    assert!(ok, "with send_proxy the check should pass: {reason}");
    let (ok, reason) = first_check(false).await;
    assert!(!ok, "without send_proxy the check must fail");
    // The server waits for a header that never comes: the check times out.
    assert!(reason.contains("timeout"), "{reason}");
}
