//! Fuzzes the PROXY protocol header parser: any bytes, every accepted version. It must
//! never panic, and a complete header must parse the same with more bytes after it.
#![no_main]

use ferry::wire::proxy::{Accept, Parsed, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for accept in [Accept::V1, Accept::V2, Accept::Any] {
        if let Parsed::Complete { len, addresses } = parse(data, accept) {
            assert!(len <= data.len());
            let mut more = data.to_vec();
            more.extend_from_slice(b"payload");
            assert_eq!(parse(&more, accept), Parsed::Complete { len, addresses });
        }
    }
});
