//! Group commit of visitors' messages ([`hafen_store::commit`]): the messages of one tenant's
//! visitors that arrive while a commit is in flight are checked and stored together, by one
//! call of the tenant schema's `store_visitor_messages` (tenant migration `000007`), in one
//! transaction with one WAL flush; each is answered only after that commit, and the tenant's
//! feeds are woken once per batch.
//!
//! Only messages into a chat this process has seen the visit send into before come here
//! ([`KnownChats`]): the message is sealed for that chat before it is queued, and the call
//! checks again, under the visit's lock, everything a message needs (the token, the visit's
//! life, its chat, consent, required fields). When one message of a batch fails a check,
//! nothing of the batch is stored and each is answered `None`: its sender then sends it alone
//! (`Service::send_with_token`), which says why it was refused.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Mutex;

use diesel::sql_types::{Array, Bool, Bytea, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use futures::future::BoxFuture;
use hafen_authn::Redis;
use hafen_store::commit::{Batches, Refused};
use hafen_store::prepared::{Statement, bind};
use hafen_store::{AsyncPgConnection, now};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::chat::MessageRow;
use crate::error::Error;

/// One call of `store_visitor_messages` for a batch.
const STORE_BATCH: &str =
    "SELECT * FROM store_visitor_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// How a queued visitor's message is answered: the message stored (or, for a retry, the first
/// one), or `None` when its batch was refused and it is to be sent alone.
pub(crate) type Answer = Result<Option<MessageRow>, Error>;

/// A visitor's message, sealed for its chat and ready to store.
pub(crate) struct VisitorSend {
    pub id: Uuid,
    pub conversation: Uuid,
    pub visit: Uuid,
    /// The SHA-256 of the visitor token the message came with.
    pub token_sha256: Vec<u8>,
    /// Whether the widget needs consent to its current text for this message.
    pub needs_consent: bool,
    /// The widget's required pre-chat fields.
    pub required: Vec<String>,
    pub request_id: Uuid,
    pub sealed: Vec<u8>,
    pub masked: bool,
    pub reply: oneshot::Sender<Answer>,
}

/// The tenants' committers of visitors' messages.
pub(crate) struct Committer(hafen_store::commit::Committer<VisitorSends>);

/// How visitors' messages are stored in batches.
pub(crate) struct VisitorSends {
    /// Wakes the tenant's feeds (the agents' and the visitors' streams) after a batch.
    redis: Option<Redis>,
}

impl Committer {
    /// Committers queueing at most `capacity` messages each, storing through connections of
    /// `databases` (pools of their own) and waking feeds through `redis`.
    pub(crate) fn new(
        databases: hafen_store::Databases,
        redis: Option<Redis>,
        capacity: usize,
    ) -> Self {
        Self(hafen_store::commit::Committer::new(
            databases,
            VisitorSends { redis },
            capacity,
        ))
    }

    /// Queues `send` for `tenant` and waits for its answer: RESOURCE_EXHAUSTED OVERLOADED
    /// when the tenant's queue is full.
    pub(crate) async fn submit(
        &self,
        tenant: Uuid,
        send: impl FnOnce(oneshot::Sender<Answer>) -> VisitorSend,
    ) -> Answer {
        self.0
            .call(tenant, send)
            .await
            .map_err(|refused| match refused {
                Refused::Full => Error::Overloaded,
                Refused::Closed => Error::Unavailable("the commit thread"),
            })?
    }
}

impl Batches for VisitorSends {
    type Item = VisitorSend;
    type State = ();

    fn commit<'a>(
        &'a self,
        tenant: Uuid,
        conn: &'a AsyncPgConnection,
        _: &'a mut (),
        mut batch: Vec<VisitorSend>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match store_batch(conn, &mut batch).await {
                Ok(rows) => {
                    let ids: HashSet<Uuid> = batch.iter().map(|send| send.id).collect();
                    if rows.iter().any(|row| ids.contains(&row.id)) {
                        self.wake(tenant);
                    }
                    answer(batch, rows);
                    true
                }
                Err(err) if hafen_store::unavailable(&err) => {
                    tracing::warn!(tenant_id = %tenant, error = %err, sends = batch.len(), "visitor messages not committed");
                    for send in batch {
                        let _ = send.reply.send(Err(Error::Unavailable("the database")));
                    }
                    false
                }
                Err(err) => {
                    // Each is sent alone, and gets an answer of its own.
                    tracing::warn!(tenant_id = %tenant, error = %err, sends = batch.len(), "batch of visitor messages failed; sent one by one");
                    for send in batch {
                        let _ = send.reply.send(Ok(None));
                    }
                    false
                }
            }
        })
    }

    fn unavailable(&self, tenant: Uuid, batch: Vec<VisitorSend>, err: &hafen_store::Error) {
        tracing::warn!(tenant_id = %tenant, error = %err, sends = batch.len(), "no connection for visitor messages");
        for send in batch {
            let _ = send.reply.send(Err(Error::Unavailable("the database")));
        }
    }
}

impl VisitorSends {
    /// Wakes the feeds of `tenant` on every replica; when Redis is down they poll.
    fn wake(&self, tenant: Uuid) {
        if let Some(redis) = self.redis.clone() {
            tokio::spawn(async move {
                if let Err(err) = redis.publish_events(tenant).await {
                    tracing::debug!(error = %err, "event notification not published; feeds poll");
                }
            });
        }
    }
}

/// Stores `batch` in one call, each message with the same visit and request id once: the
/// rows stored or, for retries, the first ones; none when a message failed a check. The
/// ciphertexts, token hashes and required keys go to the call (taken, not copied): what is
/// answered afterwards needs only ids.
async fn store_batch(
    conn: &AsyncPgConnection,
    batch: &mut [VisitorSend],
) -> diesel::QueryResult<Vec<MessageRow>> {
    let mut seen = HashSet::new();
    let mut first: Vec<&mut VisitorSend> = batch
        .iter_mut()
        .filter(|send| seen.insert((send.visit, send.request_id)))
        .collect();
    let (required_visits, required_keys): (Vec<Uuid>, Vec<String>) = first
        .iter_mut()
        .flat_map(|send| {
            let visit = send.visit;
            std::mem::take(&mut send.required)
                .into_iter()
                .map(move |key| (visit, key))
        })
        .unzip();
    let hashes: Vec<Vec<u8>> = first
        .iter_mut()
        .map(|s| std::mem::take(&mut s.token_sha256))
        .collect();
    let sealed: Vec<Vec<u8>> = first
        .iter_mut()
        .map(|s| std::mem::take(&mut s.sealed))
        .collect();
    Statement::new(
        STORE_BATCH,
        (
            bind::<Array<SqlUuid>, _>(first.iter().map(|s| s.id).collect::<Vec<_>>()),
            bind::<Array<SqlUuid>, _>(first.iter().map(|s| s.conversation).collect::<Vec<_>>()),
            bind::<Array<SqlUuid>, _>(first.iter().map(|s| s.visit).collect::<Vec<_>>()),
            bind::<Array<Bytea>, _>(hashes),
            bind::<Array<Bool>, _>(first.iter().map(|s| s.needs_consent).collect::<Vec<_>>()),
            bind::<Array<SqlUuid>, _>(required_visits),
            bind::<Array<Text>, _>(required_keys),
            bind::<Array<SqlUuid>, _>(first.iter().map(|s| s.request_id).collect::<Vec<_>>()),
            bind::<Array<Bytea>, _>(sealed),
            bind::<Array<Bool>, _>(first.iter().map(|s| s.masked).collect::<Vec<_>>()),
            bind::<Timestamptz, _>(now()),
        ),
    )
    .load::<MessageRow>(&mut &*conn)
    .await
}

/// Answers each message of `batch` from the `rows` its call returned.
fn answer(batch: Vec<VisitorSend>, rows: Vec<MessageRow>) {
    let mut by_id: HashMap<Uuid, MessageRow> = HashMap::new();
    let mut by_request: HashMap<(Uuid, Uuid), MessageRow> = HashMap::new();
    for row in rows {
        if let Some(request_id) = row.request_id {
            by_request.insert((row.sender_id, request_id), row.clone());
        }
        by_id.insert(row.id, row);
    }
    for send in batch {
        // A message's own row, else the one stored for its visit and request id (a retry, or
        // a repeat within the batch).
        let row = by_id
            .get(&send.id)
            .or_else(|| by_request.get(&(send.visit, send.request_id)))
            .cloned();
        let _ = send.reply.send(Ok(row));
    }
}

/// Most visits whose chat a process remembers; the least recently used go first.
const KNOWN_CHATS: NonZeroUsize = NonZeroUsize::new(100_000).unwrap();

/// The chats this process has seen visits send into, under the hash of the token they sent
/// with: a message with the same token goes to its visit's chat through the committer. What
/// is remembered only picks the way; the call checks it again.
pub(crate) struct KnownChats(Mutex<lru::LruCache<Uuid, (Vec<u8>, Uuid)>>);

impl Default for KnownChats {
    fn default() -> Self {
        Self(Mutex::new(lru::LruCache::new(KNOWN_CHATS)))
    }
}

impl KnownChats {
    /// The chat of `visit` when it was seen sending with the token hashed `token_sha256`.
    pub(crate) fn get(&self, visit: Uuid, token_sha256: &[u8]) -> Option<Uuid> {
        let mut known = self.0.lock().ok()?;
        let (hash, chat) = known.get(&visit)?;
        (hash.as_slice() == token_sha256).then_some(*chat)
    }

    /// Remembers that `visit` sent into `chat` with the token hashed `token_sha256`.
    pub(crate) fn remember(&self, visit: Uuid, token_sha256: Vec<u8>, chat: Uuid) {
        if let Ok(mut known) = self.0.lock() {
            known.put(visit, (token_sha256, chat));
        }
    }

    /// Forgets `visit` (its messages are checked one by one again).
    pub(crate) fn forget(&self, visit: Uuid) {
        if let Ok(mut known) = self.0.lock() {
            known.pop(&visit);
        }
    }

    /// How many visits' chats are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map(|known| known.len()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    /// A chat is known only with the token it was remembered under, until it is forgotten.
    #[test]
    fn a_known_chat_needs_the_same_token() {
        let known = super::KnownChats::default();
        let (visit, chat) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(known.get(visit, b"a"), None);
        known.remember(visit, b"a".to_vec(), chat);
        assert_eq!(known.get(visit, b"a"), Some(chat));
        assert_eq!(known.get(visit, b"b"), None, "another token");
        known.forget(visit);
        assert_eq!(known.get(visit, b"a"), None);
        assert_eq!(known.len(), 0);
    }
}
