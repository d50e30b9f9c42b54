//! Hafen's auth service (`hafen.auth.v1.AuthService`): accounts (username + password inside a tenant), chat codes as a per-device second factor, sessions with rotating refresh tokens, and remote wipe (OC1–OC5).
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-auth` binary, `hafen dev` and the tests all run the same code.
//! It serves `grpc.health.v1` and reflection; RPCs not implemented yet answer UNIMPLEMENTED.

use std::future::Future;

use hafen_platform::{GrpcServer, ServerArgs, ServiceSpec, TlsMaterial};
use hafen_proto::auth::v1::auth_service_server::{AuthService, AuthServiceServer};
use tokio::net::TcpListener;

/// Short name: the development certificate is `<dev certs dir>/auth.pem`.
pub const NAME: &str = "auth";

/// How the `hafen-auth` binary presents itself on the command line.
pub const SPEC: ServiceSpec = ServiceSpec {
    binary: "hafen-auth",
    about: "Accounts, passwords, chat codes, sessions and remote wipe",
    default_listen: "127.0.0.1:50051",
};

/// Configuration of the auth service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,
}

/// The gRPC adapter of `hafen.auth.v1.AuthService`.
#[derive(Debug, Default)]
pub struct AuthApi;

#[tonic::async_trait]
impl AuthService for AuthApi {}

/// Serves the auth service on `listener` until `shutdown` resolves, then drains.
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
        .add_service(AuthServiceServer::new(AuthApi))
        .serve(listener, shutdown)
        .await
}

/// The `hafen-auth` command line, for `--help` checks.
pub fn command() -> clap::Command {
    hafen_platform::ServiceCli::<Config>::command_for(&SPEC)
}
