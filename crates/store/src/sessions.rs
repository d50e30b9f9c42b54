//! Sessions in the control plane (OC2, OC5): the truth behind every access token. Only
//! digests of token secrets are stored.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::schema::sessions;

/// How many exchanged refresh tokens a session remembers, to recognise their reuse.
const USED_REFRESH_KEPT: i32 = 32;

/// A session row.
#[derive(Debug, Clone, Queryable, Selectable, QueryableByName)]
#[diesel(table_name = sessions)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct SessionRow {
    /// The id (the first part of its tokens).
    pub id: Uuid,
    /// The tenant.
    pub tenant_id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// The chat code it was opened with.
    pub chat_code_id: Uuid,
    /// The user's role when last updated.
    pub role: String,
    /// The device's label.
    pub device_label: String,
    /// SHA-256 of the current access token's secret.
    pub access_digest: Vec<u8>,
    /// When the access token expires.
    pub access_expires_at: DateTime<Utc>,
    /// SHA-256 of the current refresh token's secret.
    pub refresh_digest: Vec<u8>,
    /// When the refresh token expires.
    pub refresh_expires_at: DateTime<Utc>,
    /// Digests of refresh tokens already exchanged.
    pub used_refresh_digests: Vec<Vec<u8>>,
    /// Opening time.
    pub created_at: DateTime<Utc>,
    /// Last refresh.
    pub refreshed_at: Option<DateTime<Utc>>,
    /// When it ended, if it did.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Why it ended.
    pub revoke_reason: Option<String>,
}

/// A session to insert.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = sessions)]
pub struct NewSession<'a> {
    /// The id.
    pub id: Uuid,
    /// The tenant.
    pub tenant_id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// The chat code.
    pub chat_code_id: Uuid,
    /// The role.
    pub role: &'a str,
    /// The device's label.
    pub device_label: &'a str,
    /// Access token digest.
    pub access_digest: &'a [u8],
    /// Access token expiry.
    pub access_expires_at: DateTime<Utc>,
    /// Refresh token digest.
    pub refresh_digest: &'a [u8],
    /// Refresh token expiry.
    pub refresh_expires_at: DateTime<Utc>,
    /// Opening time.
    pub created_at: DateTime<Utc>,
}

/// Inserts a session.
pub async fn insert(conn: &mut AsyncPgConnection, session: &NewSession<'_>) -> QueryResult<()> {
    diesel::insert_into(sessions::table)
        .values(session)
        .execute(conn)
        .await
        .map(drop)
}

/// The session with `id`.
pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<SessionRow>> {
    sessions::table
        .find(id)
        .select(SessionRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// New tokens of a rotation.
#[derive(Debug, Clone, Copy)]
pub struct Rotation<'a> {
    /// The presented refresh token's digest (must be the current one).
    pub presented: &'a [u8],
    /// New access token digest.
    pub access_digest: &'a [u8],
    /// New access token expiry.
    pub access_expires_at: DateTime<Utc>,
    /// New refresh token digest.
    pub refresh_digest: &'a [u8],
    /// New refresh token expiry.
    pub refresh_expires_at: DateTime<Utc>,
}

/// Rotates a live session's tokens if `rotation.presented` is its current, unexpired refresh
/// token — atomically, so two exchanges of one token cannot both succeed. Returns the
/// updated session, or `None` when nothing matched (then [`find`] tells why).
pub async fn rotate(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    rotation: Rotation<'_>,
) -> QueryResult<Option<SessionRow>> {
    use diesel::sql_types::{Bytea, Integer, Timestamptz, Uuid as SqlUuid};
    diesel::sql_query(
        "UPDATE hafen.sessions SET \
           used_refresh_digests = (array_append(used_refresh_digests, refresh_digest))\
             [greatest(1, cardinality(used_refresh_digests) + 2 - $7):], \
           access_digest = $3, access_expires_at = $4, \
           refresh_digest = $5, refresh_expires_at = $6, refreshed_at = now() \
         WHERE id = $1 AND refresh_digest = $2 AND revoked_at IS NULL \
           AND refresh_expires_at > now() \
         RETURNING *",
    )
    .bind::<SqlUuid, _>(id)
    .bind::<Bytea, _>(rotation.presented)
    .bind::<Bytea, _>(rotation.access_digest)
    .bind::<Timestamptz, _>(rotation.access_expires_at)
    .bind::<Bytea, _>(rotation.refresh_digest)
    .bind::<Timestamptz, _>(rotation.refresh_expires_at)
    .bind::<Integer, _>(USED_REFRESH_KEPT)
    .get_result(conn)
    .await
    .optional()
}

/// Ends one session for `reason`; returns whether it was live.
pub async fn revoke(conn: &mut AsyncPgConnection, id: Uuid, reason: &str) -> QueryResult<bool> {
    let updated = diesel::update(
        sessions::table
            .find(id)
            .filter(sessions::revoked_at.is_null()),
    )
    .set((
        sessions::revoked_at.eq(Utc::now()),
        sessions::revoke_reason.eq(reason),
    ))
    .execute(conn)
    .await?;
    Ok(updated == 1)
}

/// Of `ids`, the sessions that have ended: `(id, Some(reason))` for a revoked one, and
/// `(id, None)` for one whose row is gone (deleted with its tenant, or by the deletion
/// replay). Live sessions are not listed.
pub async fn ended_among(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
) -> QueryResult<Vec<(Uuid, Option<String>)>> {
    let rows: Vec<(Uuid, Option<String>, Option<DateTime<Utc>>)> = sessions::table
        .filter(sessions::id.eq_any(ids))
        .select((sessions::id, sessions::revoke_reason, sessions::revoked_at))
        .load(conn)
        .await?;
    let mut ended: Vec<(Uuid, Option<String>)> = rows
        .iter()
        .filter(|(_, _, revoked_at)| revoked_at.is_some())
        .map(|(id, reason, _)| (*id, Some(reason.clone().unwrap_or_default())))
        .collect();
    let found: std::collections::HashSet<Uuid> = rows.iter().map(|(id, _, _)| *id).collect();
    ended.extend(
        ids.iter()
            .filter(|id| !found.contains(*id))
            .map(|id| (*id, None)),
    );
    Ok(ended)
}

/// Which live sessions of a tenant to end.
#[derive(Debug, Clone, Copy)]
pub enum Scope {
    /// Those opened with this chat code (remote wipe).
    ChatCode(Uuid),
    /// Those of this user, except `keep` (e.g. the session changing the password).
    User {
        /// The user.
        user: Uuid,
        /// A session to leave alone.
        keep: Option<Uuid>,
    },
}

/// Ends every live session of `tenant` in `scope` for `reason`; returns their ids.
pub async fn revoke_all(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    scope: Scope,
    reason: &str,
) -> QueryResult<Vec<Uuid>> {
    let mut update = diesel::update(sessions::table)
        .filter(sessions::tenant_id.eq(tenant))
        .filter(sessions::revoked_at.is_null())
        .into_boxed();
    update = match scope {
        Scope::ChatCode(code) => update.filter(sessions::chat_code_id.eq(code)),
        Scope::User { user, keep } => update
            .filter(sessions::user_id.eq(user))
            .filter(sessions::id.ne(keep.unwrap_or_else(Uuid::nil))),
    };
    update
        .set((
            sessions::revoked_at.eq(Utc::now()),
            sessions::revoke_reason.eq(reason),
        ))
        .returning(sessions::id)
        .get_results(conn)
        .await
}

/// Deletes every session of `user` in `tenant`, ended ones included, with their device labels
/// (erasure: end them with [`revoke_all`] and announce that first); returns how many.
pub async fn delete_user(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    user: Uuid,
) -> QueryResult<usize> {
    diesel::delete(
        sessions::table
            .filter(sessions::tenant_id.eq(tenant))
            .filter(sessions::user_id.eq(user)),
    )
    .execute(conn)
    .await
}

/// Sets the role of a user's live sessions; returns their ids (whose caches must go).
pub async fn set_role(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    user: Uuid,
    role: &str,
) -> QueryResult<Vec<Uuid>> {
    diesel::update(
        sessions::table
            .filter(sessions::tenant_id.eq(tenant))
            .filter(sessions::user_id.eq(user))
            .filter(sessions::revoked_at.is_null()),
    )
    .set(sessions::role.eq(role))
    .returning(sessions::id)
    .get_results(conn)
    .await
}
