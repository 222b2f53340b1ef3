//! The HTTP proxy handshake: a `CONNECT host:port` request (a tunnel), or an absolute-form
//! request (`GET http://host/path`) forwarded to that origin, rewritten to origin form. The
//! head is read whole (at most 16 KiB); bytes the client sent after it are kept for the
//! destination. Each refusal is answered with its status before the connection closes.

use crate::frontend::forward::{Forwarding, Reply, Request};
use crate::frontend::{Talk, fill};
use crate::net::{self, Sock};
use crate::observe::Outcome;
use crate::observe::Refusal;
use crate::upstream::dial::Target;
use crate::wire::http::{self, Host, Parsed, Status};

/// Runs the handshake. Returns the request and the bytes the destination must get first
/// (what followed the head, after the rewritten head for a forwarded request).
pub(super) async fn handshake(
    sock: &Sock,
    fwd: &Forwarding,
    talk: &mut Talk,
) -> Result<(Request, Vec<u8>), Refusal> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let head = match http::parse(&buf) {
            Parsed::Incomplete => {
                fill(sock, &mut buf, http::MAX_HEAD, "the request head").await?;
                continue;
            }
            Parsed::Invalid(reason) => {
                answer(sock, talk, Status::BadRequest).await?;
                return Err(Refusal::handshake(format!("bad request: {reason}")));
            }
            Parsed::Complete(head) => head,
        };
        let (host, port, reply) = match head.target {
            http::Target::Authority { host, port } if head.method == "CONNECT" => {
                (host, port, Reply::HttpTunnel)
            }
            http::Target::Absolute { host, port, .. } if head.method != "CONNECT" => {
                (host, port, Reply::HttpForward)
            }
            http::Target::UnsupportedScheme => {
                answer(sock, talk, Status::BadRequest).await?;
                return Err(Refusal::handshake(
                    "bad request: only http:// URLs are forwarded (use CONNECT for https)",
                ));
            }
            _ if head.method == "CONNECT" => {
                answer(sock, talk, Status::BadRequest).await?;
                return Err(Refusal::handshake("bad request: CONNECT needs host:port"));
            }
            _ => {
                answer(sock, talk, Status::MethodNotAllowed).await?;
                return Err(Refusal::handshake(format!(
                    "{} with a target that is not an absolute http:// URL",
                    head.method
                )));
            }
        };
        let target = match host {
            Host::Ip(ip) => Target::addr((ip, port).into()),
            Host::Name(n) => Target::name(n, port),
        };
        talk.destination = Some(target.to_string().into());

        let mut user = None;
        if !fwd.users.is_empty() {
            let creds = head.proxy_authorization.and_then(http::basic_credentials);
            let Some((name, password)) = creds else {
                answer(sock, talk, Status::ProxyAuthRequired).await?;
                return Err(Refusal::denied(if head.proxy_authorization.is_some() {
                    "Proxy-Authorization is not Basic credentials"
                } else {
                    "no Proxy-Authorization"
                }));
            };
            talk.user = Some(String::from_utf8_lossy(&name).into());
            match fwd.users.check(&name, &password).await {
                Some(id) => user = Some(id),
                None => {
                    answer(sock, talk, Status::ProxyAuthRequired).await?;
                    return Err(Refusal::denied("authentication failed"));
                }
            }
        }

        let mut first = Vec::new();
        if reply == Reply::HttpForward {
            http::origin_form(&buf, &head, &mut first);
        }
        first.extend_from_slice(&buf[head.len..]);
        return Ok((
            Request {
                target,
                user,
                reply,
                associate: false,
            },
            first,
        ));
    }
}

async fn answer(sock: &Sock, talk: &mut Talk, status: Status) -> Result<(), Refusal> {
    talk.answered = true;
    net::write_all(sock, http::response(status))
        .await
        .map_err(|e| Refusal::with(Outcome::ClientReset, format!("writing to the client: {e}")))
}
