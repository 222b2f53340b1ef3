//! How a connection ended: the access log's `result` and the metrics' `result` label.
//! Declared once, here.

use std::net::SocketAddr;

/// The result of one client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Relayed until both sides were done.
    Ok,
    /// Not an end: the record written when the server connection is up (`on_connect`).
    Open,
    /// Refused by an ACL.
    Denied,
    /// Refused by a connection or rate limit.
    Limited,
    /// No server of the upstream was available.
    NoServer,
    /// Waited in the upstream's queue and gave up.
    QueueTimeout,
    /// Every connect attempt was refused or failed.
    ConnectFailed,
    /// The connect to the server did not finish within `connect_timeout`.
    ConnectTimeout,
    /// No bytes either way for `idle_timeout`.
    IdleTimeout,
    /// The client reset the connection (or wrote to a closed one).
    ClientReset,
    /// The server reset the connection.
    ServerReset,
    /// A front-end handshake (PROXY header, TLS, SOCKS5, CONNECT) failed.
    ProtocolError,
    /// Still open when the drain timeout ran out, and closed by ferry.
    Drained,
}

impl Outcome {
    /// Every outcome that ends a connection, in a fixed order (counter slots).
    pub const FINAL: [Outcome; 12] = [
        Outcome::Ok,
        Outcome::Denied,
        Outcome::Limited,
        Outcome::NoServer,
        Outcome::QueueTimeout,
        Outcome::ConnectFailed,
        Outcome::ConnectTimeout,
        Outcome::IdleTimeout,
        Outcome::ClientReset,
        Outcome::ServerReset,
        Outcome::ProtocolError,
        Outcome::Drained,
    ];

    /// The name used in the access log and in metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Open => "open",
            Outcome::Denied => "denied",
            Outcome::Limited => "limited",
            Outcome::NoServer => "no_server",
            Outcome::QueueTimeout => "queue_timeout",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::ConnectTimeout => "connect_timeout",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::ClientReset => "client_reset",
            Outcome::ServerReset => "server_reset",
            Outcome::ProtocolError => "protocol_error",
            Outcome::Drained => "drained",
        }
    }

    /// Index into [`Outcome::FINAL`]; `Open` has none.
    pub fn slot(self) -> Option<usize> {
        Outcome::FINAL.iter().position(|o| *o == self)
    }
}

/// Where in the pipeline a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The front-end handshake (PROXY header, ClientHello, TLS) failed.
    Handshake,
    /// The ACL or a per-client limit refused the real client.
    Admission,
    /// No route matched and the listener has no default upstream.
    Route,
    /// No server could be claimed or connected to.
    Connect,
}

/// Why a connection ends before its relay starts.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub stage: Stage,
    pub outcome: Outcome,
    /// More than the outcome says, for the record's `reason`.
    pub reason: Option<String>,
    /// The server last tried (stage `Connect`).
    pub server: Option<SocketAddr>,
}

/// Why a datagram was dropped (the `reason` label of `ferry_udp_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The client is not allowed (`allow`/`deny`).
    Denied,
    /// It would have started a session beyond `max_sessions` (the listener's or the global
    /// limit).
    SessionLimit,
    /// It would have started a session beyond the client's `per_client` limits.
    ClientLimit,
    /// The client is over its `per_client` datagram rate.
    Rate,
    /// No server for a new session: none up, or every one full.
    NoServer,
    /// The listener is stopping: no new sessions.
    Stopping,
    /// The socket it was to leave by had no room for it.
    Full,
    /// Sending it failed.
    SendFailed,
}

impl Dropped {
    pub const ALL: [Dropped; 8] = [
        Dropped::Denied,
        Dropped::SessionLimit,
        Dropped::ClientLimit,
        Dropped::Rate,
        Dropped::NoServer,
        Dropped::Stopping,
        Dropped::Full,
        Dropped::SendFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Denied => "denied",
            Dropped::SessionLimit => "session_limit",
            Dropped::ClientLimit => "client_limit",
            Dropped::Rate => "rate",
            Dropped::NoServer => "no_server",
            Dropped::Stopping => "stopping",
            Dropped::Full => "full",
            Dropped::SendFailed => "send_failed",
        }
    }

    /// The access-log `result` of a session this refused, if it refuses one.
    pub fn outcome(self) -> Option<Outcome> {
        match self {
            Dropped::Denied => Some(Outcome::Denied),
            Dropped::SessionLimit | Dropped::ClientLimit | Dropped::Rate => Some(Outcome::Limited),
            Dropped::NoServer => Some(Outcome::NoServer),
            Dropped::Stopping | Dropped::Full | Dropped::SendFailed => None,
        }
    }
}
