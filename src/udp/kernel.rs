//! The in-kernel path for established UDP sessions.
//!
//! Once a session has had its first reply, the kernel can relay the rest of its datagrams
//! itself: a TC program (`bpf/udp_kernel.bpf.c`), attached to the ingress of every
//! interface with Ethernet headers (and of each one added later: `links.rs` hears of
//! them, on a thread of its own), rewrites a datagram from the client to the listener as the session's socket
//! would send it to the server, and a reply from the server to that socket as the
//! listening socket would send it to the client, and sends it on. Neither passes through
//! ferry's sockets, nor wakes a worker. Each session's two entries in the program's map
//! (`FLOWS`, or `FLOWS6`) hold the rewrite and its counts (datagrams, bytes, when the last was seen);
//! the session's task reads them for its idle timeout and the metrics, and removes them
//! when it ends, reading their last counts in the same step.
//!
//! IPv4 sessions have one map, IPv6 sessions another (`FLOWS6`); a session whose client
//! and server are of different families stays on the sockets, as no datagram is both.
//! What the program does not match goes on untouched to the sockets, which relay it as
//! before: IP fragments, datagrams with IPv4 options or IPv6 extension headers, and a
//! datagram that would arrive for this host on an interface other than loopback (the
//! stack drops a datagram from a local address arriving there).
//!
//! Loaded once per process, if the build had clang (`ferry_bpf`) and the process may
//! (CAP_BPF and CAP_NET_ADMIN, or root), on Linux 6.6 or later: the program is attached
//! through TCX links only, which go when the process does, even if it is killed.
//!
//! This module holds the `unsafe` of the map's system calls.
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};

#[cfg(ferry_bpf)]
use super::links::{Link, Links};

/// A datagram's source and destination, as on the wire (network byte order): the
/// program's `struct flow` (IPv4) or `struct flow6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    V4(Flow4),
    V6(Flow6),
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow4 {
    src_ip: u32,
    dst_ip: u32,
    src_port: u16,
    dst_port: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow6 {
    src_ip: [u32; 4],
    dst_ip: [u32; 4],
    src_port: u16,
    dst_port: u16,
}

impl Flow {
    /// `src` → `dst`, as their datagrams are on the wire: IPv4 when both are (an
    /// IPv4-mapped address is an IPv4 datagram's), IPv6 when both are; `None` for one of
    /// each, which no one datagram has.
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Option<Flow> {
        let (src_port, dst_port) = (src.port().to_be(), dst.port().to_be());
        match (src.ip().to_canonical(), dst.ip().to_canonical()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Some(Flow::V4(Flow4 {
                src_ip: u32::from_ne_bytes(s.octets()),
                dst_ip: u32::from_ne_bytes(d.octets()),
                src_port,
                dst_port,
            })),
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let words = |a: std::net::Ipv6Addr| {
                    let o = a.octets();
                    std::array::from_fn(|i| {
                        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
                    })
                };
                Some(Flow::V6(Flow6 {
                    src_ip: words(s),
                    dst_ip: words(d),
                    src_port,
                    dst_port,
                }))
            }
            _ => None,
        }
    }
}

/// An entry's counts: the program's `struct tally`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub datagrams: u64,
    pub bytes: u64,
    /// `CLOCK_MONOTONIC` of the last one, in nanoseconds; 0: none yet.
    pub last_ns: u64,
}

/// What a matching datagram becomes, and its counts.
#[derive(Debug, Clone, Copy)]
pub struct Rewrite {
    to: Flow,
    /// The interface it leaves by; 1 (loopback): passed up the local stack.
    ifindex: u32,
    /// Its listener's and direction's entry in `COUNTS`.
    counts: u32,
    /// The interface such datagrams come in on (on any other they are not matched).
    from_ifindex: u32,
}

impl Rewrite {
    /// Datagrams that come in on `from_ifindex`: to `to`, out of `ifindex`, counted for
    /// `listener` (from [`Kernel::listener`]) in direction `way`.
    pub fn new(
        from_ifindex: u32,
        to: Flow,
        ifindex: u32,
        listener: u32,
        way: super::Direction,
    ) -> Rewrite {
        Rewrite {
            to,
            ifindex,
            counts: listener * 2 + u32::from(way == super::Direction::Down),
            from_ifindex,
        }
    }

    /// The program's value for it, with its flow type `F`.
    fn entry<F>(&self, to: F) -> Entry<F> {
        Entry {
            to,
            ifindex: self.ifindex,
            counts: self.counts,
            from_ifindex: self.from_ifindex,
            tally: Tally::default(),
        }
    }
}

/// A map's value: the program's `struct rewrite` (`F` = [`Flow4`]) or `struct rewrite6`
/// ([`Flow6`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Entry<F> {
    to: F,
    ifindex: u32,
    counts: u32,
    from_ifindex: u32,
    tally: Tally,
}

/// A listener's counts in the kernel, for its stats.
#[derive(Debug)]
pub struct ListenerCounts {
    pub kernel: std::sync::Arc<Kernel>,
    pub index: u32,
}

impl crate::observe::KernelCounts for ListenerCounts {
    fn index(&self) -> u32 {
        self.index
    }

    fn relayed(&self) -> [u64; 4] {
        self.kernel.relayed(self.index)
    }
}

/// Listeners the kernel keeps counts for (`COUNTS` has two entries each), over the
/// process's life.
const LISTENERS: u32 = 1024;

/// The loaded program, attached, and its map.
pub struct Kernel {
    /// `FLOWS`: IPv4 sessions' entries.
    map: OwnedFd,
    /// `FLOWS6`: IPv6 sessions'.
    map6: OwnedFd,
    /// `COUNTS`: per CPU, datagrams and bytes per listener and direction.
    counts: OwnedFd,
    /// CPUs the kernel may have (the length of a per-CPU value).
    cpus: usize,
    /// Listeners given an entry in `COUNTS` so far.
    listeners: std::sync::atomic::AtomicU32,
    /// The program and its links, kept up as interfaces come and go (`links.rs`; the
    /// thread that hears of them holds it weakly): dropping it detaches the program.
    #[cfg(ferry_bpf)]
    attached: std::sync::Arc<std::sync::Mutex<Attached>>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("interfaces", &self.interfaces())
            .finish_non_exhaustive()
    }
}

#[cfg(ferry_bpf)]
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/udp_kernel.o"));

impl Kernel {
    /// Loads the program and attaches it to the ingress of every interface with Ethernet
    /// headers there is now, and, from a thread of its own, of each one added later.
    #[cfg(ferry_bpf)]
    pub fn load() -> Result<Kernel, String> {
        use aya::programs::SchedClassifier;
        use std::os::fd::AsFd;

        let mut ebpf = aya::Ebpf::load(PROGRAM).map_err(|e| format!("loading: {e}"))?;
        let fd = |name: &str| match ebpf.map(name) {
            Some(aya::maps::Map::HashMap(m) | aya::maps::Map::PerCpuArray(m)) => m
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("the map {name}: {e}")),
            _ => Err(format!("the program has no map {name}")),
        };
        let (map, map6, counts) = (fd("FLOWS")?, fd("FLOWS6")?, fd("COUNTS")?);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| format!("counting CPUs: {e}"))?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or("the program is missing")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load().map_err(|e| format!("loading: {e}"))?;
        // Subscribed before the dump: an interface added meanwhile is heard of too.
        let mut links = Links::open().map_err(|e| format!("route netlink: {e}"))?;
        let mut attached = Attached {
            ebpf,
            links: std::collections::HashMap::new(),
            announce: false,
        };
        list(&mut links, &mut attached).map_err(|e| format!("listing interfaces: {e}"))?;
        if !attached.links.values().any(|(name, _)| name == "lo") {
            return Err("not attached to lo".into());
        }
        // The start's interfaces are logged together, by the caller.
        attached.announce = true;
        let attached = std::sync::Arc::new(std::sync::Mutex::new(attached));
        let weak = std::sync::Arc::downgrade(&attached);
        std::thread::Builder::new()
            .name("ferry-links".into())
            .spawn(move || watch(links, &weak))
            .map_err(|e| format!("starting its interface watch: {e}"))?;
        Ok(Kernel {
            map,
            map6,
            counts,
            cpus,
            listeners: std::sync::atomic::AtomicU32::new(0),
            attached,
        })
    }

    #[cfg(not(ferry_bpf))]
    pub fn load() -> Result<Kernel, String> {
        Err("built without it (no clang at build time)".into())
    }

    /// The interfaces the program is attached to now.
    pub fn interfaces(&self) -> Vec<String> {
        #[cfg(ferry_bpf)]
        {
            let a = self.attached.lock().unwrap_or_else(|e| e.into_inner());
            let mut names: Vec<String> = a.links.values().map(|(n, _)| n.clone()).collect();
            names.sort();
            names
        }
        #[cfg(not(ferry_bpf))]
        Vec::new()
    }

    /// An index for a listener's counts, or `None` once 1,024 listeners have had one.
    pub fn listener(&self) -> Option<u32> {
        use std::sync::atomic::Ordering::Relaxed;
        self.listeners
            .fetch_update(Relaxed, Relaxed, |n| (n < LISTENERS).then_some(n + 1))
            .ok()
    }

    /// What the kernel relayed for `listener` so far: (datagrams up, bytes up, datagrams
    /// down, bytes down).
    pub fn relayed(&self, listener: u32) -> [u64; 4] {
        let mut out = [0; 4];
        let mut per_cpu = vec![[0u64; 2]; self.cpus];
        for (i, way) in [(0, 0u32), (2, 1u32)] {
            let key = listener * 2 + way;
            // SAFETY: `COUNTS` has 4-byte keys and 16-byte values (`struct counts`), one
            // per possible CPU in a lookup: `per_cpu` is that long.
            let r = unsafe {
                elem(
                    &self.counts,
                    BPF_MAP_LOOKUP_ELEM,
                    (&raw const key).cast(),
                    per_cpu.as_mut_ptr().cast(),
                    0,
                )
            };
            if r.is_ok() {
                out[i] = per_cpu.iter().map(|c| c[0]).sum();
                out[i + 1] = per_cpu.iter().map(|c| c[1]).sum();
            }
        }
        out
    }

    /// Datagrams `from` are rewritten as `to` says from now on. Never over an entry there
    /// is already (`EEXIST`): each is its session's, and goes with it. `from` and `to`
    /// are of one family (else `EINVAL`).
    pub fn insert(&self, from: &Flow, to: &Rewrite) -> io::Result<()> {
        match (from, to.to) {
            (Flow::V4(f), Flow::V4(t)) => Self::insert_in(&self.map, f, &to.entry(t)),
            (Flow::V6(f), Flow::V6(t)) => Self::insert_in(&self.map6, f, &to.entry(t)),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    fn insert_in<F>(map: &OwnedFd, key: &F, value: &Entry<F>) -> io::Result<()> {
        // SAFETY: `map` is the one with `F` keys and `Entry<F>` values.
        unsafe {
            elem(
                map,
                BPF_MAP_UPDATE_ELEM,
                std::ptr::from_ref(key).cast(),
                std::ptr::from_ref(value).cast_mut().cast(),
                BPF_NOEXIST,
            )
        }
    }

    /// Removes `from`'s entry, with its last counts.
    pub fn take(&self, from: &Flow) -> io::Result<Tally> {
        self.lookup(BPF_MAP_LOOKUP_AND_DELETE_ELEM, from)
    }

    /// The counts of `from`'s entry so far.
    pub fn get(&self, from: &Flow) -> io::Result<Tally> {
        self.lookup(BPF_MAP_LOOKUP_ELEM, from)
    }

    /// `from`'s entry's counts, by a lookup command (`cmd`).
    fn lookup(&self, cmd: libc::c_long, from: &Flow) -> io::Result<Tally> {
        match from {
            Flow::V4(f) => Self::lookup_in(&self.map, cmd, f),
            Flow::V6(f) => Self::lookup_in(&self.map6, cmd, f),
        }
    }

    fn lookup_in<F: Default>(map: &OwnedFd, cmd: libc::c_long, key: &F) -> io::Result<Tally> {
        let mut e = Entry::<F>::default();
        // SAFETY: `map` is the one with `F` keys and `Entry<F>` values; `e` is written.
        unsafe {
            elem(
                map,
                cmd,
                std::ptr::from_ref(key).cast(),
                (&raw mut e).cast(),
                0,
            )?;
        }
        Ok(e.tally)
    }
}

/// A map element command on `map`.
///
/// # Safety
/// `key` must point to a key of the map's key size, and `value` to a value of its value
/// size (for a per-CPU map, one per possible CPU), writable for a lookup.
unsafe fn elem(
    map: &OwnedFd,
    cmd: libc::c_long,
    key: *const u8,
    value: *mut u8,
    flags: u64,
) -> io::Result<()> {
    let attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: `attr` is the kernel's `bpf_attr` layout for the map element commands; the
    // kernel reads the key, and reads (update) or writes (lookup) the value, only during
    // the call, within the sizes the caller vouches for.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw const attr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// An update that only adds.
const BPF_NOEXIST: u64 = 1;

/// `union bpf_attr` for the `BPF_MAP_*_ELEM` commands.
#[repr(C, align(8))]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[cfg(ferry_bpf)]
const PROGRAM_NAME: &str = "udp_kernel";

/// The index of the interface called `name` now.
#[cfg(ferry_bpf)]
fn index_of(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (i != 0).then_some(i)
}

/// The program, and the interfaces it is attached to.
#[cfg(ferry_bpf)]
struct Attached {
    ebpf: aya::Ebpf,
    /// By interface index: its name and its link.
    links: std::collections::HashMap<u32, (String, aya::programs::tc::SchedClassifierLinkId)>,
    /// Each interface attached is logged (after the start).
    announce: bool,
}

#[cfg(ferry_bpf)]
impl Attached {
    /// Attaches the program to the ingress of `link` if it is new and has Ethernet
    /// headers, or lets go of it if it is gone.
    fn apply(&mut self, link: &Link) {
        use aya::programs::SchedClassifier;
        use aya::programs::TcAttachType;
        use aya::programs::links::LinkOrder;
        use aya::programs::tc::TcAttachOptions;

        let Some(prog) = self.ebpf.program_mut(PROGRAM_NAME) else {
            return;
        };
        let Ok(prog): Result<&mut SchedClassifier, _> = prog.try_into() else {
            return;
        };
        if link.gone {
            if let Some((name, id)) = self.links.remove(&link.index) {
                // The kernel took the link with its interface; this closes its descriptor.
                let _ = prog.detach(id);
                tracing::info!(interface = %name, "UDP kernel path: interface gone");
            }
            return;
        }
        match self.links.get(&link.index) {
            // Changed (up, down, its MTU): attached already.
            Some((name, _)) if *name == link.name => return,
            // Renamed, or (after lost messages) another interface of the same index:
            // attached anew, to be sure.
            Some(_) => {
                if let Some((_, id)) = self.links.remove(&link.index) {
                    let _ = prog.detach(id);
                }
            }
            None => {}
        }
        if !link.ether {
            tracing::debug!(interface = %link.name, "UDP kernel path: no Ethernet headers, not attached");
            return;
        }
        // TCX links only (Linux 6.6): the kernel detaches them when the process ends,
        // however it ends. A filter left behind by a killed process would go on rewriting
        // its sessions' datagrams to sockets that are gone.
        let tcx = TcAttachOptions::TcxOrder(LinkOrder::default());
        match prog.attach_with_options(&link.name, TcAttachType::Ingress, tcx) {
            // The name found another interface (renamed meanwhile): the next message
            // about either says what to do.
            Ok(id) if index_of(&link.name) != Some(link.index) => {
                let _ = prog.detach(id);
            }
            Ok(id) => {
                if self.announce {
                    tracing::info!(interface = %link.name, "UDP kernel path attached");
                }
                self.links.insert(link.index, (link.name.clone(), id));
            }
            Err(e) => tracing::warn!(
                interface = %link.name,
                "UDP kernel path not attached; sessions through it relay through sockets: {e}"
            ),
        }
    }
}

/// The interfaces there are, each attached (the start's list), within 10 s.
#[cfg(ferry_bpf)]
fn list(links: &mut Links, attached: &mut Attached) -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    links.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let mut seq = links.dump()?;
    while std::time::Instant::now() < deadline {
        let r = match links.read() {
            Ok(r) => r,
            // A signal, or nothing yet: the deadline bounds it.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                continue;
            }
            // Lost: the list again (what was attached stays).
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                seq = links.dump()?;
                continue;
            }
            Err(e) => return Err(e),
        };
        for l in &r.links {
            attached.apply(l);
        }
        match r.end {
            Some((s, 0)) if s == seq => return links.set_read_timeout(None),
            Some((s, e)) if s == seq => return Err(io::Error::from_raw_os_error(-e)),
            _ => {}
        }
    }
    Err(io::Error::other("the interface list did not end in 10 s"))
}

/// Keeps the program attached to the interfaces there are, for as long as `attached` is
/// there: each one added gets it, each one gone is let go of. Messages lost (`ENOBUFS`)
/// are made up for by a new dump (one at a time), after which the interfaces it did not
/// list are let go of, if it was complete and consistent.
#[cfg(ferry_bpf)]
fn watch(mut links: Links, attached: &std::sync::Weak<std::sync::Mutex<Attached>>) {
    /// A dump under way after lost messages.
    struct Dump {
        seq: u32,
        /// The interfaces it listed so far.
        listed: std::collections::HashSet<u32>,
        /// Messages were lost, or the interfaces changed, while it ran: its list is not
        /// the whole truth, and another follows it.
        spoilt: bool,
    }
    let stop = |e: io::Error| {
        tracing::warn!("UDP kernel path: no longer follows interface changes: {e}");
    };
    let mut dump: Option<Dump> = None;
    let mut again = false;
    // Dumps in a row that did not give the whole list: bounded, so that a kernel that
    // keeps refusing is not asked for ever.
    let mut failed = 0u32;
    loop {
        if again && dump.is_none() {
            again = false;
            failed += 1;
            if failed > 100 {
                return stop(io::Error::other("100 interface lists in a row incomplete"));
            }
            match links.dump() {
                Ok(seq) => {
                    dump = Some(Dump {
                        seq,
                        listed: std::collections::HashSet::new(),
                        spoilt: false,
                    });
                }
                Err(e) => return stop(e),
            }
        }
        let r = match links.read() {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::warn!("UDP kernel path: interface changes lost; listing them again");
                if let Some(d) = dump.as_mut() {
                    d.spoilt = true;
                }
                again = true;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return stop(e),
        };
        let Some(attached) = attached.upgrade() else {
            return;
        };
        let mut a = attached.lock().unwrap_or_else(|e| e.into_inner());
        for l in &r.links {
            a.apply(l);
        }
        let Some(d) = dump.as_mut() else {
            continue;
        };
        d.listed
            .extend(r.links.iter().filter(|l| !l.gone).map(|l| l.index));
        d.spoilt |= r.interrupted;
        match r.end {
            Some((seq, error)) if seq == d.seq => {
                if error == 0 && !d.spoilt {
                    failed = 0;
                    let stale: Vec<(u32, String)> = a
                        .links
                        .iter()
                        .filter(|(i, _)| !d.listed.contains(i))
                        .map(|(i, (n, _))| (*i, n.clone()))
                        .collect();
                    for (index, name) in stale {
                        a.apply(&Link {
                            index,
                            name,
                            ether: true,
                            gone: true,
                        });
                    }
                } else {
                    again = true;
                }
                dump = None;
            }
            _ => {}
        }
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the program's clock (`bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_in_network_order_one_family_each() {
        let a: SocketAddr = "10.0.0.1:53".parse().unwrap();
        let b: SocketAddr = "192.168.1.2:4000".parse().unwrap();
        let Some(Flow::V4(f)) = Flow::new(a, b) else {
            panic!("not an IPv4 flow")
        };
        assert_eq!(f.src_ip.to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(f.dst_ip.to_ne_bytes(), [192, 168, 1, 2]);
        assert_eq!(f.src_port.to_ne_bytes(), [0, 53]);
        assert_eq!(f.dst_port.to_ne_bytes(), [0x0f, 0xa0]);
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:53".parse().unwrap();
        assert_eq!(Flow::new(mapped, b), Some(Flow::V4(f)));

        let c: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
        let d: SocketAddr = "[fe80::2]:4000".parse().unwrap();
        let Some(Flow::V6(f)) = Flow::new(c, d) else {
            panic!("not an IPv6 flow")
        };
        let bytes = |w: [u32; 4]| w.iter().flat_map(|x| x.to_ne_bytes()).collect::<Vec<u8>>();
        assert_eq!(
            bytes(f.src_ip),
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(
            bytes(f.dst_ip),
            "fe80::2".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(f.src_port.to_ne_bytes(), [0, 53]);
        assert_eq!(f.dst_port.to_ne_bytes(), [0x0f, 0xa0]);
        // One of each family: no datagram is both.
        assert_eq!(Flow::new(c, b), None);
        assert_eq!(Flow::new(a, d), None);
    }

    #[test]
    fn layouts_match_the_program() {
        use std::mem::{offset_of, size_of};
        // struct flow and flow6, rewrite and rewrite6: without padding (nothing
        // uninitialised goes to the kernel).
        assert_eq!(size_of::<Flow4>(), 12);
        assert_eq!(size_of::<Flow6>(), 36);
        assert_eq!(size_of::<Tally>(), 24);
        assert_eq!(size_of::<Entry<Flow4>>(), 48);
        assert_eq!(offset_of!(Entry<Flow4>, ifindex), 12);
        assert_eq!(offset_of!(Entry<Flow4>, counts), 16);
        assert_eq!(offset_of!(Entry<Flow4>, from_ifindex), 20);
        assert_eq!(offset_of!(Entry<Flow4>, tally), 24);
        assert_eq!(size_of::<Entry<Flow6>>(), 72);
        assert_eq!(offset_of!(Entry<Flow6>, ifindex), 36);
        assert_eq!(offset_of!(Entry<Flow6>, counts), 40);
        assert_eq!(offset_of!(Entry<Flow6>, from_ifindex), 44);
        assert_eq!(offset_of!(Entry<Flow6>, tally), 48);
    }
}
