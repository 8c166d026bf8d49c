//! TLS termination: certificate loading, SNI selection and the rustls server configuration.
//!
//! Certificates are loaded and checked (parseable, key matches) during config validation, so
//! `check` catches a bad pair and a reload never publishes one. A listener's acceptor is built
//! from the validated [`ListenerTls`] and swapped as a whole on reload; established
//! connections keep the configuration they started with.

use crate::config::{ListenerConfig, ListenerTls, TlsVersion};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long before a served certificate expires start-up and reloads begin to warn of it:
/// time to notice a renewal that failed and to do it by hand.
const EXPIRY_NOTICE: Duration = Duration::from_secs(14 * 86_400);

/// ALPN identifiers offered to clients, HTTP/2 first.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN identifier for HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Installs the process-wide crypto provider (aws-lc-rs). Idempotent.
///
/// With more than one provider compiled in, rustls cannot pick one and its builders panic;
/// installing explicitly at start-up removes that trap.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A certificate chain and its key, loaded from PEM files and checked to belong together.
#[derive(Debug)]
pub struct LoadedCertificate {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// DNS names from the leaf's subjectAltName (or its CN), lower-cased; `*.x` for wildcards.
    pub names: Vec<String>,
    /// The leaf's notAfter, in Unix seconds.
    pub not_after: i64,
    pub certified_key: Arc<CertifiedKey>,
}

/// Why a certificate pair could not be loaded, and which of its files it is about (so the
/// problem is placed at the `cert` or `key` line, or at the pair when they do not match).
#[derive(Debug)]
pub struct LoadError {
    /// `Some("cert")` or `Some("key")`: the key of the file at fault; `None`: the pair.
    pub file: Option<&'static str>,
    pub message: String,
}

impl LoadError {
    fn cert(message: String) -> Self {
        LoadError {
            file: Some("cert"),
            message,
        }
    }

    fn key(message: String) -> Self {
        LoadError {
            file: Some("key"),
            message,
        }
    }
}

impl LoadedCertificate {
    /// Reads `cert` (a PEM chain, leaf first) and `key` (PEM), and checks they match.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, LoadError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|error| {
                LoadError::cert(format!(
                    "cannot read certificate \"{}\": {error}",
                    cert.display()
                ))
            })?
            .collect::<Result<_, _>>()
            .map_err(|error| {
                LoadError::cert(format!(
                    "cannot parse certificate \"{}\": {error}",
                    cert.display()
                ))
            })?;
        let leaf = chain.first().ok_or_else(|| {
            LoadError::cert(format!("no certificate found in \"{}\"", cert.display()))
        })?;
        let (names, not_after) = leaf_names_and_expiry(leaf).map_err(|error| {
            LoadError::cert(format!(
                "cannot parse certificate \"{}\": {error}",
                cert.display()
            ))
        })?;
        let private_key = PrivateKeyDer::from_pem_file(key).map_err(|error| {
            LoadError::key(format!(
                "cannot read private key \"{}\": {error}",
                key.display()
            ))
        })?;
        let signing_key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&private_key)
            .map_err(|error| {
                LoadError::key(format!(
                    "unsupported private key \"{}\": {error}",
                    key.display()
                ))
            })?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        certified_key.keys_match().map_err(|_| LoadError {
            file: None,
            message: format!(
                "private key \"{}\" does not match certificate \"{}\"",
                key.display(),
                cert.display()
            ),
        })?;
        Ok(LoadedCertificate {
            cert_path: cert.to_path_buf(),
            key_path: key.to_path_buf(),
            names,
            not_after,
            certified_key: Arc::new(certified_key),
        })
    }

    /// What to tell an operator of this certificate's expiry at `now`; `None` while it is
    /// further away than [`EXPIRY_NOTICE`].
    pub fn expiry_warning(&self, now: SystemTime) -> Option<String> {
        const DAY: u64 = 86_400;
        let expiry = u64::try_from(self.not_after).map_or(UNIX_EPOCH, |seconds| {
            UNIX_EPOCH + Duration::from_secs(seconds)
        });
        let date = httpdate::fmt_http_date(expiry);
        match expiry.duration_since(now) {
            Ok(left) if left > EXPIRY_NOTICE => None,
            Ok(left) => Some(format!(
                "certificate expires on {date}, in {} day(s): renew it",
                left.as_secs().div_ceil(DAY)
            )),
            Err(past) => Some(format!(
                "certificate expired on {date}, {} day(s) ago: clients refuse it; replace it",
                past.duration().as_secs() / DAY
            )),
        }
    }
}

/// Logs a warning for every served certificate that expired or expires within
/// [`EXPIRY_NOTICE`]: at start and on each reload, so the operator starting or changing the
/// service reads it (for the time between, alert on
/// `gatehouse_tls_certificate_expiry_timestamp_seconds`).
pub fn warn_of_expiry(listeners: &[ListenerConfig]) {
    let now = SystemTime::now();
    for listener in listeners {
        for certificate in listener.certificates() {
            if let Some(warning) = certificate.expiry_warning(now) {
                tracing::warn!(
                    listener = %listener.name,
                    certificate = %certificate.cert_path.display(),
                    "{warning}"
                );
            }
        }
    }
}

fn leaf_names_and_expiry(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|error| error.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = parsed.subject().iter_common_name().next() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_ascii_lowercase());
            }
        }
    }
    Ok((names, parsed.validity().not_after.timestamp()))
}

/// The subject distinguished name of a (verified) client certificate, RFC 4514 style.
pub fn certificate_subject(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    Some(parsed.subject().to_string())
}

/// Reads a PEM bundle of CA certificates.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| format!("cannot read CA bundle \"{}\": {error}", path.display()))?;
    for certificate in certificates {
        let certificate = certificate
            .map_err(|error| format!("cannot parse CA bundle \"{}\": {error}", path.display()))?;
        roots
            .add(certificate)
            .map_err(|error| format!("invalid CA in \"{}\": {error}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("no CA certificate found in \"{}\"", path.display()));
    }
    Ok(roots)
}

/// Chooses a certificate by SNI: exact name, then a `*.` wildcard one label deep, else the
/// first certificate (also used when the client sends no SNI).
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// Builds the lookup maps; earlier certificates win when names overlap.
    pub fn new(certificates: &[Arc<LoadedCertificate>]) -> Option<Self> {
        let default = certificates.first()?.certified_key.clone();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for certificate in certificates {
            for name in &certificate.names {
                let key = certificate.certified_key.clone();
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()).or_insert(key),
                    None => exact.entry(name.clone()).or_insert(key),
                };
            }
        }
        Some(SniResolver {
            exact,
            wildcard,
            default,
        })
    }

    /// The certificate for `server_name` (already lower-case, as rustls hands it over).
    pub fn choose(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return self.default.clone();
        };
        if let Some(key) = self.exact.get(name) {
            return key.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.choose(client_hello.server_name()))
    }
}

/// Builds the rustls configuration for a listener: SNI, ALPN (h2 and http/1.1 when
/// `offer_http` is set), minimum version, optional client certificates and resumption.
pub fn server_config(tls: &ListenerTls, offer_http: bool) -> Result<Arc<ServerConfig>, String> {
    let resolver = SniResolver::new(&tls.certificates)
        .ok_or_else(|| "at least one certificate is required".to_string())?;
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_protocol_versions(versions);
    let builder = match &tls.client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder(Arc::new(load_roots(ca)?));
            let verifier = if tls.client_auth_required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|error| format!("invalid client_ca: {error}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    // The server's preference (rustls's order: AES-256-GCM, AES-128-GCM, ChaCha20) wins.
    config.ignore_client_order = true;
    if offer_http {
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
    }
    if tls.session_resumption {
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|error| format!("cannot create session ticketer: {error}"))?;
    } else {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}
