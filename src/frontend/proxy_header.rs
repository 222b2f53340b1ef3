//! Reading a PROXY protocol header off the front of a client connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::net::{self, Sock};
use crate::wire::proxy::{self, Accept, Addresses, Parsed};

/// Why a connection's PROXY header was not taken.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("{0} is not a trusted PROXY protocol source")]
    Untrusted(SocketAddr),
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
    #[error("closed before a complete PROXY header")]
    Closed,
    #[error("PROXY header too long")]
    TooLong,
    /// What the parser said of it.
    #[error("{0}")]
    Invalid(String),
}

/// Reads a PROXY header off the front of `client`, consuming exactly its bytes: what is
/// available is peeked at, and only bytes known to belong to the header are read (the
/// payload after it stays in the socket for the relay, or for the ClientHello reader).
pub async fn read(client: &Sock, accept: Accept) -> Result<Addresses, HeaderError> {
    let mut header: Vec<u8> = Vec::new();
    // On the heap: a buffer here would be part of every connection's future for its lifetime.
    let mut peeked = vec![0u8; 512];
    loop {
        let n = net::peek(client, &mut peeked).await?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        let have = header.len();
        header.extend_from_slice(&peeked[..n]);
        match proxy::parse(&header, accept) {
            Parsed::Complete { len, addresses } => {
                let mut rest = vec![0u8; len - have];
                net::read_exact(client, &mut rest).await?;
                return Ok(addresses);
            }
            Parsed::Incomplete if header.len() < proxy::MAX_HEADER => {
                // All of it is header so far: take it off the socket and wait for more.
                let mut sink = vec![0u8; n];
                net::read_exact(client, &mut sink).await?;
            }
            Parsed::Incomplete => return Err(HeaderError::TooLong),
            Parsed::Invalid(reason) => return Err(HeaderError::Invalid(reason)),
        }
    }
}
