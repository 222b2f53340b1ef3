//! The request head an HTTP proxy client sends first: `CONNECT host:port` (a tunnel), or a
//! request in absolute form (`GET http://host/path`) whose head [`origin_form`] rewrites for
//! the origin server; and the proxy's own responses.
//!
//! Sans-io: [`parse`] looks at the bytes read so far and answers `Incomplete`, `Invalid` or
//! `Complete`; `httparse` reads the head, this module the request target and the headers
//! the proxy needs. A pure function of the bytes: it never panics, looks at no more than
//! [`MAX_HEAD`] bytes, and every answer but `Incomplete` is final (the same with any bytes
//! appended).
//!
//! Hosts (here and in SOCKS5) go through [`Host::parse`]: an IP literal, however written,
//! becomes an address, so an address is always seen as one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The longest request head accepted, final CRLFCRLF included.
pub const MAX_HEAD: usize = 16 * 1024;
/// The most header fields accepted.
pub const MAX_HEADERS: usize = 100;

/// The result of looking at the bytes read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// More bytes are needed (the buffer is a prefix of a possible head under [`MAX_HEAD`]).
    Incomplete,
    /// Malformed, larger than [`MAX_HEAD`], more than [`MAX_HEADERS`] headers, a duplicate
    /// Host or Proxy-Authorization header, or a CONNECT or `http://` target with a bad host
    /// or port (or userinfo): answer 400 with this reason and close.
    Invalid(&'static str),
    /// A complete head.
    Complete(Head<'a>),
}

/// A complete request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head<'a> {
    /// As sent (methods are case-sensitive: only `CONNECT` is a tunnel).
    pub method: &'a str,
    /// What the request target asks for.
    pub target: Target<'a>,
    /// 0 or 1 (HTTP/1.0 or HTTP/1.1).
    pub minor_version: u8,
    /// Bytes of the head, final CRLFCRLF included: what follows is the body or, after a
    /// CONNECT, the tunnelled bytes.
    pub len: usize,
    /// The value of the Proxy-Authorization header (see [`basic_credentials`]), if any.
    pub proxy_authorization: Option<&'a [u8]>,
    /// The value of the Host header, if any.
    pub host_header: Option<&'a str>,
}

/// What the request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `CONNECT host:port` (port 1..=65535 required, IPv6 in brackets): a tunnel.
    Authority { host: Host<'a>, port: u16 },
    /// `http://host[:port]/path` (scheme case-insensitive): a request to forward.
    Absolute {
        host: Host<'a>,
        /// 80 unless given.
        port: u16,
        /// The path and query as sent, from the first `/`, `?` or `#` after the
        /// authority; `/` when there is none. [`origin_form`] puts a `/` before one that
        /// does not start with it (`http://host?q`).
        path: &'a str,
    },
    /// Absolute form with a scheme other than `http` (`https://…`, `ftp://…`): answer 400.
    UnsupportedScheme,
    /// Origin form (`/path`), `*`, or anything else a proxy does not serve: answer 400 or 405.
    Other,
}

/// A host as a client names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    /// An IP literal.
    Ip(IpAddr),
    /// A validated host name, without a trailing dot, not lowercased.
    Name(&'a str),
}

impl<'a> Host<'a> {
    /// Reads a host as sent in a SOCKS5 domain name, a CONNECT target or an absolute URI;
    /// `None` if it is neither an address nor a valid name.
    ///
    /// - `[v6]`, or a bare IPv6 address (SOCKS5 only: HTTP authorities bracket theirs);
    /// - a name whose last label is a number (one trailing dot dropped) is read as an IPv4
    ///   address the way resolvers (`inet_aton`) and browsers (the WHATWG URL standard) do:
    ///   1 to 4 parts, each decimal, `0x` hex or `0`-led octal, the last filling the
    ///   remaining bytes (`127.1`, `0x7f000001`, `2130706433`); if it is no address, the
    ///   host is invalid. So no way of writing an address passes for a name;
    /// - any other name: 1 to 255 bytes of letters, digits, `-`, `_` and `.`, no empty label.
    pub fn parse(text: &'a [u8]) -> Option<Host<'a>> {
        if let Some(inner) = text.strip_prefix(b"[") {
            return ipv6(inner.strip_suffix(b"]")?).map(|ip| Host::Ip(IpAddr::V6(ip)));
        }
        if text.contains(&b':') {
            return ipv6(text).map(|ip| Host::Ip(IpAddr::V6(ip)));
        }
        if text.len() > 255 {
            return None;
        }
        let name = text.strip_suffix(b".").unwrap_or(text);
        if ends_in_number(name) {
            return ipv4_numbers(name).map(|ip| Host::Ip(IpAddr::V4(ip)));
        }
        let ok = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
        if !name.iter().all(ok) || name.split(|&b| b == b'.').any(<[u8]>::is_empty) {
            return None;
        }
        std::str::from_utf8(name).ok().map(Host::Name)
    }
}

/// An IPv6 address in text.
fn ipv6(text: &[u8]) -> Option<Ipv6Addr> {
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// Whether the last label of `name` is a number (all digits, or `0x` and hex digits).
fn ends_in_number(name: &[u8]) -> bool {
    let last = name.rsplit(|&b| b == b'.').next().unwrap_or(name);
    match last {
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        digits => !digits.is_empty() && digits.iter().all(u8::is_ascii_digit),
    }
}

/// An IPv4 address in the numeric forms `inet_aton` reads; `None` if it is none.
fn ipv4_numbers(name: &[u8]) -> Option<Ipv4Addr> {
    let mut parts = [0u32; 4];
    let mut count = 0;
    for part in name.split(|&b| b == b'.') {
        *parts.get_mut(count)? = ipv4_number(part)?;
        count += 1;
    }
    let (&last, init) = parts.get(..count)?.split_last()?;
    // The last part fills the bytes the others leave: 32, 24, 16 or 8 bits.
    let bits = 8 * (5 - count as u32);
    if init.iter().any(|&p| p > 255) || (bits < 32 && last >> bits != 0) {
        return None;
    }
    let high = init
        .iter()
        .zip([24, 16, 8])
        .fold(0, |ip, (&p, shift)| ip | p << shift);
    Some(Ipv4Addr::from(high | last))
}

/// One part of a numeric IPv4 address: decimal, `0x` hex or `0`-led octal, up to 2^32 - 1.
fn ipv4_number(part: &[u8]) -> Option<u32> {
    let (digits, radix) = match part {
        [] => return None,
        [b'0', b'x' | b'X', hex @ ..] => (hex, 16),
        [b'0', octal @ ..] => (octal, 8),
        decimal => (decimal, 10),
    };
    digits.iter().try_fold(0u32, |n, &d| {
        n.checked_mul(radix)?
            .checked_add(char::from(d).to_digit(radix)?)
    })
}

// Reasons given more than once.
const TOO_LONG: &str = "request head larger than 16 KiB";
const BAD_HOST: &str = "bad host in request target";
const BAD_PORT: &str = "bad port in request target";

/// Parses the request head at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    // A head must end within MAX_HEAD bytes: never look further.
    let window = buf.get(..MAX_HEAD).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if window.len() == MAX_HEAD => {
            return Parsed::Invalid(TOO_LONG);
        }
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(e) => return Parsed::Invalid(reason(e)),
    };
    let (Some(method), Some(uri), Some(minor_version)) = (req.method, req.path, req.version) else {
        return Parsed::Invalid("malformed request line");
    };
    let mut proxy_authorization = None;
    let mut host_header = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("proxy-authorization") {
            if proxy_authorization.replace(h.value).is_some() {
                return Parsed::Invalid("more than one Proxy-Authorization header");
            }
        } else if h.name.eq_ignore_ascii_case("host") {
            let Ok(value) = std::str::from_utf8(h.value) else {
                return Parsed::Invalid("Host header is not UTF-8");
            };
            // RFC 9112 §3.2: more than one is a 400.
            if host_header.replace(value).is_some() {
                return Parsed::Invalid("more than one Host header");
            }
        }
    }
    match target(method, uri) {
        Ok(target) => Parsed::Complete(Head {
            method,
            target,
            minor_version,
            len,
            proxy_authorization,
            host_header,
        }),
        Err(why) => Parsed::Invalid(why),
    }
}

/// The reason for an `httparse` error.
fn reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::TooManyHeaders => "more than 100 header fields",
        httparse::Error::Version => "bad HTTP version",
        httparse::Error::HeaderName => "bad header name",
        httparse::Error::HeaderValue => "bad header value",
        httparse::Error::NewLine => "bad line ending",
        httparse::Error::Token => "malformed request line",
        _ => "malformed request head",
    }
}

/// The request target for `method`: authority form for CONNECT (required), else absolute
/// form when there is a scheme, else `Other`.
fn target<'a>(method: &str, uri: &'a str) -> Result<Target<'a>, &'static str> {
    if method == "CONNECT" {
        let (host, port) = authority(uri.as_bytes())?;
        let port = port.ok_or("CONNECT target without a port")?;
        return Ok(Target::Authority {
            host,
            port: port_number(port)?,
        });
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Ok(Target::Other);
    };
    if !is_scheme(scheme) {
        return Ok(Target::Other);
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Ok(Target::UnsupportedScheme);
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority_text, path) = rest.split_at_checked(end).ok_or(BAD_HOST)?;
    if authority_text.contains('@') {
        return Err("userinfo in request target");
    }
    let (host, port) = authority(authority_text.as_bytes())?;
    let port = match port {
        None | Some([]) => 80,
        Some(p) => port_number(p)?,
    };
    let path = if path.is_empty() { "/" } else { path };
    Ok(Target::Absolute { host, port, path })
}

/// Whether `s` is a URI scheme (RFC 3986 §3.1).
fn is_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

/// `host[:port]` (IPv6 in brackets): the host and the port text, if a `:` is there.
fn authority(text: &[u8]) -> Result<(Host<'_>, Option<&[u8]>), &'static str> {
    let (host, port) = if text.first() == Some(&b'[') {
        let close = text.iter().position(|&b| b == b']').ok_or(BAD_HOST)?;
        let (host, rest) = text.split_at_checked(close + 1).ok_or(BAD_HOST)?;
        match rest {
            [] => (host, None),
            [b':', port @ ..] => (host, Some(port)),
            _ => return Err(BAD_HOST),
        }
    } else {
        match text.iter().rposition(|&b| b == b':') {
            Some(colon) => {
                let (host, port) = text.split_at_checked(colon).ok_or(BAD_HOST)?;
                // A bare IPv6 address is ambiguous with its port: brackets are required.
                if host.contains(&b':') {
                    return Err(BAD_HOST);
                }
                (host, port.get(1..))
            }
            None => (text, None),
        }
    };
    Ok((Host::parse(host).ok_or(BAD_HOST)?, port))
}

/// A port: 1 to 5 digits, 1..=65535.
fn port_number(text: &[u8]) -> Result<u16, &'static str> {
    if text.is_empty() || text.len() > 5 || !text.iter().all(u8::is_ascii_digit) {
        return Err(BAD_PORT);
    }
    let n = text.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    match u16::try_from(n) {
        Ok(0) | Err(_) => Err(BAD_PORT),
        Ok(port) => Ok(port),
    }
}

/// The user and password of a Proxy-Authorization header value in the Basic scheme
/// (RFC 7617: `Basic base64(user:password)`, scheme case-insensitive, split at the first
/// `:`); the base64 may be padded or not. `None` if the value is anything else.
pub fn basic_credentials(value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let value = value.trim_ascii();
    let split = value.iter().position(|&b| b == b' ' || b == b'\t')?;
    let (scheme, token) = value.split_at_checked(split)?;
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let mut decoded = base64(token.trim_ascii_start())?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let password = decoded.get(colon + 1..)?.to_vec();
    decoded.truncate(colon);
    Some((decoded, password))
}

/// Decodes standard base64 (RFC 4648 §4), with or without its padding; `None` on any
/// other byte, a misplaced `=`, a bad length or empty input.
fn base64(text: &[u8]) -> Option<Vec<u8>> {
    let body = match text {
        [body @ .., b'=', b'='] | [body @ .., b'='] => {
            if !text.len().is_multiple_of(4) {
                return None;
            }
            body
        }
        body => body,
    };
    if body.is_empty() || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() / 4 * 3 + 2);
    let (mut acc, mut bits) = (0u32, 0);
    for &c in body {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6 | u32::from(v)) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The headers not passed on to the origin server: the proxy's own and the connection's
/// (the proxy sends `Connection: close`), and Host (written from the target).
const DROPPED: [&str; 5] = [
    "proxy-authorization",
    "proxy-connection",
    "connection",
    "keep-alive",
    "host",
];

/// Writes to `out` the head of an absolute-form request rewritten for the origin server:
/// `METHOD /path HTTP/1.x`; a Host header from the target (RFC 9112 §3.2.2: a proxy
/// replaces the client's; `:port` unless 80, IPv6 in brackets); the other headers in order,
/// except Proxy-Authorization, Proxy-Connection, Connection and Keep-Alive; `Connection:
/// close`; the final CRLF. `buf` is the buffer `head` was parsed from; the bytes after
/// `head.len` are not part of the head (the caller sends them on). Writes nothing for a
/// target that is not [`Target::Absolute`].
pub fn origin_form(buf: &[u8], head: &Head<'_>, out: &mut Vec<u8>) {
    let Target::Absolute { host, port, path } = head.target else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let raw = buf.get(..head.len).unwrap_or(buf);
    if !matches!(req.parse(raw), Ok(httparse::Status::Complete(_))) {
        return;
    }
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    if !path.starts_with('/') {
        out.push(b'/');
    }
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.");
    out.push(b'0' + head.minor_version.min(9));
    out.extend_from_slice(b"\r\nHost: ");
    match host {
        Host::Name(name) => out.extend_from_slice(name.as_bytes()),
        Host::Ip(IpAddr::V4(ip)) => out.extend_from_slice(ip.to_string().as_bytes()),
        Host::Ip(IpAddr::V6(ip)) => out.extend_from_slice(format!("[{ip}]").as_bytes()),
    }
    if port != 80 {
        out.extend_from_slice(format!(":{port}").as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    for h in req.headers.iter() {
        if DROPPED.iter().any(|d| h.name.eq_ignore_ascii_case(d)) {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
}

/// The responses the proxy sends itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200: the tunnel is open (no body, no Content-Length: the tunnel follows).
    Established,
    /// 400: a malformed head or a target the proxy does not serve.
    BadRequest,
    /// 403: the destination or client is not allowed.
    Forbidden,
    /// 405: a method the proxy does not serve (with `Allow: CONNECT`).
    MethodNotAllowed,
    /// 407: credentials missing or wrong (with `Proxy-Authenticate: Basic realm="ferry"`).
    ProxyAuthRequired,
    /// 502: the destination could not be reached.
    BadGateway,
    /// 504: the destination did not answer in time.
    GatewayTimeout,
}

impl Status {
    /// The status code.
    pub fn code(self) -> u16 {
        match self {
            Status::Established => 200,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::MethodNotAllowed => 405,
            Status::ProxyAuthRequired => 407,
            Status::BadGateway => 502,
            Status::GatewayTimeout => 504,
        }
    }
}

/// The complete response for `status`: for an error, an HTTP/1.1 response with a short
/// text body and `Connection: close` (the proxy closes after sending it).
pub fn response(status: Status) -> &'static [u8] {
    match status {
        Status::Established => b"HTTP/1.1 200 Connection established\r\n\r\n",
        Status::BadRequest => {
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\
            Content-Length: 12\r\nConnection: close\r\n\r\nBad Request\n"
        }
        Status::Forbidden => {
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n\
            Content-Length: 10\r\nConnection: close\r\n\r\nForbidden\n"
        }
        Status::MethodNotAllowed => {
            b"HTTP/1.1 405 Method Not Allowed\r\nAllow: CONNECT\r\nContent-Type: text/plain\r\n\
            Content-Length: 19\r\nConnection: close\r\n\r\nMethod Not Allowed\n"
        }
        Status::ProxyAuthRequired => {
            b"HTTP/1.1 407 Proxy Authentication Required\r\n\
            Proxy-Authenticate: Basic realm=\"ferry\"\r\nContent-Type: text/plain\r\n\
            Content-Length: 30\r\nConnection: close\r\n\r\nProxy Authentication Required\n"
        }
        Status::BadGateway => {
            b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n\
            Content-Length: 12\r\nConnection: close\r\n\r\nBad Gateway\n"
        }
        Status::GatewayTimeout => {
            b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain\r\n\
            Content-Length: 16\r\nConnection: close\r\n\r\nGateway Timeout\n"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Rng;

    /// An IP host from text.
    fn ip(s: &str) -> Host<'static> {
        Host::Ip(s.parse().unwrap())
    }

    /// An HTTP/1.1 head without the optional headers.
    fn head<'a>(method: &'a str, target: Target<'a>, len: usize) -> Head<'a> {
        Head {
            method,
            target,
            minor_version: 1,
            len,
            proxy_authorization: None,
            host_header: None,
        }
    }

    /// The head `buf` parses to; panics if it is not complete.
    fn complete(buf: &[u8]) -> Head<'_> {
        match parse(buf) {
            Parsed::Complete(h) => h,
            other => panic!(
                "expected Complete for {:?}, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    /// The reason `buf` is invalid; panics if it is not.
    fn invalid(buf: &[u8]) -> &'static str {
        match parse(buf) {
            Parsed::Invalid(why) => why,
            other => panic!(
                "expected Invalid for {:?}, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    /// Every strict prefix of the head `h` is `Incomplete`; the head alone and followed by
    /// body bytes is `want`, `h.len()` bytes long.
    fn every_prefix(h: &[u8], want: &Head<'_>) {
        assert_eq!(want.len, h.len());
        for i in 0..h.len() {
            assert_eq!(
                parse(&h[..i]),
                Parsed::Incomplete,
                "prefix {i} of {:?}",
                String::from_utf8_lossy(h)
            );
        }
        assert_eq!(&complete(h), want);
        let mut more = h.to_vec();
        more.extend_from_slice(b"\x16\x03\x01\x02\x00 tunnelled or body bytes\r\n\r\n");
        assert_eq!(&complete(&more), want);
    }

    // What `curl -p -x http://proxy:3128 https://example.com/` sends.
    const CURL_CONNECT: &[u8] = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\
        User-Agent: curl/8.5.0\r\nProxy-Connection: Keep-Alive\r\n\r\n";
    // What `curl -x http://proxy:3128 'http://example.com/index.html?q=1'` sends.
    const CURL_GET: &[u8] = b"GET http://example.com/index.html?q=1 HTTP/1.1\r\n\
        Host: example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\
        Proxy-Connection: Keep-Alive\r\n\r\n";

    #[test]
    fn connect_at_every_prefix() {
        let mut want = head(
            "CONNECT",
            Target::Authority {
                host: Host::Name("example.com"),
                port: 443,
            },
            CURL_CONNECT.len(),
        );
        want.host_header = Some("example.com:443");
        every_prefix(CURL_CONNECT, &want);

        let h = b"CONNECT 192.0.2.1:8443 HTTP/1.1\r\nHost: 192.0.2.1:8443\r\n\
            Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n";
        let mut want = head(
            "CONNECT",
            Target::Authority {
                host: ip("192.0.2.1"),
                port: 8443,
            },
            h.len(),
        );
        want.host_header = Some("192.0.2.1:8443");
        want.proxy_authorization = Some(b"Basic dXNlcjpwYXNz");
        every_prefix(h, &want);

        let h = b"CONNECT [2001:db8::1]:443 HTTP/1.0\r\n\r\n";
        let mut want = head(
            "CONNECT",
            Target::Authority {
                host: ip("2001:db8::1"),
                port: 443,
            },
            h.len(),
        );
        want.minor_version = 0;
        every_prefix(h, &want);

        // Bare LF line endings, a name with a trailing dot and an upper-case letter.
        let h = b"CONNECT Mail.Example.:993 HTTP/1.1\n\n";
        let want = head(
            "CONNECT",
            Target::Authority {
                host: Host::Name("Mail.Example"),
                port: 993,
            },
            h.len(),
        );
        every_prefix(h, &want);
        // Empty lines before the request line are skipped (RFC 9112 §2.2), and counted.
        let h = b"\r\nCONNECT a:1 HTTP/1.1\r\n\r\n";
        assert_eq!(complete(h).len, h.len());
        // A numeric host is an address.
        let h = b"CONNECT 2130706433:22 HTTP/1.1\r\n\r\n";
        assert_eq!(
            complete(h).target,
            Target::Authority {
                host: ip("127.0.0.1"),
                port: 22
            }
        );
    }

    #[test]
    fn absolute_form_at_every_prefix() {
        let mut want = head(
            "GET",
            Target::Absolute {
                host: Host::Name("example.com"),
                port: 80,
                path: "/index.html?q=1",
            },
            CURL_GET.len(),
        );
        want.host_header = Some("example.com");
        every_prefix(CURL_GET, &want);

        let h = b"POST HTTP://Example.COM:8080 HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        let want = head(
            "POST",
            Target::Absolute {
                host: Host::Name("Example.COM"),
                port: 8080,
                path: "/",
            },
            h.len(),
        );
        every_prefix(h, &want);

        let h = b"GET http://[::1]:/a/b HTTP/1.0\r\n\r\n";
        let mut want = head(
            "GET",
            Target::Absolute {
                host: ip("::1"),
                port: 80,
                path: "/a/b",
            },
            h.len(),
        );
        want.minor_version = 0;
        every_prefix(h, &want);

        let target = |h: &'static [u8]| complete(h).target;
        assert_eq!(
            target(b"GET http://10.0.0.1?x=1 HTTP/1.1\r\n\r\n"),
            Target::Absolute {
                host: ip("10.0.0.1"),
                port: 80,
                path: "?x=1"
            }
        );
        assert_eq!(
            target(b"GET http://h:65535/ HTTP/1.1\r\n\r\n"),
            Target::Absolute {
                host: Host::Name("h"),
                port: 65535,
                path: "/"
            }
        );
        // Not served: the caller answers 400 or 405.
        for h in [
            &b"GET https://example.com/ HTTP/1.1\r\n\r\n"[..],
            b"GET HTTPS://example.com/ HTTP/1.1\r\n\r\n",
            b"GET ftp://example.com/ HTTP/1.1\r\n\r\n",
            b"GET ws://example.com/ HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(complete(h).target, Target::UnsupportedScheme);
        }
        for h in [
            &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
            b"GET /redirect?to=http://x/ HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET example.com:80 HTTP/1.1\r\n\r\n",
            b"GET mailto:a@b HTTP/1.1\r\n\r\n",
            b"connect example.com:443 HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(complete(h).target, Target::Other);
        }
    }

    #[test]
    fn invalid_heads() {
        for (h, why) in [
            (&b"GET  / HTTP/1.1\r\n\r\n"[..], "malformed request line"),
            (b"GET / HTTP/1.1 \r\n\r\n", "bad line ending"),
            (b"GET / HTTP/2.0\r\n\r\n", "bad HTTP version"),
            (b"GET / http/1.1\r\n\r\n", "bad HTTP version"),
            (b"GET /\r\n\r\n", "malformed request line"),
            (b"G(T / HTTP/1.1\r\n\r\n", "malformed request line"),
            (b"\x16\x03\x01\x02\x00\x01", "malformed request line"),
            (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", "bad header name"),
            (b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n", "bad header name"),
            (b"GET / HTTP/1.1\r\nX: a\0b\r\n\r\n", "bad header value"),
            (b"GET / HTTP/1.1\r\n\rX", "bad line ending"),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
                "more than one Host header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n",
                "Host header is not UTF-8",
            ),
            (
                b"CONNECT a:1 HTTP/1.1\r\nProxy-Authorization: a\r\nproxy-authorization: b\r\n\r\n",
                "more than one Proxy-Authorization header",
            ),
            (
                b"CONNECT example.com HTTP/1.1\r\n\r\n",
                "CONNECT target without a port",
            ),
            (
                b"CONNECT [::1] HTTP/1.1\r\n\r\n",
                "CONNECT target without a port",
            ),
            (b"CONNECT example.com: HTTP/1.1\r\n\r\n", BAD_PORT),
            (b"CONNECT example.com:0 HTTP/1.1\r\n\r\n", BAD_PORT),
            (b"CONNECT example.com:99999 HTTP/1.1\r\n\r\n", BAD_PORT),
            (b"CONNECT example.com:65536 HTTP/1.1\r\n\r\n", BAD_PORT),
            (b"CONNECT example.com:000443 HTTP/1.1\r\n\r\n", BAD_PORT),
            (b"CONNECT example.com:+443 HTTP/1.1\r\n\r\n", BAD_PORT),
            (b"CONNECT example.com:44a HTTP/1.1\r\n\r\n", BAD_PORT),
            (b"CONNECT exa$mple.com:443 HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"CONNECT a..b:443 HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"CONNECT :443 HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"CONNECT [::1]x:443 HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"CONNECT [::1:443 HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"CONNECT [10.0.0.1]:443 HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"CONNECT 1.2.3.4.5:443 HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"CONNECT caf\xc3\xa9.fr:443 HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"CONNECT http://example.com/ HTTP/1.1\r\n\r\n", BAD_PORT),
            (
                b"GET http://user@example.com/ HTTP/1.1\r\n\r\n",
                "userinfo in request target",
            ),
            (
                b"GET http://u:p@example.com:80/ HTTP/1.1\r\n\r\n",
                "userinfo in request target",
            ),
            (b"GET http:///path HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"GET http://exa%6dple.com/ HTTP/1.1\r\n\r\n", BAD_HOST),
            (b"GET http://example.com:0/ HTTP/1.1\r\n\r\n", BAD_PORT),
            (b"GET http://example.com:99999/ HTTP/1.1\r\n\r\n", BAD_PORT),
            (b"GET http://example.com:x/ HTTP/1.1\r\n\r\n", BAD_PORT),
        ] {
            assert_eq!(invalid(h), why, "{:?}", String::from_utf8_lossy(h));
            // Final: the same with more bytes.
            let mut more = h.to_vec();
            more.extend_from_slice(b"\r\n\r\nmore");
            assert_eq!(invalid(&more), why);
        }
        // Invalid as soon as the bad byte is there.
        assert_eq!(invalid(b"GET / HTTP/1.1\r\nBad Name"), "bad header name");
        assert_eq!(invalid(b"GET / HTTP/3"), "bad HTTP version");
    }

    /// A head with `n` header fields, each `value_len` bytes of value.
    fn with_headers(n: usize, value_len: usize) -> Vec<u8> {
        let mut h = b"GET http://example.com/ HTTP/1.1\r\n".to_vec();
        for i in 0..n {
            h.extend_from_slice(format!("X-H{i}: ").as_bytes());
            h.extend(std::iter::repeat_n(b'v', value_len));
            h.extend_from_slice(b"\r\n");
        }
        h.extend_from_slice(b"\r\n");
        h
    }

    #[test]
    fn limits() {
        assert_eq!(
            complete(&with_headers(MAX_HEADERS, 1)).len,
            with_headers(MAX_HEADERS, 1).len()
        );
        assert_eq!(
            invalid(&with_headers(MAX_HEADERS + 1, 1)),
            "more than 100 header fields"
        );
        // A head of exactly MAX_HEAD bytes is fine; one byte more is not.
        let pad = MAX_HEAD - with_headers(1, 0).len();
        let h = with_headers(1, pad);
        assert_eq!(h.len(), MAX_HEAD);
        assert_eq!(complete(&h).len, MAX_HEAD);
        let mut with_body = h.clone();
        with_body.extend_from_slice(b"body");
        assert_eq!(complete(&with_body).len, MAX_HEAD);
        let h = with_headers(1, pad + 1);
        assert_eq!(invalid(&h), TOO_LONG);
        assert_eq!(parse(&h[..MAX_HEAD - 1]), Parsed::Incomplete);
        assert_eq!(invalid(&h[..MAX_HEAD]), TOO_LONG);
        // No end of head within MAX_HEAD bytes, whatever the bytes are.
        let mut endless = b"GET / HTTP/1.1\r\nX: ".to_vec();
        endless.resize(MAX_HEAD, b'a');
        assert_eq!(invalid(&endless), TOO_LONG);
        endless.resize(100 * MAX_HEAD, b'a');
        assert_eq!(invalid(&endless), TOO_LONG);
        // A long request target, too.
        let mut long = b"GET http://example.com/".to_vec();
        long.resize(MAX_HEAD + 10, b'x');
        long.extend_from_slice(b" HTTP/1.1\r\n\r\n");
        assert_eq!(invalid(&long), TOO_LONG);
    }

    /// Standard base64 with padding, for the tests.
    fn encode64(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    #[test]
    fn basic_credentials_values() {
        let creds = |v: &[u8]| basic_credentials(v);
        let pair = |u: &[u8], p: &[u8]| Some((u.to_vec(), p.to_vec()));
        assert_eq!(creds(b"Basic dXNlcjpwYXNz"), pair(b"user", b"pass"));
        assert_eq!(creds(b"basic dXNlcjpwYXNz"), pair(b"user", b"pass"));
        assert_eq!(creds(b"BASIC dXNlcjpwYXNz"), pair(b"user", b"pass"));
        assert_eq!(creds(b"  Basic \t dXNlcjpwYXNz  "), pair(b"user", b"pass"));
        // "Aladdin:open sesame" (RFC 7617 §2), a colon in the password, empty parts.
        assert_eq!(
            creds(b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
            pair(b"Aladdin", b"open sesame")
        );
        assert_eq!(
            creds(b"Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ"),
            pair(b"Aladdin", b"open sesame")
        );
        assert_eq!(creds(b"Basic dTpwOnE="), pair(b"u", b"p:q"));
        assert_eq!(creds(b"Basic dTpwOnE"), pair(b"u", b"p:q"));
        assert_eq!(creds(b"Basic Og=="), pair(b"", b""));
        assert_eq!(creds(b"Basic dTo="), pair(b"u", b""));
        for bad in [
            &b""[..],
            b"Basic",
            b"Basic ",
            b"Basicdxnlcjpwyxnz",
            b"Bearer dXNlcjpwYXNz",
            b"Digest username=\"u\"",
            b"Basic dXNlcnBhc3M=",  // "userpass": no colon
            b"Basic dXNlcjpwYXNz!", // not base64
            b"Basic dXNlcjp wYXNz", // a space inside
            b"Basic d",             // 4n+1
            b"Basic dTpwOnE==",     // too much padding
            b"Basic dTpw=OnE",      // padding inside
            b"Basic ====",
            b"Basic dXNlcjpwYXNz\xff",
        ] {
            assert_eq!(creds(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        // Round trips, with and without padding.
        let mut rng = Rng(0xba5e_6400_0000_0001);
        for _ in 0..2_000 {
            let n = rng.below(20);
            let user: Vec<u8> = rng.bytes(n).into_iter().filter(|&b| b != b':').collect();
            let n = rng.below(20);
            let password = rng.bytes(n);
            let mut plain = user.clone();
            plain.push(b':');
            plain.extend_from_slice(&password);
            let padded = format!("Basic {}", encode64(&plain));
            let want = Some((user.clone(), password.clone()));
            assert_eq!(creds(padded.as_bytes()), want);
            assert_eq!(creds(padded.trim_end_matches('=').as_bytes()), want);
        }
    }

    /// What `origin_form` writes for the head in `buf`.
    fn rewritten(buf: &[u8]) -> Vec<u8> {
        let head = complete(buf);
        let mut out = Vec::new();
        origin_form(buf, &head, &mut out);
        out
    }

    #[test]
    fn origin_form_heads() {
        assert_eq!(
            rewritten(CURL_GET),
            b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.5.0\r\n\
              Accept: */*\r\nConnection: close\r\n\r\n"
        );
        // No Host, hop-by-hop headers in any case, an IPv6 host and a port, a body after the head.
        let h = b"POST http://[2001:db8::1]:8080/submit HTTP/1.0\r\n\
            proxy-authorization: Basic dXNlcjpwYXNz\r\nContent-Length: 5\r\n\
            CONNECTION: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Other:   spaced  \r\n\r\nhello";
        assert_eq!(
            rewritten(h),
            b"POST /submit HTTP/1.0\r\nHost: [2001:db8::1]:8080\r\nContent-Length: 5\r\n\
              X-Other: spaced\r\nConnection: close\r\n\r\n"
        );
        // The client's Host is replaced by the target's (RFC 9112 §3.2.2); a query without a path.
        let h = b"GET http://192.0.2.1?x HTTP/1.1\r\nAccept: */*\r\nHost: other.example\r\n\
            Proxy-Connection: keep-alive\r\n\r\n";
        assert_eq!(
            rewritten(h),
            b"GET /?x HTTP/1.1\r\nHost: 192.0.2.1\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        // Nothing for a target that is not absolute.
        for h in [
            CURL_CONNECT,
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET https://a/ HTTP/1.1\r\n\r\n",
        ] {
            assert!(rewritten(h).is_empty());
        }
        // The result is a head itself, even from the largest one.
        for h in [CURL_GET, &with_headers(MAX_HEADERS, 1)] {
            let head = complete(h);
            let Target::Absolute { path, .. } = head.target else {
                panic!("absolute");
            };
            assert_origin_form(&rewritten(h), head.method, path);
        }
    }

    #[test]
    fn responses() {
        for status in [
            Status::Established,
            Status::BadRequest,
            Status::Forbidden,
            Status::MethodNotAllowed,
            Status::ProxyAuthRequired,
            Status::BadGateway,
            Status::GatewayTimeout,
        ] {
            let r = response(status);
            let mut headers = [httparse::EMPTY_HEADER; 8];
            let mut resp = httparse::Response::new(&mut headers);
            let Ok(httparse::Status::Complete(len)) = resp.parse(r) else {
                panic!("{status:?}: {:?}", String::from_utf8_lossy(r));
            };
            assert_eq!(resp.version, Some(1));
            assert_eq!(resp.code, Some(status.code()));
            let header = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| h.value)
            };
            let body = &r[len..];
            if status == Status::Established {
                assert_eq!(resp.reason, Some("Connection established"));
                assert!(body.is_empty() && resp.headers.is_empty());
                continue;
            }
            let reason = resp.reason.unwrap();
            assert_eq!(body, format!("{reason}\n").as_bytes());
            assert_eq!(
                header("content-length"),
                Some(body.len().to_string().as_bytes())
            );
            assert_eq!(header("connection"), Some(&b"close"[..]));
            assert_eq!(header("content-type"), Some(&b"text/plain"[..]));
            let want_reason = match status.code() {
                400 => "Bad Request",
                403 => "Forbidden",
                405 => "Method Not Allowed",
                407 => "Proxy Authentication Required",
                502 => "Bad Gateway",
                504 => "Gateway Timeout",
                c => panic!("{c}"),
            };
            assert_eq!(reason, want_reason);
            assert_eq!(
                header("proxy-authenticate"),
                (status == Status::ProxyAuthRequired).then_some(&b"Basic realm=\"ferry\""[..])
            );
            assert_eq!(
                header("allow"),
                (status == Status::MethodNotAllowed).then_some(&b"CONNECT"[..])
            );
        }
    }

    // ---- arbitrary bytes ----

    /// The properties every answer must have, whatever the input.
    fn check<'a>(buf: &'a [u8], rng: &mut Rng) -> Parsed<'a> {
        let got = parse(buf);
        let n = rng.below(16);
        let mut more = buf.to_vec();
        more.extend(rng.bytes(n));
        match &got {
            Parsed::Complete(h) => {
                assert!(h.len <= buf.len() && h.len <= MAX_HEAD, "{buf:02x?}");
                assert_eq!(parse(&buf[..h.len]), got, "{buf:02x?}");
                assert_eq!(parse(&more), got, "{buf:02x?}");
                if let Target::Absolute { path, .. } = h.target {
                    assert!(!path.is_empty());
                    let mut out = Vec::new();
                    origin_form(buf, h, &mut out);
                    assert_origin_form(&out, h.method, path);
                }
            }
            Parsed::Invalid(why) => assert_eq!(parse(&more), Parsed::Invalid(why), "{buf:02x?}"),
            Parsed::Incomplete => assert!(buf.len() < MAX_HEAD),
        }
        let n = rng.below(buf.len() + 1);
        let early = parse(&buf[..n]);
        if early != Parsed::Incomplete {
            assert_eq!(early, got, "prefix {n} of {buf:02x?}");
        }
        if let Some((user, _)) = basic_credentials(buf) {
            assert!(!user.contains(&b':'));
        }
        got
    }

    /// `out` is a whole origin-form head for `method` and `path`, with one Host and one
    /// Connection header and no proxy headers.
    fn assert_origin_form(out: &[u8], method: &str, path: &str) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
        let mut req = httparse::Request::new(&mut headers);
        let status = req.parse(out);
        assert_eq!(
            status,
            Ok(httparse::Status::Complete(out.len())),
            "{out:02x?}"
        );
        assert_eq!(req.method, Some(method));
        let sent = req.path.unwrap();
        assert!(sent.starts_with('/') && sent.ends_with(path), "{sent:?}");
        let count = |name: &str| {
            req.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .count()
        };
        assert_eq!((count("host"), count("connection")), (1, 1), "{out:02x?}");
        assert_eq!(count("proxy-authorization") + count("proxy-connection"), 0);
    }

    /// Applies one to four random edits to `seed`.
    fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
        const PIECES: [&[u8]; 10] = [
            b":",
            b"[",
            b"]",
            b"/",
            b"\r\n",
            b"\r\n\r\n",
            b" ",
            b"@",
            b"http://",
            b"0",
        ];
        let mut buf = seed.to_vec();
        for _ in 0..1 + rng.below(4) {
            match rng.below(6) {
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
                4 => {
                    let at = rng.below(buf.len() + 1);
                    let piece = PIECES[rng.below(PIECES.len())];
                    buf.splice(at..at, piece.iter().copied());
                }
                _ => {
                    let at = rng.below(buf.len() + 1);
                    buf.insert(at, rng.byte());
                }
            }
        }
        buf
    }

    #[test]
    fn arbitrary_bytes() {
        let mut rng = Rng(0x5eed_4771_0000_0001);
        let seeds: [&[u8]; 6] = [
            CURL_CONNECT,
            CURL_GET,
            b"CONNECT [2001:db8::1]:443 HTTP/1.0\r\n\r\n",
            b"GET http://10.0.0.1:8080?x HTTP/1.1\r\nHost: a\r\n\r\nbody",
            b"POST http://[::1]/p HTTP/1.1\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\
              Connection: keep-alive\r\nContent-Length: 2\r\n\r\nhi",
            b"Basic dXNlcjpwYXNz",
        ];
        let mut kinds = [0; 3];
        for i in 0..20_000 {
            let buf = if i % 4 == 0 {
                let n = rng.below(65);
                rng.bytes(n)
            } else {
                let seed = seeds[rng.below(seeds.len())];
                mutate(&mut rng, seed)
            };
            kinds[match check(&buf, &mut rng) {
                Parsed::Incomplete => 0,
                Parsed::Invalid(_) => 1,
                Parsed::Complete(_) => 2,
            }] += 1;
        }
        assert!(kinds.iter().all(|&n| n > 100), "{kinds:?}");
    }
}
