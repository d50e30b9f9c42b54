//! Live delivery and resumable streams (BX4).
//!
//! Every write appends to the tenant's event log, whose ids follow commit order and leave no
//! gap. After a commit, the writer wakes this process's feed of the tenant and publishes a
//! message on the tenant's sharded Redis channel (`SPUBLISH <prefix>events:{<tenant>}`),
//! which wakes the feeds of every other replica: each replica subscribes (`SSUBSCRIBE`) to the
//! channels of the tenants it has subscribers for, and only to those, so a Redis cluster
//! spreads the tenants over its shards. A feed reads the new events once from the database,
//! decrypts their messages once, and hands them to its subscribers; it also polls, so
//! delivery goes on when Redis is down.
//!
//! The group commit hands its new messages to this process's feed itself, in clear, when they
//! directly follow what the feed has handed out; the feed then reads nothing. The message it
//! publishes carries the last event id, so this process's own feed is not woken by its echo.
//!
//! A subscription first registers with the feed, then replays the log after its cursor from
//! the database, then follows the feed, skipping what the replay already sent: no gap, no
//! duplicate. When the server shuts down, every stream ends with UNAVAILABLE, which tells a
//! client to resubscribe with its last cursor (on another replica).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hafen_authn::{Principal, Redis};
use hafen_store::Databases;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::Error;
use crate::keys::Bodies;
use crate::repo;
use crate::rows::{EventRow, MessageView};

mod channels;
mod reader;
mod subscription;

use reader::Reader;
pub use subscription::{Change, FeedItem};

/// Events read from the database per query.
const BATCH: i64 = 500;

/// How long a feed keeps its connection without a wake.
const LINGER: Duration = Duration::from_millis(50);

/// One event as a feed hands it out.
#[derive(Debug)]
pub struct Delivery {
    /// The event.
    pub event: EventRow,
    /// The message it names, decrypted (absent for membership events or purged messages).
    pub message: Option<MessageView>,
}

/// The process's feeds, one per tenant with local subscribers.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Option<Redis>,
    poll: Duration,
    reader: Reader,
    feeds: Feeds,
    /// Tenants whose channel is to be published on, with the last event id when known, for
    /// the publisher task.
    publish: OnceLock<mpsc::UnboundedSender<(Uuid, Option<i64>)>>,
    /// Cancelled when the server shuts down.
    closing: CancellationToken,
    /// The runtime the hub was made on, where its publisher runs (commits come from the
    /// commit thread).
    runtime: Option<tokio::runtime::Handle>,
}

struct Feed {
    tenant: Uuid,
    sender: broadcast::Sender<Arc<Delivery>>,
    wake: Notify,
    subscribers: AtomicUsize,
    /// The id of the last event handed out; locked while events are handed out, so they
    /// go out once each, in order, whoever hands them out.
    position: Mutex<i64>,
}

impl Feed {
    fn position(&self) -> std::sync::MutexGuard<'_, i64> {
        self.position
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands out `deliveries` (in event order), skipping those already handed out. Events
    /// read from the log go out as they are (ids are dense, but retention may have removed
    /// some); a commit's go out only if they directly follow the last event handed out
    /// (`follow`): false otherwise, as events before them must be read first.
    fn hand_out(&self, deliveries: Vec<Delivery>, follow: bool) -> bool {
        let mut position = self.position();
        if follow
            && deliveries
                .first()
                .is_some_and(|d| d.event.id > *position + 1)
        {
            return false;
        }
        for delivery in deliveries {
            if delivery.event.id > *position {
                *position = delivery.event.id;
                let _ = self.sender.send(Arc::new(delivery));
            }
        }
        true
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// A subscriber's receiver of its feed, and its registration.
type Joined = (broadcast::Receiver<Arc<Delivery>>, Registration);

/// Keeps a subscriber counted on its feed.
struct Registration {
    feed: Arc<Feed>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.feed.subscribers.fetch_sub(1, Ordering::SeqCst);
        self.feed.wake.notify_one();
    }
}

impl Hub {
    /// A hub that reads the log from `databases`, opens bodies with `bodies`, wakes other
    /// replicas through `redis` and polls every `poll`.
    pub fn new(redis: Option<Redis>, poll: Duration, databases: Databases, bodies: Bodies) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                poll,
                reader: Reader { databases, bodies },
                feeds: Feeds::default(),
                publish: OnceLock::new(),
                closing: CancellationToken::new(),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// Ends every stream with UNAVAILABLE (at shutdown); new subscriptions are refused.
    pub fn close(&self) {
        self.inner.closing.cancel();
    }

    /// Wakes the feeds of `tenant`, here at once and (through Redis) on every replica. It
    /// does not wait for Redis: a publisher task sends the notifications, one per tenant for
    /// all the wakes that came while it was busy. A Redis failure is logged: the other
    /// replicas then pick the events up by polling.
    pub fn wake(&self, tenant: Uuid) {
        if let Some(feed) = self.feed(tenant) {
            feed.wake.notify_one();
        }
        self.notify(tenant, None);
    }

    /// After a group commit whose last event is `last`: hands its new messages (made by
    /// `deliveries`, in event order, only if this process has a feed of `tenant`) to the
    /// feed when they directly follow what it handed out, and wakes it to read them
    /// otherwise; wakes the other replicas as [`Hub::wake`] does.
    pub(crate) fn committed(
        &self,
        tenant: Uuid,
        last: Option<i64>,
        deliveries: impl FnOnce() -> Vec<Delivery>,
    ) {
        if let Some(feed) = self.feed(tenant)
            && !feed.hand_out(deliveries(), true)
        {
            feed.wake.notify_one();
        }
        self.notify(tenant, last);
    }

    fn feed(&self, tenant: Uuid) -> Option<Arc<Feed>> {
        self.inner.feeds.map.lock().ok()?.get(&tenant).cloned()
    }

    /// Registers a subscriber with the feed of `tenant`, starting the feed when it is the
    /// first; everything the feed reads from now on reaches the returned receiver.
    async fn register(&self, tenant: Uuid) -> Result<Joined, Error> {
        if let Some((joined, _)) = self.inner.feeds.join(tenant, None)? {
            return Ok(joined);
        }
        let position = self.inner.reader.head(tenant).await?;
        let (joined, started) = self
            .inner
            .feeds
            .join(tenant, Some(position))?
            .ok_or(Error::Bug("feed not started"))?;
        if started {
            tokio::spawn(run_feed(self.clone(), joined.1.feed.clone()));
            self.inner.feeds.changed.notify_one();
        }
        Ok(joined)
    }

    /// Opens a subscription for `caller` after `cursor` (`None`: from now on): what they
    /// may see of the log, replayed from the database and then live. The stream ends with an
    /// error (UNAVAILABLE when the server shuts down); the client resubscribes with the last
    /// cursor it got.
    pub async fn subscribe(
        &self,
        caller: Principal,
        cursor: Option<i64>,
    ) -> Result<mpsc::Receiver<Result<FeedItem, Error>>, Error> {
        if self.inner.closing.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let tenant = caller.tenant_id;
        let (live, registration) = self.register(tenant).await?;
        let reader = self.inner.reader.clone();
        let start = match cursor {
            Some(cursor) => cursor,
            None => reader.head(tenant).await?,
        };
        let mine: HashSet<Uuid> = reader
            .memberships(tenant, caller.user_id)
            .await?
            .into_iter()
            .collect();
        let (out, receiver) = mpsc::channel(256);
        let closing = self.inner.closing.clone();
        tokio::spawn(subscription::run(
            subscription::Subscription::new(reader, caller, mine, start, out),
            live,
            registration,
            closing,
        ));
        Ok(receiver)
    }
}

/// The process's feeds by tenant.
#[derive(Default)]
struct Feeds {
    map: Mutex<HashMap<Uuid, Arc<Feed>>>,
    /// Wakes the Redis listener when the set of feeds changed.
    changed: Notify,
}

impl Feeds {
    /// Joins the feed of `tenant`, making one at `start` when there is none (and whether it
    /// did). Finding and counting happen under the feeds' lock, as does a feed's end
    /// ([`Feeds::retire`]): a feed never ends between being found and being joined.
    fn join(&self, tenant: Uuid, start: Option<i64>) -> Result<Option<(Joined, bool)>, Error> {
        let mut feeds = self
            .map
            .lock()
            .map_err(|_| Error::Bug("hub lock poisoned"))?;
        let (feed, started) = match (feeds.get(&tenant), start) {
            (Some(feed), _) => (feed.clone(), false),
            (None, None) => return Ok(None),
            (None, Some(position)) => {
                let (sender, _) = broadcast::channel(1024);
                let feed = Arc::new(Feed {
                    tenant,
                    sender,
                    wake: Notify::new(),
                    subscribers: AtomicUsize::new(0),
                    position: Mutex::new(position),
                });
                feeds.insert(tenant, feed.clone());
                (feed, true)
            }
        };
        feed.subscribers.fetch_add(1, Ordering::SeqCst);
        let receiver = feed.sender.subscribe();
        Ok(Some(((receiver, Registration { feed }), started)))
    }

    /// Ends `feed` if nobody is subscribed to it (under the feeds' lock, see [`Feeds::join`]).
    fn retire(&self, feed: &Feed) -> bool {
        let Ok(mut feeds) = self.map.lock() else {
            return false;
        };
        if feed.subscribers.load(Ordering::SeqCst) != 0 {
            return false;
        }
        feeds.remove(&feed.tenant);
        self.changed.notify_one();
        true
    }
}

/// Reads new events of one tenant and hands them out, until nobody listens. While wakes keep
/// coming, the feed keeps its connection (each read is then one round trip); it gives it back
/// to the pool after `LINGER` without one.
async fn run_feed(hub: Hub, feed: Arc<Feed>) {
    let reader = &hub.inner.reader;
    let mut held: Option<hafen_store::PooledConnection> = None;
    loop {
        let wait = if held.is_some() {
            LINGER
        } else {
            hub.inner.poll
        };
        let woken = tokio::select! {
            () = feed.wake.notified() => true,
            () = tokio::time::sleep(wait) => false,
        };
        if !woken && held.take().is_some() {
            continue;
        }
        if feed.subscribers.load(Ordering::SeqCst) == 0 {
            if hub.inner.feeds.retire(&feed) {
                return;
            }
            continue;
        }
        // Until a read comes back short: a wake during a read is kept by `feed.wake`.
        loop {
            let conn = match held.as_mut() {
                Some(conn) => conn,
                None => match repo::connection(&reader.databases, feed.tenant).await {
                    Ok(conn) => held.insert(conn),
                    Err(err) => {
                        tracing::warn!(tenant_id = %feed.tenant, error = %err, "feed could not read events");
                        break;
                    }
                },
            };
            let after = *feed.position();
            let deliveries = match reader
                .events_after_on(conn, feed.tenant, after, None, BATCH)
                .await
            {
                Ok(deliveries) => deliveries,
                Err(err) => {
                    held = None;
                    tracing::warn!(tenant_id = %feed.tenant, error = %err, "feed could not read events");
                    break;
                }
            };
            let complete = (deliveries.len() as i64) < BATCH;
            if deliveries.is_empty() {
                break;
            }
            // What a commit handed out since `after` is skipped.
            feed.hand_out(deliveries, false);
            if complete {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn feed_at(position: i64) -> (Feed, broadcast::Receiver<Arc<Delivery>>) {
        let (sender, receiver) = broadcast::channel(16);
        let feed = Feed {
            tenant: Uuid::nil(),
            sender,
            wake: Notify::new(),
            subscribers: AtomicUsize::new(1),
            position: Mutex::new(position),
        };
        (feed, receiver)
    }

    fn events(ids: std::ops::RangeInclusive<i64>) -> Vec<Delivery> {
        ids.map(|id| Delivery {
            event: EventRow {
                id,
                conversation_id: Uuid::nil(),
                kind: crate::rows::event_kind::CREATED.into(),
                message_id: None,
                detail: None,
                created_at: chrono::Utc::now(),
            },
            message: None,
        })
        .collect()
    }

    fn received(receiver: &mut broadcast::Receiver<Arc<Delivery>>) -> Vec<i64> {
        std::iter::from_fn(|| receiver.try_recv().ok().map(|d| d.event.id)).collect()
    }

    #[test]
    fn bx4_a_commit_is_handed_out_only_right_after_what_the_feed_handed_out() {
        let (feed, mut receiver) = feed_at(5);
        // Event 6 (another writer's) is not read yet: the commit of 7 and 8 must wait.
        assert!(!feed.hand_out(events(7..=8), true));
        assert_eq!(received(&mut receiver), Vec::<i64>::new());
        assert_eq!(*feed.position(), 5);
        // Read from the log: 6 to 8, once each, in order.
        assert!(feed.hand_out(events(6..=8), false));
        assert_eq!(received(&mut receiver), [6, 7, 8]);
        // The commit of 9 follows; a read that overlaps it hands out only what is new.
        assert!(feed.hand_out(events(9..=9), true));
        assert!(feed.hand_out(events(8..=10), false));
        assert_eq!(received(&mut receiver), [9, 10]);
        // A commit the feed read first is not handed out again.
        assert!(feed.hand_out(events(10..=10), true));
        assert_eq!(received(&mut receiver), Vec::<i64>::new());
        assert_eq!(*feed.position(), 10);
    }

    #[test]
    fn bx4_the_log_is_handed_out_across_events_retention_removed() {
        let (feed, mut receiver) = feed_at(5);
        assert!(feed.hand_out(events(9..=10), false));
        assert_eq!(received(&mut receiver), [9, 10]);
    }

    #[test]
    fn bx4_a_feed_ends_only_when_nobody_joined_it() {
        let hub = Feeds::default();
        let tenant = Uuid::new_v4();
        assert!(hub.join(tenant, None).unwrap().is_none());
        let ((_, first), started) = hub.join(tenant, Some(7)).unwrap().unwrap();
        assert!(started);
        // A feed is counted from the moment it is found: a wake that comes before its first
        // subscriber is served (the Redis listener's, say) does not end it under them.
        assert!(!hub.retire(&first.feed));
        let ((_, second), started) = hub.join(tenant, None).unwrap().unwrap();
        assert!(!started);
        assert!(Arc::ptr_eq(&first.feed, &second.feed));
        let feed = first.feed.clone();
        drop(first);
        assert!(!hub.retire(&feed));
        drop(second);
        assert!(hub.retire(&feed));
        assert!(hub.join(tenant, None).unwrap().is_none());
    }
}
