//! The website chat's part of a purge (CB5): visits past their lifetime go (unless a legal
//! hold keeps their chat), with their fields, their messages' bodies (tombstones stay) and
//! their visitor's key, written to the deletion log (destroyed first, so whatever was sealed under it is unreadable
//! even where a row survives); consent answers go once they are older than the tenant's
//! retention period.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_store::schema::{consent_records, legal_holds, messages, visit_fields, visits};
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

/// Deletes `tenant`'s visits that expired before `now`, and the consent answers decided
/// before `cutoff` of visits that are gone.
pub async fn purge(
    databases: &Databases,
    tenant: Uuid,
    now: DateTime<Utc>,
    cutoff: DateTime<Utc>,
) -> Result<Purged, Error> {
    let tenant_id = TenantId::from(tenant);
    let pool = databases.tenant_pool(&tenant_id).await?;
    let mut purged = Purged::default();
    // Keyset over (expiry, id), so held visits, which stay, are passed only once.
    let mut after: Option<(DateTime<Utc>, Uuid)> = None;
    loop {
        let (page, held) = hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
            Box::pin(async move {
                let mut query = visits::table
                    .filter(visits::expires_at.lt(now))
                    .order((visits::expires_at.asc(), visits::id.asc()))
                    .select((visits::id, visits::expires_at, visits::conversation_id))
                    .limit(BATCH)
                    .into_boxed();
                if let Some((at, id)) = after {
                    query = query.filter(
                        visits::expires_at
                            .gt(at)
                            .or(visits::expires_at.eq(at).and(visits::id.gt(id))),
                    );
                }
                let page: Vec<(Uuid, DateTime<Utc>, Option<Uuid>)> = query.load(conn).await?;
                // A legal hold on a visit's chat keeps the visit (its key, its messages).
                let chats: Vec<Uuid> = page.iter().filter_map(|(_, _, chat)| *chat).collect();
                let held: Vec<Option<Uuid>> = legal_holds::table
                    .filter(legal_holds::lifted_at.is_null())
                    .filter(legal_holds::conversation_id.eq_any(&chats))
                    .select(legal_holds::conversation_id)
                    .load(conn)
                    .await?;
                Ok::<_, Error>((page, held.into_iter().flatten().collect::<Vec<Uuid>>()))
            })
        })
        .await?;
        let Some(&(last_id, last_at, _)) = page.last() else {
            break;
        };
        after = Some((last_at, last_id));
        let expired: Vec<Uuid> = page
            .iter()
            .filter(|(_, _, chat)| chat.is_none_or(|chat| !held.contains(&chat)))
            .map(|(id, _, _)| *id)
            .collect();
        if !expired.is_empty() {
            purged.visits += purge_visits(databases, &pool, tenant, expired, now).await?;
        }
        if i64::try_from(page.len()).unwrap_or(i64::MAX) < BATCH {
            break;
        }
    }
    purged.consent_records = hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
        Box::pin(async move {
            // Only answers of visits that are gone: a visit that holds fields keeps the
            // proof that consent was given for them.
            let deleted = diesel::delete(
                consent_records::table
                    .filter(consent_records::decided_at.lt(cutoff))
                    .filter(diesel::dsl::not(diesel::dsl::exists(
                        visits::table.filter(visits::id.eq(consent_records::visit_id)),
                    ))),
            )
            .execute(conn)
            .await?;
            Ok::<_, Error>(i64::try_from(deleted).unwrap_or(i64::MAX))
        })
    })
    .await?;
    Ok(purged)
}

/// Destroys the keys of `expired` visits (each in the deletion log, as a visitor who deleted
/// their data), then deletes their rows; returns how many visits went.
async fn purge_visits(
    databases: &Databases,
    pool: &hafen_store::Pool,
    tenant: Uuid,
    expired: Vec<Uuid>,
    now: DateTime<Utc>,
) -> Result<i64, Error> {
    {
        let mut conn = databases.keystore_connection().await?;
        hafen_store::keystore::destroy_user_keys(
            &mut conn,
            hafen_store::erasure::Subject::Visitor.kind(),
            tenant,
            &expired,
            now,
        )
        .await?;
    }
    let tenant_id = TenantId::from(tenant);
    let deleted = hafen_store::with_tenant(pool, &tenant_id, move |conn| {
        Box::pin(async move {
            // The visits first, then (with the tombstones' events) the event counter: the
            // order in which the webchat service takes them.
            let _: Vec<Uuid> = visits::table
                .filter(visits::id.eq_any(&expired))
                .order(visits::id)
                .select(visits::id)
                .for_update()
                .load(conn)
                .await?;
            diesel::delete(visit_fields::table.filter(visit_fields::visit_id.eq_any(&expired)))
                .execute(conn)
                .await?;
            // Their messages can no longer be read (the key is gone): tombstones, each a
            // deletion in the log, so the agents' streams show them gone.
            let gone: Vec<(Uuid, Uuid)> = diesel::update(
                messages::table
                    .filter(messages::sender_id.eq_any(&expired))
                    .filter(messages::deleted_at.is_null()),
            )
            .set((
                messages::ciphertext.eq(None::<Vec<u8>>),
                messages::deleted_at.eq(Some(now)),
            ))
            .returning((messages::id, messages::conversation_id))
            .get_results(conn)
            .await?;
            for (message, conversation) in gone {
                hafen_store::log::append_event(
                    conn,
                    conversation,
                    "message_deleted",
                    Some(message),
                    None,
                    now,
                )
                .await?;
            }
            Ok::<_, Error>(
                diesel::delete(visits::table.filter(visits::id.eq_any(&expired)))
                    .execute(conn)
                    .await?,
            )
        })
    })
    .await?;
    Ok(i64::try_from(deleted).unwrap_or(i64::MAX))
}
