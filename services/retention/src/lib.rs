//! Hafen's retention service (`hafen.retention.v1.RetentionService`): retention policies per
//! tenant and conversation, legal holds, the purge job, and deletion replay after a restore
//! (CB5, GR4, TM6).
//!
//! - [`policy`]: the tenant's and conversations' retention periods, and legal holds.
//! - [`purge`]: the purge job: bounded, throttled batches per tenant, tracked in
//!   `purge_runs`, on a schedule and on demand.
//! - [`replay`]: the deletion log applied again after a backup restore
//!   (`hafen-retention replay-deletions`, or the internal ReplayDeletions RPC).
//! - [`rows`]: rows of the retention tables and their API forms.
//! - `visits`: the website chat's part of a purge: expired visits and old consent answers.
//! - `api`: the thin gRPC adapter; `error`: the one mapping of errors to statuses.
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-retention` binary, `hafen dev` and the tests all run the same code.
//! Every change is audited through the outbox in the transaction that makes it.

mod api;
mod error;
pub mod policy;
pub mod purge;
pub mod replay;
pub mod rows;
mod visits;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use hafen_authn::remote::RemoteIntrospect;
use hafen_authn::{Authenticator, AuthnLayer, MAX_ACCESS_TTL, PlatformToken, Redis, Revocations};
use hafen_platform::{GrpcServer, ServerArgs, ServiceSpec, TelemetryArgs, TlsMaterial};
use hafen_proto::retention::v1::retention_service_server::RetentionServiceServer;
use hafen_store::Databases;
use tokio::net::TcpListener;

pub use api::RetentionApi;
pub use error::Error;
pub use policy::Policies;
pub use purge::Purger;
pub use replay::{ReplayReport, Replayer};

/// Short name: the development certificate is `<dev certs dir>/retention.pem`.
pub const NAME: &str = "retention";

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50054";

/// How the `hafen-retention` binary presents itself on the command line.
pub const SPEC: ServiceSpec = ServiceSpec {
    binary: "hafen-retention",
    about: "Retention policies, legal holds and purges",
    default_listen: DEFAULT_LISTEN,
};

/// Configuration of the retention service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub databases: hafen_store::DatabasesArgs,

    #[command(flatten)]
    pub operator: hafen_authn::OperatorArgs,

    #[command(flatten)]
    pub redis: hafen_authn::RedisArgs,

    #[command(flatten)]
    pub auth: hafen_authn::remote::AuthEndpointArgs,

    #[command(flatten)]
    pub audit: hafen_events::AuditEndpointArgs,

    #[command(flatten)]
    pub purge: PurgeArgs,

    /// File with the keys derived from the master key that this service uses (session-cache),
    /// written by `hafen-tenant derive-keys --service retention`. This service never holds the
    /// master key itself.
    #[arg(long, env = "HAFEN_KEYS_FILE")]
    pub keys_file: std::path::PathBuf,
}

/// How the purge job runs (CB5).
#[derive(clap::Args, Clone, Debug)]
pub struct PurgeArgs {
    /// How often every tenant is purged of expired messages.
    #[arg(long, env = "HAFEN_PURGE_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub purge_interval: std::time::Duration,

    /// Messages deleted per statement (and transaction). Batches are the throttle: each is a
    /// short transaction, so live writes never wait long for the purge.
    #[arg(long, env = "HAFEN_PURGE_BATCH", default_value_t = 1000)]
    pub purge_batch: i64,

    /// Pause between two batches, to slow the purge further on a busy database (`make bench`
    /// measured live send p99 at 1.2x during an unpaused purge).
    #[arg(long, env = "HAFEN_PURGE_PAUSE", default_value = "0ms", value_parser = humantime::parse_duration)]
    pub purge_pause: std::time::Duration,
}

/// The `hafen-retention` command line.
#[derive(Parser, Debug)]
#[command(
    name = "hafen-retention",
    version,
    about = "Retention policies, legal holds and purges",
    long_about = "Retention policies, legal holds and purges (CB5, GR4).\n\n\
        Without a subcommand it serves gRPC. `replay-deletions` applies the deletion log again \
        after a backup restore and exits; every restore ends with it.",
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to serve gRPC (TLS) on. Use 0.0.0.0 to accept connections from other hosts.
    #[arg(long, env = "HAFEN_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub config: Config,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// What a `hafen-retention` command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Serve gRPC.
    Serve(Box<Cli>),
    /// Replay the deletion log, then exit.
    ReplayDeletions(Box<ReplayArgs>),
}

impl Cli {
    /// Parses a command line. A subcommand takes only its own options: the serving ones
    /// (token file, endpoints, ...) are neither required nor read.
    pub fn invocation_from<I, T>(args: I) -> Result<Invocation, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        if let Some(("replay-deletions", sub)) = matches.subcommand() {
            return Ok(Invocation::ReplayDeletions(Box::new(
                ReplayArgs::from_arg_matches(sub)?,
            )));
        }
        Ok(Invocation::Serve(Box::new(Self::from_arg_matches(
            &matches,
        )?)))
    }

    /// [`Cli::invocation_from`] the process arguments; exits with clap's message on bad
    /// input.
    pub fn invocation() -> Invocation {
        Self::invocation_from(std::env::args_os()).unwrap_or_else(|err| err.exit())
    }
}

/// What `hafen-retention` does besides serving.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Delete again every tenant and user in the deletion log that a backup restore brought
    /// back (schema, role, keys, sessions), then exit. Safe to run any number of times.
    ReplayDeletions(ReplayArgs),
}

/// Options of `hafen-retention replay-deletions`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub databases: hafen_store::DatabasesArgs,

    #[command(flatten)]
    pub redis: hafen_authn::RedisArgs,

    /// Only report what would be deleted; change nothing.
    #[arg(long, env = "HAFEN_REPLAY_DRY_RUN")]
    pub dry_run: bool,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Refuses to work on a control plane or key store that lags behind this build.
async fn require_migrated(args: &hafen_store::DatabasesArgs) -> Result<(), Error> {
    let pending = hafen_store::migrate::wait_until_migrated(args, true).await?;
    if pending.is_empty() {
        Ok(())
    } else {
        Err(Error::NotMigrated(pending))
    }
}

/// Serves the retention service on `listener` until `shutdown` resolves, then drains: the
/// purge runs stop between two batches (ending as failed; the next run continues).
///
/// Refuses to start while the control plane has pending migrations (`hafen-tenant migrate`).
pub async fn serve<F>(config: Config, listener: TcpListener, shutdown: F) -> Result<(), Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    require_migrated(&config.databases).await?;
    let tls = TlsMaterial::load(&config.server.tls, NAME)?;
    let databases = Databases::new(&config.databases)?;
    let token = PlatformToken::load(&config.operator.platform_token_file)
        .map_err(|err| Error::Config(err.to_string()))?;
    let keys = hafen_crypto::SubKeys::load(&config.keys_file)?;
    let redis = Redis::connect(&config.redis)
        .await
        .map_err(Error::Config)?
        .with_session_key(keys.get(hafen_crypto::Purpose::SessionCache)?);
    let relay = hafen_events::Relay::spawn(NAME, &databases, &config.audit, &tls)
        .map_err(|err| Error::Config(format!("--audit-endpoint: {err}")))?;
    let revocations = Revocations::new(MAX_ACCESS_TTL);
    revocations.listen(redis.clone());
    revocations.forget_moved_placements(databases.clone());
    databases.report_pool_metrics("retention", "requests");
    let resolver = RemoteIntrospect::new(&config.auth, &tls)
        .map_err(|err| Error::Config(format!("--auth-endpoint: {err}")))?;
    let authenticator = Authenticator::new(
        Some(token),
        Some(redis.clone()),
        Arc::new(resolver),
        revocations,
    );

    hafen_store::facts::start_reporting(
        databases.main().clone(),
        hafen_store::facts::ServiceFacts::new(
            NAME,
            config.server.tls.mtls,
            &config.databases,
            Some(config.redis.tls()),
            &[
                hafen_store::facts::measure::RETENTION_PURGE,
                hafen_store::facts::measure::DELETION_REPLAY,
            ],
        ),
    )
    .await;
    let policies = Policies::new(databases.clone(), Some(relay.clone()));
    let purger = Purger::new(databases.clone(), config.purge.clone(), Some(relay.clone()));
    let replayer = Replayer::new(databases, Some(redis), Some(relay));
    purger.schedule();
    // Purges stop as soon as the drain begins; a run in progress ends as failed and the
    // next one continues where it stopped.
    let stopping = purger.clone();
    let drain = config.server.drain_timeout;
    let shutdown = async move {
        shutdown.await;
        stopping.stop();
    };
    // ReplayDeletions authenticates itself (operator token or service certificate); a call
    // with a token still passes the layer, which finds the operator.
    let layer = AuthnLayer::new(authenticator, &[]);
    GrpcServer::new(SPEC.binary, tls, config.server.drain_timeout)
        .side_ports(&config.server)
        .add_service(layer.wrap(RetentionServiceServer::new(RetentionApi::new(
            policies,
            purger.clone(),
            replayer,
        ))))
        .serve(listener, shutdown)
        .await?;
    purger.shutdown(drain).await;
    Ok(())
}

/// `hafen-retention replay-deletions`: applies the deletion log again as the operator.
/// Refuses to run on a control plane that lags behind this build.
pub async fn replay_deletions(args: &ReplayArgs) -> Result<ReplayReport, Error> {
    require_migrated(&args.databases).await?;
    let databases = Databases::new(&args.databases)?;
    let redis = Redis::connect(&args.redis).await.map_err(Error::Config)?;
    Replayer::new(databases, Some(redis), None)
        .replay(args.dry_run, hafen_events::Actor::Operator)
        .await
}

/// The `hafen-retention` command line, for `--help` checks.
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_deletions_needs_only_its_own_options() {
        let invocation = Cli::invocation_from([
            "hafen-retention",
            "replay-deletions",
            "--dry-run",
            "--database-url",
            "postgres://hafen_app@127.0.0.1:1/hafen",
            "--redis-url",
            "redis://127.0.0.1:1/",
        ])
        .unwrap();
        let Invocation::ReplayDeletions(args) = invocation else {
            panic!("not the subcommand");
        };
        assert!(args.dry_run);
        command().debug_assert();
    }
}
