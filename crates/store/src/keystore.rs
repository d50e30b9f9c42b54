//! The key store (BX1, GR4): every data key, wrapped, and the deletion log (deleted tenants,
//! erased users and visitors, deleted messages), in the schema
//! `hafen_keys` of a database of its own (`--keystore-url`, see [`crate::Databases`]).
//!
//! No backup of tenant data or of the control plane holds a key: a key destroyed here stays
//! destroyed in every such backup, and restoring one cannot roll the deletion log back. The
//! key store has its own, short backup retention.
//!
//! Tenant keys are wrapped by the master key under a version (`key_version`); after the master
//! key was rotated, [`rewrap`] moves them to the current version a batch at a time while the
//! services keep running, and [`versions_in_use`] tells when an old version can be retired.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use hafen_crypto::MasterKey;
use hafen_crypto::keys::tenant_key_context;
use uuid::Uuid;

use crate::AsyncPgConnection;
use crate::schema::{deletion_log, tenant_keys, user_keys};

/// The master-key version and the wrapped key of a tenant, if it still has a key.
pub async fn tenant_key(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
) -> QueryResult<Option<(u32, Vec<u8>)>> {
    let stored: Option<(i32, Vec<u8>)> = tenant_keys::table
        .find(tenant)
        .select((tenant_keys::key_version, tenant_keys::wrapped_key))
        .first(conn)
        .await
        .optional()?;
    Ok(stored.map(|(version, wrapped)| (u32::try_from(version).unwrap_or(0), wrapped)))
}

/// Number of deletion-log entries for a tenant.
pub async fn deletion_log_entries(conn: &mut AsyncPgConnection, tenant: Uuid) -> QueryResult<i64> {
    deletion_log::table
        .filter(deletion_log::tenant_id.eq(tenant))
        .count()
        .get_result(conn)
        .await
}

/// How many tenant keys each master-key version wraps, oldest version first.
pub async fn versions_in_use(conn: &mut AsyncPgConnection) -> QueryResult<Vec<(u32, i64)>> {
    let rows: Vec<(i32, i64)> = tenant_keys::table
        .group_by(tenant_keys::key_version)
        .select((tenant_keys::key_version, diesel::dsl::count_star()))
        .order(tenant_keys::key_version)
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(version, n)| (u32::try_from(version).unwrap_or(0), n))
        .collect())
}

/// Why re-wrapping stopped.
#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    /// The key store failed.
    #[error(transparent)]
    Database(#[from] diesel::result::Error),
    /// A key did not unwrap: its version is not in the master key file, or it was tampered
    /// with.
    #[error("tenant {tenant}: {source}")]
    Key {
        /// Whose key.
        tenant: Uuid,
        /// What failed.
        source: hafen_crypto::Error,
    },
}

/// Re-wraps up to `batch` tenant keys that are not under `master`'s current version, in one
/// transaction; returns how many. Rows another run holds are skipped, so runs may overlap;
/// call it until it returns 0. Services keep reading keys meanwhile: each row is either the
/// old wrapping or the new one, and they unwrap both.
pub async fn rewrap(
    conn: &mut AsyncPgConnection,
    master: &MasterKey,
    batch: i64,
) -> Result<usize, RewrapError> {
    let current = i32::try_from(master.current_version()).unwrap_or(i32::MAX);
    conn.transaction::<_, RewrapError, _>(async move |conn| {
        let rows: Vec<(Uuid, i32, Vec<u8>)> = tenant_keys::table
            .filter(tenant_keys::key_version.ne(current))
            .select((
                tenant_keys::tenant_id,
                tenant_keys::key_version,
                tenant_keys::wrapped_key,
            ))
            .order(tenant_keys::tenant_id)
            .limit(batch)
            .for_update()
            .skip_locked()
            .load(conn)
            .await?;
        let now = crate::now();
        for (tenant, version, wrapped) in &rows {
            let context = tenant_key_context(tenant.as_bytes());
            let version = u32::try_from(*version).unwrap_or(0);
            let key = master
                .unwrap(version, wrapped, &context)
                .map_err(|source| RewrapError::Key {
                    tenant: *tenant,
                    source,
                })?;
            let rewrapped = master
                .wrap(&key, &context)
                .map_err(|source| RewrapError::Key {
                    tenant: *tenant,
                    source,
                })?;
            diesel::update(tenant_keys::table.find(tenant))
                .set((
                    tenant_keys::key_version.eq(current),
                    tenant_keys::wrapped_key.eq(rewrapped),
                    tenant_keys::rewrapped_at.eq(Some(now)),
                ))
                .execute(conn)
                .await?;
        }
        Ok(rows.len())
    })
    .await
}

/// Writes to the key store that take part in provisioning and deletion, which commit them in
/// two phases with the control plane; blocking, on a [`crate::tenancy::SyncConnection`].
pub mod blocking {
    use chrono::{DateTime, Utc};
    use diesel::prelude::*;
    use uuid::Uuid;

    use crate::schema::{deletion_log, tenant_keys, user_keys};
    use crate::tenancy::SyncConnection;

    /// Stores a new tenant's key, wrapped under master-key version `version`.
    pub fn insert_tenant_key(
        conn: &mut SyncConnection,
        tenant: Uuid,
        version: u32,
        wrapped: &[u8],
    ) -> QueryResult<()> {
        diesel::insert_into(tenant_keys::table)
            .values((
                tenant_keys::tenant_id.eq(tenant),
                tenant_keys::key_version.eq(i32::try_from(version).unwrap_or(i32::MAX)),
                tenant_keys::wrapped_key.eq(wrapped),
            ))
            .execute(conn)?;
        Ok(())
    }

    /// Destroys a tenant's key and its users' and visitors' keys, and writes the deletion to
    /// the log (once: a deletion replayed after a restore is in it already).
    pub fn destroy_tenant_keys(
        conn: &mut SyncConnection,
        tenant: Uuid,
        at: DateTime<Utc>,
    ) -> QueryResult<()> {
        diesel::delete(tenant_keys::table.find(tenant)).execute(conn)?;
        diesel::delete(user_keys::table.filter(user_keys::tenant_id.eq(tenant))).execute(conn)?;
        let logged: bool = diesel::select(diesel::dsl::exists(
            deletion_log::table
                .filter(deletion_log::kind.eq("tenant"))
                .filter(deletion_log::tenant_id.eq(tenant)),
        ))
        .get_result(conn)?;
        if !logged {
            diesel::insert_into(deletion_log::table)
                .values((
                    deletion_log::id.eq(Uuid::now_v7()),
                    deletion_log::kind.eq("tenant"),
                    deletion_log::tenant_id.eq(tenant),
                    deletion_log::deleted_at.eq(at),
                ))
                .execute(conn)?;
        }
        Ok(())
    }

    /// Whether the key store still holds a key of `tenant` (a deletion's two phases were
    /// interrupted, say).
    pub fn holds_tenant_keys(conn: &mut SyncConnection, tenant: Uuid) -> QueryResult<bool> {
        diesel::select(diesel::dsl::exists(tenant_keys::table.find(tenant))).get_result(conn)
    }
}

/// Destroys `subjects`' keys (users' or visits' ids) of `tenant` and writes each erasure to
/// the deletion log once, as `kind` (`user` or `visitor`), in one transaction.
pub async fn destroy_user_keys(
    conn: &mut AsyncPgConnection,
    kind: &'static str,
    tenant: Uuid,
    subjects: &[Uuid],
    at: DateTime<Utc>,
) -> QueryResult<()> {
    let subjects = subjects.to_vec();
    conn.transaction::<_, diesel::result::Error, _>(async move |conn| {
        diesel::delete(
            user_keys::table
                .filter(user_keys::tenant_id.eq(tenant))
                .filter(user_keys::user_id.eq_any(&subjects)),
        )
        .execute(conn)
        .await?;
        let logged: Vec<Option<Uuid>> = deletion_log::table
            .filter(deletion_log::kind.eq(kind))
            .filter(deletion_log::tenant_id.eq(tenant))
            .filter(deletion_log::user_id.eq_any(&subjects))
            .select(deletion_log::user_id)
            .load(conn)
            .await?;
        let entries: Vec<_> = subjects
            .iter()
            .filter(|id| !logged.contains(&Some(**id)))
            .map(|id| {
                (
                    deletion_log::id.eq(Uuid::now_v7()),
                    deletion_log::kind.eq(kind),
                    deletion_log::tenant_id.eq(tenant),
                    deletion_log::user_id.eq(Some(*id)),
                    deletion_log::deleted_at.eq(at),
                )
            })
            .collect();
        if !entries.is_empty() {
            diesel::insert_into(deletion_log::table)
                .values(entries)
                .execute(conn)
                .await?;
        }
        Ok(())
    })
    .await
}

/// Writes the deletion of `message` of `tenant` (CB4) to the deletion log, once, so the replay
/// after a restore deletes it again.
pub async fn log_message_deletion(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    message: Uuid,
    at: DateTime<Utc>,
) -> QueryResult<()> {
    use diesel::sql_types::{Timestamptz, Uuid as SqlUuid};
    diesel::sql_query(
        "INSERT INTO hafen_keys.deletion_log (id, kind, tenant_id, message_id, deleted_at) \
         VALUES ($1, 'message', $2, $3, $4) \
         ON CONFLICT (message_id) WHERE kind = 'message' DO NOTHING",
    )
    .bind::<SqlUuid, _>(Uuid::now_v7())
    .bind::<SqlUuid, _>(tenant)
    .bind::<SqlUuid, _>(message)
    .bind::<Timestamptz, _>(at)
    .execute(conn)
    .await?;
    Ok(())
}
