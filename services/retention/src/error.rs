//! The retention service's errors and their one mapping to gRPC statuses.

use hafen_platform::status;
use tonic::{Code, Status};

/// Everything that can go wrong in the retention service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Serving failed (TLS, listener, transport).
    #[error(transparent)]
    Platform(#[from] hafen_platform::Error),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] hafen_store::Error),
    /// A query failed.
    #[error("database: {0}")]
    Database(#[from] diesel::result::Error),
    /// A blocking task failed.
    #[error("background task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A key file is unusable, or key material failed to open.
    #[error("keys: {0}")]
    Keys(#[from] hafen_crypto::Error),
    /// The control plane lags behind this build; `hafen-tenant migrate` brings it up to date.
    #[error("control plane has pending migrations {0:?}: run `hafen-tenant migrate` first")]
    NotMigrated(Vec<String>),

    /// A request field is missing or malformed.
    #[error("{field}: {message}")]
    InvalidField {
        /// The field's path in the request.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A retention period exceeds its limit: 730 days for the tenant, the tenant's period
    /// for a conversation (CB5).
    #[error("{field}: at most {max_days} days")]
    RetentionTooLong {
        /// The field's path in the request.
        field: &'static str,
        /// The limit in days.
        max_days: u32,
    },
    /// The resource does not exist, or the caller may not know it does.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller's role does not allow the call.
    #[error("{message}")]
    PermissionDenied {
        /// What the caller may not do.
        message: &'static str,
        /// The role (or `internal`, `operator`) the call needs.
        required: &'static str,
    },
    /// A purge run lost its claim: it was taken over as failed because its heartbeat stopped.
    #[error("purge run {0} was taken over")]
    TakenOver(uuid::Uuid),
    /// The service is shutting down; a purge stops between batches.
    #[error("the service is shutting down")]
    ShuttingDown,
}

impl Error {
    /// An [`Error::InvalidField`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    /// PERMISSION_DENIED for a call that needs an admin (or the owner).
    pub fn admins_only(message: &'static str) -> Self {
        Self::PermissionDenied {
            message,
            required: "admin",
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::InvalidField { field, message } => status::invalid_field(&field, message),
            Error::RetentionTooLong { field, max_days } => status::error(
                Code::InvalidArgument,
                "RETENTION_TOO_LONG",
                format!("{field}: at most {max_days} days (CB5)"),
                &[("field", field), ("max_days", &max_days.to_string())],
            ),
            Error::NotFound(resource) => status::not_found(resource),
            Error::PermissionDenied { message, required } => status::error(
                Code::PermissionDenied,
                "PERMISSION_DENIED",
                message,
                &[("required", required)],
            ),
            Error::ShuttingDown => status::unavailable("the server is shutting down; retry later"),
            Error::Store(ref store) if store.is_unavailable() => status::database_unavailable(&err),
            Error::Database(ref db) if hafen_store::unavailable(db) => {
                status::database_unavailable(&err)
            }
            Error::Store(hafen_store::Error::UnknownTenant) => {
                status::unauthenticated("the session's tenant no longer exists")
            }
            other => status::internal(&other),
        }
    }
}
