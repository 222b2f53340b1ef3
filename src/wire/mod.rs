//! Sans-io parsers and encoders for what clients send before their payload (the PROXY
//! header, the TLS ClientHello, SOCKS5 and HTTP proxy requests): bytes in, `Incomplete` /
//! invalid / parsed out, tested at every prefix length and on arbitrary bytes.

pub mod client_hello;
pub mod http;
pub mod proxy;
pub mod socks5;
