//! Handing a socket's buffers back to the kernel's autotuning (`SO_BUF_LOCK`, Linux 5.14).
//!
//! Setting SO_SNDBUF or SO_RCVBUF locks that buffer's size: the kernel stops autotuning
//! it. `SO_BUF_LOCK` reads and writes those locks; clearing one lets the kernel grow the
//! buffer again from its current size. Neither socket2 nor rustix has the option, so this
//! module calls `setsockopt` itself.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `SOCK_SNDBUF_LOCK` in `sk_userlocks`.
const SEND_LOCK: libc::c_int = 1;
/// `SOCK_RCVBUF_LOCK` in `sk_userlocks`.
const RECV_LOCK: libc::c_int = 2;

/// Clears the locks on `sock`'s send buffer (`send`) and receive buffer (`recv`), so the
/// kernel autotunes them from here on; leaves the other lock as it is. On a kernel without
/// `SO_BUF_LOCK` this fails (`ENOPROTOOPT`) and the buffers stay as they were set.
pub(crate) fn unlock(sock: &impl AsFd, send: bool, recv: bool) -> io::Result<()> {
    let fd = sock.as_fd().as_raw_fd();
    let mut locks: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` is a descriptor `sock` keeps open for this call; the kernel writes at
    // most `len` bytes into `locks`, an initialized c_int of that size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BUF_LOCK,
            (&raw mut locks).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut clear = 0;
    if send {
        clear |= SEND_LOCK;
    }
    if recv {
        clear |= RECV_LOCK;
    }
    let locks = locks & !clear;
    // SAFETY: as above; the kernel reads `len` bytes from `locks`.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BUF_LOCK,
            (&raw const locks).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn locks(s: &std::net::TcpStream) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as in `unlock`.
        let r = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BUF_LOCK,
                (&raw mut v).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        v
    }

    #[test]
    fn unlocks_one_buffer_and_keeps_the_other() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert_eq!(locks(&s), 0, "a fresh socket is autotuned");
        let r = socket2::SockRef::from(&s);
        r.set_send_buffer_size(256 << 10).unwrap();
        r.set_recv_buffer_size(256 << 10).unwrap();
        assert_eq!(locks(&s), SEND_LOCK | RECV_LOCK);
        unlock(&s, false, true).unwrap();
        assert_eq!(locks(&s), SEND_LOCK);
        // The size set stays until the kernel grows it.
        assert_eq!(r.recv_buffer_size().unwrap(), 512 << 10);
        unlock(&s, true, false).unwrap();
        assert_eq!(locks(&s), 0);
    }
}
