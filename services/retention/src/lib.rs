//! Hafen's retention service (`hafen.retention.v1.RetentionService`): retention policies per tenant and conversation, legal holds, the purge job, and deletion replay after a restore (CB5, GR4).
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-retention` binary, `hafen dev` and the tests all run the same code.
//! It serves `grpc.health.v1` and reflection; RPCs not implemented yet answer UNIMPLEMENTED.

use std::future::Future;

use hafen_platform::{GrpcServer, ServerArgs, ServiceSpec, TlsMaterial};
use hafen_proto::retention::v1::retention_service_server::{
    RetentionService, RetentionServiceServer,
};
use tokio::net::TcpListener;

/// Short name: the development certificate is `<dev certs dir>/retention.pem`.
pub const NAME: &str = "retention";

/// How the `hafen-retention` binary presents itself on the command line.
pub const SPEC: ServiceSpec = ServiceSpec {
    binary: "hafen-retention",
    about: "Retention policies, legal holds and purges",
    default_listen: "127.0.0.1:50054",
};

/// Configuration of the retention service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub databases: hafen_store::DatabasesArgs,

    #[command(flatten)]
    pub operator: hafen_authn::OperatorArgs,

    #[command(flatten)]
    pub redis: hafen_authn::RedisArgs,

    #[command(flatten)]
    pub auth: hafen_authn::remote::AuthEndpointArgs,

    #[command(flatten)]
    pub audit: hafen_events::AuditEndpointArgs,

    #[command(flatten)]
    pub purge: PurgeArgs,
}

/// How the purge job runs (CB5).
#[derive(clap::Args, Clone, Debug)]
pub struct PurgeArgs {
    /// How often every tenant is purged of expired messages.
    #[arg(long, env = "HAFEN_PURGE_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub purge_interval: std::time::Duration,

    /// Messages deleted per statement (and transaction).
    #[arg(long, env = "HAFEN_PURGE_BATCH", default_value_t = 1000)]
    pub purge_batch: i64,

    /// Pause between two batches, so live traffic keeps its latency.
    #[arg(long, env = "HAFEN_PURGE_PAUSE", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub purge_pause: std::time::Duration,
}

/// The gRPC adapter of `hafen.retention.v1.RetentionService`.
#[derive(Debug, Default)]
pub struct RetentionApi;

#[tonic::async_trait]
impl RetentionService for RetentionApi {}

/// Serves the retention service on `listener` until `shutdown` resolves, then drains.
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
        .add_service(RetentionServiceServer::new(RetentionApi))
        .serve(listener, shutdown)
        .await
}

/// The `hafen-retention` command line, for `--help` checks.
pub fn command() -> clap::Command {
    hafen_platform::ServiceCli::<Config>::command_for(&SPEC)
}
