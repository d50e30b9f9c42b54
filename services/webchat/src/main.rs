//! `hafen-webchat`: runs the webchat service alone (microservices mode).

use std::process::ExitCode;

use hafen_platform::ServiceCli;

#[global_allocator]
static ALLOCATOR: hafen_platform::Allocator = hafen_platform::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = ServiceCli::<hafen_webchat::Config>::parse_for(&hafen_webchat::SPEC);
    hafen_platform::run(
        hafen_webchat::SPEC.binary,
        &cli.telemetry,
        cli.listen,
        |listener, shutdown| hafen_webchat::serve(cli.config, listener, shutdown),
    )
    .await
}
