//! TLS with rustls (its `ring` provider): terminating clients' TLS on `mode = "tls"`
//! listeners, and originating TLS to the servers of an upstream with `tls`.
//!
//! Configs are built once per listener or upstream (and again on reload) from the checked
//! config; connections share them. Session resumption state (the ticket keys, which rotate,
//! and a bounded session cache) belongs to a listener and survives reloads, unless the
//! client-certificate settings changed: a session is only ever resumed under the settings
//! that verified it, and a resumed session's client certificate is verified again
//! ([`ServerTls::check_peer`]), so resumption never skips client-certificate verification.
//!
//! The data path uses rustls's unbuffered API through [`stream::TlsStream`]: ferry owns
//! every buffer, so an idle TLS connection holds none.

pub mod certs;
mod resolver;
pub mod stream;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::config::{ClientAuth, TlsListen, TlsVersion, UpstreamTls};
use certs::CertInfo;

/// Why a listener's or an upstream's TLS settings cannot be built (a reload is refused,
/// start-up fails).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{}: unusable CA certificate: {error}", path.display())]
    UnusableCa {
        path: std::path::PathBuf,
        error: rustls::Error,
    },
    #[error("{}: {error}", path.display())]
    ClientVerifier {
        path: std::path::PathBuf,
        error: rustls::server::VerifierBuilderError,
    },
    #[error("TLS versions: {0}")]
    Versions(rustls::Error),
    #[error("cannot make session ticket keys: {0}")]
    TicketKeys(rustls::Error),
    #[error(
        "no `ca` given and the system has no CA certificates (install ca-certificates, or set `ca`)"
    )]
    NoSystemRoots,
    #[error("`sni` {name:?}: {error}")]
    Sni {
        name: String,
        error: rustls::pki_types::InvalidDnsNameError,
    },
}

/// Why a client's certificate is refused after the handshake.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no client certificate")]
    Missing,
    #[error("empty client certificate chain")]
    EmptyChain,
    #[error("resumed session's client certificate: {0}")]
    Resumed(rustls::Error),
}

pub use stream::{TlsInfo, TlsStream};

/// Sessions a listener remembers for resumption by session ID (TLS 1.2 clients that do
/// not take tickets); tickets need no server memory.
const SESSION_CACHE: usize = 10_000;

/// The crypto provider: ring with its cipher suites and key exchange groups, AES-128-GCM
/// first: fastest with AES instructions (and with SHA-256 for the key schedule, which
/// CPUs accelerate, unlike SHA-384), and what TLS 1.3 requires every peer to support.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(ordered_provider(false))).clone()
}

/// The provider with ChaCha20-Poly1305 first, for clients that prefer it.
fn chacha_provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(ordered_provider(true))).clone()
}

fn ordered_provider(chacha_first: bool) -> CryptoProvider {
    let mut p = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| {
        let name = s.suite().as_str().unwrap_or("");
        match (name.contains("CHACHA20"), name.contains("AES_128")) {
            (true, _) if chacha_first => 0,
            (_, true) => 1,
            (false, false) => 2,
            (true, _) => 3,
        }
    };
    // Stable: TLS 1.3 suites stay ahead of TLS 1.2 ones where the ranks are equal.
    p.cipher_suites
        .sort_by_key(|s| (s.version() != &rustls::version::TLS13, rank(s)));
    p
}

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    static V13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
    match min {
        TlsVersion::V1_2 => BOTH,
        TlsVersion::V1_3 => V13,
    }
}

/// Resumption state of one listener: kept across reloads while the client-certificate
/// settings stay the same.
pub struct Resumption {
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<ServerSessionMemoryCache>,
    /// The client-authentication settings the sessions were verified under.
    client_auth: Option<(Vec<CertificateDer<'static>>, bool)>,
}

impl Resumption {
    fn new(client_auth: &Option<ClientAuth>) -> Result<Arc<Resumption>, SetupError> {
        Ok(Arc::new(Resumption {
            ticketer: rustls::crypto::ring::Ticketer::new().map_err(SetupError::TicketKeys)?,
            cache: ServerSessionMemoryCache::new(SESSION_CACHE),
            client_auth: auth_key(client_auth),
        }))
    }
}

fn auth_key(a: &Option<ClientAuth>) -> Option<(Vec<CertificateDer<'static>>, bool)> {
    a.as_ref().map(|a| (a.roots.clone(), a.required))
}

/// A certificate a listener serves, for the status page and metrics.
#[derive(Debug, Clone)]
pub struct ServedCert {
    /// The SNI it is chosen for (`*.example.com`), or `default`.
    pub name: String,
    pub info: CertInfo,
}

/// What a `mode = "tls"` listener terminates with.
pub struct ServerTls {
    /// The cipher suites in ferry's order (AES-128-GCM first), the server choosing.
    pub config: Arc<ServerConfig>,
    /// The same with ChaCha20-Poly1305 first: for a client that lists it first (a device
    /// without AES instructions, for which it is much faster).
    pub chacha: Arc<ServerConfig>,
    /// The client-certificate verifier, to verify a resumed session's certificate again.
    verifier: Option<Arc<dyn ClientCertVerifier>>,
    pub required: bool,
    pub certs: Vec<ServedCert>,
    pub resumption: Arc<Resumption>,
}

impl ServerTls {
    /// Builds a listener's TLS settings. `keep` is the listener's resumption state before
    /// a reload: kept if the client-certificate settings did not change.
    pub fn new(spec: &TlsListen, keep: Option<&Arc<Resumption>>) -> Result<ServerTls, SetupError> {
        let resumption = match keep {
            Some(r) if r.client_auth == auth_key(&spec.client_auth) => r.clone(),
            _ => Resumption::new(&spec.client_auth)?,
        };
        let verifier = match &spec.client_auth {
            None => None,
            Some(a) => {
                let mut roots = RootCertStore::empty();
                for c in &a.roots {
                    roots
                        .add(c.clone())
                        .map_err(|error| SetupError::UnusableCa {
                            path: a.ca.clone(),
                            error,
                        })?;
                }
                let mut b =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
                if !a.required {
                    b = b.allow_unauthenticated();
                }
                Some(b.build().map_err(|error| SetupError::ClientVerifier {
                    path: a.ca.clone(),
                    error,
                })?)
            }
        };
        let resolver: Arc<dyn rustls::server::ResolvesServerCert> =
            Arc::new(resolver::SniResolver::new(spec));
        let build = |provider: Arc<CryptoProvider>| -> Result<Arc<ServerConfig>, SetupError> {
            let builder = ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(versions(spec.min_version))
                .map_err(SetupError::Versions)?;
            let builder = match &verifier {
                Some(v) => builder.with_client_cert_verifier(v.clone()),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(resolver.clone());
            config.alpn_protocols = spec.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
            config.ticketer = resumption.ticketer.clone();
            config.session_storage = resumption.cache.clone();
            config.ignore_client_order = true;
            Ok(Arc::new(config))
        };
        let mut certs = vec![ServedCert {
            name: "default".into(),
            info: spec.default_cert.loaded.info.clone(),
        }];
        for (name, c) in &spec.certs {
            certs.push(ServedCert {
                name: name.to_string(),
                info: c.loaded.info.clone(),
            });
        }
        Ok(ServerTls {
            config: build(provider())?,
            chacha: build(chacha_provider())?,
            verifier,
            required: spec.client_auth.as_ref().is_some_and(|a| a.required),
            certs,
            resumption,
        })
    }

    /// The settings for a client whose ClientHello says whether it prefers ChaCha20.
    pub fn config_for(&self, prefers_chacha: bool) -> Arc<ServerConfig> {
        if prefers_chacha {
            self.chacha.clone()
        } else {
            self.config.clone()
        }
    }

    /// After a handshake: a resumed session's client certificate is verified again, now
    /// (it may have expired since); a required certificate must be there.
    pub fn check_peer(
        &self,
        info: &TlsInfo,
        chain: Option<&[CertificateDer<'static>]>,
    ) -> Result<(), PeerError> {
        let Some(verifier) = &self.verifier else {
            return Ok(());
        };
        match chain {
            None if self.required => Err(PeerError::Missing),
            None => Ok(()),
            Some(_) if !info.resumed => Ok(()),
            Some(chain) => {
                let (ee, rest) = chain.split_first().ok_or(PeerError::EmptyChain)?;
                verifier
                    .verify_client_cert(ee, rest, UnixTime::now())
                    .map(|_| ())
                    .map_err(PeerError::Resumed)
            }
        }
    }
}

/// How an upstream connects to its servers over TLS.
#[derive(Debug)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    sni: Option<ServerName<'static>>,
}

impl ClientTls {
    pub fn new(spec: &UpstreamTls) -> Result<ClientTls, SetupError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(TlsVersion::V1_2))
            .map_err(SetupError::Versions)?;
        let builder = if !spec.verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
        } else {
            let mut roots = RootCertStore::empty();
            match &spec.ca {
                Some((path, certs)) => {
                    for c in certs {
                        roots
                            .add(c.clone())
                            .map_err(|error| SetupError::UnusableCa {
                                path: path.clone(),
                                error,
                            })?;
                    }
                }
                None => {
                    let (n, _) = roots.add_parsable_certificates(system_roots().iter().cloned());
                    if n == 0 {
                        return Err(SetupError::NoSystemRoots);
                    }
                }
            }
            builder.with_root_certificates(roots)
        };
        // Always our resolver, with or without a certificate: it tells the session that the
        // server asked for one (see `stream::TlsStream::confirm`).
        let resolver = ClientCertResolver {
            key: spec
                .client_cert
                .as_ref()
                .map(|c| c.loaded.certified.clone()),
        };
        let mut config = builder.with_client_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = spec.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let sni = match &spec.sni {
            Some(s) => Some(
                ServerName::try_from(s.clone()).map_err(|error| SetupError::Sni {
                    name: s.clone(),
                    error,
                })?,
            ),
            None => None,
        };
        Ok(ClientTls {
            config: Arc::new(config),
            sni,
        })
    }

    /// The name to send and verify for a server configured as `configured`
    /// (`"host:port"`, `"ip:port"` or `"srv:NAME"`) at `ip`. For an SRV name, its domain
    /// without the `_service._proto` labels (RFC 6125's source domain:
    /// `srv:_pg._tcp.db.example` → `db.example`).
    pub fn server_name(&self, configured: &str, ip: IpAddr) -> ServerName<'static> {
        if let Some(n) = &self.sni {
            return n.clone();
        }
        let host = match configured.strip_prefix("srv:").map(srv_domain) {
            Some(d) => d,
            None => configured
                .rsplit_once(':')
                .map_or(configured, |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']'),
        };
        match host.parse::<IpAddr>() {
            Ok(_) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.to_string())
                .unwrap_or_else(|_| ServerName::IpAddress(ip.into())),
        }
    }
}

/// An SRV name's service domain: the name without its leading `_service._proto` labels
/// (and a trailing dot).
fn srv_domain(name: &str) -> &str {
    let mut rest = name.trim_end_matches('.');
    while rest.starts_with('_') {
        rest = rest.split_once('.').map_or("", |(_, r)| r);
    }
    rest
}

thread_local! {
    /// Set when a server asks this thread's TLS client for a certificate: a handshake is
    /// driven synchronously on one thread, so the session reads it right after each step.
    static CERT_ASKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a server asked for a client certificate since the last call (and forgets it).
pub(crate) fn take_cert_asked() -> bool {
    CERT_ASKED.with(|c| c.replace(false))
}

/// The upstream's client certificate, if any, and a note that the server asked for one.
#[derive(Debug)]
struct ClientCertResolver {
    key: Option<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::client::ResolvesClientCert for ClientCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        CERT_ASKED.with(|c| c.set(true));
        self.key.clone()
    }

    fn has_certs(&self) -> bool {
        self.key.is_some()
    }
}

/// The system's trust anchors, read once.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let r = rustls_native_certs::load_native_certs();
        for e in r.errors.iter().take(3) {
            tracing::warn!("reading the system's CA certificates: {e}");
        }
        r.certs
    })
}

/// `verify = false`: any server certificate is accepted (the handshake's signatures are
/// still checked, so the session is encrypted to whoever holds that certificate's key).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_srv_names_domain_is_what_follows_its_service_labels() {
        assert_eq!(
            srv_domain("_pg._tcp.db.service.consul"),
            "db.service.consul"
        );
        assert_eq!(srv_domain("_pg._tcp.db.example."), "db.example");
        assert_eq!(srv_domain("db.example"), "db.example");
        assert_eq!(srv_domain("_a._b"), "");
        assert_eq!(srv_domain("_a.b._c.d"), "b._c.d");
    }
}
