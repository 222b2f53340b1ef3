//! Transparent mode: the destination a client connected to before a firewall rule sent the
//! connection here. With REDIRECT (NAT), the kernel keeps it in the connection tracking
//! entry (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`); with TPROXY the socket was never
//! rewritten, and its local address is the original destination.

use std::net::SocketAddr;

use socket2::SockRef;

use crate::config::Interception;
use crate::net::Sock;
use crate::observe::Refusal;

/// The original destination of an accepted connection.
pub(super) fn original_destination(sock: &Sock, how: Interception) -> Result<SocketAddr, Refusal> {
    let s = sock.get_ref();
    let r = match how {
        Interception::Tproxy => s.local_addr(),
        Interception::Redirect => {
            let sref = SockRef::from(s);
            let local = s.local_addr();
            let got = match local {
                Ok(SocketAddr::V6(v6)) if v6.ip().to_ipv4_mapped().is_none() => {
                    sref.original_dst_v6()
                }
                _ => sref.original_dst_v4(),
            };
            got.and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| std::io::Error::other("not an IP address"))
            })
        }
    };
    r.map_err(|e| Refusal::handshake(format!("cannot learn the original destination: {e}")))
}
