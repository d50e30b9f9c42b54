//! Database configuration, shared by every service that stores data.

use std::time::Duration;

use clap::Args;

/// Where the database is and how the connection pool behaves.
#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL URL of the main database, e.g.
    /// `postgres://hafen_app@db:5432/hafen?sslmode=verify-full&sslrootcert=/etc/hafen/db-ca.pem`.
    /// TLS as libpq reads the URL: `sslmode` verify-full (the default), verify-ca, require
    /// or disable (prefer and allow are refused: they fall back to plaintext silently);
    /// `sslrootcert` the CA file (default: the system's roots). Put a password in the
    /// environment variable rather than on the command line.
    #[arg(long, env = "HAFEN_DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Most connections the pool of each database opens. The messaging service has a second
    /// pool of this size per database, for its group commit.
    #[arg(long, env = "HAFEN_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,

    /// How long a request waits for a free connection before it fails with UNAVAILABLE.
    #[arg(long, env = "HAFEN_DB_WAIT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_wait_timeout: Duration,

    /// How long opening a new connection may take.
    #[arg(long, env = "HAFEN_DB_CREATE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_create_timeout: Duration,

    /// How long the reset of a returned connection may take before it is discarded.
    #[arg(long, env = "HAFEN_DB_RECYCLE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub db_recycle_timeout: Duration,

    /// Connections older than this are closed instead of reused (spreads load after failover).
    #[arg(long, env = "HAFEN_DB_MAX_LIFETIME", default_value = "30m", value_parser = humantime::parse_duration)]
    pub db_max_lifetime: Duration,

    /// How long a service waits at start for `hafen-tenant migrate` to bring the control
    /// plane and the key store up to this version (a deployment runs the migration beside
    /// the rollout); 0 refuses to start at once while a migration is pending.
    #[arg(long, env = "HAFEN_MIGRATION_WAIT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub migration_wait: Duration,
}

impl DatabaseArgs {
    /// Settings for `url` with every pool option at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            database_url: url.into(),
            db_pool_size: 16,
            db_wait_timeout: Duration::from_secs(5),
            db_create_timeout: Duration::from_secs(5),
            db_recycle_timeout: Duration::from_secs(2),
            db_max_lifetime: Duration::from_secs(30 * 60),
            migration_wait: Duration::ZERO,
        }
    }
}
