//! `hafen-audit`: runs the audit service alone (microservices mode).

use std::process::ExitCode;

use hafen_platform::ServiceCli;

#[global_allocator]
static ALLOCATOR: hafen_platform::Allocator = hafen_platform::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = ServiceCli::<hafen_audit::Config>::parse_for(&hafen_audit::SPEC);
    hafen_platform::run(
        hafen_audit::SPEC.binary,
        &cli.telemetry,
        cli.listen,
        |listener, shutdown| hafen_audit::serve(cli.config, listener, shutdown),
    )
    .await
}
