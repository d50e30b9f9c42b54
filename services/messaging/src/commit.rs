//! Group commit of sends: the sends of one tenant that arrive while a commit is in flight
//! are committed together, in one transaction with one WAL flush, and each is acknowledged
//! only after that commit. A lone send waits for nothing; under load, batches form by
//! themselves.
//!
//! A batch costs a fixed number of statements, whatever its size (see `store_batch`); one
//! failing send (not a member, a reused request id) fails alone. The tenant's event counter
//! is advanced once per batch; its row lock, held to commit, keeps event ids in commit order
//! across replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_store::schema::{event_counter, events, members, messages};
use hafen_store::{AsyncPgConnection, now};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::domain::Messaging;
use crate::error::Error;
use crate::rows::{MessageRow, event_kind};

/// Most sends committed in one transaction.
const MAX_BATCH: usize = 256;

/// One send, sealed and ready to store.
pub(crate) struct Send {
    pub id: Uuid,
    pub sender: Uuid,
    pub conversation: Uuid,
    pub request_id: Uuid,
    pub sealed: Vec<u8>,
    pub masked: bool,
    pub reply: oneshot::Sender<Result<MessageRow, Error>>,
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
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(send) => batch.push(send),
                Err(_) => break,
            }
        }
        commit(&messaging, tenant, batch).await;
    }
}

async fn commit(messaging: &Messaging, tenant: Uuid, batch: Vec<Send>) {
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
    let outcome = messaging
        .scoped(tenant, move |conn| Box::pin(store_batch(conn, work)))
        .await;
    tracing::debug!(tenant_id = %tenant, sends = size, elapsed_us = started.elapsed().as_micros() as u64, "batch committed");
    match outcome {
        Ok(results) => {
            messaging.inner.hub.wake(tenant).await;
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(err) => {
            tracing::warn!(tenant_id = %tenant, error = %err, sends = replies.len(), "batch not committed");
            let shared = Arc::new(err.to_string());
            for reply in replies {
                let _ = reply.send(Err(Error::Config(format!("commit failed: {shared}"))));
            }
        }
    }
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

/// Stores a batch with a fixed number of statements, whatever its size: the retries and the
/// membership of every send are looked up at once, sequences are advanced once per
/// conversation, and messages and events are inserted in one statement each. The tenant's
/// event counter is locked first, which serialises the tenant's writers, so nothing checked
/// here can change before the commit.
async fn store_batch(
    conn: &mut AsyncPgConnection,
    items: Vec<Item>,
) -> Result<Vec<Result<MessageRow, Error>>, Error> {
    use diesel::sql_types::{Array, BigInt, Uuid as SqlUuid};
    use std::collections::{HashMap, HashSet};

    let last_event: i64 = event_counter::table
        .select(event_counter::last_id)
        .for_update()
        .first(conn)
        .await?;
    let request_ids: Vec<Uuid> = items.iter().map(|i| i.request_id).collect();
    let existing: HashMap<(Uuid, Uuid), MessageRow> = messages::table
        .filter(messages::request_id.eq_any(&request_ids))
        .select(MessageRow::as_select())
        .load::<MessageRow>(conn)
        .await?
        .into_iter()
        .filter_map(|row| row.request_id.map(|r| ((row.sender_id, r), row)))
        .collect();
    let conversation_ids: Vec<Uuid> = items.iter().map(|i| i.conversation).collect();
    let sender_ids: Vec<Uuid> = items.iter().map(|i| i.sender).collect();
    let memberships: HashSet<(Uuid, Uuid)> = members::table
        .filter(members::conversation_id.eq_any(&conversation_ids))
        .filter(members::user_id.eq_any(&sender_ids))
        .select((members::conversation_id, members::user_id))
        .load::<(Uuid, Uuid)>(conn)
        .await?
        .into_iter()
        .collect();

    // What becomes of each send: an earlier message (a retry), an error, or a new row.
    enum Fate {
        Done(Result<MessageRow, Error>),
        SameAs(usize),
        New,
    }
    let mut fates = Vec::with_capacity(items.len());
    let mut first_in_batch: HashMap<(Uuid, Uuid), usize> = HashMap::new();
    let mut per_conversation: HashMap<Uuid, i64> = HashMap::new();
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
        } else if !memberships.contains(&(item.conversation, item.sender)) {
            Fate::Done(Err(Error::NotFound("conversation")))
        } else {
            first_in_batch.insert(key, index);
            *per_conversation.entry(item.conversation).or_default() += 1;
            Fate::New
        };
        fates.push(fate);
    }

    let at = now();
    let new_count: i64 = per_conversation.values().sum();
    let mut rows_by_index: HashMap<usize, MessageRow> = HashMap::new();
    if new_count > 0 {
        let (ids, counts): (Vec<Uuid>, Vec<i64>) =
            per_conversation.iter().map(|(c, n)| (*c, *n)).unzip();
        #[derive(diesel::QueryableByName)]
        struct Advanced {
            #[diesel(sql_type = SqlUuid)]
            id: Uuid,
            #[diesel(sql_type = BigInt)]
            last_sequence: i64,
        }
        let advanced: Vec<Advanced> = diesel::sql_query(
            "UPDATE conversations c SET last_sequence = c.last_sequence + n.count, updated_at = now() \
             FROM unnest($1::uuid[], $2::bigint[]) AS n(id, count) WHERE c.id = n.id \
             RETURNING c.id, c.last_sequence",
        )
        .bind::<Array<SqlUuid>, _>(&ids)
        .bind::<Array<BigInt>, _>(&counts)
        .load(conn)
        .await?;
        // The first sequence number each conversation hands out in this batch.
        let mut next_sequence: HashMap<Uuid, i64> = advanced
            .iter()
            .map(|a| {
                (
                    a.id,
                    a.last_sequence - per_conversation.get(&a.id).copied().unwrap_or(0) + 1,
                )
            })
            .collect();
        let mut next_event = last_event + 1;
        let mut message_rows = Vec::new();
        let mut event_rows = Vec::new();
        for (index, item) in items.iter().enumerate() {
            if !matches!(fates[index], Fate::New) {
                continue;
            }
            let Some(sequence) = next_sequence.get_mut(&item.conversation) else {
                continue;
            };
            message_rows.push((
                messages::id.eq(item.id),
                messages::conversation_id.eq(item.conversation),
                messages::sequence.eq(*sequence),
                messages::sender_id.eq(item.sender),
                messages::ciphertext.eq(Some(item.sealed.clone())),
                messages::masked.eq(item.masked),
                messages::request_id.eq(Some(item.request_id)),
                messages::created_at.eq(at),
            ));
            event_rows.push((
                events::id.eq(next_event),
                events::conversation_id.eq(item.conversation),
                events::kind.eq(event_kind::CREATED),
                events::message_id.eq(Some(item.id)),
                events::created_at.eq(at),
            ));
            *sequence += 1;
            next_event += 1;
        }
        let inserted: Vec<MessageRow> = diesel::insert_into(messages::table)
            .values(message_rows)
            .returning(MessageRow::as_returning())
            .get_results(conn)
            .await?;
        diesel::insert_into(events::table)
            .values(event_rows)
            .execute(conn)
            .await?;
        diesel::update(event_counter::table)
            .set(event_counter::last_id.eq(next_event - 1))
            .execute(conn)
            .await?;
        let by_id: HashMap<Uuid, MessageRow> = inserted.into_iter().map(|r| (r.id, r)).collect();
        for (index, item) in items.iter().enumerate() {
            if let Some(row) = by_id.get(&item.id) {
                rows_by_index.insert(index, row.clone());
            }
        }
    }
    let mut results = Vec::with_capacity(items.len());
    for (index, fate) in fates.into_iter().enumerate() {
        results.push(match fate {
            Fate::Done(result) => result,
            Fate::SameAs(earlier) => rows_by_index
                .get(&earlier)
                .cloned()
                .ok_or(Error::NotFound("message")),
            Fate::New => rows_by_index
                .get(&index)
                .cloned()
                .ok_or(Error::NotFound("conversation")),
        });
    }
    Ok(results)
}
