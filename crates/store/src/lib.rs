//! PostgreSQL for Hafen.
//!
//! - [`config`]: the `--database-url` and pool settings every service that stores data takes.
//! - [`connect`]: connections over TLS, configured by the URL's libpq parameters (`sslmode`,
//!   `sslrootcert`); every connection Hafen opens goes through it.
//! - [`pool`]: a diesel-async connection pool (deadpool) with wait/create/recycle timeouts and
//!   a maximum connection age. Connections are reset on return, so a role or search path set
//!   for one request never leaks into the next.
//! - [`migrate`]: the migration runner for the control-plane schema `hafen` and the key
//!   store's `hafen_keys`.
//! - [`tenancy`]: one schema and role per tenant; [`tenancy::with_tenant`], the only way to
//!   reach tenant data; creating, migrating and dropping tenant schemas.
//! - [`commit`]: group commit, one batching committer per tenant on a thread of its own.
//! - [`accounts`]: users and chat codes inside a tenant schema, and their validated names.
//! - [`databases`]: the main database and the placement databases, and where each tenant
//!   lives.
//! - [`control`]: the control-plane repository (tenants).
//! - [`keystore`]: the key store, apart from tenant data: wrapped keys and the deletion log.
//! - [`erasure`]: erasing a user: their key destroyed, their rows erased or pseudonymised.
//! - [`keyring`]: users' data keys, unwrapped through the tenant keys, cached bounded.
//! - [`sessions`]: sessions, the truth behind access tokens.
//! - [`facts`]: what each running service reports about itself (link security, measures),
//!   the source of the Art. 30 record's technical measures.
//! - [`settings`]: tenant settings as stored, with their defaults.
//! - [`schema`]: diesel table definitions.
//!
//! Repository functions take `&mut AsyncPgConnection` and return `QueryResult`; diesel
//! `table!` definitions live here and stay unqualified.

pub mod accounts;
pub mod commit;
pub mod config;
pub mod connect;
pub mod control;
pub mod databases;
pub mod erasure;
pub mod error;
pub mod facts;
pub mod keyring;
pub mod keystore;
pub mod log;
pub mod masking;
pub mod migrate;
pub mod outbox;
pub mod pool;
pub mod prepared;
pub mod schema;
pub mod sessions;
pub mod settings;
pub mod tenancy;

pub use config::DatabaseArgs;
pub use databases::{DEFAULT_DATABASE, Databases, DatabasesArgs, PLACEMENT_RECHECK};
pub use diesel_async::AsyncPgConnection;
pub use error::{Error, Result, unavailable};
pub use pool::{Pool, PooledConnection};
pub use tenancy::{TenantId, in_transaction, with_tenant};

/// The current time as PostgreSQL stores it (microseconds), so that what a call returns is
/// what a later read shows.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6)
}

/// Whether `err` is a unique violation of `constraint`.
pub fn is_unique_violation(err: &diesel::result::Error, constraint: &str) -> bool {
    matches!(
        err,
        diesel::result::Error::DatabaseError(diesel::result::DatabaseErrorKind::UniqueViolation, info)
            if info.constraint_name() == Some(constraint)
    )
}
