//! ferry's integration tests, one module per area, in one test binary: each binary of its
//! own would link the whole proxy again (and at release with LTO), which took most of the
//! test suite's build time. Run one area with `cargo test --test integration AREA::`.

mod common;
mod ops_support;
mod pools_support;

mod accept_errors;
mod cli;
mod config_errors;
mod defaults;
mod drain;
mod edge;
mod failures;
mod forward;
mod hardening;
mod health_proxy;
mod in_process;
mod limits;
mod log_rotation;
mod mtu;
mod ops;
mod pools;
mod relay;
mod routes;
mod runtime_api;
mod secrets;
mod soak;
mod socks_udp;
mod srv;
mod syslog;
mod systemd;
mod tls;
mod tls_upstream;
mod transparent;
mod udp;
mod upgrade;
