//! Reading a PROXY protocol header off the front of a client connection.

use crate::net::{self, Sock};
use crate::wire::proxy::{self, Accept, Addresses, Parsed};

/// Reads a PROXY header off the front of `client`, consuming exactly its bytes: what is
/// available is peeked at, and only bytes known to belong to the header are read (the
/// payload after it stays in the socket for the relay, or for the ClientHello reader).
pub async fn read(client: &Sock, accept: Accept) -> Result<Addresses, String> {
    let mut header: Vec<u8> = Vec::new();
    // On the heap: a buffer here would be part of every connection's future for its lifetime.
    let mut peeked = vec![0u8; 512];
    loop {
        let n = net::peek(client, &mut peeked)
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if n == 0 {
            return Err("closed before a complete PROXY header".into());
        }
        let have = header.len();
        header.extend_from_slice(&peeked[..n]);
        match proxy::parse(&header, accept) {
            Parsed::Complete { len, addresses } => {
                let mut rest = vec![0u8; len - have];
                net::read_exact(client, &mut rest)
                    .await
                    .map_err(|e| format!("reading the PROXY header: {e}"))?;
                return Ok(addresses);
            }
            Parsed::Incomplete if header.len() < proxy::MAX_HEADER => {
                // All of it is header so far: take it off the socket and wait for more.
                let mut sink = vec![0u8; n];
                net::read_exact(client, &mut sink)
                    .await
                    .map_err(|e| format!("reading the PROXY header: {e}"))?;
            }
            Parsed::Incomplete => return Err("PROXY header too long".into()),
            Parsed::Invalid(reason) => return Err(reason),
        }
    }
}
