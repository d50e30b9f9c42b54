//! The messaging service's errors and their one mapping to gRPC statuses.

use hafen_platform::status;
use tonic::{Code, Status};

/// Everything that can go wrong in the messaging service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Serving failed.
    #[error(transparent)]
    Platform(#[from] hafen_platform::Error),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] hafen_store::Error),
    /// Keys or ciphertext failed.
    #[error(transparent)]
    Crypto(#[from] hafen_crypto::Error),
    /// A query failed.
    #[error("database: {0}")]
    Database(#[from] diesel::result::Error),
    /// The configuration is unusable (at start-up).
    #[error("configuration: {0}")]
    Config(String),
    /// A dependency could not be reached: the database, the commit thread. A retry may
    /// succeed.
    #[error("{0} unavailable")]
    Unavailable(&'static str),
    /// A tenant's sends queue up faster than they are stored: the sender should back off.
    #[error("too many sends queued")]
    Overloaded,
    /// A batch of sends failed for a reason other than an unreachable database.
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// An invariant of this service broke (a bug).
    #[error("internal: {0}")]
    Bug(&'static str),
    /// A request field is missing or malformed.
    #[error("{field}: {message}")]
    InvalidField {
        /// The field's path in the request.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The body exceeds the configured limit.
    #[error("body: more than {0} bytes")]
    BodyTooLarge(usize),
    /// The resource does not exist, or the caller may not know it does.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// The resource is in the wrong state for this call.
    #[error("{0}")]
    InvalidState(&'static str),
    /// An optional feature is off (UL5).
    #[error("feature {0} is off")]
    FeatureDisabled(&'static str),
    /// The request id was used for a different request.
    #[error("request_id was used for a different request")]
    RequestIdConflict,
    /// The conversation or the sender is under legal hold.
    #[error("under legal hold")]
    LegalHold,
    /// The server is shutting down; the client resubscribes elsewhere.
    #[error("the server is shutting down")]
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
}

impl Error {
    /// Whether a dependency was unreachable (UNAVAILABLE): the database, the commit thread.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Store(err) => err.is_unavailable(),
            Self::Database(err) => hafen_store::unavailable(err),
            _ => false,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::InvalidField { field, message } => status::invalid_field(&field, message),
            Error::BodyTooLarge(limit) => status::error(
                Code::InvalidArgument,
                "BODY_TOO_LARGE",
                format!("body: at most {limit} bytes"),
                &[("field", "body"), ("max_bytes", &limit.to_string())],
            ),
            Error::NotFound(resource) => status::not_found(resource),
            Error::PermissionDenied(message) => status::permission_denied(message),
            Error::InvalidState(message) => status::invalid_state(message),
            Error::FeatureDisabled(feature) => status::error(
                Code::FailedPrecondition,
                "FEATURE_DISABLED",
                format!("the tenant has not switched on {feature}"),
                &[("feature", feature)],
            ),
            Error::RequestIdConflict => status::request_id_conflict(),
            Error::LegalHold => status::error(
                Code::FailedPrecondition,
                "LEGAL_HOLD_ACTIVE",
                "the conversation or the sender is under legal hold",
                &[],
            ),
            Error::Unavailable(what) => {
                tracing::warn!(dependency = what, "unavailable");
                status::unavailable(format!("{what} is unavailable; retry later"))
            }
            Error::Overloaded => status::overloaded(std::time::Duration::from_secs(1)),
            Error::ShuttingDown => {
                status::unavailable("the server is shutting down; resubscribe with the last cursor")
            }
            Error::Store(ref store) if store.is_unavailable() => status::database_unavailable(&err),
            Error::Database(ref db) if hafen_store::unavailable(db) => {
                status::database_unavailable(&err)
            }
            Error::Store(hafen_store::Error::UnknownTenant | hafen_store::Error::KeyDestroyed) => {
                status::unauthenticated("the session's tenant no longer exists")
            }
            other => status::internal(&other),
        }
    }
}
