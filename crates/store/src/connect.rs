//! Connecting to PostgreSQL, over TLS unless a URL says otherwise (OC4, TM5).
//!
//! Every connection Hafen opens — the pools, the migration runner, the tenant service's
//! provisioning connections — goes through [`Target`], which reads libpq's TLS parameters
//! from the URL, so one URL means the same to Hafen, `psql` and `pg_dump`:
//!
//! - `sslmode`: `verify-full` (the default: TLS, the server's certificate must chain to a
//!   trusted CA and name the host), `verify-ca` (chain only), `require` (TLS without
//!   verification) or `disable` (plaintext). `prefer` and `allow` are refused: they fall
//!   back to plaintext without saying so, and a link configured for TLS never does.
//! - `sslrootcert`: a PEM file of the CA certificates to trust; without it (or with
//!   `system`) the system's roots.
//!
//! TLS is rustls with the ring provider, through `tokio-postgres-rustls`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use diesel::ConnectionError;
use diesel_async::AsyncPgConnection;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tenancy::SyncConnection;

/// How a connection uses TLS, as libpq's `sslmode` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext.
    Disable,
    /// TLS, the server's certificate unchecked.
    Require,
    /// TLS, the certificate must chain to a trusted CA (any host name).
    VerifyCa,
    /// TLS, the certificate must chain to a trusted CA and name the host.
    VerifyFull,
}

impl SslMode {
    /// The `sslmode` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether the link is encrypted.
    pub fn encrypted(self) -> bool {
        self != Self::Disable
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A database URL, parsed once: where to connect and how to secure the link.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    mode: SslMode,
    tls: Option<MakeRustlsConnect>,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The config may carry a password: only the mode is shown.
        f.debug_struct("Target")
            .field("sslmode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Target {
    /// Parses a `postgres://` URL with its TLS parameters (see the module docs). The error
    /// names the problem, never the URL (it may hold a password).
    pub fn parse(url: &str) -> Result<Self, String> {
        let mut parsed =
            url::Url::parse(url).map_err(|err| format!("not a valid database URL: {err}"))?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err("a database URL starts with postgres:// or postgresql://".into());
        }
        let mut mode = SslMode::VerifyFull;
        let mut root_cert = None;
        let mut rest = Vec::new();
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "sslmode" => {
                    mode = match value.as_ref() {
                        "disable" => SslMode::Disable,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        "prefer" | "allow" => {
                            return Err(format!(
                                "sslmode={value} falls back to plaintext silently; use \
                                 verify-full, verify-ca or require (or disable, to say so)"
                            ));
                        }
                        _ => {
                            return Err(
                                "sslmode must be disable, require, verify-ca or verify-full".into(),
                            );
                        }
                    }
                }
                "sslrootcert" => root_cert = Some(value.into_owned()),
                _ => rest.push((key.into_owned(), value.into_owned())),
            }
        }
        // tokio-postgres knows `sslmode` only up to `require`; verification is ours.
        rest.push((
            "sslmode".to_owned(),
            if mode.encrypted() {
                "require"
            } else {
                "disable"
            }
            .to_owned(),
        ));
        parsed.query_pairs_mut().clear().extend_pairs(rest);
        let config = tokio_postgres::Config::from_str(parsed.as_str())
            .map_err(|err| format!("database URL: {err}"))?;
        let tls = match mode {
            SslMode::Disable => None,
            _ => Some(MakeRustlsConnect::new(client_config(
                mode,
                root_cert.as_deref(),
            )?)),
        };
        Ok(Self { config, mode, tls })
    }

    /// How the link is secured.
    pub fn ssl_mode(&self) -> SslMode {
        self.mode
    }

    /// Opens a connection.
    pub async fn connect(&self) -> Result<AsyncPgConnection, ConnectionError> {
        let failed = |err: tokio_postgres::Error| {
            ConnectionError::BadConnection(describe_connect_error(self.mode, &err))
        };
        match &self.tls {
            Some(tls) => {
                let (client, connection) =
                    self.config.connect(tls.clone()).await.map_err(failed)?;
                AsyncPgConnection::try_from_client_and_connection(client, connection).await
            }
            None => {
                let (client, connection) = self
                    .config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(failed)?;
                AsyncPgConnection::try_from_client_and_connection(client, connection).await
            }
        }
    }
}

/// Opens a connection to `url`.
pub async fn establish(url: &str) -> Result<AsyncPgConnection, ConnectionError> {
    Target::parse(url)
        .map_err(ConnectionError::InvalidConnectionUrl)?
        .connect()
        .await
}

/// Opens a synchronous connection to `url`, for diesel's synchronous APIs (the migration
/// harness). Call it from a blocking task of a Tokio runtime (`spawn_blocking`).
pub fn establish_sync(url: &str) -> Result<SyncConnection, ConnectionError> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        ConnectionError::BadConnection("a synchronous connection needs a Tokio runtime".into())
    })?;
    let conn = handle.block_on(establish(url))?;
    Ok(SyncConnection::from(conn))
}

/// The error's chain in one line, with what to check when TLS was the problem. Names no
/// host, user or password.
fn describe_connect_error(mode: SslMode, err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    if mode.encrypted() && text.contains("TLS") {
        format!("{text} (sslmode={mode}: the link must be TLS and never falls back to plaintext)")
    } else {
        text
    }
}

fn client_config(mode: SslMode, root_cert: Option<&str>) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?;
    // Only the verifying modes need CA roots: `require` works on a host without any.
    let config = match mode {
        SslMode::VerifyFull => builder
            .with_root_certificates(Arc::new(roots(root_cert)?))
            .with_no_client_auth(),
        SslMode::VerifyCa | SslMode::Require | SslMode::Disable => {
            let chain_to = match mode {
                SslMode::VerifyCa => Some(Arc::new(roots(root_cert)?)),
                _ => None,
            };
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient {
                    chain_to,
                    algorithms: provider.signature_verification_algorithms,
                }))
                .with_no_client_auth()
        }
    };
    Ok(config)
}

fn roots(root_cert: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) if path != "system" => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|err| format!("sslrootcert: cannot read the CA file: {err}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| format!("sslrootcert: not a PEM certificate file: {err}"))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err("sslrootcert: the file holds no usable CA certificate".into());
            }
        }
        _ => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(
                    "no system CA certificates found: name a CA file with sslrootcert".into(),
                );
            }
        }
    }
    Ok(roots)
}

/// The server check of `sslmode=verify-ca` (the chain is verified against `chain_to`, the
/// name is not) and of `sslmode=require` (`chain_to` is `None`: encrypted, the server
/// unverified, libpq's meaning). The handshake's own signatures are checked either way.
#[derive(Debug)]
struct Lenient {
    chain_to: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.chain_to {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oc4_ssl_modes_parse_like_libpq_and_never_fall_back() {
        let mode = |url: &str| Target::parse(url).map(|t| t.ssl_mode());
        assert_eq!(
            mode("postgres://u@127.0.0.1:5432/db?sslmode=disable"),
            Ok(SslMode::Disable)
        );
        assert_eq!(
            mode("postgres://u@127.0.0.1:5432/db?sslmode=require"),
            Ok(SslMode::Require)
        );
        for fallback in ["prefer", "allow"] {
            let err = mode(&format!("postgres://u@h/db?sslmode={fallback}")).unwrap_err();
            assert!(err.contains("plaintext"), "{err}");
        }
        let err = mode("postgres://u:secret@h/db?sslmode=verify-full&sslrootcert=/nonexistent")
            .unwrap_err();
        assert!(err.contains("sslrootcert"), "{err}");
        assert!(!err.contains("secret"), "no password in errors: {err}");
        assert!(mode("mysql://h/db").is_err());
    }

    #[test]
    fn the_default_is_verify_full() {
        // Without sslrootcert the system's roots are used; a machine without any would fail
        // with a named error instead.
        match Target::parse("postgres://u@h/db") {
            Ok(target) => assert_eq!(target.ssl_mode(), SslMode::VerifyFull),
            Err(err) => assert!(err.contains("sslrootcert"), "{err}"),
        }
    }

    #[test]
    fn oc4_only_the_verifying_modes_need_ca_roots() {
        assert!(client_config(SslMode::Require, Some("/nonexistent/ca.pem")).is_ok());
        for verifying in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = client_config(verifying, Some("/nonexistent/ca.pem")).unwrap_err();
            assert!(err.contains("sslrootcert"), "{verifying}: {err}");
        }
    }
}
