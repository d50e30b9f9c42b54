//! The event log: the counter that numbers it, `events`, and reading it after a cursor.

use diesel::sql_types::{BigInt, Nullable, Uuid as SqlUuid};
use hafen_store::TenantId;
use hafen_store::prepared::{INDEX_PROBES_ONLY, Prepared, Statement, bind};
use hafen_store::schema::event_counter;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_store::AsyncPgConnection;
use uuid::Uuid;

use crate::error::Error;
use crate::rows::{EventRow, Membership, MessageRow};

/// Takes the next event id; the counter row stays locked until the transaction ends.
pub async fn next_event_id(conn: &mut AsyncPgConnection) -> Result<i64, Error> {
    Ok(hafen_store::log::next_event_id(conn).await?)
}

/// The tenant's newest event id.
pub async fn head(conn: &mut AsyncPgConnection) -> Result<i64, Error> {
    Ok(event_counter::table
        .select(event_counter::last_id)
        .first(conn)
        .await?)
}

/// Writes event `id` of `kind` for `conversation`.
pub async fn insert_event(
    conn: &mut AsyncPgConnection,
    id: i64,
    conversation: Uuid,
    kind: &str,
    message: Option<Uuid>,
    detail: Option<&Membership>,
    at: DateTime<Utc>,
) -> Result<(), Error> {
    let detail = detail.and_then(|d| serde_json::to_value(d).ok());
    Ok(hafen_store::log::insert_event(conn, id, conversation, kind, message, detail, at).await?)
}

/// Appends an event of `kind` for `conversation` at `at`; returns its id.
pub async fn append_event(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    kind: &str,
    message: Option<Uuid>,
    detail: Option<&Membership>,
    at: DateTime<Utc>,
) -> Result<i64, Error> {
    let id = next_event_id(conn).await?;
    insert_event(conn, id, conversation, kind, message, detail, at).await?;
    Ok(id)
}

/// The log after `after`, with the messages its events name (see `feed_log.sql`).
const FEED_EVENTS: &str = concat!("SELECT e.* FROM (", include_str!("feed_log.sql"), ") e");
const FEED_MESSAGES: &str = concat!(
    "SELECT m.* FROM (",
    include_str!("feed_log.sql"),
    ") e CROSS JOIN LATERAL (SELECT * FROM messages m WHERE m.id = e.message_id LIMIT 1) m"
);

/// Up to `limit` events after `after` (of `member`'s conversations, or all) and the messages
/// they name, in one round trip on `conn` (see [`hafen_store::tenancy::pipelined`]): one
/// snapshot for both reads, statements prepared once per connection, every lookup an index
/// probe.
pub async fn events_after(
    conn: &AsyncPgConnection,
    tenant: Uuid,
    after: i64,
    member: Option<Uuid>,
    limit: i64,
) -> Result<(Vec<EventRow>, Vec<MessageRow>), Error> {
    let binds = || {
        (
            bind::<BigInt, _>(after),
            bind::<Nullable<SqlUuid>, _>(member),
            bind::<BigInt, _>(limit),
        )
    };
    let statements = async {
        let (planned, events, rows) = futures::join!(
            Prepared::text(INDEX_PROBES_ONLY).execute(&mut &*conn),
            Statement::new(FEED_EVENTS, binds()).load::<EventRow>(&mut &*conn),
            Statement::new(FEED_MESSAGES, binds()).load::<MessageRow>(&mut &*conn),
        );
        planned
            .and(events)
            .and_then(|events| rows.map(|rows| (events, rows)))
    };
    Ok(hafen_store::tenancy::pipelined(
        conn,
        &["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"],
        &TenantId::from(tenant),
        statements,
    )
    .await?)
}
