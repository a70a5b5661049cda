//! Which certificate authorities the driver trusts for `https`, and the extra ones a private
//! deployment adds. The reasons behind the default are in [`crate::defaults`].

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The roots the driver's own agent trusts to verify a homeserver's certificate
/// ([`DriverConfig::trust_roots`](crate::DriverConfig::trust_roots)). Ignored when the
/// application gives its own agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TrustRoots {
    /// Mozilla's root program, compiled into the binary (`webpki-roots`): the same trust on
    /// every machine, whatever its store holds or lacks. The default.
    #[default]
    Bundled,
    /// The operating system's trust store and verifier (`rustls-platform-verifier`): on Linux
    /// the store's certificate files (`SSL_CERT_FILE` and `SSL_CERT_DIR` override where they
    /// are, as for OpenSSL), on macOS and Windows the system verifier with its policies and
    /// the CAs an administrator installed. Extra CAs cannot be added to it: a start with both
    /// is refused ([`ConfigError::Invalid`](crate::ConfigError::Invalid) with field
    /// `extra_ca`); install the CA in the store, or use `Bundled` with the extra CA.
    Platform,
}

/// A CA certificate to trust besides the [`TrustRoots`], from
/// [`DriverConfig::add_ca_pem`](crate::DriverConfig::add_ca_pem) (already checked to be a
/// certificate usable as a root).
#[derive(Clone, PartialEq, Eq)]
pub struct CaCertificate(Arc<CertificateDer<'static>>);

impl CaCertificate {
    /// Every certificate in `pem` (`-----BEGIN CERTIFICATE-----` sections; other sections,
    /// such as keys, and text between them are skipped), each checked to be usable as a trust
    /// root.
    pub fn from_pem(pem: &[u8]) -> Result<Vec<CaCertificate>, CaPemError> {
        let mut certificates = Vec::new();
        for (index, item) in CertificateDer::pem_slice_iter(pem).enumerate() {
            let der = item.map_err(|e| CaPemError::Malformed {
                reason: pem_reason(&e),
            })?;
            let mut check = rustls::RootCertStore::empty();
            if check.add(der.clone()).is_err() {
                return Err(CaPemError::NotUsableAsRoot { index });
            }
            certificates.push(CaCertificate(Arc::new(der)));
        }
        if certificates.is_empty() {
            return Err(CaPemError::NoCertificate);
        }
        Ok(certificates)
    }

    /// The certificate in DER.
    pub fn der(&self) -> &[u8] {
        self.0.as_ref()
    }
}

impl std::fmt::Debug for CaCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CaCertificate")
            .field(&format_args!("{} bytes of DER", self.0.len()))
            .finish()
    }
}

/// Why [`DriverConfig::add_ca_pem`](crate::DriverConfig::add_ca_pem) (or
/// [`CaCertificate::from_pem`]) refused a PEM. Nothing was added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaPemError {
    /// No `-----BEGIN CERTIFICATE-----` section: an empty file, a file of the wrong kind (a
    /// private key alone, a DER file, a certificate request), or the wrong path. Give the
    /// CA's certificate in PEM, the file a private CA hands out to its clients.
    #[error("the PEM holds no certificate (a BEGIN CERTIFICATE section)")]
    NoCertificate,
    /// A section is cut or corrupted (no END line, bad base64, a broken BEGIN line): the file
    /// was truncated or edited; fetch it again.
    #[error("the PEM is malformed: {reason}")]
    Malformed {
        /// What is wrong, in general terms.
        reason: &'static str,
    },
    /// The certificate at `index` (counting from 0 among the file's certificates) does not
    /// parse as an X.509 certificate usable as a trust root: not a CA certificate file.
    #[error("certificate {index} of the PEM cannot be used as a trust root")]
    NotUsableAsRoot {
        /// Its position among the file's certificates.
        index: usize,
    },
}

fn pem_reason(error: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error as E;
    match error {
        E::MissingSectionEnd { .. } => "a section has no END line",
        E::IllegalSectionStart { .. } => "a BEGIN line is not well formed",
        E::Base64Decode(_) => "a section is not valid base64",
        E::SectionTooLarge => "a section is larger than 256 MB",
        _ => "it could not be read",
    }
}

/// Extra CA certificates need the bundled roots: the platform's verifier takes none. Both
/// the driver's and the reactor's configuration are checked by this.
pub(crate) fn check_extra_ca(
    roots: TrustRoots,
    extra: &[CaCertificate],
) -> Result<(), crate::ConfigError> {
    if roots == TrustRoots::Platform && !extra.is_empty() {
        return Err(crate::ConfigError::Invalid {
            field: "extra_ca",
            reason: "extra CA certificates cannot be added to the platform's trust store \
                     (TrustRoots::Platform): install the CA in that store, or use \
                     TrustRoots::Bundled with the extra CA",
        });
    }
    Ok(())
}

/// The `RootCerts` of ureq for these roots and extra CAs; `None` for a combination ureq cannot
/// build (the platform verifier with extra CAs, refused at validation).
pub(crate) fn root_certs(
    roots: TrustRoots,
    extra: &[CaCertificate],
) -> Option<ureq::tls::RootCerts> {
    use ureq::tls::{Certificate, RootCerts};
    match (roots, extra.is_empty()) {
        (TrustRoots::Bundled, true) => Some(RootCerts::WebPki),
        (TrustRoots::Platform, true) => Some(RootCerts::PlatformVerifier),
        // ureq's bundled roots are trust anchors, which cannot be mixed with certificates:
        // the same Mozilla set comes as certificates from `webpki-root-certs`.
        (TrustRoots::Bundled, false) => {
            let bundled = webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter();
            let certs = bundled
                .map(|c| Certificate::from_der(c.as_ref()).to_owned())
                .chain(
                    extra
                        .iter()
                        .map(|c| Certificate::from_der(c.der()).to_owned()),
                );
            Some(RootCerts::Specific(Arc::new(certs.collect())))
        }
        (TrustRoots::Platform, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pem_without_a_certificate_is_refused_with_its_cause() {
        assert_eq!(CaCertificate::from_pem(b""), Err(CaPemError::NoCertificate));
        let key =
            b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        assert_eq!(CaCertificate::from_pem(key), Err(CaPemError::NoCertificate));
        let cut = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
        assert!(matches!(
            CaCertificate::from_pem(cut),
            Err(CaPemError::Malformed { .. })
        ));
        let junk = b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        assert_eq!(
            CaCertificate::from_pem(junk),
            Err(CaPemError::NotUsableAsRoot { index: 0 })
        );
    }

    #[test]
    fn bundled_roots_with_an_extra_ca_keep_every_bundled_root() {
        let extra = [CaCertificate(Arc::new(
            webpki_root_certs::TLS_SERVER_ROOT_CERTS[0].clone(),
        ))];
        let Some(ureq::tls::RootCerts::Specific(certs)) = root_certs(TrustRoots::Bundled, &extra)
        else {
            panic!("specific roots")
        };
        assert_eq!(
            certs.len(),
            webpki_root_certs::TLS_SERVER_ROOT_CERTS.len() + 1
        );
        assert!(root_certs(TrustRoots::Platform, &extra).is_none());
        assert!(matches!(
            root_certs(TrustRoots::Bundled, &[]),
            Some(ureq::tls::RootCerts::WebPki)
        ));
    }
}
