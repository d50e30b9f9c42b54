//! Revocations as they reach this process: from the Redis channel, recorded directly by the
//! auth service, or found in PostgreSQL. Remembered for as long as a revoked access token
//! could still be presented, and awaited by open streams, which end as soon as their session
//! does (OC5).
//!
//! Redis only speeds this up: a revocation whose announcement was lost still ends every open
//! stream, because the sessions of open streams are looked up in the control plane every
//! [`STREAM_RECHECK`] ([`Revocations::recheck_streams`]), in one query for all of them.
//! Tenant deletions arrive on the same channel, for whoever holds a tenant's keys, settings
//! changes, for whoever caches a tenant's settings, and moves of a tenant to another
//! database (a restore), for whoever caches where tenants live.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use uuid::Uuid;

use crate::cache::Redis;
use crate::principal::RevokeReason;

/// How often the sessions of open streams are looked up in PostgreSQL. A stream whose
/// session ended while its announcement was lost ends within this time and one query.
pub const STREAM_RECHECK: Duration = Duration::from_secs(4);

/// Revoked sessions known to this process, and a way to wait for one.
#[derive(Clone)]
pub struct Revocations {
    inner: Arc<Inner>,
}

struct Inner {
    revoked: Mutex<HashMap<Uuid, (RevokeReason, Instant)>>,
    events: broadcast::Sender<(Uuid, RevokeReason)>,
    /// Sessions open streams wait for, with how many streams wait for each.
    watched: Mutex<HashMap<Uuid, usize>>,
    /// Tenants deleted, as announced.
    tenants_deleted: broadcast::Sender<Uuid>,
    /// Tenants whose settings changed, as announced.
    settings_changed: broadcast::Sender<Uuid>,
    /// Tenants moved to another database, as announced; `None` when announcements may have
    /// been lost (the channel is followed again after a break).
    tenants_moved: broadcast::Sender<Option<Uuid>>,
    /// Since when the Redis channel has been followed without a break; `None` while it is
    /// not (announcements are lost meanwhile).
    following_since: Mutex<Option<Instant>>,
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
        let (tenants_deleted, _) = broadcast::channel(256);
        let (settings_changed, _) = broadcast::channel(256);
        let (tenants_moved, _) = broadcast::channel(256);
        Self {
            inner: Arc::new(Inner {
                revoked: Mutex::new(HashMap::new()),
                events,
                watched: Mutex::new(HashMap::new()),
                tenants_deleted,
                settings_changed,
                tenants_moved,
                following_since: Mutex::new(None),
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

    /// Records that `tenant` was deleted and tells whoever listens ([`Self::tenant_deletions`]).
    pub fn record_tenant_deleted(&self, tenant: Uuid) {
        let _ = self.inner.tenants_deleted.send(tenant);
    }

    /// Records that `tenant`'s settings changed and tells whoever listens.
    pub fn record_settings_changed(&self, tenant: Uuid) {
        let _ = self.inner.settings_changed.send(tenant);
    }

    /// Forgets, in `databases`, the placement of every tenant announced as moved, for the
    /// life of the process; and every placement whenever announcements may have been lost
    /// (the channel followed again after a break, or more at once than it holds). A
    /// subscription that goes quiet unnoticed is made up for by the cache's own expiry
    /// ([`hafen_store::PLACEMENT_RECHECK`]).
    pub fn forget_moved_placements(
        &self,
        databases: hafen_store::Databases,
    ) -> tokio::task::JoinHandle<()> {
        let mut moved = self.inner.tenants_moved.subscribe();
        tokio::spawn(async move {
            loop {
                match moved.recv().await {
                    Ok(Some(tenant)) => databases.forget(tenant),
                    Ok(None) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        databases.forget_all();
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    /// Settings changes from now on.
    pub fn settings_changes(&self) -> broadcast::Receiver<Uuid> {
        self.inner.settings_changed.subscribe()
    }

    /// Since when announcements have arrived without a break (the Redis channel followed);
    /// `None` while they do not. A cache that relies on announcements may trust an entry
    /// made since then, and must let older ones expire on their own.
    pub fn following_since(&self) -> Option<Instant> {
        self.inner
            .following_since
            .lock()
            .ok()
            .and_then(|since| *since)
    }

    fn set_following(&self, following: bool) {
        if let Ok(mut since) = self.inner.following_since.lock() {
            *since = following.then(Instant::now);
        }
    }

    /// Tenant deletions from now on.
    pub fn tenant_deletions(&self) -> broadcast::Receiver<Uuid> {
        self.inner.tenants_deleted.subscribe()
    }

    /// Resolves when `session` is revoked, with the reason. While waiting, the session is
    /// among those [`Self::recheck_streams`] looks up.
    pub async fn wait(&self, session: Uuid) -> RevokeReason {
        let _watching = Watching::new(self, session);
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

    /// The sessions open streams wait for.
    fn watched(&self) -> Vec<Uuid> {
        self.inner
            .watched
            .lock()
            .map(|watched| watched.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Looks up, every [`STREAM_RECHECK`] for the life of the process, whether the sessions
    /// of open streams have ended in the control plane at `pool`, and records those that
    /// have, which ends their streams. One query per round, whatever the number of streams.
    pub fn recheck_streams(&self, pool: hafen_store::Pool) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(STREAM_RECHECK);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let watched = this.watched();
                if watched.is_empty() {
                    continue;
                }
                if let Err(err) = this.recheck(&pool, &watched).await {
                    tracing::warn!(error = %err, streams = watched.len(), "open streams' sessions not rechecked");
                }
            }
        })
    }

    async fn recheck(&self, pool: &hafen_store::Pool, watched: &[Uuid]) -> hafen_store::Result<()> {
        let mut conn = pool.get().await?;
        for (session, reason) in hafen_store::sessions::ended_among(&mut conn, watched).await? {
            // A row that is gone went with its tenant (or the deletion replay took it).
            let reason = reason
                .as_deref()
                .and_then(RevokeReason::parse)
                .unwrap_or(RevokeReason::TenantDeleted);
            if self.reason(session).is_none() {
                tracing::info!(session_id = %session, reason = %reason, "ended session found by recheck");
                self.record(session, reason);
            }
        }
        Ok(())
    }

    /// Follows the Redis revocation channel for the life of the process, reconnecting with
    /// back-off when Redis goes away.
    pub fn listen(&self, redis: Redis) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let followed = this.follow(&redis).await;
                this.set_following(false);
                match followed {
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
        // RESP3 pushes on a connection of its own: on a Redis Cluster, classic pub/sub reaches
        // a subscriber on any node.
        let (pushes, mut received) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
        let mut conn = redis.args().push_connection(pushes)?;
        conn.subscribe(&redis.revocation_channel()).await?;
        // A subscription can go quiet without closing (a half-open connection): the process
        // hears its own heartbeat on the channel, or stops trusting that it follows it.
        let heartbeat = tokio::spawn(heartbeat(redis.clone()));
        let _stop = AbortOnDrop(heartbeat);
        self.set_following(true);
        // Moves announced while the channel was not followed are not heard of: every cached
        // placement may be out of date.
        let _ = self.inner.tenants_moved.send(None);
        tracing::debug!("following the revocation channel");
        loop {
            let Ok(push) = tokio::time::timeout(CHANNEL_SILENCE, received.recv()).await else {
                tracing::warn!("revocation channel silent, heartbeats included; resubscribing");
                return Ok(());
            };
            let Some(push) = push else {
                return Ok(());
            };
            let payload = match push.kind {
                redis::PushKind::Message => match push.data.get(1) {
                    Some(redis::Value::BulkString(payload)) => String::from_utf8_lossy(payload),
                    _ => continue,
                },
                // A link broke: what was announced meanwhile is not heard of. Subscribe anew
                // (and forget every cached placement, above).
                redis::PushKind::Disconnection => return Ok(()),
                _ => continue,
            };
            let Some((session, reason)) = payload.split_once(' ') else {
                continue;
            };
            if session == "tenant" {
                if let Ok(tenant) = Uuid::try_parse(reason) {
                    self.record_tenant_deleted(tenant);
                }
                continue;
            }
            if session == "settings" {
                if let Ok(tenant) = Uuid::try_parse(reason) {
                    self.record_settings_changed(tenant);
                }
                continue;
            }
            if session == "moved" {
                if let Ok(tenant) = Uuid::try_parse(reason) {
                    let _ = self.inner.tenants_moved.send(Some(tenant));
                }
                continue;
            }
            if let (Ok(session), Some(reason)) =
                (Uuid::try_parse(session), RevokeReason::parse(reason))
            {
                self.record(session, reason);
            }
        }
    }
}

/// How often each process publishes a heartbeat on the revocation channel.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// How long the channel may be silent before the subscription is given up as dead.
const CHANNEL_SILENCE: Duration = Duration::from_secs(15);

/// Publishes `ping` on the revocation channel every [`HEARTBEAT`]; subscribers ignore it.
async fn heartbeat(redis: Redis) {
    let mut every = tokio::time::interval(HEARTBEAT);
    loop {
        every.tick().await;
        let published: redis::RedisResult<()> = redis::cmd("PUBLISH")
            .arg(redis.revocation_channel())
            .arg("ping")
            .query_async(&mut redis.conn())
            .await;
        if let Err(err) = published {
            tracing::debug!(error = %err, "revocation channel heartbeat not published");
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a session as watched while a stream waits for it.
struct Watching {
    revocations: Revocations,
    session: Uuid,
}

impl Watching {
    fn new(revocations: &Revocations, session: Uuid) -> Self {
        if let Ok(mut watched) = revocations.inner.watched.lock() {
            *watched.entry(session).or_insert(0) += 1;
        }
        metrics::gauge!("hafen_open_streams").increment(1.0);
        Self {
            revocations: revocations.clone(),
            session,
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        metrics::gauge!("hafen_open_streams").decrement(1.0);
        if let Ok(mut watched) = self.revocations.inner.watched.lock()
            && let Some(count) = watched.get_mut(&self.session)
        {
            *count -= 1;
            if *count == 0 {
                watched.remove(&self.session);
            }
        }
    }
}
