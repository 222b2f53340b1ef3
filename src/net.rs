//! Socket set-up shared by listeners and server connections.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::TcpOptions;

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
) -> Result<TcpStream, ConnectError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(ConnectError::Failed)?;
    if let Some(n) = opts.send_buffer {
        socket
            .set_send_buffer_size(n as u32)
            .map_err(ConnectError::Failed)?;
    }
    if let Some(n) = opts.recv_buffer {
        socket
            .set_recv_buffer_size(n as u32)
            .map_err(ConnectError::Failed)?;
    }
    socket
        .set_nodelay(opts.nodelay)
        .map_err(ConnectError::Failed)?;
    let stream = match tokio::time::timeout(timeout, socket.connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::Failed(e)),
        Err(_) => return Err(ConnectError::Timeout),
    };
    if let Some(k) = opts.keepalive {
        set_keepalive(&stream, k).map_err(ConnectError::Failed)?;
    }
    Ok(stream)
}

/// TCP keepalive: first probe after `idle`, then every `idle / 3`... (at least 1 s).
pub fn set_keepalive(stream: &TcpStream, idle: Duration) -> io::Result<()> {
    let interval = (idle / 3).max(Duration::from_secs(1));
    SockRef::from(stream).set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(3),
    )
}

/// Closes `stream` with a reset rather than a FIN: for refused clients (no TIME_WAIT left
/// behind under a flood) and to pass a peer's reset on to the other side.
pub fn close_with_reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Binds a listening socket. With `reuse_port`, several sockets may bind the same address
/// and the kernel spreads new connections over them.
pub fn bind_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<tokio::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        // "[::]:port" means IPv6 only; IPv4 is listed separately, as in the SPEC example.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    tokio::net::TcpListener::from_std(socket.into())
}
