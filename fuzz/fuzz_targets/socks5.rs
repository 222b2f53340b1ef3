//! Fuzzes the SOCKS5 parsers (greeting, username/password, request, UDP header): any bytes.
//! None may panic; a complete message must lie within the input and parse the same alone
//! and with more bytes after it; an invalid one must stay the same error however it
//! continues, and so must any answer but `Incomplete` on a prefix. A UDP header must parse
//! the same without its payload, and an address must encode back to itself.
#![no_main]

use std::net::SocketAddr;

use ferry::wire::socks5::{
    self, Parsed, Reply, Request, Target, UDP_HEADER_MAX, encode_udp_header, reply, udp_header,
};
use libfuzzer_sys::fuzz_target;

/// The properties of one parser's answer on `$data`; evaluates to the answer.
macro_rules! check {
    ($parse:path, $data:expr) => {{
        let data: &[u8] = $data;
        let got = $parse(data);
        let mut more = data.to_vec();
        more.extend_from_slice(b"\x05\x01\x00\x03\x01");
        match &got {
            Parsed::Complete { len, .. } => {
                assert!(*len <= data.len());
                assert_eq!($parse(&data[..*len]), got);
                assert_eq!($parse(&more), got);
            }
            Parsed::Invalid(_) => assert_eq!($parse(&more), got),
            // The longest message: username/password, 3 + 255 + 255 bytes.
            Parsed::Incomplete => assert!(data.len() < 513),
        }
        let early = $parse(&data[..data.len() / 2]);
        if early != Parsed::Incomplete {
            assert_eq!(early, got);
        }
        got
    }};
}

/// A parsed name is a non-empty host name without its trailing dot.
fn check_target(t: Target<'_>) {
    if let Target::Name(n, _) = t {
        assert!(!n.is_empty() && n.len() <= 255 && !n.ends_with('.'));
        assert!(
            n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        );
    }
}

/// An address as it comes back after encoding: IPv4-mapped IPv6 as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fuzz_target!(|data: &[u8]| {
    check!(socks5::greeting, data);
    check!(socks5::user_pass, data);
    if let Parsed::Complete {
        value: Request { target, .. },
        ..
    } = check!(socks5::request, data)
    {
        check_target(target);
        if let Target::Ip(a) = target {
            // A reply has a request's address layout.
            let (mut b, n) = reply(Reply::Succeeded, a);
            b[1] = 1;
            let Parsed::Complete { value, len } = socks5::request(&b[..n]) else {
                panic!("reply to {a} does not parse back");
            };
            assert_eq!((value.target, len), (Target::Ip(canonical(a)), n));
        }
    }
    if let Ok(p) = udp_header(data) {
        check_target(p.target);
        let header = data.len() - p.payload.len();
        assert_eq!(&data[header..], p.payload);
        let alone = udp_header(&data[..header]).expect("the header alone parses");
        assert_eq!(
            (alone.frag, alone.target, alone.payload),
            (p.frag, p.target, &b""[..])
        );
        if let Target::Ip(a) = p.target {
            let mut out = [0xaa; UDP_HEADER_MAX];
            let n = encode_udp_header(a, &mut out);
            let back = udp_header(&out[..n]).expect("an encoded header parses");
            assert_eq!((back.frag, back.target), (0, Target::Ip(canonical(a))));
        }
    }
});
