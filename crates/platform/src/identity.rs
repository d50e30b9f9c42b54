//! Service identities: which Hafen service a caller is, by its client certificate. Each
//! service's certificate names it among its DNS names as `hafen-<service>`; rustls has
//! verified the certificate against the service CA before anything here looks at it.

use rustls::pki_types::{CertificateDer, ServerName};

/// The service among `allowed` (short names such as `"retention"`) whose name the leaf
/// certificate of `certs` carries as `hafen-<service>`; `None` when it names none of them.
pub fn service_of(certs: &[CertificateDer<'_>], allowed: &[&'static str]) -> Option<&'static str> {
    let leaf = certs.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    allowed.iter().copied().find(|service| {
        ServerName::try_from(format!("hafen-{service}"))
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    })
}
