//! ferry: a layer-4 proxy, reverse proxy and load balancer.
//!
//! See `ARCHITECTURE.md` for how the modules fit together.
// `unsafe` is denied everywhere but `net::register`, which documents its one block.
#![deny(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod balance;
pub mod clock;
pub mod config;
pub mod demo;
pub mod destinations;
pub mod frontend;
pub mod health;
pub mod listener;
pub mod net;
pub mod nft;
pub mod observe;
pub mod policy;
pub mod relay;
pub mod route;
pub mod runtime;
pub mod session;
pub mod socks_udp;
pub mod systemd;
#[cfg(test)]
mod test_rng;
pub mod tls;
pub mod udp;
pub mod upgrade;
pub mod upstream;
pub mod wire;
pub mod workers;
