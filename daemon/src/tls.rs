//! TLS 1.3 with mutual certificates: rustls with the `ring` provider, the
//! private CA as the only trust root, no 0-RTT.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or parsed.
    #[error("{what} {path}: {message}")]
    Pem {
        /// What it should hold.
        what: &'static str,
        /// File.
        path: String,
        /// Why it failed.
        message: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |message: String| TlsError::Pem {
        what,
        path: path.display().to_string(),
        message,
    };
    let v: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if v.is_empty() {
        return Err(pem("no certificate in file".into()));
    }
    Ok(v)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut r = RootCertStore::empty();
    for c in certs(path, "CA certificate")? {
        r.add(c).map_err(TlsError::Rustls)?;
    }
    Ok(r)
}

/// Server side: requires a client certificate issued by the CA.
pub fn server_config(t: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&t.ca)?), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&t.cert, "certificate")?, key(&t.key)?)?;
    cfg.max_early_data_size = 0;
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Client side: trusts only the CA, presents this host's certificate.
pub fn client_config(t: &TlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&t.ca)?)
        .with_client_auth_cert(certs(&t.cert, "certificate")?, key(&t.key)?)?;
    cfg.enable_early_data = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The common name of a certificate's subject.
pub fn subject_cn(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}

/// When the first certificate in a PEM file stops being valid.
pub fn not_after(path: &std::path::Path) -> Result<std::time::SystemTime, TlsError> {
    let c = certs(path, "certificate")?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(c[0].as_ref()).map_err(|e| TlsError::Pem {
            what: "certificate",
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    let ts = cert.validity().not_after.timestamp();
    Ok(std::time::UNIX_EPOCH + std::time::Duration::from_secs(ts.max(0) as u64))
}

/// Warn this long before a certificate expires.
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Reasons to warn about the CA and host certificates of `t`: expiring
/// within [`EXPIRY_WARNING`], or already expired.
pub fn expiry_warnings(t: &TlsConfig, now: std::time::SystemTime) -> Vec<String> {
    let mut out = Vec::new();
    for (what, p) in [("CA certificate", &t.ca), ("certificate", &t.cert)] {
        match not_after(p) {
            Ok(end) if end <= now => out.push(format!("{what} {} has expired", p.display())),
            Ok(end) if end <= now + EXPIRY_WARNING => {
                let days = end
                    .duration_since(now)
                    .map(|d| d.as_secs() / 86400)
                    .unwrap_or(0);
                out.push(format!(
                    "{what} {} expires in {days} day(s): renew it and send SIGHUP",
                    p.display()
                ))
            }
            Ok(_) => {}
            Err(e) => out.push(e.to_string()),
        }
    }
    out
}

/// A TLS configuration that can be replaced at run time (SIGHUP); new
/// connections use the newest one.
pub struct Reloadable<T> {
    current: std::sync::RwLock<Arc<T>>,
}

impl<T> Reloadable<T> {
    /// Wraps a configuration.
    pub fn new(v: Arc<T>) -> Self {
        Self {
            current: std::sync::RwLock::new(v),
        }
    }

    /// The configuration in force.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces it.
    pub fn set(&self, v: Arc<T>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

/// SIGHUP: reloads the keyring and the TLS configuration (built by
/// `build`). What does not load is reported and the material in force kept.
pub fn reload_material<T>(
    keys: &crate::keystore::KeyStore,
    slot: &Reloadable<T>,
    build: impl FnOnce() -> Result<Arc<T>, TlsError>,
) {
    if let Err(e) = keys.reload() {
        tracing::error!(error = %e, "keyring reload failed; keeping the keys in force");
    }
    match build() {
        Ok(c) => {
            slot.set(c);
            tracing::info!("certificates reloaded");
        }
        Err(e) => {
            tracing::error!(error = %e, "certificate reload failed; keeping the certificates in force")
        }
    }
}

/// Logs expiry warnings for the certificates of `t` and shows them in the
/// status of `volumes` (health Warning); clears earlier ones that no longer
/// apply.
pub fn publish_expiry<'a>(
    t: &TlsConfig,
    board: &crate::status::StatusBoard,
    volumes: impl IntoIterator<Item = &'a str>,
) {
    use crate::status::ReasonKind;
    let warnings = expiry_warnings(t, std::time::SystemTime::now());
    for w in &warnings {
        tracing::warn!("{w}");
    }
    for v in volumes {
        board.update(v, |s| {
            if warnings.is_empty() {
                s.clear_reason(ReasonKind::Certificate);
            } else {
                s.set_reason(ReasonKind::Certificate, warnings.join("; "));
            }
        });
    }
}
