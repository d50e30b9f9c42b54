//! Erasure of a user (GDPR Art. 17, BX1, GR4): what AuthService.EraseUser does, and what the
//! deletion-log replay does again after a restore brought an erased user's rows back.
//!
//! In this order, each step leaving nothing the next must undo:
//!
//! 1. [`destroy_key`], in the key store: the user's data key is deleted and the erasure
//!    written to the deletion log, in one transaction. From then on nothing sealed under the
//!    key (their messages, here and in every backup) can be read, and [`crate::keyring`]
//!    never makes them a new key: the erasure is in effect.
//! 2. [`end_memberships`] and [`erase_account`] ([`erase_account_rows`]): their memberships
//!    end (a `membership_changed` event each), their chat codes are deleted, and their account
//!    is pseudonymised: username freed, display name replaced, password and second factor
//!    deleted, status `erased`. Rows stay because conversations and messages refer to them by
//!    id; nothing personal stays in them.
//! 3. [`erase_messages`] / [`erase_messages_paced`], in the tenant's schema, in batches: their
//!    messages become tombstones (ciphertext gone, `erased`; each live one a `message_deleted`
//!    event, so streams show it gone). Until then their ciphertext is unreadable already;
//!    readers show such a message as erased.
//!
//! Each is idempotent, so an erasure that stopped midway is completed by running it again.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::AsyncPgConnection;
use crate::schema::{chat_codes, members, users};

/// The display name of every erased user.
pub const ERASED_DISPLAY_NAME: &str = "Erased user";

/// The username an erased user's row keeps: their id behind a character no chosen username
/// has, so the name they had is free and no one can ever take this one.
pub fn erased_username(user: Uuid) -> String {
    format!("erased:{user}")
}

/// What an erasure changed in the tenant's schema.
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

/// Who a destroyed key belonged to, as the deletion log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// An erased user.
    User,
    /// A website visitor who deleted their data (their key is kept under the visit's id).
    Visitor,
}

impl Subject {
    /// The deletion log's `kind` for this subject.
    pub fn kind(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Visitor => "visitor",
        }
    }
}

/// Destroys the data key `user` (a user's or a visit's id) of `tenant` and writes the erasure
/// to the deletion log (once), in one transaction on the key store (`conn`, a connection from
/// [`crate::Databases::keystore`]).
pub async fn destroy_key(
    conn: &mut AsyncPgConnection,
    subject: Subject,
    tenant: Uuid,
    user: Uuid,
    at: DateTime<Utc>,
) -> Result<(), diesel::result::Error> {
    crate::keystore::destroy_user_keys(conn, subject.kind(), tenant, &[user], at).await
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

/// Whether the tenant's schema holds anything of `user` that is not erased yet: an
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

/// Messages made tombstones per transaction: each batch holds the tenant's event counter
/// only while it numbers its events, so sends of the tenant wait milliseconds, not the
/// whole erasure.
pub const MESSAGE_BATCH: usize = 200;

/// Makes the messages `ids` that a restore brought back (deleted before, by their sender or an
/// admin, and in the deletion log) tombstones again, with a `message_deleted` event for each
/// that was live, in the caller's tenant scope and transaction; returns how many. With
/// `dry_run`, only counts.
pub async fn delete_messages_again(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    at: DateTime<Utc>,
    dry_run: bool,
) -> Result<u64, crate::Error> {
    if dry_run {
        use crate::schema::messages;
        let found: i64 = messages::table
            .filter(messages::id.eq_any(ids))
            .filter(
                messages::ciphertext
                    .is_not_null()
                    .or(messages::deleted_at.is_null()),
            )
            .count()
            .get_result(conn)
            .await?;
        return Ok(u64::try_from(found).unwrap_or(0));
    }
    tombstone_batch(conn, ids, at, false).await
}

/// Messages made tombstones per transaction by [`erase_messages_paced`]: small, so a send that
/// waits for one (they share the event counter) waits briefly.
pub const PACED_BATCH: usize = 25;

/// The ids of `user`'s messages that are not tombstones yet, in the caller's tenant scope.
pub async fn pending_messages(
    conn: &mut AsyncPgConnection,
    user: Uuid,
) -> Result<Vec<Uuid>, diesel::result::Error> {
    use crate::schema::messages;
    messages::table
        .filter(messages::sender_id.eq(user))
        .filter(messages::erased.eq(false))
        .select(messages::id)
        .load(conn)
        .await
}

/// Makes the messages `ids` tombstones as [`erase_messages`] does, [`PACED_BATCH`] at a time,
/// resting `rest` times as long as each batch took before the next: the erasure of a prolific
/// user then takes a bounded share of the database, and live sends keep their latency. Returns
/// how many became tombstones.
pub async fn erase_messages_paced(
    pool: &crate::Pool,
    tenant: &crate::TenantId,
    ids: &[Uuid],
    at: DateTime<Utc>,
    rest: f64,
) -> Result<u64, crate::Error> {
    let mut erased = 0;
    for batch in ids.chunks(PACED_BATCH) {
        let started = std::time::Instant::now();
        let batch = batch.to_vec();
        erased += crate::with_tenant(pool, tenant, move |conn| {
            Box::pin(async move { tombstone_batch(conn, &batch, at, true).await })
        })
        .await?;
        tokio::time::sleep(started.elapsed().mul_f64(rest)).await;
    }
    Ok(erased)
}

/// Makes every message of `user` that is not erased yet a tombstone (body gone, `erased`),
/// with a `message_deleted` event for each that was not deleted before, in transactions of
/// [`MESSAGE_BATCH`] messages on connections of `pool` scoped to `tenant`. Returns how many.
/// The messages are found in one pass, then changed by their ids.
pub async fn erase_messages(
    pool: &crate::Pool,
    tenant: &crate::TenantId,
    user: Uuid,
    at: DateTime<Utc>,
) -> Result<u64, crate::Error> {
    let ids: Vec<Uuid> = crate::with_tenant(pool, tenant, move |conn| {
        Box::pin(async move { Ok::<_, crate::Error>(pending_messages(conn, user).await?) })
    })
    .await?;
    let mut erased = 0;
    for batch in ids.chunks(MESSAGE_BATCH) {
        let batch = batch.to_vec();
        erased += crate::with_tenant(pool, tenant, move |conn| {
            Box::pin(async move { tombstone_batch(conn, &batch, at, true).await })
        })
        .await?;
    }
    Ok(erased)
}

/// One batch of [`erase_messages`] (`erased`) or of [`delete_messages_again`], in the caller's
/// transaction: the messages first, then (taking the event counter) their events.
async fn tombstone_batch(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    at: DateTime<Utc>,
    erased: bool,
) -> Result<u64, crate::Error> {
    #[derive(QueryableByName)]
    struct Gone {
        #[diesel(sql_type = SqlUuid)]
        id: Uuid,
        #[diesel(sql_type = SqlUuid)]
        conversation_id: Uuid,
        #[diesel(sql_type = diesel::sql_types::Bool)]
        live: bool,
    }
    // Erasing: every message not erased yet. Deleting again (after a restore): every message
    // not a tombstone.
    let gone: Vec<Gone> = diesel::sql_query(
        "UPDATE messages m \
         SET ciphertext = NULL, deleted_at = coalesce(m.deleted_at, $2), erased = m.erased OR $3 \
         FROM (SELECT id, deleted_at IS NULL AS live FROM messages \
               WHERE id = ANY($1) \
                 AND CASE WHEN $3 THEN NOT erased \
                          ELSE ciphertext IS NOT NULL OR deleted_at IS NULL END \
               ORDER BY id FOR UPDATE) t \
         WHERE m.id = t.id \
         RETURNING m.id, m.conversation_id, t.live",
    )
    .bind::<diesel::sql_types::Array<SqlUuid>, _>(ids)
    .bind::<Timestamptz, _>(at)
    .bind::<diesel::sql_types::Bool, _>(erased)
    .load(conn)
    .await?;
    let live: Vec<&Gone> = gone.iter().filter(|g| g.live).collect();
    if !live.is_empty() {
        let count = i64::try_from(live.len()).unwrap_or(i64::MAX);
        let base: i64 = diesel::update(crate::schema::event_counter::table)
            .set(
                crate::schema::event_counter::last_id
                    .eq(crate::schema::event_counter::last_id + count),
            )
            .returning(crate::schema::event_counter::last_id - count)
            .get_result(conn)
            .await?;
        let event_ids: Vec<i64> = (1..=count).map(|i| base + i).collect();
        let conversations: Vec<Uuid> = live.iter().map(|g| g.conversation_id).collect();
        let messages: Vec<Uuid> = live.iter().map(|g| g.id).collect();
        diesel::sql_query(
            "INSERT INTO events (id, conversation_id, kind, message_id, created_at) \
             SELECT e.id, e.conversation_id, 'message_deleted', e.message_id, $4 \
             FROM unnest($1, $2, $3) AS e(id, conversation_id, message_id)",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(&event_ids)
        .bind::<diesel::sql_types::Array<SqlUuid>, _>(&conversations)
        .bind::<diesel::sql_types::Array<SqlUuid>, _>(&messages)
        .bind::<Timestamptz, _>(at)
        .execute(conn)
        .await?;
    }
    Ok(u64::try_from(gone.len()).unwrap_or(0))
}

/// Ends every membership of `user`, each a `membership_changed` event the conversation's
/// other members see, in the caller's transaction on a connection scoped to the tenant.
/// Afterwards no message of theirs can be stored any more (a send needs a membership).
/// Returns how many.
pub async fn end_memberships(
    conn: &mut AsyncPgConnection,
    user: Uuid,
    at: DateTime<Utc>,
) -> Result<u64, diesel::result::Error> {
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
    Ok(u64::try_from(left.len()).unwrap_or(0))
}

/// The last step, once the user's memberships ended ([`end_memberships`]) and their messages
/// are tombstones ([`erase_messages`]): their chat codes are deleted and the account is
/// pseudonymised, in the caller's transaction on a connection scoped to the tenant. Returns
/// how many chat codes went and whether the account was pseudonymised now (false: it was
/// already).
pub async fn erase_account(
    conn: &mut AsyncPgConnection,
    user: Uuid,
    at: DateTime<Utc>,
) -> Result<(u64, bool), diesel::result::Error> {
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

    Ok((u64::try_from(codes).unwrap_or(0), account == 1))
}

/// Step 2 of an erasure (see the module comment) on `tenant`'s schema in `pool`: memberships,
/// then the account with its chat codes; `last` runs in the account's transaction with what
/// was erased (`messages` is what the caller passes: the messages still to become tombstones).
pub async fn erase_account_rows<F>(
    pool: &crate::Pool,
    tenant: &crate::TenantId,
    user: Uuid,
    at: DateTime<Utc>,
    messages: u64,
    last: F,
) -> Result<ErasedRows, crate::Error>
where
    F: for<'c> FnOnce(
            &'c mut AsyncPgConnection,
            ErasedRows,
        ) -> futures::future::BoxFuture<'c, Result<(), crate::Error>>
        + Send
        + 'static,
{
    let memberships = crate::with_tenant(pool, tenant, move |conn| {
        Box::pin(async move { Ok::<_, crate::Error>(end_memberships(conn, user, at).await?) })
    })
    .await?;
    crate::with_tenant(pool, tenant, move |conn| {
        Box::pin(async move {
            let (chat_codes, account) = erase_account(conn, user, at).await?;
            let erased = ErasedRows {
                messages,
                memberships,
                chat_codes,
                account,
            };
            last(conn, erased).await?;
            Ok(erased)
        })
    })
    .await
}

/// Steps 2 and 3 of an erasure (see the module comment) on `tenant`'s schema in `pool`, at
/// once: messages, memberships, account. `last` runs in the final transaction with what was
/// erased.
pub async fn erase_rows<F>(
    pool: &crate::Pool,
    tenant: &crate::TenantId,
    user: Uuid,
    at: DateTime<Utc>,
    last: F,
) -> Result<ErasedRows, crate::Error>
where
    F: for<'c> FnOnce(
            &'c mut AsyncPgConnection,
            ErasedRows,
        ) -> futures::future::BoxFuture<'c, Result<(), crate::Error>>
        + Send
        + 'static,
{
    let messages = erase_messages(pool, tenant, user, at).await?;
    erase_account_rows(pool, tenant, user, at, messages, last).await
}
