//! The feeds' Redis side: each commit publishes on its tenant's sharded channel, and each
//! replica follows the channels of the tenants it has feeds for (see the module above).

use std::collections::HashMap;

use hafen_authn::Redis;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::Hub;

impl Hub {
    /// The tenant's sharded channel. The braces make the tenant id the cluster hash tag.
    fn channel(redis: &Redis, tenant: Uuid) -> String {
        redis.events_channel(tenant)
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
    /// every coalesced wake knew it (the highest; empty otherwise), a space and the time of
    /// publishing in Unix milliseconds (subscribers report the fan-out lag from it).
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
            let at = chrono::Utc::now().timestamp_millis();
            let woken: Vec<(Uuid, Option<i64>)> = tenants.drain().collect();
            // A group per tenant: on a Redis Cluster, each channel is in its tenant's slot.
            let published = redis
                .pipelined(woken.len(), |pipe, i| {
                    let (tenant, last) = woken[i];
                    let last = last.map(|id| id.to_string()).unwrap_or_default();
                    pipe.cmd("SPUBLISH")
                        .arg(Self::channel(&redis, tenant))
                        .arg(format!("{last} {at}"));
                })
                .await;
            if let Err(err) = hafen_authn::link::all_ok(published) {
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
        hafen_authn::follow_event_channels(
            redis,
            &self.inner.feeds.changed,
            self.inner.poll,
            || {
                self.inner
                    .feeds
                    .map
                    .lock()
                    .ok()
                    .map(|feeds| feeds.keys().copied().collect())
            },
            |tenant, last| {
                if let Some(feed) = self.feed(tenant)
                    && last.is_none_or(|last| last > *feed.position())
                {
                    feed.wake.notify_one();
                }
            },
        )
        .await
    }
}
