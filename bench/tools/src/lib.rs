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
