//! Each tenant's settings as messaging applies them (masking rules compiled, features),
//! cached until they change: every change is announced on the revocation channel and drops
//! the tenant's entry on every replica; while the channel is not followed, entries live only
//! briefly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hafen_store::Databases;
use hafen_store::settings::Settings;
use uuid::Uuid;

use crate::error::Error;
use hafen_store::masking::Masker;

/// How long a tenant's settings are cached when no announcement of their changes can arrive
/// (no channel followed): a change takes this long at most.
const TTL_UNFOLLOWED: Duration = Duration::from_secs(1);

/// How long cached settings are kept while changes are announced: each change drops them at
/// once, so this only bounds how long a lost announcement could go unnoticed.
const TTL_FOLLOWED: Duration = Duration::from_secs(60);

/// A tenant's settings with its masking rules compiled.
#[derive(Debug)]
pub struct Rules {
    pub settings: Settings,
    pub masker: Masker,
}

/// The cache of tenants' [`Rules`].
#[derive(Clone)]
pub struct TenantRules {
    inner: Arc<Inner>,
}

struct Inner {
    databases: Databases,
    cached: Mutex<HashMap<Uuid, (Arc<Rules>, Instant)>>,
    /// Bumped by every dropped entry, so a read that raced with a change is not cached.
    epoch: AtomicU64,
    /// Where changes are announced, and how long to cache while they are not.
    followed: OnceLock<(hafen_authn::Revocations, Duration)>,
}

impl std::fmt::Debug for TenantRules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantRules").finish_non_exhaustive()
    }
}

impl TenantRules {
    /// Rules read from the control plane of `databases`.
    pub fn new(databases: Databases) -> Self {
        Self {
            inner: Arc::new(Inner {
                databases,
                cached: Mutex::new(HashMap::new()),
                epoch: AtomicU64::new(0),
                followed: OnceLock::new(),
            }),
        }
    }

    /// Drops cached rules whenever `revocations` hears of a change, for the life of the
    /// process; while it does not follow the announcements, rules are cached at most
    /// `unfollowed_ttl`.
    pub fn follow(&self, revocations: &hafen_authn::Revocations, unfollowed_ttl: Duration) {
        let _ = self
            .inner
            .followed
            .set((revocations.clone(), unfollowed_ttl));
        let mut changes = revocations.settings_changes();
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            loop {
                let changed = changes.recv().await;
                inner.epoch.fetch_add(1, Ordering::AcqRel);
                let Ok(mut cached) = inner.cached.lock() else {
                    return;
                };
                match changed {
                    Ok(tenant) => {
                        cached.remove(&tenant);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => cached.clear(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// How long rules cached at `at` may be used: long when every change since then was
    /// announced to this process, else the short fallback.
    fn ttl(&self, at: Instant) -> Duration {
        match self.inner.followed.get() {
            Some((revocations, unfollowed)) => match revocations.following_since() {
                Some(since) if since <= at => TTL_FOLLOWED,
                _ => *unfollowed,
            },
            None => TTL_UNFOLLOWED,
        }
    }

    /// `tenant`'s rules.
    pub async fn get(&self, tenant: Uuid) -> Result<Arc<Rules>, Error> {
        if let Some((cached, at)) = self
            .inner
            .cached
            .lock()
            .ok()
            .and_then(|cached| cached.get(&tenant).cloned())
            && at.elapsed() < self.ttl(at)
        {
            return Ok(cached);
        }
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        // The entry's age counts from before the read: a change between it and the insert is
        // what the epoch or the short TTL must catch.
        let read_at = Instant::now();
        let row = {
            let mut conn = self.inner.databases.main_connection().await?;
            hafen_store::control::find(&mut conn, tenant).await?
        };
        let settings = row
            .map(|row| Settings::from_json(&row.settings))
            .ok_or(Error::Store(hafen_store::Error::UnknownTenant))?;
        let masker = Masker::new(&settings.masking);
        let rules = Arc::new(Rules { settings, masker });
        // Not cached when a change was announced while reading: it may predate it.
        if let Ok(mut cached) = self.inner.cached.lock()
            && self.inner.epoch.load(Ordering::Acquire) == epoch
        {
            cached.insert(tenant, (rules.clone(), read_at));
        }
        Ok(rules)
    }
}
