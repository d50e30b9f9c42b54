//! The SDK's one error type.

use tonic_types::StatusExt;

/// Everything a call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The server refused the call.
    #[error("{message} ({code:?}, {reason})")]
    Rpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The stable reason from `google.rpc.ErrorInfo`, e.g. `LOGIN_FAILED`, `NOT_FOUND`,
        /// `INVALID_FIELD` (or the code's name when the server sent none).
        reason: String,
        /// For bad input: the request field at fault.
        field: Option<String>,
        /// The server's message.
        message: String,
    },
    /// This device was wiped (OC5): every call is refused.
    #[error("this device was wiped; log in again with a new chat code")]
    Wiped,
    /// No session: log in first.
    #[error("not logged in")]
    NotLoggedIn,
    /// The configuration is unusable (URL, CA file).
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// The stable reason of a server refusal.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::Rpc { reason, .. } => Some(reason),
            Error::Wiped => Some("DEVICE_WIPED"),
            _ => None,
        }
    }

    /// The gRPC code of a server refusal.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Rpc { code, .. } => Some(*code),
            Error::Wiped => Some(tonic::Code::Unauthenticated),
            _ => None,
        }
    }

    /// Whether trying again later may succeed (the service is unreachable or busy).
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code(),
            Some(
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
            )
        )
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        let info = status.get_details_error_info();
        let reason = info
            .as_ref()
            .map(|i| i.reason.clone())
            .unwrap_or_else(|| format!("{:?}", status.code()).to_uppercase());
        if reason == "DEVICE_WIPED" {
            return Error::Wiped;
        }
        Error::Rpc {
            code: status.code(),
            reason,
            field: info.and_then(|i| i.metadata.get("field").cloned()),
            message: status.message().to_owned(),
        }
    }
}

/// The reason of a status, if the server sent one.
pub(crate) fn reason_of(status: &tonic::Status) -> Option<String> {
    status.get_details_error_info().map(|i| i.reason)
}
