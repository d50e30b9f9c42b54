//! The control plane (schema `hafen`): tenants, their wrapped keys and the deletion log.
//!
//! Reads and settings updates are async, on pooled connections. Writes that belong to
//! provisioning or deletion ([`blocking`]) take a [`crate::tenancy::SyncConnection`]: they share a transaction with the DDL
//! that creates or drops the tenant's schema.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::schema::tenants;
/// Tenant status values as stored.
pub mod status {
    /// Provisioned and usable.
    pub const ACTIVE: &str = "active";
    /// Deleted: schema, role and key are gone; slug and name cleared.
    pub const DELETED: &str = "deleted";
}

/// A tenant row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = tenants)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct TenantRow {
    /// The id.
    pub id: Uuid,
    /// Unique short name; `None` once deleted.
    pub slug: Option<String>,
    /// Name of the organisation; `None` once deleted.
    pub display_name: Option<String>,
    /// [`status::ACTIVE`] or [`status::DELETED`].
    pub status: String,
    /// Hosting region label.
    pub region: String,
    /// Accepted DPA version.
    pub dpa_version: String,
    /// When the DPA was accepted.
    pub dpa_accepted_at: DateTime<Utc>,
    /// Who accepted it (the owner's user id).
    pub dpa_accepted_by: Uuid,
    /// Placement: the database's configured name.
    pub database_name: String,
    /// The CreateTenant request id, if the client sent one.
    pub create_request_id: Option<Uuid>,
    /// Settings, as JSON.
    pub settings: serde_json::Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Deletion time.
    pub deleted_at: Option<DateTime<Utc>>,
    /// The public key (Ed25519) that signs the heads of the tenant's audit chain; set by the
    /// audit service with the chain's first event.
    pub audit_public_key: Option<Vec<u8>>,
}

/// A tenant row to insert.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = tenants)]
pub struct NewTenant<'a> {
    /// The id.
    pub id: Uuid,
    /// Unique short name.
    pub slug: &'a str,
    /// Name of the organisation.
    pub display_name: &'a str,
    /// [`status::ACTIVE`].
    pub status: &'a str,
    /// Hosting region label.
    pub region: &'a str,
    /// Accepted DPA version.
    pub dpa_version: &'a str,
    /// When the DPA was accepted.
    pub dpa_accepted_at: DateTime<Utc>,
    /// The owner's user id.
    pub dpa_accepted_by: Uuid,
    /// Placement.
    pub database_name: &'a str,
    /// The CreateTenant request id.
    pub create_request_id: Option<Uuid>,
    /// Settings, as JSON.
    pub settings: serde_json::Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Same as `created_at`.
    pub updated_at: DateTime<Utc>,
}

/// The tenant with `id`.
pub async fn find(
    conn: &mut diesel_async::AsyncPgConnection,
    id: Uuid,
) -> QueryResult<Option<TenantRow>> {
    tenants::table
        .find(id)
        .select(TenantRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// The active tenant with `slug`.
pub async fn find_by_slug(
    conn: &mut diesel_async::AsyncPgConnection,
    slug: &str,
) -> QueryResult<Option<TenantRow>> {
    tenants::table
        .filter(tenants::slug.eq(slug))
        .select(TenantRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// The tenant created by the CreateTenant call with `request_id`.
pub async fn find_by_request_id(
    conn: &mut diesel_async::AsyncPgConnection,
    request_id: Uuid,
) -> QueryResult<Option<TenantRow>> {
    tenants::table
        .filter(tenants::create_request_id.eq(request_id))
        .select(TenantRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// Up to `limit` tenants after the keyset position `after` (creation time, id), oldest first.
pub async fn list(
    conn: &mut diesel_async::AsyncPgConnection,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
    include_deleted: bool,
) -> QueryResult<Vec<TenantRow>> {
    let mut query = tenants::table
        .select(TenantRow::as_select())
        .order((tenants::created_at.asc(), tenants::id.asc()))
        .limit(limit)
        .into_boxed();
    if let Some((created_at, id)) = after {
        query = query.filter(
            tenants::created_at
                .gt(created_at)
                .or(tenants::created_at.eq(created_at).and(tenants::id.gt(id))),
        );
    }
    if !include_deleted {
        query = query.filter(tenants::status.eq(status::ACTIVE));
    }
    query.load(conn).await
}

/// Every active tenant with its placement, oldest first (for migrations across tenants).
pub async fn active_placements(
    conn: &mut diesel_async::AsyncPgConnection,
) -> QueryResult<Vec<(Uuid, String)>> {
    tenants::table
        .filter(tenants::status.eq(status::ACTIVE))
        .order((tenants::created_at.asc(), tenants::id.asc()))
        .select((tenants::id, tenants::database_name))
        .load(conn)
        .await
}

/// Replaces an active tenant's settings; returns the updated row, `None` if no such tenant.
pub async fn update_settings(
    conn: &mut diesel_async::AsyncPgConnection,
    id: Uuid,
    settings: serde_json::Value,
) -> QueryResult<Option<TenantRow>> {
    diesel::update(
        tenants::table
            .find(id)
            .filter(tenants::status.eq(status::ACTIVE)),
    )
    .set((
        tenants::settings.eq(settings),
        tenants::updated_at.eq(Utc::now()),
    ))
    .returning(TenantRow::as_returning())
    .get_result(conn)
    .await
    .optional()
}

/// Writes that share a transaction with the DDL of provisioning and deletion; blocking, on a
/// [`crate::tenancy::SyncConnection`].
pub mod blocking {
    use chrono::{DateTime, Utc};
    use diesel::prelude::*;
    use uuid::Uuid;

    use super::{NewTenant, TenantRow, status};
    use crate::schema::{sessions, tenants, widget_routes};
    use crate::tenancy::SyncConnection;

    /// Inserts a tenant row (provisioning, inside its transaction; its key goes to the key
    /// store, [`crate::keystore::blocking::insert_tenant_key`]).
    pub fn insert_tenant(conn: &mut SyncConnection, tenant: &NewTenant<'_>) -> QueryResult<()> {
        diesel::insert_into(tenants::table)
            .values(tenant)
            .execute(conn)?;
        Ok(())
    }

    /// Marks a tenant deleted: clears its slug, name and settings, and deletes its sessions and
    /// its widgets' routes (deletion, inside its transaction; its keys and the deletion-log
    /// entry are in the key store, [`crate::keystore::blocking::destroy_tenant_keys`]).
    /// Returns the deletion time and the ids of the deleted sessions.
    pub fn mark_deleted(
        conn: &mut SyncConnection,
        id: Uuid,
    ) -> QueryResult<(DateTime<Utc>, Vec<Uuid>)> {
        let now = crate::now();
        diesel::delete(widget_routes::table.filter(widget_routes::tenant_id.eq(id)))
            .execute(conn)?;
        let ended: Vec<Uuid> = diesel::delete(sessions::table.filter(sessions::tenant_id.eq(id)))
            .returning(sessions::id)
            .get_results(conn)?;
        diesel::update(tenants::table.find(id))
            .set((
                tenants::status.eq(status::DELETED),
                tenants::slug.eq(None::<String>),
                tenants::display_name.eq(None::<String>),
                tenants::settings.eq(serde_json::json!({})),
                tenants::create_request_id.eq(None::<Uuid>),
                tenants::updated_at.eq(now),
                tenants::deleted_at.eq(now),
            ))
            .execute(conn)?;
        Ok((now, ended))
    }

    /// Locks an active tenant's row for the rest of the transaction (deletion).
    pub fn lock_active(conn: &mut SyncConnection, id: Uuid) -> QueryResult<Option<TenantRow>> {
        tenants::table
            .find(id)
            .filter(tenants::status.eq(status::ACTIVE))
            .select(TenantRow::as_select())
            .for_update()
            .first(conn)
            .optional()
    }

    /// The status of the tenant row `id`, if there is one (recovery of prepared key changes).
    pub fn status(conn: &mut SyncConnection, id: Uuid) -> QueryResult<Option<String>> {
        tenants::table
            .find(id)
            .select(tenants::status)
            .first(conn)
            .optional()
    }

    /// Whether a tenant row with `id` exists (recovery of prepared provisioning).
    pub fn exists(conn: &mut SyncConnection, id: Uuid) -> QueryResult<bool> {
        diesel::select(diesel::dsl::exists(tenants::table.find(id))).get_result(conn)
    }
}
