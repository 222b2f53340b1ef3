//! Fuzzes the TLS ClientHello reader: any bytes. It must never panic; a complete hello must
//! lie within the input and parse the same alone and with more bytes after it; an invalid
//! or non-TLS start must stay so however it continues, and so must any answer but
//! `Incomplete` on a prefix.
#![no_main]

use ferry::wire::client_hello::{MAX_LEN, Parsed, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let got = parse(data);
    let with = |n: usize, tail: &[u8]| {
        let mut more = data[..n].to_vec();
        more.extend_from_slice(tail);
        parse(&more)
    };
    match &got {
        Parsed::Complete(hello) => {
            assert!(hello.len <= data.len() && hello.len <= MAX_LEN);
            assert_eq!(parse(&data[..hello.len]), got);
            assert_eq!(with(hello.len, b"\x17\x03\x03\x00\x01payload"), got);
        }
        Parsed::Invalid(_) => assert!(matches!(
            with(data.len(), b"\x16\x03\x03"),
            Parsed::Invalid(_)
        )),
        Parsed::NotTls => assert_eq!(with(data.len(), b"\x16"), Parsed::NotTls),
        Parsed::Incomplete => assert!(data.len() < MAX_LEN),
    }
    // A final answer on the first half is the answer on the whole.
    match (parse(&data[..data.len() / 2]), &got) {
        (Parsed::Incomplete, _) | (Parsed::Invalid(_), Parsed::Invalid(_)) => {}
        (early, _) => assert_eq!(&early, &got),
    }
});
