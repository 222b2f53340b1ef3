//! Certificates made in-process for the TLS tests (rcgen, ECDSA P-256 unless asked), and a
//! blocking rustls client. No secret is ever written to the repository: every key lives in
//! the test's temporary folder.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A certificate authority.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM-encoded.
#[derive(Clone)]
pub struct Leaf {
    /// The certificate alone.
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names, or IP addresses).
    pub fn server(&self, names: &[&str]) -> Leaf {
        self.leaf(names, |_| {})
    }

    /// A server certificate for `names`, with `edit` applied to its parameters first.
    pub fn leaf(&self, names: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        edit(&mut params);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(&[], |p| {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            p.distinguished_name = dn;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        })
    }

    /// Writes the CA certificate to `dir/NAME.pem`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.pem"));
        std::fs::write(&p, self.pem()).unwrap();
        p
    }
}

impl Leaf {
    /// Writes `dir/NAME.pem` and `dir/NAME.key` (mode 600); returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let c = dir.join(format!("{name}.pem"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, &self.cert_pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        (c, k)
    }

    pub fn cert_der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap()
    }
}

/// How a test's TLS client connects.
#[derive(Default)]
pub struct ClientOpts<'a> {
    /// SNI and the name verified; `None`: no SNI, verified as an IP address.
    pub sni: Option<&'a str>,
    /// Trust anchors, PEM.
    pub roots: &'a [String],
    pub client_cert: Option<&'a Leaf>,
    pub alpn: &'a [&'a str],
    /// Keep sessions across connections made with the same config (see [`client_config`]).
    pub config: Option<Arc<rustls::ClientConfig>>,
}

/// A rustls client config for `o` (ring provider), reusable to resume sessions.
pub fn client_config(o: &ClientOpts<'_>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for pem in o.roots {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match o.client_cert {
        Some(l) => b
            .with_client_auth_cert(vec![l.cert_der()], l.key_der())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = o.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// A blocking TLS client connection (handshake done, or its error).
pub type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects to `addr` and completes a TLS handshake (every wait bounded by `timeout`).
pub fn tls_connect(addr: SocketAddr, o: &ClientOpts<'_>, timeout: Duration) -> Result<Tls, String> {
    let cfg = o.config.clone().unwrap_or_else(|| client_config(o));
    let name = match o.sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let sock = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(timeout)).unwrap();
    sock.set_write_timeout(Some(timeout)).unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

/// Writes `msg` and reads back as many bytes (through an echo server).
pub fn tls_echo(s: &mut Tls, msg: &[u8]) -> Result<Vec<u8>, String> {
    s.write_all(msg).map_err(|e| e.to_string())?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).map_err(|e| e.to_string())?;
    Ok(back)
}

/// A self-signed server certificate for `names` (DNS names, or IP addresses), issued by no
/// CA: what `verify = false` is for.
pub fn self_signed(names: &[&str]) -> Leaf {
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("self-signed"),
    );
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// The bytes of the first flight of a rustls client (its ClientHello, as records) for
/// `sni` (`None`: no SNI) offering `alpn`: what a TLS client sends first, made without a
/// server to talk to.
pub fn client_hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
    let cfg = client_config(&ClientOpts {
        alpn,
        ..ClientOpts::default()
    });
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into()),
    };
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

// ---------------------------------------------------------------------------------------
// Additions for tests/tls.rs: clients that see which certificate a server picked, clients
// limited to some protocol versions, and a handshake on a socket the caller connected.

/// A server-certificate verifier that accepts any certificate (the handshake's signatures
/// are still checked): for a test that looks at which certificate it was served.
#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A rustls client config for `o` with only `versions` enabled and, with `any_server`, a
/// verifier that accepts any server certificate (`o.roots` is then unused).
pub fn client_config_with(
    o: &ClientOpts<'_>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    any_server: bool,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap();
    let b = if any_server {
        b.dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for pem in o.roots {
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
        }
        b.with_root_certificates(roots)
    };
    let mut cfg = match o.client_cert {
        Some(l) => b
            .with_client_auth_cert(vec![l.cert_der()], l.key_der())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = o.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(cfg)
}

/// A rustls client config for `o` (TLS 1.2 and 1.3) that accepts any server certificate.
pub fn client_config_any_server(o: &ClientOpts<'_>) -> Arc<rustls::ClientConfig> {
    client_config_with(o, &[&rustls::version::TLS13, &rustls::version::TLS12], true)
}

/// Completes a TLS handshake on `sock`, already connected (so the caller knows its local
/// address even when the handshake fails). Every wait is bounded by `timeout`.
pub fn tls_handshake(
    sock: TcpStream,
    o: &ClientOpts<'_>,
    timeout: Duration,
) -> Result<Tls, String> {
    let cfg = o.config.clone().unwrap_or_else(|| client_config(o));
    let name = match o.sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(sock.peer_addr().map_err(|e| e.to_string())?.ip().into()),
    };
    sock.set_read_timeout(Some(timeout)).unwrap();
    sock.set_write_timeout(Some(timeout)).unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

impl Ca {
    /// An intermediate CA named `name`, signed by this one. A server certificate it issues
    /// verifies against this CA only if the server sends the intermediate too (its PEM,
    /// [`Ca::pem`], after the leaf in the certificate file).
    pub fn intermediate(&self, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: CertifiedIssuer::signed_by(params, key, &self.issuer).unwrap(),
        }
    }
}
