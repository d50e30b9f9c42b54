//! What wakes visitors' streams: per tenant with visitor streams in this process, one watcher
//! reads the tenant's log after what it saw last — woken by the tenant's event channel
//! ([`crate::wakes`]), and every poll interval as a safety net for a missed wake-up (one query
//! per tenant) — and wakes only the streams whose chat changed (and, on any change, those of
//! visits without a chat yet). A thousand idle streams cost one
//! query per tenant and interval, not a thousand; a message wakes its own chat's stream.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use hafen_store::prepared::{Statement, bind};
use hafen_store::schema::event_counter;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::Service;
use crate::error::Error;

/// The conversations with log entries after `$1`, each with its newest.
const CHANGED: &str = "\
    SELECT conversation_id, max(id) AS last FROM ( \
        SELECT conversation_id, event_id AS id FROM messages WHERE event_id > $1 \
        UNION ALL \
        SELECT conversation_id, id FROM events WHERE id > $1 \
    ) log GROUP BY conversation_id";

#[derive(QueryableByName)]
struct Changed {
    #[diesel(sql_type = SqlUuid)]
    conversation_id: Uuid,
    #[diesel(sql_type = BigInt)]
    last: i64,
}

/// One stream's wake-up: notified when its chat changed.
#[derive(Default)]
pub struct StreamWake {
    pub notify: Notify,
    /// The stream's chat, once it has one.
    conversation: Mutex<Option<Uuid>>,
}

impl StreamWake {
    /// Tells the watcher which chat the stream follows.
    pub fn follow(&self, conversation: Uuid) {
        if let Ok(mut slot) = self.conversation.lock() {
            *slot = Some(conversation);
        }
    }

    /// Whether a change of the chats in `changed` concerns the stream: its own chat's, or,
    /// while it has none, any (its chat may just have opened).
    fn wants(&self, changed: &Changes) -> bool {
        match changed {
            Changes::Everything => true,
            Changes::Chats(changed) => match self.conversation.lock() {
                Ok(slot) => match *slot {
                    Some(conversation) => changed.contains(&conversation),
                    None => !changed.is_empty(),
                },
                Err(_) => true,
            },
        }
    }
}

/// What a read of the log found.
enum Changes {
    /// The chats changed since the last read.
    Chats(HashSet<Uuid>),
    /// The first read, which only learns where the log stands: the streams read their chats
    /// once, for a change committed between their first read and the watcher's.
    Everything,
}

/// The tenants watched here and their streams.
#[derive(Default)]
pub struct Watches {
    tenants: Mutex<HashMap<Uuid, Vec<Weak<StreamWake>>>>,
}

impl Watches {
    /// Registers a stream of `tenant`, starting the tenant's watcher if it has none; the
    /// stream is forgotten when the returned wake is dropped.
    pub fn register(service: &Arc<Service>, tenant: Uuid) -> Arc<StreamWake> {
        let wake = Arc::new(StreamWake::default());
        let start = match service.watches.tenants.lock() {
            Ok(mut tenants) => {
                let streams = tenants.entry(tenant).or_default();
                streams.push(Arc::downgrade(&wake));
                streams.len() == 1
            }
            Err(_) => false,
        };
        if start {
            let service = Arc::clone(service);
            tokio::spawn(async move { watch(service, tenant).await });
        }
        wake
    }

    /// Wakes the live streams of `tenant` that `changed` concerns; false when none is left
    /// (the watcher is then forgotten, and the next stream starts a new one).
    fn wake(&self, tenant: Uuid, changed: &Changes) -> bool {
        let Ok(mut tenants) = self.tenants.lock() else {
            return false;
        };
        let Some(streams) = tenants.get_mut(&tenant) else {
            return false;
        };
        streams.retain(|stream| match stream.upgrade() {
            Some(stream) => {
                if stream.wants(changed) {
                    stream.notify.notify_waiters();
                }
                true
            }
            None => false,
        });
        if streams.is_empty() {
            tenants.remove(&tenant);
            return false;
        }
        true
    }
}

/// The watcher of `tenant`: runs while the tenant has streams here.
async fn watch(service: Arc<Service>, tenant: Uuid) {
    let poll = service.stream_poll;
    let registration = service.wakes.register(tenant);
    let mut last: Option<i64> = None;
    loop {
        // Enabled before the read: a change committed during it wakes the wait.
        let woken = registration.notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let changed = match changes(&service, tenant, last).await {
            Ok((changed, newest)) => {
                let changed = match last {
                    Some(_) => Changes::Chats(changed),
                    None => Changes::Everything,
                };
                last = Some(newest);
                changed
            }
            Err(err) => {
                tracing::debug!(error = %err, "the tenant's log was not read; polling on");
                Changes::Chats(HashSet::new())
            }
        };
        if !service.watches.wake(tenant, &changed) {
            return;
        }
        tokio::select! {
            () = &mut woken => {}
            () = tokio::time::sleep(poll) => {}
        }
    }
}

/// The chats changed after `last` (none at the first read, which only finds where the log
/// stands) and the newest entry seen.
async fn changes(
    service: &Service,
    tenant: Uuid,
    last: Option<i64>,
) -> Result<(HashSet<Uuid>, i64), Error> {
    service
        .scoped(tenant, move |conn| {
            Box::pin(async move {
                let Some(last) = last else {
                    use diesel::QueryDsl as _;
                    let head: i64 = event_counter::table
                        .select(event_counter::last_id)
                        .first(conn)
                        .await?;
                    return Ok((HashSet::new(), head));
                };
                let rows: Vec<Changed> = Statement::new(CHANGED, (bind::<BigInt, _>(last),))
                    .load(conn)
                    .await?;
                let newest = rows.iter().map(|r| r.last).max().unwrap_or(last);
                Ok((
                    rows.into_iter().map(|r| r.conversation_id).collect(),
                    newest,
                ))
            })
        })
        .await
}

/// How long a stream waits without a wake-up before it reads its chat anyway: a safety net
/// only, the watcher polls for it.
pub const STREAM_SAFETY_NET: Duration = Duration::from_secs(30);
