//! `hafen-tenant`: runs the tenant service alone (microservices mode), or `migrate`.

use std::process::ExitCode;

use clap::Parser;
use hafen_tenant::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => {
            hafen_platform::run(
                hafen_tenant::BINARY,
                &cli.telemetry,
                cli.listen,
                |listener, shutdown| hafen_tenant::serve(cli.config, listener, shutdown),
            )
            .await
        }
        Some(Command::Migrate) => {
            let guard = match hafen_platform::telemetry::init(hafen_tenant::BINARY, &cli.telemetry)
            {
                Ok(guard) => guard,
                Err(err) => {
                    eprintln!("{}: {err}", hafen_tenant::BINARY);
                    return ExitCode::FAILURE;
                }
            };
            let code = match hafen_tenant::migrate(&cli.config.database).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(err) => {
                    tracing::error!(error = %err, "migration failed");
                    ExitCode::FAILURE
                }
            };
            guard.shutdown();
            code
        }
    }
}
