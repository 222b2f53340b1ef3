//! Datagrams a listening socket's worker is to send, gathered and sent together.
//!
//! Each datagram ferry passes on wakes whoever waits for it, and a woken process may take
//! the CPU as the send returns: a send per system call means a wake-up and often a context
//! switch per datagram. So the datagrams of one round of a worker (a batch read from the
//! listening socket, the replies of every session that had one) are queued here, copied
//! into one arena, and sent in one call: one `io_uring_enter` with a `sendmsg` per datagram
//! whatever socket it leaves from (each session's connected socket, the listening socket),
//! or where io_uring is not available (the kernel is older, or a seccomp profile or
//! `kernel.io_uring_disabled` refuses it), one `sendmmsg` per socket. Either way every send
//! is `MSG_DONTWAIT`: a datagram the socket cannot take now is dropped (as a router would),
//! never waited for, so the sends are done when the call returns and nothing outlives it.

#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use io_uring::{IoUring, opcode, types};

use super::{Direction, Dropped, Socket, segments, sent};

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
    Server(Arc<Socket>),
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
struct Control([u8; CONTROL]);

/// The system calls' view of the queue, rebuilt for each flush (raw pointers into the
/// arena and the vectors beside them, valid only during the flush).
struct Headers {
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<socket2::SockAddr>,
    control: Vec<Control>,
    results: Vec<i32>,
    /// `sendmmsg`: the datagrams by socket, and their headers in that order.
    order: Vec<usize>,
    batch: Vec<libc::mmsghdr>,
}

impl Headers {
    fn new() -> Headers {
        let unspecified = socket2::SockAddr::from(SocketAddr::from(([0, 0, 0, 0], 0)));
        Headers {
            // SAFETY: all-zero is a valid mmsghdr and iovec (null pointers, zero lengths).
            hdrs: vec![unsafe { mem::zeroed() }; CAPACITY],
            iovs: vec![unsafe { mem::zeroed() }; CAPACITY],
            names: vec![unspecified; CAPACITY],
            control: vec![Control([0; CONTROL]); CAPACITY],
            results: vec![0; CAPACITY],
            order: Vec::with_capacity(CAPACITY),
            batch: Vec::with_capacity(CAPACITY),
        }
    }
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
        Outbox {
            ring,
            arena: vec![0; ARENA].into_boxed_slice(),
            used: 0,
            queued: Vec::with_capacity(CAPACITY),
            headers: Headers::new(),
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
        let ring = match self.ring.as_mut() {
            Some(ring) => submit(ring, &self.queued, &mut self.headers, fds),
            None => Ring::NotSubmitted,
        };
        match ring {
            Ring::Sent => {}
            Ring::NotSubmitted => {
                // Nothing reached the kernel: the entries die with the ring.
                if self.ring.take().is_some() {
                    tracing::warn!(
                        "io_uring refused UDP sends: they are sent with sendmmsg from now on"
                    );
                }
                send_by_socket(&self.queued, &mut self.headers, fds);
            }
            Ring::Broken => {
                // Some sends may still be in the kernel, pointing at the arena and the
                // headers: those are left to them (never freed or reused), and what has no
                // result is reported failed rather than sent twice.
                tracing::error!(
                    "io_uring lost track of UDP sends: they are sent with sendmmsg from now on"
                );
                mem::forget(self.ring.take());
                mem::forget(mem::replace(&mut self.headers, Headers::new()));
                mem::forget(mem::replace(
                    &mut self.arena,
                    vec![0; ARENA].into_boxed_slice(),
                ));
            }
        }
        for (q, &r) in self.queued.drain(..).zip(&self.headers.results) {
            let result = match r {
                0.. => Ok(()),
                PENDING => Err(Dropped::SendFailed),
                _ => {
                    // The device cannot segment (EIO), or the segments are larger than the
                    // route's MTU (EINVAL): no more GSO sends from this socket.
                    if (r == -libc::EIO || r == -libc::EINVAL) && q.segment.is_some() {
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
        // Pointers taken once: what the headers point at is written through them only.
        let arena = self.arena.as_mut_ptr();
        let iovs = h.iovs.as_mut_ptr();
        let names = h.names.as_mut_ptr();
        let control = h.control.as_mut_ptr();
        for (i, q) in self.queued.iter().enumerate() {
            // SAFETY: i < CAPACITY, the length of every vector of `h`; start + len is within
            // the arena (`push` checked). SockAddr has no drop glue, so overwriting one with
            // `write` loses nothing.
            let (iov, name, ctrl) = unsafe {
                let iov = iovs.add(i);
                iov.write(libc::iovec {
                    iov_base: arena.add(q.start).cast(),
                    iov_len: q.len,
                });
                let ctrl = control.add(i);
                ctrl.write(Control([0; CONTROL]));
                (iov, names.add(i), ctrl)
            };
            // SAFETY: all-zero is a valid msghdr.
            let mut m: libc::msghdr = unsafe { mem::zeroed() };
            m.msg_iov = iov;
            m.msg_iovlen = 1;
            let src = match &q.to {
                To::Client { addr, src } => {
                    let a = socket2::SockAddr::from(*addr);
                    m.msg_namelen = a.len();
                    // SAFETY: `name` is element i of `names` (above).
                    unsafe { name.write(a) };
                    m.msg_name = name.cast();
                    *src
                }
                To::Server(_) => None,
            };
            m.msg_control = ctrl.cast();
            m.msg_controllen = CONTROL;
            let mut used = 0;
            // SAFETY: `m` points at a zeroed 8-aligned buffer of CONTROL bytes, room for
            // both messages (checked at compile time below); CMSG_FIRSTHDR/NXTHDR return
            // null past it, which `put` checks.
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

/// Bytes of control messages a datagram has room for.
const CONTROL: usize = 64;

// The segment size and an IPv6 source address (the larger of the two) fit.
const _: () = assert!(
    unsafe {
        libc::CMSG_SPACE(mem::size_of::<u16>() as u32)
            + libc::CMSG_SPACE(mem::size_of::<libc::in6_pktinfo>() as u32)
    } as usize
        <= CONTROL
);

/// Writes one control message at `*c` and moves `*c` to the next; its space, or 0 if there
/// was no room (which the size check above rules out).
///
/// # Safety
/// `m.msg_control`/`msg_controllen` must describe a writable, zeroed, 8-aligned buffer and
/// `*c` be null or a header within it (from `CMSG_FIRSTHDR`/`CMSG_NXTHDR` of `m`).
unsafe fn put<T: Copy>(
    c: &mut *mut libc::cmsghdr,
    m: &libc::msghdr,
    level: i32,
    kind: i32,
    value: T,
) -> usize {
    let len = mem::size_of::<T>() as u32;
    // SAFETY: per the contract, `*c` is a header within the buffer; the data fits, checked
    // against the buffer's end before writing.
    unsafe {
        let end = m.msg_control.cast::<u8>().add(m.msg_controllen);
        if c.is_null() || c.cast::<u8>().add(libc::CMSG_SPACE(len) as usize) > end {
            debug_assert!(false, "no room for a control message");
            return 0;
        }
        (**c).cmsg_level = level;
        (**c).cmsg_type = kind;
        (**c).cmsg_len = libc::CMSG_LEN(len) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(*c).cast::<T>(), value);
        *c = libc::CMSG_NXTHDR(m, *c);
        libc::CMSG_SPACE(len) as usize
    }
}

/// How a flush through the ring went.
enum Ring {
    /// Every send has its result.
    Sent,
    /// None reached the kernel.
    NotSubmitted,
    /// Some reached the kernel and not all have a result.
    Broken,
}

/// Sends the queue through the ring: a `sendmsg` entry per datagram, submitted and
/// completed in one call (`MSG_DONTWAIT`: each completes as it is issued, or fails with
/// EAGAIN; none waits for room in its socket).
fn submit(
    ring: &mut IoUring,
    queued: &[Queued],
    h: &mut Headers,
    fd: impl Fn(&Queued) -> RawFd,
) -> Ring {
    let n = queued.len();
    {
        let mut sq = ring.submission();
        for (i, q) in queued.iter().enumerate() {
            let e = opcode::SendMsg::new(types::Fd(fd(q)), &h.hdrs[i].msg_hdr)
                .flags(libc::MSG_DONTWAIT as u32)
                .build()
                .user_data(i as u64);
            // SAFETY: the msghdr and everything it points at live until every entry has
            // completed, which this waits for; if that fails, the caller leaves them to
            // the kernel.
            if unsafe { sq.push(&e) }.is_err() {
                return Ring::NotSubmitted;
            }
        }
    }
    let (mut got, mut submitted) = (0, 0);
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
            return Ring::Sent;
        }
        match r {
            Ok(k) => submitted += k,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(_) => break,
        }
    }
    if submitted == 0 && got == 0 {
        Ring::NotSubmitted
    } else {
        Ring::Broken
    }
}

/// Sends what has no result yet with one `sendmmsg` per socket (its datagrams in the order
/// queued); a failed datagram is reported and the socket's others go on after it.
fn send_by_socket(queued: &[Queued], h: &mut Headers, fd: impl Fn(&Queued) -> RawFd) {
    h.order.clear();
    h.order
        .extend((0..queued.len()).filter(|&i| h.results[i] == PENDING));
    // Stable: each socket's datagrams stay in order.
    h.order.sort_by_key(|&i| fd(&queued[i]));
    let mut a = 0;
    while a < h.order.len() {
        let sock = fd(&queued[h.order[a]]);
        let mut b = a + 1;
        while b < h.order.len() && fd(&queued[h.order[b]]) == sock {
            b += 1;
        }
        h.batch.clear();
        h.batch.extend(h.order[a..b].iter().map(|&i| h.hdrs[i]));
        let mut i = 0;
        while i < h.batch.len() {
            // SAFETY: batch[i..] are copies of headers pointing at live buffers, addresses
            // and control messages (`prepare`).
            let r = unsafe {
                libc::sendmmsg(
                    sock,
                    h.batch[i..].as_mut_ptr(),
                    (h.batch.len() - i) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            match usize::try_from(r) {
                Ok(k) if k > 0 => {
                    for j in i..(i + k).min(h.batch.len()) {
                        h.results[h.order[a + j]] = 0;
                    }
                    i += k;
                }
                // The next datagram failed: it is reported, the rest go on.
                _ => {
                    let e = io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO);
                    h.results[h.order[a + i]] = -if r == 0 { libc::EAGAIN } else { e };
                    i += 1;
                }
            }
        }
        a = b;
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::net::UdpSocket as StdUdp;
    use std::time::Duration;

    /// Through io_uring, then with sendmmsg.
    const MODES: [bool; 2] = [true, false];

    /// Whether this kernel lets ferry have a ring (else the io_uring runs are skipped).
    pub(crate) fn io_uring_available() -> bool {
        IoUring::new(2).is_ok()
    }

    /// An outbox sending as asked, or None (said on stderr) where io_uring is refused.
    fn outbox(io_uring: bool) -> Option<Outbox> {
        if io_uring && !io_uring_available() {
            eprintln!("io_uring is refused here: only the sendmmsg runs are tested");
            return None;
        }
        let o = Outbox::new(io_uring);
        assert_eq!(o.uses_io_uring(), io_uring);
        Some(o)
    }

    fn bound(ip: &str) -> StdUdp {
        let s = StdUdp::bind((ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// A session's socket connected to `to`.
    fn session(to: &StdUdp) -> Arc<Socket> {
        let s = StdUdp::bind("127.0.0.1:0").unwrap();
        s.connect(to.local_addr().unwrap()).unwrap();
        s.set_nonblocking(true).unwrap();
        Arc::new(crate::net::register_readable(s).unwrap())
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
            let Some(mut o) = outbox(io_uring) else {
                continue;
            };
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
                    assert_eq!(from, sessions[k].get_ref().local_addr().unwrap());
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
                let Some(mut o) = outbox(io_uring) else {
                    continue;
                };
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
            for (any, src) in [("127.0.0.1", None), ("0.0.0.0", Some("127.0.0.5"))] {
                let Some(mut o) = outbox(io_uring) else {
                    continue;
                };
                let listening = bound(any);
                let c = bound("127.0.0.1");
                let data: Vec<u8> = (0..250u8).collect();
                let src: Option<IpAddr> = src.map(|s| s.parse().unwrap());
                let a = c.local_addr().unwrap();
                let to = To::Client { addr: a, src };
                assert!(o.push(to, &[&data], Some(100), a, Direction::Down).is_ok());
                let sent = flush(&mut o, &listening);
                let s = &sent[0];
                assert_eq!((s.result, s.datagrams, s.bytes), (Ok(()), 3, 250));
                let port = listening.local_addr().unwrap().port();
                let from = SocketAddr::new(src.unwrap_or([127, 0, 0, 1].into()), port);
                for chunk in data.chunks(100) {
                    assert_eq!(recv(&c), (chunk.to_vec(), from), "{io_uring} {any}");
                }
            }
            // More segments than the kernel takes in one send (EINVAL): reported failed,
            // and the outbox says so (its socket sends no more GSO).
            let Some(mut o) = outbox(io_uring) else {
                continue;
            };
            let listening = bound("127.0.0.1");
            let a = listening.local_addr().unwrap();
            assert!(!o.gso_failed());
            let to = To::Client { addr: a, src: None };
            assert!(
                o.push(to, &[&[0u8; 1000]], Some(1), a, Direction::Down)
                    .is_ok()
            );
            let sent = flush(&mut o, &listening);
            assert_eq!(sent[0].result, Err(Dropped::SendFailed), "{io_uring}");
            assert!(o.gso_failed());
        }
    }

    /// A send that fails (the server's port is closed: ICMP port unreachable) is reported
    /// as such, and the datagrams queued after it still go.
    #[tokio::test]
    async fn a_failed_send_is_reported_and_the_rest_go() {
        for io_uring in MODES {
            let Some(mut o) = outbox(io_uring) else {
                continue;
            };
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
            // The socket's next datagram fails; the one after it, and the client's, go.
            for d in [b"2", b"3"] {
                let to = To::Server(s.clone());
                assert!(o.push(to, &[d], None, ca, Direction::Up).is_ok());
            }
            let to = To::Client {
                addr: ca,
                src: None,
            };
            assert!(o.push(to, &[b"still"], None, ca, Direction::Down).is_ok());
            let sent = flush(&mut o, &listening);
            let results: Vec<_> = sent.iter().map(|s| s.result).collect();
            let expect = [Err(Dropped::SendFailed), Ok(()), Ok(())];
            assert_eq!(results, expect, "{io_uring}");
            assert_eq!(recv(&c).0, b"still");
        }
    }

    /// The outbox takes at most CAPACITY datagrams and ARENA bytes; what does not fit is
    /// given back, and fits once the outbox is flushed.
    #[tokio::test]
    async fn a_full_outbox_gives_the_datagram_back() {
        for io_uring in MODES {
            let Some(mut o) = outbox(io_uring) else {
                continue;
            };
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
