//! Which certificate a TLS listener serves: by the client's SNI, exact names first, then
//! one-label wildcards, else the default (also for clients that send no SNI).

use std::collections::HashMap;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{NamePattern, TlsListen};

#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    pub fn new(spec: &TlsListen) -> SniResolver {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (name, c) in &spec.certs {
            match name {
                NamePattern::Exact(n) => exact.insert(n.clone(), c.loaded.certified.clone()),
                NamePattern::Wildcard(s) => wildcard.insert(s.clone(), c.loaded.certified.clone()),
            };
        }
        SniResolver {
            exact,
            wildcard,
            default: spec.default_cert.loaded.certified.clone(),
        }
    }

    fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = sni else {
            return &self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return c;
        }
        if let Some((first, rest)) = name.split_once('.')
            && !first.is_empty()
            && let Some(c) = self.wildcard.get(rest)
        {
            return c;
        }
        &self.default
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()).clone())
    }
}
