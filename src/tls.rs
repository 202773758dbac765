//! TLS on both sides. Agent side: a CA (minted in memory or loaded) signs a leaf certificate per
//! host, each with its own key, cached and bounded. Upstream side: a client config that always
//! verifies, trusting the system roots plus `extra_roots` (added, never substituted).

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::host::Host;

/// When the cache mints a fresh leaf, and how long a leaf is valid: no longer than the cache
/// needs it plus an hour, so a leaf that leaks out of memory is worth little.
const LEAF_REMINT_AFTER: Duration = Duration::from_secs(24 * 3600);
const LEAF_LIFETIME: Duration = Duration::from_secs(25 * 3600);
/// Certificates are backdated this much to tolerate clock skew between agent and proxy.
const BACKDATE: Duration = Duration::from_secs(3600);
const CA_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable PEM {what}")]
    BadPem { path: PathBuf, what: &'static str },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider keystamp uses everywhere (explicit, so no process default is needed):
/// ring's, with TLS 1.3's AES-128-GCM/SHA-256 first, as BoringSSL and Go order it. rustls
/// puts AES-256-GCM/SHA-384 first, whose SHA-384 key schedule was a quarter of the CPU of an
/// agent's TLS handshake (callgrind); SHA-256 runs on the CPU's SHA extensions where present.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// The per-pod CA that signs leaf certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl CertificateAuthority {
    /// A fresh CA that exists only in this process's memory.
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "keystamp per-pod CA");
        name.push(DnType::OrganizationName, "keystamp");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads an existing CA certificate and key (PEM).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let cert_pem = read_text(cert_path)?;
        let key_pem = read_text(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| TlsError::BadPem {
            path: key_path.to_path_buf(),
            what: "private key",
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|_| TlsError::BadPem {
            path: cert_path.to_path_buf(),
            what: "CA certificate",
        })?;
        Ok(Self { issuer, cert_pem })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Mints a leaf for `host` with a key of its own (never the CA's).
    fn mint_leaf(
        &self,
        host: &str,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + LEAF_LIFETIME;
        let cert = params.signed_by(&key, &self.issuer)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((cert.der().clone(), key_der))
    }
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertificateAuthority { key: [redacted] }")
    }
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Server configs for intercepted hosts, one leaf each, least recently used evicted.
pub struct LeafCache {
    ca: CertificateAuthority,
    provider: Arc<CryptoProvider>,
    cache: Mutex<LruCache<Host, (Arc<ServerConfig>, Instant)>>,
}

impl LeafCache {
    pub fn new(ca: CertificateAuthority, capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            ca,
            provider: provider(),
            cache: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// The server config presenting a leaf for `host`, minted on first use.
    pub fn server_config(&self, host: &Host) -> Result<Arc<ServerConfig>, TlsError> {
        if let Ok(mut cache) = self.cache.lock() {
            if let Some((config, minted)) = cache.get(host) {
                if minted.elapsed() < LEAF_REMINT_AFTER {
                    return Ok(config.clone());
                }
            }
        }
        // Minted outside the lock: two racing handshakes may both mint, which is harmless.
        let (cert, key) = self.ca.mint_leaf(host.as_str())?;
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        // keystamp's cipher suite order, not the agent's (most agents ask for AES-256 first).
        config.ignore_client_order = true;
        // One TLS 1.3 ticket per handshake, not rustls' two: a client spends each ticket once,
        // so one per connection keeps a client that reconnects resuming, and the second was
        // three getrandom calls, an encryption and a cache entry nobody used.
        config.send_tls13_tickets = 1;
        let config = Arc::new(config);
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(host.clone(), (config.clone(), Instant::now()));
        }
        Ok(config)
    }
}

/// The trust store for upstream connections: system roots plus `extra_roots`. A missing or
/// unreadable extra root is logged and skipped: trusting less fails closed.
pub fn upstream_roots(extra_roots: &[PathBuf]) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    if !native.errors.is_empty() {
        tracing::debug!(
            errors = native.errors.len(),
            "some system root certificates could not be loaded"
        );
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "system roots loaded");
    for path in extra_roots {
        let certs: Result<Vec<_>, _> = match CertificateDer::pem_file_iter(path) {
            Ok(iter) => iter.collect(),
            Err(error) => Err(error),
        };
        match certs {
            Ok(certs) if !certs.is_empty() => {
                let (added, _) = roots.add_parsable_certificates(certs);
                tracing::info!(path = %path.display(), added, "extra upstream roots loaded");
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "extra_roots file holds no certificate")
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "extra_roots file skipped")
            }
        }
    }
    roots
}

/// The system roots (as `rustls-native-certs` finds them) followed by `ca_pem`, as one PEM
/// bundle: what Python, curl and OpenSSL-based runtimes take in a single file.
pub fn combined_bundle(ca_pem: &str) -> String {
    let mut bundle = String::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        bundle.push_str("-----BEGIN CERTIFICATE-----\n");
        let encoded =
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, cert.as_ref());
        for line in encoded.as_bytes().chunks(64) {
            bundle.push_str(&String::from_utf8_lossy(line));
            bundle.push('\n');
        }
        bundle.push_str("-----END CERTIFICATE-----\n");
    }
    bundle.push_str(ca_pem);
    bundle
}

/// A verifying client config offering the given ALPN protocols.
pub fn upstream_client_config(
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
