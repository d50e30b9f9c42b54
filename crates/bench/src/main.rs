//! `hafen-bench`: Hafen's benchmarks against the real stack (TLS, PostgreSQL with its default
//! durability). Every scenario measures its baseline in the same run — raw PostgreSQL by a
//! bare client, raw bcrypt — because this machine is shared and noisy; a figure means
//! something only next to its baseline. Prints a table, then one JSON line per scenario.
//!
//! Scenarios:
//! - `provision`: CreateTenant over gRPC, one tenant at a time; ms per tenant (p50/p99) at
//!   bcrypt's minimum cost (provisioning itself) next to the same DDL sent raw by a bare
//!   client, and at the production cost next to raw bcrypt.
//! - `migrate`: `hafen-tenant migrate` over N tenants that each lack the newest migration;
//!   total seconds, next to the same SQL applied raw with the same concurrency.
//! - `send` (with `baseline` and `deliver`), `fanout`, `subscriptions`: see `messaging.rs`.
//! - `purge`: the retention purge of expired messages across 10 tenants while `send` load
//!   runs: rows per second next to a raw batched DELETE, send p99 next to before (`purge.rs`).
//! - `login`: logins per second at concurrency 8 next to raw bcrypt verifications per second,
//!   and ListUsers p99 during that login storm next to its idle value.
//! - `webchat`: 1,000 visits answered by 10 agents: visits started per second, visitor send
//!   throughput next to member SendMessage of the same run (in turns), its p50/p99, and
//!   visitor → agent and agent → visitor delivery at half the visitor peak, and at half the
//!   peak of the chat both ways where that is lower (`webchat.rs`).
//! - `erasure`: EraseUser of a user with 100,000 messages while the organisation's members
//!   send: seconds next to a raw UPDATE of the same rows, send p99 next to before
//!   (`erasure.rs`).
//! - `backup`: `hafen-tenant backup` and `restore` of a tenant with 1,000,000 messages, MB/s
//!   next to plain pg_dump and pg_restore of the same schema, taking turns (`backup.rs`).

#![allow(
    clippy::print_stdout,
    clippy::expect_used,
    reason = "a benchmark reports on stdout and stops loudly when its set-up fails"
)]

mod backup;
mod cpu;
mod erasure;
mod lean;
mod login;
mod messaging;
mod migrate;
mod provision;
mod purge;
mod webchat;

use clap::{Parser, ValueEnum};

/// The services' allocator, since the stack under test runs in this process.
#[global_allocator]
static ALLOCATOR: hafen_platform::Allocator = hafen_platform::Allocator;

/// Command line of `hafen-bench`.
#[derive(Parser, Debug)]
#[command(
    name = "hafen-bench",
    version,
    about = "Hafen benchmarks, each next to its baseline"
)]
struct Cli {
    /// Scenarios to run.
    #[arg(value_enum, default_values_t = [Scenario::All])]
    scenarios: Vec<Scenario>,

    /// Tenants created one by one in `provision`.
    #[arg(long, env = "HAFEN_BENCH_TENANTS", default_value_t = 50)]
    tenants: usize,

    /// Tenants migrated in `migrate`.
    #[arg(long, env = "HAFEN_BENCH_MIGRATE_TENANTS", default_value_t = 1000)]
    migrate_tenants: usize,

    /// Tenants migrated at the same time in `migrate` (and by its baseline).
    #[arg(long, env = "HAFEN_BENCH_CONCURRENCY", default_value_t = 4)]
    concurrency: usize,

    /// Seconds each messaging load runs (`send`): the baseline, the peak, half the peak and
    /// `deliver`.
    #[arg(long, env = "HAFEN_BENCH_SEND_SECS", default_value_t = 60)]
    send_secs: u64,

    /// Turns the baseline and the peak take (`send`), sharing their seconds: both loads then
    /// see the same drift of the machine's state.
    #[arg(long, env = "HAFEN_BENCH_SEND_ROUNDS", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    send_rounds: u32,

    /// Subscribers in `fanout`.
    #[arg(long, env = "HAFEN_BENCH_FANOUT", default_value_t = 1000)]
    fanout: usize,

    /// Idle streams in `subscriptions`.
    #[arg(long, env = "HAFEN_BENCH_STREAMS", default_value_t = 10_000)]
    streams: usize,

    /// Expired messages purged in `purge`, spread over 10 tenants.
    #[arg(long, env = "HAFEN_BENCH_PURGE_MESSAGES", default_value_t = 1_000_000)]
    purge_messages: usize,

    /// Messages per purge batch in `purge` (and per raw DELETE of its baseline).
    #[arg(long, env = "HAFEN_BENCH_PURGE_BATCH", default_value_t = 1000)]
    purge_batch: i64,

    /// Pause between two purge batches in `purge` (the service's default).
    #[arg(long, env = "HAFEN_BENCH_PURGE_PAUSE", default_value = "0ms", value_parser = humantime::parse_duration)]
    purge_pause: std::time::Duration,

    /// Visits in `webchat`.
    #[arg(long, env = "HAFEN_BENCH_WEBCHAT_VISITS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    webchat_visits: u32,

    /// Visits whose visitor streams (SubscribeVisit) in the delivery load of `webchat`, and
    /// for which its visitors send; all when not given.
    #[arg(long, env = "HAFEN_BENCH_WEBCHAT_STREAMS", value_parser = clap::value_parser!(u32).range(1..))]
    webchat_streams: Option<u32>,

    /// Seconds each `webchat` load runs: the visitor sends and the member sends (each shared
    /// by their rounds), and the delivery load at half the visitor peak.
    #[arg(long, env = "HAFEN_BENCH_WEBCHAT_SECS", default_value_t = 20)]
    webchat_secs: u64,

    /// Turns the visitor sends and the member sends take in `webchat`.
    #[arg(long, env = "HAFEN_BENCH_WEBCHAT_ROUNDS", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    webchat_rounds: u32,

    /// Messages of the tenant backed up and restored in `backup`.
    #[arg(long, env = "HAFEN_BENCH_BACKUP_MESSAGES", default_value_t = 1_000_000)]
    backup_messages: usize,

    /// Messages of the user erased in `erasure`.
    #[arg(long, env = "HAFEN_BENCH_ERASURE_MESSAGES", default_value_t = 100_000)]
    erasure_messages: usize,

    /// bcrypt cost of the production figure in `provision`.
    #[arg(long, env = "HAFEN_BENCH_BCRYPT_COST", default_value_t = hafen_crypto::password::DEFAULT_BCRYPT_COST)]
    bcrypt_cost: u32,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    All,
    Provision,
    Migrate,
    Login,
    /// baseline, send and deliver.
    Send,
    Fanout,
    Subscriptions,
    /// Retention purge next to a raw batched DELETE.
    Purge,
    /// Website chat: visits, visitor sends next to member sends, delivery both ways.
    Webchat,
    /// EraseUser of a user with many messages, next to a raw UPDATE, under send load.
    Erasure,
    /// hafen-tenant backup and restore next to plain pg_dump and pg_restore.
    Backup,
}

/// One line of the result table.
pub struct Line {
    scenario: &'static str,
    metric: String,
    value: String,
    baseline: String,
    target: String,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let wants = |s: Scenario| cli.scenarios.contains(&Scenario::All) || cli.scenarios.contains(&s);
    let mut lines = Vec::new();
    let mut json = Vec::new();
    if wants(Scenario::Provision) {
        let (l, j) = provision::run(cli.tenants, cli.bcrypt_cost).await;
        lines.extend(l);
        json.push(j);
    }
    if wants(Scenario::Login) {
        let (l, j) = login::run(cli.bcrypt_cost).await;
        lines.extend(l);
        json.push(j);
    }
    if wants(Scenario::Send) {
        let (l, j) = messaging::run(
            std::time::Duration::from_secs(cli.send_secs),
            cli.send_rounds,
        )
        .await;
        lines.extend(l);
        json.extend(j);
    }
    if wants(Scenario::Fanout) {
        let (l, j) = messaging::fanout(cli.fanout, 20).await;
        lines.extend(l);
        json.push(j);
    }
    if wants(Scenario::Subscriptions) {
        let (l, j) = messaging::subscriptions(cli.streams).await;
        lines.extend(l);
        json.push(j);
    }
    if wants(Scenario::Purge) {
        let (l, j) = purge::run(cli.purge_messages, cli.purge_batch, cli.purge_pause).await;
        lines.extend(l);
        json.push(j);
    }
    if wants(Scenario::Webchat) {
        let (l, j) = webchat::run(
            cli.webchat_visits as usize,
            cli.webchat_streams.map(|streams| streams as usize),
            std::time::Duration::from_secs(cli.webchat_secs),
            cli.webchat_rounds,
        )
        .await;
        lines.extend(l);
        json.push(j);
    }
    if wants(Scenario::Erasure) {
        let (l, j) = erasure::run(cli.erasure_messages).await;
        lines.extend(l);
        json.push(j);
    }
    if wants(Scenario::Backup) {
        let (l, j) = backup::run(cli.backup_messages).await;
        lines.extend(l);
        json.push(j);
    }
    if wants(Scenario::Migrate) {
        let (l, j) = migrate::run(cli.migrate_tenants, cli.concurrency).await;
        lines.extend(l);
        json.push(j);
    }
    println!(
        "{:<10} {:<34} {:>14} {:>26} {:>16}",
        "scenario", "metric", "value", "baseline (same run)", "target"
    );
    for line in &lines {
        println!(
            "{:<10} {:<34} {:>14} {:>26} {:>16}",
            line.scenario, line.metric, line.value, line.baseline, line.target
        );
    }
    for line in json {
        println!("{line}");
    }
}

/// The `q`-quantile (0..=1) of sorted `values`.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Milliseconds of a duration.
pub fn ms(duration: std::time::Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
