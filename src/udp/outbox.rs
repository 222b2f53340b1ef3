//! Datagrams a listening socket's worker is to send, gathered and sent together.
//!
//! Each datagram ferry passes on wakes whoever waits for it, and a woken process may take
//! the CPU as the send returns: a send per system call means a wake-up and often a context
//! switch per datagram. So the datagrams of one round of a worker (a batch read from the
//! listening socket, the replies of every session that had one) are queued here, copied
//! into one arena, and sent in one call: one `io_uring_enter` with a `sendmsg` per datagram
//! whatever socket it leaves from (each session's connected socket, the listening socket),
//! or where io_uring is not available (the kernel is older, or a seccomp profile or
//! `kernel.io_uring_disabled` refuses it), one `sendmmsg` per run of datagrams leaving the
//! same socket. Either way every send is `MSG_DONTWAIT`: a datagram the socket cannot take
//! now is dropped (as a router would), never waited for, so the sends are done when the
//! call returns and nothing outlives it.

#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use io_uring::{IoUring, opcode, types};
use tokio::net::UdpSocket;

use super::{Direction, Dropped, segments, sent};

/// A datagram's result before it has one.
const PENDING: i32 = i32::MIN;

/// Datagrams queued at most (and the ring's submission queue size).
pub const CAPACITY: usize = 256;

/// Bytes queued at most: room for 8 datagrams of the largest size.
const ARENA: usize = 8 * super::MAX_DATAGRAM;

/// Where a queued datagram goes.
pub enum To {
    /// To a client, from the listening socket; from `src` when that is bound to a wildcard
    /// address (the address the client sent to).
    Client {
        addr: SocketAddr,
        src: Option<IpAddr>,
    },
    /// To a session's server, on its connected socket (held open until sent).
    Server(Arc<UdpSocket>),
}

/// A queued datagram, and what its send counts as.
struct Queued {
    to: To,
    start: usize,
    len: usize,
    /// Segments of this size (UDP GSO): several datagrams in one send.
    segment: Option<u16>,
    client: SocketAddr,
    way: Direction,
}

/// A datagram's send as it is reported.
pub struct Sent {
    pub way: Direction,
    pub client: SocketAddr,
    /// Datagrams (more than one for a GSO send).
    pub datagrams: u64,
    pub bytes: usize,
    pub result: Result<(), Dropped>,
}

/// Room for a datagram's control messages: `UDP_SEGMENT` and an `in6_pktinfo`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; 64]);

/// The system calls' view of the queue, rebuilt for each flush (raw pointers into the
/// arena and the vectors beside them, valid only during the flush).
struct Headers {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<socket2::SockAddr>,
    control: Vec<Control>,
    results: Vec<i32>,
}

// SAFETY: the raw pointers in `hdrs` and `iovs` are written and used only within
// `Outbox::flush`, which has the outbox exclusively; between flushes they are stale and never
// read.
unsafe impl Send for Headers {}

/// The datagrams queued on one listening socket's worker.
pub struct Outbox {
    ring: Option<IoUring>,
    arena: Box<[u8]>,
    used: usize,
    queued: Vec<Queued>,
    headers: Headers,
    /// The kernel refused a GSO send (`EIO`): no more of them.
    gso_failed: bool,
}

impl Outbox {
    /// An empty outbox; with `io_uring`, sending through a ring of its own if the kernel
    /// allows one (else, or without it, through `sendmmsg`).
    pub fn new(io_uring: bool) -> Outbox {
        let ring = if io_uring {
            match IoUring::new(CAPACITY as u32) {
                Ok(ring) => Some(ring),
                Err(e) => {
                    static SAID: AtomicBool = AtomicBool::new(false);
                    if !SAID.swap(true, Relaxed) {
                        tracing::warn!(
                            "io_uring is not available ({e}): UDP datagrams are sent with sendmmsg"
                        );
                    }
                    None
                }
            }
        } else {
            None
        };
        let unspecified = socket2::SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0)));
        Outbox {
            ring,
            arena: vec![0; ARENA].into_boxed_slice(),
            used: 0,
            queued: Vec::with_capacity(CAPACITY),
            headers: Headers {
                // SAFETY: all-zero is a valid mmsghdr and iovec (null pointers, zero lengths).
                hdrs: vec![unsafe { mem::zeroed() }; CAPACITY],
                iovs: vec![unsafe { mem::zeroed() }; CAPACITY],
                names: vec![unspecified; CAPACITY],
                control: vec![Control([0; 64]); CAPACITY],
                results: vec![0; CAPACITY],
            },
            gso_failed: false,
        }
    }

    /// Whether sends go through io_uring.
    pub fn uses_io_uring(&self) -> bool {
        self.ring.is_some()
    }

    /// Whether a GSO send failed (the device cannot segment).
    pub fn gso_failed(&self) -> bool {
        self.gso_failed
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Queues the datagram `parts` joined (a PROXY header, then the payload), or gives `to`
    /// back when there is no room: flush, then queue it again.
    pub fn push(
        &mut self,
        to: To,
        parts: &[&[u8]],
        segment: Option<u16>,
        client: SocketAddr,
        way: Direction,
    ) -> Result<(), To> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.queued.len() == CAPACITY || ARENA - self.used < len {
            return Err(to);
        }
        let start = self.used;
        for p in parts {
            self.arena[self.used..self.used + p.len()].copy_from_slice(p);
            self.used += p.len();
        }
        self.queued.push(Queued {
            to,
            start,
            len,
            segment,
            client,
            way,
        });
        Ok(())
    }

    /// Sends every queued datagram, client datagrams from `listening`, and tells `done` how
    /// each went, in the order they were queued.
    pub fn flush(&mut self, listening: RawFd, mut done: impl FnMut(Sent)) {
        let n = self.queued.len();
        if n == 0 {
            return;
        }
        self.prepare();
        let fds = |q: &Queued| match &q.to {
            To::Client { .. } => listening,
            To::Server(s) => s.as_raw_fd(),
        };
        let through_ring = match self.ring.as_mut() {
            Some(ring) => submit(ring, &self.queued, &mut self.headers, fds),
            None => false,
        };
        if !through_ring {
            if self.ring.take().is_some() {
                tracing::warn!("io_uring failed; UDP datagrams are sent with sendmmsg from now on");
            }
            send_runs(&self.queued, &mut self.headers, fds);
        }
        for (q, &r) in self.queued.drain(..).zip(&self.headers.results) {
            let result = match r {
                0.. => Ok(()),
                PENDING => Err(Dropped::SendFailed),
                _ => {
                    if r == -libc::EIO && q.segment.is_some() {
                        self.gso_failed = true;
                    }
                    sent(Err(io::Error::from_raw_os_error(-r)))
                }
            };
            done(Sent {
                way: q.way,
                client: q.client,
                datagrams: q.segment.map_or(1, |s| segments(q.len, s.into())),
                bytes: q.len,
                result,
            });
        }
        self.used = 0;
    }

    /// Points a header at each queued datagram: its bytes, its address (to a client) and
    /// its control messages (the segment size, the source address).
    fn prepare(&mut self) {
        let h = &mut self.headers;
        for (i, q) in self.queued.iter().enumerate() {
            let data = &mut self.arena[q.start..q.start + q.len];
            h.iovs[i] = libc::iovec {
                iov_base: data.as_mut_ptr().cast(),
                iov_len: data.len(),
            };
            // SAFETY: all-zero is a valid msghdr.
            let mut m: libc::msghdr = unsafe { mem::zeroed() };
            m.msg_iov = &mut h.iovs[i];
            m.msg_iovlen = 1;
            let src = match &q.to {
                To::Client { addr, src } => {
                    h.names[i] = socket2::SockAddr::from(*addr);
                    m.msg_name = h.names[i].as_ptr().cast_mut().cast();
                    m.msg_namelen = h.names[i].len();
                    *src
                }
                To::Server(_) => None,
            };
            let control = &mut h.control[i].0;
            m.msg_control = control.as_mut_ptr().cast();
            m.msg_controllen = control.len();
            let mut used = 0;
            // SAFETY: `m` points at `control`, 64 bytes, 8-aligned: room for a u16 and an
            // in6_pktinfo (24 + 40 bytes with their headers); CMSG_FIRSTHDR/NXTHDR return
            // null past it, checked before each write.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&m);
                if let Some(seg) = q.segment {
                    used += put(&mut c, &m, libc::SOL_UDP, libc::UDP_SEGMENT, seg);
                }
                match src {
                    Some(IpAddr::V4(ip)) => {
                        let info = libc::in_pktinfo {
                            ipi_ifindex: 0,
                            ipi_spec_dst: libc::in_addr {
                                s_addr: u32::from_ne_bytes(ip.octets()),
                            },
                            ipi_addr: libc::in_addr { s_addr: 0 },
                        };
                        used += put(&mut c, &m, libc::IPPROTO_IP, libc::IP_PKTINFO, info);
                    }
                    Some(IpAddr::V6(ip)) => {
                        let info = libc::in6_pktinfo {
                            ipi6_addr: libc::in6_addr {
                                s6_addr: ip.octets(),
                            },
                            ipi6_ifindex: 0,
                        };
                        used += put(&mut c, &m, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info);
                    }
                    None => {}
                }
            }
            m.msg_controllen = used;
            if used == 0 {
                m.msg_control = std::ptr::null_mut();
            }
            h.hdrs[i] = libc::mmsghdr {
                msg_hdr: m,
                msg_len: 0,
            };
            h.results[i] = PENDING;
        }
    }
}

/// Writes one control message at `*c` and moves `*c` to the next; its space, or 0 if there
/// was no room.
///
/// # Safety
/// `m.msg_control`/`msg_controllen` must describe a writable, 8-aligned buffer and `*c` be
/// null or a header within it (from `CMSG_FIRSTHDR`/`CMSG_NXTHDR` of `m`).
unsafe fn put<T: Copy>(
    c: &mut *mut libc::cmsghdr,
    m: &libc::msghdr,
    level: i32,
    kind: i32,
    value: T,
) -> usize {
    if c.is_null() {
        return 0;
    }
    let len = mem::size_of::<T>() as u32;
    // SAFETY: per the contract, `*c` is a header within the buffer with room for the
    // header; the value fits, as the buffer is sized for what `prepare` puts.
    unsafe {
        (**c).cmsg_level = level;
        (**c).cmsg_type = kind;
        (**c).cmsg_len = libc::CMSG_LEN(len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(*c).cast::<T>(), value);
        *c = libc::CMSG_NXTHDR(m, *c);
        libc::CMSG_SPACE(len) as usize
    }
}

/// Sends the queue through the ring: a `sendmsg` entry per datagram, submitted and
/// completed in one call (`MSG_DONTWAIT`: each completes as it is issued). False if the
/// ring failed: what has no result yet is then sent with `sendmmsg`. (With every entry
/// `MSG_DONTWAIT`, none is left in flight when the call returns, so dropping the ring then
/// leaves nothing pointing at the arena.)
fn submit(
    ring: &mut IoUring,
    queued: &[Queued],
    h: &mut Headers,
    fd: impl Fn(&Queued) -> RawFd,
) -> bool {
    let n = queued.len();
    {
        let mut sq = ring.submission();
        for (i, q) in queued.iter().enumerate() {
            let e = opcode::SendMsg::new(types::Fd(fd(q)), &h.hdrs[i].msg_hdr)
                .flags(libc::MSG_DONTWAIT as u32)
                .build()
                .user_data(i as u64);
            // SAFETY: the msghdr and everything it points at live until the flush ends; the
            // entries complete as they are issued (MSG_DONTWAIT), which this waits for.
            if unsafe { sq.push(&e) }.is_err() {
                return false;
            }
        }
    }
    let mut got = 0;
    // A few tries: EINTR and the like.
    for _ in 0..16 {
        let r = ring.submit_and_wait(n - got);
        for c in ring.completion() {
            if let Some(slot) = h.results.get_mut(c.user_data() as usize) {
                *slot = c.result();
                got += 1;
            }
        }
        if got >= n {
            return true;
        }
        match r {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(_) => return false,
        }
    }
    false
}

/// Sends what has no result yet with one `sendmmsg` per run of datagrams leaving the same
/// socket (a failed datagram is reported and the run goes on after it).
fn send_runs(queued: &[Queued], h: &mut Headers, fd: impl Fn(&Queued) -> RawFd) {
    let n = queued.len();
    let mut i = 0;
    while i < n {
        if h.results[i] != PENDING {
            i += 1;
            continue;
        }
        let sock = fd(&queued[i]);
        let mut end = i + 1;
        while end < n && h.results[end] == PENDING && fd(&queued[end]) == sock {
            end += 1;
        }
        // SAFETY: hdrs[i..end] point at live buffers, addresses and control messages
        // (`prepare`).
        let r = unsafe {
            libc::sendmmsg(
                sock,
                h.hdrs[i..end].as_mut_ptr(),
                (end - i) as u32,
                libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(r) {
            Ok(k) if k > 0 => {
                let k = k.min(end - i);
                for j in i..i + k {
                    h.results[j] = 0;
                }
                i += k;
            }
            // The run's first datagram failed: it is reported, the rest go on.
            _ => {
                let e = io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
                h.results[i] = -if r == 0 { libc::EAGAIN } else { e };
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket as StdUdp;
    use std::time::Duration;

    /// Through io_uring, then with sendmmsg.
    const MODES: [bool; 2] = [true, false];

    fn outbox(io_uring: bool) -> Outbox {
        let o = Outbox::new(io_uring);
        assert_eq!(o.uses_io_uring(), io_uring, "this kernel has io_uring");
        o
    }

    fn bound(ip: &str) -> StdUdp {
        let s = StdUdp::bind((ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// A session's socket connected to `to`.
    fn session(to: &StdUdp) -> Arc<UdpSocket> {
        let s = StdUdp::bind("127.0.0.1:0").unwrap();
        s.connect(to.local_addr().unwrap()).unwrap();
        s.set_nonblocking(true).unwrap();
        Arc::new(UdpSocket::from_std(s).unwrap())
    }

    fn recv(s: &StdUdp) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0u8; super::super::MAX_DATAGRAM];
        let (n, from) = s.recv_from(&mut buf).expect("a datagram within the bound");
        buf.truncate(n);
        (buf, from)
    }

    fn flush(o: &mut Outbox, listening: &StdUdp) -> Vec<Sent> {
        let mut sent = Vec::new();
        o.flush(listening.as_raw_fd(), |s| sent.push(s));
        assert!(o.is_empty());
        sent
    }

    /// A round of datagrams to two servers (over their sessions' sockets) and two clients
    /// (from the listening socket), interleaved, PROXY header and all: each arrives once,
    /// in order, from the right socket, and each is reported in the order queued.
    #[tokio::test]
    async fn a_round_reaches_every_socket_in_order() {
        for io_uring in MODES {
            let mut o = outbox(io_uring);
            let listening = bound("127.0.0.1");
            let servers = [bound("127.0.0.1"), bound("127.0.0.1")];
            let sessions = [session(&servers[0]), session(&servers[1])];
            let clients = [bound("127.0.0.1"), bound("127.0.0.1")];
            let client = |k: usize| clients[k].local_addr().unwrap();
            for i in 0..10u8 {
                let k = usize::from(i % 2);
                let to = To::Server(sessions[k].clone());
                assert!(
                    o.push(to, &[b"hdr", &[i; 5]], None, client(k), Direction::Up)
                        .is_ok()
                );
                let to = To::Client {
                    addr: client(k),
                    src: None,
                };
                let reply = [i; 300];
                assert!(
                    o.push(to, &[&reply], None, client(k), Direction::Down)
                        .is_ok()
                );
            }
            let sent = flush(&mut o, &listening);
            assert_eq!(sent.len(), 20);
            for (j, s) in sent.iter().enumerate() {
                assert_eq!(s.result, Ok(()), "{io_uring}: datagram {j}");
                assert_eq!(s.datagrams, 1);
                let (way, bytes) = if j % 2 == 0 {
                    (Direction::Up, 8)
                } else {
                    (Direction::Down, 300)
                };
                assert_eq!((s.way, s.bytes, s.client), (way, bytes, client(j / 2 % 2)));
            }
            for k in 0..2 {
                for i in (k as u8..10).step_by(2) {
                    let (got, from) = recv(&servers[k]);
                    assert_eq!(got, [&b"hdr"[..], &[i; 5]].concat());
                    assert_eq!(from, sessions[k].local_addr().unwrap());
                    let (got, from) = recv(&clients[k]);
                    assert_eq!(got, [i; 300]);
                    assert_eq!(from, listening.local_addr().unwrap());
                }
            }
        }
    }

    /// From a listening socket bound to a wildcard address, a reply leaves from the
    /// address it names.
    #[tokio::test]
    async fn a_reply_leaves_from_the_address_named() {
        for io_uring in MODES {
            for (any, ip) in [("0.0.0.0", "127.0.0.5"), ("::", "::1")] {
                let mut o = outbox(io_uring);
                let listening = bound(any);
                let c = bound(if any == "::" { "::1" } else { "127.0.0.1" });
                let to = To::Client {
                    addr: c.local_addr().unwrap(),
                    src: Some(ip.parse().unwrap()),
                };
                assert!(
                    o.push(to, &[b"hi"], None, c.local_addr().unwrap(), Direction::Down)
                        .is_ok()
                );
                assert_eq!(flush(&mut o, &listening)[0].result, Ok(()));
                let (got, from) = recv(&c);
                assert_eq!(got, b"hi");
                let port = listening.local_addr().unwrap().port();
                assert_eq!(
                    from,
                    SocketAddr::new(ip.parse().unwrap(), port),
                    "{io_uring}"
                );
            }
        }
    }

    /// With a segment size, one send is several datagrams (UDP GSO), counted as such.
    #[tokio::test]
    async fn segments_go_as_separate_datagrams() {
        let probe = StdUdp::bind("127.0.0.1:0").unwrap();
        let state = quinn_udp::UdpSocketState::new(quinn_udp::UdpSockRef::from(&probe)).unwrap();
        if state.max_gso_segments() <= 1 {
            // No UDP GSO in this kernel: ferry never asks for it.
            return;
        }
        for io_uring in MODES {
            let mut o = outbox(io_uring);
            let listening = bound("127.0.0.1");
            let c = bound("127.0.0.1");
            let data: Vec<u8> = (0..250u8).collect();
            let to = To::Client {
                addr: c.local_addr().unwrap(),
                src: None,
            };
            assert!(
                o.push(
                    to,
                    &[&data],
                    Some(100),
                    c.local_addr().unwrap(),
                    Direction::Down
                )
                .is_ok()
            );
            let sent = flush(&mut o, &listening);
            assert_eq!(
                (sent[0].result, sent[0].datagrams, sent[0].bytes),
                (Ok(()), 3, 250)
            );
            for chunk in data.chunks(100) {
                assert_eq!(recv(&c).0, chunk, "{io_uring}");
            }
        }
    }

    /// A send that fails (the server's port is closed: ICMP port unreachable) is reported
    /// as such, and the datagrams queued after it still go.
    #[tokio::test]
    async fn a_failed_send_is_reported_and_the_rest_go() {
        for io_uring in MODES {
            let mut o = outbox(io_uring);
            let listening = bound("127.0.0.1");
            let gone = bound("127.0.0.1");
            let s = session(&gone);
            drop(gone);
            let c = bound("127.0.0.1");
            let ca = c.local_addr().unwrap();
            // The first send goes; the ICMP error it draws fails the next.
            assert!(
                o.push(To::Server(s.clone()), &[b"1"], None, ca, Direction::Up)
                    .is_ok()
            );
            assert_eq!(flush(&mut o, &listening)[0].result, Ok(()));
            assert!(
                o.push(To::Server(s.clone()), &[b"2"], None, ca, Direction::Up)
                    .is_ok()
            );
            let to = To::Client {
                addr: ca,
                src: None,
            };
            assert!(o.push(to, &[b"still"], None, ca, Direction::Down).is_ok());
            let sent = flush(&mut o, &listening);
            assert_eq!(sent[0].result, Err(Dropped::SendFailed), "{io_uring}");
            assert_eq!(sent[1].result, Ok(()));
            assert_eq!(recv(&c).0, b"still");
        }
    }

    /// The outbox takes at most CAPACITY datagrams and ARENA bytes; what does not fit is
    /// given back, and fits once the outbox is flushed.
    #[tokio::test]
    async fn a_full_outbox_gives_the_datagram_back() {
        for io_uring in MODES {
            let mut o = outbox(io_uring);
            let listening = bound("127.0.0.1");
            let sink = bound("127.0.0.1");
            let to = || To::Client {
                addr: sink.local_addr().unwrap(),
                src: None,
            };
            let a = sink.local_addr().unwrap();
            for _ in 0..CAPACITY {
                assert!(o.push(to(), &[b"x"], None, a, Direction::Down).is_ok());
            }
            assert!(o.push(to(), &[b"x"], None, a, Direction::Down).is_err());
            assert_eq!(flush(&mut o, &listening).len(), CAPACITY);
            let big = vec![7u8; 65_000];
            for _ in 0..ARENA / big.len() {
                assert!(o.push(to(), &[&big], None, a, Direction::Down).is_ok());
            }
            assert!(o.push(to(), &[&big], None, a, Direction::Down).is_err());
            let sent = flush(&mut o, &listening);
            assert!(sent.iter().all(|s| s.result.is_ok()), "{io_uring}");
            assert!(o.push(to(), &[&big], None, a, Direction::Down).is_ok());
        }
    }
}
