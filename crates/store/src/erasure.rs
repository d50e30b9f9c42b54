//! Erasure of a user (GDPR Art. 17, BX1, GR4): what AuthService.EraseUser does, and what the
//! deletion-log replay does again after a restore brought an erased user's rows back.
//!
//! Two parts, in this order, each leaving nothing the next must undo:
//!
//! 1. [`destroy_key`], in the control plane: the user's data key is deleted and the erasure
//!    written to the deletion log, in one transaction. From then on nothing sealed under the
//!    key (their messages, here and in every backup) can be read, and [`crate::keyring`]
//!    never makes them a new key.
//! 2. [`erase_rows`], in the tenant's schema: their messages become tombstones (body gone,
//!    `erased`; each live one a `message_deleted` event, so streams show it gone), their
//!    memberships end (a `membership_changed` event each), their chat codes are deleted, and
//!    their account is pseudonymised: username freed, display name replaced, password and
//!    second factor deleted, status `erased`. Rows stay because conversations and messages
//!    refer to them by id; nothing personal stays in them.
//!
//! Both are idempotent, so an erasure that stopped midway is completed by running it again.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, RunQueryDsl};
use uuid::Uuid;

use crate::AsyncPgConnection;
use crate::schema::{chat_codes, deletion_log, members, user_keys, users};

/// The display name of every erased user.
pub const ERASED_DISPLAY_NAME: &str = "Erased user";

/// The username an erased user's row keeps: their id behind a character no chosen username
/// has, so the name they had is free and no one can ever take this one.
pub fn erased_username(user: Uuid) -> String {
    format!("erased:{user}")
}

/// What [`erase_rows`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErasedRows {
    /// Messages made tombstones now (live ones and earlier tombstones of the user).
    pub messages: u64,
    /// Conversations the user left.
    pub memberships: u64,
    /// Chat codes deleted.
    pub chat_codes: u64,
    /// Whether the account row was pseudonymised now (false: it was already).
    pub account: bool,
}

impl ErasedRows {
    /// Whether anything was left to erase.
    pub fn any(&self) -> bool {
        self.messages > 0 || self.memberships > 0 || self.chat_codes > 0 || self.account
    }
}

/// Destroys the data key of `user` of `tenant` and writes the erasure to the deletion log
/// (once), in one transaction on the control plane.
pub async fn destroy_key(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    user: Uuid,
    at: DateTime<Utc>,
) -> Result<(), diesel::result::Error> {
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        diesel::delete(user_keys::table.find((tenant, user)))
            .execute(conn)
            .await?;
        let logged: bool = diesel::select(diesel::dsl::exists(
            deletion_log::table
                .filter(deletion_log::kind.eq("user"))
                .filter(deletion_log::tenant_id.eq(tenant))
                .filter(deletion_log::user_id.eq(user)),
        ))
        .get_result(conn)
        .await?;
        if !logged {
            diesel::insert_into(deletion_log::table)
                .values((
                    deletion_log::id.eq(Uuid::now_v7()),
                    deletion_log::kind.eq("user"),
                    deletion_log::tenant_id.eq(tenant),
                    deletion_log::user_id.eq(user),
                    deletion_log::deleted_at.eq(at),
                ))
                .execute(conn)
                .await?;
        }
        Ok(())
    })
    .await
}

/// Whether a legal hold that is not lifted covers `user`: one on the user, or one on a
/// conversation holding a message of theirs that is not erased yet. Takes the holds' table
/// in share mode, so no hold is set between this check and the erasure's commit.
pub async fn held(conn: &mut AsyncPgConnection, user: Uuid) -> Result<bool, diesel::result::Error> {
    #[derive(QueryableByName)]
    struct Held {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        held: bool,
    }
    diesel::sql_query("LOCK TABLE legal_holds IN SHARE MODE")
        .execute(conn)
        .await?;
    let found: Held = diesel::sql_query(
        "SELECT EXISTS (SELECT FROM legal_holds h WHERE h.lifted_at IS NULL AND ( \
             h.user_id = $1 OR EXISTS ( \
                 SELECT FROM messages m \
                 WHERE m.conversation_id = h.conversation_id AND m.sender_id = $1 \
                   AND NOT m.erased))) AS held",
    )
    .bind::<SqlUuid, _>(user)
    .get_result(conn)
    .await?;
    Ok(found.held)
}

/// Whether the tenant's schema holds anything of `user` that [`erase_rows`] would erase: an
/// account not pseudonymised, a message not erased, a membership or a chat code (after a
/// restore of a backup taken before the erasure).
pub async fn remains(
    conn: &mut AsyncPgConnection,
    user: Uuid,
) -> Result<bool, diesel::result::Error> {
    #[derive(QueryableByName)]
    struct Remains {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        remains: bool,
    }
    let found: Remains = diesel::sql_query(
        "SELECT EXISTS (SELECT FROM users WHERE id = $1 AND status <> 'erased') \
             OR EXISTS (SELECT FROM messages WHERE sender_id = $1 AND NOT erased) \
             OR EXISTS (SELECT FROM members WHERE user_id = $1) \
             OR EXISTS (SELECT FROM chat_codes WHERE user_id = $1) AS remains",
    )
    .bind::<SqlUuid, _>(user)
    .get_result(conn)
    .await?;
    Ok(found.remains)
}

/// Erases what the tenant's schema holds of `user` (see the module comment), in the caller's
/// transaction on a connection scoped to the tenant. Takes the user's messages before the
/// event counter, the order in which edits and deletions take them.
pub async fn erase_rows(
    conn: &mut AsyncPgConnection,
    user: Uuid,
    at: DateTime<Utc>,
) -> Result<ErasedRows, diesel::result::Error> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let count = |n: i64| u64::try_from(n).unwrap_or(0);

    // The messages, and one `message_deleted` event for each that was not a tombstone yet,
    // numbered in one step from the counter (PostgreSQL runs every data-modifying part of
    // the statement, read or not).
    let messages: Count = diesel::sql_query(
        "WITH target AS ( \
             SELECT id, conversation_id, deleted_at IS NULL AS live FROM messages \
             WHERE sender_id = $1 AND NOT erased ORDER BY id FOR UPDATE), \
         erased AS ( \
             UPDATE messages m \
             SET ciphertext = NULL, deleted_at = coalesce(m.deleted_at, $2), erased = true \
             FROM target t WHERE m.id = t.id RETURNING m.id), \
         live AS ( \
             SELECT t.id, t.conversation_id, row_number() OVER (ORDER BY t.id) AS rank \
             FROM target t WHERE t.live), \
         counted AS ( \
             UPDATE event_counter SET last_id = last_id + (SELECT count(*) FROM live) \
             WHERE EXISTS (SELECT FROM live) \
             RETURNING last_id - (SELECT count(*) FROM live) AS base), \
         logged AS ( \
             INSERT INTO events (id, conversation_id, kind, message_id, created_at) \
             SELECT counted.base + l.rank, l.conversation_id, 'message_deleted', l.id, $2 \
             FROM live l, counted) \
         SELECT count(*) AS n FROM erased",
    )
    .bind::<SqlUuid, _>(user)
    .bind::<Timestamptz, _>(at)
    .get_result(conn)
    .await?;

    // Memberships end, each seen by the conversation's other members.
    let left: Vec<Uuid> = diesel::delete(members::table.filter(members::user_id.eq(user)))
        .returning(members::conversation_id)
        .get_results(conn)
        .await?;
    for conversation in &left {
        let detail = serde_json::json!({ "added": [], "removed": [user], "actor": null });
        crate::log::append_event(
            conn,
            *conversation,
            "membership_changed",
            None,
            Some(detail),
            at,
        )
        .await?;
    }

    let codes = diesel::delete(chat_codes::table.filter(chat_codes::user_id.eq(user)))
        .execute(conn)
        .await?;

    let account = diesel::update(users::table.find(user).filter(users::status.ne("erased")))
        .set((
            users::username.eq(erased_username(user)),
            users::display_name.eq(ERASED_DISPLAY_NAME),
            // No hash at all: nothing verifies against it.
            users::password_hash.eq(""),
            users::totp_secret.eq(None::<Vec<u8>>),
            users::totp_pending.eq(None::<Vec<u8>>),
            users::totp_enabled_at.eq(None::<DateTime<Utc>>),
            users::totp_last_step.eq(None::<i64>),
            users::create_request_id.eq(None::<Uuid>),
            users::status.eq("erased"),
            users::updated_at.eq(at),
        ))
        .execute(conn)
        .await?;

    Ok(ErasedRows {
        messages: count(messages.n),
        memberships: u64::try_from(left.len()).unwrap_or(0),
        chat_codes: u64::try_from(codes).unwrap_or(0),
        account: account == 1,
    })
}
