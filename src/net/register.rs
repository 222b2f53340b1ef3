//! The one place ferry uses `unsafe`: registering sockets it owns with the runtime.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

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

/// A descriptor-owning type: closing is its drop, and `as_raw_fd` always gives the one
/// descriptor it owns. Only such types are registered with the reactor.
pub(crate) trait Owned: AsRawFd {}
impl Owned for std::net::TcpListener {}
impl Owned for std::net::UdpSocket {}
impl Owned for std::os::fd::OwnedFd {}

/// Registers a non-blocking descriptor ferry owns with the runtime's reactor, for reading
/// (and errors, which epoll always reports): a listening socket, the upgrade control
/// socket, or a UDP socket. UDP sends never wait for room (a datagram that does not fit is
/// dropped), so UDP sockets are not registered for writing either: the socket would turn
/// writable each time the kernel freed a sent datagram's buffer, and every datagram sent
/// would put an event on the worker's epoll.
pub(crate) fn register_readable<T: Owned>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: as for `register`: `T` owns its descriptor and the `AsyncFd` owns `T` from
    // here on.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
