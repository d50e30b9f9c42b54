//! TLS material for servers and clients (rustls with the ring provider; clients through
//! tonic, servers through [`crate::server`]'s own acceptor).
//!
//! Certificates come from files named by [`TlsArgs`]. Without them, a development CA and one
//! certificate per service are generated once under `--dev-certs-dir`; the CA's private key is
//! never written to disk, so nothing can sign further certificates with it.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::TlsArgs;
use crate::error::{Error, Result};

/// The short names of Hafen's services; each gets its own development certificate.
pub const SERVICES: [&str; 6] = [
    "auth",
    "messaging",
    "tenant",
    "retention",
    "audit",
    "webchat",
];

/// The DNS name every development certificate carries, and the name clients verify by default.
pub const DEV_SERVER_NAME: &str = "localhost";

/// How long a TLS handshake may take before the connection is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// PEM-encoded TLS material of one service: its certificate chain, its key and the CA that
/// signs Hafen's certificates.
#[derive(Clone)]
pub struct TlsMaterial {
    /// PEM certificate of the CA peers and clients are verified against.
    pub ca_pem: String,
    /// PEM certificate chain this service presents.
    pub cert_pem: String,
    /// PEM private key of `cert_pem`.
    pub key_pem: String,
    /// Whether client certificates are verified and presented (mutual TLS between services).
    pub mtls: bool,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("mtls", &self.mtls)
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Loads the material `args` names for `service` (one of [`SERVICES`]), generating the
    /// development certificates first when no certificate is configured.
    pub fn load(args: &TlsArgs, service: &str) -> Result<Self> {
        let (cert, key, ca) = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                let ca = args.tls_ca.clone().ok_or_else(|| {
                    Error::Config("--tls-ca is required together with --tls-cert".into())
                })?;
                (cert.clone(), key.clone(), ca)
            }
            (None, None) => {
                let dir = &args.dev_certs_dir;
                ensure_dev_certs(dir)?;
                tracing::warn!(
                    dir = %dir.display(),
                    service,
                    "no certificate configured: using generated development certificates"
                );
                let ca = args.tls_ca.clone().unwrap_or_else(|| dir.join("ca.pem"));
                (
                    dir.join(format!("{service}.pem")),
                    dir.join(format!("{service}-key.pem")),
                    ca,
                )
            }
            _ => {
                return Err(Error::Config(
                    "--tls-cert and --tls-key must be given together".into(),
                ));
            }
        };
        Ok(Self {
            ca_pem: read_pem(&ca)?,
            cert_pem: read_pem(&cert)?,
            key_pem: read_pem(&key)?,
            mtls: args.mtls,
        })
    }

    /// The listener side: this service's identity; with mTLS, client certificates signed by
    /// the CA are verified when presented. They stay optional because SDK clients have none;
    /// RPCs reserved for services check for one themselves. ALPN offers HTTP/2 first (gRPC)
    /// and HTTP/1.1 (gRPC-Web from browsers and proxies that speak only HTTP/1.1).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let bad = |what: &str| Error::Config(format!("the TLS {what} is not valid PEM"));
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| bad("certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|_| bad("private key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        let builder = if self.mtls {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
                roots
                    .add(ca.map_err(|_| bad("CA certificate"))?)
                    .map_err(|e| Error::Config(format!("the TLS CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::Config(format!("TLS client verification: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| Error::Config(format!("the TLS certificate and key: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The calling side, for calls to other Hafen services: trusts only the CA and, with mTLS,
    /// presents this service's certificate. `server_name` is the name the peer's certificate
    /// must carry.
    pub fn client_config(&self, server_name: &str) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(server_name)
            .timeout(HANDSHAKE_TIMEOUT);
        if self.mtls {
            config.identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
        } else {
            config
        }
    }

    /// A lazily connected channel to another Hafen service at `url` (`https://host:port`),
    /// over [`TlsMaterial::client_config`]. The peer's certificate must carry `server_name`,
    /// by default the URL's host. Calls give up after `timeout`.
    pub fn internal_channel(
        &self,
        url: &str,
        server_name: Option<&str>,
        timeout: std::time::Duration,
    ) -> std::result::Result<tonic::transport::Channel, tonic::transport::Error> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?;
        let server_name = server_name
            .map(str::to_owned)
            .or_else(|| {
                endpoint
                    .uri()
                    .host()
                    .map(|h| h.trim_matches(['[', ']']).to_owned())
            })
            .unwrap_or_else(|| DEV_SERVER_NAME.to_owned());
        Ok(endpoint
            .tls_config(self.client_config(&server_name))?
            .connect_timeout(std::time::Duration::from_secs(2))
            .timeout(timeout)
            .connect_lazy())
    }
}

fn read_pem(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })
}

/// A freshly generated development PKI: a CA certificate and one certificate per service.
pub struct DevPki {
    /// PEM certificate of the CA.
    pub ca_pem: String,
    /// `(service, certificate PEM, key PEM)` for each requested service.
    pub services: Vec<(String, String, String)>,
}

impl std::fmt::Debug for DevPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevPki").finish_non_exhaustive()
    }
}

impl DevPki {
    /// Generates a CA named `ca_name` and a certificate for each service, valid for
    /// `localhost`, `127.0.0.1`, `::1` and `hafen-<service>`, for both server and client use.
    pub fn generate(ca_name: &str, services: &[&str]) -> Result<Self> {
        let now = time::OffsetDateTime::now_utc();
        let not_before = now - time::Duration::days(1);
        let not_after = now + time::Duration::days(365);

        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        ca_params
            .distinguished_name
            .push(DnType::OrganizationName, "Hafen development");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params.not_before = not_before;
        ca_params.not_after = not_after;
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut out = Vec::with_capacity(services.len());
        for service in services {
            let mut params = CertificateParams::new(vec![
                DEV_SERVER_NAME.to_owned(),
                format!("hafen-{service}"),
            ])?;
            params.subject_alt_names.extend([
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ]);
            params
                .distinguished_name
                .push(DnType::CommonName, format!("hafen-{service}"));
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            params.not_before = not_before;
            params.not_after = not_after;
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            out.push(((*service).to_owned(), cert.pem(), key.serialize_pem()));
        }
        Ok(Self {
            ca_pem: ca_cert.pem(),
            services: out,
        })
    }

    /// Writes `ca.pem`, `<service>.pem` and `<service>-key.pem` (mode 0600) into `dir`.
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).map_err(|source| Error::Io {
            context: format!("creating {}", dir.display()),
            source,
        })?;
        write_file(&dir.join("ca.pem"), &self.ca_pem, 0o644)?;
        for (service, cert, key) in &self.services {
            write_file(&dir.join(format!("{service}.pem")), cert, 0o644)?;
            write_file(&dir.join(format!("{service}-key.pem")), key, 0o600)?;
        }
        Ok(())
    }
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let io = |source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// Makes sure `dir` holds a complete development PKI for every service in [`SERVICES`].
///
/// Safe to call from several processes at once: the set is generated in a private directory
/// and renamed into place, so every caller sees either nothing or a complete set.
pub fn ensure_dev_certs(dir: &Path) -> Result<()> {
    if is_complete(dir) {
        return Ok(());
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|source| Error::Io {
        context: format!("creating {}", parent.display()),
        source,
    })?;
    let staging: PathBuf = parent.join(format!(
        ".certs-staging-{}-{}",
        std::process::id(),
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    ));
    DevPki::generate("Hafen development CA", &SERVICES)?.write_to(&staging)?;
    // Renaming onto a missing or empty directory succeeds; if another process won the race,
    // its complete set stays and ours is discarded.
    let renamed = fs::rename(&staging, dir);
    if renamed.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    if is_complete(dir) {
        tracing::info!(dir = %dir.display(), "development certificates ready");
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{} exists but lacks development certificates; remove it to regenerate",
            dir.display()
        )))
    }
}

fn is_complete(dir: &Path) -> bool {
    dir.join("ca.pem").is_file()
        && SERVICES.iter().all(|s| {
            dir.join(format!("{s}.pem")).is_file() && dir.join(format!("{s}-key.pem")).is_file()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certs_are_generated_once_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        ensure_dev_certs(&dir).unwrap();
        let first = fs::read_to_string(dir.join("ca.pem")).unwrap();
        ensure_dev_certs(&dir).unwrap();
        assert_eq!(first, fs::read_to_string(dir.join("ca.pem")).unwrap());
        let mode = fs::metadata(dir.join("auth-key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        assert!(
            !dir.join("ca-key.pem").exists(),
            "the CA key never touches the disk"
        );
    }

    #[test]
    fn the_dev_services_script_issues_a_certificate_for_every_service() {
        let script = include_str!("../../../scripts/dev-services.sh");
        let line = script
            .lines()
            .find(|line| line.starts_with("SERVICES=("))
            .expect("scripts/dev-services.sh lists the services");
        let listed: Vec<&str> = line
            .trim_start_matches("SERVICES=(")
            .trim_end_matches(')')
            .split_whitespace()
            .collect();
        assert_eq!(listed, SERVICES, "keep the script's SERVICES in step");
    }

    #[test]
    fn incomplete_cert_dir_is_a_named_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("ca.pem"), "x").unwrap();
        let err = ensure_dev_certs(&dir).unwrap_err().to_string();
        assert!(err.contains("remove it to regenerate"), "{err}");
    }
}
