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
use hafen_proto::messaging::v1 as pb;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::domain::Messaging;
use crate::error::Error;
use crate::rows::{EventRow, Membership, MessageView, event_kind};

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
    feeds: Mutex<HashMap<Uuid, Arc<Feed>>>,
    messaging: OnceLock<Messaging>,
    /// Wakes the Redis listener when the set of feeds changed.
    feeds_changed: Notify,
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
    /// A hub that wakes other replicas through `redis` and polls every `poll`.
    pub fn new(redis: Option<Redis>, poll: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                poll,
                feeds: Mutex::new(HashMap::new()),
                messaging: OnceLock::new(),
                feeds_changed: Notify::new(),
                publish: OnceLock::new(),
                closing: CancellationToken::new(),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// Connects the hub to the domain it reads events through (once, at start-up).
    pub fn attach(&self, messaging: Messaging) {
        let _ = self.inner.messaging.set(messaging);
    }

    /// Ends every stream with UNAVAILABLE (at shutdown); new subscriptions are refused.
    pub fn close(&self) {
        self.inner.closing.cancel();
    }

    /// The tenant's sharded channel. The braces make the tenant id the cluster hash tag.
    fn channel(redis: &Redis, tenant: Uuid) -> String {
        redis.key(&format!("events:{{{}}}", tenant.simple()))
    }

    /// The tenant named by a channel, if it is one of ours.
    fn tenant_of(redis: &Redis, channel: &[u8]) -> Option<Uuid> {
        let channel = std::str::from_utf8(channel).ok()?;
        let id = channel
            .strip_prefix(&redis.key("events:{"))?
            .strip_suffix('}')?;
        Uuid::try_parse(id).ok()
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

    /// Publishes on `tenant`'s channel, through the publisher task.
    fn notify(&self, tenant: Uuid, last: Option<i64>) {
        let Some(redis) = &self.inner.redis else {
            return;
        };
        let queue = self.inner.publish.get_or_init(|| {
            let (queue, pending) = mpsc::unbounded_channel();
            let publisher = Self::publish(redis.clone(), pending);
            match &self.inner.runtime {
                Some(runtime) => drop(runtime.spawn(publisher)),
                None => drop(tokio::spawn(publisher)),
            }
            queue
        });
        let _ = queue.send((tenant, last));
    }

    /// Publishes on the channels of the tenants woken, coalescing the wakes that queue up
    /// while a round of notifications is on its way. The message is the last event id when
    /// every coalesced wake knew it (the highest), and empty otherwise.
    async fn publish(redis: Redis, mut pending: mpsc::UnboundedReceiver<(Uuid, Option<i64>)>) {
        let mut tenants: HashMap<Uuid, Option<i64>> = HashMap::new();
        let add = |tenants: &mut HashMap<Uuid, Option<i64>>, (tenant, last)| {
            tenants
                .entry(tenant)
                .and_modify(|known| *known = known.zip(last).map(|(a, b)| a.max(b)))
                .or_insert(last);
        };
        while let Some(woken) = pending.recv().await {
            add(&mut tenants, woken);
            while let Ok(woken) = pending.try_recv() {
                add(&mut tenants, woken);
            }
            let mut pipe = redis::pipe();
            for (tenant, last) in tenants.drain() {
                pipe.cmd("SPUBLISH")
                    .arg(Self::channel(&redis, tenant))
                    .arg(last.map(|id| id.to_string()).unwrap_or_default())
                    .ignore();
            }
            let published: redis::RedisResult<()> = pipe.query_async(&mut redis.conn()).await;
            if let Err(err) = published {
                tracing::debug!(error = %err, "event notification not published; replicas poll");
            }
        }
    }

    fn feed(&self, tenant: Uuid) -> Option<Arc<Feed>> {
        self.inner.feeds.lock().ok()?.get(&tenant).cloned()
    }

    /// Follows, for the life of the process, the sharded channels of the tenants this
    /// process has feeds for. Subscriptions are reconciled with the feeds whenever a feed
    /// starts or ends, and redone after Redis comes back (meanwhile, feeds poll).
    pub fn listen(&self) -> Option<tokio::task::JoinHandle<()>> {
        let redis = self.inner.redis.clone()?;
        let hub = self.clone();
        Some(tokio::spawn(async move {
            if let Err(err) = hub.follow(&redis).await {
                tracing::warn!(error = %err, "event channels unavailable; streams poll");
            }
        }))
    }

    async fn follow(&self, redis: &Redis) -> redis::RedisResult<()> {
        let info = redis.client().get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let (pushes, mut received) = mpsc::unbounded_channel::<PushInfo>();
        let config = ConnectionManagerConfig::new()
            .set_push_sender(pushes)
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1);
        let mut conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let mut subscribed: HashSet<Uuid> = HashSet::new();
        loop {
            let wanted: HashSet<Uuid> = match self.inner.feeds.lock() {
                Ok(feeds) => feeds.keys().copied().collect(),
                Err(_) => return Ok(()),
            };
            let mut retry = false;
            for tenant in wanted.difference(&subscribed).copied().collect::<Vec<_>>() {
                let done: redis::RedisResult<()> = redis::cmd("SSUBSCRIBE")
                    .arg(Self::channel(redis, tenant))
                    .query_async(&mut conn)
                    .await;
                match done {
                    Ok(()) => {
                        subscribed.insert(tenant);
                        // Whatever was published before the subscription is read now.
                        if let Some(feed) = self.feed(tenant) {
                            feed.wake.notify_one();
                        }
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "event channel not subscribed; the feed polls");
                        retry = true;
                        break;
                    }
                }
            }
            for tenant in subscribed.difference(&wanted).copied().collect::<Vec<_>>() {
                let done: redis::RedisResult<()> = redis::cmd("SUNSUBSCRIBE")
                    .arg(Self::channel(redis, tenant))
                    .query_async(&mut conn)
                    .await;
                if done.is_ok() {
                    subscribed.remove(&tenant);
                }
            }
            tokio::select! {
                () = self.inner.feeds_changed.notified() => {}
                () = tokio::time::sleep(self.inner.poll), if retry => {}
                push = received.recv() => match push {
                    Some(push) => self.on_push(redis, push, &mut subscribed),
                    None => return Ok(()),
                },
            }
            while let Ok(push) = received.try_recv() {
                self.on_push(redis, push, &mut subscribed);
            }
        }
    }

    fn on_push(&self, redis: &Redis, push: PushInfo, subscribed: &mut HashSet<Uuid>) {
        match push.kind {
            PushKind::SMessage => {
                let tenant = match push.data.first() {
                    Some(redis::Value::BulkString(channel)) => Self::tenant_of(redis, channel),
                    _ => None,
                };
                // The last event id, when the publisher knew it.
                let last = match push.data.get(1) {
                    Some(redis::Value::BulkString(last)) => std::str::from_utf8(last)
                        .ok()
                        .and_then(|last| last.parse::<i64>().ok()),
                    _ => None,
                };
                if let Some(feed) = tenant.and_then(|t| self.feed(t))
                    && last.is_none_or(|last| last > *feed.position())
                {
                    feed.wake.notify_one();
                }
            }
            // The connection is gone, and its subscriptions with it: subscribe again once
            // Redis answers.
            PushKind::Disconnection => subscribed.clear(),
            _ => {}
        }
    }

    /// Registers a subscriber with the feed of `tenant`, starting the feed when it is the
    /// first; everything the feed reads from now on reaches the returned receiver.
    async fn register(&self, tenant: Uuid) -> Result<Joined, Error> {
        let messaging = self
            .inner
            .messaging
            .get()
            .cloned()
            .ok_or_else(|| Error::Bug("hub not attached"))?;
        if let Some((joined, _)) = self.join(tenant, None)? {
            return Ok(joined);
        }
        let position = messaging.head(tenant).await?;
        let (joined, started) = self
            .join(tenant, Some(position))?
            .ok_or_else(|| Error::Bug("feed not started"))?;
        if started {
            tokio::spawn(run_feed(self.clone(), messaging, joined.1.feed.clone()));
            self.inner.feeds_changed.notify_one();
        }
        Ok(joined)
    }

    /// Joins the feed of `tenant`, making one at `start` when there is none (and whether it
    /// did). Finding and counting happen under the feeds' lock, as does a feed's end
    /// ([`Hub::retire`]): a feed never ends between being found and being joined.
    fn join(&self, tenant: Uuid, start: Option<i64>) -> Result<Option<(Joined, bool)>, Error> {
        let mut feeds = self
            .inner
            .feeds
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

    /// Ends `feed` if nobody is subscribed to it (under the feeds' lock, see [`Hub::join`]).
    fn retire(&self, feed: &Feed) -> bool {
        let Ok(mut feeds) = self.inner.feeds.lock() else {
            return false;
        };
        if feed.subscribers.load(Ordering::SeqCst) != 0 {
            return false;
        }
        feeds.remove(&feed.tenant);
        self.inner.feeds_changed.notify_one();
        true
    }

    /// Opens a subscription for `caller` after `cursor` (`None`: from now on).
    pub async fn subscribe(
        &self,
        messaging: Messaging,
        caller: Principal,
        cursor: Option<i64>,
    ) -> Result<mpsc::Receiver<Result<pb::SubscribeResponse, Status>>, Error> {
        if self.inner.closing.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let tenant = caller.tenant_id;
        let (live, registration) = self.register(tenant).await?;
        let start = match cursor {
            Some(cursor) => cursor,
            None => messaging.head(tenant).await?,
        };
        let mine: HashSet<Uuid> = messaging
            .memberships(tenant, caller.user_id)
            .await?
            .into_iter()
            .collect();
        let (out, receiver) = mpsc::channel(256);
        let closing = self.inner.closing.clone();
        tokio::spawn(async move {
            let _registration = registration;
            let mut subscription = Subscription {
                messaging,
                caller,
                mine,
                last: start,
                out,
            };
            let ended = tokio::select! {
                ended = subscription.run(live) => ended,
                () = closing.cancelled() => Err(Status::from(Error::ShuttingDown)),
            };
            if let Err(status) = ended {
                let _ = subscription.out.send(Err(status)).await;
            }
        });
        Ok(receiver)
    }
}

/// Reads new events of one tenant and hands them out, until nobody listens. While wakes keep
/// coming, the feed keeps its connection (each read is then one round trip); it gives it back
/// to the pool after `LINGER` without one.
async fn run_feed(hub: Hub, messaging: Messaging, feed: Arc<Feed>) {
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
            if hub.retire(&feed) {
                return;
            }
            continue;
        }
        // Until a read comes back short: a wake during a read is kept by `feed.wake`.
        loop {
            let conn = match held.as_mut() {
                Some(conn) => conn,
                None => match messaging.tenant_connection(feed.tenant).await {
                    Ok(conn) => held.insert(conn),
                    Err(err) => {
                        tracing::warn!(tenant_id = %feed.tenant, error = %err, "feed could not read events");
                        break;
                    }
                },
            };
            let after = *feed.position();
            let fetched = messaging
                .events_after_on(conn, feed.tenant, after, None, BATCH)
                .await;
            let (events, mut messages) = match fetched {
                Ok(fetched) => fetched,
                Err(err) => {
                    held = None;
                    tracing::warn!(tenant_id = %feed.tenant, error = %err, "feed could not read events");
                    break;
                }
            };
            let complete = (events.len() as i64) < BATCH;
            if events.is_empty() {
                break;
            }
            let deliveries = events
                .into_iter()
                .map(|event| {
                    let message = event.message_id.and_then(|id| messages.remove(&id));
                    Delivery { event, message }
                })
                .collect();
            // What a commit handed out since `after` is skipped.
            feed.hand_out(deliveries, false);
            if complete {
                break;
            }
        }
    }
}

/// One subscriber's state.
struct Subscription {
    messaging: Messaging,
    caller: Principal,
    mine: HashSet<Uuid>,
    last: i64,
    out: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
}

impl Subscription {
    async fn run(&mut self, mut live: broadcast::Receiver<Arc<Delivery>>) -> Result<(), Status> {
        self.replay().await?;
        self.emit(pb::subscribe_response::Event::CaughtUp(pb::CaughtUp {}))
            .await?;
        loop {
            match live.recv().await {
                Ok(delivery) => {
                    if delivery.event.id <= self.last {
                        continue;
                    }
                    self.deliver(&delivery.event, delivery.message.as_ref())
                        .await?;
                    self.last = delivery.event.id;
                }
                // Too far behind the feed: catch up from the database instead.
                Err(broadcast::error::RecvError::Lagged(_)) => self.replay().await?,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(hafen_platform::status::unavailable(
                        "the stream was closed; resubscribe with the last cursor",
                    ));
                }
            }
        }
    }

    async fn replay(&mut self) -> Result<(), Status> {
        loop {
            let (events, messages) = self
                .messaging
                .events_after(
                    self.caller.tenant_id,
                    self.last,
                    Some(self.caller.user_id),
                    BATCH,
                )
                .await?;
            let Some(last) = events.last().map(|e| e.id) else {
                return Ok(());
            };
            for event in &events {
                let message = event.message_id.and_then(|id| messages.get(&id));
                self.deliver(event, message).await?;
            }
            self.last = last;
        }
    }

    async fn deliver(
        &mut self,
        event: &EventRow,
        message: Option<&MessageView>,
    ) -> Result<(), Status> {
        use pb::subscribe_response::Event;
        let me = self.caller.user_id;
        if event.kind == event_kind::MEMBERSHIP {
            let detail: Membership = event
                .detail
                .clone()
                .and_then(|d| serde_json::from_value(d).ok())
                .unwrap_or_default();
            let involves_me = detail.added.contains(&me) || detail.removed.contains(&me);
            if !self.mine.contains(&event.conversation_id) && !involves_me {
                return Ok(());
            }
            if detail.added.contains(&me) {
                self.mine.insert(event.conversation_id);
            }
            let conversation = self
                .messaging
                .conversation_view(self.caller.tenant_id, event.conversation_id, me)
                .await?
                .map(|c| c.to_proto());
            self.emit_at(
                event.id,
                Event::MembershipChanged(pb::MembershipChanged {
                    conversation,
                    added_user_ids: detail.added.iter().map(Uuid::to_string).collect(),
                    removed_user_ids: detail.removed.iter().map(Uuid::to_string).collect(),
                    actor_user_id: detail.actor.map(|a| a.to_string()).unwrap_or_default(),
                    change_time: Some(hafen_platform::timestamp(event.created_at)),
                }),
            )
            .await?;
            if detail.removed.contains(&me) {
                self.mine.remove(&event.conversation_id);
            }
            return Ok(());
        }
        if !self.mine.contains(&event.conversation_id) {
            return Ok(());
        }
        let Some(message) = message else {
            return Ok(()); // purged by retention since
        };
        let message = message.to_proto();
        let payload = match event.kind.as_str() {
            event_kind::CREATED => Event::MessageCreated(message),
            event_kind::EDITED => Event::MessageEdited(message),
            _ => Event::MessageDeleted(message),
        };
        self.emit_at(event.id, payload).await
    }

    async fn emit(&mut self, event: pb::subscribe_response::Event) -> Result<(), Status> {
        self.emit_at(self.last, event).await
    }

    async fn emit_at(
        &mut self,
        cursor: i64,
        event: pb::subscribe_response::Event,
    ) -> Result<(), Status> {
        self.out
            .send(Ok(pb::SubscribeResponse {
                cursor: cursor.to_string(),
                event: Some(event),
            }))
            .await
            // The client went away: stop quietly.
            .map_err(|_| Status::cancelled("subscriber gone"))
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
                kind: event_kind::CREATED.into(),
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
        let hub = Hub::new(None, Duration::from_secs(1));
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
