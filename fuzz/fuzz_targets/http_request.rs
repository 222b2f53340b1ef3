//! Fuzzes the HTTP proxy request reader: any bytes. It must never panic; a complete head
//! must lie within the input and MAX_HEAD and parse the same alone and with more bytes after
//! it; an invalid one must stay the same however it continues, and so must any answer but
//! `Incomplete` on a prefix. An absolute-form head must rewrite (`origin_form`) to a valid
//! origin-form head with one Host and no proxy headers; `basic_credentials` on the input
//! must not panic either.
#![no_main]

use ferry::wire::http::{
    MAX_HEAD, MAX_HEADERS, Parsed, Target, basic_credentials, origin_form, parse,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let got = parse(data);
    let mut more = data.to_vec();
    more.extend_from_slice(b"\r\n\r\nbody");
    match &got {
        Parsed::Complete(head) => {
            assert!(head.len <= data.len() && head.len <= MAX_HEAD);
            assert_eq!(parse(&data[..head.len]), got);
            assert_eq!(parse(&more), got);
            if let Target::Absolute { path, .. } = head.target {
                let mut out = Vec::new();
                origin_form(data, head, &mut out);
                // At most two more headers than the request (Host, Connection).
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
                let mut req = httparse::Request::new(&mut headers);
                assert_eq!(req.parse(&out), Ok(httparse::Status::Complete(out.len())));
                assert_eq!(req.method, Some(head.method));
                let sent = req.path.expect("a path");
                assert!(sent.starts_with('/') && sent.ends_with(path));
                let count = |name: &str| {
                    req.headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case(name))
                        .count()
                };
                assert_eq!((count("host"), count("connection")), (1, 1));
                assert_eq!(count("proxy-authorization") + count("proxy-connection"), 0);
            }
        }
        Parsed::Invalid(why) => assert_eq!(parse(&more), Parsed::Invalid(why)),
        Parsed::Incomplete => assert!(data.len() < MAX_HEAD),
    }
    match (parse(&data[..data.len() / 2]), &got) {
        (Parsed::Incomplete, _) => {}
        (early, _) => assert_eq!(&early, &got),
    }
    if let Some((user, _)) = basic_credentials(data) {
        assert!(!user.contains(&b':'));
    }
});
