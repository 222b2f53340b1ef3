//! Certificates and keys from PEM files: loaded once, checked (the key matches the
//! certificate, the names it is configured for are covered), and described (subject, names,
//! validity) for the logs, the metrics and the status page.
//!
//! Keys may be PKCS#8, SEC1 (EC) or PKCS#1 (RSA), as `PRIVATE KEY`, `EC PRIVATE KEY` or `RSA
//! PRIVATE KEY` blocks. A key is never printed: `Debug` shows the certificate only.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;

/// What an operator wants to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The subject's distinguished name, e.g. `CN=example.com`.
    pub subject: String,
    /// The DNS names and IP addresses it is issued for (subjectAltName).
    pub names: Vec<String>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// A certificate chain with its private key, ready to serve.
#[derive(Clone)]
pub struct CertKey {
    /// The end-entity certificate first, then its intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pub info: CertInfo,
    /// The chain with its signing key, as rustls serves it.
    pub certified: Arc<CertifiedKey>,
}

impl fmt::Debug for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertKey")
            .field("info", &self.info)
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Equal when the same certificates and the same key were loaded: a reload that finds the
/// files changed builds the listener's TLS settings anew.
impl PartialEq for CertKey {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.key.secret_der() == other.key.secret_der()
    }
}

impl CertKey {
    /// The private key (for rustls only; never logged).
    pub fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }
}

/// Loads a certificate chain and its key. `Err` says what is wrong, for the config error.
pub fn load_cert_key(cert_path: &Path, key_path: &Path) -> Result<CertKey, KeyError> {
    let chain = load_certs(cert_path).map_err(KeyError::Cert)?;
    let key = load_key(key_path).map_err(KeyError::Key)?;
    let info = describe(&chain[0]).map_err(KeyError::Cert)?;
    let certified = CertifiedKey::from_der(chain.clone(), key.clone_key(), &super::provider())
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => KeyError::Key(format!(
                "the key in {} does not belong to the certificate in {}",
                key_path.display(),
                cert_path.display()
            )),
            e => KeyError::Key(format!("{}: unusable key: {e}", key_path.display())),
        })?;
    Ok(CertKey {
        chain,
        key: Arc::new(key),
        info,
        certified: Arc::new(certified),
    })
}

/// Which file of a certificate and key pair is at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Cert(String),
    Key(String),
}

/// Every certificate in a PEM file, in order; at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected a -----BEGIN CERTIFICATE----- block)",
            path.display()
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        describe(c).map_err(|e| format!("{}: certificate {}: {e}", path.display(), i + 1))?;
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path)?;
    if bytes.windows(b"ENCRYPTED".len()).any(|w| w == b"ENCRYPTED") {
        return Err(format!(
            "{}: the key is encrypted; ferry needs it unencrypted (protect the file instead)",
            path.display()
        ));
    }
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        format!(
            "{}: no private key in it (expected a PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block): {e}",
            path.display()
        )
    })
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The subject, names and validity of a DER certificate.
pub fn describe(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    16 => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Whether the end-entity certificate of `ck` is valid for `name` (a host name, or a
/// one-label wildcard `*.example.com`, checked as a name under it).
pub fn covers(ck: &CertKey, name: &str) -> bool {
    let probe = match name.strip_prefix("*.") {
        Some(rest) => format!("ferry-name-check.{rest}"),
        None => name.to_string(),
    };
    let Ok(server_name) = ServerName::try_from(probe.as_str()) else {
        return false;
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(&ck.chain[0]) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&server_name).is_ok()
}

/// How long until `not_after`, as an operator reads it: "5 day(s)", "12 hour(s)".
pub fn time_left(info: &CertInfo) -> String {
    let left = seconds_left(info);
    if left >= 2 * 86400 {
        format!("{} day(s)", left / 86400)
    } else {
        format!("{} hour(s)", left.max(0) / 3600)
    }
}

/// Seconds from now until `not_after` (negative once expired).
pub fn seconds_left(info: &CertInfo) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    info.not_after - now
}

/// A private key file others may read is worth a warning (not an error: the operator may
/// have reasons, such as a group-readable file in a container).
pub fn key_file_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "private key {} is readable by every user (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )
    })
}
