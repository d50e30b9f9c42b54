//! `hafen-messaging`: runs the messaging service alone (microservices mode).

use std::process::ExitCode;

use hafen_platform::ServiceCli;

#[global_allocator]
static ALLOCATOR: hafen_platform::Allocator = hafen_platform::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = ServiceCli::<hafen_messaging::Config>::parse_for(&hafen_messaging::SPEC);
    hafen_platform::run(
        hafen_messaging::SPEC.binary,
        &cli.telemetry,
        cli.listen,
        |listener, shutdown| hafen_messaging::serve(cli.config, listener, shutdown),
    )
    .await
}
