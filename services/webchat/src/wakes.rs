//! Wake-ups of the tenants' watchers ([`crate::watch`]): this process follows the sharded
//! event channel (`hafen_authn::Redis::events_channel`) of every tenant it has visitor streams
//! for, and a message there wakes the tenant's watcher at once, so an agent's answer reaches
//! the visitor without waiting for the next poll. Without Redis, the watchers poll.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hafen_authn::Redis;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind};
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

/// The tenants with visitor streams here, and what wakes their streams.
#[derive(Default)]
pub struct Wakes {
    tenants: Mutex<HashMap<Uuid, (Arc<Notify>, usize)>>,
    /// Wakes the listener when the set of tenants changed.
    changed: Notify,
}

/// A stream's registration: its tenant's wake-up, until it is dropped.
pub struct Registration {
    wakes: Arc<Wakes>,
    tenant: Uuid,
    /// Notified when the tenant's log changed.
    pub notify: Arc<Notify>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut tenants) = self.wakes.tenants.lock()
            && let Some((_, count)) = tenants.get_mut(&self.tenant)
        {
            *count -= 1;
            if *count == 0 {
                tenants.remove(&self.tenant);
                self.wakes.changed.notify_one();
            }
        }
    }
}

impl Wakes {
    /// Registers a stream of `tenant`.
    pub fn register(self: &Arc<Self>, tenant: Uuid) -> Registration {
        let notify = match self.tenants.lock() {
            Ok(mut tenants) => {
                let entry = tenants
                    .entry(tenant)
                    .or_insert_with(|| (Arc::new(Notify::new()), 0));
                entry.1 += 1;
                if entry.1 == 1 {
                    self.changed.notify_one();
                }
                Arc::clone(&entry.0)
            }
            Err(_) => Arc::new(Notify::new()),
        };
        Registration {
            wakes: Arc::clone(self),
            tenant,
            notify,
        }
    }

    fn wake(&self, tenant: Uuid) {
        if let Ok(tenants) = self.tenants.lock()
            && let Some((notify, _)) = tenants.get(&tenant)
        {
            notify.notify_waiters();
        }
    }

    /// Follows the channels of the registered tenants for the life of the process.
    pub fn listen(self: &Arc<Self>, redis: Redis, poll: Duration) {
        let wakes = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(err) = wakes.follow(&redis, poll).await {
                tracing::warn!(error = %err, "event channels unavailable; visitor streams poll");
            }
        });
    }

    async fn follow(&self, redis: &Redis, poll: Duration) -> redis::RedisResult<()> {
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
        let prefix = redis.key("events:{");
        loop {
            let wanted: HashSet<Uuid> = match self.tenants.lock() {
                Ok(tenants) => tenants.keys().copied().collect(),
                Err(_) => return Ok(()),
            };
            let mut retry = false;
            for tenant in wanted.difference(&subscribed).copied().collect::<Vec<_>>() {
                let done: redis::RedisResult<()> = redis::cmd("SSUBSCRIBE")
                    .arg(redis.events_channel(tenant))
                    .query_async(&mut conn)
                    .await;
                if done.is_ok() {
                    subscribed.insert(tenant);
                    // Whatever was published before the subscription is read now.
                    self.wake(tenant);
                } else {
                    retry = true;
                    break;
                }
            }
            for tenant in subscribed.difference(&wanted).copied().collect::<Vec<_>>() {
                let done: redis::RedisResult<()> = redis::cmd("SUNSUBSCRIBE")
                    .arg(redis.events_channel(tenant))
                    .query_async(&mut conn)
                    .await;
                if done.is_ok() {
                    subscribed.remove(&tenant);
                }
            }
            tokio::select! {
                () = self.changed.notified() => {}
                () = tokio::time::sleep(poll), if retry => {}
                push = received.recv() => match push {
                    Some(push) => self.on_push(&prefix, push, &mut subscribed),
                    None => return Ok(()),
                },
            }
            while let Ok(push) = received.try_recv() {
                self.on_push(&prefix, push, &mut subscribed);
            }
        }
    }

    fn on_push(&self, prefix: &str, push: PushInfo, subscribed: &mut HashSet<Uuid>) {
        match push.kind {
            PushKind::SMessage => {
                let tenant = match push.data.first() {
                    Some(redis::Value::BulkString(channel)) => std::str::from_utf8(channel)
                        .ok()
                        .and_then(|channel| channel.strip_prefix(prefix))
                        .and_then(|rest| rest.strip_suffix('}'))
                        .and_then(|id| Uuid::try_parse(id).ok()),
                    _ => None,
                };
                if let Some(tenant) = tenant {
                    self.wake(tenant);
                }
            }
            // The connection is gone, and its subscriptions with it.
            PushKind::Disconnection => subscribed.clear(),
            _ => {}
        }
    }
}
