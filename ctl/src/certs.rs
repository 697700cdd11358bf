//! A private CA and host certificates for replication links.
//!
//! Production sites may use their own PKI; these commands make a CA whose
//! only purpose is dm-replica (the daemons trust nothing else) and issue
//! host certificates whose common name is what target configurations list in
//! `allowed_sources`, and whose DNS name is what sources check as
//! `target_name`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Certificate errors.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// File I/O.
    #[error("{}: {source}", path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Bad name.
    #[error("invalid host name {0:?}: use letters, digits, '-' and '.'")]
    Name(String),
}

impl CertError {
    /// The exit code.
    pub fn exit(&self) -> crate::error::Exit {
        use crate::error::Exit;
        match self {
            Self::Name(_) => Exit::Usage,
            Self::Io { source, .. } => Exit::of_io(source),
            Self::Rcgen(_) => Exit::Failed,
        }
    }
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

/// Creates `ca.pem` and `ca.key` (0600) in `dir`.
pub fn create_ca(dir: &Path, name: &str, days: i64) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "dm-replica");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, days);
    let cert = p.self_signed(&key)?;
    write(&dir.join("ca.key"), &key.serialize_pem(), 0o600)?;
    write(&dir.join("ca.pem"), &cert.pem(), 0o644)
}

fn valid_host(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Issues `<name>.pem` and `<name>.key` (0600) in `out`, signed by the CA
/// in `ca_dir`. The certificate's common name and DNS name are `name`; it is
/// valid for both TLS client and server use (a host can be source or target).
pub fn issue(ca_dir: &Path, out: &Path, name: &str, days: i64) -> Result<(), CertError> {
    if !valid_host(name) {
        return Err(CertError::Name(name.to_owned()));
    }
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_dir.join("ca.pem"))?, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![name.to_owned()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::NoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    validity(&mut p, days);
    let cert = p.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|source| CertError::Io {
        path: out.to_owned(),
        source,
    })?;
    write(
        &out.join(format!("{name}.key")),
        &key.serialize_pem(),
        0o600,
    )?;
    write(&out.join(format!("{name}.pem")), &cert.pem(), 0o644)
}

/// A CA plus one certificate per host, all in `dir`.
pub fn generate(dir: &Path, hosts: &[String], days: i64) -> Result<(), CertError> {
    create_ca(dir, "dm-replica private CA", days.max(3650))?;
    for h in hosts {
        issue(dir, dir, h, days)?;
    }
    Ok(())
}
