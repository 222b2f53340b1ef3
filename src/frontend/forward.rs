//! What the forward-proxy front ends share: their settings, the request a client made,
//! and the answer it gets once ferry has tried to connect.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::auth::{UserId, Users};
use crate::config::Dial;
use crate::destinations::Destinations;
use crate::net::{self, Sock};
use crate::upstream::dial::{DialError, OwnAddrs, Policy, Target};
use crate::wire::{http, socks5};

/// A SOCKS5 or HTTP proxy listener's settings.
pub struct Forwarding {
    pub destinations: Destinations,
    pub users: Users,
    pub dial: Dial,
    /// ferry's own listening addresses, as of the last (re)start.
    pub own: Arc<ArcSwap<OwnAddrs>>,
}

impl Forwarding {
    /// The checks for a client authenticated as `user`.
    pub fn policy<'a>(&'a self, user: Option<UserId>, own: &'a OwnAddrs) -> Policy<'a> {
        Policy {
            listener: &self.destinations,
            user: user.and_then(|u| self.users.destinations(u)),
            own,
        }
    }
}

/// A transparent listener's settings.
pub struct Transparent {
    pub interception: crate::config::Interception,
    /// Without an upstream: where original destinations may go; with one, a filter.
    pub destinations: Option<Destinations>,
    pub dial: Dial,
    pub own: Arc<ArcSwap<OwnAddrs>>,
}

/// What a forward-proxy client asked for.
pub struct Request {
    pub target: Target,
    pub user: Option<UserId>,
    /// How the client learns the outcome of the connect.
    pub reply: Reply,
    /// SOCKS5 UDP ASSOCIATE: `target` is the address the client says it will send
    /// datagrams from (often unspecified), not a destination.
    pub associate: bool,
}

/// How a client is told whether its destination was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A SOCKS5 reply with the bound address.
    Socks5,
    /// `200 Connection established`, or an error status.
    HttpTunnel,
    /// Nothing on success (the origin server answers the forwarded request); an error
    /// status otherwise.
    HttpForward,
    /// Transparent mode: nothing; a failure closes the connection.
    None,
}

impl Reply {
    /// Tells the client its destination is connected (`bound`: ferry's end of it).
    pub async fn succeeded(self, client: &Sock, bound: SocketAddr) -> std::io::Result<()> {
        match self {
            Reply::Socks5 => {
                let (b, n) = socks5::reply(socks5::Reply::Succeeded, bound);
                net::write_all(client, &b[..n]).await
            }
            Reply::HttpTunnel => {
                net::write_all(client, http::response(http::Status::Established)).await
            }
            Reply::HttpForward | Reply::None => Ok(()),
        }
    }

    /// Tells the client why its destination was not connected. Best effort: the
    /// connection closes after it either way.
    pub async fn failed(self, client: &Sock, e: &DialError) {
        match self {
            Reply::Socks5 => {
                let code = match e {
                    DialError::Denied(_) => socks5::Reply::NotAllowed,
                    DialError::Resolve(_) | DialError::HostUnreachable(_) => {
                        socks5::Reply::HostUnreachable
                    }
                    DialError::NetworkUnreachable(_) => socks5::Reply::NetworkUnreachable,
                    DialError::Refused(_) => socks5::Reply::ConnectionRefused,
                    DialError::Timeout(_) => socks5::Reply::TtlExpired,
                    DialError::Failed(_) => socks5::Reply::GeneralFailure,
                };
                let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
                let (b, n) = socks5::reply(code, unspecified);
                let _ = net::write_all(client, &b[..n]).await;
            }
            Reply::HttpTunnel | Reply::HttpForward => {
                let status = match e {
                    DialError::Denied(_) => http::Status::Forbidden,
                    DialError::Timeout(_) => http::Status::GatewayTimeout,
                    _ => http::Status::BadGateway,
                };
                let _ = net::write_all(client, http::response(status)).await;
            }
            Reply::None => {}
        }
    }
}
