//! The website chat's part of a purge (CB5): visits past their lifetime go, with their fields,
//! their messages' bodies (tombstones stay) and their visitor's key (destroyed first, so whatever was sealed under it is unreadable
//! even where a row survives); consent answers go once they are older than the tenant's
//! retention period.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_store::schema::{consent_records, messages, user_keys, visit_fields, visits};
use hafen_store::{Databases, TenantId};
use uuid::Uuid;

use crate::error::Error;

/// Visits handled per transaction.
const BATCH: i64 = 500;

/// What the website chat's part of a run deleted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Purged {
    pub visits: i64,
    pub consent_records: i64,
}

/// Deletes `tenant`'s visits that expired before `now`, and its consent answers decided
/// before `cutoff`.
pub async fn purge(
    databases: &Databases,
    tenant: Uuid,
    now: DateTime<Utc>,
    cutoff: DateTime<Utc>,
) -> Result<Purged, Error> {
    let tenant_id = TenantId::from(tenant);
    let pool = databases.tenant_pool(&tenant_id).await?;
    let mut purged = Purged::default();
    loop {
        let expired: Vec<Uuid> = hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
            Box::pin(async move {
                Ok::<_, Error>(
                    visits::table
                        .filter(visits::expires_at.lt(now))
                        .order(visits::expires_at.asc())
                        .select(visits::id)
                        .limit(BATCH)
                        .load(conn)
                        .await?,
                )
            })
        })
        .await?;
        if expired.is_empty() {
            break;
        }
        {
            let mut conn = databases.main_connection().await?;
            diesel::delete(
                user_keys::table
                    .filter(user_keys::tenant_id.eq(tenant))
                    .filter(user_keys::user_id.eq_any(&expired)),
            )
            .execute(&mut conn)
            .await?;
        }
        let ids = expired.clone();
        let deleted = hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
            Box::pin(async move {
                diesel::delete(visit_fields::table.filter(visit_fields::visit_id.eq_any(&ids)))
                    .execute(conn)
                    .await?;
                // Their messages can no longer be read (the key is gone): tombstones.
                diesel::update(
                    messages::table
                        .filter(messages::sender_id.eq_any(&ids))
                        .filter(messages::deleted_at.is_null()),
                )
                .set((
                    messages::ciphertext.eq(None::<Vec<u8>>),
                    messages::deleted_at.eq(Some(now)),
                ))
                .execute(conn)
                .await?;
                // Only visits still expired: one resumed meanwhile stays (its key is gone,
                // so what it held is unreadable; it starts again empty).
                Ok::<_, Error>(
                    diesel::delete(
                        visits::table
                            .filter(visits::id.eq_any(&ids))
                            .filter(visits::expires_at.lt(now)),
                    )
                    .execute(conn)
                    .await?,
                )
            })
        })
        .await?;
        purged.visits += i64::try_from(deleted).unwrap_or(i64::MAX);
        if i64::try_from(expired.len()).unwrap_or(i64::MAX) < BATCH {
            break;
        }
    }
    purged.consent_records = hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
        Box::pin(async move {
            let deleted = diesel::delete(
                consent_records::table.filter(consent_records::decided_at.lt(cutoff)),
            )
            .execute(conn)
            .await?;
            Ok::<_, Error>(i64::try_from(deleted).unwrap_or(i64::MAX))
        })
    })
    .await?;
    Ok(purged)
}
