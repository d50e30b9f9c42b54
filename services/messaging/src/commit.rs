//! Group commit of sends: the sends of one tenant that arrive while a commit is in flight
//! are committed together, in one transaction with one WAL flush, and each is acknowledged
//! only after that commit. A lone send waits for nothing; under load, batches form by
//! themselves.
//!
//! A batch is one call of the tenant schema's `store_messages` ([`repo::store_messages`]),
//! one round trip whatever its size, on a connection the tenant's committer keeps while sends
//! keep coming; one failing send (not a member, a reused request id) fails alone, at the price
//! of a second call for its batch. The tenant's event counter is advanced once per batch; its
//! row lock, held to commit, keeps event ids in commit order across replicas. While no other
//! writer comes between two batches, the second skips looking up what the first told the
//! committer ([`Known`]). Committed messages go to this process's live feed at once
//! ([`Hub::committed`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use diesel_async::RunQueryDsl;
use hafen_store::prepared::{INDEX_PROBES_ONLY_FOR_SESSION, Prepared};
use hafen_store::{AsyncPgConnection, Databases, TenantId, now};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::error::Error;
use crate::feed::{Delivery, Hub};
use crate::repo::{self, Batch};
use crate::rows::MessageRow;

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
    /// The body in clear (masked), for this process's live feed only; never stored.
    pub body: String,
    pub reply: oneshot::Sender<Result<MessageRow, Error>>,
    /// When it was queued.
    pub queued: std::time::Instant,
}

/// One batching task per tenant that sends. Each holds at most `capacity` sends before new
/// ones are turned away (RESOURCE_EXHAUSTED OVERLOADED): far above what one committer stores
/// in a second, so only a stalled database or a flood reaches it, and then the queue (and
/// memory) stops growing.
pub(crate) struct Committer {
    queues: Mutex<HashMap<Uuid, mpsc::Sender<Send>>>,
    capacity: usize,
    shared: Arc<Shared>,
}

/// What every tenant's committer uses.
struct Shared {
    /// The committers' pools: their connections are driven on the commit thread.
    databases: Databases,
    hub: Hub,
}

impl Committer {
    /// Committers queueing at most `capacity` sends each, storing through connections of
    /// `databases` (pools of their own, see [`commit_thread`]) and handing what they stored
    /// to `hub`.
    pub(crate) fn new(databases: Databases, hub: Hub, capacity: usize) -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            shared: Arc::new(Shared { databases, hub }),
        }
    }

    /// Queues `send` for `tenant` and waits for its commit.
    pub async fn submit(
        &self,
        tenant: Uuid,
        send: impl FnOnce(oneshot::Sender<Result<MessageRow, Error>>) -> Send,
    ) -> Result<MessageRow, Error> {
        let (reply, result) = oneshot::channel();
        let queue = {
            let mut queues = self
                .queues
                .lock()
                .map_err(|_| Error::Bug("committer lock poisoned"))?;
            queues
                .entry(tenant)
                .or_insert_with(|| {
                    let (queue, receiver) = mpsc::channel(self.capacity);
                    commit_thread().spawn(run(Arc::clone(&self.shared), tenant, receiver));
                    queue
                })
                .clone()
        };
        queue.try_send(send(reply)).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => Error::Overloaded,
            mpsc::error::TrySendError::Closed(_) => Error::Unavailable("the commit thread"),
        })?;
        result
            .await
            .map_err(|_| Error::Unavailable("the commit thread"))?
    }
}

/// The runtime the committers run on: a thread of their own, shared by every committer of the
/// process. A tenant's commits are serial, so the time between PostgreSQL's answer and the
/// next batch going out limits its sends; on the request runtime that answer would wait in
/// line behind the request tasks whenever they keep the workers busy. The committers' work
/// between two round trips is small, and their connections (from their own pools, see
/// [`connection`]) are driven on this thread too. Falls back to the calling
/// runtime if the thread cannot be started.
fn commit_thread() -> tokio::runtime::Handle {
    static THREAD: std::sync::OnceLock<Option<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    fn start() -> std::io::Result<tokio::runtime::Handle> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("hafen-commit".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        Ok(handle)
    }
    THREAD
        .get_or_init(|| {
            start()
                .inspect_err(|err| {
                    tracing::warn!(error = %err, "commit thread not started; committing on the request runtime");
                })
                .ok()
        })
        .clone()
        .unwrap_or_else(tokio::runtime::Handle::current)
}

/// A connection to `tenant`'s database from the committers' pools, in the tenant's scope and
/// under `INDEX_PROBES_ONLY` for the whole session (see
/// [`hafen_store::tenancy::enter_session`]): for the tenant's committer alone, until it gives
/// the connection back (the pool then resets both).
async fn connection(
    databases: &Databases,
    tenant: Uuid,
) -> Result<hafen_store::PooledConnection, Error> {
    let tenant = TenantId::from(tenant);
    let conn = databases.tenant_connection(&tenant).await?;
    let (scoped, planned) = futures::join!(
        hafen_store::tenancy::enter_session(&conn, &tenant),
        Prepared::text(INDEX_PROBES_ONLY_FOR_SESSION).execute(&mut &*conn),
    );
    scoped.and(planned)?;
    Ok(conn)
}

async fn run(shared: Arc<Shared>, tenant: Uuid, mut queue: mpsc::Receiver<Send>) {
    // The connection stays with this committer while sends keep coming, and goes back to the
    // pool once none came for `LINGER`: a sender that waits for its reply before sending
    // again finds it still there, and its batch does not pay for the pool's reset.
    let mut held: Option<hafen_store::PooledConnection> = None;
    let mut known = Known::default();
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
            match connection(&shared.databases, tenant).await {
                Ok(conn) => held = Some(conn),
                Err(err) => {
                    fail(tenant, batch, &err);
                    continue;
                }
            }
        }
        if let Some(conn) = held.as_mut()
            && !commit(&shared.hub, tenant, conn, &mut known, batch).await
        {
            // After a failure the connection may be in any state: a fresh one next time.
            held = None;
        }
    }
}

/// Answers every send of `batch` for `err`: UNAVAILABLE when the database could not be
/// reached, went away or gave up on the batch for a reason a retry may not meet (a
/// serialization failure, a timeout), INTERNAL otherwise (a bug).
fn fail(tenant: Uuid, batch: Vec<Send>, err: &Error) {
    let unavailable = err.is_unavailable();
    if unavailable {
        tracing::warn!(tenant_id = %tenant, error = %err, sends = batch.len(), "batch not committed");
    } else {
        tracing::error!(tenant_id = %tenant, error = %err, sends = batch.len(), "batch failed");
    }
    for send in batch {
        let answer = if unavailable {
            Error::Unavailable("the database")
        } else {
            Error::BatchFailed
        };
        let _ = send.reply.send(Err(answer));
    }
}

/// Stores `batch`; false when the transaction failed.
async fn commit(
    hub: &Hub,
    tenant: Uuid,
    conn: &AsyncPgConnection,
    known: &mut Known,
    mut batch: Vec<Send>,
) -> bool {
    let waited = <[Send]>::first(&batch).map(|send| send.queued.elapsed());
    let started = std::time::Instant::now();
    let outcome = store_batch(conn, known, &mut batch).await;
    tracing::debug!(
        tenant_id = %tenant,
        sends = batch.len(),
        waited_us = waited.unwrap_or_default().as_micros() as u64,
        elapsed_us = started.elapsed().as_micros() as u64,
        "batch committed"
    );
    match outcome {
        Ok(stored) => {
            let last = stored
                .iter()
                .filter(|s| s.inserted)
                .map(|s| s.row.event_id)
                .max();
            hub.committed(tenant, last, || deliveries(&batch, &stored));
            let results = fates(&batch, stored);
            for (send, result) in batch.into_iter().zip(results) {
                let _ = send.reply.send(result);
            }
            true
        }
        Err(err) => {
            fail(tenant, batch, &err);
            false
        }
    }
}

/// A message `store_messages` returned: one it stored (`inserted`), or an earlier one with
/// the same sender and request id (a retry).
struct Stored {
    inserted: bool,
    row: MessageRow,
}

/// Stores a batch in a transaction of its own: one call in an implicit transaction on a
/// connection scoped to the tenant for the whole session
/// ([`hafen_store::tenancy::enter_session`]), so one round trip and one answer from
/// PostgreSQL whatever the batch's size. Sends repeated within the batch go to the call once.
/// A batch goes first as the common one (all new, all from members, stored whole); when that
/// stores nothing (a sender is not a member) or fails on a retry (the index of request ids
/// refuses it), it goes again looking for retries. Any failure rolls the whole call back.
/// `known` is what the committer knows after the batch: what it learned when the common call
/// stored the batch, else nothing.
async fn store_batch(
    conn: &AsyncPgConnection,
    known: &mut Known,
    sends: &mut [Send],
) -> Result<Vec<Stored>, Error> {
    // The first of the sends with the same sender and request id.
    let mut seen = HashSet::new();
    let first: Vec<&mut Send> = sends
        .iter_mut()
        .filter(|s| seen.insert((s.sender, s.request_id)))
        .collect();
    let conversations: Vec<Uuid> = first.iter().map(|s| s.conversation).collect();
    let senders: Vec<Uuid> = first.iter().map(|s| s.sender).collect();
    let prior = std::mem::take(known);
    let batch = Batch {
        ids: first.iter().map(|s| s.id).collect(),
        places: places(&conversations),
        floors: prior.floors(&conversations, &senders),
        conversations,
        senders,
        request_ids: first.iter().map(|s| s.request_id).collect(),
        masked: first.iter().map(|s| s.masked).collect(),
        ciphertexts: first
            .into_iter()
            .map(|s| std::mem::take(&mut s.sealed))
            .collect(),
        at: now(),
        counter: prior.counter,
    };
    match repo::store_messages(conn, &batch, false).await {
        Ok(rows) if rows.len() == batch.ids.len() => {
            let stored: Vec<Stored> = rows
                .into_iter()
                .map(|row| Stored {
                    inserted: true,
                    row,
                })
                .collect();
            *known = prior.learned(&stored);
            return Ok(stored);
        }
        // Not all from members: nothing was stored.
        Ok(_) => {}
        Err(err) if hafen_store::is_unique_violation(&err, RETRY_KEY) => {}
        Err(err) => return Err(err.into()),
    }
    tracing::debug!(
        sends = batch.ids.len(),
        "batch holds a retry or a non-member's send: stored again, looking for retries"
    );
    // A new message has the id its send was given; an earlier one, its first send's.
    let ids: HashSet<Uuid> = batch.ids.iter().copied().collect();
    let rows = repo::store_messages(conn, &batch, true).await?;
    Ok(rows
        .into_iter()
        .map(|row| Stored {
            inserted: ids.contains(&row.id),
            row,
        })
        .collect())
}

/// The unique index a retry's message fails when the call does not look for retries.
const RETRY_KEY: &str = "messages_request_key";

/// Most pairs of conversation and sender a committer remembers; past that it forgets all it
/// knows and learns again from its next batches.
const MAX_KNOWN: usize = 4096;

/// What a committer knows from its own batches stored whole, valid while no other writer has
/// committed since: the event counter's value after its last batch, and, as of that batch, the
/// last sequence of each conversation it stored into and which senders it found to be members
/// there. The call checks the counter under its lock (tenant migration
/// `000004_store_messages` says why that suffices) and probes as usual when another writer
/// came between; the committer then starts again from that batch.
#[derive(Default)]
struct Known {
    counter: Option<i64>,
    floors: HashMap<Uuid, i64>,
    members: HashSet<(Uuid, Uuid)>,
}

impl Known {
    /// Each send's conversation's last sequence, where every send of the batch to that
    /// conversation is from a sender known to be a member; otherwise none.
    fn floors(&self, conversations: &[Uuid], senders: &[Uuid]) -> Vec<Option<i64>> {
        let mut unknown = HashSet::new();
        for (conversation, sender) in conversations.iter().zip(senders) {
            if !self.members.contains(&(*conversation, *sender)) {
                unknown.insert(*conversation);
            }
        }
        conversations
            .iter()
            .map(|conversation| {
                self.floors
                    .get(conversation)
                    .copied()
                    .filter(|_| !unknown.contains(conversation))
            })
            .collect()
    }

    /// Takes in a batch that was stored whole: its messages' event ids
    /// run on from the counter, their sequences are their conversations' last ones, and
    /// their senders are members. What was known before stays only if the batch's first
    /// event id follows the counter's last known value: no other writer came between.
    fn learned(mut self, stored: &[Stored]) -> Self {
        let ids = stored.iter().map(|s| s.row.event_id);
        let (Some(first), Some(last)) = (ids.clone().min(), ids.max()) else {
            return Self::default();
        };
        if self.counter != Some(first - 1) || self.members.len() > MAX_KNOWN {
            self.floors.clear();
            self.members.clear();
        }
        for Stored { row, .. } in stored {
            let floor = self.floors.entry(row.conversation_id).or_default();
            *floor = (*floor).max(row.sequence);
            self.members.insert((row.conversation_id, row.sender_id));
        }
        self.counter = Some(last);
        self
    }
}

/// Each send's place among the batch's sends to its conversation, counting from 1 in the
/// batch's order: the offset of its sequence number from the conversation's last one when
/// the whole batch is stored.
fn places(conversations: &[Uuid]) -> Vec<i32> {
    let mut counts: HashMap<Uuid, i32> = HashMap::new();
    conversations
        .iter()
        .map(|conversation| {
            let count = counts.entry(*conversation).or_default();
            *count += 1;
            *count
        })
        .collect()
}

/// The batch's new messages as the live feed hands them out, in event order.
fn deliveries(sends: &[Send], stored: &[Stored]) -> Vec<Delivery> {
    let bodies: HashMap<Uuid, &str> = sends.iter().map(|s| (s.id, s.body.as_str())).collect();
    let mut deliveries: Vec<Delivery> = stored
        .iter()
        .filter(|s| s.inserted)
        .filter_map(|Stored { row, .. }| {
            let body = (*bodies.get(&row.id)?).to_owned();
            Some(Delivery {
                event: row.creation(),
                message: Some(row.view(body)),
            })
        })
        .collect();
    deliveries.sort_unstable_by_key(|d| d.event.id);
    deliveries
}

/// What became of each send: its new message, the earlier message of a retry, or an error.
fn fates(sends: &[Send], stored: Vec<Stored>) -> Vec<Result<MessageRow, Error>> {
    let mut new = HashMap::new();
    let mut earlier = HashMap::new();
    for Stored { inserted, row, .. } in stored {
        if inserted {
            new.insert(row.id, row);
        } else if let Some(request_id) = row.request_id {
            earlier.insert((row.sender_id, request_id), row);
        }
    }
    // The first send with each sender and request id, by that key.
    let mut first: HashMap<(Uuid, Uuid), &Send> = HashMap::new();
    sends
        .iter()
        .map(|send| {
            let key = (send.sender, send.request_id);
            let first = *first.entry(key).or_insert(send);
            let row = new.get(&first.id).or_else(|| earlier.get(&key));
            match row {
                Some(row) if row.conversation_id == send.conversation => Ok(row.clone()),
                Some(_) => Err(Error::RequestIdConflict),
                // Not a member, or no such conversation: the same answer (no existence oracle).
                None => Err(Error::NotFound("conversation")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    /// A send's place counts the sends to its own conversation only, in the batch's order.
    #[test]
    fn places_count_within_each_conversation() {
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(super::places(&[a, b, a, a, b]), vec![1, 1, 2, 3, 2]);
        assert!(super::places(&[]).is_empty());
    }

    /// The committers, and the connections they open, run off the request runtime: a commit's
    /// answer from PostgreSQL does not wait behind request tasks.
    #[tokio::test]
    async fn committers_run_on_a_thread_of_their_own() {
        let on = super::commit_thread()
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await;
        assert_eq!(on.ok().flatten().as_deref(), Some("hafen-commit"));
        assert_ne!(
            std::thread::current().name(),
            Some("hafen-commit"),
            "the test itself runs elsewhere"
        );
    }
}
