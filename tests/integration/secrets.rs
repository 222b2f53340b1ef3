//! Secrets outside the config: the admin token and users' passwords read from files
//! (`token_file`, `password_file`), never printed; and a private key or secret file that
//! every user can read is a warning (`ferry check` prints it, ferry logs it).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::*;
use crate::ops_support::{admin_addr, get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn secret(dir: &Path, name: &str, text: &str, mode: u32) -> String {
    let p = write_file(dir, name, text);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn the_admin_token_comes_from_its_file_and_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let token = "tok-3f9a1c";
    let file = secret(dir.path(), "admin.token", &format!("{token}\n"), 0o600);
    let echo = echo_server().await;
    let cfg = format!(
        "{}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{file}\"\n",
        echo_config("", echo)
    );
    let ferry = Ferry::start(&cfg, 1).await;
    let admin = admin_addr(&ferry).await;
    assert_eq!(post(admin, "/api/reload", None).await.status, 401);
    assert_eq!(post(admin, "/api/reload", Some("wrong")).await.status, 401);
    let r = post(admin, "/api/reload", Some(token)).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!ferry.stderr.text().contains(token), "the token was logged");
    let status = get(admin, "/api/status").await;
    assert!(!status.body.contains(token));
}

#[test]
fn secret_files_that_are_missing_empty_or_doubled_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = secret(dir.path(), "empty", "", 0o600);
    let base = "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\nupstream = \"u\"\n\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n";
    let c = check_config_in(
        Some(dir.path()),
        &format!("{base}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{empty}\"\n"),
    );
    assert_eq!(c.code, Some(1));
    assert!(
        c.errors
            .iter()
            .any(|e| e.ends_with(&format!("the token file {empty} is empty"))),
        "{:?}",
        c.errors
    );
    let c = check_config_in(
        Some(dir.path()),
        &format!(
            "{base}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"x\"\ntoken_file = \"missing\"\n"
        ),
    );
    assert_eq!(c.code, Some(1));
    assert!(
        c.errors
            .iter()
            .any(|e| e.contains("give `token` or `token_file`, not both")),
        "{:?}",
        c.errors
    );
    assert!(
        c.errors
            .iter()
            .any(|e| e.contains("cannot read the token file")),
        "{:?}",
        c.errors
    );
}

/// A SOCKS5 user whose password is in a file: the right one authenticates (RFC 1929), a
/// wrong one does not.
#[tokio::test]
async fn a_users_password_comes_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let pass = secret(dir.path(), "alice.pass", "wonderland\n", 0o600);
    let cfg = format!(
        r#"
[log]
access = "@LOG@"
[[listener]]
name = "socks"
listen = "127.0.0.1:0"
mode = "socks5"
destinations = ["127.0.0.0/8:*"]
users = [{{ name = "alice", password_file = "{pass}" }}]
"#
    );
    let ferry = Ferry::start(&cfg, 1).await;
    let addr = ferry.addr("socks");
    for (pw, ok) in [("wonderland", true), ("looking-glass", false)] {
        let mut s = connect(addr).await;
        s.write_all(&[5, 1, 2]).await.unwrap();
        let mut m = [0u8; 2];
        within(WAIT, "the method", s.read_exact(&mut m))
            .await
            .unwrap();
        assert_eq!(m, [5, 2], "user/password asked for");
        let mut auth = vec![1, 5];
        auth.extend_from_slice(b"alice");
        auth.push(pw.len() as u8);
        auth.extend_from_slice(pw.as_bytes());
        s.write_all(&auth).await.unwrap();
        let mut r = [0u8; 2];
        within(WAIT, "the answer", s.read_exact(&mut r))
            .await
            .unwrap();
        assert_eq!(r[1] == 0, ok, "password {pw:?}: {r:?}");
    }
    assert!(!ferry.stderr.text().contains("wonderland"));
}

/// A private key every user can read is a warning with its position, and still works;
/// once only its owner can read it, no warning.
#[test]
fn a_world_readable_private_key_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new("test ca");
    let (cert, key) = ca.server(&["a.test"]).write(dir.path(), "a");
    let cfg = format!(
        "[[listener]]\nname = \"tls\"\nlisten = \"127.0.0.1:1\"\nmode = \"tls\"\nupstream = \"u\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[[upstream]]\nname = \"u\"\nservers = [\"127.0.0.1:2\"]\n",
        cert.display(),
        key.display()
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let c = check_config_in(Some(dir.path()), &cfg);
    assert_eq!(c.code, Some(0), "{}", c.stderr);
    let want = format!("warning: {}:6:", c.path);
    let line = c
        .stderr
        .lines()
        .find(|l| l.starts_with(&want))
        .unwrap_or_else(|| panic!("no warning at line 6: {}", c.stderr));
    assert!(
        line.ends_with(&format!(
            "the private key {} can be read by every user: make it readable by ferry only (chmod 600, or 640 with ferry's group)",
            key.display()
        )),
        "{line}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let c = check_config_in(Some(dir.path()), &cfg);
    assert_eq!(c.code, Some(0));
    assert!(!c.stderr.contains("warning"), "{}", c.stderr);
}
