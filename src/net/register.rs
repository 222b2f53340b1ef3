//! The one place ferry uses `unsafe`: registering sockets it owns with the runtime.
#![allow(unsafe_code)]

use std::io;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers a connected, non-blocking TCP socket ferry owns with the runtime's reactor,
/// for reading, writing and urgent data (`EPOLLPRI`: the relay must know when a short read
/// stopped at an urgent mark rather than at the end of the queue).
pub(crate) fn register(inner: std::net::TcpStream) -> io::Result<AsyncFd<std::net::TcpStream>> {
    let interest = Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY;
    // SAFETY: `inner` is a std socket that owns its descriptor, and the `AsyncFd` takes
    // ownership of it: nothing else can close or replace the descriptor while it is
    // registered, and `AsyncFd` deregisters it before dropping (closing) it.
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|e| e.into_parts().1)
}

/// Registers a non-blocking listening socket ferry owns with the runtime's reactor.
pub(crate) fn register_listener(
    inner: std::net::TcpListener,
) -> io::Result<AsyncFd<std::net::TcpListener>> {
    // SAFETY: as for `register`: the `AsyncFd` owns the descriptor from here on.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Registers a non-blocking descriptor ferry owns (the upgrade control socket) with the
/// runtime's reactor, for reading.
pub(crate) fn register_readable(
    inner: std::os::fd::OwnedFd,
) -> io::Result<AsyncFd<std::os::fd::OwnedFd>> {
    // SAFETY: as for `register`: the `AsyncFd` owns the descriptor from here on.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Registers a non-blocking UDP socket ferry owns with the runtime's reactor, for reading
/// (and errors: ICMP reports). UDP sends never wait for room (a datagram that does not fit
/// is dropped), so write readiness is not asked for: registered for it, the socket would
/// turn ready each time the kernel freed a sent datagram's buffer, and every datagram sent
/// would put an event on the worker's epoll.
pub(crate) fn register_udp(inner: std::net::UdpSocket) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: as for `register`: the `AsyncFd` owns the descriptor from here on.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
