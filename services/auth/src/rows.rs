//! Rows of a tenant's `users` and `chat_codes` tables as the auth service reads them, and
//! their API forms.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use hafen_authn::Role;
use hafen_proto::auth::v1 as pb;
use hafen_store::schema::{chat_codes, users};
use uuid::Uuid;

/// A user row. Holds the password hash and the sealed TOTP secret: never logged, never sent.
#[derive(Clone, Queryable, Selectable)]
#[diesel(table_name = users)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct UserRow {
    pub id: Uuid,
    pub username: String,
    pub display_name: String,
    pub password_hash: String,
    pub role: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub deactivated_at: Option<DateTime<Utc>>,
    pub totp_secret: Option<Vec<u8>>,
    pub totp_pending: Option<Vec<u8>>,
    pub totp_enabled_at: Option<DateTime<Utc>>,
    pub create_request_id: Option<Uuid>,
}

/// User states as stored.
pub mod state {
    /// Can log in.
    pub const ACTIVE: &str = "active";
    /// Deactivated by hand (GR6).
    pub const DEACTIVATED: &str = "deactivated";
    /// Erased.
    pub const ERASED: &str = "erased";
}

impl UserRow {
    /// The role; members when the stored value is unknown (never more rights than stored).
    pub fn role(&self) -> Role {
        Role::parse(&self.role).unwrap_or(Role::Member)
    }

    /// Whether the user may log in.
    pub fn is_active(&self) -> bool {
        self.status == state::ACTIVE
    }

    /// The API form (without the hash, of course).
    pub fn to_proto(&self) -> pb::User {
        pb::User {
            user_id: self.id.to_string(),
            username: self.username.clone(),
            display_name: self.display_name.clone(),
            role: self.role().to_proto() as i32,
            state: match self.status.as_str() {
                state::ACTIVE => pb::UserState::Active,
                state::DEACTIVATED => pb::UserState::Deactivated,
                _ => pb::UserState::Erased,
            } as i32,
            totp_enrolled: self.totp_enabled_at.is_some(),
            create_time: Some(timestamp(self.created_at)),
            update_time: Some(timestamp(self.updated_at)),
            deactivate_time: self.deactivated_at.map(timestamp),
            // Kept in the control plane: see Auth::users_proto.
            erasure_due_time: None,
        }
    }
}

/// A chat-code row (the code itself is never stored).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = chat_codes)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct CodeRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub device_label: String,
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub wipe_confirmed_at: Option<DateTime<Utc>>,
    pub issued_by: Option<Uuid>,
}

/// Chat-code states as stored.
pub mod code_state {
    /// Can log in.
    pub const ACTIVE: &str = "active";
    /// Revoked: its sessions ended with DEVICE_WIPED.
    pub const REVOKED: &str = "revoked";
    /// Revoked, and the device confirmed the wipe.
    pub const WIPED: &str = "wiped";
}

impl CodeRow {
    /// The API form.
    pub fn to_proto(&self) -> pb::ChatCode {
        pb::ChatCode {
            chat_code_id: self.id.to_string(),
            user_id: self.user_id.to_string(),
            device_label: self.device_label.clone(),
            state: match self.state.as_str() {
                code_state::ACTIVE => pb::ChatCodeState::Active,
                code_state::REVOKED => pb::ChatCodeState::Revoked,
                _ => pb::ChatCodeState::Wiped,
            } as i32,
            create_time: Some(timestamp(self.created_at)),
            last_use_time: self.last_used_at.map(timestamp),
            revoke_time: self.revoked_at.map(timestamp),
            wipe_confirm_time: self.wipe_confirmed_at.map(timestamp),
            issued_by_user_id: self.issued_by.map(|id| id.to_string()).unwrap_or_default(),
        }
    }
}

pub use hafen_platform::timestamp;
pub use hafen_store::now;
