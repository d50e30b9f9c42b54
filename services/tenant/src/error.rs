//! The tenant service's error type.

/// Errors that stop the tenant service or its `migrate` command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Serving failed (TLS, listener, transport).
    #[error(transparent)]
    Platform(#[from] hafen_platform::Error),

    /// The database failed.
    #[error(transparent)]
    Store(#[from] hafen_store::Error),

    /// The control plane lags behind this build; `hafen-tenant migrate` brings it up to date.
    #[error("control plane has pending migrations {0:?}: run `hafen-tenant migrate` first")]
    NotMigrated(Vec<String>),
}
