//! `hafen-retention`: runs the retention service alone (microservices mode), or
//! `replay-deletions` after a backup restore.

use std::process::ExitCode;

use hafen_retention::{Cli, Invocation, SPEC};

#[global_allocator]
static ALLOCATOR: hafen_platform::Allocator = hafen_platform::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::invocation() {
        Invocation::Serve(cli) => {
            let cli = *cli;
            hafen_platform::run(
                SPEC.binary,
                &cli.telemetry,
                cli.listen,
                |listener, shutdown| hafen_retention::serve(cli.config, listener, shutdown),
            )
            .await
        }
        Invocation::ReplayDeletions(args) => {
            let guard = match hafen_platform::telemetry::init(SPEC.binary, &args.telemetry) {
                Ok(guard) => guard,
                Err(err) => {
                    eprintln!("{}: {err}", SPEC.binary);
                    return ExitCode::FAILURE;
                }
            };
            let code = match hafen_retention::replay_deletions(&args).await {
                Ok(report) => {
                    print_report(&report, args.dry_run);
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    tracing::error!(error = %err, "replay of the deletion log failed; running it again is safe");
                    ExitCode::FAILURE
                }
            };
            guard.shutdown();
            code
        }
    }
}

#[expect(clippy::print_stdout, reason = "the counts are the command's output")]
fn print_report(report: &hafen_retention::ReplayReport, dry_run: bool) {
    println!(
        "entries checked: {}, tenants deleted again: {}, users erased again: {}, messages \
         deleted again: {}{}",
        report.entries_checked,
        report.tenants_deleted,
        report.users_erased,
        report.messages_deleted,
        if dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    );
}
