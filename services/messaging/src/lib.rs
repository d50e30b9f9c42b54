//! Hafen's messaging service (`hafen.messaging.v1.MessagingService`): conversations and their members, messages encrypted at rest, edit and delete, masking, and resumable live streams (OC7, CB3, CB4, UL2, BX4).
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-messaging` binary, `hafen dev` and the tests all run the same code.
//! It serves `grpc.health.v1` and reflection; RPCs not implemented yet answer UNIMPLEMENTED.

use std::future::Future;

use hafen_platform::{GrpcServer, ServerArgs, ServiceSpec, TlsMaterial};
use hafen_proto::messaging::v1::messaging_service_server::{
    MessagingService, MessagingServiceServer,
};
use tokio::net::TcpListener;

/// Short name: the development certificate is `<dev certs dir>/messaging.pem`.
pub const NAME: &str = "messaging";

/// How the `hafen-messaging` binary presents itself on the command line.
pub const SPEC: ServiceSpec = ServiceSpec {
    binary: "hafen-messaging",
    about: "Conversations, encrypted messages and live streams",
    default_listen: "127.0.0.1:50052",
};

/// Configuration of the messaging service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,
}

/// The gRPC adapter of `hafen.messaging.v1.MessagingService`.
#[derive(Debug, Default)]
pub struct MessagingApi;

#[tonic::async_trait]
impl MessagingService for MessagingApi {}

/// Serves the messaging service on `listener` until `shutdown` resolves, then drains.
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
        .add_service(MessagingServiceServer::new(MessagingApi))
        .serve(listener, shutdown)
        .await
}

/// The `hafen-messaging` command line, for `--help` checks.
pub fn command() -> clap::Command {
    hafen_platform::ServiceCli::<Config>::command_for(&SPEC)
}
