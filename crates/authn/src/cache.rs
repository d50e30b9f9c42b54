//! Redis: the shared session cache, revocation markers and the revocation channel.
//!
//! Keys (under the configured prefix, `hafen:` by default):
//! - `session:<id>`: the session as every service needs it, until its access token expires;
//! - `revoked:<id>`: why a session ended, kept as long as its access token could still be
//!   presented, so a cache filled a moment before a revocation cannot resurrect it;
//! - channel `revocations`: `<id> <reason>` per revocation, so services drop cached sessions
//!   and end open streams at once.
//!
//! Redis is a cache: when it is down, every lookup falls back to PostgreSQL via the auth
//! service, and nothing is lost.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::principal::{Principal, RevokeReason, Role};

/// How long Redis may take before a call gives up and falls back.
const REDIS_TIMEOUT: Duration = Duration::from_millis(500);

/// Where Redis is.
#[derive(clap::Args, Clone, Debug)]
pub struct RedisArgs {
    /// Redis URL for the session cache, revocations and live fan-out, e.g.
    /// `redis://127.0.0.1:6379/`.
    #[arg(long, env = "HAFEN_REDIS_URL", hide_env_values = true)]
    pub redis_url: String,

    /// Prefix of every Redis key and channel, so several deployments can share one Redis.
    #[arg(long, env = "HAFEN_REDIS_PREFIX", default_value = "hafen:")]
    pub redis_prefix: String,
}

/// A lazily connecting, self-reconnecting Redis handle with short timeouts.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// A handle for `args`. Connects on first use; never fails because Redis is down.
    pub fn new(args: &RedisArgs) -> redis::RedisResult<Self> {
        let client = redis::Client::open(args.redis_url.as_str())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self {
            client,
            conn,
            prefix: args.redis_prefix.clone(),
        })
    }

    /// The key or channel `name` under this deployment's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A multiplexed connection (cheap to clone).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The client, for pub/sub connections.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// The revocation channel.
    pub fn revocation_channel(&self) -> String {
        self.key("revocations")
    }

    fn session_key(&self, session: Uuid) -> String {
        self.key(&format!("session:{}", session.simple()))
    }

    fn revoked_key(&self, session: Uuid) -> String {
        self.key(&format!("revoked:{}", session.simple()))
    }

    /// The cached session and, if any, why it was revoked.
    pub async fn lookup(
        &self,
        session: Uuid,
    ) -> redis::RedisResult<(Option<CachedSession>, Option<RevokeReason>)> {
        let (cached, revoked): (Option<String>, Option<String>) = redis::pipe()
            .get(self.session_key(session))
            .get(self.revoked_key(session))
            .query_async(&mut self.conn())
            .await?;
        Ok((
            cached.and_then(|json| serde_json::from_str(&json).ok()),
            revoked.as_deref().and_then(RevokeReason::parse),
        ))
    }

    /// Caches `session` until its access token expires (unless it was revoked meanwhile).
    pub async fn store(&self, session: &CachedSession) -> redis::RedisResult<()> {
        let ttl = (session.expires_at - Utc::now()).num_seconds();
        if ttl <= 0 {
            return Ok(());
        }
        let Ok(json) = serde_json::to_string(session) else {
            return Ok(());
        };
        let mut conn = self.conn();
        let key = self.session_key(session.session_id);
        let _: () = conn.set_ex(&key, json, ttl.unsigned_abs()).await?;
        // A revocation that landed between the database read and this write wins.
        let revoked: bool = conn.exists(self.revoked_key(session.session_id)).await?;
        if revoked {
            let _: () = conn.del(&key).await?;
        }
        Ok(())
    }

    /// Revokes sessions in the cache: drops them, marks them revoked for `marker_ttl`, and
    /// announces each on the revocation channel.
    pub async fn revoke(
        &self,
        sessions: &[Uuid],
        reason: RevokeReason,
        marker_ttl: Duration,
    ) -> redis::RedisResult<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for session in sessions {
            pipe.set_ex(
                self.revoked_key(*session),
                reason.as_str(),
                marker_ttl.as_secs().max(1),
            )
            .ignore()
            .del(self.session_key(*session))
            .ignore()
            .publish(
                self.revocation_channel(),
                format!("{} {}", session.simple(), reason.as_str()),
            )
            .ignore();
        }
        pipe.query_async::<()>(&mut self.conn()).await
    }
}

/// A session as cached in Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedSession {
    /// The session.
    pub session_id: Uuid,
    /// The tenant.
    pub tenant_id: Uuid,
    /// The user.
    pub user_id: Uuid,
    /// The role, stored form.
    pub role: String,
    /// The chat code.
    pub chat_code_id: Uuid,
    /// SHA-256 of the current access token's secret, hex.
    pub access_digest: String,
    /// When the access token expires.
    pub expires_at: DateTime<Utc>,
}

impl CachedSession {
    /// The cache entry of `principal` whose access token secret has `digest`.
    pub fn new(principal: &Principal, digest: &[u8; 32]) -> Self {
        Self {
            session_id: principal.session_id,
            tenant_id: principal.tenant_id,
            user_id: principal.user_id,
            role: principal.role.as_str().to_owned(),
            chat_code_id: principal.chat_code_id,
            access_digest: hex::encode(digest),
            expires_at: principal.expires_at,
        }
    }

    /// The principal, if `digest` is this session's current access token.
    pub fn principal(&self, digest: &[u8; 32]) -> Option<Principal> {
        let matches = hafen_crypto::secret::constant_time_eq(
            self.access_digest.as_bytes(),
            hex::encode(digest).as_bytes(),
        );
        Some(Principal {
            session_id: self.session_id,
            tenant_id: self.tenant_id,
            user_id: self.user_id,
            role: Role::parse(&self.role)?,
            chat_code_id: self.chat_code_id,
            expires_at: self.expires_at,
        })
        .filter(|_| matches)
    }
}
