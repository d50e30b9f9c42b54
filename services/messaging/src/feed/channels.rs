//! The feeds' Redis side: each commit publishes on its tenant's sharded channel, and each
//! replica follows the channels of the tenants it has feeds for (see the module above).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use hafen_authn::Redis;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Hub;

impl Hub {
    /// The tenant's sharded channel. The braces make the tenant id the cluster hash tag.
    fn channel(redis: &Redis, tenant: Uuid) -> String {
        redis.events_channel(tenant)
    }

    /// The tenant named by a channel, if it is one of ours.
    fn tenant_of(redis: &Redis, channel: &[u8]) -> Option<Uuid> {
        let channel = std::str::from_utf8(channel).ok()?;
        let id = channel
            .strip_prefix(&redis.key("events:{"))?
            .strip_suffix('}')?;
        Uuid::try_parse(id).ok()
    }

    /// Publishes on `tenant`'s channel, through the publisher task.
    pub(super) fn notify(&self, tenant: Uuid, last: Option<i64>) {
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
            let wanted: HashSet<Uuid> = match self.inner.feeds.map.lock() {
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
                () = self.inner.feeds.changed.notified() => {}
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
}
