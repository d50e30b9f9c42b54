//! `hafen-retention`: runs the retention service alone (microservices mode).

use std::process::ExitCode;

use hafen_platform::ServiceCli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = ServiceCli::<hafen_retention::Config>::parse_for(&hafen_retention::SPEC);
    hafen_platform::run(
        hafen_retention::SPEC.binary,
        &cli.telemetry,
        cli.listen,
        |listener, shutdown| hafen_retention::serve(cli.config, listener, shutdown),
    )
    .await
}
