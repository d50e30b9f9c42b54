//! `hafen-tenant`: runs the tenant service alone (microservices mode), or `migrate`.

use std::process::ExitCode;

use hafen_tenant::migrate::{Options, migrate_all};
use hafen_tenant::{BINARY, Cli, Invocation};

#[global_allocator]
static ALLOCATOR: hafen_platform::Allocator = hafen_platform::Allocator;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Cli::parse_args() {
        Invocation::Serve(cli) => {
            let cli = *cli;
            return hafen_platform::run(
                BINARY,
                &cli.telemetry,
                cli.listen,
                |listener, shutdown| hafen_tenant::serve(cli.config, listener, shutdown),
            )
            .await;
        }
        Invocation::Migrate(args) => *args,
        Invocation::Backup(args) => return backup(&args).await,
        Invocation::Restore(args) => return restore(&args).await,
        Invocation::RotateMasterKey(args) => return rotate(&args).await,
        Invocation::DeriveKeys(args) => {
            return match hafen_tenant::derive_keys(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("{BINARY}: {err}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let guard = match hafen_platform::telemetry::init(BINARY, &args.telemetry) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("{BINARY}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options {
        concurrency: args.concurrency,
        progress: true,
    };
    let placements = args.databases.placements_map();
    let result = migrate_all(
        &args.databases.main.database_url,
        args.databases.keystore_url.as_deref(),
        &placements,
        &options,
    )
    .await;
    let code = match result {
        Ok(report) if report.failed.is_empty() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            tracing::error!(error = %err, "migration failed");
            ExitCode::FAILURE
        }
    };
    guard.shutdown();
    code
}

/// `hafen-tenant restore`: what was restored and replayed on standard output.
#[allow(
    clippy::print_stdout,
    reason = "the restore's report is the command's output"
)]
async fn restore(args: &hafen_tenant::backup::RestoreArgs) -> ExitCode {
    one_shot(
        &args.telemetry,
        hafen_tenant::backup::restore(args),
        |restored| {
            println!(
                "restored {} ({}) from {}; migrations applied: {}; deletion log replayed: \
             {} tenants deleted again, {} users erased again, {} messages deleted again",
                restored.manifest.slug,
                restored.manifest.tenant_id,
                restored.manifest.created_at,
                restored.migrated.len(),
                restored.replay.tenants_deleted,
                restored.replay.users_erased,
                restored.replay.messages_deleted
            );
            if !restored.left.is_empty() {
                println!(
                    "its schema dropped from the databases it no longer lives on: {}",
                    restored.left.join(", ")
                );
            }
            ExitCode::SUCCESS
        },
    )
    .await
}

/// `hafen-tenant rotate-master-key`: the versions and how many keys each wraps, on standard
/// output.
#[allow(
    clippy::print_stdout,
    reason = "the state of the key versions is the command's output"
)]
async fn rotate(args: &hafen_tenant::rotate::RotateArgs) -> ExitCode {
    one_shot(&args.telemetry, hafen_tenant::rotate::run(args), |report| {
        let in_use: Vec<String> = report
            .in_use
            .iter()
            .map(|(version, keys)| format!("{version}: {keys} tenant keys"))
            .collect();
        println!(
            "current version {}; versions in the file {:?}; re-wrapped {}; in use: {}{}",
            report.current,
            report.versions,
            report.rewrapped,
            if in_use.is_empty() {
                "none".to_owned()
            } else {
                in_use.join(", ")
            },
            report
                .retired
                .map(|v| format!("; retired version {v}"))
                .unwrap_or_default()
        );
        ExitCode::SUCCESS
    })
    .await
}

/// `hafen-tenant backup`: one line per backup on standard output (its manifest's path,
/// size and checksum), failures on standard error.
#[allow(
    clippy::print_stdout,
    reason = "the backups made are the command's output, for scripts and CronJob logs"
)]
async fn backup(args: &hafen_tenant::backup::BackupArgs) -> ExitCode {
    one_shot(&args.telemetry, hafen_tenant::backup::run(args), |report| {
        for manifest in &report.backed_up {
            println!(
                "{} {}/{} {} bytes sha256 {}",
                manifest.slug,
                manifest.tenant_id,
                manifest.file,
                manifest.file_bytes,
                manifest.sha256
            );
        }
        for (tenant, why) in &report.failed {
            eprintln!("{BINARY}: backup of {tenant} failed: {why}");
        }
        if report.pruned > 0 {
            println!("pruned {} backups older than the retention", report.pruned);
        }
        if report.failed.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
    .await
}

/// Runs a subcommand's `work` with its telemetry: `report` turns what it did into the exit
/// code; an error goes to standard error.
async fn one_shot<T>(
    telemetry: &hafen_platform::TelemetryArgs,
    work: impl std::future::Future<Output = Result<T, hafen_tenant::Error>>,
    report: impl FnOnce(T) -> ExitCode,
) -> ExitCode {
    let guard = match hafen_platform::telemetry::init(BINARY, telemetry) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("{BINARY}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let code = match work.await {
        Ok(done) => report(done),
        Err(err) => {
            eprintln!("{BINARY}: {err}");
            ExitCode::FAILURE
        }
    };
    guard.shutdown();
    code
}
