//! Reading the TLS ClientHello off a client connection: the bytes are consumed (and kept,
//! to be replayed to the server or handed to the TLS session), not peeked.

use std::io;

use crate::net::Sock;
use crate::observe::Refusal;
use crate::wire::client_hello::{self, ClientHello, Parsed};

/// Reads from `sock` into `buf` until it holds a complete ClientHello (`Some`), or shows
/// that the client does not speak TLS (`None`: what was read stays in `buf`).
pub async fn read(sock: &Sock, buf: &mut Vec<u8>) -> Result<Option<ClientHello>, Refusal> {
    loop {
        match client_hello::parse(buf) {
            Parsed::Complete(h) => return Ok(Some(h)),
            Parsed::NotTls => return Ok(None),
            Parsed::Invalid(reason) => {
                return Err(Refusal::handshake(format!("bad ClientHello: {reason}")));
            }
            Parsed::Incomplete => {}
        }
        if buf.len() >= client_hello::MAX_LEN {
            return Err(Refusal::handshake("bad ClientHello: ClientHello too long"));
        }
        let n = read_some(sock, buf, client_hello::MAX_LEN - buf.len())
            .await
            .map_err(|e| Refusal::handshake(format!("reading the ClientHello: {e}")))?;
        if n == 0 {
            return Err(Refusal::handshake(if buf.is_empty() {
                "closed before sending anything"
            } else {
                "closed in the middle of the ClientHello"
            }));
        }
    }
}

/// Appends at most `max` bytes read from `sock` to `buf`; waits for at least one (0: EOF).
pub(super) async fn read_some(sock: &Sock, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
    let want = max.min(4096);
    loop {
        let mut g = sock.readable().await?;
        let start = buf.len();
        buf.resize(start + want, 0);
        let r = g.try_io(|s| io::Read::read(&mut s.get_ref(), &mut buf[start..]));
        match r {
            Err(_would_block) => buf.truncate(start),
            Ok(Ok(n)) => {
                buf.truncate(start + n);
                return Ok(n);
            }
            Ok(Err(e)) => {
                buf.truncate(start);
                return Err(e);
            }
        }
    }
}
