//! Accounts and chat codes inside a tenant's schema (OC1, OC2): the validated names they
//! carry and the queries that write them. Call these only inside a tenant scope.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use crate::schema::{chat_codes, users};
use crate::tenancy::SyncConnection;

/// Why a name is refused; the caller names the request field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(pub &'static str);

/// A login name: 3-64 characters from A-Z, a-z, 0-9, `.`, `_`, `-`; unique per tenant
/// ignoring case, kept as first typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    /// Parses a login name.
    pub fn parse(value: &str) -> Result<Self, NameError> {
        let ok_len = (3..=64).contains(&value.len());
        let ok_chars = value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok_len && ok_chars {
            Ok(Self(value.to_owned()))
        } else {
            Err(NameError(
                "must be 3-64 characters of letters, digits, '.', '_' and '-'",
            ))
        }
    }

    /// The name as typed.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A name shown to people (a user's or an organisation's): 1-100 characters, no control
/// characters, not only whitespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    /// Parses a display name; surrounding whitespace is trimmed.
    pub fn parse(value: &str) -> Result<Self, NameError> {
        parse_label(value, 100).map(Self)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A device label for a chat code: 1-64 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLabel(String);

impl DeviceLabel {
    /// Parses a device label; surrounding whitespace is trimmed.
    pub fn parse(value: &str) -> Result<Self, NameError> {
        parse_label(value, 64).map(Self)
    }

    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn parse_label(value: &str, max_chars: usize) -> Result<String, NameError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(NameError("must not be empty"));
    }
    if trimmed.chars().count() > max_chars {
        return Err(if max_chars == 100 {
            NameError("must be at most 100 characters")
        } else {
            NameError("must be at most 64 characters")
        });
    }
    if trimmed.chars().any(char::is_control) {
        return Err(NameError("must not contain control characters"));
    }
    Ok(trimmed.to_owned())
}

/// Roles as stored.
pub mod role {
    /// The tenant's owner (exactly one).
    pub const OWNER: &str = "owner";
    /// An administrator.
    pub const ADMIN: &str = "admin";
    /// A member.
    pub const MEMBER: &str = "member";
}

/// A user to insert.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = users)]
pub struct NewUser<'a> {
    /// The id (UUID v7).
    pub id: Uuid,
    /// Login name.
    pub username: &'a str,
    /// Display name.
    pub display_name: &'a str,
    /// bcrypt or argon2id hash.
    pub password_hash: &'a str,
    /// One of [`role`].
    pub role: &'a str,
    /// `active`.
    pub status: &'a str,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Same as `created_at`.
    pub updated_at: DateTime<Utc>,
}

/// A chat code to insert (its keyed hash only).
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = chat_codes)]
pub struct NewChatCode<'a> {
    /// The id (UUID v7).
    pub id: Uuid,
    /// Whose device.
    pub user_id: Uuid,
    /// Which device.
    pub device_label: &'a str,
    /// HMAC of the code.
    pub code_hash: &'a [u8],
    /// `active`.
    pub state: &'a str,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Inserts a user and a chat code for it (provisioning the owner, inside the tenant scope).
pub fn insert_user_with_code(
    conn: &mut SyncConnection,
    user: &NewUser<'_>,
    code: &NewChatCode<'_>,
) -> QueryResult<()> {
    use diesel::RunQueryDsl as _;
    diesel::insert_into(users::table)
        .values(user)
        .execute(conn)?;
    diesel::insert_into(chat_codes::table)
        .values(code)
        .execute(conn)?;
    Ok(())
}

/// Records that a TOTP code of time step `step` confirmed an action of `user`, inside the
/// caller's tenant scope; false when a code of this step or a later one was used already
/// (a replay), which the caller refuses.
pub async fn use_totp_step(
    conn: &mut crate::AsyncPgConnection,
    user: uuid::Uuid,
    step: u64,
) -> diesel::QueryResult<bool> {
    use diesel::{BoolExpressionMethods, ExpressionMethods, QueryDsl};

    use crate::schema::users;
    let step = i64::try_from(step).unwrap_or(i64::MAX);
    let update = diesel::update(
        users::table.find(user).filter(
            users::totp_last_step
                .is_null()
                .or(users::totp_last_step.lt(step)),
        ),
    )
    .set(users::totp_last_step.eq(step));
    let updated = diesel_async::RunQueryDsl::execute(update, conn).await?;
    Ok(updated == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_parsed_at_the_edge() {
        assert!(Username::parse("sales.desk_1-x").is_ok());
        assert!(Username::parse("an").is_err());
        assert!(Username::parse(&"a".repeat(65)).is_err());
        assert!(Username::parse("sales desk").is_err());
        assert!(Username::parse("sälës").is_err());
        assert_eq!(DisplayName::parse("  Sales  ").unwrap().as_str(), "Sales");
        assert!(DisplayName::parse("   ").is_err());
        assert!(DisplayName::parse(&"x".repeat(101)).is_err());
        assert!(DisplayName::parse("a\u{7}b").is_err());
        assert!(DeviceLabel::parse(&"x".repeat(65)).is_err());
    }
}
