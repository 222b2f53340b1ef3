//! Sans-io parsers and encoders for what clients send before their payload: bytes in,
//! `Incomplete` / invalid / parsed out, tested at every prefix length.

pub mod client_hello;
pub mod proxy;
