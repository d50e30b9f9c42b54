//! The store's error type.

/// Errors from the pool, queries and migrations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be had within the wait or create timeout, or the database refused.
    #[error("database unavailable: {0}")]
    Pool(#[from] diesel_async::pooled_connection::deadpool::PoolError),

    /// The pool's configuration is invalid.
    #[error("database pool configuration: {0}")]
    PoolBuild(#[from] diesel_async::pooled_connection::deadpool::BuildError),

    /// The database configuration (its URL or TLS parameters) is invalid.
    #[error("database configuration: {0}")]
    Config(String),

    /// A connection could not be established.
    #[error("database connection: {0}")]
    Connection(#[from] diesel::ConnectionError),

    /// A query failed.
    #[error("database query: {0}")]
    Query(#[from] diesel::result::Error),

    /// The tenant does not exist or was deleted.
    #[error("unknown tenant")]
    UnknownTenant,

    /// The tenant's key is gone (the tenant was deleted): nothing of it can be read.
    #[error("the tenant's key is destroyed")]
    KeyDestroyed,

    /// A key did not unwrap or a key could not be made.
    #[error("keys: {0}")]
    Crypto(#[from] hafen_crypto::Error),

    /// A migration failed; nothing of it was applied.
    #[error("migration: {0}")]
    Migration(String),
}

/// Result with the store [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
