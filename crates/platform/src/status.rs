//! gRPC statuses with `google.rpc.ErrorInfo` details (domain `hafen`), the building blocks of
//! every crate's `impl From<Error> for Status`.
//!
//! Reasons are the names of `hafen.common.v1.ErrorReason` values. Messages are for people;
//! clients branch on the reason. No message ever carries SQL, secrets or message content.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `ErrorInfo.domain` of every Hafen error.
pub const DOMAIN: &str = "hafen";

/// The longest message a status carries; longer ones are cut (a message never echoes input
/// beyond a short excerpt, and must fit a client's header limits).
const MAX_MESSAGE_BYTES: usize = 256;

/// At most the first 32 characters of `input`, marked when cut: what an error message may
/// quote of something a client sent.
pub fn excerpt(input: &str) -> String {
    let mut chars = input.chars();
    let head: String = chars
        .by_ref()
        .take(32)
        .filter(|c| !c.is_control())
        .collect();
    if chars.next().is_some() {
        format!("{head}…")
    } else {
        head
    }
}

fn bounded(message: String) -> String {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// A status with `code`, a message, and an `ErrorInfo` with `reason` and `metadata`.
pub fn error(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: &[(&str, &str)],
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Status::with_error_details(
        code,
        bounded(message.into()),
        ErrorDetails::with_error_info(reason, DOMAIN, metadata),
    )
}

/// INVALID_ARGUMENT with reason `INVALID_FIELD`, naming `field` in the `ErrorInfo` metadata
/// and in a `BadRequest` field violation.
pub fn invalid_field(field: &str, description: impl Into<String>) -> Status {
    let description = bounded(description.into());
    let mut details = ErrorDetails::with_error_info(
        "INVALID_FIELD",
        DOMAIN,
        HashMap::from([("field".to_owned(), field.to_owned())]),
    );
    details.add_bad_request_violation(field, description.clone());
    Status::with_error_details(
        Code::InvalidArgument,
        bounded(format!("{field}: {description}")),
        details,
    )
}

/// INVALID_ARGUMENT with `reason` (e.g. `MALFORMED_REQUEST`) and `metadata`.
pub fn invalid_argument_reason(
    reason: &str,
    message: impl Into<String>,
    metadata: &[(&str, &str)],
) -> Status {
    error(Code::InvalidArgument, reason, message, metadata)
}

/// RESOURCE_EXHAUSTED with reason `RATE_LIMITED`: too many attempts; retry after `wait`
/// (metadata `retry_after_seconds`, at least 1).
pub fn rate_limited(wait: std::time::Duration) -> Status {
    let seconds = wait.as_secs().max(1).to_string();
    error(
        Code::ResourceExhausted,
        "RATE_LIMITED",
        format!("too many attempts; retry in {seconds} s"),
        &[("retry_after_seconds", &seconds)],
    )
}

/// RESOURCE_EXHAUSTED with reason `OVERLOADED`: the service turns work away for now; retry
/// after `wait` (a `google.rpc.RetryInfo` detail, and metadata `retry_after_ms`).
pub fn overloaded(wait: std::time::Duration) -> Status {
    let millis = wait.as_millis().to_string();
    let mut details = ErrorDetails::with_error_info(
        "OVERLOADED",
        DOMAIN,
        HashMap::from([("retry_after_ms".to_owned(), millis)]),
    );
    details.set_retry_info(Some(wait));
    Status::with_error_details(
        Code::ResourceExhausted,
        "the service is overloaded; retry shortly",
        details,
    )
}

/// INVALID_ARGUMENT for a new password in `field` that breaks the policy: PASSWORD_TOO_LONG
/// with metadata `max_bytes`, or PASSWORD_TOO_WEAK with `rule` (`min_length`, with
/// `min_length`, or `common_password`).
pub fn password_refused(field: &str, violation: hafen_crypto::password::PolicyViolation) -> Status {
    use hafen_crypto::password::{MAX_PASSWORD_BYTES, PolicyViolation};
    match violation {
        PolicyViolation::TooLong => error(
            Code::InvalidArgument,
            "PASSWORD_TOO_LONG",
            format!("{field}: at most {MAX_PASSWORD_BYTES} bytes"),
            &[
                ("field", field),
                ("max_bytes", &MAX_PASSWORD_BYTES.to_string()),
            ],
        ),
        PolicyViolation::TooShort(min) => error(
            Code::InvalidArgument,
            "PASSWORD_TOO_WEAK",
            format!("{field}: at least {min} characters"),
            &[
                ("field", field),
                ("rule", "min_length"),
                ("min_length", &min.to_string()),
            ],
        ),
        PolicyViolation::TooCommon => error(
            Code::InvalidArgument,
            "PASSWORD_TOO_WEAK",
            format!("{field}: one of the most common passwords"),
            &[("field", field), ("rule", "common_password")],
        ),
    }
}

/// Parses a required UUID field; INVALID_FIELD naming `field` when empty or malformed.
pub fn parse_uuid(field: &str, value: &str) -> Result<uuid::Uuid, Status> {
    if value.is_empty() {
        return Err(invalid_field(field, "required"));
    }
    uuid::Uuid::try_parse(value).map_err(|_| invalid_field(field, "must be a UUID"))
}

/// FAILED_PRECONDITION with reason `INVALID_STATE`: the resource is in the wrong state.
pub fn invalid_state(message: impl Into<String>) -> Status {
    error(Code::FailedPrecondition, "INVALID_STATE", message, &[])
}

/// ALREADY_EXISTS with reason `REQUEST_ID_CONFLICT`: a request id reused for another request.
pub fn request_id_conflict() -> Status {
    error(
        Code::AlreadyExists,
        "REQUEST_ID_CONFLICT",
        "request_id was already used for a different request",
        &[("field", "request_id")],
    )
}

/// NOT_FOUND with reason `NOT_FOUND` and the resource type.
pub fn not_found(resource_type: &str) -> Status {
    error(
        Code::NotFound,
        "NOT_FOUND",
        format!("{resource_type} not found"),
        &[("resource_type", resource_type)],
    )
}

/// ALREADY_EXISTS with reason `ALREADY_EXISTS`, naming the field whose value is taken.
pub fn already_exists(field: &str, message: impl Into<String>) -> Status {
    error(
        Code::AlreadyExists,
        "ALREADY_EXISTS",
        message,
        &[("field", field)],
    )
}

/// UNAUTHENTICATED with reason `UNAUTHENTICATED`.
pub fn unauthenticated(message: impl Into<String>) -> Status {
    error(Code::Unauthenticated, "UNAUTHENTICATED", message, &[])
}

/// PERMISSION_DENIED with reason `PERMISSION_DENIED`.
pub fn permission_denied(message: impl Into<String>) -> Status {
    error(Code::PermissionDenied, "PERMISSION_DENIED", message, &[])
}

/// UNAVAILABLE with reason `UNAVAILABLE`: a dependency is down; the client may retry.
pub fn unavailable(message: impl Into<String>) -> Status {
    error(Code::Unavailable, "UNAVAILABLE", message, &[])
}

/// UNAVAILABLE for a database that cannot be reached or went away; the cause is logged here.
pub fn database_unavailable(cause: &dyn std::error::Error) -> Status {
    tracing::warn!(error = %cause, "database unavailable");
    unavailable("database unavailable; retry later")
}

/// INTERNAL with reason `INTERNAL`. The cause is logged here, with its error chain, and never
/// sent to the client.
pub fn internal(cause: &dyn std::error::Error) -> Status {
    tracing::error!(error = %cause, "internal error");
    error(Code::Internal, "INTERNAL", "internal error", &[])
}

/// The `ErrorInfo` reason of a status, if it has one (for clients and tests).
pub fn reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// The `ErrorInfo` metadata value `key` of a status, if present.
pub fn metadata(status: &Status, key: &str) -> Option<String> {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get(key).cloned())
}
