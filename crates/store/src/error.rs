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

impl Error {
    /// Whether the database could not be reached or went away (UNAVAILABLE for clients, a
    /// retry may succeed), as opposed to a query or configuration that is wrong.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Pool(_) | Self::Connection(_) => true,
            Self::Query(err) => unavailable(err),
            _ => false,
        }
    }
}

/// Whether a query failed because the database could not be reached or went away: the
/// connection broke or closed (no SQLSTATE), or the server is shutting down, starting up or
/// terminated the session (SQLSTATE class 57, which diesel reports by message only).
pub fn unavailable(err: &diesel::result::Error) -> bool {
    use diesel::result::DatabaseErrorKind::{ClosedConnection, UnableToSendCommand, Unknown};
    match err {
        diesel::result::Error::DatabaseError(ClosedConnection | UnableToSendCommand, _) => true,
        diesel::result::Error::DatabaseError(Unknown, info) => {
            let message = info.message();
            message.starts_with("terminating connection")
                || message.starts_with("the database system is")
                || message.starts_with("canceling statement due to conflict with recovery")
        }
        diesel::result::Error::BrokenTransactionManager => true,
        _ => false,
    }
}

/// Result with the store [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
