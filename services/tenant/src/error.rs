//! The tenant service's errors and their one mapping to gRPC statuses.

use diesel::result::Error as DieselError;
use hafen_platform::status;
use tonic::{Code, Status};

/// Everything that can go wrong in the tenant service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Serving failed (TLS, listener, transport).
    #[error(transparent)]
    Platform(#[from] hafen_platform::Error),

    /// The database failed.
    #[error(transparent)]
    Store(#[from] hafen_store::Error),

    /// Key handling failed.
    #[error(transparent)]
    Crypto(#[from] hafen_crypto::Error),

    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),

    /// The control plane lags behind this build; `hafen-tenant migrate` brings it up to date.
    #[error("control plane has pending migrations {0:?}: run `hafen-tenant migrate` first")]
    NotMigrated(Vec<String>),

    /// A request field is missing or malformed.
    #[error("{field}: {message}")]
    InvalidField {
        /// Path of the field in the request, e.g. `settings.retention_days`.
        field: String,
        /// What is wrong.
        message: String,
    },

    /// The retention period exceeds the hard maximum of 730 days (CB5).
    #[error("settings.retention_days: at most 730 days")]
    RetentionTooLong,

    /// The owner's new password breaks the policy.
    #[error("owner_password: {0}")]
    PasswordRefused(hafen_crypto::password::PolicyViolation),

    /// The slug is taken.
    #[error("slug is taken")]
    SlugTaken,

    /// The request id was used for a different request.
    #[error("request_id was used for a different request")]
    RequestIdConflict,

    /// The owner's password or TOTP code did not confirm the deletion.
    #[error("confirmation failed")]
    ConfirmationFailed,

    /// The owner enrolled TOTP: a current code is required.
    #[error("totp_code required")]
    TotpRequired,

    /// Too many confirmations were tried; wait this long.
    #[error("rate limited")]
    RateLimited(std::time::Duration),

    /// A legal hold is in force somewhere in the tenant: it is not deleted.
    #[error("a legal hold is in force")]
    LegalHold,

    /// No such tenant (or deleted, where only active ones qualify).
    #[error("tenant not found")]
    NotFound,

    /// The caller is not authenticated or not allowed; the status says which.
    #[error("{0}")]
    Denied(Box<Status>),

    /// A database query failed.
    #[error("database: {0}")]
    Database(#[from] DieselError),

    /// A blocking task failed.
    #[error("background task: {0}")]
    Task(#[from] tokio::task::JoinError),

    /// A hashing task failed.
    #[error(transparent)]
    Cpu(#[from] hafen_platform::cpu::TaskFailed),

    /// A deliberate failure injected by a test (see `Tenants::set_fail_point`), naming the
    /// tenant whose provisioning it stopped.
    #[error("injected failure {0} of tenant {1}")]
    Injected(&'static str, hafen_store::TenantId),
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

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Self::Denied(Box::new(status))
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match err {
            Error::InvalidField { field, message } => status::invalid_field(&field, message),
            Error::RetentionTooLong => status::error(
                Code::InvalidArgument,
                "RETENTION_TOO_LONG",
                "settings.retention_days: at most 730 days (CB5)",
                &[("field", "settings.retention_days"), ("max_days", "730")],
            ),
            Error::PasswordRefused(violation) => {
                status::password_refused("owner_password", violation)
            }
            Error::SlugTaken => status::already_exists("slug", "a tenant with this slug exists"),
            Error::RequestIdConflict => status::request_id_conflict(),
            Error::NotFound => status::not_found("tenant"),
            Error::ConfirmationFailed => status::error(
                Code::PermissionDenied,
                "CONFIRMATION_FAILED",
                "confirmation failed",
                &[],
            ),
            Error::TotpRequired => status::error(
                Code::FailedPrecondition,
                "TOTP_REQUIRED",
                "the owner enrolled TOTP: send a current totp_code",
                &[("field", "totp_code")],
            ),
            Error::RateLimited(wait) => status::rate_limited(wait),
            Error::LegalHold => status::error(
                Code::FailedPrecondition,
                "LEGAL_HOLD_ACTIVE",
                "a legal hold is in force in this tenant; lift it before deleting the tenant",
                &[],
            ),
            Error::Denied(status) => *status,
            Error::Database(ref db) if hafen_store::is_unique_violation(db, "tenants_slug_key") => {
                Status::from(Error::SlugTaken)
            }
            Error::Store(ref store) if store.is_unavailable() => status::database_unavailable(&err),
            Error::Database(ref db) if hafen_store::unavailable(db) => {
                status::database_unavailable(&err)
            }
            Error::Cpu(hafen_platform::cpu::TaskFailed::Overloaded) => {
                status::overloaded(std::time::Duration::from_secs(1))
            }
            other => status::internal(&other),
        }
    }
}
