//! Hafen's audit service (`hafen.audit.v1.AuditService`): the hash-chained audit trail per tenant, its verification and export, and the GDPR Art. 30 record of processing (BX2, BX6, GR7).
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-audit` binary, `hafen dev` and the tests all run the same code.
//! It serves `grpc.health.v1` and reflection; RPCs not implemented yet answer UNIMPLEMENTED.

use std::future::Future;

use hafen_platform::{GrpcServer, ServerArgs, ServiceSpec, TlsMaterial};
use hafen_proto::audit::v1::audit_service_server::{AuditService, AuditServiceServer};
use tokio::net::TcpListener;

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

    /// The backup policy in force, as the record states it (TM6).
    #[arg(
        long,
        env = "HAFEN_BACKUP_POLICY",
        default_value = "daily encrypted backups to a separate location, kept 6 weeks; every restore ends with the deletion-log replay"
    )]
    pub backup_policy: String,
}

/// The gRPC adapter of `hafen.audit.v1.AuditService`.
#[derive(Debug, Default)]
pub struct AuditApi;

#[tonic::async_trait]
impl AuditService for AuditApi {}

/// Serves the audit service on `listener` until `shutdown` resolves, then drains.
pub async fn serve<F>(
    config: Config,
    listener: TcpListener,
    shutdown: F,
) -> hafen_platform::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let tls = TlsMaterial::load(&config.server.tls, NAME)?;
    GrpcServer::new(SPEC.binary, tls, config.server.drain_timeout)
        .add_service(AuditServiceServer::new(AuditApi))
        .serve(listener, shutdown)
        .await
}

/// The `hafen-audit` command line, for `--help` checks.
pub fn command() -> clap::Command {
    hafen_platform::ServiceCli::<Config>::command_for(&SPEC)
}
