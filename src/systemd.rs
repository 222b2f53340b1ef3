//! Running under systemd: readiness notifications (`Type=notify`, the `sd_notify` protocol)
//! and socket activation (`LISTEN_FDS`).
//!
//! Notifications are datagrams to the socket `$NOTIFY_SOCKET` names: `READY=1` once every
//! listener is bound and accepting, `RELOADING=1` (with `MONOTONIC_USEC`) and `READY=1`
//! around a reload, `STOPPING=1` when the drain starts, and `STATUS=` lines saying what
//! ferry is doing. Without `$NOTIFY_SOCKET` nothing is sent.
//!
//! Socket activation: the sockets systemd passes (descriptors 3 onwards, when `$LISTEN_PID`
//! is this process) are taken once, at the first bind, and the environment variables
//! removed so that no child inherits them. A listener address that matches an inherited
//! socket (same address, TCP listening or UDP) uses it instead of binding, so a unit can
//! give ferry ports below 1024 without root; every worker then serves that one socket.
//! Inherited sockets no listener asked for are reported by [`unused`].
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to systemd, if it asked for
/// notifications. Failures are logged once and otherwise ignored: a service manager that
/// stopped listening must not stop the proxy.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| tracing::warn!("cannot notify systemd ({path:?}): {e}"));
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        // An abstract socket.
        Some(name) => UnixAddr::from_abstract_name(name)?,
        None => UnixAddr::from_pathname(std::path::Path::new(path))?,
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// `RELOADING=1` with the monotonic clock, as `Type=notify-reload` wants it.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec the call writes; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = now.tv_sec as u128 * 1_000_000 + now.tv_nsec as u128 / 1000;
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading the config"
    ));
}

/// A socket systemd passed, not yet taken by a listener.
struct Inherited {
    sock: socket2::Socket,
    addr: SocketAddr,
    udp: bool,
}

/// Takes the sockets systemd passed, if any (and removes its variables from the
/// environment). `main` calls it first, while the process has one thread; otherwise the
/// first bind does.
pub fn take_inherited() {
    let _ = inherited();
}

/// The inherited sockets, read from the environment at the first use.
fn inherited() -> &'static Mutex<(Vec<Inherited>, Vec<Note>)> {
    static SOCKETS: OnceLock<Mutex<(Vec<Inherited>, Vec<Note>)>> = OnceLock::new();
    SOCKETS.get_or_init(|| Mutex::new(take_from_env()))
}

/// What taking the sockets found, logged once logging is set up ([`log_notes`]).
struct Note {
    warning: bool,
    text: String,
}

/// Logs what taking the inherited sockets found (which it could not log itself: it runs
/// before logging is set up).
pub fn log_notes() {
    let notes = std::mem::take(&mut inherited().lock().unwrap_or_else(|e| e.into_inner()).1);
    for n in notes {
        if n.warning {
            tracing::warn!("{}", n.text);
        } else {
            tracing::info!("{}", n.text);
        }
    }
}

/// The sockets `$LISTEN_FDS` announces for this process (`$LISTEN_PID`); the variables are
/// removed. Descriptors that are not TCP listening or UDP sockets with an IP address are
/// closed and logged.
fn take_from_env() -> (Vec<Inherited>, Vec<Note>) {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    // SAFETY (of removing them): ferry changes its environment only here, once, and the
    // binary does it from `main` before it starts any other thread (`take_inherited`), so
    // nothing reads the environment meanwhile.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let mut notes = Vec::new();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return (Vec::new(), notes);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return (Vec::new(), notes);
    }
    let mut note = |warning: bool, text: String| notes.push(Note { warning, text });
    let n: RawFd = match fds.parse() {
        Ok(n) if (0..=1024).contains(&n) => n,
        _ => {
            note(
                true,
                format!("ignoring LISTEN_FDS={fds:?}: not a count of descriptors"),
            );
            return (Vec::new(), notes);
        }
    };
    let mut out = Vec::new();
    for fd in FIRST_FD..FIRST_FD + n {
        // SAFETY: systemd's protocol hands this process descriptors FIRST_FD.. FIRST_FD+n,
        // open and owned by nobody else in it; each is taken exactly once (the variables
        // are gone, and this runs once).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let sock = socket2::Socket::from(owned);
        match crate::net::listening_kind(&sock) {
            Ok(Some((addr, udp))) => {
                if let Err(e) = sock.set_cloexec(true).and(sock.set_nonblocking(true)) {
                    note(
                        true,
                        format!("inherited socket {fd} ({addr}): {e}; not used"),
                    );
                    continue;
                }
                note(
                    false,
                    format!(
                        "inherited {} socket {addr} (descriptor {fd})",
                        if udp { "a UDP" } else { "a listening TCP" }
                    ),
                );
                out.push(Inherited { sock, addr, udp });
            }
            Ok(None) => note(
                true,
                format!(
                    "inherited descriptor {fd} is neither a listening TCP socket nor a UDP socket with an IP address; closed"
                ),
            ),
            Err(e) => note(true, format!("inherited descriptor {fd}: {e}; closed")),
        }
    }
    (out, notes)
}

/// A socket systemd passed for `addr` (TCP listening, or UDP), if there is one: a new
/// descriptor of it, so that every worker may take one and the socket stays inherited.
pub fn take(addr: SocketAddr, udp: bool) -> Option<io::Result<socket2::Socket>> {
    if addr.port() == 0 {
        return None;
    }
    let list = inherited().lock().unwrap_or_else(|e| e.into_inner());
    let s = list.0.iter().find(|s| s.addr == addr && s.udp == udp)?;
    Some(s.sock.try_clone())
}

/// Whether systemd passed a socket for `addr`.
pub fn has(addr: SocketAddr, udp: bool) -> bool {
    let list = inherited().lock().unwrap_or_else(|e| e.into_inner());
    list.0.iter().any(|s| s.addr == addr && s.udp == udp)
}

/// Inherited sockets that no listener's address matches, for a warning at start.
pub fn unused(bound: &[SocketAddr]) -> Vec<SocketAddr> {
    let list = inherited().lock().unwrap_or_else(|e| e.into_inner());
    list.0
        .iter()
        .map(|s| s.addr)
        .filter(|a| !bound.contains(a))
        .collect()
}
