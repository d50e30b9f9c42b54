//! `hafen`: the command-line entry point. `hafen dev` runs all six services in one process.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: hafen_platform::Allocator = hafen_platform::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = hafen_cli::Cli::parse();
    hafen_cli::run(cli).await
}
