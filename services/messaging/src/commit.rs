//! Group commit of sends: the sends of one tenant that arrive while a commit is in flight
//! are committed together, in one transaction with one WAL flush, and each is acknowledged
//! only after that commit. A lone send waits for nothing; under load, batches form by
//! themselves.
//!
//! A batch costs two pipelined round trips, whatever its size (see `store_batch`), on a
//! connection the tenant's committer keeps while sends keep coming; one failing send (not a
//! member, a reused request id) fails alone. The tenant's event counter
//! is advanced once per batch; its row lock, held to commit, keeps event ids in commit order
//! across replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_async::RunQueryDsl;
use hafen_store::prepared::{Bind, Prepared, bind};
use hafen_store::schema::{conversations, event_counter, members};
use hafen_store::{AsyncPgConnection, TenantId, now};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::domain::Messaging;
use crate::error::Error;
use crate::rows::{MessageRow, event_kind};

/// Most sends committed in one transaction.
const MAX_BATCH: usize = 256;

/// How long an idle committer keeps its connection.
const LINGER: std::time::Duration = std::time::Duration::from_millis(50);

/// One send, sealed and ready to store.
pub(crate) struct Send {
    pub id: Uuid,
    pub sender: Uuid,
    pub conversation: Uuid,
    pub request_id: Uuid,
    pub sealed: Vec<u8>,
    pub masked: bool,
    pub reply: oneshot::Sender<Result<MessageRow, Error>>,
    /// When it was queued.
    pub queued: std::time::Instant,
}

/// One batching task per tenant that sends.
#[derive(Default)]
pub(crate) struct Committer {
    queues: Mutex<HashMap<Uuid, mpsc::UnboundedSender<Send>>>,
}

impl Committer {
    /// Queues `send` for `tenant` and waits for its commit.
    pub async fn submit(
        &self,
        messaging: &Messaging,
        tenant: Uuid,
        send: impl FnOnce(oneshot::Sender<Result<MessageRow, Error>>) -> Send,
    ) -> Result<MessageRow, Error> {
        let (reply, result) = oneshot::channel();
        let queue = {
            let mut queues = self
                .queues
                .lock()
                .map_err(|_| Error::Config("committer lock poisoned".into()))?;
            queues
                .entry(tenant)
                .or_insert_with(|| {
                    let (queue, receiver) = mpsc::unbounded_channel();
                    tokio::spawn(run(messaging.clone(), tenant, receiver));
                    queue
                })
                .clone()
        };
        queue
            .send(send(reply))
            .map_err(|_| Error::Config("commit queue closed".into()))?;
        result
            .await
            .map_err(|_| Error::Config("commit task ended".into()))?
    }
}

async fn run(messaging: Messaging, tenant: Uuid, mut queue: mpsc::UnboundedReceiver<Send>) {
    // The connection stays with this committer while sends keep coming, and goes back to the
    // pool once none came for `LINGER`: a sender that waits for its reply before sending
    // again finds it still there, and its batch does not pay for the pool's reset.
    let mut held: Option<hafen_store::PooledConnection> = None;
    loop {
        let next = match queue.try_recv() {
            Ok(send) => Some(send),
            Err(_) if held.is_some() => tokio::time::timeout(LINGER, queue.recv())
                .await
                .unwrap_or_else(|_| {
                    held = None;
                    None
                }),
            Err(_) => None,
        };
        let first = match next {
            Some(send) => send,
            None => match queue.recv().await {
                Some(send) => send,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(send) => batch.push(send),
                Err(_) => break,
            }
        }
        if held.is_none() {
            match messaging.tenant_connection(tenant).await {
                Ok(conn) => held = Some(conn),
                Err(err) => {
                    fail(batch, &err);
                    continue;
                }
            }
        }
        if let Some(conn) = held.as_mut()
            && !commit(&messaging, tenant, conn, batch).await
        {
            // After a failure the connection may be in any state: a fresh one next time.
            held = None;
        }
    }
}

/// Answers every send of `batch` with `err`.
fn fail(batch: Vec<Send>, err: &Error) {
    tracing::warn!(error = %err, sends = batch.len(), "batch not committed");
    let shared = err.to_string();
    for send in batch {
        let _ = send
            .reply
            .send(Err(Error::Config(format!("commit failed: {shared}"))));
    }
}

/// Stores `batch`; false when the transaction failed.
async fn commit(
    messaging: &Messaging,
    tenant: Uuid,
    conn: &mut AsyncPgConnection,
    batch: Vec<Send>,
) -> bool {
    let waited = <[Send]>::first(&batch).map(|send| send.queued.elapsed());
    let (work, replies): (Vec<Item>, Vec<_>) = batch
        .into_iter()
        .map(|send| {
            (
                Item {
                    id: send.id,
                    sender: send.sender,
                    conversation: send.conversation,
                    request_id: send.request_id,
                    sealed: send.sealed,
                    masked: send.masked,
                },
                send.reply,
            )
        })
        .unzip();
    let size = work.len();
    let started = std::time::Instant::now();
    let outcome = store_batch(conn, &TenantId::from(tenant), work).await;
    tracing::debug!(
        tenant_id = %tenant,
        sends = size,
        waited_us = waited.unwrap_or_default().as_micros() as u64,
        elapsed_us = started.elapsed().as_micros() as u64,
        "batch committed"
    );
    match outcome {
        Ok(results) => {
            messaging.inner.hub.wake(tenant);
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
            true
        }
        Err(err) => {
            tracing::warn!(tenant_id = %tenant, error = %err, sends = replies.len(), "batch not committed");
            let shared = Arc::new(err.to_string());
            for reply in replies {
                let _ = reply.send(Err(Error::Config(format!("commit failed: {shared}"))));
            }
            false
        }
    }
}

/// Sets `plan_cache_mode` for the rest of the transaction.
fn plan_cache_mode(mode: &'static str) -> Prepared<(Bind<Text, &'static str>,)> {
    Prepared::new(
        &["SELECT set_config('plan_cache_mode', ", ", true)"],
        (bind(mode),),
    )
}

/// The new messages of a batch, one vector per column.
#[derive(Default)]
struct NewRows {
    ids: Vec<Uuid>,
    conversations: Vec<Uuid>,
    sequences: Vec<i64>,
    senders: Vec<Uuid>,
    ciphertexts: Vec<Vec<u8>>,
    masked: Vec<bool>,
    request_ids: Vec<Uuid>,
    /// The id of each one's `message_created` event.
    events: Vec<i64>,
}

/// One send, sealed.
struct Item {
    id: Uuid,
    sender: Uuid,
    conversation: Uuid,
    request_id: Uuid,
    sealed: Vec<u8>,
    masked: bool,
}

/// Stores a batch in its own transaction, in two pipelined round trips whatever its size.
/// The first begins the transaction, enters the tenant's scope (role and schema, as
/// `with_tenant` does), locks the tenant's event counter (which serialises the tenant's
/// writers, so nothing read here can change before the commit) and reads, at once, the
/// retries and the membership of every send and the sequences of their conversations. The
/// second advances the sequences, inserts the messages and their events, one statement
/// each, and commits. Every statement has a fixed text (rows travel as one array per
/// column), so each connection prepares it once: no statement costs a round trip of its own.
/// Any failure rolls the whole batch back.
async fn store_batch(
    conn: &mut AsyncPgConnection,
    tenant: &TenantId,
    items: Vec<Item>,
) -> Result<Vec<Result<MessageRow, Error>>, Error> {
    let stored = store_batch_in(conn, tenant, items).await;
    if stored.is_err() {
        // A failed statement leaves the transaction aborted (or not begun): end it.
        let _ = diesel::sql_query("ROLLBACK").execute(conn).await;
    }
    stored
}

async fn store_batch_in(
    conn: &mut AsyncPgConnection,
    tenant: &TenantId,
    items: Vec<Item>,
) -> Result<Vec<Result<MessageRow, Error>>, Error> {
    use diesel::sql_types::{Array, BigInt, Bool, Bytea, Timestamptz, Uuid as SqlUuid};
    use std::collections::{HashMap, HashSet};

    let conn: &AsyncPgConnection = conn;
    let request_ids: Vec<Uuid> = items.iter().map(|i| i.request_id).collect();
    let conversation_ids: Vec<Uuid> = items.iter().map(|i| i.conversation).collect();
    let sender_ids: Vec<Uuid> = items.iter().map(|i| i.sender).collect();
    // Every statement runs to its end (join, not try_join), so the connection's answers stay
    // in step; the first error counts.
    let (begun, entered, last_event, memberships, sequences, custom, existing) = futures::join!(
        Prepared::text(&["BEGIN"]).execute(&mut &*conn),
        hafen_store::tenancy::enter_statement(tenant).execute(&mut &*conn),
        event_counter::table
            .select(event_counter::last_id)
            .for_update()
            .first::<i64>(&mut &*conn),
        members::table
            .filter(members::conversation_id.eq_any(&conversation_ids))
            .filter(members::user_id.eq_any(&sender_ids))
            .select((members::conversation_id, members::user_id))
            .load::<(Uuid, Uuid)>(&mut &*conn),
        conversations::table
            .filter(conversations::id.eq_any(&conversation_ids))
            .select((conversations::id, conversations::last_sequence))
            .load::<(Uuid, i64)>(&mut &*conn),
        // The joins with the batch's arrays (this lookup, and the update of the sequences)
        // are planned for each batch: a generic plan, made once while the tenant had few
        // messages, would go on scanning them all once it has many.
        plan_cache_mode("force_custom_plan").execute(&mut &*conn),
        // Retries: one probe of `messages_request_key` per (sender, request id) pair.
        Prepared::new(
            &[
                "SELECT m.* FROM messages m JOIN unnest(",
                "::uuid[], ",
                "::uuid[]) AS r(sender_id, request_id) \
                 ON m.sender_id = r.sender_id AND m.request_id = r.request_id \
                 WHERE m.request_id IS NOT NULL",
            ],
            (
                bind::<Array<SqlUuid>, _>(&sender_ids),
                bind::<Array<SqlUuid>, _>(&request_ids),
            ),
        )
        .load::<MessageRow>(&mut &*conn),
    );
    begun?;
    entered?;
    custom?;
    let (last_event, existing, memberships, sequences) =
        (last_event?, existing?, memberships?, sequences?);
    let existing: HashMap<(Uuid, Uuid), MessageRow> = existing
        .into_iter()
        .filter_map(|row| row.request_id.map(|r| ((row.sender_id, r), row)))
        .collect();
    let memberships: HashSet<(Uuid, Uuid)> = memberships.into_iter().collect();
    // The next sequence number of each conversation.
    let mut next_sequence: HashMap<Uuid, i64> = sequences
        .into_iter()
        .map(|(id, last)| (id, last + 1))
        .collect();

    // What becomes of each send: an earlier message (a retry), an error, or a new row.
    enum Fate {
        Done(Result<MessageRow, Error>),
        SameAs(usize),
        New,
    }
    let at = now();
    let mut fates = Vec::with_capacity(items.len());
    let mut first_in_batch: HashMap<(Uuid, Uuid), usize> = HashMap::new();
    let mut next_event = last_event + 1;
    // The new messages, column by column (their events share ids, conversations and time).
    let mut new = NewRows::default();
    for (index, item) in items.iter().enumerate() {
        let key = (item.sender, item.request_id);
        let fate = if let Some(row) = existing.get(&key) {
            if row.conversation_id == item.conversation {
                Fate::Done(Ok(row.clone()))
            } else {
                Fate::Done(Err(Error::RequestIdConflict))
            }
        } else if let Some(&earlier) = first_in_batch.get(&key) {
            if items[earlier].conversation == item.conversation {
                Fate::SameAs(earlier)
            } else {
                Fate::Done(Err(Error::RequestIdConflict))
            }
        } else if let Some(sequence) = next_sequence
            .get_mut(&item.conversation)
            .filter(|_| memberships.contains(&(item.conversation, item.sender)))
        {
            first_in_batch.insert(key, index);
            new.ids.push(item.id);
            new.conversations.push(item.conversation);
            new.sequences.push(*sequence);
            new.senders.push(item.sender);
            new.ciphertexts.push(item.sealed.clone());
            new.masked.push(item.masked);
            new.request_ids.push(item.request_id);
            new.events.push(next_event);
            *sequence += 1;
            next_event += 1;
            Fate::New
        } else {
            Fate::Done(Err(Error::NotFound("conversation")))
        };
        fates.push(fate);
    }

    let mut rows_by_id: HashMap<Uuid, MessageRow> = HashMap::new();
    if new.ids.is_empty() {
        Prepared::text(&["COMMIT"]).execute(&mut &*conn).await?;
    } else {
        let (ids, lasts): (Vec<Uuid>, Vec<i64>) = next_sequence
            .iter()
            .map(|(id, next)| (*id, *next - 1))
            .unzip();
        // Fixed statements whatever the batch's size, so each is prepared once per
        // connection: rows come in as one array per column.
        let (advanced, generic, inserted, recorded, counted, committed) = futures::join!(
            Prepared::new(
                &[
                    "UPDATE conversations c SET last_sequence = n.last, updated_at = now() \
                     FROM unnest(",
                    "::uuid[], ",
                    "::bigint[]) AS n(id, last) \
                     WHERE c.id = n.id AND c.last_sequence <> n.last",
                ],
                (
                    bind::<Array<SqlUuid>, _>(&ids),
                    bind::<Array<BigInt>, _>(&lasts),
                ),
            )
            .execute(&mut &*conn),
            // Back to reusing plans, for the inserts and their foreign-key checks.
            plan_cache_mode("auto").execute(&mut &*conn),
            Prepared::new(
                &[
                    "INSERT INTO messages (id, conversation_id, sequence, sender_id, ciphertext, \
                                           masked, request_id, created_at) \
                     SELECT n.*, ",
                    "::timestamptz FROM unnest(",
                    "::uuid[], ",
                    "::uuid[], ",
                    "::bigint[], ",
                    "::uuid[], ",
                    "::bytea[], ",
                    "::boolean[], ",
                    "::uuid[]) AS n RETURNING *",
                ],
                (
                    bind::<Timestamptz, _>(at),
                    bind::<Array<SqlUuid>, _>(&new.ids),
                    bind::<Array<SqlUuid>, _>(&new.conversations),
                    bind::<Array<BigInt>, _>(&new.sequences),
                    bind::<Array<SqlUuid>, _>(&new.senders),
                    bind::<Array<Bytea>, _>(&new.ciphertexts),
                    bind::<Array<Bool>, _>(&new.masked),
                    bind::<Array<SqlUuid>, _>(&new.request_ids),
                ),
            )
            .load::<MessageRow>(&mut &*conn),
            Prepared::new(
                &[
                    "INSERT INTO events (id, conversation_id, kind, message_id, created_at) \
                     SELECT n.id, n.conversation_id, ",
                    ", n.message_id, ",
                    "::timestamptz FROM unnest(",
                    "::bigint[], ",
                    "::uuid[], ",
                    "::uuid[]) AS n(id, conversation_id, message_id)",
                ],
                (
                    bind::<Text, _>(event_kind::CREATED),
                    bind::<Timestamptz, _>(at),
                    bind::<Array<BigInt>, _>(&new.events),
                    bind::<Array<SqlUuid>, _>(&new.conversations),
                    bind::<Array<SqlUuid>, _>(&new.ids),
                ),
            )
            .execute(&mut &*conn),
            diesel::update(event_counter::table)
                .set(event_counter::last_id.eq(next_event - 1))
                .execute(&mut &*conn),
            // After a failed statement above, PostgreSQL answers this COMMIT with a rollback;
            // the error of that statement is what is reported.
            Prepared::text(&["COMMIT"]).execute(&mut &*conn),
        );
        advanced?;
        generic?;
        let inserted = inserted?;
        recorded?;
        counted?;
        committed?;
        rows_by_id = inserted.into_iter().map(|r| (r.id, r)).collect();
    }
    let mut results = Vec::with_capacity(items.len());
    for (index, fate) in fates.into_iter().enumerate() {
        let new_row = |index: usize| {
            rows_by_id
                .get(&items[index].id)
                .cloned()
                .ok_or(Error::NotFound("conversation"))
        };
        results.push(match fate {
            Fate::Done(result) => result,
            Fate::SameAs(earlier) => new_row(earlier),
            Fate::New => new_row(index),
        });
    }
    Ok(results)
}
