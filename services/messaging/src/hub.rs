//! Live delivery and resumable streams (BX4).
//!
//! Every write appends to the tenant's event log, whose ids follow commit order. After a
//! commit, the writer wakes this process's feed of the tenant and publishes an empty message
//! on the tenant's sharded Redis channel (`SPUBLISH <prefix>events:{<tenant>}`), which wakes
//! the feeds of every other replica: each replica subscribes (`SSUBSCRIBE`) to the channels of
//! the tenants it has subscribers for, and only to those, so a Redis cluster spreads the
//! tenants over its shards. A feed reads the new events once from the database, decrypts
//! their messages once, and hands them to its subscribers; it also polls, so delivery goes on
//! when Redis is down.
//!
//! A subscription first registers with the feed, then replays the log after its cursor from
//! the database, then follows the feed, skipping what the replay already sent: no gap, no
//! duplicate. When the server shuts down, every stream ends with UNAVAILABLE, which tells a
//! client to resubscribe with its last cursor (on another replica).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
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
    /// Tenants whose channel is to be published on, for the publisher task.
    publish: OnceLock<mpsc::UnboundedSender<Uuid>>,
    /// Cancelled when the server shuts down.
    closing: CancellationToken,
}

struct Feed {
    tenant: Uuid,
    sender: broadcast::Sender<Arc<Delivery>>,
    wake: Notify,
    subscribers: AtomicUsize,
    position: AtomicI64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

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
        let Some(redis) = &self.inner.redis else {
            return;
        };
        let queue = self.inner.publish.get_or_init(|| {
            let (queue, pending) = mpsc::unbounded_channel();
            tokio::spawn(Self::publish(redis.clone(), pending));
            queue
        });
        let _ = queue.send(tenant);
    }

    /// Publishes on the channels of the tenants woken, coalescing the wakes that queue up
    /// while a round of notifications is on its way.
    async fn publish(redis: Redis, mut pending: mpsc::UnboundedReceiver<Uuid>) {
        let mut tenants = HashSet::new();
        while let Some(tenant) = pending.recv().await {
            tenants.insert(tenant);
            while let Ok(tenant) = pending.try_recv() {
                tenants.insert(tenant);
            }
            let mut pipe = redis::pipe();
            for tenant in tenants.drain() {
                pipe.cmd("SPUBLISH")
                    .arg(Self::channel(&redis, tenant))
                    .arg("")
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
                if let Some(feed) = tenant.and_then(|t| self.feed(t)) {
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
    async fn register(
        &self,
        tenant: Uuid,
    ) -> Result<(broadcast::Receiver<Arc<Delivery>>, Registration), Error> {
        let messaging = self
            .inner
            .messaging
            .get()
            .cloned()
            .ok_or_else(|| Error::Config("hub not attached".into()))?;
        if let Some(feed) = self.feed(tenant) {
            feed.subscribers.fetch_add(1, Ordering::SeqCst);
            let receiver = feed.sender.subscribe();
            return Ok((receiver, Registration { feed }));
        }
        let position = messaging.head(tenant).await?;
        let feed = {
            let mut feeds = self
                .inner
                .feeds
                .lock()
                .map_err(|_| Error::Config("hub lock poisoned".into()))?;
            feeds
                .entry(tenant)
                .or_insert_with(|| {
                    let (sender, _) = broadcast::channel(1024);
                    let feed = Arc::new(Feed {
                        tenant,
                        sender,
                        wake: Notify::new(),
                        subscribers: AtomicUsize::new(0),
                        position: AtomicI64::new(position),
                    });
                    tokio::spawn(run_feed(self.clone(), messaging, feed.clone()));
                    self.inner.feeds_changed.notify_one();
                    feed
                })
                .clone()
        };
        feed.subscribers.fetch_add(1, Ordering::SeqCst);
        let receiver = feed.sender.subscribe();
        Ok((receiver, Registration { feed }))
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
            if let Ok(mut feeds) = hub.inner.feeds.lock()
                && feed.subscribers.load(Ordering::SeqCst) == 0
            {
                feeds.remove(&feed.tenant);
                hub.inner.feeds_changed.notify_one();
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
            let after = feed.position.load(Ordering::SeqCst);
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
            let Some(last) = events.last().map(|e| e.id) else {
                break;
            };
            for event in events {
                let message = event.message_id.and_then(|id| messages.remove(&id));
                let _ = feed.sender.send(Arc::new(Delivery { event, message }));
            }
            feed.position.store(last, Ordering::SeqCst);
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
