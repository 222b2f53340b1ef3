//! The one place ferry uses `unsafe`: registering sockets it owns with the runtime.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

use tokio::io::unix::AsyncFd;

/// Registers `inner` (a non-blocking socket ferry owns) with the runtime's reactor.
pub fn register<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` is a std socket that owns its descriptor, and the `AsyncFd` takes
    // ownership of it: nothing else can close or replace the descriptor while it is
    // registered, and `AsyncFd` deregisters it before dropping (closing) it.
    unsafe { AsyncFd::register(inner) }.map_err(|e| e.into_parts().1)
}
