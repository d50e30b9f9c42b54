//! Wake-ups of the tenants' watchers ([`crate::watch`]): this process follows the sharded
//! event channel (`hafen_authn::Redis::events_channel`) of every tenant it has visitor streams
//! for, and a message there wakes the tenant's watcher at once, so an agent's answer reaches
//! the visitor without waiting for the next poll. Without Redis, the watchers poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hafen_authn::Redis;
use tokio::sync::Notify;
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
        hafen_authn::follow_event_channels(
            redis,
            &self.changed,
            poll,
            || {
                self.tenants
                    .lock()
                    .ok()
                    .map(|tenants| tenants.keys().copied().collect())
            },
            |tenant, _| self.wake(tenant),
        )
        .await
    }
}
