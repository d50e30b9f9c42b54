//! Messages: read, edited, deleted, listed, and stored in batches.

use diesel::sql_types::{
    Array, BigInt, Bool, Bytea, Integer, Nullable, Timestamptz, Uuid as SqlUuid,
};
use hafen_store::prepared::{Statement, bind};
use hafen_store::schema::{legal_holds, messages};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_store::AsyncPgConnection;
use uuid::Uuid;

use crate::error::Error;
use crate::rows::MessageRow;

pub async fn message(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<MessageRow>, Error> {
    Ok(messages::table
        .find(id)
        .select(MessageRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// Replaces the body of message `id` unless it is deleted; the row after, if it was not.
pub async fn replace_body(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    sealed: Vec<u8>,
    masked: bool,
    at: DateTime<Utc>,
) -> Result<Option<MessageRow>, Error> {
    Ok(diesel::update(
        messages::table
            .find(id)
            .filter(messages::deleted_at.is_null()),
    )
    .set((
        messages::ciphertext.eq(Some(sealed)),
        messages::masked.eq(masked),
        messages::edited_at.eq(at),
    ))
    .returning(MessageRow::as_returning())
    .get_result(conn)
    .await
    .optional()?)
}

/// Drops the body of message `id`, leaving a tombstone (deleted now, or when it first was).
pub async fn tombstone(conn: &mut AsyncPgConnection, id: Uuid) -> Result<MessageRow, Error> {
    use diesel::sql_types::Timestamptz;
    Ok(diesel::update(messages::table.find(id))
        .set((
            messages::ciphertext.eq(None::<Vec<u8>>),
            messages::deleted_at.eq(diesel::dsl::sql::<Nullable<Timestamptz>>(
                "coalesce(deleted_at, now())",
            )),
        ))
        .returning(MessageRow::as_returning())
        .get_result(conn)
        .await?)
}

/// Up to `limit` messages of `conversation` by sequence: after `from` going forward, or
/// before it going backward (0: from the end).
pub async fn messages_page(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    forward: bool,
    from: i64,
    limit: i64,
) -> Result<Vec<MessageRow>, Error> {
    let query = messages::table
        .filter(messages::conversation_id.eq(conversation))
        .select(MessageRow::as_select())
        .limit(limit)
        .into_boxed();
    let query = match (forward, from) {
        (true, from) => query
            .filter(messages::sequence.gt(from))
            .order(messages::sequence.asc()),
        (false, 0) => query.order(messages::sequence.desc()),
        (false, from) => query
            .filter(messages::sequence.lt(from))
            .order(messages::sequence.desc()),
    };
    Ok(query.load(conn).await?)
}

/// Whether a legal hold in force covers `conversation` or the messages of `sender`. Run in the
/// transaction that changes a message: a hold set by then is seen (SetLegalHold commits
/// before it answers).
pub async fn under_hold(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    sender: Uuid,
) -> Result<bool, Error> {
    Ok(diesel::select(diesel::dsl::exists(
        legal_holds::table
            .filter(legal_holds::lifted_at.is_null())
            .filter(
                legal_holds::conversation_id
                    .eq(conversation)
                    .or(legal_holds::user_id.eq(sender)),
            ),
    ))
    .get_result(conn)
    .await?)
}

/// A batch of sends as the tenant schema's `store_messages` takes it: one array per column,
/// in the batch's order.
pub struct Batch {
    pub ids: Vec<Uuid>,
    pub conversations: Vec<Uuid>,
    pub senders: Vec<Uuid>,
    pub request_ids: Vec<Uuid>,
    pub ciphertexts: Vec<Vec<u8>>,
    pub masked: Vec<bool>,
    /// Each send's place among the batch's sends to its conversation (1, 2, …).
    pub places: Vec<i32>,
    pub at: DateTime<Utc>,
    /// The event counter's value after the caller's last batch, if it knows it.
    pub counter: Option<i64>,
    /// Each send's conversation's last sequence, where the caller knows it.
    pub floors: Vec<Option<i64>>,
}

/// One call of `store_messages` (tenant migration `000004_store_messages`, which documents
/// it), on a connection in the tenant's scope under `INDEX_PROBES_ONLY` for the session.
const STORE_MESSAGES: &str =
    "SELECT * FROM store_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// Stores `batch` in one call: all of it, or (with `retries`) what is not a retry or from a
/// non-member. Returns the stored messages and, for retries, the earlier ones.
pub async fn store_messages(
    conn: &AsyncPgConnection,
    batch: &Batch,
    retries: bool,
) -> Result<Vec<MessageRow>, diesel::result::Error> {
    Statement::new(
        STORE_MESSAGES,
        (
            bind::<Array<SqlUuid>, _>(&batch.ids),
            bind::<Array<SqlUuid>, _>(&batch.conversations),
            bind::<Array<SqlUuid>, _>(&batch.senders),
            bind::<Array<SqlUuid>, _>(&batch.request_ids),
            bind::<Array<Bytea>, _>(&batch.ciphertexts),
            bind::<Array<Bool>, _>(&batch.masked),
            bind::<Array<Integer>, _>(&batch.places),
            bind::<Timestamptz, _>(batch.at),
            bind::<Nullable<BigInt>, _>(batch.counter),
            bind::<Array<Nullable<BigInt>>, _>(&batch.floors),
            bind::<Bool, _>(retries),
        ),
    )
    .load(&mut &*conn)
    .await
}
