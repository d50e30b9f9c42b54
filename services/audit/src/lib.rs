//! Hafen's audit service (`hafen.audit.v1.AuditService`): the hash-chained audit trail per
//! tenant, its verification and export, and the GDPR Art. 30 record of processing (BX2, BX6,
//! GR7, TM2).
//!
//! - [`event`]: events as AppendEvents accepts them, validated, and the chain each joins.
//! - [`log`]: the domain — atomic, idempotent appends to the chains; listing; verification
//!   from the stored columns; export ranges. [`repo`]: rows and queries.
//! - [`export`]: JSON Lines exports in chunks, verifiable offline.
//! - [`record`]: the Art. 30 record from the tenant's live configuration.
//! - `api`: the thin gRPC adapter (who may read which chain; operator calls and exports are
//!   audited there); `error`: the one mapping of errors to statuses.
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-audit` binary, `hafen dev` and the tests all run the same code.

mod api;
mod error;
pub mod event;
pub mod export;
pub mod log;
pub mod record;
pub mod repo;
pub mod signing;

use std::future::Future;
use std::sync::Arc;

use hafen_authn::remote::RemoteIntrospect;
use hafen_authn::{Authenticator, AuthnLayer, MAX_ACCESS_TTL, PlatformToken, Redis, Revocations};
use hafen_platform::{GrpcServer, ServerArgs, ServiceSpec, TlsMaterial};
use hafen_proto::audit::v1::audit_service_server::AuditServiceServer;
use hafen_store::Databases;
use tokio::net::TcpListener;

pub use api::AuditApi;
pub use error::Error;
pub use log::AuditLog;

/// Short name: the development certificate is `<dev certs dir>/audit.pem`.
pub const NAME: &str = "audit";

/// How the `hafen-audit` binary presents itself on the command line.
pub const SPEC: ServiceSpec = ServiceSpec {
    binary: "hafen-audit",
    about: "The tamper-evident audit trail and the GDPR Art. 30 record",
    default_listen: "127.0.0.1:50055",
};

/// Configuration of the audit service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// TLS and the drain. AppendEvents accepts only callers that present a service
    /// certificate, so other services can deliver events only with `--mtls`.
    #[command(flatten)]
    pub server: ServerArgs,

    /// The chains live in the main database's control plane; tenant settings (for the
    /// Art. 30 record) are read from there too.
    #[command(flatten)]
    pub databases: hafen_store::DatabasesArgs,

    #[command(flatten)]
    pub operator: hafen_authn::OperatorArgs,

    #[command(flatten)]
    pub redis: hafen_authn::RedisArgs,

    #[command(flatten)]
    pub auth: hafen_authn::remote::AuthEndpointArgs,

    #[command(flatten)]
    pub record: RecordArgs,

    /// File with the keys derived from the master key that this service uses (session-cache, audit-signing),
    /// written by `hafen-tenant derive-keys --service audit`. This service never holds the
    /// master key itself.
    #[arg(long, env = "HAFEN_KEYS_FILE")]
    pub keys_file: std::path::PathBuf,
}

/// What the Art. 30 record states about the operator and its measures beyond what the
/// tenant's configuration says (GR7, TM6).
#[derive(clap::Args, Clone, Debug)]
pub struct RecordArgs {
    /// Name of the processor (the company operating this Hafen installation).
    #[arg(
        long,
        env = "HAFEN_PROCESSOR_NAME",
        default_value = "The operator of this Hafen installation"
    )]
    pub processor_name: String,

    /// Contact of the processor's data-protection officer (an address or URL).
    #[arg(long, env = "HAFEN_PROCESSOR_CONTACT", default_value = "")]
    pub processor_contact: String,

    /// The backup policy in force, as the record states it (TM6), with the time of the last
    /// complete `hafen-tenant backup --all`, while one ran within 48 hours (otherwise the
    /// record states no backups).
    #[arg(
        long,
        env = "HAFEN_BACKUP_POLICY",
        default_value = "daily encrypted backups to a separate location, kept 6 weeks; every restore ends with the deletion-log replay"
    )]
    pub backup_policy: String,
}

/// Largest request accepted: a full AppendEvents batch (500 events with attributes at their
/// limits) is far above tonic's 4 MiB default, and a batch refused for its size would block a
/// relay for good.
const MAX_REQUEST_BYTES: usize = 24 * 1024 * 1024;

/// Serves the audit service on `listener` until `shutdown` resolves, then drains.
///
/// Refuses to start while the control plane has pending migrations (`hafen-tenant migrate`
/// puts them in place, once per deploy).
pub async fn serve<F>(config: Config, listener: TcpListener, shutdown: F) -> Result<(), Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    let pending = hafen_store::migrate::wait_until_migrated(&config.databases, false).await?;
    if !pending.is_empty() {
        return Err(Error::NotMigrated(pending));
    }
    let tls = TlsMaterial::load(&config.server.tls, NAME)?;
    let token = PlatformToken::load(&config.operator.platform_token_file)
        .map_err(|err| Error::Config(err.to_string()))?;
    let keys = hafen_crypto::SubKeys::load(&config.keys_file)?;
    let redis = Redis::connect(&config.redis)
        .await
        .map_err(Error::Config)?
        .with_session_key(keys.get(hafen_crypto::Purpose::SessionCache)?);
    let revocations = Revocations::new(MAX_ACCESS_TTL);
    revocations.listen(redis.clone());
    let resolver = RemoteIntrospect::new(&config.auth, &tls)
        .map_err(|err| Error::Config(format!("--auth-endpoint: {err}")))?;
    let databases = Databases::new(&config.databases)?;
    revocations.recheck_streams(databases.main().clone());
    databases.report_pool_metrics("audit", "requests");
    let authenticator =
        Authenticator::new(Some(token), Some(redis), Arc::new(resolver), revocations);
    let log = AuditLog::new(
        databases.main().clone(),
        signing::Signer::new(keys.get(hafen_crypto::Purpose::AuditSigning)?),
    );
    hafen_store::facts::start_reporting(
        databases.main().clone(),
        hafen_store::facts::ServiceFacts::new(
            NAME,
            config.server.tls.mtls,
            &config.databases,
            Some(config.redis.tls()),
            &[hafen_store::facts::measure::SIGNED_AUDIT_CHAIN],
        ),
    )
    .await;
    let api = AuditApi::new(log, authenticator.clone(), config.record);
    let layer = AuthnLayer::new(authenticator, api::INTERNAL);
    GrpcServer::new(SPEC.binary, tls, config.server.drain_timeout)
        .side_ports(&config.server)
        .add_service_with_internal(
            layer.wrap(AuditServiceServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES)),
            &[hafen_platform::check::InternalMethod {
                method: "AppendEvents",
                max_request_bytes: MAX_REQUEST_BYTES,
                callers: api::EMITTERS,
            }],
        )
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

/// The `hafen-audit` command line, for `--help` checks.
pub fn command() -> clap::Command {
    hafen_platform::ServiceCli::<Config>::command_for(&SPEC)
}
