//! Group commit of sends: the sends of one tenant that arrive while a commit is in flight
//! are committed together, in one transaction with one WAL flush, and each is acknowledged
//! only after that commit. A lone send waits for nothing; under load, batches form by
//! themselves.
//!
//! Each send runs in a savepoint of the batch's transaction, so one failing send (not a
//! member, a reused request id) fails alone. The tenant's event counter is advanced once per
//! batch; its row lock, held to commit, keeps event ids in commit order across replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use diesel::prelude::*;
use diesel_async::{AnsiTransactionManager, RunQueryDsl, TransactionManager};
use hafen_store::schema::{conversations, event_counter, messages};
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
    let (work, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|send| {
            (
                (
                    send.id,
                    send.sender,
                    send.conversation,
                    send.request_id,
                    send.sealed,
                    send.masked,
                ),
                send.reply,
            )
        })
        .unzip();
    let count = i64::try_from(work.len()).unwrap_or(i64::MAX);
    let outcome = messaging
        .scoped(tenant, move |conn| {
            Box::pin(async move {
                let last: i64 = diesel::update(event_counter::table)
                    .set(event_counter::last_id.eq(event_counter::last_id + count))
                    .returning(event_counter::last_id)
                    .get_result(conn)
                    .await?;
                let first_event = last - count + 1;
                let mut results = Vec::with_capacity(work.len());
                for (offset, item) in (0_i64..).zip(work) {
                    AnsiTransactionManager::begin_transaction(conn).await?;
                    match store(conn, first_event + offset, item).await {
                        Ok(row) => {
                            AnsiTransactionManager::commit_transaction(conn).await?;
                            results.push(Ok(row));
                        }
                        Err(err) => {
                            AnsiTransactionManager::rollback_transaction(conn).await?;
                            results.push(Err(err));
                        }
                    }
                }
                Ok::<_, Error>(results)
            })
        })
        .await;
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

type Item = (Uuid, Uuid, Uuid, Uuid, Vec<u8>, bool);

/// Stores one send inside the batch (in its own savepoint).
async fn store(conn: &mut AsyncPgConnection, event: i64, item: Item) -> Result<MessageRow, Error> {
    let (id, sender, conversation, request_id, sealed, masked) = item;
    if let Some(existing) = messages::table
        .filter(messages::sender_id.eq(sender))
        .filter(messages::request_id.eq(request_id))
        .select(MessageRow::as_select())
        .first(conn)
        .await
        .optional()?
    {
        if existing.conversation_id != conversation {
            return Err(Error::RequestIdConflict);
        }
        return Ok(existing);
    }
    if !crate::domain::is_member(conn, conversation, sender).await? {
        return Err(Error::NotFound("conversation"));
    }
    let at = now();
    let sequence: i64 = diesel::update(conversations::table.find(conversation))
        .set((
            conversations::last_sequence.eq(conversations::last_sequence + 1),
            conversations::updated_at.eq(at),
        ))
        .returning(conversations::last_sequence)
        .get_result(conn)
        .await?;
    let row: MessageRow = diesel::insert_into(messages::table)
        .values((
            messages::id.eq(id),
            messages::conversation_id.eq(conversation),
            messages::sequence.eq(sequence),
            messages::sender_id.eq(sender),
            messages::ciphertext.eq(Some(&sealed)),
            messages::masked.eq(masked),
            messages::request_id.eq(Some(request_id)),
            messages::created_at.eq(at),
        ))
        .returning(MessageRow::as_returning())
        .get_result(conn)
        .await?;
    crate::domain::insert_event(
        conn,
        event,
        conversation,
        event_kind::CREATED,
        Some(id),
        None,
        at,
    )
    .await?;
    Ok(row)
}
