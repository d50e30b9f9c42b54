//! Group commit of sends ([`hafen_store::commit`]): the sends of one tenant that arrive while
//! a commit is in flight are committed together, in one transaction with one WAL flush.
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

use futures::future::BoxFuture;
use hafen_store::commit::{Batches, Refused};
use hafen_store::{AsyncPgConnection, now};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::error::Error;
use crate::feed::{Delivery, Hub};
use crate::repo::{self, Batch};
use crate::rows::MessageRow;

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

/// The tenants' committers of sends ([`hafen_store::commit`]).
pub(crate) struct Committer(hafen_store::commit::Committer<Sends>);

/// How sends are stored in batches, and where committed ones go.
pub(crate) struct Sends {
    hub: Hub,
}

impl Committer {
    /// Committers queueing at most `capacity` sends each, storing through connections of
    /// `databases` (pools of their own, see [`hafen_store::commit::commit_thread`]) and
    /// handing what they stored to `hub`.
    pub(crate) fn new(databases: hafen_store::Databases, hub: Hub, capacity: usize) -> Self {
        Self(hafen_store::commit::Committer::new(
            databases,
            Sends { hub },
            capacity,
        ))
    }

    /// Queues `send` for `tenant` and waits for its commit: RESOURCE_EXHAUSTED OVERLOADED
    /// when the tenant's queue is full.
    pub async fn submit(
        &self,
        tenant: Uuid,
        send: impl FnOnce(oneshot::Sender<Result<MessageRow, Error>>) -> Send,
    ) -> Result<MessageRow, Error> {
        self.0
            .call(tenant, send)
            .await
            .map_err(|refused| match refused {
                Refused::Full => Error::Overloaded,
                Refused::Closed => Error::Unavailable("the commit thread"),
            })?
    }
}

impl Batches for Sends {
    type Item = Send;
    type State = Known;

    fn commit<'a>(
        &'a self,
        tenant: Uuid,
        conn: &'a AsyncPgConnection,
        known: &'a mut Known,
        batch: Vec<Send>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(commit(&self.hub, tenant, conn, known, batch))
    }

    fn unavailable(&self, tenant: Uuid, batch: Vec<Send>, err: &hafen_store::Error) {
        fail(tenant, batch, err, err.is_unavailable());
    }
}

/// Answers every send of `batch` for `err`: UNAVAILABLE when the database could not be
/// reached, went away or gave up on the batch for a reason a retry may not meet (a
/// serialization failure, a timeout), INTERNAL otherwise (a bug).
fn fail(tenant: Uuid, batch: Vec<Send>, err: &dyn std::fmt::Display, unavailable: bool) {
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
            fail(tenant, batch, &err, err.is_unavailable());
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
pub(crate) struct Known {
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
}
