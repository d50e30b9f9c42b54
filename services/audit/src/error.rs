//! The audit service's errors and their one mapping to gRPC statuses.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use hafen_platform::status;
use tonic::Status;

/// Everything that can go wrong in the audit service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Serving failed.
    #[error(transparent)]
    Platform(#[from] hafen_platform::Error),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] hafen_store::Error),
    /// A query failed.
    #[error("database: {0}")]
    Database(#[from] DieselError),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// Signing a chain head failed (a key could not be made or read).
    #[error("signing: {0}")]
    Signing(&'static str),
    /// A chain has events but its signing key is gone (removed from the database): it is not
    /// keyed anew, since a new key would make a rewritten history look signed.
    #[error("the chain's signing key is gone; its history cannot be vouched for")]
    ChainKeyLost,
    /// A key file is unusable, or key material failed to open.
    #[error("keys: {0}")]
    Keys(#[from] hafen_crypto::Error),
    /// The control plane lacks migrations this build needs.
    #[error("control plane has pending migrations {0:?}: run `hafen-tenant migrate` first")]
    NotMigrated(Vec<String>),
    /// An event this service built itself was refused by its own validation (a bug).
    #[error("own audit event refused: {0}")]
    OwnEvent(String),

    /// A request field is missing or malformed.
    #[error("{field}: {message}")]
    InvalidField {
        /// The field's path in the request.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The resource does not exist, or the caller may not know it does.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
}

impl Error {
    /// An [`Error::InvalidField`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Failures a retry may not see again: lost connections, serialisation conflicts, and a
/// concurrent batch that stored the same event id first (the retry counts it a duplicate).
fn is_transient(err: &DieselError) -> bool {
    match err {
        DieselError::DatabaseError(kind, _) => matches!(
            kind,
            DatabaseErrorKind::SerializationFailure
                | DatabaseErrorKind::ClosedConnection
                | DatabaseErrorKind::UnableToSendCommand
                | DatabaseErrorKind::UniqueViolation
        ),
        DieselError::BrokenTransactionManager => true,
        _ => false,
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::InvalidField { field, message } => status::invalid_field(&field, message),
            Error::NotFound(resource) => status::not_found(resource),
            Error::PermissionDenied(message) => status::permission_denied(message),
            Error::Store(ref store) if store.is_unavailable() => status::database_unavailable(&err),
            Error::Database(ref db) if hafen_store::unavailable(db) => {
                status::database_unavailable(&err)
            }
            Error::Database(ref db) | Error::Store(hafen_store::Error::Query(ref db))
                if is_transient(db) =>
            {
                tracing::warn!(error = %err, "database call failed; the client retries");
                status::unavailable("database busy or unreachable; retry later")
            }
            Error::ChainKeyLost => {
                tracing::error!(error = %err, "audit append refused");
                status::invalid_state(err.to_string())
            }
            other => status::internal(&other),
        }
    }
}
