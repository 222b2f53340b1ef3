//! UDP socket options neither rustix nor socket2 has: letting the kernel fragment what a
//! listening socket sends, UDP GRO on a session's socket,
//! and the interface each datagram came in on.
//!
//! `quinn-udp`, which reads a UDP listener's datagrams in batches, sets its socket to never
//! fragment (QUIC probes the path MTU itself). A relay must pass any datagram on, so
//! ferry allows fragmentation again on its listening sockets: a reply larger than the
//! path MTU leaves in fragments, as it would from the server itself. rustix sets the IPv4
//! option; `IPV6_DONTFRAG` is in neither rustix nor socket2, so this module calls
//! `setsockopt` for it.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

/// Allows fragmentation of what `sock` (bound to `local`) sends.
pub(crate) fn allow_fragments(sock: &impl AsFd, local: SocketAddr) -> io::Result<()> {
    use rustix::net::sockopt;
    if local.is_ipv4() {
        return Ok(sockopt::set_ip_mtu_discover(
            sock,
            sockopt::Ipv4PathMtuDiscovery::DONT,
        )?);
    }
    sockopt::set_ipv6_mtu_discover(sock, sockopt::Ipv6PathMtuDiscovery::DONT)?;
    set_int(sock, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0)
}

/// Enables UDP GRO on `sock`: datagrams of one size from one sender arrive coalesced, one
/// read for many (the size in a control message), to be passed on with one GSO send.
pub(crate) fn enable_udp_gro(sock: &impl AsFd) -> io::Result<()> {
    set_int(sock, libc::SOL_UDP, libc::UDP_GRO, 1)
}

/// Turns off what `quinn-udp` asks the kernel to attach to every datagram a listening
/// socket receives and a relay has no use for: receive timestamps, the TOS/traffic class
/// byte, and (on a socket bound to one address, unless `pktinfo` asks to keep it, with the
/// interface) the destination address. Each is a control message built per datagram.
pub(crate) fn quiet_listener(sock: &impl AsFd, local: SocketAddr, pktinfo: bool) -> io::Result<()> {
    set_int(sock, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 0)?;
    let wildcard = local.ip().is_unspecified();
    if local.is_ipv4() {
        set_int(sock, libc::IPPROTO_IP, libc::IP_RECVTOS, 0)?;
    } else {
        set_int(sock, libc::IPPROTO_IPV6, libc::IPV6_RECVTCLASS, 0)?;
    }
    if !wildcard && !pktinfo {
        receive_pktinfo(sock, local, false)?;
    }
    Ok(())
}

/// Whether each datagram `sock` (of `local`'s family) receives comes with where it was
/// sent to and the interface it came in on (`IP_PKTINFO`, `IPV6_RECVPKTINFO`).
pub(crate) fn receive_pktinfo(sock: &impl AsFd, local: SocketAddr, on: bool) -> io::Result<()> {
    if local.is_ipv4() {
        set_int(sock, libc::IPPROTO_IP, libc::IP_PKTINFO, on.into())
    } else {
        set_int(sock, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, on.into())
    }
}

/// Sets an integer socket option.
fn set_int(
    sock: &impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the descriptor is open for the call (`sock` holds it); the kernel reads
    // `size_of::<c_int>()` bytes from `v`, an initialized c_int.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
