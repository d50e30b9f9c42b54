//! Users' data keys (CB3, BX1): created on first use, wrapped by the tenant key (itself
//! wrapped by a version of the master key) and kept in the key store ([`crate::keystore`]),
//! apart from tenant data. The services that hold the master key (messaging, which seals
//! bodies; tenant, which exports them; webchat) read keys through a [`KeyRing`].
//!
//! A tenant key wrapped under a master-key version this process does not hold (the key was
//! rotated after it started) makes it read its master key file again, at most once per
//! [`RELOAD_EVERY`], so a rotation needs no restart.
//!
//! Unwrapped keys are cached in memory, bounded: at most `capacity` tenant keys and as many
//! user keys, the least recently used going first, and none older than [`KEY_TTL`], so a
//! key destroyed elsewhere stops being usable here within that time at the latest. A
//! tenant's keys are dropped as soon as its deletion is announced ([`KeyRing::follow`]).

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_crypto::keys::{tenant_key_context, user_key_context};
use hafen_crypto::{DataKey, MasterKey};
use lru::LruCache;
use uuid::Uuid;

use crate::Databases;
use crate::error::Error;
use crate::schema::{deletion_log, user_keys};

/// How often, at most, the master key file is read again for a version it lacked.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// How long an unwrapped key is used before it is read (and unwrapped) again.
pub const KEY_TTL: Duration = Duration::from_secs(300);

/// Where keys come from, and the cache of unwrapped ones.
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<Inner>,
}

struct Inner {
    databases: Databases,
    master: RwLock<Arc<MasterKey>>,
    master_file: Option<PathBuf>,
    reloaded: Mutex<Option<Instant>>,
    tenants: Mutex<LruCache<Uuid, Cached>>,
    users: Mutex<LruCache<(Uuid, Uuid), Cached>>,
}

#[derive(Clone)]
struct Cached {
    key: Arc<DataKey>,
    at: Instant,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyRing(..)")
    }
}

fn fresh<K: std::hash::Hash + Eq>(
    cache: &Mutex<LruCache<K, Cached>>,
    key: &K,
) -> Option<Arc<DataKey>> {
    let mut cache = cache.lock().ok()?;
    match cache.get(key) {
        Some(cached) if cached.at.elapsed() < KEY_TTL => Some(cached.key.clone()),
        Some(_) => {
            cache.pop(key);
            None
        }
        None => None,
    }
}

fn keep<K: std::hash::Hash + Eq>(cache: &Mutex<LruCache<K, Cached>>, key: K, value: &Arc<DataKey>) {
    if let Ok(mut cache) = cache.lock() {
        cache.put(
            key,
            Cached {
                key: value.clone(),
                at: Instant::now(),
            },
        );
    }
}

impl KeyRing {
    /// Keys of the tenants on `databases`, unwrapped with `master`; at most `capacity`
    /// tenant keys and `capacity` user keys are held unwrapped.
    pub fn new(databases: Databases, master: MasterKey, capacity: NonZeroUsize) -> Self {
        Self::build(databases, master, None, capacity)
    }

    /// [`KeyRing::new`] with `master` as read from `path`, read again when a tenant key names
    /// a version it lacks (the master key was rotated since).
    pub fn reloading(
        databases: Databases,
        master: MasterKey,
        path: PathBuf,
        capacity: NonZeroUsize,
    ) -> Self {
        Self::build(databases, master, Some(path), capacity)
    }

    fn build(
        databases: Databases,
        master: MasterKey,
        master_file: Option<PathBuf>,
        capacity: NonZeroUsize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                databases,
                master: RwLock::new(Arc::new(master)),
                master_file,
                reloaded: Mutex::new(None),
                tenants: Mutex::new(LruCache::new(capacity)),
                users: Mutex::new(LruCache::new(capacity)),
            }),
        }
    }

    /// Drops every unwrapped key of `tenant` (its tenant key and its users' keys).
    pub fn forget_tenant(&self, tenant: Uuid) {
        if let Ok(mut tenants) = self.inner.tenants.lock() {
            tenants.pop(&tenant);
        }
        if let Ok(mut users) = self.inner.users.lock() {
            let theirs: Vec<(Uuid, Uuid)> = users
                .iter()
                .map(|(key, _)| *key)
                .filter(|(owner, _)| *owner == tenant)
                .collect();
            for key in theirs {
                users.pop(&key);
            }
        }
    }

    /// Drops the unwrapped key of `user` (or visitor) of `tenant`, after it was destroyed.
    pub fn forget_user(&self, tenant: Uuid, user: Uuid) {
        if let Ok(mut users) = self.inner.users.lock() {
            users.pop(&(tenant, user));
        }
    }

    /// Forgets a tenant's keys whenever `deletions` (announced tenant deletions, e.g.
    /// `hafen_authn::Revocations::tenant_deletions`) names it, for the life of the process.
    pub fn follow(
        &self,
        mut deletions: tokio::sync::broadcast::Receiver<Uuid>,
    ) -> tokio::task::JoinHandle<()> {
        let ring = self.clone();
        tokio::spawn(async move {
            loop {
                match deletions.recv().await {
                    Ok(tenant) => {
                        ring.forget_tenant(tenant);
                        tracing::info!(tenant_id = %tenant, "deleted tenant's keys forgotten");
                    }
                    // Missed some: forget everything rather than keep a deleted tenant's key.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => ring.forget_all(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    fn forget_all(&self) {
        if let Ok(mut tenants) = self.inner.tenants.lock() {
            tenants.clear();
        }
        if let Ok(mut users) = self.inner.users.lock() {
            users.clear();
        }
    }

    /// How many tenant keys and user keys are held unwrapped, and whether `tenant`'s key is
    /// among them (for tests and monitoring; never the keys).
    pub fn held(&self, tenant: Uuid) -> (usize, usize, bool) {
        let (tenants, holds) = self
            .inner
            .tenants
            .lock()
            .map(|t| (t.len(), t.contains(&tenant)))
            .unwrap_or_default();
        let users = self.inner.users.lock().map(|u| u.len()).unwrap_or_default();
        (tenants, users, holds)
    }

    async fn keystore(&self) -> Result<crate::PooledConnection, Error> {
        self.inner.databases.keystore_connection().await
    }

    fn master(&self) -> Option<Arc<MasterKey>> {
        self.inner.master.read().ok().map(|m| m.clone())
    }

    /// Reads the master key file again if it may hold `version` and was not read within
    /// [`RELOAD_EVERY`].
    fn reload_for(&self, version: u32) {
        let Some(path) = &self.inner.master_file else {
            return;
        };
        {
            let Ok(mut reloaded) = self.inner.reloaded.lock() else {
                return;
            };
            if reloaded.is_some_and(|at| at.elapsed() < RELOAD_EVERY) {
                return;
            }
            *reloaded = Some(Instant::now());
        }
        match MasterKey::load(path) {
            Ok(master) if master.has_version(version) => {
                tracing::info!(versions = ?master.versions(), "master key file read again");
                if let Ok(mut current) = self.inner.master.write() {
                    *current = Arc::new(master);
                }
            }
            Ok(_) => tracing::error!(version, "master key file lacks a version in use"),
            Err(err) => tracing::error!(error = %err, "master key file unreadable"),
        }
    }

    async fn tenant_key(&self, tenant: Uuid) -> Result<Arc<DataKey>, Error> {
        if let Some(key) = fresh(&self.inner.tenants, &tenant) {
            return Ok(key);
        }
        let (version, wrapped) = {
            let mut conn = self.keystore().await?;
            crate::keystore::tenant_key(&mut conn, tenant)
                .await?
                .ok_or(Error::KeyDestroyed)?
        };
        if self.master().is_some_and(|m| !m.has_version(version)) {
            self.reload_for(version);
        }
        let master = self.master().ok_or(Error::KeyDestroyed)?;
        let key =
            Arc::new(master.unwrap(version, &wrapped, &tenant_key_context(tenant.as_bytes()))?);
        keep(&self.inner.tenants, tenant, &key);
        Ok(key)
    }

    /// The key of `user` in `tenant`, created (and stored wrapped) on first use, unless the
    /// user (or visitor) was erased: then [`Error::KeyDestroyed`].
    pub async fn user_key(&self, tenant: Uuid, user: Uuid) -> Result<Arc<DataKey>, Error> {
        if let Some(key) = fresh(&self.inner.users, &(tenant, user)) {
            return Ok(key);
        }
        let tenant_key = self.tenant_key(tenant).await?;
        let context = user_key_context(user.as_bytes());
        let mut conn = self.keystore().await?;
        let stored: Option<Vec<u8>> = user_keys::table
            .find((tenant, user))
            .select(user_keys::wrapped_key)
            .first(&mut conn)
            .await
            .optional()?;
        let wrapped = match stored {
            Some(wrapped) => wrapped,
            None => {
                // An erased user's or visitor's key is never made again: what was sealed
                // under the old one stays unreadable, and nothing new is sealed for them.
                let erased: bool = diesel::select(diesel::dsl::exists(
                    deletion_log::table
                        .filter(deletion_log::tenant_id.eq(tenant))
                        .filter(deletion_log::user_id.eq(user)),
                ))
                .get_result(&mut conn)
                .await?;
                if erased {
                    return Err(Error::KeyDestroyed);
                }
                let fresh = DataKey::generate()?;
                let wrapped = tenant_key.wrap(&fresh, &context)?;
                // Two first sends at once: whichever insert wins, both use the stored key.
                diesel::insert_into(user_keys::table)
                    .values((
                        user_keys::tenant_id.eq(tenant),
                        user_keys::user_id.eq(user),
                        user_keys::wrapped_key.eq(&wrapped),
                    ))
                    .on_conflict_do_nothing()
                    .execute(&mut conn)
                    .await?;
                user_keys::table
                    .find((tenant, user))
                    .select(user_keys::wrapped_key)
                    .first(&mut conn)
                    .await?
            }
        };
        let key = Arc::new(tenant_key.unwrap(&wrapped, &context)?);
        keep(&self.inner.users, (tenant, user), &key);
        Ok(key)
    }
}

/// The associated data of a message body: its id and its conversation's, so a ciphertext
/// moved to another row or conversation does not decrypt.
pub fn body_context(message: Uuid, conversation: Uuid) -> Vec<u8> {
    [message.as_bytes().as_slice(), conversation.as_bytes()].concat()
}
