//! The hub's certificate authority: issues device certificates at enrolment from a CSR,
//! and (`dev-ca`) makes a development CA and a hub certificate for loopback.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};

/// Certificate handling failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A CSR did not parse or its signature does not verify (device's input).
    #[error("certificate signing request refused: {0}")]
    BadCsr(String),
    /// Key or certificate files could not be read or are not PEM of the right kind.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A CA certificate is not PEM a TLS client can trust.
    #[error("CA certificate: {0}")]
    BadCa(String),
    /// Generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A loaded CA that signs device certificates.
pub struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    /// Every CA certificate in the file: the issuing one first, then any others the hub
    /// also trusts (a CA rollover's overlap). Devices pin these.
    trust_der: Vec<CertificateDer<'static>>,
    /// Life of the certificates issued from now on, in seconds.
    validity_secs: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCa").finish_non_exhaustive()
    }
}

/// Files a development CA run writes.
#[derive(Clone, Debug)]
pub struct DevCaFiles {
    /// CA certificate (PEM): devices pin it; the hub verifies client certificates with it.
    pub ca_cert: PathBuf,
    /// CA private key (PEM, mode 0600).
    pub ca_key: PathBuf,
    /// Hub server certificate (PEM).
    pub hub_cert: PathBuf,
    /// Hub server key (PEM, mode 0600).
    pub hub_key: PathBuf,
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn write_secret(path: &Path, text: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| PkiError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}

fn write_public(path: &Path, text: &str) -> Result<(), PkiError> {
    std::fs::write(path, text).map_err(|e| PkiError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Make a development CA and a hub certificate for `hosts` (DNS names or IP literals)
/// in `dir`. Refuses to overwrite existing keys.
pub fn dev_ca(dir: &Path, hosts: &[String]) -> Result<DevCaFiles, PkiError> {
    std::fs::create_dir_all(dir).map_err(|e| PkiError::File {
        path: dir.to_owned(),
        reason: e.to_string(),
    })?;
    let files = DevCaFiles {
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        hub_cert: dir.join("hub.pem"),
        hub_key: dir.join("hub.key"),
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "carecache development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    ca_params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let hub_key = KeyPair::generate()?;
    let mut hub_params = CertificateParams::new(hosts.to_vec())?;
    hub_params
        .distinguished_name
        .push(DnType::CommonName, "carecache hub");
    hub_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    hub_params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    hub_params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(825);
    let hub_cert = hub_params.signed_by(&hub_key, &issuer)?;

    write_secret(&files.ca_key, &issuer.key().serialize_pem())?;
    write_public(&files.ca_cert, &ca_cert.pem())?;
    write_secret(&files.hub_key, &hub_key.serialize_pem())?;
    write_public(&files.hub_cert, &hub_cert.pem())?;
    Ok(files)
}

impl DeviceCa {
    /// Load the CA certificate and key (PEM).
    pub fn load(cert: &Path, key: &Path, validity_days: i64) -> Result<Self, PkiError> {
        let cert_pem = read(cert)?;
        let key = KeyPair::from_pem(&read(key)?).map_err(|e| PkiError::File {
            path: key.to_owned(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        let trust_der = pem_certs(&cert_pem);
        let cert_der = trust_der.first().cloned().ok_or_else(|| PkiError::File {
            path: cert.to_owned(),
            reason: "no certificate in the file".into(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_der,
            trust_der,
            validity_secs: std::sync::atomic::AtomicI64::new(validity_days.saturating_mul(86_400)),
        })
    }

    /// Certificates issued from now on last `validity` (tests make them short-lived).
    pub fn set_validity(&self, validity: std::time::Duration) {
        self.validity_secs.store(
            i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The CA certificates devices are to pin: the issuing CA, then any other in the CA
    /// file (during a CA rollover, the one being replaced, or the one replacing it).
    pub fn trust_der(&self) -> &[CertificateDer<'static>] {
        &self.trust_der
    }

    /// The CA certificate (DER), sent as the chain at enrolment.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Issue a client certificate for `device_id` from a PKCS#10 request. The request's
    /// own subject and extensions are ignored: the hub decides what it certifies.
    pub fn issue(&self, csr_der: &[u8], device_id: &str) -> Result<Vec<u8>, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, device_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
        params.not_after = time::OffsetDateTime::now_utc()
            + time::Duration::seconds(
                self.validity_secs
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        Ok(cert.der().to_vec())
    }
}

/// Every certificate in a PEM text.
pub fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// A new key pair and a CSR for it (what a device does at enrolment; tests use it).
pub fn make_csr(label: &str) -> Result<(String, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, label);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.der().to_vec()))
}

/// An HTTPS client that trusts only the CA in `ca_pem` and hands back every status (for
/// calling a hub's admin API: the demo, tests and benchmarks).
pub fn agent_trusting(ca_pem: &[u8]) -> Result<ureq::Agent, PkiError> {
    let ca = ureq::tls::Certificate::from_pem(ca_pem)
        .map_err(|e| PkiError::BadCa(e.to_string()))?
        .to_owned();
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
            ca,
        ])))
        .build();
    Ok(ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .build()
        .into())
}
