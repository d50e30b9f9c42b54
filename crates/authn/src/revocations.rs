//! Revocations as they reach this process: from the Redis channel, or recorded directly by
//! the auth service. Remembered for as long as a revoked access token could still be
//! presented, and awaited by open streams, which end as soon as their session does (OC5).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::cache::Redis;
use crate::principal::RevokeReason;

/// Revoked sessions known to this process, and a way to wait for one.
#[derive(Clone)]
pub struct Revocations {
    inner: Arc<Inner>,
}

struct Inner {
    revoked: Mutex<HashMap<Uuid, (RevokeReason, Instant)>>,
    events: broadcast::Sender<(Uuid, RevokeReason)>,
    /// How long a revocation is remembered (the longest an access token lives).
    remember: Duration,
}

impl std::fmt::Debug for Revocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocations").finish_non_exhaustive()
    }
}

impl Revocations {
    /// Remembers revocations for `remember`.
    pub fn new(remember: Duration) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(Inner {
                revoked: Mutex::new(HashMap::new()),
                events,
                remember,
            }),
        }
    }

    /// Records a revocation and wakes whoever waits for that session.
    pub fn record(&self, session: Uuid, reason: RevokeReason) {
        let now = Instant::now();
        if let Ok(mut revoked) = self.inner.revoked.lock() {
            if revoked.len() > 100_000 {
                revoked.retain(|_, (_, until)| *until > now);
            }
            revoked.insert(session, (reason, now + self.inner.remember));
        }
        let _ = self.inner.events.send((session, reason));
    }

    /// Why `session` was revoked, if this process knows.
    pub fn reason(&self, session: Uuid) -> Option<RevokeReason> {
        let revoked = self.inner.revoked.lock().ok()?;
        revoked
            .get(&session)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(reason, _)| *reason)
    }

    /// Resolves when `session` is revoked, with the reason.
    pub async fn wait(&self, session: Uuid) -> RevokeReason {
        // Subscribe before looking, so a revocation in between is not missed.
        let mut events = self.inner.events.subscribe();
        loop {
            if let Some(reason) = self.reason(session) {
                return reason;
            }
            match events.recv().await {
                Ok((revoked, reason)) if revoked == session => return reason,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }

    /// Follows the Redis revocation channel for the life of the process, reconnecting with
    /// back-off when Redis goes away.
    pub fn listen(&self, redis: Redis) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match this.follow(&redis).await {
                    Ok(()) => backoff = Duration::from_millis(100),
                    Err(err) => {
                        tracing::warn!(error = %err, "revocation channel unavailable; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    }

    async fn follow(&self, redis: &Redis) -> redis::RedisResult<()> {
        let mut pubsub = redis.client().get_async_pubsub().await?;
        pubsub.subscribe(redis.revocation_channel()).await?;
        tracing::debug!("following the revocation channel");
        let mut messages = pubsub.on_message();
        while let Some(message) = messages.next().await {
            let Ok(payload) = message.get_payload::<String>() else {
                continue;
            };
            let Some((session, reason)) = payload.split_once(' ') else {
                continue;
            };
            if let (Ok(session), Some(reason)) =
                (Uuid::try_parse(session), RevokeReason::parse(reason))
            {
                self.record(session, reason);
            }
        }
        Ok(())
    }
}
