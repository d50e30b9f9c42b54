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
    /// The configuration is unusable, or a dependency it names cannot be used (at start-up
    /// only).
    #[error("configuration: {0}")]
    Config(String),
    /// The control plane lacks migrations this build needs (at start-up).
    #[error("control plane has pending migrations {0:?}: run `hafen-tenant migrate` first")]
    NotMigrated(Vec<String>),
    /// A dependency could not be reached: the database, the commit thread. A retry may
    /// succeed.
    #[error("{0} unavailable")]
    Unavailable(&'static str),
    /// A tenant's sends queue up faster than they are stored: the sender should back off.
    #[error("too many sends queued")]
    Overloaded,
    /// A batch of sends failed for a reason other than the database's availability (a bug;
    /// the cause is logged with the batch).
    #[error("a batch of sends failed")]
    BatchFailed,
    /// A live stream fell out of its feed (the feed ended); the client resubscribes.
    #[error("the stream was closed")]
    StreamClosed,
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
    /// Whether a dependency was unreachable or gave up on the call (UNAVAILABLE): the
    /// database (gone, or a serialization failure, deadlock or timeout a retry may not meet),
    /// the pool, the commit thread.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Store(hafen_store::Error::Query(err)) | Self::Database(err) => {
                hafen_store::unavailable(err) || transient(err)
            }
            Self::Store(err) => err.is_unavailable(),
            _ => false,
        }
    }
}

/// A query PostgreSQL gave up on for now: a serialization failure or deadlock (SQLSTATE class
/// 40), a statement or lock timeout, or a resource it lacks (class 53: connections, memory,
/// disk).
fn transient(err: &diesel::result::Error) -> bool {
    use diesel::result::DatabaseErrorKind::{SerializationFailure, Unknown};
    match err {
        diesel::result::Error::DatabaseError(SerializationFailure, _) => true,
        diesel::result::Error::DatabaseError(Unknown, info) => {
            let message = info.message();
            message.starts_with("deadlock detected")
                || message.starts_with("canceling statement due to")
                || message.starts_with("could not obtain lock")
                || message.starts_with("out of memory")
                || message.starts_with("could not extend file")
                || message.starts_with("sorry, too many clients")
        }
        _ => false,
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
            Error::StreamClosed => {
                status::unavailable("the stream was closed; resubscribe with the last cursor")
            }
            ref unavailable if unavailable.is_unavailable() => status::database_unavailable(&err),
            Error::Store(hafen_store::Error::UnknownTenant | hafen_store::Error::KeyDestroyed) => {
                status::unauthenticated("the session's tenant no longer exists")
            }
            other => status::internal(&other),
        }
    }
}
