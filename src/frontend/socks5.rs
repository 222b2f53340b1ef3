//! The SOCKS5 handshake (RFC 1928, with RFC 1929 username/password authentication):
//! method negotiation, authentication, the request. Each answer that refuses is sent
//! before the connection closes.

use crate::frontend::forward::{Forwarding, Reply, Request};
use crate::frontend::{Talk, fill};
use crate::net::{self, Sock};
use crate::observe::Outcome;
use crate::observe::Refusal;
use crate::upstream::dial::Target;
use crate::wire::socks5::{self, Command, Parsed};

/// The longest message of the handshake (a request with a 255-byte name is 262 bytes;
/// RFC 1929 credentials are at most 513).
const MAX_MESSAGE: usize = 600;

/// Runs the handshake up to the request. Returns it and any bytes the client sent after it.
pub(super) async fn handshake(
    sock: &Sock,
    fwd: &Forwarding,
    udp: bool,
    talk: &mut Talk,
) -> Result<(Request, Vec<u8>), Refusal> {
    let mut buf: Vec<u8> = Vec::new();

    // Methods: none only without `users`; with them, username/password and nothing else.
    let want = if fwd.users.is_empty() {
        socks5::NO_AUTH
    } else {
        socks5::USER_PASS
    };
    let offered = loop {
        match socks5::greeting(&buf) {
            Parsed::Complete { value, len } => {
                let ok = value.offers(want);
                buf.drain(..len);
                break ok;
            }
            Parsed::Invalid(e) => {
                return Err(Refusal::handshake(format!("bad SOCKS5 greeting: {e}")));
            }
            Parsed::Incomplete => fill(sock, &mut buf, MAX_MESSAGE, "the SOCKS5 greeting").await?,
        }
    };
    let choice = if offered { want } else { socks5::NO_ACCEPTABLE };
    write(sock, talk, &socks5::method_choice(choice)).await?;
    if !offered {
        return Err(Refusal::denied(if want == socks5::USER_PASS {
            "the client does not offer username/password authentication, which this listener requires"
        } else {
            "the client does not offer SOCKS5 without authentication, the only method this listener has"
        }));
    }

    let mut user = None;
    if want == socks5::USER_PASS {
        let checked = loop {
            match socks5::user_pass(&buf) {
                Parsed::Complete { value, len } => {
                    let name = String::from_utf8_lossy(value.user).into_owned();
                    let id = fwd.users.check(value.user, value.password).await;
                    buf.drain(..len);
                    talk.user = Some(name.into());
                    break id;
                }
                Parsed::Invalid(e) => {
                    return Err(Refusal::handshake(format!(
                        "bad SOCKS5 username/password message: {e}"
                    )));
                }
                Parsed::Incomplete => {
                    fill(sock, &mut buf, MAX_MESSAGE, "the SOCKS5 credentials").await?
                }
            }
        };
        write(sock, talk, &socks5::user_pass_status(checked.is_some())).await?;
        match checked {
            Some(id) => user = Some(id),
            None => return Err(Refusal::denied("authentication failed")),
        }
    }

    loop {
        match socks5::request(&buf) {
            Parsed::Complete { value, len } => {
                let target = match value.target {
                    socks5::Target::Ip(a) => Target::addr(a),
                    socks5::Target::Name(n, port) => Target::name(n, port),
                };
                talk.destination = Some(target.to_string().into());
                let command = value.command;
                buf.drain(..len);
                let associate = command == Command::UdpAssociate;
                match command {
                    Command::Connect => {}
                    Command::UdpAssociate if udp => {}
                    Command::UdpAssociate if !udp => {
                        refuse(sock, talk, socks5::Reply::NotAllowed).await?;
                        return Err(Refusal::denied(
                            "UDP ASSOCIATE is not enabled on this listener (`udp = true`)",
                        ));
                    }
                    other => {
                        refuse(sock, talk, socks5::Reply::CommandNotSupported).await?;
                        return Err(Refusal::handshake(format!(
                            "SOCKS5 command {other:?} is not supported"
                        )));
                    }
                }
                return Ok((
                    Request {
                        target,
                        user,
                        reply: Reply::Socks5,
                        associate,
                    },
                    buf,
                ));
            }
            Parsed::Invalid(e) => {
                refuse(sock, talk, e.reply()).await?;
                return Err(Refusal::handshake(format!("bad SOCKS5 request: {e}")));
            }
            Parsed::Incomplete => fill(sock, &mut buf, MAX_MESSAGE, "the SOCKS5 request").await?,
        }
    }
}

async fn write(sock: &Sock, talk: &mut Talk, b: &[u8]) -> Result<(), Refusal> {
    talk.answered = true;
    net::write_all(sock, b)
        .await
        .map_err(|e| Refusal::with(Outcome::ClientReset, format!("writing to the client: {e}")))
}

async fn refuse(sock: &Sock, talk: &mut Talk, code: socks5::Reply) -> Result<(), Refusal> {
    let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], 0));
    let (b, n) = socks5::reply(code, unspecified);
    write(sock, talk, &b[..n]).await
}
