//! Who a call comes from, and why a session stopped working.

use std::fmt;

use chrono::{DateTime, Utc};
use hafen_platform::status;
use tonic::{Code, Status};
use uuid::Uuid;

/// A user's role in their tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A member.
    Member,
    /// An administrator.
    Admin,
    /// The tenant's owner.
    Owner,
}

impl Role {
    /// The stored form (`member`, `admin`, `owner`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// Parses the stored form.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }

    /// The API form.
    pub fn to_proto(self) -> hafen_proto::common::v1::Role {
        match self {
            Role::Member => hafen_proto::common::v1::Role::Member,
            Role::Admin => hafen_proto::common::v1::Role::Admin,
            Role::Owner => hafen_proto::common::v1::Role::Owner,
        }
    }

    /// From the API form; `None` for unspecified or unknown values.
    pub fn from_proto(value: i32) -> Option<Self> {
        match hafen_proto::common::v1::Role::try_from(value).ok()? {
            hafen_proto::common::v1::Role::Member => Some(Role::Member),
            hafen_proto::common::v1::Role::Admin => Some(Role::Admin),
            hafen_proto::common::v1::Role::Owner => Some(Role::Owner),
            hafen_proto::common::v1::Role::Unspecified => None,
        }
    }

    /// Admins and the owner.
    pub fn is_admin(self) -> bool {
        matches!(self, Role::Admin | Role::Owner)
    }
}

/// A logged-in user's session, as every service sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The session.
    pub session_id: Uuid,
    /// The session's tenant.
    pub tenant_id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// The user's role.
    pub role: Role,
    /// The chat code the session was opened with (OC5).
    pub chat_code_id: Uuid,
    /// When the access token expires.
    pub expires_at: DateTime<Utc>,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The operator (platform token).
    Operator,
    /// A logged-in user.
    User(Principal),
}

/// Why a session no longer works. The stored form is the `revoke_reason` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevokeReason {
    /// The user logged out.
    Logout,
    /// The chat code was revoked: the device must wipe its data (OC5).
    DeviceWiped,
    /// The user was deactivated (GR6).
    UserDeactivated,
    /// The user changed their password (other sessions end).
    PasswordChanged,
    /// An exchanged refresh token was presented again: the family is revoked.
    RefreshReuse,
    /// The tenant was deleted.
    TenantDeleted,
}

impl RevokeReason {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            RevokeReason::Logout => "logout",
            RevokeReason::DeviceWiped => "device_wiped",
            RevokeReason::UserDeactivated => "user_deactivated",
            RevokeReason::PasswordChanged => "password_changed",
            RevokeReason::RefreshReuse => "refresh_reuse",
            RevokeReason::TenantDeleted => "tenant_deleted",
        }
    }

    /// Parses the stored form.
    pub fn parse(value: &str) -> Option<Self> {
        [
            RevokeReason::Logout,
            RevokeReason::DeviceWiped,
            RevokeReason::UserDeactivated,
            RevokeReason::PasswordChanged,
            RevokeReason::RefreshReuse,
            RevokeReason::TenantDeleted,
        ]
        .into_iter()
        .find(|reason| reason.as_str() == value)
    }
}

impl fmt::Display for RevokeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a presented access token is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not a token Hafen issued (or malformed).
    Unknown,
    /// Expired: refresh it.
    Expired,
    /// Revoked for a reason.
    Revoked(RevokeReason),
}

impl From<Rejection> for Status {
    fn from(rejection: Rejection) -> Status {
        match rejection {
            Rejection::Unknown => status::unauthenticated("unknown or malformed access token"),
            Rejection::Expired => status::error(
                Code::Unauthenticated,
                "SESSION_EXPIRED",
                "access token expired; refresh it",
                &[],
            ),
            Rejection::Revoked(RevokeReason::DeviceWiped) => status::error(
                Code::Unauthenticated,
                "DEVICE_WIPED",
                "this device's chat code was revoked: wipe local data, confirm the wipe, log out",
                &[],
            ),
            Rejection::Revoked(reason) => status::error(
                Code::Unauthenticated,
                "SESSION_REVOKED",
                "the session has ended",
                &[("revoke_reason", reason.as_str())],
            ),
        }
    }
}
