//! The `hafen` command.
//!
//! - `hafen dev` ([`dev`]): the whole stack in one process, each service on its own loopback
//!   port with the development CA, for `make run` and small single-host sites.
//! - `hafen login`, `hafen chat …` ([`chat`]) and `hafen admin …` ([`admin`], widgets in
//!   [`widget`]): clients on the SDK (`hafen_sdk`); [`client`] holds what they share
//!   (connection, stored sessions, `--output json`, exit codes).
//! - `hafen visit …` ([`visit`]): a website visitor's side of the website chat.

pub mod admin;
pub mod chat;
pub mod client;
pub mod demo;
pub mod demo_page;
pub mod dev;
pub mod visit;
pub mod widget;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use hafen_platform::TelemetryArgs;

/// The `hafen` command line.
#[derive(Parser, Debug)]
#[command(
    name = "hafen",
    version,
    about = "Hafen: privacy-first multi-tenant messaging",
    long_about = "Hafen: privacy-first multi-tenant messaging.\n\n\
        `hafen dev` runs the whole stack in one process. `hafen login` signs this device in \
        (the session is stored per --profile, readable only by you); `hafen chat` sends, \
        reads and follows messages and answers website chats; `hafen admin` manages \
        organisations, users, chat codes, website-chat widgets and the audit trail; \
        `hafen visit` is a website visitor's side of the chat.",
    after_help = client::EXIT_CODES
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
    /// Run all six services in one process, each on its own loopback port (development and
    /// single-host mode). Migrates the control plane first.
    Dev(dev::DevArgs),
    /// Sign this device in with tenant, username, password and chat code; the session is
    /// stored in the config directory (mode 0600) under --profile.
    Login(chat::LoginArgs),
    /// End the session on the server and forget it here.
    Logout(chat::LogoutArgs),
    /// Conversations and messages: list, create, send, history, tail; website chats with
    /// their visitors' released fields (visitors).
    Chat(chat::ChatArgs),
    /// Administration: organisations, users, chat codes, widgets, audit trail, migrations.
    Admin(admin::AdminArgs),
    /// A website visitor (no account): open a visit on a widget, consent, give fields, chat,
    /// and see, correct, export or delete the visit's data.
    Visit(visit::VisitArgs),
    /// Print a shell completion script, e.g. `hafen completions bash > /etc/bash_completion.d/hafen`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Runs the parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    // The client commands talk to people and scripts: no service logging on their terminal.
    let (output, outcome) = match cli.command {
        Command::Login(args) => (args.client.output, Some(chat::login(args).await)),
        Command::Logout(args) => (args.client.output, Some(chat::logout(args).await)),
        Command::Chat(args) => (args.client.output, Some(chat::run(args).await)),
        Command::Admin(args) => (args.client.output, Some(admin::run(args).await)),
        Command::Visit(args) => (args.client.output, Some(visit::run(args).await)),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "hafen", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        command @ Command::Dev(_) => return serve(command, &cli.telemetry).await,
    };
    match outcome {
        Some(outcome) => client::finish(outcome, output),
        None => ExitCode::SUCCESS,
    }
}

async fn serve(command: Command, telemetry: &TelemetryArgs) -> ExitCode {
    let cli = Cli {
        command,
        telemetry: telemetry.clone(),
    };
    let guard = match hafen_platform::telemetry::init("hafen", &cli.telemetry) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("hafen: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = match cli.command {
        Command::Dev(args) => dev::run(args).await,
        _ => ExitCode::FAILURE,
    };
    guard.shutdown();
    code
}

/// The `hafen` command line, for `--help` checks.
pub fn command() -> clap::Command {
    Cli::command()
}
