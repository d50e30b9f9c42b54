//! Hafen's tenant service (`hafen.tenant.v1.TenantService`): tenant provisioning, one
//! PostgreSQL schema and role per tenant, its settings and its deletion (DC2, OC6, TM3, BX3,
//! GR2, GR3, GR4). It owns the control-plane schema `hafen` and the migrations of the control
//! plane and of every tenant schema (`hafen-tenant migrate`).
//!
//! - [`tenants`]: the domain — provisioning in one transaction, reads, settings, deletion.
//! - [`settings`]: tenant settings, their defaults and validation.
//! - [`migrate`]: migrations across all tenants.
//! - [`export`]: the owner's export of the organisation as a streamed ZIP (GR5).
//! - [`user_export`]: a user's export of their own data, streamed the same way (Art. 15/20).
//! - [`backup`]: per-tenant backups, encrypted, with manifests and pruning (TM6).
//! - `api`: the thin gRPC adapter; `error`: the one mapping of errors to statuses.
//!
//! The service is a library: [`serve`] runs it on a bound listener until a shutdown future
//! resolves, so the `hafen-tenant` binary, `hafen dev` and the tests all run the same code.

mod api;
pub mod backup;
mod error;
pub mod export;
pub mod migrate;
pub mod rotate;
pub mod settings;
pub mod tenants;
pub mod user_export;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use std::sync::Arc;

use hafen_authn::remote::{AuthEndpointArgs, RemoteIntrospect};
use hafen_authn::{
    Authenticator, AuthnLayer, MAX_ACCESS_TTL, OperatorArgs, PlatformToken, Redis, RedisArgs,
    Revocations,
};
use hafen_crypto::{MasterKey, Purpose};
use hafen_platform::{GrpcServer, ServerArgs, TelemetryArgs, TlsMaterial};
use hafen_proto::tenant::v1::tenant_service_server::TenantServiceServer;
use hafen_store::{Databases, DatabasesArgs};
use tokio::net::TcpListener;

pub use api::{TenantApi, to_proto};
pub use error::Error;
pub use tenants::{Placements, Policy, Tenants};

/// Short name: the development certificate is `<dev certs dir>/tenant.pem`.
pub const NAME: &str = "tenant";

/// Name of the binary.
pub const BINARY: &str = "hafen-tenant";

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50053";

/// Prepared provisioning transactions older than this are resolved at start-up.
pub(crate) const PREPARED_MIN_AGE: Duration = Duration::from_secs(600);

/// Configuration of the tenant service.
#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub databases: DatabasesArgs,

    #[command(flatten)]
    pub operator: OperatorArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub audit: hafen_events::AuditEndpointArgs,

    #[command(flatten)]
    pub auth: AuthEndpointArgs,

    /// File with the master key that wraps tenant keys: base64 of 32 random bytes, or the
    /// versioned form `rotate-master-key` writes. Read again for each new tenant. It never
    /// enters a database; losing it makes every tenant's data unreadable.
    #[arg(long, env = "HAFEN_MASTER_KEY_FILE")]
    pub master_key_file: PathBuf,

    /// Versions of the data-processing agreement customers may accept (GR2), comma-separated.
    #[arg(
        long,
        env = "HAFEN_DPA_VERSIONS",
        value_delimiter = ',',
        default_value = "2025-01"
    )]
    pub dpa_versions: Vec<String>,

    /// Hosting regions tenants may be recorded in (UL4), comma-separated.
    #[arg(
        long,
        env = "HAFEN_REGIONS",
        value_delimiter = ',',
        default_value = "eu-central"
    )]
    pub regions: Vec<String>,

    /// bcrypt cost of new password hashes (4-31; each step doubles the time).
    #[arg(long, env = "HAFEN_BCRYPT_COST", default_value_t = hafen_crypto::password::DEFAULT_BCRYPT_COST,
          value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,

    /// Minimum length of new passwords, in characters.
    #[arg(long, env = "HAFEN_MIN_PASSWORD_CHARS", default_value_t = hafen_crypto::password::DEFAULT_MIN_PASSWORD_CHARS)]
    pub min_password_chars: usize,
}

impl Config {
    /// The creation policy this configuration sets.
    pub fn policy(&self) -> Policy {
        Policy {
            dpa_versions: self.dpa_versions.clone(),
            regions: self.regions.clone(),
            bcrypt_cost: self.bcrypt_cost,
            min_password_chars: self.min_password_chars,
        }
    }
}

/// The `hafen-tenant` command line.
#[derive(Parser, Debug)]
#[command(
    name = BINARY,
    version,
    about = "Tenant provisioning: a PostgreSQL schema and role per tenant",
    long_about = "Tenant provisioning: a PostgreSQL schema and role per tenant.\n\n\
        Without a subcommand it serves gRPC. `migrate` upgrades the control plane and every \
        tenant schema and exits; run it once per deploy, before the new version serves. \
        `derive-keys` writes the key file of a service that must not hold the master key. \
        `backup` and `restore` back up and restore tenants. `rotate-master-key` adds a master \
        key version, re-wraps every tenant key under it and retires old versions.",
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

/// What `hafen-tenant` does besides serving.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Migrate the control plane and every tenant schema to this version, then exit. Exits
    /// non-zero when any tenant failed (the others are migrated regardless).
    Migrate(MigrateArgs),
    /// Write the keys derived from the master key that one service needs (auth, audit,
    /// retention) to a file (mode 0600), then exit. Those services get this file, never
    /// the master key.
    DeriveKeys(DeriveKeysArgs),
    /// Back up one tenant (--tenant) or every active tenant (--all, then delete backups
    /// older than --keep): its schema by pg_dump, with its control-plane row but no key,
    /// encrypted under a key derived from the master key, with a manifest (sizes, SHA-256).
    /// Exits non-zero when any backup failed.
    Backup(Box<backup::BackupArgs>),
    /// Restore a tenant's backup (given by its manifest): recreate its role and schema (a live
    /// tenant's only with --replace), restore, migrate to this version, and end with the
    /// deletion-log replay, so what was deleted or erased since the backup is again.
    Restore(Box<backup::RestoreArgs>),
    /// Add a new master-key version and make it current, re-wrap every tenant key under it
    /// while the services run, and (with --retire) remove an old version no key needs. The
    /// file is replaced at once (mode 0600); services read it again when they meet a key
    /// wrapped under a version they lack.
    RotateMasterKey(Box<rotate::RotateArgs>),
}

/// `hafen-tenant rotate-master-key` on its own, without the serving options.
#[derive(Parser, Debug)]
#[command(
    name = "hafen-tenant rotate-master-key",
    version,
    about = "Add a master-key version, re-wrap every tenant key under it, retire old versions"
)]
pub struct RotateCli {
    #[command(flatten)]
    pub args: rotate::RotateArgs,
}

/// `hafen-tenant restore` on its own, without the serving options.
#[derive(Parser, Debug)]
#[command(
    name = "hafen-tenant restore",
    version,
    about = "Restore a tenant's backup, migrate it and replay the deletion log, then exit"
)]
pub struct RestoreCli {
    #[command(flatten)]
    pub args: backup::RestoreArgs,
}

/// `hafen-tenant backup` on its own, without the serving options.
#[derive(Parser, Debug)]
#[command(
    name = "hafen-tenant backup",
    version,
    about = "Back up one tenant or every tenant (encrypted, with a manifest), then exit"
)]
pub struct BackupCli {
    #[command(flatten)]
    pub args: backup::BackupArgs,
}

/// Options of `hafen-tenant derive-keys`.
#[derive(clap::Args, Debug, Clone)]
pub struct DeriveKeysArgs {
    /// The service the keys are for: auth, audit or retention.
    #[arg(long, env = "HAFEN_KEYS_SERVICE", value_parser = ["auth", "audit", "retention"])]
    pub service: String,

    /// The master key file.
    #[arg(long, env = "HAFEN_MASTER_KEY_FILE")]
    pub master_key_file: PathBuf,

    /// Where to write the key file (the service reads it as its --keys-file).
    #[arg(long, env = "HAFEN_KEYS_FILE")]
    pub out: PathBuf,
}

/// `hafen-tenant derive-keys` on its own, without the serving options.
#[derive(Parser, Debug)]
#[command(
    name = "hafen-tenant derive-keys",
    version,
    about = "Write the key file of a service that must not hold the master key, then exit"
)]
pub struct DeriveKeysCli {
    #[command(flatten)]
    pub args: DeriveKeysArgs,
}

/// Writes the key file `args` asks for.
pub fn derive_keys(args: &DeriveKeysArgs) -> Result<(), Error> {
    let purposes = hafen_crypto::subkeys::needed_by(&args.service)
        .ok_or_else(|| Error::Config(format!("no key file for service `{}`", args.service)))?;
    let master = MasterKey::load(&args.master_key_file)?;
    hafen_crypto::SubKeys::derive(&master, purposes).write(&args.out)?;
    Ok(())
}

/// `hafen-tenant migrate` on its own: the serving options are not needed (nor parsed) then.
#[derive(Parser, Debug)]
#[command(
    name = "hafen-tenant migrate",
    version,
    about = "Migrate the control plane and every tenant schema to this version, then exit"
)]
pub struct MigrateCli {
    #[command(flatten)]
    pub args: MigrateArgs,
}

/// What `hafen-tenant` was asked to do.
#[derive(Debug)]
pub enum Invocation {
    /// Serve gRPC.
    Serve(Box<Cli>),
    /// Migrate and exit.
    Migrate(Box<MigrateArgs>),
    /// Write a service's key file and exit.
    DeriveKeys(DeriveKeysArgs),
    /// Back up and exit.
    Backup(Box<backup::BackupArgs>),
    /// Restore and exit.
    Restore(Box<backup::RestoreArgs>),
    /// Rotate the master key and exit.
    RotateMasterKey(Box<rotate::RotateArgs>),
}

impl Cli {
    /// Parses the command line. `migrate` is parsed on its own, because the serving options
    /// are required only when serving.
    pub fn parse_args() -> Invocation {
        let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
        if args.get(1).is_some_and(|a| a == "migrate") {
            let rest = std::iter::once(std::ffi::OsString::from("hafen-tenant migrate"))
                .chain(args.into_iter().skip(2));
            return Invocation::Migrate(Box::new(MigrateCli::parse_from(rest).args));
        }
        if args.get(1).is_some_and(|a| a == "derive-keys") {
            let rest = std::iter::once(std::ffi::OsString::from("hafen-tenant derive-keys"))
                .chain(args.into_iter().skip(2));
            return Invocation::DeriveKeys(DeriveKeysCli::parse_from(rest).args);
        }
        if args.get(1).is_some_and(|a| a == "backup") {
            let rest = std::iter::once(std::ffi::OsString::from("hafen-tenant backup"))
                .chain(args.into_iter().skip(2));
            return Invocation::Backup(Box::new(BackupCli::parse_from(rest).args));
        }
        if args.get(1).is_some_and(|a| a == "restore") {
            let rest = std::iter::once(std::ffi::OsString::from("hafen-tenant restore"))
                .chain(args.into_iter().skip(2));
            return Invocation::Restore(Box::new(RestoreCli::parse_from(rest).args));
        }
        if args.get(1).is_some_and(|a| a == "rotate-master-key") {
            let rest = std::iter::once(std::ffi::OsString::from("hafen-tenant rotate-master-key"))
                .chain(args.into_iter().skip(2));
            return Invocation::RotateMasterKey(Box::new(RotateCli::parse_from(rest).args));
        }
        let cli = Self::parse_from(args);
        match cli.command {
            Some(Command::Migrate(args)) => Invocation::Migrate(Box::new(args)),
            Some(Command::DeriveKeys(args)) => Invocation::DeriveKeys(args),
            Some(Command::Backup(args)) => Invocation::Backup(args),
            Some(Command::Restore(args)) => Invocation::Restore(args),
            Some(Command::RotateMasterKey(args)) => Invocation::RotateMasterKey(args),
            None => Invocation::Serve(Box::new(cli)),
        }
    }
}

/// Options of `hafen-tenant migrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub databases: DatabasesArgs,

    /// Tenants migrated at the same time.
    #[arg(long, env = "HAFEN_MIGRATE_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Serves the tenant service on `listener` until `shutdown` resolves, then drains.
///
/// Refuses to start while the control plane has pending migrations: the schema a release
/// expects is put in place by `hafen-tenant migrate`, once per deploy, not by every replica.
pub async fn serve<F>(config: Config, listener: TcpListener, shutdown: F) -> Result<(), Error>
where
    F: Future<Output = ()> + Send + 'static,
{
    let pending = hafen_store::migrate::wait_until_migrated(&config.databases, true).await?;
    if !pending.is_empty() {
        return Err(Error::NotMigrated(pending));
    }
    let tls = TlsMaterial::load(&config.server.tls, NAME)?;
    let master = MasterKey::load(&config.master_key_file)?;
    let token = PlatformToken::load(&config.operator.platform_token_file)
        .map_err(|err| Error::Config(err.to_string()))?;
    let redis = Redis::connect(&config.redis)
        .await
        .map_err(Error::Config)?
        .with_session_key(Purpose::SessionCache.derive(&master));
    let databases = Databases::new(&config.databases)?;
    let tenants = Tenants::new(
        databases.clone(),
        master,
        Some(config.master_key_file.clone()),
        config.policy(),
        Some(redis.clone()),
    );
    // A placement database that is down must not keep the service from starting: its
    // leftovers are resolved on the next start or `migrate`.
    match tenants.resolve_prepared(PREPARED_MIN_AGE).await {
        Ok(0) => {}
        Ok(resolved) => tracing::warn!(resolved, "resolved provisioning interrupted by a crash"),
        Err(err) => tracing::warn!(error = %err, "could not check for interrupted provisioning"),
    }
    let relay = hafen_events::Relay::spawn(BINARY, &databases, &config.audit, &tls)
        .map_err(|err| Error::Config(format!("--audit-endpoint: {err}")))?;
    tenants.set_relay(relay);
    let mut measures = vec![hafen_store::facts::measure::TENANT_DELETION];
    if databases.keystore_apart() {
        measures.push(hafen_store::facts::measure::KEY_STORE_APART);
    } else {
        tracing::warn!(
            "no --keystore-url: keys and the deletion log are in the main database, so its backups hold keys"
        );
    }
    hafen_store::facts::start_reporting(
        databases.main().clone(),
        hafen_store::facts::ServiceFacts::new(
            NAME,
            config.server.tls.mtls,
            &config.databases,
            Some(config.redis.tls()),
            &measures,
        ),
    )
    .await;
    let revocations = Revocations::new(MAX_ACCESS_TTL);
    revocations.listen(redis.clone());
    revocations.forget_moved_placements(databases.clone());
    databases.report_pool_metrics("tenant", "requests");
    // ExportTenant streams end when their session does, even if the announcement is lost.
    revocations.recheck_streams(databases.main().clone());
    tenants.follow_deletions(revocations.tenant_deletions());
    let resolver = RemoteIntrospect::new(&config.auth, &tls)
        .map_err(|err| Error::Config(format!("--auth-endpoint: {err}")))?;
    let authenticator =
        Authenticator::new(Some(token), Some(redis), Arc::new(resolver), revocations);
    let layer = AuthnLayer::new(authenticator.clone(), &[]);
    GrpcServer::new(BINARY, tls, config.server.drain_timeout)
        .side_ports(&config.server)
        .add_service(layer.wrap(TenantServiceServer::new(TenantApi::new(
            tenants,
            authenticator,
        ))))
        .serve(listener, shutdown)
        .await?;
    Ok(())
}

/// The `hafen-tenant` command line, for `--help` checks.
pub fn command() -> clap::Command {
    Cli::command()
}
