//! The webchat service's errors and their one mapping to gRPC statuses.

use hafen_platform::status;
use tonic::{Code, Status};

/// Everything that can go wrong in the webchat service.
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
    /// Keys or ciphertext failed.
    #[error(transparent)]
    Crypto(#[from] hafen_crypto::Error),
    /// The configuration is unusable (at start-up only).
    #[error("configuration: {0}")]
    Config(String),
    /// The control plane lags behind this build.
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
    /// A visit lifetime beyond the tenant's retention period.
    #[error("visit_lifetime_days: more than the tenant's retention period ({0} days)")]
    LifetimeTooLong(i32),
    /// The resource does not exist, or the caller may not know it does.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// No valid visitor token.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The resource is in the wrong state for this call.
    #[error("{0}")]
    InvalidState(&'static str),
    /// Personal data without consent to the current text.
    #[error("consent to the current consent text is required for personal fields")]
    ConsentRequired,
    /// A legal hold keeps the message as it is.
    #[error("under legal hold")]
    LegalHold,
    /// A visitor's stream reached its age; the visitor resubscribes with its cursor.
    #[error("the stream ended; resubscribe with the last cursor")]
    StreamAged,
    /// No agent can take the chat.
    #[error("no agent is available")]
    AgentUnavailable,
    /// A message body over the limit, in bytes.
    #[error("body: more than {0} bytes")]
    BodyTooLarge(usize),
    /// A limit was passed; the call may be made again after the wait.
    #[error("too many calls; retry later")]
    RateLimited(std::time::Duration),
    /// A dependency (the database, the commit thread) cannot be reached now.
    #[error("{0} is unavailable")]
    Unavailable(&'static str),
    /// A tenant's visitor messages queue up faster than they are stored: back off.
    #[error("too many messages queued")]
    Overloaded,
    /// An invariant broke (a bug).
    #[error("internal: {0}")]
    Bug(&'static str),
}

impl Error {
    /// An [`Error::InvalidField`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            message: message.into(),
        }
    }

    /// Whether the database could not be reached (UNAVAILABLE).
    fn is_unavailable(&self) -> bool {
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
            Error::LifetimeTooLong(days) => status::error(
                Code::InvalidArgument,
                "RETENTION_TOO_LONG",
                format!("visit_lifetime_days: at most the tenant's retention period, {days} days"),
                &[
                    ("field", "visit_lifetime_days"),
                    ("max_days", &days.to_string()),
                ],
            ),
            Error::NotFound(resource) => status::not_found(resource),
            Error::PermissionDenied(message) => status::permission_denied(message),
            Error::Unauthenticated(message) => status::unauthenticated(message),
            Error::InvalidState(message) => status::invalid_state(message),
            Error::RateLimited(wait) => status::rate_limited(wait),
            Error::StreamAged => {
                status::unavailable("the stream ended; resubscribe with the last cursor")
            }
            Error::LegalHold => status::error(
                Code::FailedPrecondition,
                "LEGAL_HOLD_ACTIVE",
                "the chat is under legal hold",
                &[],
            ),
            Error::AgentUnavailable => status::error(
                Code::FailedPrecondition,
                "AGENT_UNAVAILABLE",
                "no agent can take the chat now",
                &[],
            ),
            Error::BodyTooLarge(limit) => status::error(
                Code::InvalidArgument,
                "BODY_TOO_LARGE",
                format!("body: at most {limit} bytes"),
                &[("field", "body"), ("max_bytes", &limit.to_string())],
            ),
            Error::ConsentRequired => status::error(
                Code::FailedPrecondition,
                "CONSENT_REQUIRED",
                "personal fields need consent to the widget's current consent text",
                &[],
            ),
            Error::Unavailable(what) => {
                tracing::warn!(dependency = what, "unavailable");
                status::unavailable(format!("{what} is unavailable; retry later"))
            }
            Error::Overloaded => status::overloaded(std::time::Duration::from_secs(1)),
            ref unavailable if unavailable.is_unavailable() => status::database_unavailable(&err),
            Error::Store(hafen_store::Error::UnknownTenant | hafen_store::Error::KeyDestroyed) => {
                status::not_found("widget")
            }
            other => status::internal(&other),
        }
    }
}
