//! Hafen's tenant service (`hafen.tenant.v1.TenantService`): tenant provisioning, one
//! PostgreSQL schema and role per tenant, its settings and its deletion (DC2, OC6, TM3, BX3).
//! It owns the control-plane schema `hafen` and its migrations (`hafen-tenant migrate`).
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-tenant` binary, `hafen dev` and the tests all run the same code.
//! It serves `grpc.health.v1` and reflection; RPCs not implemented yet answer UNIMPLEMENTED.

mod error;

use std::future::Future;
use std::net::SocketAddr;

use clap::{CommandFactory, Parser, Subcommand};
use hafen_platform::{GrpcServer, ServerArgs, TelemetryArgs, TlsMaterial};
use hafen_proto::tenant::v1::tenant_service_server::{TenantService, TenantServiceServer};
use hafen_store::DatabaseArgs;
use tokio::net::TcpListener;

pub use error::Error;

/// Short name: the development certificate is `<dev certs dir>/tenant.pem`.
pub const NAME: &str = "tenant";

/// Name of the binary.
pub const BINARY: &str = "hafen-tenant";

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50053";

/// Configuration of the tenant service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// The `hafen-tenant` command line.
#[derive(Parser, Debug)]
#[command(
    name = BINARY,
    version,
    about = "Tenant provisioning: a PostgreSQL schema and role per tenant",
    long_about = "Tenant provisioning: a PostgreSQL schema and role per tenant.\n\n\
        Without a subcommand it serves gRPC. `migrate` upgrades the control plane and exits; \
        run it once per deploy, before the new version serves."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to serve gRPC (TLS) on. Use 0.0.0.0 to accept connections from other hosts.
    #[arg(long, env = "HAFEN_LISTEN", default_value = DEFAULT_LISTEN, global = true)]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub config: Config,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// What `hafen-tenant` does besides serving.
#[derive(Subcommand, Debug, Clone, Copy)]
pub enum Command {
    /// Apply pending control-plane migrations, then exit.
    Migrate,
}

/// The gRPC adapter of `hafen.tenant.v1.TenantService`.
#[derive(Debug, Default)]
pub struct TenantApi;

#[tonic::async_trait]
impl TenantService for TenantApi {}

/// Serves the tenant service on `listener` until `shutdown` resolves, then drains.
///
/// Refuses to start while the control plane has pending migrations: the schema a release
/// expects is put in place by `hafen-tenant migrate`, once per deploy, not by every replica.
pub async fn serve<F>(config: Config, listener: TcpListener, shutdown: F) -> Result<(), Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    let pending =
        hafen_store::migrate::pending_control_plane(&config.database.database_url).await?;
    if !pending.is_empty() {
        return Err(Error::NotMigrated(pending));
    }
    let tls = TlsMaterial::load(&config.server.tls, NAME)?;
    GrpcServer::new(BINARY, tls, config.server.drain_timeout)
        .add_service(TenantServiceServer::new(TenantApi))
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

/// Applies pending control-plane migrations (`hafen-tenant migrate`).
pub async fn migrate(database: &DatabaseArgs) -> Result<Vec<String>, Error> {
    Ok(hafen_store::migrate::migrate_control_plane(&database.database_url).await?)
}

/// The `hafen-tenant` command line, for `--help` checks.
pub fn command() -> clap::Command {
    Cli::command()
}
