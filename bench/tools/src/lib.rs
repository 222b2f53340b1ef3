//! Shared helpers for ferry's benchmark tools.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

pub mod tls;

/// The upload protocol of `tlsbulk` and `echo --mode sink`: frames of a 4-byte
/// big-endian length followed by that many bytes. A zero-length frame ends the upload:
/// the sink answers with the payload bytes it received on the connection so far, as an
/// 8-byte big-endian integer (the client's proof that everything arrived, and its clock
/// stop). The frame headers cost the sink a few instructions per frame, no scan of the data.
#[derive(Default)]
pub struct SinkParser {
    remaining: u64,
    hdr: [u8; 4],
    hdr_len: usize,
    /// Payload bytes received so far.
    pub payload: u64,
}

impl SinkParser {
    /// Consume `data`; returns how many end frames it held (each wants a reply).
    pub fn feed(&mut self, mut data: &[u8]) -> usize {
        let mut ends = 0;
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = (self.remaining.min(data.len() as u64)) as usize;
                self.remaining -= take as u64;
                self.payload += take as u64;
                data = &data[take..];
                continue;
            }
            let take = (4 - self.hdr_len).min(data.len());
            self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&data[..take]);
            self.hdr_len += take;
            data = &data[take..];
            if self.hdr_len == 4 {
                self.hdr_len = 0;
                let len = u32::from_be_bytes(self.hdr) as u64;
                if len == 0 {
                    ends += 1;
                } else {
                    self.remaining = len;
                }
            }
        }
        ends
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit. Returns the new soft limit.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Parse a `--sources` value: "auto", "none", or a comma-separated list of IPs
/// (an entry may be a dotted range such as `127.0.0.2-127.0.0.9`).
///
/// "auto" spreads client sockets over 127.0.0.2..=127.0.0.9 when the target is
/// IPv4 loopback, which multiplies the usable ephemeral ports by 8.
pub fn parse_sources(spec: &str, target: SocketAddr) -> Result<Vec<IpAddr>, String> {
    match spec {
        "none" | "" => return Ok(Vec::new()),
        "auto" => {
            return Ok(match target.ip() {
                IpAddr::V4(v4) if v4.is_loopback() => (2..=9)
                    .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
                    .collect(),
                _ => Vec::new(),
            });
        }
        _ => {}
    }
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.parse().map_err(|e| format!("{part}: {e}"))?;
            let b: Ipv4Addr = b.parse().map_err(|e| format!("{part}: {e}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 1024 {
                return Err(format!("{part}: bad range"));
            }
            out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
        } else {
            out.push(part.parse().map_err(|e| format!("{part}: {e}"))?);
        }
    }
    Ok(out)
}

/// Connect to `target`, optionally binding the local side to `src` first.
///
/// With a source address, IP_BIND_ADDRESS_NO_PORT is set so the kernel picks
/// the local port at connect time by 4-tuple (and may reuse loopback
/// TIME_WAIT ports), instead of reserving a port per source IP at bind time.
pub async fn connect_from(
    src: Option<IpAddr>,
    target: SocketAddr,
    zero_linger: bool,
) -> io::Result<TcpStream> {
    let sock = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = src {
        if ip.is_ipv4() {
            let one: libc::c_int = 1;
            // SAFETY: valid fd and a pointer to a c_int of the stated size.
            // Failure is harmless (older kernels): we just fall back to bind-time ports.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    if zero_linger {
        sock.set_zero_linger()?;
    }
    let stream = sock.connect(target).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Minimal JSON string escaping (the tools print small JSON objects by hand).
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Value at quantile `q` (0..=1) of an already sorted slice; 0 when empty.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// How a client reaches its destination: straight, or through a forward proxy's tunnel.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyKind {
    /// No proxy: `--target` is the destination itself.
    None,
    /// SOCKS5 (RFC 1928), no authentication, CONNECT to an IP address.
    Socks5,
    /// HTTP proxy: `CONNECT host:port HTTP/1.1`, a 2xx answer opens the tunnel.
    Http,
}

impl ProxyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyKind::None => "none",
            ProxyKind::Socks5 => "socks5",
            ProxyKind::Http => "http",
        }
    }
}

/// Longest HTTP proxy answer header accepted (tinyproxy's is ~80 bytes, squid's ~40).
const MAX_HTTP_REPLY: usize = 8 * 1024;

/// Open a tunnel to `dest` over `s`, a connection to a forward proxy of kind `kind` (a
/// no-op for `ProxyKind::None`). On success the stream carries `dest`'s bytes, nothing
/// of the proxy's answer is left unread.
///
/// SOCKS5: the greeting offering only "no authentication" (`05 01 00`), waiting for the
/// method choice (`05 00`), then CONNECT to the IP (`05 01 00 01|04 ADDR PORT`) and its
/// reply (REP must be 0; BND.ADDR of any type is skipped). Two round trips, as a client
/// that waits for each answer (curl, browsers) makes them.
///
/// HTTP: `CONNECT ip:port HTTP/1.1` with a Host header, then the answer up to the blank
/// line; the status must be 2xx. The answer is read with small reads that stop at the
/// blank line: the tunnel's first bytes (none before the client sends) are never consumed.
pub async fn proxy_handshake(s: &mut TcpStream, kind: ProxyKind, dest: SocketAddr) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    match kind {
        ProxyKind::None => Ok(()),
        ProxyKind::Socks5 => {
            s.write_all(&[5, 1, 0]).await?;
            let mut m = [0u8; 2];
            s.read_exact(&mut m).await?;
            if m != [5, 0] {
                return Err(io::Error::other(format!(
                    "socks5: method answer {:02x} {:02x}, want 05 00",
                    m[0], m[1]
                )));
            }
            let mut req = Vec::with_capacity(22);
            req.extend_from_slice(&[5, 1, 0]);
            match dest.ip() {
                IpAddr::V4(v4) => {
                    req.push(1);
                    req.extend_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    req.push(4);
                    req.extend_from_slice(&v6.octets());
                }
            }
            req.extend_from_slice(&dest.port().to_be_bytes());
            s.write_all(&req).await?;
            let mut head = [0u8; 4];
            s.read_exact(&mut head).await?;
            if head[0] != 5 || head[1] != 0 {
                return Err(io::Error::other(format!(
                    "socks5: CONNECT refused: reply {:02x} {:02x}",
                    head[0], head[1]
                )));
            }
            let rest = match head[3] {
                1 => 4 + 2,
                4 => 16 + 2,
                3 => {
                    let mut l = [0u8; 1];
                    s.read_exact(&mut l).await?;
                    l[0] as usize + 2
                }
                t => return Err(io::Error::other(format!("socks5: reply address type {t}"))),
            };
            let mut skip = [0u8; 257];
            s.read_exact(&mut skip[..rest]).await?;
            Ok(())
        }
        ProxyKind::Http => {
            let req = format!("CONNECT {dest} HTTP/1.1\r\nHost: {dest}\r\n\r\n");
            s.write_all(req.as_bytes()).await?;
            // Read the answer without reading past its end: peek what is there, then
            // consume exactly up to the blank line.
            let mut got: Vec<u8> = Vec::with_capacity(128);
            let mut buf = [0u8; 512];
            let mut matched = 0; // how much of "\r\n\r\n" the bytes so far end with
            while matched < 4 {
                let n = s.peek(&mut buf).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "http proxy closed before answering CONNECT",
                    ));
                }
                let mut take = n;
                for (i, &b) in buf[..n].iter().enumerate() {
                    matched = if b == b"\r\n\r\n"[matched] {
                        matched + 1
                    } else if b == b'\r' {
                        1
                    } else {
                        0
                    };
                    if matched == 4 {
                        take = i + 1;
                        break;
                    }
                }
                s.read_exact(&mut buf[..take]).await?;
                got.extend_from_slice(&buf[..take]);
                if got.len() > MAX_HTTP_REPLY {
                    return Err(io::Error::other("http proxy: answer header too long"));
                }
            }
            let line = got.split(|&b| b == b'\r').next().unwrap_or(&[]);
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (proto, status) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if !proto.starts_with("HTTP/1.") || !status.starts_with('2') || status.len() != 3 {
                return Err(io::Error::other(format!("http proxy: CONNECT answered {line:?}")));
            }
            Ok(())
        }
    }
}

/// Options of [`udp_socket`].
#[derive(Clone, Debug, Default)]
pub struct UdpSocketOpts {
    /// SO_REUSEPORT before bind (several sockets on one address, the kernel spreads the
    /// senders over them).
    pub reuseport: bool,
    /// SO_RCVBUF and SO_SNDBUF in bytes: SO_*BUFFORCE first (root may exceed
    /// net.core.rmem_max/wmem_max), else the plain option (capped by the kernel).
    pub buffer: Option<usize>,
    /// O_NONBLOCK.
    pub nonblocking: bool,
}

/// An IPv4/IPv6 UDP socket, bound to `bind` (if given) and connected to `connect` (if
/// given), with the options set before the bind. The options' failures are ignored
/// (best effort), bind's and connect's are returned.
pub fn udp_socket(
    bind: Option<SocketAddr>,
    connect: Option<SocketAddr>,
    opts: &UdpSocketOpts,
) -> io::Result<std::net::UdpSocket> {
    use std::os::fd::FromRawFd;
    let v6 = bind.or(connect).map(|a| a.is_ipv6()).unwrap_or(false);
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    let mut ty = libc::SOCK_DGRAM | libc::SOCK_CLOEXEC;
    if opts.nonblocking {
        ty |= libc::SOCK_NONBLOCK;
    }
    // SAFETY: plain socket(2) call; the fd is owned by the UdpSocket made from it below.
    let fd = unsafe { libc::socket(family, ty, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let sock = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| -> bool {
        // SAFETY: valid fd and a pointer to a c_int of the stated size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if opts.reuseport {
        set(libc::SOL_SOCKET, libc::SO_REUSEPORT, 1);
    }
    if let Some(b) = opts.buffer {
        let b = b.min(i32::MAX as usize / 2) as libc::c_int;
        if !set(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, b) {
            set(libc::SOL_SOCKET, libc::SO_RCVBUF, b);
        }
        if !set(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, b) {
            set(libc::SOL_SOCKET, libc::SO_SNDBUF, b);
        }
    }
    if let Some(a) = bind {
        sock.bind_addr(a)?;
    }
    if let Some(a) = connect {
        sock.connect(a)?;
    }
    Ok(sock)
}

/// `bind(2)` for a std UdpSocket made from a raw fd (std only binds while creating).
trait BindAddr {
    fn bind_addr(&self, a: SocketAddr) -> io::Result<()>;
}

impl BindAddr for std::net::UdpSocket {
    fn bind_addr(&self, a: SocketAddr) -> io::Result<()> {
        let (storage, len) = sockaddr_of(a);
        // SAFETY: valid fd; storage holds a sockaddr of `len` bytes.
        let r = unsafe {
            libc::bind(
                self.as_raw_fd(),
                (&storage as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A SocketAddr as a C sockaddr (in a sockaddr_storage) and its length.
pub fn sockaddr_of(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin) };
            (
                st,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut st as *mut libc::sockaddr_storage).cast(), sin6) };
            (
                st,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}
