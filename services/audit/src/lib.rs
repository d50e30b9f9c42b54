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
