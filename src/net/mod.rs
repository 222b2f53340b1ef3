//! Sockets of the data path, and their set-up.
//!
//! Client and server connections are [`Sock`]s: a non-blocking `std` socket registered
//! with the runtime through `AsyncFd`. Unlike tokio's `TcpStream`, `AsyncFd` hands out a
//! readiness guard, so the relay can mark a socket as drained after a short read instead
//! of paying one more `recv` that fails with EAGAIN per message. Listening sockets are
//! [`Listener`]s, accepted from with `accept4` (non-blocking and close-on-exec at once).

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::Duration;

use rustix::net::{AddressFamily, SocketFlags, SocketType};
use socket2::{SockRef, TcpKeepalive};
use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};

use crate::config::TcpOptions;

mod buf_lock;
mod register;
mod udp_opts;

pub(crate) use buf_lock::unlock as unlock_buffers;
pub(crate) use register::{register, register_readable};
pub(crate) use udp_opts::{allow_fragments, enable_udp_gro, quiet_listener, receive_pktinfo};

/// A connected TCP socket of the data path.
pub type Sock = AsyncFd<std::net::TcpStream>;
/// A listening TCP socket.
pub type Listener = AsyncFd<std::net::TcpListener>;

/// A readiness guard for reading a [`Sock`].
pub type ReadGuard<'a> = AsyncFdReadyGuard<'a, std::net::TcpStream>;

/// The result of one [`recv`].
pub enum Recv {
    Data(usize),
    Eof,
    /// Nothing to read: readiness is cleared, the next poll waits for new data.
    Again,
    Err(io::Error),
}

/// One `recv` into `buf` from a socket whose read readiness `rg` is held.
///
/// Readiness is edge-triggered, so it is cleared only when the socket is seen empty: on
/// `EAGAIN`, or on a read shorter than `buf`, since TCP copies until the receive queue is
/// empty; that saves the `recv` that would fail with `EAGAIN`. Not when `urgent` (the
/// socket had TCP urgent data: a read stops short at the urgent mark with data queued
/// behind it), and not when the peer's FIN was already signalled (no further wake-up would
/// come for it). The guard clears only readiness seen before the read, so data arriving
/// since wakes the task as usual.
pub fn recv(rg: &mut ReadGuard<'_>, buf: &mut [u8], urgent: bool) -> Recv {
    match rg.try_io(|s| io::Read::read(&mut s.get_ref(), buf)) {
        Err(_would_block) => Recv::Again,
        Ok(Err(e)) => Recv::Err(e),
        Ok(Ok(0)) => Recv::Eof,
        Ok(Ok(n)) => {
            if n < buf.len() && !urgent && !rg.ready().is_read_closed() {
                rg.clear_ready();
            }
            Recv::Data(n)
        }
    }
}

/// The kernel has flagged TCP urgent data on `sock` (`EPOLLPRI`). Once seen, the flag stays
/// for the connection's life (nothing clears it), and so does the caution it calls for.
pub fn has_urgent_data(sock: &Sock) -> bool {
    // No I/O: `try_io` runs the closure only when the readiness is set (an atomic load).
    sock.try_io(Interest::PRIORITY, |_| Ok(())).is_ok()
}

/// Why a connect to a server did not succeed.
#[derive(Debug)]
pub enum ConnectError {
    /// Refused, unreachable, or any other error from the kernel.
    Failed(io::Error),
    /// Not established within the connect timeout.
    Timeout,
}

/// Connects to `addr` within `timeout`, with `opts` applied (buffer sizes before the
/// connect, so that the window scale is negotiated for them).
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    opts: &TcpOptions,
) -> Result<Sock, ConnectError> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| ConnectError::Failed(e.into()))?;
    let sref = SockRef::from(&fd);
    let set = |r: io::Result<()>| r.map_err(ConnectError::Failed);
    set(set_buffers(&fd, opts.buffers))?;
    if opts.nodelay {
        set(sref.set_tcp_nodelay(true))?;
    }
    if let Some(m) = opts.mark {
        set(sref.set_mark(m))?;
    }
    // An urgent byte from the server is relayed in line, not dropped (see `relay`).
    set(sref.set_out_of_band_inline(true))?;
    match rustix::net::connect(&fd, &addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
        Err(e) => return Err(ConnectError::Failed(e.into())),
    }
    let sock = register(std::net::TcpStream::from(fd)).map_err(ConnectError::Failed)?;
    let established = async {
        // Writable means the handshake finished, one way or the other; only when the
        // kernel flagged an error is it worth a syscall to learn which.
        let ready = sock.writable().await?.ready();
        if !ready.is_error() && !ready.is_write_closed() {
            return Ok(());
        }
        match sock.get_ref().take_error()? {
            Some(e) => Err(e),
            None => Err(io::Error::other("connect failed")),
        }
    };
    match tokio::time::timeout(timeout, established).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ConnectError::Failed(e)),
        Err(_) => return Err(ConnectError::Timeout),
    }
    if let Some(k) = opts.keepalive {
        set_keepalive(sock.get_ref(), k).map_err(ConnectError::Failed)?;
    }
    Ok(sock)
}

/// TCP keepalive: first probe after `idle`, then every `idle / 3` (at least 1 s), 3 probes.
pub fn set_keepalive(stream: &std::net::TcpStream, idle: Duration) -> io::Result<()> {
    let interval = (idle / 3).max(Duration::from_secs(1));
    SockRef::from(stream).set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(3),
    )
}

/// Closes `sock` with a reset rather than a FIN: for refused clients (no TIME_WAIT left
/// behind under a flood) and to pass a peer's reset on to the other side.
pub fn close_with_reset<S: std::os::fd::AsFd>(sock: S) {
    let _ = SockRef::from(&sock).set_linger(Some(Duration::ZERO));
    drop(sock);
}

/// Sets a socket's send and receive buffers to their starting sizes (which also ends the
/// kernel's autotuning of them, until `unlock_buffers`); `"auto"` leaves one to the kernel.
pub fn set_buffers(
    sock: &impl std::os::fd::AsFd,
    b: crate::config::SocketBuffers,
) -> io::Result<()> {
    let sref = SockRef::from(sock);
    if let Some(n) = b.send.initial() {
        sref.set_send_buffer_size(n)?;
    }
    if let Some(n) = b.recv.initial() {
        sref.set_recv_buffer_size(n)?;
    }
    Ok(())
}

/// Binds a listening socket (non-blocking, not yet registered with a runtime: the worker
/// that accepts on it registers it). With `reuse_port`, several sockets may bind the same
/// address and the kernel spreads new connections over them. With `transparent`
/// (IP_TRANSPARENT, for TPROXY), it accepts connections addressed to any address that
/// policy routing delivers to it.
pub fn bind_listener(
    addr: SocketAddr,
    reuse_port: bool,
    transparent: bool,
) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        // "[::]:port" means IPv6 only; IPv4 is listed separately, as in the SPEC example.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listening socket (Linux): set once
    // here rather than once per connection.
    socket.set_tcp_nodelay(true)?;
    // Likewise SO_OOBINLINE: a client's urgent byte is relayed in line, not dropped.
    socket.set_out_of_band_inline(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if transparent {
        if addr.is_ipv4() {
            socket.set_ip_transparent_v4(true)?;
        } else {
            socket.set_ip_transparent_v6(true)?;
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// What a socket handed to ferry (by systemd, or by the process it upgrades) is: its
/// address, and whether it is UDP (else a listening TCP socket); `None` for anything else
/// (no IP address, a TCP socket that is not listening, another type).
pub fn listening_kind(sock: &socket2::Socket) -> io::Result<Option<(SocketAddr, bool)>> {
    let Some(addr) = sock.local_addr()?.as_socket() else {
        return Ok(None);
    };
    Ok(match sock.r#type()? {
        socket2::Type::STREAM if sock.is_listener()? => Some((addr, false)),
        socket2::Type::DGRAM => Some((addr, true)),
        _ => None,
    })
}

/// Fails with `AddrInUse` if a socket listens on `addr`, whatever its options: binds a
/// probe socket there without SO_REUSEPORT (with SO_REUSEADDR, as listeners have, so that
/// connections in TIME_WAIT do not count), then closes it.
pub fn check_free(addr: SocketAddr) -> io::Result<()> {
    let domain = socket2::Domain::for_address(addr);
    let probe = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into())
}

/// Fails (`AddrInUse`) if a UDP socket is bound to `addr`, even one with SO_REUSEPORT.
pub fn check_free_udp(addr: SocketAddr) -> io::Result<()> {
    let domain = socket2::Domain::for_address(addr);
    let probe = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    probe.bind(&addr.into())
}

/// The receive buffer asked for a UDP listening socket: every client's datagrams queue in
/// it while its worker is busy, and the kernel's default (~208 KiB) overflows under a
/// burst of large datagrams. Past `net.core.rmem_max` it takes root (`SO_RCVBUFFORCE`);
/// without, the kernel gives what `rmem_max` allows.
pub const UDP_LISTEN_BUFFER: usize = 4 << 20;

/// A UDP listening socket on `addr`, non-blocking; with `reuse_port`, others may bind the
/// same address (the kernel hashes each client address to one of them). `exclusive`: the
/// address must be free even of other sockets with SO_REUSEPORT (`AddrInUse` if not).
pub fn bind_udp(
    addr: SocketAddr,
    reuse_port: bool,
    exclusive: bool,
) -> io::Result<std::net::UdpSocket> {
    if exclusive {
        check_free_udp(addr)?;
    }
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, UDP_LISTEN_BUFFER).is_err()
    {
        socket.set_recv_buffer_size(UDP_LISTEN_BUFFER)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Accepts one connection if one is waiting: `Ok(None)` when none is (readiness cleared).
/// The socket is non-blocking and not yet registered: the worker that serves it registers
/// it.
pub fn try_accept(
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, std::net::TcpListener>,
) -> io::Result<Option<(std::net::TcpStream, SocketAddr)>> {
    match guard.try_io(|l| accept(l.get_ref())) {
        Err(_would_block) => Ok(None),
        Ok(r) => r.map(Some),
    }
}

/// Accepts one connection waiting on `l` (non-blocking): `None` when none is.
pub fn accept_waiting(
    l: &std::net::TcpListener,
) -> io::Result<Option<(std::net::TcpStream, SocketAddr)>> {
    match accept(l) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        r => r.map(Some),
    }
}

fn accept(l: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    let (fd, peer) = rustix::net::acceptfrom_with(l, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
    let peer = peer
        .and_then(|p| SocketAddr::try_from(p).ok())
        .ok_or_else(|| io::Error::other("accepted a connection with no IP peer address"))?;
    Ok((std::net::TcpStream::from(fd), peer))
}

/// Writes all of `buf` to `sock`, waiting for room as needed.
pub async fn write_all(sock: &Sock, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let mut g = sock.writable().await?;
        if let Ok(r) = g.try_io(|s| s.get_ref().write(buf)) {
            let n = r?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes from `sock`.
pub async fn read_exact(sock: &Sock, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let mut g = sock.readable().await?;
        if let Ok(r) = g.try_io(|s| io::Read::read(&mut s.get_ref(), &mut buf[done..])) {
            match r? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => done += n,
            }
        }
    }
    Ok(())
}

/// Reads what `sock` has (at most `buf.len()` bytes); waits for at least one (0 means EOF).
pub async fn read_some(sock: &Sock, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut g = sock.readable().await?;
        if let Ok(r) = g.try_io(|s| io::Read::read(&mut s.get_ref(), buf)) {
            return r;
        }
    }
}

/// Looks at what `sock` has received without consuming it; waits for at least one byte
/// (0 means EOF).
pub async fn peek(sock: &Sock, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut g = sock.readable().await?;
        if let Ok(r) = g.try_io(|s| {
            rustix::net::recv(s.get_ref(), &mut *buf, rustix::net::RecvFlags::PEEK)
                .map(|(n, _)| n)
                .map_err(io::Error::from)
        }) {
            return r;
        }
    }
}

/// Resolves when the peer of `sock` has closed or reset it without sending anything; if it
/// has sent data (even data and then a FIN: a half-close), never: that client is waiting
/// for an answer.
pub async fn hung_up(sock: &Sock) {
    let mut one = [0u8; 1];
    match peek(sock, &mut one).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listening TCP socket and a UDP socket are told apart by kind, with their address;
    /// a TCP socket that does not listen, and a Unix socket, are neither.
    #[test]
    fn handed_sockets_are_told_apart() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = tcp.local_addr().unwrap();
        let tcp = socket2::Socket::from(std::os::fd::OwnedFd::from(tcp));
        assert_eq!(listening_kind(&tcp).unwrap(), Some((a, false)));
        let udp = std::net::UdpSocket::bind("[::1]:0").unwrap();
        let a = udp.local_addr().unwrap();
        let udp = socket2::Socket::from(std::os::fd::OwnedFd::from(udp));
        assert_eq!(listening_kind(&udp).unwrap(), Some((a, true)));
        let bound =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        bound
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        assert_eq!(listening_kind(&bound).unwrap(), None);
        let (unix, _) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let unix = socket2::Socket::from(std::os::fd::OwnedFd::from(unix));
        assert_eq!(listening_kind(&unix).unwrap(), None);
    }
}
