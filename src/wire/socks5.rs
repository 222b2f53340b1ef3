//! SOCKS5 (RFC 1928) and its username/password sub-negotiation (RFC 1929): the messages a
//! client sends (greeting, credentials, request, UDP datagram headers) and the proxy's answers.
//!
//! Sans-io: each parser looks at the bytes read so far and answers `Incomplete`, `Invalid` or
//! `Complete` with the bytes the message takes (what follows is the next message, or the
//! payload). A pure function of the bytes: it never panics and never allocates (names are
//! slices of the input). Fields are checked in wire order as soon as they are there, so
//! every answer but `Incomplete` is final: the same (error included) with any bytes appended.
//!
//! A domain name in a request or a UDP header goes through [`Host::parse`]: an IP literal
//! written as a name (`"127.0.0.1"`, `"::1"`, `"[::1]"`, or a number a resolver reads as
//! IPv4, `"2130706433"`) becomes [`Target::Ip`], so an address is always seen as one; any
//! other name must be letters, digits, `-`, `_` and `.` with no empty label (one trailing
//! dot is dropped). Names are returned as sent: lowercasing is the caller's job.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::http::Host;

/// Method "no authentication required" (RFC 1928 §3).
pub const NO_AUTH: u8 = 0x00;
/// Method "username/password" (RFC 1929).
pub const USER_PASS: u8 = 0x02;
/// The method choice meaning none of the offered methods is acceptable.
pub const NO_ACCEPTABLE: u8 = 0xff;

/// The longest UDP request header (IPv6: RSV, FRAG, ATYP, 16 address bytes, port); also the
/// longest reply.
pub const UDP_HEADER_MAX: usize = 22;

/// The protocol version byte of every SOCKS5 message.
const VERSION: u8 = 5;
/// The version byte of the username/password sub-negotiation.
const AUTH_VERSION: u8 = 1;

/// Address types (ATYP).
const ATYP_IPV4: u8 = 1;
const ATYP_DOMAIN: u8 = 3;
const ATYP_IPV6: u8 = 4;

/// The result of looking at the bytes read so far, for every parser in this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// More bytes are needed (the buffer is a prefix of a possible message).
    Incomplete,
    /// Not a valid message, whatever follows: answer (see [`Error::reply`]) and close.
    Invalid(Error),
    /// A complete message of `len` bytes at the start of the buffer.
    Complete { value: T, len: usize },
}

/// Why a message is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The version byte is not 5 (or not 1 in the username/password sub-negotiation).
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// An address type other than IPv4 (1), domain name (3) or IPv6 (4).
    #[error("unsupported address type {0}")]
    AddressType(u8),
    /// Anything else wrong with the message.
    #[error("{0}")]
    Malformed(&'static str),
}

impl Error {
    /// The reply code to answer a request refused for this error with.
    pub fn reply(&self) -> Reply {
        match self {
            Error::AddressType(_) => Reply::AddressTypeNotSupported,
            Error::Version(_) | Error::Malformed(_) => Reply::GeneralFailure,
        }
    }
}

/// The client's first message: the authentication methods it offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting<'a> {
    /// The method codes, in the client's order (at least one).
    pub methods: &'a [u8],
}

impl Greeting<'_> {
    /// Whether the client offers method `m`.
    pub fn offers(&self, m: u8) -> bool {
        self.methods.contains(&m)
    }
}

/// The username/password sub-negotiation request (RFC 1929 §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// 0 to 255 bytes, as sent.
    pub user: &'a [u8],
    /// 0 to 255 bytes, as sent.
    pub password: &'a [u8],
}

/// What the client asks for (RFC 1928 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 0x01: a TCP connection to the target.
    Connect,
    /// 0x02: accept one connection from the target.
    Bind,
    /// 0x03: relay UDP datagrams.
    UdpAssociate,
    /// An unknown command: the request still parses, so it can be answered with
    /// [`Reply::CommandNotSupported`].
    Other(u8),
}

impl Command {
    /// The command of a CMD byte.
    fn from_byte(b: u8) -> Command {
        match b {
            1 => Command::Connect,
            2 => Command::Bind,
            3 => Command::UdpAssociate,
            other => Command::Other(other),
        }
    }
}

/// Where a request or a UDP datagram is headed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// An address: IPv4 or IPv6 as sent, or an IP literal sent as a domain name.
    Ip(SocketAddr),
    /// A validated host name (not an IP literal), without a trailing dot, not lowercased;
    /// and the port.
    Name(&'a str, u16),
}

/// A request (RFC 1928 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// CMD.
    pub command: Command,
    /// DST.ADDR and DST.PORT.
    pub target: Target<'a>,
}

/// The reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reply {
    Succeeded = 0,
    GeneralFailure = 1,
    /// Connection not allowed by ruleset.
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
    CommandNotSupported = 7,
    AddressTypeNotSupported = 8,
}

/// A UDP datagram from the client (RFC 1928 §7): its header and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpPacket<'a> {
    /// The fragment number; 0 for a whole datagram (the only kind worth relaying).
    pub frag: u8,
    /// DST.ADDR and DST.PORT: where to send the payload.
    pub target: Target<'a>,
    /// The data after the header (possibly empty).
    pub payload: &'a [u8],
}

/// Why a walk stopped before the end of a message.
enum Stop {
    /// A byte that is needed has not arrived.
    Incomplete,
    /// The bytes seen cannot be this message.
    Invalid(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Invalid(e)
    }
}

/// The answer of a walk that returns the value and the bytes it took.
fn finish<T>(walked: Result<(T, usize), Stop>) -> Parsed<T> {
    match walked {
        Ok((value, len)) => Parsed::Complete { value, len },
        Err(Stop::Incomplete) => Parsed::Incomplete,
        Err(Stop::Invalid(e)) => Parsed::Invalid(e),
    }
}

/// The byte at `at`, if it is there.
fn byte(buf: &[u8], at: usize) -> Result<u8, Stop> {
    buf.get(at).copied().ok_or(Stop::Incomplete)
}

/// The `n` bytes at `at`, if they are all there.
fn bytes(buf: &[u8], at: usize, n: usize) -> Result<&[u8], Stop> {
    buf.get(at..at.saturating_add(n)).ok_or(Stop::Incomplete)
}

/// The `N` bytes at `at` as an array, if they are all there.
fn array<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N], Stop> {
    bytes(buf, at, N)?.try_into().map_err(|_| Stop::Incomplete)
}

/// Checks a version byte.
fn version(got: u8, want: u8) -> Result<(), Stop> {
    if got == want {
        Ok(())
    } else {
        Err(Stop::Invalid(Error::Version(got)))
    }
}

/// Parses the greeting (RFC 1928 §3: VER, NMETHODS, METHODS) at the start of `buf`.
/// `Invalid` for a version other than 5 or no methods at all.
pub fn greeting(buf: &[u8]) -> Parsed<Greeting<'_>> {
    finish(walk_greeting(buf))
}

/// [`greeting`], with `?` for the early stops.
fn walk_greeting(buf: &[u8]) -> Result<(Greeting<'_>, usize), Stop> {
    version(byte(buf, 0)?, VERSION)?;
    let n = usize::from(byte(buf, 1)?);
    if n == 0 {
        return Err(Error::Malformed("no authentication methods offered").into());
    }
    let methods = bytes(buf, 2, n)?;
    Ok((Greeting { methods }, 2 + n))
}

/// The proxy's answer to the greeting: the chosen method, or [`NO_ACCEPTABLE`].
pub fn method_choice(m: u8) -> [u8; 2] {
    [VERSION, m]
}

/// Parses the username/password request (RFC 1929 §2: VER 1, ULEN, UNAME, PLEN, PASSWD) at
/// the start of `buf`. `Invalid` only for a version other than 1.
pub fn user_pass(buf: &[u8]) -> Parsed<Credentials<'_>> {
    finish(walk_user_pass(buf))
}

/// [`user_pass`], with `?` for the early stops.
fn walk_user_pass(buf: &[u8]) -> Result<(Credentials<'_>, usize), Stop> {
    version(byte(buf, 0)?, AUTH_VERSION)?;
    let ulen = usize::from(byte(buf, 1)?);
    let user = bytes(buf, 2, ulen)?;
    let plen = usize::from(byte(buf, 2 + ulen)?);
    let password = bytes(buf, 3 + ulen, plen)?;
    Ok((Credentials { user, password }, 3 + ulen + plen))
}

/// The proxy's answer to the username/password request: success or failure (after which
/// the proxy closes the connection).
pub fn user_pass_status(ok: bool) -> [u8; 2] {
    [AUTH_VERSION, if ok { 0x00 } else { 0x01 }]
}

/// Parses a request (RFC 1928 §4: VER, CMD, RSV, ATYP, DST.ADDR, DST.PORT) at the start of
/// `buf`. An unknown command parses (as [`Command::Other`]); `Invalid` for a version other
/// than 5, a non-zero RSV, an unknown address type, or a bad domain name.
pub fn request(buf: &[u8]) -> Parsed<Request<'_>> {
    finish(walk_request(buf))
}

/// [`request`], with `?` for the early stops.
fn walk_request(buf: &[u8]) -> Result<(Request<'_>, usize), Stop> {
    version(byte(buf, 0)?, VERSION)?;
    let command = Command::from_byte(byte(buf, 1)?);
    if byte(buf, 2)? != 0 {
        return Err(Error::Malformed("non-zero reserved byte in request").into());
    }
    let (target, len) = address(buf, 3)?;
    Ok((Request { command, target }, len))
}

/// ATYP, DST.ADDR and DST.PORT starting at `at`: the target and where it ends.
fn address(buf: &[u8], at: usize) -> Result<(Target<'_>, usize), Stop> {
    match byte(buf, at)? {
        ATYP_IPV4 => {
            let ip = Ipv4Addr::from(array::<4>(buf, at + 1)?);
            let port = u16::from_be_bytes(array(buf, at + 5)?);
            Ok((Target::Ip(SocketAddr::from((ip, port))), at + 7))
        }
        ATYP_IPV6 => {
            let ip = Ipv6Addr::from(array::<16>(buf, at + 1)?);
            let port = u16::from_be_bytes(array(buf, at + 17)?);
            Ok((Target::Ip(SocketAddr::from((ip, port))), at + 19))
        }
        ATYP_DOMAIN => {
            let n = usize::from(byte(buf, at + 1)?);
            if n == 0 {
                return Err(Error::Malformed("empty domain name").into());
            }
            let name = bytes(buf, at + 2, n)?;
            let host = Host::parse(name).ok_or(Error::Malformed("bad domain name"))?;
            let port = u16::from_be_bytes(array(buf, at + 2 + n)?);
            let target = match host {
                Host::Ip(ip) => Target::Ip(SocketAddr::new(ip, port)),
                Host::Name(name) => Target::Name(name, port),
            };
            Ok((target, at + 4 + n))
        }
        other => Err(Error::AddressType(other).into()),
    }
}

/// Encodes a reply (RFC 1928 §6: VER, REP, RSV, ATYP, BND.ADDR, BND.PORT): the bytes and
/// how many of them to send (10 for IPv4, 22 for IPv6). An IPv4-mapped IPv6 address is
/// sent as IPv4.
pub fn reply(code: Reply, bound: SocketAddr) -> ([u8; 22], usize) {
    let mut out = [0; UDP_HEADER_MAX];
    out[0] = VERSION;
    out[1] = code as u8;
    let len = put_address(&mut out, bound);
    (out, len)
}

/// Writes ATYP, address and port at offset 3 (where a reply and a UDP header both have
/// them); returns the end. IPv4-mapped IPv6 addresses are written as IPv4.
fn put_address(out: &mut [u8; UDP_HEADER_MAX], addr: SocketAddr) -> usize {
    let port = addr.port().to_be_bytes();
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => {
            out[3] = ATYP_IPV4;
            out[4..8].copy_from_slice(&ip.octets());
            out[8..10].copy_from_slice(&port);
            10
        }
        IpAddr::V6(ip) => {
            out[3] = ATYP_IPV6;
            out[4..20].copy_from_slice(&ip.octets());
            out[20..22].copy_from_slice(&port);
            22
        }
    }
}

/// Parses the header of a UDP datagram from the client (RFC 1928 §7: RSV (two zero bytes),
/// FRAG, ATYP, DST.ADDR, DST.PORT, DATA). A datagram is whole: a header cut short is
/// `Malformed`, like a non-zero RSV or a bad domain name.
pub fn udp_header(datagram: &[u8]) -> Result<UdpPacket<'_>, Error> {
    const TRUNCATED: Error = Error::Malformed("truncated UDP request header");
    let (rsv, frag) = match datagram {
        [a, b, frag, ..] => (u16::from_be_bytes([*a, *b]), *frag),
        _ => return Err(TRUNCATED),
    };
    if rsv != 0 {
        return Err(Error::Malformed(
            "non-zero reserved bytes in UDP request header",
        ));
    }
    let (target, len) = address(datagram, 3).map_err(|stop| match stop {
        Stop::Incomplete => TRUNCATED,
        Stop::Invalid(e) => e,
    })?;
    let payload = datagram.get(len..).ok_or(TRUNCATED)?;
    Ok(UdpPacket {
        frag,
        target,
        payload,
    })
}

/// Encodes the header of a datagram relayed to the client from `from` (RFC 1928 §7, FRAG
/// 0) into `out`; returns its length (10 for IPv4, 22 for IPv6). An IPv4-mapped IPv6
/// address is sent as IPv4.
pub fn encode_udp_header(from: SocketAddr, out: &mut [u8; UDP_HEADER_MAX]) -> usize {
    out[..3].fill(0);
    put_address(out, from)
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use super::*;
    use crate::test_rng::Rng;

    /// A socket address from text.
    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// `full` starts with a message of `len` bytes (what follows is extra): every strict
    /// prefix of the message is `Incomplete`, the message alone and with the extra bytes
    /// are `want`, `len` bytes long.
    fn every_prefix<'m, T: PartialEq + Debug>(
        full: &'m [u8],
        len: usize,
        parse: fn(&'m [u8]) -> Parsed<T>,
        want: T,
    ) {
        for i in 0..len {
            assert_eq!(
                parse(&full[..i]),
                Parsed::Incomplete,
                "prefix {i} of {full:02x?}"
            );
        }
        let want = Parsed::Complete { value: want, len };
        assert_eq!(parse(&full[..len]), want, "{full:02x?}");
        assert_eq!(parse(full), want, "{full:02x?}");
    }

    // What curl sends with --socks5 / --socks5-hostname (and a user with -U).
    const GREETING_NO_AUTH: &[u8] = b"\x05\x01\x00";
    const GREETING_BOTH: &[u8] = b"\x05\x02\x00\x02";
    const CONNECT_V4: &[u8] = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90";
    const CONNECT_V6: &[u8] = b"\x05\x01\x00\x04\
        \x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x01\xbb";
    const CONNECT_NAME: &[u8] = b"\x05\x01\x00\x03\x0bexample.com\x00\x50";
    const USER_PASS_MSG: &[u8] = b"\x01\x04user\x06secret";

    /// `msg` followed by bytes of the next message.
    fn with_extra(msg: &[u8]) -> Vec<u8> {
        let mut v = msg.to_vec();
        v.extend_from_slice(b"\x05\x01GET / HTTP/1.1\r\n");
        v
    }

    #[test]
    fn greetings_at_every_prefix() {
        let full = with_extra(GREETING_NO_AUTH);
        every_prefix(
            &full,
            3,
            greeting,
            Greeting {
                methods: &[NO_AUTH],
            },
        );
        let full = with_extra(GREETING_BOTH);
        every_prefix(
            &full,
            4,
            greeting,
            Greeting {
                methods: &[NO_AUTH, USER_PASS],
            },
        );
        let Parsed::Complete { value, .. } = greeting(GREETING_BOTH) else {
            panic!("complete");
        };
        assert!(value.offers(USER_PASS) && value.offers(NO_AUTH) && !value.offers(1));
        // All 255 methods.
        let mut all = vec![5, 255];
        all.extend(0..=254);
        assert!(matches!(greeting(&all), Parsed::Complete { len: 257, .. }));
    }

    #[test]
    fn user_pass_at_every_prefix() {
        let full = with_extra(USER_PASS_MSG);
        every_prefix(
            &full,
            USER_PASS_MSG.len(),
            user_pass,
            Credentials {
                user: b"user",
                password: b"secret",
            },
        );
        // Empty user and password are what the wire allows.
        let empty = Credentials {
            user: b"",
            password: b"",
        };
        every_prefix(b"\x01\x00\x00", 3, user_pass, empty);
        let mut long = vec![1, 255];
        long.extend([b'u'; 255]);
        long.push(255);
        long.extend([b'p'; 255]);
        assert!(matches!(
            user_pass(&long),
            Parsed::Complete { len: 513, .. }
        ));
    }

    #[test]
    fn connect_requests_at_every_prefix() {
        let connect = |target| Request {
            command: Command::Connect,
            target,
        };
        let full = with_extra(CONNECT_V4);
        every_prefix(
            &full,
            10,
            request,
            connect(Target::Ip(addr("127.0.0.1:8080"))),
        );
        let full = with_extra(CONNECT_V6);
        every_prefix(
            &full,
            22,
            request,
            connect(Target::Ip(addr("[2001:db8::1]:443"))),
        );
        let full = with_extra(CONNECT_NAME);
        every_prefix(&full, 18, request, connect(Target::Name("example.com", 80)));
    }

    #[test]
    fn commands() {
        for (cmd, want) in [
            (1, Command::Connect),
            (2, Command::Bind),
            (3, Command::UdpAssociate),
            (0, Command::Other(0)),
            (9, Command::Other(9)),
        ] {
            let mut msg = CONNECT_V4.to_vec();
            msg[1] = cmd;
            let Parsed::Complete { value, len: 10 } = request(&msg) else {
                panic!("complete")
            };
            assert_eq!(value.command, want);
        }
    }

    /// The request for `name` (a domain) on port 443.
    fn named(name: &[u8]) -> Vec<u8> {
        let mut msg = vec![5, 1, 0, ATYP_DOMAIN, name.len() as u8];
        msg.extend_from_slice(name);
        msg.extend_from_slice(&443u16.to_be_bytes());
        msg
    }

    /// Asserts what a request for `name` (a domain) on port 443 parses to.
    fn assert_target(name: &[u8], want: Result<Target<'_>, Error>) {
        let msg = named(name);
        let got = match request(&msg) {
            Parsed::Complete { value, len } => {
                assert_eq!(len, msg.len());
                Ok(value.target)
            }
            Parsed::Invalid(e) => Err(e),
            Parsed::Incomplete => panic!("incomplete {msg:02x?}"),
        };
        assert_eq!(got, want, "{:?}", String::from_utf8_lossy(name));
    }

    #[test]
    fn domain_names() {
        let name = |n: &'static str| Ok(Target::Name(n, 443));
        let ip = |a: &str| Ok(Target::Ip(addr(a)));
        assert_target(b"Example.COM", name("Example.COM"));
        assert_target(b"example.com.", name("example.com"));
        assert_target(b"a", name("a"));
        assert_target(b"under_score-1.test", name("under_score-1.test"));
        assert_target(b"123abc", name("123abc"));
        assert_target(b"1.2.3.4abc", name("1.2.3.4abc"));
        // IP literals are addresses, however they are written.
        assert_target(b"127.0.0.1", ip("127.0.0.1:443"));
        assert_target(b"127.0.0.1.", ip("127.0.0.1:443"));
        assert_target(b"::1", ip("[::1]:443"));
        assert_target(b"[::1]", ip("[::1]:443"));
        assert_target(b"::ffff:10.0.0.1", ip("[::ffff:10.0.0.1]:443"));
        assert_target(b"2130706433", ip("127.0.0.1:443"));
        assert_target(b"0x7f.1", ip("127.0.0.1:443"));
        assert_target(b"127.1", ip("127.0.0.1:443"));
        assert_target(b"0177.0.0.01", ip("127.0.0.1:443"));
        assert_target(b"0x7F000001", ip("127.0.0.1:443"));
        assert_target(b"0x", ip("0.0.0.0:443"));
        assert_target(b"a.", name("a"));
        // The longest name.
        let long = [b'a'; 255];
        assert_target(&long, Ok(Target::Name(&"a".repeat(255), 443)));
        let mut dotted = long.to_vec();
        dotted.push(b'.');
        assert_target(&dotted[1..], Ok(Target::Name(&"a".repeat(254), 443)));
        let bad = Err(Error::Malformed("bad domain name"));
        for n in [
            &b"."[..],
            b"a..b",
            b".a",
            b"a b",
            b"a/b",
            b"a:b",
            b"caf\xc3\xa9",
            b"a\0",
            b"[127.0.0.1]",
            b"[::1",
            b"1.2.3.4.5",
            b"256.0.0.1",
            b"1.2.3.256",
            b"1.2.65536",
            b"foo.123",
            b"08.1.1.1",
            b"99999999999",
            b"fe80::1%eth0",
        ] {
            assert_target(n, bad);
        }
    }

    #[test]
    fn invalid_requests() {
        let invalid = |msg: &[u8]| match request(msg) {
            Parsed::Invalid(e) => e,
            other => panic!("expected Invalid for {msg:02x?}, got {other:?}"),
        };
        let with = |at: usize, b: u8| {
            let mut m = CONNECT_V4.to_vec();
            m[at] = b;
            m
        };
        assert_eq!(invalid(&with(0, 4)), Error::Version(4));
        assert_eq!(invalid(&[4]), Error::Version(4));
        assert!(matches!(invalid(&with(2, 1)), Error::Malformed(_)));
        assert!(matches!(invalid(&[5, 1, 1]), Error::Malformed(_)));
        for atyp in [0, 2, 5, 255] {
            assert_eq!(invalid(&with(3, atyp)), Error::AddressType(atyp));
            assert_eq!(invalid(&[5, 1, 0, atyp]), Error::AddressType(atyp));
        }
        assert_eq!(
            invalid(b"\x05\x01\x00\x03\x00\x00\x50"),
            Error::Malformed("empty domain name")
        );
        assert_eq!(
            invalid(b"\x05\x01\x00\x03\x00"),
            Error::Malformed("empty domain name")
        );
        // A bad name is refused before its port is there.
        assert_eq!(
            invalid(b"\x05\x01\x00\x03\x03a b"),
            Error::Malformed("bad domain name")
        );
        // Replies to answer with.
        assert_eq!(
            Error::AddressType(2).reply(),
            Reply::AddressTypeNotSupported
        );
        assert_eq!(Error::Version(4).reply(), Reply::GeneralFailure);
        assert_eq!(Error::Malformed("x").reply(), Reply::GeneralFailure);
        assert_eq!(
            Error::Version(4).to_string(),
            "unsupported protocol version 4"
        );
        assert_eq!(
            Error::AddressType(2).to_string(),
            "unsupported address type 2"
        );
        assert_eq!(
            Error::Malformed("empty domain name").to_string(),
            "empty domain name"
        );
    }

    #[test]
    fn invalid_greetings_and_credentials() {
        assert_eq!(greeting(b"\x04"), Parsed::Invalid(Error::Version(4)));
        assert_eq!(
            greeting(b"\x04\x01\x00"),
            Parsed::Invalid(Error::Version(4))
        );
        assert!(matches!(
            greeting(b"\x05\x00"),
            Parsed::Invalid(Error::Malformed(_))
        ));
        assert!(matches!(
            greeting(b"\x05\x00\x00\x02"),
            Parsed::Invalid(Error::Malformed(_))
        ));
        // A SOCKS4 request, or an HTTP client talking to the wrong port.
        assert_eq!(
            greeting(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"),
            Parsed::Invalid(Error::Version(4))
        );
        assert_eq!(
            greeting(b"GET / HTTP/1.1\r\n"),
            Parsed::Invalid(Error::Version(b'G'))
        );
        assert_eq!(
            user_pass(b"\x05\x01\x00"),
            Parsed::Invalid(Error::Version(5))
        );
        assert_eq!(user_pass(b"\x00"), Parsed::Invalid(Error::Version(0)));
    }

    #[test]
    fn answers() {
        assert_eq!(method_choice(NO_AUTH), [5, 0]);
        assert_eq!(method_choice(USER_PASS), [5, 2]);
        assert_eq!(method_choice(NO_ACCEPTABLE), [5, 0xff]);
        assert_eq!(user_pass_status(true), [1, 0]);
        assert_eq!(user_pass_status(false), [1, 1]);
    }

    #[test]
    fn replies() {
        let (b, n) = reply(Reply::Succeeded, addr("192.0.2.7:1080"));
        assert_eq!(&b[..n], b"\x05\x00\x00\x01\xc0\x00\x02\x07\x04\x38");
        let (b, n) = reply(Reply::HostUnreachable, addr("[2001:db8::1]:443"));
        assert_eq!(
            &b[..n],
            b"\x05\x04\x00\x04\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01\x01\xbb"
        );
        let (b, n) = reply(Reply::Succeeded, addr("[::ffff:192.0.2.7]:1080"));
        assert_eq!(&b[..n], b"\x05\x00\x00\x01\xc0\x00\x02\x07\x04\x38");
        // Unspecified addresses (a reply to a refused request).
        let (b, n) = reply(Reply::NotAllowed, addr("0.0.0.0:0"));
        assert_eq!(&b[..n], b"\x05\x02\x00\x01\0\0\0\0\0\0");
        for (code, byte) in [
            (Reply::Succeeded, 0),
            (Reply::GeneralFailure, 1),
            (Reply::NotAllowed, 2),
            (Reply::NetworkUnreachable, 3),
            (Reply::HostUnreachable, 4),
            (Reply::ConnectionRefused, 5),
            (Reply::TtlExpired, 6),
            (Reply::CommandNotSupported, 7),
            (Reply::AddressTypeNotSupported, 8),
        ] {
            assert_eq!(reply(code, addr("[::]:0")).0[1], byte);
        }
        // A reply is a request's address layout: it parses back as one.
        for a in ["10.1.2.3:4", "[2001:db8::2]:65535", "[::ffff:10.1.2.3]:4"] {
            let (mut b, n) = reply(Reply::Succeeded, addr(a));
            b[1] = 1;
            let want = Target::Ip(SocketAddr::new(addr(a).ip().to_canonical(), addr(a).port()));
            assert!(
                matches!(request(&b[..n]), Parsed::Complete { value, len } if len == n && value.target == want)
            );
        }
    }

    #[test]
    fn udp_round_trip() {
        for (from, want) in [
            ("192.0.2.1:53", "192.0.2.1:53"),
            ("[2001:db8::53]:5353", "[2001:db8::53]:5353"),
            ("[::ffff:192.0.2.1]:53", "192.0.2.1:53"),
        ] {
            let mut header = [0xaa; UDP_HEADER_MAX];
            let n = encode_udp_header(addr(from), &mut header);
            assert_eq!(n, if want.starts_with('[') { 22 } else { 10 });
            assert_eq!(&header[..3], &[0, 0, 0]);
            for payload in [&b""[..], b"\x12\x34 a DNS query"] {
                let mut datagram = header[..n].to_vec();
                datagram.extend_from_slice(payload);
                assert_eq!(
                    udp_header(&datagram),
                    Ok(UdpPacket {
                        frag: 0,
                        target: Target::Ip(addr(want)),
                        payload,
                    })
                );
            }
        }
        // A client's datagram to a name, fragment 1.
        let d = b"\x00\x00\x01\x03\x0bexample.org\x00\x35query";
        assert_eq!(
            udp_header(d),
            Ok(UdpPacket {
                frag: 1,
                target: Target::Name("example.org", 53),
                payload: b"query",
            })
        );
    }

    #[test]
    fn udp_errors() {
        let d = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35payload";
        assert!(udp_header(d).is_ok());
        // Every cut inside the header.
        for i in 0..10 {
            assert_eq!(
                udp_header(&d[..i]),
                Err(Error::Malformed("truncated UDP request header")),
                "{i}"
            );
        }
        let with = |at: usize, b: u8| {
            let mut m = d.to_vec();
            m[at] = b;
            m
        };
        assert!(matches!(udp_header(&with(0, 1)), Err(Error::Malformed(_))));
        assert!(matches!(udp_header(&with(1, 1)), Err(Error::Malformed(_))));
        assert_eq!(udp_header(&with(3, 2)), Err(Error::AddressType(2)));
        assert_eq!(udp_header(&with(3, 5)), Err(Error::AddressType(5)));
        assert_eq!(
            udp_header(b"\x00\x00\x00\x03\x00\x00\x35"),
            Err(Error::Malformed("empty domain name"))
        );
        assert_eq!(
            udp_header(b"\x00\x00\x00\x03\x03a$b\x00\x35"),
            Err(Error::Malformed("bad domain name"))
        );
        assert_eq!(
            udp_header(b"\x00\x00\x00\x03\x03abc\x00"),
            Err(Error::Malformed("truncated UDP request header"))
        );
    }

    // ---- arbitrary bytes ----

    /// The properties every answer of `$parse` must have on `$buf`: a `Complete` message
    /// lies within the input and is the same alone and with `$tail` after it; an `Invalid`
    /// one stays the same error with `$tail`; an answer other than `Incomplete` on a prefix
    /// is the answer on the whole; `Incomplete` only below the longest message.
    macro_rules! check {
        ($parse:expr, $buf:expr, $tail:expr, $longest:expr, $prefix:expr) => {{
            let buf: &[u8] = $buf;
            let mut more = buf.to_vec();
            more.extend_from_slice($tail);
            let got = $parse(buf);
            match &got {
                Parsed::Complete { len, .. } => {
                    assert!(*len <= buf.len(), "{buf:02x?}");
                    assert_eq!($parse(&buf[..*len]), got, "{buf:02x?}");
                    assert_eq!($parse(&more), got, "{buf:02x?}");
                }
                Parsed::Invalid(_) => assert_eq!($parse(&more), got, "{buf:02x?}"),
                Parsed::Incomplete => assert!(buf.len() < $longest, "{buf:02x?}"),
            }
            let early = $parse(&buf[..$prefix.min(buf.len())]);
            if early != Parsed::Incomplete {
                assert_eq!(early, got, "prefix {} of {buf:02x?}", $prefix);
            }
            got
        }};
    }

    /// The properties of a UDP header: a packet lies within the datagram, and its header
    /// parses the same without the payload.
    fn check_udp(d: &[u8]) {
        if let Ok(p) = udp_header(d) {
            let header = d.len() - p.payload.len();
            assert!((7..=4 + 255 + 2).contains(&header), "{d:02x?}");
            assert_eq!(&d[header..], p.payload);
            let alone = udp_header(&d[..header]).unwrap();
            assert_eq!((alone.frag, alone.target), (p.frag, p.target));
            if let Target::Name(n, _) = p.target {
                assert!(!n.is_empty() && n.len() <= 255 && !n.ends_with('.'));
            }
        }
    }

    /// Applies one to four random edits to `seed`.
    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        let mut buf = seed.to_vec();
        for _ in 0..1 + rng.below(4) {
            match rng.below(5) {
                0 | 1 if !buf.is_empty() => {
                    let at = rng.below(buf.len());
                    buf[at] = if rng.below(2) == 0 {
                        rng.byte()
                    } else {
                        buf[at] ^ (1 << rng.below(8))
                    };
                }
                2 => buf.truncate(rng.below(buf.len() + 1)),
                3 if !buf.is_empty() => {
                    let at = rng.below(buf.len());
                    buf.remove(at);
                }
                _ => {
                    let at = rng.below(buf.len() + 1);
                    buf.insert(at, rng.byte());
                }
            }
        }
        buf
    }

    /// Which answer: 0 for `Incomplete`, 1 for `Invalid`, 2 for `Complete`.
    fn kind<T>(p: &Parsed<T>) -> usize {
        match p {
            Parsed::Incomplete => 0,
            Parsed::Invalid(_) => 1,
            Parsed::Complete { .. } => 2,
        }
    }

    #[test]
    fn arbitrary_bytes() {
        let mut rng = Rng(0x5eed_50c4_5000_0001);
        let seeds: [&[u8]; 9] = [
            GREETING_NO_AUTH,
            GREETING_BOTH,
            USER_PASS_MSG,
            CONNECT_V4,
            CONNECT_V6,
            CONNECT_NAME,
            b"\x05\x03\x00\x03\x09127.0.0.1\x00\x00",
            b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35payload",
            b"\x00\x00\x00\x03\x07a.b.c.d\x00\x35payload",
        ];
        // Per parser: Incomplete, Invalid, Complete.
        let mut kinds = [[0; 3]; 3];
        for i in 0..40_000 {
            let buf = if i % 2 == 0 {
                let n = rng.below(65);
                rng.bytes(n)
            } else {
                let seed = seeds[rng.below(seeds.len())];
                mutate(&mut rng, seed)
            };
            let n = rng.below(8);
            let tail = rng.bytes(n);
            let prefix = rng.below(buf.len() + 1);
            let g = check!(greeting, &buf, &tail, 2 + 255, prefix);
            kinds[0][kind(&g)] += 1;
            let u = check!(user_pass, &buf, &tail, 3 + 255 + 255, prefix);
            kinds[1][kind(&u)] += 1;
            let r = check!(request, &buf, &tail, 4 + 1 + 255 + 2, prefix);
            kinds[2][kind(&r)] += 1;
            if let Parsed::Complete {
                value:
                    Request {
                        target: Target::Name(n, _),
                        ..
                    },
                ..
            } = r
            {
                assert!(!n.is_empty() && n.len() <= 255 && !n.ends_with('.'));
            }
            check_udp(&buf);
        }
        // Every answer comes up for every parser.
        assert!(kinds.iter().flatten().all(|&n| n > 100), "{kinds:?}");
    }
}
