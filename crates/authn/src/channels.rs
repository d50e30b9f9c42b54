//! Following tenants' event channels ([`Redis::events_channel`]): the messaging service's
//! feeds and the webchat service's stream watchers both learn this way that a tenant's log
//! changed on another replica.

use std::collections::HashSet;
use std::time::Duration;

use redis::{PushInfo, PushKind};
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::Redis;

/// Follows the event channels of the tenants `wanted` names, until it names none (`None`):
/// subscribes to those it names anew and unsubscribes from the others whenever `changed` is
/// notified, and after Redis comes back. `event(tenant, last)` is called for each message,
/// with the last event id when the publisher sent one, and once after each subscription with
/// `None` (what was published before it is to be read now), also when a Redis Cluster
/// subscribed again on its own after a failover. A subscription that failed is tried again
/// after `retry`. Returns the error that made following impossible.
pub async fn follow_event_channels(
    redis: &Redis,
    changed: &Notify,
    retry: Duration,
    wanted: impl Fn() -> Option<HashSet<Uuid>>,
    event: impl Fn(Uuid, Option<i64>),
) -> redis::RedisResult<()> {
    let (pushes, mut received) = mpsc::unbounded_channel::<PushInfo>();
    let mut conn = redis.args().push_connection(pushes)?;
    let mut subscribed: HashSet<Uuid> = HashSet::new();
    let prefix = redis.key("events:{");
    loop {
        let Some(wanted) = wanted() else {
            return Ok(());
        };
        // A server that is down fails every subscription, each after a timeout: give up the
        // round at the first failure. On a cluster only the channels of a failing master
        // fail, so go on past a few of them for the others.
        let give_up_after = if conn.is_cluster() { 3 } else { 1 };
        let mut failed = 0;
        for tenant in wanted.difference(&subscribed).copied().collect::<Vec<_>>() {
            let done = conn.ssubscribe(&redis.events_channel(tenant)).await;
            match done {
                Ok(()) => {
                    subscribed.insert(tenant);
                    event(tenant, None);
                }
                Err(err) => {
                    tracing::debug!(error = %err, "event channel not subscribed; polling meanwhile");
                    failed += 1;
                    if failed == give_up_after {
                        break;
                    }
                }
            }
        }
        for tenant in subscribed.difference(&wanted).copied().collect::<Vec<_>>() {
            let done = conn.sunsubscribe(&redis.events_channel(tenant)).await;
            if done.is_ok() {
                subscribed.remove(&tenant);
            }
        }
        tokio::select! {
            () = changed.notified() => {}
            () = tokio::time::sleep(retry), if failed > 0 => {}
            push = received.recv() => match push {
                Some(push) => on_push(&prefix, push, &mut subscribed, &event),
                None => return Ok(()),
            },
        }
        while let Ok(push) = received.try_recv() {
            on_push(&prefix, push, &mut subscribed, &event);
        }
    }
}

fn on_push(
    prefix: &str,
    push: PushInfo,
    subscribed: &mut HashSet<Uuid>,
    event: &impl Fn(Uuid, Option<i64>),
) {
    let tenant = match push.data.first() {
        Some(redis::Value::BulkString(channel)) => std::str::from_utf8(channel)
            .ok()
            .and_then(|channel| channel.strip_prefix(prefix))
            .and_then(|rest| rest.strip_suffix('}'))
            .and_then(|id| Uuid::try_parse(id).ok()),
        _ => None,
    };
    match push.kind {
        PushKind::SMessage => {
            // The last event id when the publisher knew it, then the time it published (Unix
            // milliseconds), when it said.
            let message = match push.data.get(1) {
                Some(redis::Value::BulkString(message)) => std::str::from_utf8(message).ok(),
                _ => None,
            };
            let mut parts = message.unwrap_or_default().split(' ');
            let last = parts.next().and_then(|last| last.parse::<i64>().ok());
            if let Some(published) = parts.next().and_then(|at| at.parse::<i64>().ok()) {
                let lag = chrono::Utc::now()
                    .timestamp_millis()
                    .saturating_sub(published);
                metrics::histogram!("hafen_fanout_lag_seconds").record(lag.max(0) as f64 / 1000.0);
            }
            if let Some(tenant) = tenant {
                event(tenant, last);
            }
        }
        // Subscribed, also again on its own (a cluster connection after a failover, when
        // messages may have been missed): what was published meanwhile is to be read.
        PushKind::SSubscribe => {
            if let Some(tenant) = tenant.filter(|tenant| subscribed.contains(tenant)) {
                event(tenant, None);
            }
        }
        // The server ended the subscription (its slot moved to another node): subscribe
        // again, at the slot's new owner.
        PushKind::SUnsubscribe => {
            if let Some(tenant) = tenant {
                subscribed.remove(&tenant);
            }
        }
        // A link is gone, and its subscriptions with it: subscribe again once Redis answers.
        PushKind::Disconnection => subscribed.clear(),
        _ => {}
    }
}
