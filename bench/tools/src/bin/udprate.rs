//! UDP datagram load against an echo server (bench/tools `udpecho`), directly or through a
//! UDP proxy: many client sockets, each from its own address (source port, and source
//! addresses spread over 127.0.0.2-127.0.0.9 for a loopback target), each keeping at most
//! `--window` datagrams outstanding. A datagram is answered when its echo comes back; only
//! then does its socket send the next one: a closed loop, so the rate is what the path
//! sustains, not what the client can push. A socket starts with one datagram outstanding
//! and opens its window by one with each echo (no start-up burst).
//!
//! Every datagram carries the socket's id and a sequence number and the rest is a
//! per-socket byte pattern; an echo counts as received only if it is the right size, to
//! the right socket, with a sequence number still outstanding and the pattern intact. A
//! datagram not echoed within `--timeout-ms` is lost (its window slot is reused); an echo
//! that comes after that is "late" (counted lost, not received).
//!
//! Plain threads (`--threads`), each owning a share of the sockets, non-blocking, with
//! epoll, recvmmsg and sendmmsg. After `--duration` seconds no more datagrams are sent,
//! the outstanding ones are waited for (at most the timeout), and one JSON line is printed:
//! sent, received, lost, late, bad, datagrams/s (echoes received per second, from the
//! start to the last echo), the round-trip latency and the CPU seconds udprate used.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use clap::Parser;
use ferry_bench_tools::{json_str, parse_sources, raise_nofile, udp_socket, UdpSocketOpts};

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Measure UDP datagrams/s (closed loop, bounded window per socket) against an echo server"
)]
struct Args {
    /// The echo server, or the UDP proxy in front of it.
    #[arg(long)]
    target: SocketAddr,
    /// Client sockets (each its own source address and port: one proxy session each).
    #[arg(long, default_value_t = 256)]
    sockets: usize,
    /// Source addresses: "auto" (127.0.0.2-127.0.0.9 for a loopback target), "none", or a
    /// list like 127.0.0.2,127.0.0.3 or 127.0.0.2-127.0.0.9. Sockets go round-robin.
    #[arg(long, default_value = "auto")]
    sources: String,
    /// Payload bytes per datagram (at least 12: socket id and sequence number).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Datagrams outstanding per socket at most.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Sending time in seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// A datagram not echoed within this many milliseconds is lost.
    #[arg(long, default_value_t = 200)]
    timeout_ms: u64,
    /// Threads (the sockets are split between them).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Socket receive and send buffer size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    buffer: usize,
}

const HEADER: usize = 12; // u32 socket id, u64 sequence number (little endian)
const BATCH: usize = 64; // datagrams per recvmmsg at most
const HIST_US: usize = 100_000; // latency histogram: 1 µs buckets up to 100 ms

struct Sock {
    sock: std::net::UdpSocket,
    id: u32,
    next_seq: u64,
    /// Outstanding datagrams (sequence number, send time), oldest first.
    out: VecDeque<(u64, Instant)>,
    /// Current window (1 at first, +1 per echo, at most --window).
    cwnd: usize,
    /// The payload with the socket's pattern (the header is written per datagram).
    template: Vec<u8>,
}

#[derive(Default)]
struct Stats {
    sent: u64,
    received: u64,
    lost: u64,
    late: u64,
    bad: u64,
    errors: u64,
    first_error: Option<String>,
    hist: Vec<u32>,
    over: Vec<u64>, // latencies above the histogram's range, in µs
    last_recv: Option<Instant>,
}

impl Stats {
    fn error(&mut self, what: &str, e: &io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {e}"));
        }
    }
}

fn pattern(id: u32, size: usize) -> Vec<u8> {
    (0..size)
        .map(|i| ((i as u32).wrapping_mul(31).wrapping_add(id.wrapping_mul(7)) % 251) as u8)
        .collect()
}

struct Worker {
    socks: Vec<Sock>,
    args: Args,
    epfd: RawFd,
    stats: Stats,
    // scratch for sendmmsg / recvmmsg
    sbuf: Vec<u8>,
    rbuf: Vec<u8>,
    rslot: usize,
}

impl Worker {
    /// Send on socket `i` until its window is full; false if the kernel refused some
    /// (EAGAIN: try again later).
    fn refill(&mut self, i: usize, now: Instant) -> bool {
        let size = self.args.size;
        let s = &mut self.socks[i];
        let k = s.cwnd.saturating_sub(s.out.len());
        if k == 0 {
            return true;
        }
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(k);
        for j in 0..k {
            let b = &mut self.sbuf[j * size..(j + 1) * size];
            b.copy_from_slice(&s.template);
            b[0..4].copy_from_slice(&s.id.to_le_bytes());
            b[4..12].copy_from_slice(&(s.next_seq + j as u64).to_le_bytes());
            iovs.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: size,
            });
        }
        // SAFETY: all-zero mmsghdrs (no name: the socket is connected) pointing at iovs.
        let mut hdrs: Vec<libc::mmsghdr> = (0..k)
            .map(|j| {
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = &mut iovs[j];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let mut off = 0;
        while off < k {
            // SAFETY: valid fd; hdrs[off..] are k - off initialised mmsghdrs.
            let m = unsafe {
                libc::sendmmsg(
                    s.sock.as_raw_fd(),
                    hdrs[off..].as_mut_ptr(),
                    (k - off) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if m < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::ENOBUFS) => return false,
                    Some(libc::EINTR) => continue,
                    _ => {
                        // ECONNREFUSED (an ICMP error from an earlier datagram) and the like:
                        // counted; the datagram is not sent.
                        self.stats.error("send", &e);
                        return false;
                    }
                }
            }
            for _ in 0..m {
                s.out.push_back((s.next_seq, now));
                s.next_seq += 1;
                self.stats.sent += 1;
            }
            off += m as usize;
        }
        true
    }

    /// Receive every echo waiting on socket `i`; true if any slot was freed.
    fn drain(&mut self, i: usize) -> bool {
        let size = self.args.size;
        let slot = self.rslot;
        let fd = self.socks[i].sock.as_raw_fd();
        let mut freed = false;
        loop {
            let mut iovs: Vec<libc::iovec> = (0..BATCH)
                .map(|j| libc::iovec {
                    iov_base: self.rbuf[j * slot..].as_mut_ptr().cast(),
                    iov_len: slot,
                })
                .collect();
            let mut hdrs: Vec<libc::mmsghdr> = (0..BATCH)
                .map(|j| {
                    // SAFETY: all-zero is a valid mmsghdr; the iovec lives until the call ends.
                    let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    h.msg_hdr.msg_iov = &mut iovs[j];
                    h.msg_hdr.msg_iovlen = 1;
                    h
                })
                .collect();
            // SAFETY: valid fd; BATCH mmsghdrs whose buffers are `slot` bytes of rbuf each.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    BATCH as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => {
                        // ECONNREFUSED etc.: the pending error is consumed; go on reading.
                        self.stats.error("recv", &e);
                        if self.stats.errors > 1_000_000 {
                            break;
                        }
                        continue;
                    }
                }
            }
            let n = n as usize;
            let now = Instant::now();
            for j in 0..n {
                let len = hdrs[j].msg_len as usize;
                let trunc = hdrs[j].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
                let d = &self.rbuf[j * slot..j * slot + len.min(slot)];
                let s = &mut self.socks[i];
                if trunc || len != size {
                    self.stats.bad += 1;
                    continue;
                }
                let id = u32::from_le_bytes(d[0..4].try_into().unwrap());
                let seq = u64::from_le_bytes(d[4..12].try_into().unwrap());
                if id != s.id {
                    self.stats.bad += 1;
                    continue;
                }
                let pos = if s.out.front().map(|x| x.0) == Some(seq) {
                    Some(0)
                } else {
                    s.out.iter().position(|x| x.0 == seq)
                };
                let Some(pos) = pos else {
                    if seq < s.next_seq {
                        self.stats.late += 1; // timed out before, or a duplicate
                    } else {
                        self.stats.bad += 1;
                    }
                    continue;
                };
                let (_, sent_at) = s.out.remove(pos).unwrap();
                freed = true;
                if d[HEADER..] != s.template[HEADER..] {
                    self.stats.bad += 1;
                    continue;
                }
                self.stats.received += 1;
                self.stats.last_recv = Some(now);
                if s.cwnd < self.args.window {
                    s.cwnd += 1;
                }
                let us = now.duration_since(sent_at).as_micros() as u64;
                if (us as usize) < HIST_US {
                    self.stats.hist[us as usize] += 1;
                } else {
                    self.stats.over.push(us);
                }
            }
            if n < BATCH {
                break;
            }
        }
        freed
    }

    fn run(mut self, start: Instant, deadline: Instant) -> Stats {
        let timeout = Duration::from_millis(self.args.timeout_ms);
        let hard_end = deadline + timeout + Duration::from_millis(500);
        let n = self.socks.len();
        let mut dirty: Vec<usize> = (0..n).collect(); // sockets whose window may have room
        let mut is_dirty = vec![true; n];
        let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut next_sweep = start;
        loop {
            let now = Instant::now();
            let sending = now < deadline;
            if !sending {
                if self.socks.iter().all(|s| s.out.is_empty()) || now >= hard_end {
                    break;
                }
            } else {
                let mut still = Vec::new();
                for &i in &dirty {
                    if self.refill(i, now) {
                        is_dirty[i] = false;
                    } else {
                        still.push(i);
                    }
                }
                dirty = still;
            }
            // Short waits while some socket could not send (EAGAIN), else up to 5 ms.
            let wait_ms = if !dirty.is_empty() { 0 } else { 5 };
            // SAFETY: valid epoll fd and a buffer of events.len() events.
            let got = unsafe {
                libc::epoll_wait(
                    self.epfd,
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    wait_ms,
                )
            };
            if got < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    self.stats.error("epoll_wait", &e);
                    break;
                }
                continue;
            }
            for k in 0..got as usize {
                let i = events[k].u64 as usize;
                if self.drain(i) && !is_dirty[i] {
                    is_dirty[i] = true;
                    dirty.push(i);
                }
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + Duration::from_millis(5);
                for i in 0..n {
                    let s = &mut self.socks[i];
                    let mut expired = false;
                    while let Some(&(_, t)) = s.out.front() {
                        if now.duration_since(t) < timeout {
                            break;
                        }
                        s.out.pop_front();
                        self.stats.lost += 1;
                        expired = true;
                    }
                    if expired && !is_dirty[i] {
                        is_dirty[i] = true;
                        dirty.push(i);
                    }
                }
            }
        }
        // Whatever is still outstanding at the hard end is lost.
        for s in &self.socks {
            self.stats.lost += s.out.len() as u64;
        }
        // SAFETY: our epoll fd, closed once.
        unsafe { libc::close(self.epfd) };
        self.stats
    }
}

fn main() {
    let args = Args::parse();
    let _ = raise_nofile();
    let sources = match parse_sources(&args.sources, args.target) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("udprate: --sources: {e}");
            std::process::exit(2);
        }
    };
    if !(args.duration > 0.0 && args.duration < 3600.0)
        || args.sockets == 0
        || args.window == 0
        || args.size < HEADER
        || args.size > 65_000
        || args.threads == 0
    {
        eprintln!("udprate: need 0 < --duration < 3600, --sockets > 0, --window > 0, 12 <= --size <= 65000, --threads > 0");
        std::process::exit(2);
    }
    let threads = args.threads.min(args.sockets);
    let opts = UdpSocketOpts {
        buffer: Some(args.buffer),
        nonblocking: true,
        ..Default::default()
    };
    // All sockets first (a failure ends the run before any datagram is sent).
    let mut per_thread: Vec<Vec<Sock>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..args.sockets {
        let bind = sources
            .get(i % sources.len().max(1))
            .map(|ip: &IpAddr| SocketAddr::new(*ip, 0))
            .or(Some(SocketAddr::new(
                if args.target.is_ipv4() {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                },
                0,
            )));
        let sock = match udp_socket(bind, Some(args.target), &opts) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("udprate: socket {i} ({bind:?} -> {}): {e}", args.target);
                std::process::exit(1);
            }
        };
        let id = i as u32;
        per_thread[i % threads].push(Sock {
            sock,
            id,
            next_seq: 0,
            out: VecDeque::with_capacity(args.window),
            cwnd: 1,
            template: pattern(id, args.size),
        });
    }
    let mut workers = Vec::new();
    for socks in per_thread {
        // SAFETY: plain epoll_create1 call.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            eprintln!("udprate: epoll_create1: {}", io::Error::last_os_error());
            std::process::exit(1);
        }
        for (k, s) in socks.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: k as u64,
            };
            // SAFETY: valid epoll fd and socket fd; ev is a valid event.
            if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, s.sock.as_raw_fd(), &mut ev) }
                != 0
            {
                eprintln!("udprate: epoll_ctl: {}", io::Error::last_os_error());
                std::process::exit(1);
            }
        }
        let slot = (args.size + 64).max(2048);
        workers.push(Worker {
            socks,
            args: args.clone(),
            epfd,
            stats: Stats {
                hist: vec![0; HIST_US],
                ..Default::default()
            },
            sbuf: vec![0; args.window * args.size],
            rbuf: vec![0; BATCH * slot],
            rslot: slot,
        });
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.duration);
    let handles: Vec<_> = workers
        .into_iter()
        .map(|w| std::thread::spawn(move || w.run(start, deadline)))
        .collect();
    let mut total = Stats {
        hist: vec![0; HIST_US],
        ..Default::default()
    };
    for h in handles {
        let s = match h.join() {
            Ok(s) => s,
            Err(_) => {
                eprintln!("udprate: a worker thread panicked");
                std::process::exit(1);
            }
        };
        total.sent += s.sent;
        total.received += s.received;
        total.lost += s.lost;
        total.late += s.late;
        total.bad += s.bad;
        total.errors += s.errors;
        if total.first_error.is_none() {
            total.first_error = s.first_error;
        }
        for (a, b) in total.hist.iter_mut().zip(&s.hist) {
            *a += b;
        }
        total.over.extend(s.over);
        total.last_recv = match (total.last_recv, s.last_recv) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    let elapsed = total
        .last_recv
        .map(|t| t.duration_since(start).as_secs_f64())
        .unwrap_or(args.duration)
        .max(1e-6);
    total.over.sort_unstable();
    let count = total.received;
    let q = |p: f64| -> u64 {
        if count == 0 {
            return 0;
        }
        let want = ((count - 1) as f64 * p).round() as u64 + 1;
        let mut acc = 0u64;
        for (us, &c) in total.hist.iter().enumerate() {
            acc += c as u64;
            if acc >= want {
                return us as u64;
            }
        }
        let k = (want - acc - 1) as usize;
        total.over.get(k).copied().unwrap_or(HIST_US as u64)
    };
    let max = total
        .over
        .last()
        .copied()
        .unwrap_or_else(|| total.hist.iter().rposition(|&c| c > 0).unwrap_or(0) as u64);
    let fe = total
        .first_error
        .as_deref()
        .map(json_str)
        .unwrap_or_else(|| "null".into());
    let cpu = cpu_seconds();
    println!(
        "{{\"target\":{},\"sockets\":{},\"sources\":{},\"threads\":{},\"size\":{},\"window\":{},\"timeout_ms\":{},\"duration_s\":{:.3},\"elapsed_s\":{:.3},\"sent\":{},\"received\":{},\"lost\":{},\"late\":{},\"bad\":{},\"errors\":{},\"rate_per_s\":{:.1},\"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"max\":{}}},\"first_error\":{},\"cpu_s\":{:.3}}}",
        json_str(&args.target.to_string()),
        args.sockets,
        sources.len(),
        threads,
        args.size,
        args.window,
        args.timeout_ms,
        args.duration,
        elapsed,
        total.sent,
        total.received,
        total.lost,
        total.late,
        total.bad,
        total.errors,
        total.received as f64 / elapsed,
        q(0.5),
        q(0.9),
        q(0.99),
        max,
        fe,
        cpu
    );
}

/// CPU seconds (user and system) this process has used: the load generator's own share
/// of the machine, so that a run can say what the client cost per datagram.
fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers, for which all zeroes is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(ru.ru_utime) + secs(ru.ru_stime)
}
