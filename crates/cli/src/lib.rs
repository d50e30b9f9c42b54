//! The `hafen` command.
//!
//! - `hafen dev` ([`dev`]): the whole stack in one process, each service on its own loopback
//!   port with the development CA, for `make run` and small single-host sites.

pub mod dev;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use hafen_platform::TelemetryArgs;

/// The `hafen` command line.
#[derive(Parser, Debug)]
#[command(
    name = "hafen",
    version,
    about = "Hafen: privacy-first multi-tenant messaging"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// `hafen`'s subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run all five services in one process, each on its own loopback port (development and
    /// single-host mode). Migrates the control plane first.
    Dev(dev::DevArgs),
}

/// Runs the parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let guard = match hafen_platform::telemetry::init("hafen", &cli.telemetry) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("hafen: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.command {
        Command::Dev(args) => dev::run(args).await,
    };
    guard.shutdown();
    code
}

/// The `hafen` command line, for `--help` checks.
pub fn command() -> clap::Command {
    Cli::command()
}
