//! The network namespace's interfaces, as the kernel's route netlink reports them: a dump
//! of those there are, then each one added, changed or removed. The kernel's UDP path
//! ([`super::Kernel`]) attaches its program to each Ethernet-like interface as it appears,
//! and lets go of it when it is gone.
// Without the program (a build without clang) nothing watches the interfaces.
#![cfg_attr(not(ferry_bpf), allow(dead_code))]

use std::io;
use std::os::fd::OwnedFd;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// An interface there is (or is no longer: `gone`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// Its frames start with an Ethernet header (Ethernet, veth, loopback…), which the
    /// program reads: others (a tunnel, WireGuard) carry bare IP packets.
    pub ether: bool,
    pub gone: bool,
}

/// What one read from the socket held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub links: Vec<Link>,
    /// A dump's end: its sequence number, and 0 if it is complete, or the error that
    /// ended it (a negative errno: `EBUSY` while another runs, say).
    pub end: Option<(u32, i32)>,
    /// The interfaces changed while the dump ran: its list may be inconsistent.
    pub interrupted: bool,
}

const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
/// `struct ifinfomsg`: family, pad, type (u16), index (i32), flags, change.
const IFINFOMSG: usize = 16;
const IFLA_IFNAME: u16 = 3;
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
/// `RTMGRP_LINK`: link notifications.
const GROUP_LINK: u32 = 1;

/// A route netlink socket that hears of every link change.
pub struct Links {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// The last dump's sequence number.
    seq: u32,
}

impl Links {
    /// Subscribed from now on: an interface added after this call is reported, even if
    /// it appears before the dump does.
    pub fn open() -> io::Result<Links> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            // NETLINK_ROUTE.
            None,
        )?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, GROUP_LINK))?;
        Ok(Links {
            fd,
            buf: vec![0; 64 * 1024],
            seq: 0,
        })
    }

    /// How long [`Links::read`] waits at most (`None`: for ever).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        rustix::net::sockopt::set_socket_timeout(&self.fd, rustix::net::sockopt::Timeout::Recv, t)?;
        Ok(())
    }

    /// Asks for every interface there is; they come in through [`Links::read`], the
    /// last read with the dump's `end`, under the sequence number this returns.
    pub fn dump(&mut self) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        const LEN: usize = NLMSG_HDR + IFINFOMSG;
        let mut req = [0u8; LEN];
        req[0..4].copy_from_slice(&(LEN as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&RTM_GETLINK.to_ne_bytes());
        req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        rustix::net::sendto(
            &self.fd,
            &req,
            SendFlags::empty(),
            &SocketAddrNetlink::new(0, 0),
        )?;
        Ok(self.seq)
    }

    /// Waits for the next messages. `ENOBUFS` says some were lost (the socket's buffer
    /// overflowed, or one was larger than ours): dump again.
    pub fn read(&mut self) -> io::Result<Read> {
        let (_, n) = rustix::net::recv(&self.fd, &mut self.buf[..], RecvFlags::TRUNC)?;
        if n > self.buf.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        Ok(parse(&self.buf[..n]))
    }
}

/// The links in a read's worth of netlink messages. What does not parse is skipped; a
/// message cut short ends the read.
pub fn parse(mut b: &[u8]) -> Read {
    let mut out = Read::default();
    while b.len() >= NLMSG_HDR {
        let len = u32_at(b, 0) as usize;
        if len < NLMSG_HDR || len > b.len() {
            break;
        }
        let (kind, flags, seq) = (u16_at(b, 4), u16_at(b, 6), u32_at(b, 8));
        let body = &b[NLMSG_HDR..len];
        out.interrupted |= flags & NLM_F_DUMP_INTR != 0;
        match kind {
            // A dump's end (its body: the dump's error, 0 for none, in an int), or an
            // error reply (`struct nlmsgerr`: the error, then the request).
            NLMSG_DONE | NLMSG_ERROR => {
                let error = if body.len() >= 4 {
                    u32_at(body, 0) as i32
                } else {
                    -libc::EINVAL
                };
                out.end = Some((seq, error));
            }
            RTM_NEWLINK | RTM_DELLINK => out.links.extend(link(body, kind == RTM_DELLINK)),
            _ => {}
        }
        // Messages are 4-byte aligned.
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// An `ifinfomsg` and its attributes.
fn link(b: &[u8], gone: bool) -> Option<Link> {
    if b.len() < IFINFOMSG {
        return None;
    }
    let kind = u16_at(b, 2);
    let index = u32::try_from(i32::from_ne_bytes(b[4..8].try_into().ok()?)).ok()?;
    let mut attrs = &b[IFINFOMSG..];
    let mut name = None;
    while attrs.len() >= 4 {
        let len = usize::from(u16_at(attrs, 0));
        if len < 4 || len > attrs.len() {
            break;
        }
        if u16_at(attrs, 2) == IFLA_IFNAME {
            let v = &attrs[4..len];
            let v = v.split(|&c| c == 0).next().unwrap_or_default();
            name = std::str::from_utf8(v).ok().map(str::to_string);
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    Some(Link {
        index,
        name: name.filter(|n| !n.is_empty())?,
        ether: kind == ARPHRD_ETHER || kind == ARPHRD_LOOPBACK,
        gone,
    })
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message of `kind` around an ifinfomsg for `index` of device type `dev`,
    /// named `name`.
    fn message(kind: u16, index: i32, dev: u16, name: &str) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG];
        body[2..4].copy_from_slice(&dev.to_ne_bytes());
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        // An attribute before the name (IFLA_MTU), as the kernel sends.
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&4u16.to_ne_bytes());
        body.extend_from_slice(&1500u32.to_ne_bytes());
        let attr_len = 4 + name.len() + 1;
        body.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        body.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.resize(body.len().next_multiple_of(4), 0);
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    /// A dump's end (`NLMSG_DONE`) or an error reply (`NLMSG_ERROR`), for dump `seq`.
    fn end(kind: u16, seq: u32, error: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 2]);
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(&error.to_ne_bytes());
        m
    }

    #[test]
    fn links_added_and_removed_then_the_dump_s_end() {
        let mut b = message(RTM_NEWLINK, 1, ARPHRD_LOOPBACK, "lo");
        b.extend(message(RTM_NEWLINK, 7, ARPHRD_ETHER, "veth-a1"));
        b.extend(message(RTM_NEWLINK, 9, 65534, "wg0"));
        b.extend(message(RTM_DELLINK, 7, ARPHRD_ETHER, "veth-a1"));
        b.extend(end(NLMSG_DONE, 7, 0));
        let r = parse(&b);
        let l = |index, name: &str, ether, gone| Link {
            index,
            name: name.into(),
            ether,
            gone,
        };
        assert_eq!(
            r.links,
            [
                l(1, "lo", true, false),
                l(7, "veth-a1", true, false),
                l(9, "wg0", false, false),
                l(7, "veth-a1", true, true),
            ]
        );
        assert_eq!(r.end, Some((7, 0)));
        assert!(!r.interrupted);
    }

    #[test]
    fn an_error_reply_and_an_interrupted_dump() {
        let r = parse(&end(NLMSG_ERROR, 3, -libc::EBUSY));
        assert_eq!(r.end, Some((3, -libc::EBUSY)));
        let mut m = message(RTM_NEWLINK, 2, ARPHRD_ETHER, "eth0");
        m[6..8].copy_from_slice(&(NLM_F_DUMP_INTR | 2).to_ne_bytes());
        let r = parse(&m);
        assert!(r.interrupted);
        assert_eq!(r.links.len(), 1);
        assert_eq!(r.end, None);
    }

    #[test]
    fn every_prefix_parses_to_whole_messages_only() {
        let mut b = message(RTM_NEWLINK, 3, ARPHRD_ETHER, "eth0");
        let first = b.len();
        b.extend(message(RTM_NEWLINK, 4, ARPHRD_ETHER, "eth1"));
        for cut in 0..=b.len() {
            let r = parse(&b[..cut]);
            let expect = usize::from(cut >= first) + usize::from(cut == b.len());
            assert_eq!(r.links.len(), expect, "cut at {cut}");
            assert_eq!(r.end, None);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A simple generator: every byte value in every position of a short message, and
        // lengths that lie.
        let base = message(RTM_NEWLINK, 5, ARPHRD_ETHER, "x");
        for at in 0..base.len() {
            for v in [0u8, 1, 3, 4, 15, 16, 17, 0x7f, 0x80, 0xff] {
                let mut b = base.clone();
                b[at] = v;
                let _ = parse(&b);
            }
        }
        // A negative index, and a name attribute without its NUL.
        let r = parse(&message(RTM_NEWLINK, -1, ARPHRD_ETHER, "neg"));
        assert!(r.links.is_empty());
    }
}
