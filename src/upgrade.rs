//! Upgrading ferry (its binary, its config, or both) without refusing a connection.
//!
//! The running ferry (the *old* process) hands its listening sockets, the listeners' and
//! the admin server's, to a new process over a Unix `SOCK_SEQPACKET` socket, as
//! `SCM_RIGHTS` messages. The new process starts on them (a listener whose address
//! matches a passed socket uses it instead of binding) while the old one goes on
//! accepting on the very same sockets; once every listener of the new process accepts,
//! it says `ready`. The old process then stops accepting and drains its open
//! connections. The sockets stay open in the new process throughout, so no connection
//! attempt meets a closed port. If the new process fails before `ready`, it exits and
//! the old one keeps serving as before.
//!
//! Two ways in:
//! - `ferry upgrade --config FILE` connects to the *control socket* of the ferry serving
//!   FILE: an abstract Unix socket named after the file's canonical path ([`control_name`]),
//!   which any ferry started with a config file listens on. Only a process of the same
//!   user (or root) is served.
//! - SIGUSR2 makes the running ferry start its own binary again (the file at the path it
//!   was started from: a new version installed there is what starts), with the same
//!   arguments, and hand over through a socket pair whose descriptor the new process
//!   finds in `$FERRY_UPGRADE_FD`. The new process is then the old one's child, in the
//!   same service cgroup, and under systemd the old process announces it as the new main
//!   process (`MAINPID=`).
//!
//! The exchange, one message each way at a time:
//!
//! | from | message |
//! |---|---|
//! | old | `ferry-upgrade 1 pid=P sockets=N` (or `busy`: an upgrade is already under way) |
//! | old | `sockets K` carrying K descriptors (K ≤ 64), until N have been sent |
//! | new | `ready` |
//! | old | `ok`: it has stopped listening on its control socket and now drains |
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

/// The variable naming the descriptor of the socket pair a SIGUSR2 upgrade hands over on.
pub const ENV_FD: &str = "FERRY_UPGRADE_FD";

/// Descriptors per message.
const CHUNK: usize = 64;
/// The most descriptors an upgrade passes (far more than any config binds).
const MAX_SOCKETS: usize = 65_536;
/// The longest message of the exchange.
const MAX_MESSAGE: usize = 128;

/// How long either side waits for the other's next message, except for `ready`.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the old process waits for the new one to be ready (it loads its config,
/// resolves its servers' names and starts every listener meanwhile).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A socket the old process passed, until a listener takes it.
struct Passed {
    sock: socket2::Socket,
    addr: SocketAddr,
    udp: bool,
    /// Whether it has `SO_REUSEPORT`: whether other sockets may join it on its address.
    reuse_port: bool,
    taken: bool,
}

/// The new process's side of an upgrade in progress.
struct Incoming {
    /// The channel to the old process, until the upgrade completes or fails.
    channel: Option<OwnedFd>,
    /// Started by the old process on SIGUSR2 (which then tells systemd about it).
    by_signal: bool,
    /// The old process's pid as the kernel says (`ferry upgrade`: the control socket's
    /// owner), checked against the one it sends.
    peer_pid: Option<u32>,
    passed: Vec<Passed>,
    old_pid: u32,
    /// What taking `$FERRY_UPGRADE_FD` found before logging was set up.
    note: Option<String>,
}

static INCOMING: Mutex<Incoming> = Mutex::new(Incoming {
    channel: None,
    by_signal: false,
    peer_pid: None,
    passed: Vec::new(),
    old_pid: 0,
    note: None,
});

fn incoming() -> std::sync::MutexGuard<'static, Incoming> {
    INCOMING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Set in the old process once the new one has confirmed: its listening sockets are the
/// new process's now, so nothing more is taken from them (no accept queue is emptied, no
/// datagram read) while it drains what it has.
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Whether this process has handed its listening sockets over to a new one.
pub fn handed_over() -> bool {
    HANDED_OVER.load(Relaxed)
}

/// Marks the hand-over done (the old process, on the new one's confirmation).
pub(crate) fn set_handed_over() {
    HANDED_OVER.store(true, Relaxed);
}

// ---------------------------------------------------------------------------------------
// The new process.

/// Takes the channel a SIGUSR2 upgrade passes in `$FERRY_UPGRADE_FD`, if any, and removes
/// the variable. `main` calls it first, while the process has one thread.
pub fn take_env() {
    let Some(value) = std::env::var_os(ENV_FD) else {
        return;
    };
    // SAFETY: called from `main` before any other thread starts, so nothing reads the
    // environment meanwhile.
    unsafe { std::env::remove_var(ENV_FD) };
    let fd = value
        .to_str()
        .and_then(|s| s.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2);
    let mut inc = incoming();
    let Some(fd) = fd else {
        inc.note = Some(format!("ignoring {ENV_FD}={value:?}: not a descriptor"));
        return;
    };
    // SAFETY: F_GETFD only reads the descriptor's flags; it fails if `fd` is not open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        inc.note = Some(format!("ignoring {ENV_FD}={fd}: not an open descriptor"));
        return;
    }
    // SAFETY: the old ferry left this descriptor open for this process, and names it only
    // here; the variable is gone, so it is taken once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match rustix::net::sockopt::socket_type(&owned) {
        Ok(SocketType::SEQPACKET) => {
            if let Err(e) = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC) {
                inc.note = Some(format!("{ENV_FD}={fd}: {e}"));
                return;
            }
            inc.channel = Some(owned);
            inc.by_signal = true;
        }
        _ => inc.note = Some(format!("ignoring {ENV_FD}={fd}: not an upgrade channel")),
    }
}

/// `ferry upgrade`: connects to the control socket of the ferry serving `config`, which
/// must belong to this user or root (an abstract socket name can be taken by anyone).
pub fn connect(config: &Path) -> io::Result<()> {
    let name = control_name(config)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    // A connect to a Unix socket whose queue is full waits, up to the send timeout.
    timeouts(fd.as_fd(), EXCHANGE_TIMEOUT)?;
    rustix::net::connect(&fd, &SocketAddrUnix::new_abstract_name(&name)?).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "no ferry serving {} answers on its control socket {}: {e}",
                config.display(),
                show_name(&name)
            ),
        )
    })?;
    let cred = rustix::net::sockopt::socket_peercred(&fd)?;
    if cred.uid != rustix::process::geteuid() && !cred.uid.is_root() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the control socket {} belongs to uid {}, not to this user or root; not taking sockets from it",
                show_name(&name),
                cred.uid.as_raw()
            ),
        ));
    }
    let mut inc = incoming();
    inc.channel = Some(fd);
    inc.peer_pid = Some(cred.pid.as_raw_nonzero().get() as u32);
    Ok(())
}

/// Whether this process was started by the old one on SIGUSR2.
pub fn by_signal() -> bool {
    incoming().by_signal
}

/// Whether this process is taking over from another (until [`finish`]).
pub fn pending() -> bool {
    incoming().channel.is_some()
}

/// Receives the old process's sockets, if this process is taking over; `Ok(None)` if it
/// is not. Fails if the old process refuses or the exchange breaks off; nothing has been
/// bound then.
pub fn receive() -> io::Result<Option<u32>> {
    let mut inc = incoming();
    if let Some(note) = inc.note.take() {
        tracing::warn!("{note}");
    }
    let Some(ch) = inc.channel.as_ref() else {
        return Ok(None);
    };
    timeouts(ch.as_fd(), EXCHANGE_TIMEOUT)?;
    let mut buf = [0u8; MAX_MESSAGE];
    let mut fds = Vec::new();
    let n = recv(ch.as_fd(), &mut buf, &mut fds)?;
    let (pid, count) = parse_header(&buf[..n])?;
    if inc.peer_pid.is_some_and(|p| p != pid) {
        return Err(bad(
            "the control socket's owner is not the process that answers",
        ));
    }
    let mut passed = Vec::new();
    while fds.len() < count {
        let before = fds.len();
        let n = recv(ch.as_fd(), &mut buf, &mut fds)?;
        let k = parse_chunk(&buf[..n])?;
        if fds.len() - before != k || fds.len() > count {
            return Err(bad("the descriptors do not match the messages"));
        }
    }
    for fd in fds {
        let sock = socket2::Socket::from(fd);
        let (addr, udp) = crate::net::listening_kind(&sock)?.ok_or_else(|| {
            bad("a passed socket is neither a listening TCP socket nor a UDP socket with an IP address")
        })?;
        sock.set_nonblocking(true)?;
        let reuse_port = sock.reuse_port()?;
        passed.push(Passed {
            sock,
            addr,
            udp,
            reuse_port,
            taken: false,
        });
    }
    let mut seen: Vec<(SocketAddr, bool, usize)> = Vec::new();
    for p in &passed {
        match seen.iter_mut().find(|s| s.0 == p.addr && s.1 == p.udp) {
            Some(s) => s.2 += 1,
            None => seen.push((p.addr, p.udp, 1)),
        }
    }
    let list: Vec<String> = seen
        .iter()
        .map(|(a, udp, n)| format!("{} {a} ×{n}", if *udp { "udp" } else { "tcp" }))
        .collect();
    tracing::info!(
        "took {} socket(s) from pid {pid}: {}",
        passed.len(),
        list.join(", ")
    );
    inc.passed = passed;
    inc.old_pid = pid;
    Ok(Some(pid))
}

/// A passed socket for `addr` that no listener has taken yet (a new descriptor of it, the
/// passed one kept until [`release_unused`]); once every one has been taken, another
/// descriptor of one that other sockets may not join (it has no `SO_REUSEPORT`), which the
/// workers then share.
pub fn take(addr: SocketAddr, udp: bool) -> Option<io::Result<socket2::Socket>> {
    if addr.port() == 0 {
        return None;
    }
    let mut inc = incoming();
    if let Some(p) = inc
        .passed
        .iter_mut()
        .find(|p| p.addr == addr && p.udp == udp && !p.taken)
    {
        p.taken = true;
        return Some(p.sock.try_clone());
    }
    inc.passed
        .iter()
        .find(|p| p.addr == addr && p.udp == udp && !p.reuse_port)
        .map(|p| p.sock.try_clone())
}

/// Whether the passed sockets for `addr` are one socket no other may join (no
/// `SO_REUSEPORT`): the workers share its descriptors, and a UDP one is served by one.
pub fn shared(addr: SocketAddr, udp: bool) -> bool {
    let inc = incoming();
    let mut matching = inc.passed.iter().filter(|p| p.addr == addr && p.udp == udp);
    matching.next().is_some_and(|p| !p.reuse_port) && matching.next().is_none()
}

/// The passed sockets for `addr` no listener has taken yet, taken now: the old process
/// had more sockets in the address's `SO_REUSEPORT` group than this one has workers, and
/// each must still be served (the kernel keeps sending it connections).
pub fn leftover(addr: SocketAddr, udp: bool) -> Vec<io::Result<socket2::Socket>> {
    if addr.port() == 0 {
        return Vec::new();
    }
    let mut inc = incoming();
    inc.passed
        .iter_mut()
        .filter(|p| p.addr == addr && p.udp == udp && !p.taken && p.reuse_port)
        .map(|p| {
            p.taken = true;
            p.sock.try_clone()
        })
        .collect()
}

/// Closes the passed sockets: the listeners hold their own descriptors of those they took.
/// Returns the addresses of those no listener took (the new config does not listen there).
pub fn release_unused() -> Vec<SocketAddr> {
    let passed = std::mem::take(&mut incoming().passed);
    let mut unused: Vec<SocketAddr> = passed.iter().filter(|p| !p.taken).map(|p| p.addr).collect();
    unused.dedup();
    unused
}

/// Tells the old process this one is ready and waits for it to confirm that it stops
/// accepting. Returns the old process's pid. Blocking.
pub fn finish() -> io::Result<u32> {
    let (ch, pid) = {
        let mut inc = incoming();
        (inc.channel.take(), inc.old_pid)
    };
    let Some(ch) = ch else {
        return Err(bad("no upgrade in progress"));
    };
    send(ch.as_fd(), b"ready", &[])?;
    let mut buf = [0u8; MAX_MESSAGE];
    let n = recv(ch.as_fd(), &mut buf, &mut Vec::new())?;
    if &buf[..n] != b"ok" {
        return Err(bad("the old process did not confirm"));
    }
    Ok(pid)
}

// ---------------------------------------------------------------------------------------
// The old process.

/// The abstract socket name of the control socket of the ferry serving `config`: the
/// file's absolute path (symbolic links not followed: the path names the service, whatever
/// file it points to today), or a hash of it when the path is too long for a socket name.
pub fn control_name(config: &Path) -> io::Result<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::path::absolute(config)?;
    let mut name = b"ferry-control:".to_vec();
    let bytes = path.as_os_str().as_bytes();
    // sun_path holds 108 bytes, the first of which is the NUL of an abstract name.
    if name.len() + bytes.len() <= 107 {
        name.extend_from_slice(bytes);
    } else {
        let hash = twox_hash::XxHash3_64::oneshot(bytes);
        name.extend_from_slice(format!("xxh3:{hash:016x}").as_bytes());
    }
    Ok(name)
}

/// How tools show an abstract socket name (`ss -xl` does the same).
pub fn show_name(name: &[u8]) -> String {
    format!("@{}", String::from_utf8_lossy(name))
}

/// The control socket for `config`, listening, non-blocking. Fails with `AddrInUse` if
/// another process serves the same file.
pub fn listen(config: &Path) -> io::Result<(OwnedFd, String)> {
    let name = control_name(config)?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::net::bind(&fd, &SocketAddrUnix::new_abstract_name(&name)?)?;
    rustix::net::listen(&fd, 8)?;
    Ok((fd, show_name(&name)))
}

/// Accepts a connection on the control socket (non-blocking: `WouldBlock` when none
/// waits). Returns it, blocking, with the peer's pid; a peer of another user (other than
/// root) is refused with `PermissionDenied`.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, u32)> {
    let fd = rustix::net::accept_with(listener, SocketFlags::CLOEXEC)?;
    let cred = rustix::net::sockopt::socket_peercred(&fd)?;
    let me = rustix::process::geteuid();
    if cred.uid != me && !cred.uid.is_root() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refused an upgrade from pid {} of uid {}",
                cred.pid.as_raw_nonzero(),
                cred.uid.as_raw()
            ),
        ));
    }
    Ok((fd, cred.pid.as_raw_nonzero().get() as u32))
}

/// A connected pair for a SIGUSR2 upgrade: this process's end, and the new process's,
/// which is not closed on exec (the caller closes its copy once the new process runs).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())?;
    Ok((ours, theirs))
}

/// The binary this process was started from, as a path: the path it was started by when
/// that has a `/` (`/usr/bin/ferry`, or a symbolic link switched to a new version since),
/// else the file it runs; after a package replaced that file, the new version at its path
/// (Linux names the running, deleted one `PATH (deleted)`).
pub fn binary() -> io::Result<PathBuf> {
    if let Some(arg0) = std::env::args_os().next()
        && std::os::unix::ffi::OsStrExt::as_bytes(arg0.as_os_str()).contains(&b'/')
    {
        // Relative to the working folder, which ferry never changes.
        return Ok(PathBuf::from(arg0));
    }
    let exe = std::env::current_exe()?;
    match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
        Some(path) => Ok(PathBuf::from(path)),
        None => Ok(exe),
    }
}

/// Refuses a second upgrade while one is under way.
pub fn refuse_busy(ch: BorrowedFd<'_>) {
    let _ = timeouts(ch, EXCHANGE_TIMEOUT).and_then(|()| send(ch, b"busy", &[]));
}

/// Sends the sockets `fds` (one descriptor per socket) to the new process. Blocking.
pub fn send_sockets(ch: BorrowedFd<'_>, fds: &[OwnedFd]) -> io::Result<()> {
    timeouts(ch, EXCHANGE_TIMEOUT)?;
    let header = format!(
        "ferry-upgrade 1 pid={} sockets={}",
        std::process::id(),
        fds.len()
    );
    send(ch, header.as_bytes(), &[])?;
    for chunk in fds.chunks(CHUNK) {
        let borrowed: Vec<BorrowedFd<'_>> = chunk.iter().map(AsFd::as_fd).collect();
        send(ch, format!("sockets {}", chunk.len()).as_bytes(), &borrowed)?;
    }
    Ok(())
}

/// Waits up to `timeout` for the new process's `ready`. Blocking.
pub fn wait_ready(ch: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    timeouts(ch, timeout)?;
    let mut buf = [0u8; MAX_MESSAGE];
    let n = recv(ch, &mut buf, &mut Vec::new())?;
    if &buf[..n] != b"ready" {
        return Err(bad("the new process sent something other than ready"));
    }
    Ok(())
}

/// Confirms to the new process that this one stops accepting. Blocking.
pub fn send_ok(ch: BorrowedFd<'_>) -> io::Result<()> {
    timeouts(ch, EXCHANGE_TIMEOUT)?;
    send(ch, b"ok", &[])
}

// ---------------------------------------------------------------------------------------
// The messages.

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("upgrade: {what}"))
}

/// `ferry-upgrade 1 pid=P sockets=N` → `(P, N)`.
fn parse_header(msg: &[u8]) -> io::Result<(u32, usize)> {
    if msg == b"busy" {
        return Err(io::Error::other(
            "the running ferry is already handing over to another process",
        ));
    }
    let text = std::str::from_utf8(msg).map_err(|_| bad("not an upgrade header"))?;
    let mut words = text.split(' ');
    if words.next() != Some("ferry-upgrade") || words.next() != Some("1") {
        return Err(bad("not an upgrade header (another version of ferry?)"));
    }
    let pid = words
        .next()
        .and_then(|w| w.strip_prefix("pid="))
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| bad("no pid in the header"))?;
    let count = words
        .next()
        .and_then(|w| w.strip_prefix("sockets="))
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| *n <= MAX_SOCKETS)
        .ok_or_else(|| bad("no socket count in the header"))?;
    if words.next().is_some() {
        return Err(bad("a header with more than it should have"));
    }
    Ok((pid, count))
}

/// `sockets K` → `K` (1..=CHUNK).
fn parse_chunk(msg: &[u8]) -> io::Result<usize> {
    std::str::from_utf8(msg)
        .ok()
        .and_then(|t| t.strip_prefix("sockets "))
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|k| (1..=CHUNK).contains(k))
        .ok_or_else(|| bad("not a message of sockets"))
}

fn timeouts(ch: BorrowedFd<'_>, t: Duration) -> io::Result<()> {
    use rustix::net::sockopt::{Timeout, set_socket_timeout};
    set_socket_timeout(ch, Timeout::Recv, Some(t))?;
    set_socket_timeout(ch, Timeout::Send, Some(t))?;
    Ok(())
}

fn send(ch: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(CHUNK))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(bad("too many descriptors for one message"));
    }
    let n = loop {
        match rustix::net::sendmsg(ch, &[IoSlice::new(data)], &mut control, SendFlags::NOSIGNAL) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r.map_err(io_error)?,
        }
    };
    if n != data.len() {
        return Err(bad("a message was cut short"));
    }
    Ok(())
}

/// Receives one message into `buf`, its descriptors appended to `fds`. A closed channel is
/// `UnexpectedEof`; no message within the timeout, `TimedOut`.
fn recv(ch: BorrowedFd<'_>, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(CHUNK))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match rustix::net::recvmsg(
            ch,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r.map_err(io_error)?,
        }
    };
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    if msg.flags.contains(ReturnFlags::CTRUNC) || msg.flags.contains(ReturnFlags::TRUNC) {
        return Err(bad("a message was cut short"));
    }
    if msg.bytes == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other process closed the upgrade channel",
        ));
    }
    Ok(msg.bytes)
}

fn io_error(e: rustix::io::Errno) -> io::Error {
    if e == rustix::io::Errno::AGAIN {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the other process did not answer in time",
        )
    } else {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_and_refuse() {
        assert_eq!(
            parse_header(b"ferry-upgrade 1 pid=42 sockets=7").unwrap(),
            (42, 7)
        );
        for bad in [
            &b""[..],
            b"ferry-upgrade 2 pid=1 sockets=1",
            b"ferry-upgrade 1 pid=x sockets=1",
            b"ferry-upgrade 1 pid=1 sockets=99999999",
            b"ferry-upgrade 1 pid=1 sockets=1 more",
            b"\xff",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
        assert!(
            parse_header(b"busy")
                .unwrap_err()
                .to_string()
                .contains("already")
        );
        assert_eq!(parse_chunk(b"sockets 64").unwrap(), 64);
        assert!(parse_chunk(b"sockets 0").is_err());
        assert!(parse_chunk(b"sockets 65").is_err());
    }

    #[test]
    fn sockets_cross_a_pair_in_chunks() {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        // 150 descriptors: three messages of 64, 64 and 22.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let fds: Vec<OwnedFd> = (0..150)
            .map(|_| listener.as_fd().try_clone_to_owned().unwrap())
            .collect();
        let sender = std::thread::spawn(move || send_sockets(a.as_fd(), &fds).map(|()| a));
        timeouts(b.as_fd(), EXCHANGE_TIMEOUT).unwrap();
        let mut buf = [0u8; MAX_MESSAGE];
        let mut got = Vec::new();
        let n = recv(b.as_fd(), &mut buf, &mut got).unwrap();
        let (pid, count) = parse_header(&buf[..n]).unwrap();
        assert_eq!((pid, count), (std::process::id(), 150));
        let mut messages = 0;
        while got.len() < count {
            let n = recv(b.as_fd(), &mut buf, &mut got).unwrap();
            parse_chunk(&buf[..n]).unwrap();
            messages += 1;
        }
        assert_eq!((messages, got.len()), (3, 150));
        for fd in got {
            let s = socket2::Socket::from(fd);
            assert_eq!(s.local_addr().unwrap().as_socket(), Some(local));
        }
        let a = sender.join().unwrap().unwrap();
        drop(a);
        // The other end gone: the next read says so.
        let e = recv(b.as_fd(), &mut buf, &mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (_a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let e = wait_ready(b.as_fd(), Duration::from_millis(1)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn control_names_fit_a_socket_address() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("f.toml");
        std::fs::write(&short, "").unwrap();
        let name = control_name(&short).unwrap();
        assert!(name.ends_with(b"/f.toml"), "{}", show_name(&name));
        // A relative path names the file under the working folder; a link is not followed.
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&short, &link).unwrap();
        assert!(control_name(&link).unwrap().ends_with(b"/link.toml"));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            control_name(Path::new("x.toml")).unwrap(),
            control_name(&cwd.join("x.toml")).unwrap()
        );
        let long = dir.path().join("x".repeat(120));
        std::fs::write(&long, "").unwrap();
        let name = control_name(&long).unwrap();
        assert!(name.len() <= 107 && name.starts_with(b"ferry-control:xxh3:"));
        assert!(SocketAddrUnix::new_abstract_name(&name).is_ok());
    }
}
