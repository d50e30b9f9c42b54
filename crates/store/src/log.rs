//! The tenant's event log (`events`, numbered by `event_counter`): what clients' streams
//! replay and follow. Every service that changes a conversation appends here, in the
//! change's transaction.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use uuid::Uuid;

use crate::AsyncPgConnection;
use crate::schema::{event_counter, events};

/// Takes the next event id; the counter row stays locked until the transaction ends, so ids
/// follow commit order.
pub async fn next_event_id(conn: &mut AsyncPgConnection) -> Result<i64, diesel::result::Error> {
    diesel::update(event_counter::table)
        .set(event_counter::last_id.eq(event_counter::last_id + 1))
        .returning(event_counter::last_id)
        .get_result(conn)
        .await
}

/// Writes event `id` of `kind` (`message_created`, `message_edited`, `message_deleted`,
/// `membership_changed`) for `conversation`.
pub async fn insert_event(
    conn: &mut AsyncPgConnection,
    id: i64,
    conversation: Uuid,
    kind: &str,
    message: Option<Uuid>,
    detail: Option<serde_json::Value>,
    at: DateTime<Utc>,
) -> Result<(), diesel::result::Error> {
    diesel::insert_into(events::table)
        .values((
            events::id.eq(id),
            events::conversation_id.eq(conversation),
            events::kind.eq(kind),
            events::message_id.eq(message),
            events::detail.eq(detail),
            events::created_at.eq(at),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// Appends an event of `kind` for `conversation` at `at`; returns its id.
pub async fn append_event(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    kind: &str,
    message: Option<Uuid>,
    detail: Option<serde_json::Value>,
    at: DateTime<Utc>,
) -> Result<i64, diesel::result::Error> {
    let id = next_event_id(conn).await?;
    insert_event(conn, id, conversation, kind, message, detail, at).await?;
    Ok(id)
}
