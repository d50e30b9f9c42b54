//! `hafen-auth`: runs the auth service alone (microservices mode).

use std::process::ExitCode;

use hafen_platform::ServiceCli;

#[global_allocator]
static ALLOCATOR: hafen_platform::Allocator = hafen_platform::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = ServiceCli::<hafen_auth::Config>::parse_for(&hafen_auth::SPEC);
    hafen_platform::run(
        hafen_auth::SPEC.binary,
        &cli.telemetry,
        cli.listen,
        |listener, shutdown| hafen_auth::serve(cli.config, listener, shutdown),
    )
    .await
}
