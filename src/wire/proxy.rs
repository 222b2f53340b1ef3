//! The PROXY protocol header (v1 text, v2 binary), via the `ppp` crate for the wire format.

use std::net::SocketAddr;

use ppp::HeaderResult;
use ppp::v1;
use ppp::v2;

/// Which header versions a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    V1,
    V2,
    Any,
}

/// The version of header sent to servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    /// The real client and the address it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 LOCAL (the proxy's own connection, e.g. its health check) or v1 UNKNOWN: the
    /// connection's own addresses stand.
    Local,
}

/// The result of looking at the first bytes of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A header of `len` bytes; the payload starts after it.
    Complete { len: usize, addresses: Addresses },
    /// More bytes are needed.
    Incomplete,
    /// Not a valid header (of an accepted version).
    Invalid(String),
}

/// The longest header accepted: v1 is at most 107 bytes; v2 is 16 bytes plus addresses and
/// TLVs, which in practice stay well below this.
pub const MAX_HEADER: usize = 4096;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";
const V1_MAX: usize = 107;

/// Parses a header at the start of `buf`.
pub fn parse(buf: &[u8], accept: Accept) -> Parsed {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] && accept != Accept::V1 {
        return parse_v2(buf);
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] && accept != Accept::V2 {
        return parse_v1(buf);
    }
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    Parsed::Invalid(match accept {
        Accept::V1 => "expected a PROXY v1 header".into(),
        Accept::V2 => "expected a PROXY v2 header".into(),
        Accept::Any => "expected a PROXY header".into(),
    })
}

fn parse_v2(buf: &[u8]) -> Parsed {
    if buf.len() < 16 {
        return Parsed::Incomplete;
    }
    let len = 16 + u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if len > MAX_HEADER {
        return Parsed::Invalid(format!("PROXY v2 header of {len} bytes is too long"));
    }
    if buf.len() < len {
        return Parsed::Incomplete;
    }
    match v2::Header::try_from(&buf[..len]) {
        Ok(h) => {
            let addresses = match (h.command, h.addresses) {
                (v2::Command::Local, _) => Addresses::Local,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Addresses::Proxied {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Addresses::Proxied {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                // UNSPEC / UNIX: nothing usable about the client; keep the connection's own.
                (v2::Command::Proxy, _) => Addresses::Local,
            };
            Parsed::Complete { len, addresses }
        }
        Err(e) => Parsed::Invalid(format!("bad PROXY v2 header: {e}")),
    }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("PROXY v1 header longer than 107 bytes".into())
        } else if buf.contains(&b'\n') {
            Parsed::Invalid("bad PROXY v1 header: no CRLF".into())
        } else {
            Parsed::Incomplete
        };
    };
    let len = end + 2;
    match HeaderResult::parse(&buf[..len]) {
        HeaderResult::V1(Ok(h)) => {
            let addresses = match h.addresses {
                v1::Addresses::Tcp4(a) => Addresses::Proxied {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                v1::Addresses::Tcp6(a) => Addresses::Proxied {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                v1::Addresses::Unknown => Addresses::Local,
            };
            Parsed::Complete { len, addresses }
        }
        HeaderResult::V1(Err(e)) => Parsed::Invalid(format!("bad PROXY v1 header: {e}")),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(format!("bad PROXY header: {e}")),
        HeaderResult::V2(Ok(_)) => Parsed::Invalid("bad PROXY v1 header".into()),
    }
}

/// Encodes a header telling a server that `source` connected to `destination`.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    // Both ends must be of one family; map an IPv4 end to IPv6 when they differ.
    let (source, destination) = same_family(source, destination);
    match version {
        Version::V1 => v1::Addresses::from((source, destination))
            .to_string()
            .into_bytes(),
        Version::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (source, destination),
        )
        .build()
        .unwrap_or_default(),
    }
}

/// Encodes a PROXY protocol v2 header telling a server that `source` sent a datagram to
/// `destination` (transport DGRAM).
pub fn encode_datagram(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Datagram,
        (source, destination),
    )
    .build()
    .unwrap_or_default()
}

fn same_family(a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |s: SocketAddr| match s {
        SocketAddr::V4(v) => SocketAddr::from((v.ip().to_ipv6_mapped(), v.port())),
        s => s,
    };
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (v6(a), v6(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Every strict prefix of a valid header is `Incomplete`; the whole is `Complete`.
    fn every_prefix(h: &[u8], accept: Accept, want: Addresses) {
        for i in 0..h.len() {
            assert_eq!(
                parse(&h[..i], accept),
                Parsed::Incomplete,
                "prefix {i} of {h:?}"
            );
        }
        let mut with_payload = h.to_vec();
        with_payload.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(
            parse(&with_payload, accept),
            Parsed::Complete {
                len: h.len(),
                addresses: want
            }
        );
    }

    #[test]
    fn v1_tcp4_and_tcp6_at_every_prefix() {
        every_prefix(
            b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n",
            Accept::Any,
            Addresses::Proxied {
                source: addr("192.0.2.1:51000"),
                destination: addr("198.51.100.2:443"),
            },
        );
        every_prefix(
            b"PROXY TCP6 2001:db8::1 2001:db8::2 51000 443\r\n",
            Accept::V1,
            Addresses::Proxied {
                source: addr("[2001:db8::1]:51000"),
                destination: addr("[2001:db8::2]:443"),
            },
        );
        every_prefix(b"PROXY UNKNOWN\r\n", Accept::V1, Addresses::Local);
    }

    #[test]
    fn v2_round_trip_at_every_prefix() {
        for (s, d) in [
            ("192.0.2.1:51000", "198.51.100.2:443"),
            ("[2001:db8::1]:51000", "[2001:db8::2]:443"),
        ] {
            let h = encode(Version::V2, addr(s), addr(d));
            every_prefix(
                &h,
                Accept::V2,
                Addresses::Proxied {
                    source: addr(s),
                    destination: addr(d),
                },
            );
        }
    }

    #[test]
    fn v1_round_trip() {
        let h = encode(Version::V1, addr("10.1.2.3:4000"), addr("10.0.0.1:5432"));
        assert_eq!(h, b"PROXY TCP4 10.1.2.3 10.0.0.1 4000 5432\r\n");
        let mixed = encode(Version::V1, addr("10.1.2.3:4000"), addr("[::1]:5432"));
        assert!(mixed.starts_with(b"PROXY TCP6 ::ffff:10.1.2.3 ::1 4000 5432"));
    }

    #[test]
    fn v2_local_command() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        every_prefix(&h, Accept::Any, Addresses::Local);
    }

    /// Arbitrary bytes never panic, and every answer is consistent: a `Complete` header is
    /// no longer than the input and parses the same with trailing bytes added; an
    /// `Invalid` prefix stays invalid however it continues.
    #[test]
    fn arbitrary_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let seeds: [&[u8]; 4] = [
            b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n",
            b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
            b"PROXY UNKNOWN\r\n",
            V2_SIGNATURE,
        ];
        for i in 0..20_000 {
            // Mutate a valid start, or take random bytes.
            let mut buf: Vec<u8> = if i % 2 == 0 {
                seeds[i % seeds.len()].to_vec()
            } else {
                (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect()
            };
            for _ in 0..rng.usize(0..4) {
                if !buf.is_empty() {
                    let at = rng.usize(..buf.len());
                    buf[at] = rng.u8(..);
                }
            }
            let extra: Vec<u8> = (0..rng.usize(0..300)).map(|_| rng.u8(..)).collect();
            buf.extend_from_slice(&extra);
            for accept in [Accept::V1, Accept::V2, Accept::Any] {
                match parse(&buf, accept) {
                    Parsed::Complete { len, addresses } => {
                        assert!(len <= buf.len());
                        let mut more = buf.clone();
                        more.extend_from_slice(b"tail");
                        assert_eq!(parse(&more, accept), Parsed::Complete { len, addresses });
                    }
                    Parsed::Invalid(_) => {
                        let mut more = buf.clone();
                        more.extend_from_slice(b"\r\n");
                        assert!(matches!(parse(&more, accept), Parsed::Invalid(_)));
                    }
                    Parsed::Incomplete => assert!(buf.len() < MAX_HEADER),
                }
            }
        }
    }

    #[test]
    fn refuses_garbage_and_wrong_versions() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n", Accept::Any),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 1.2.3.4\r\n", Accept::Any),
            Parsed::Invalid(_)
        ));
        assert!(matches!(
            parse(b"PROXY TCP4 999.2.3.4 1.2.3.4 1 2\r\n", Accept::Any),
            Parsed::Invalid(_)
        ));
        let v1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\n";
        assert!(matches!(parse(v1, Accept::V2), Parsed::Invalid(_)));
        let v2 = encode(Version::V2, addr("192.0.2.1:1"), addr("192.0.2.2:2"));
        assert!(matches!(parse(&v2, Accept::V1), Parsed::Invalid(_)));
        let long = [b'A'; 200];
        let mut v1long = b"PROXY ".to_vec();
        v1long.extend_from_slice(&long);
        assert!(matches!(parse(&v1long, Accept::Any), Parsed::Invalid(_)));
        // A bad version nibble in v2.
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x30, 0x11, 0x00, 0x0c]);
        bad.extend_from_slice(&[0; 12]);
        assert!(matches!(parse(&bad, Accept::Any), Parsed::Invalid(_)));
    }
}
