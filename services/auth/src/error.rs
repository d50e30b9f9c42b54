//! The auth service's errors and their one mapping to gRPC statuses.

use std::time::Duration;

use diesel::result::Error as DieselError;
use hafen_authn::Rejection;
use hafen_platform::status;
use tonic::{Code, Status};

/// Everything that can go wrong in the auth service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Serving failed.
    #[error(transparent)]
    Platform(#[from] hafen_platform::Error),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] hafen_store::Error),
    /// Key handling or hashing failed.
    #[error(transparent)]
    Crypto(#[from] hafen_crypto::Error),
    /// A query failed.
    #[error("database: {0}")]
    Database(#[from] DieselError),
    /// A blocking task failed.
    #[error("background task: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A hashing task failed.
    #[error(transparent)]
    Cpu(#[from] hafen_platform::cpu::TaskFailed),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),

    /// A request field is missing or malformed.
    #[error("{field}: {message}")]
    InvalidField {
        /// The field's path in the request.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A new password breaks the policy (too long for bcrypt, too short, too common).
    #[error("{field}: {violation}")]
    PasswordRefused {
        /// The field.
        field: &'static str,
        /// Which rule.
        violation: hafen_crypto::password::PolicyViolation,
    },
    /// Login failed; never says which factor.
    #[error("login failed")]
    LoginFailed,
    /// Too many failures: back off.
    #[error("too many attempts; retry in {0:?}")]
    RateLimited(Duration),
    /// The resource does not exist (or the caller may not know it does).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// A unique value is taken.
    #[error("{0} is taken")]
    AlreadyExists(&'static str),
    /// The request id was used for a different request.
    #[error("request_id was used for a different request")]
    RequestIdConflict,
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// The resource is in the wrong state for this call.
    #[error("{0}")]
    InvalidState(&'static str),
    /// The owner cannot be deactivated or demoted.
    #[error("the owner account is protected")]
    OwnerProtected,
    /// A legal hold stops an erasure.
    #[error("a legal hold is active")]
    LegalHold,
    /// A re-authentication (password, TOTP code) failed.
    #[error("confirmation failed")]
    ConfirmationFailed,
    /// A refresh token was presented a second time: the session is revoked.
    #[error("refresh token reused")]
    RefreshReused,
    /// The token does not authenticate.
    #[error("rejected token")]
    Rejected(Rejection),
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

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::InvalidField { field, message } => status::invalid_field(&field, message),
            Error::PasswordRefused { field, violation } => {
                status::password_refused(field, violation)
            }
            Error::LoginFailed => status::error(
                Code::Unauthenticated,
                "LOGIN_FAILED",
                "login failed: check tenant, username, password and chat code",
                &[],
            ),
            Error::RateLimited(wait) => status::rate_limited(wait),
            Error::NotFound(resource) => status::not_found(resource),
            Error::AlreadyExists(field) => {
                status::already_exists(field, format!("{field} is already taken"))
            }
            Error::RequestIdConflict => status::request_id_conflict(),
            Error::PermissionDenied(message) => status::permission_denied(message),
            Error::InvalidState(message) => status::invalid_state(message),
            Error::OwnerProtected => status::error(
                Code::FailedPrecondition,
                "OWNER_PROTECTED",
                "the owner cannot be deactivated, erased or change role",
                &[],
            ),
            Error::LegalHold => status::error(
                Code::FailedPrecondition,
                "LEGAL_HOLD_ACTIVE",
                "a legal hold covers this user or a conversation with their messages; \
                 nothing was erased",
                &[],
            ),
            Error::ConfirmationFailed => status::error(
                Code::PermissionDenied,
                "CONFIRMATION_FAILED",
                "confirmation failed",
                &[],
            ),
            Error::RefreshReused => status::error(
                Code::Unauthenticated,
                "REFRESH_TOKEN_REUSED",
                "this refresh token was already used; the session has been ended",
                &[],
            ),
            Error::Rejected(rejection) => rejection.into(),
            Error::Store(ref store) if store.is_unavailable() => status::database_unavailable(&err),
            Error::Database(ref db) if hafen_store::unavailable(db) => {
                status::database_unavailable(&err)
            }
            Error::Store(hafen_store::Error::UnknownTenant) => {
                status::unauthenticated("the session's tenant no longer exists")
            }
            Error::Cpu(hafen_platform::cpu::TaskFailed::Overloaded) => {
                status::overloaded(std::time::Duration::from_secs(1))
            }
            other => status::internal(&other),
        }
    }
}
