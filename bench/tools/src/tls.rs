//! TLS over tokio for the benchmark tools, on rustls with the ring provider.
//!
//! A small driver instead of an extra crate: `TlsStream` owns a `TcpStream` and a
//! rustls connection (client or server side) and moves records between them.

use std::io::{self, Read, Write};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, RootCertStore, ServerConfig, SideData};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The crypto provider of every tool: ring, as in ferry, with AES-128-GCM listed first, as
/// browsers list it: every contender that takes the client's order (OpenSSL's default) and
/// ferry (which prefers it) then negotiate the same suite, so the comparison is of the
/// proxies, not of their cipher suites.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| !s.suite().as_str().unwrap_or("").contains("AES_128"));
    Arc::new(p)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(certs)
}

/// Client configuration trusting only the CA in `ca` (PEM), TLS 1.3 only unless
/// `allow_tls12`. `resumption`: `None` disables it (every handshake is full);
/// `Some(n)` keeps an in-memory cache of `n` sessions (TLS 1.3 tickets) in this config.
pub fn client_config(ca: &Path, resumption: Option<usize>, allow_tls12: bool) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = if allow_tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = match resumption {
        None => Resumption::disabled(),
        Some(n) => Resumption::in_memory_sessions(n),
    };
    Ok(Arc::new(cfg))
}

/// Server configuration for `cert` (PEM chain) and `key` (PEM), TLS 1.2 and 1.3,
/// stateless TLS 1.3 tickets (ring's rotating ticketer) and a 10,000-session cache.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = load_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    cfg.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(10_000);
    Ok(Arc::new(cfg))
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string()).map_err(|e| format!("{name:?}: {e}"))
}

fn tls_err(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A TCP stream carrying TLS, driven by hand: `C` is `ClientConnection` or
/// `ServerConnection`.
pub struct TlsStream<C> {
    pub tcp: TcpStream,
    pub conn: C,
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    wbuf: Vec<u8>,
}

impl<C, S> TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<S>>,
    S: SideData,
{
    /// `rbuf` is the size of the socket read buffer (ciphertext).
    pub fn new(tcp: TcpStream, conn: C, rbuf: usize) -> Self {
        TlsStream {
            tcp,
            conn,
            rbuf: vec![0; rbuf.max(1024)],
            start: 0,
            end: 0,
            wbuf: Vec::new(),
        }
    }

    /// Send every record rustls has queued.
    pub async fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            self.wbuf.clear();
            self.conn.write_tls(&mut self.wbuf)?;
            self.tcp.write_all(&self.wbuf).await?;
        }
        Ok(())
    }

    /// Feed rustls ciphertext (reading the socket once if nothing is pending) and
    /// process it; queued replies (handshake messages, alerts) are sent.
    async fn feed(&mut self) -> io::Result<()> {
        if self.start == self.end {
            let n = self.tcp.read(&mut self.rbuf).await?;
            if n == 0 {
                // Tell rustls the peer closed; a following read reports how.
                self.conn.read_tls(&mut &[][..])?;
                if self.conn.is_handshaking() {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed during the TLS handshake",
                    ));
                }
                return Ok(());
            }
            self.start = 0;
            self.end = n;
        }
        let mut pending = &self.rbuf[self.start..self.end];
        let used = self.conn.read_tls(&mut pending)?;
        self.start += used;
        if let Err(e) = self.conn.process_new_packets() {
            let _ = self.flush().await; // the alert
            return Err(tls_err(e));
        }
        self.flush().await
    }

    /// Complete the handshake.
    pub async fn handshake(&mut self) -> io::Result<()> {
        while self.conn.is_handshaking() {
            self.flush().await?;
            if self.conn.is_handshaking() {
                self.feed().await?;
            }
        }
        self.flush().await
    }

    /// Read plaintext into `buf`: Ok(0) after the peer's close_notify; an
    /// UnexpectedEof error if the TCP stream ends without one.
    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            self.feed().await?;
        }
    }

    pub async fn read_exact(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.read(buf).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "TLS stream closed"));
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// Encrypt and send all of `data` (in pieces of rustls's outgoing buffer limit).
    pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.conn.writer().write(data)?;
            data = &data[n..];
            self.flush().await?;
        }
        Ok(())
    }

    /// Drop the TLS state and keep the TCP stream (no close_notify is sent): for holding
    /// many idle connections cheaply on the client side.
    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }

    /// Send close_notify and shut down the write side.
    pub async fn close(&mut self) -> io::Result<()> {
        self.conn.send_close_notify();
        self.flush().await?;
        self.tcp.shutdown().await
    }
}

/// Connect a TLS client over an established TCP stream and complete the handshake.
pub async fn connect(
    tcp: TcpStream,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    rbuf: usize,
) -> io::Result<TlsStream<ClientConnection>> {
    let conn = ClientConnection::new(config.clone(), name.clone()).map_err(tls_err)?;
    let mut s = TlsStream::new(tcp, conn, rbuf);
    s.handshake().await?;
    Ok(s)
}

/// "TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519" for the JSON outputs.
pub fn describe<S: SideData>(c: &ConnectionCommon<S>) -> String {
    format!(
        "{} {} {}",
        c.protocol_version().map(|v| format!("{v:?}")).unwrap_or_else(|| "?".into()),
        c.negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_else(|| "?".into()),
        c.negotiated_key_exchange_group()
            .map(|g| format!("{:?}", g.name()))
            .unwrap_or_else(|| "-".into()),
    )
}
