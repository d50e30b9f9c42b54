//! The auth domain's shared state and the helpers every part of it uses: tenant-scoped
//! queries, hashing on the blocking pool, and revoking sessions everywhere at once.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hafen_authn::{Redis, Revocations, RevokeReason};
use hafen_crypto::{DataKey, Purpose, SubKeys};
use hafen_platform::cpu::CpuPool;
use hafen_store::{Databases, TenantId};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::error::Error;
use hafen_authn::limits::Limiter;

/// What the service enforces.
#[derive(Debug, Clone)]
pub struct Policy {
    /// bcrypt cost of new hashes.
    pub bcrypt_cost: u32,
    /// Minimum length of new passwords, in characters.
    pub min_password_chars: usize,
    /// Lifetime of access tokens.
    pub access_ttl: Duration,
    /// Lifetime of refresh tokens.
    pub refresh_ttl: Duration,
    /// Where a caller's address comes from, for rate limiting.
    pub client_address: hafen_platform::net::ClientAddress,
    /// How long a user's own erasure request waits before it is carried out.
    pub erasure_grace: Duration,
}

/// The auth domain service.
#[derive(Clone)]
pub struct Auth {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub databases: Databases,
    pub redis: Option<Redis>,
    pub revocations: Revocations,
    /// Seals TOTP secrets.
    pub totp_key: DataKey,
    /// Keys chat-code hashes.
    pub pepper: DataKey,
    pub policy: Policy,
    pub limiter: Limiter,
    /// Low-priority threads for bcrypt and argon2.
    pub cpu: CpuPool,
    /// A bcrypt hash of nothing anybody knows, at the configured cost: checked against when a
    /// login names no existing user, so that costs the same time (no user-name oracle).
    pub dummy_hash: String,
    /// Delivers the outbox to the audit service, once started.
    pub relay: std::sync::OnceLock<hafen_events::Relay>,
    /// Erased users (tenant, user) whose messages this process is making tombstones.
    pub tombstoning: std::sync::Mutex<std::collections::HashSet<(uuid::Uuid, uuid::Uuid)>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// The service over `databases`, caching in `redis` (when given), recording revocations
    /// in `revocations` and hashing on `cpu`. Computes its dummy hash first.
    pub async fn new(
        databases: Databases,
        redis: Option<Redis>,
        revocations: Revocations,
        keys: &SubKeys,
        policy: Policy,
        limiter: Limiter,
        cpu: CpuPool,
    ) -> Result<Self, Error> {
        let cost = policy.bcrypt_cost;
        let dummy_hash = cpu
            .run(move || {
                let unknowable = hafen_crypto::secret::random_token()?;
                hafen_crypto::password::hash(&unknowable, cost)
            })
            .await??;
        Ok(Self {
            inner: Arc::new(Inner {
                databases,
                redis,
                revocations,
                totp_key: keys.get(Purpose::TotpSecrets)?,
                pepper: keys.get(Purpose::ChatCodePepper)?,
                policy,
                limiter,
                cpu,
                dummy_hash,
                relay: std::sync::OnceLock::new(),
                tombstoning: std::sync::Mutex::default(),
            }),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.inner.policy
    }

    /// Runs `f` in `tenant`'s scope on the database the tenant lives on.
    pub(crate) async fn scoped<R, F>(&self, tenant: Uuid, f: F) -> Result<R, Error>
    where
        F: for<'c> FnOnce(
            &'c mut hafen_store::AsyncPgConnection,
        ) -> BoxFuture<'c, Result<R, Error>>,
    {
        let tenant = TenantId::from(tenant);
        let pool = self.inner.databases.tenant_pool(&tenant).await?;
        hafen_store::with_tenant(&pool, &tenant, f).await
    }

    /// Wakes `relay` whenever audit events were committed.
    pub fn set_relay(&self, relay: hafen_events::Relay) {
        let _ = self.inner.relay.set(relay);
    }

    /// Tells the relay that audit events were committed.
    pub(crate) fn audited(&self) {
        if let Some(relay) = self.inner.relay.get() {
            relay.wake();
        }
    }

    /// Commits `event` on its own (what changed nothing else, like a failed login).
    pub(crate) async fn record_alone(&self, event: &hafen_events::Event) {
        hafen_events::record_alone(self.inner.databases.main(), event).await;
        self.audited();
    }

    /// A control-plane connection.
    pub(crate) async fn control(&self) -> Result<hafen_store::PooledConnection, Error> {
        Ok(self.inner.databases.main_connection().await?)
    }

    /// Hashes a new password on the low-priority CPU pool.
    pub(crate) async fn hash(&self, password: Zeroizing<String>) -> Result<String, Error> {
        let cost = self.inner.policy.bcrypt_cost;
        Ok(self
            .inner
            .cpu
            .run(move || hafen_crypto::password::hash(&password, cost))
            .await??)
    }

    /// Checks `password` against `stored` (or against the dummy hash when there is no
    /// stored hash, so a missing account costs the same) on the low-priority CPU pool.
    pub(crate) async fn verify(
        &self,
        password: Zeroizing<String>,
        stored: Option<String>,
    ) -> Result<hafen_crypto::password::Verified, Error> {
        let cost = self.inner.policy.bcrypt_cost;
        let known = stored.is_some();
        let stored = stored.unwrap_or_else(|| self.inner.dummy_hash.clone());
        let verified = self
            .inner
            .cpu
            .run(move || hafen_crypto::password::verify(&password, &stored, cost))
            .await?;
        Ok(match verified {
            Ok(verified) if known => verified,
            // The dummy, or a stored hash in no accepted format: never a match.
            Ok(_) | Err(hafen_crypto::Error::UnsupportedHash) => hafen_crypto::password::Verified {
                matches: false,
                needs_rehash: false,
            },
            Err(err) => return Err(err.into()),
        })
    }

    /// The keyed hash a chat code of `tenant` is stored as.
    pub(crate) fn code_hash(&self, tenant: Uuid, code: &str) -> [u8; 32] {
        hafen_crypto::secret::keyed_hash(
            self.inner.pepper.expose(),
            &[tenant.as_bytes(), code.as_bytes()],
        )
    }

    /// Makes revoked sessions stop working everywhere: in this process at once, and through
    /// Redis (markers and the revocation channel) in every other service. PostgreSQL already
    /// says revoked, so Introspect refuses these sessions whatever Redis does; a failed
    /// publish is retried in the background, and open streams elsewhere recheck their
    /// sessions in PostgreSQL meanwhile.
    pub(crate) async fn announce(&self, sessions: &[Uuid], reason: RevokeReason) {
        for session in sessions {
            self.inner.revocations.record(*session, reason);
        }
        if let Some(redis) = &self.inner.redis {
            redis.announce(sessions, reason).await;
        }
    }

    /// Drops sessions from the caches without revoking them (a role changed).
    pub(crate) async fn forget(&self, sessions: &[Uuid]) {
        if let Some(redis) = &self.inner.redis
            && let Err(err) = redis.forget_sessions(sessions).await
        {
            tracing::warn!(error = %err, "session cache not cleared");
        }
    }
}
