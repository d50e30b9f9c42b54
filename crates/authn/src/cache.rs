//! Redis: the shared session cache, revocation markers and the revocation channel.
//!
//! Keys (under the configured prefix, `hafen:` by default):
//! - `session:{<id>}`: the session as every service needs it, until its access token
//!   expires;
//! - `revoked:{<id>}`: why a session ended, kept as long as its access token could still be
//!   presented, so a cache filled a moment before a revocation cannot resurrect it (the
//!   braces keep both keys of a session in one slot of a Redis Cluster: see [`crate::link`]);
//! - channel `revocations`: `<id> <reason>` per revocation, so services drop cached sessions
//!   and end open streams at once; `tenant <id>` when a tenant was deleted, so services
//!   forget its keys; `settings <id>` when its settings changed, so caches of them are
//!   dropped. A publish that fails is retried in the background with back-off
//!   ([`Redis::announce`]); until it goes through, open streams still end within seconds,
//!   because they re-check their sessions in PostgreSQL ([`crate::Revocations`]).
//!
//! Redis is a cache, never an authority: when it is down, every lookup falls back to
//! PostgreSQL via the auth service, and nothing is lost. A session entry carries an
//! HMAC-SHA-256 under the session-cache key (derived from the master key, held by every
//! service that authenticates users), over the entry's full Redis key and its JSON (which
//! holds the expiry and when the database vouched for it). Whoever can write to Redis cannot
//! forge one: an entry that does not verify is a miss, and the auth service is asked; an
//! entry they captured and put back is trusted for [`CACHE_FRESH`] after it was made at
//! most. Without the key, nothing is cached or trusted.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::link::{REDIS_TIMEOUT, RedisConnection};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use hafen_crypto::DataKey;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::principal::{Principal, RevokeReason, Role};

/// Announcements retried in the background at once, at most; more are left to the
/// PostgreSQL re-checks.
const MAX_RETRYING: usize = 1024;

/// How long a session cache entry is trusted after the database vouched for it.
pub const CACHE_FRESH: Duration = Duration::from_secs(60);

/// How far another replica's clock may run ahead of this one's.
const CLOCK_SKEW_SECS: i64 = 5;

/// Writes a session entry (KEYS[1]) unless the session is marked revoked (KEYS[2]) or the
/// entry there is for a later access token: ARGV[1] is the entry, ARGV[2] its access token's
/// expiry in Unix milliseconds (also the entry's prefix), ARGV[3] its lifetime in seconds.
const STORE: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  local at = tonumber(string.match(current, '^(%d+)%.'))
  if at and at > tonumber(ARGV[2]) then return 0 end
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
";

/// Where Redis is.
#[derive(clap::Args, Clone, Debug)]
pub struct RedisArgs {
    /// Redis URL for the session cache, revocations and live fan-out: `rediss://host:port/`
    /// for TLS (verified against --redis-ca, or the system's roots), `redis://` only where
    /// plaintext is meant. A `rediss://` link never falls back to plaintext. With
    /// --redis-cluster: one or more nodes of the cluster, separated by commas.
    #[arg(long, env = "HAFEN_REDIS_URL", hide_env_values = true)]
    pub redis_url: String,

    /// Redis is a Redis Cluster: --redis-url names some of its nodes, the others are learnt
    /// from them. Keys used together share a hash tag; live fan-out uses sharded pub/sub.
    #[arg(long, env = "HAFEN_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// PEM file of the CA certificates that Redis's certificate must chain to (`rediss://`);
    /// the system's roots when not given.
    #[arg(long, env = "HAFEN_REDIS_CA")]
    pub redis_ca: Option<PathBuf>,

    /// Prefix of every Redis key and channel, so several deployments can share one Redis.
    #[arg(long, env = "HAFEN_REDIS_PREFIX", default_value = "hafen:")]
    pub redis_prefix: String,
}

impl RedisArgs {
    /// Whether the link to Redis is TLS (every server named by a `rediss://` URL).
    pub fn tls(&self) -> bool {
        let urls = self.urls();
        !urls.is_empty() && urls.iter().all(|url| url.starts_with("rediss://"))
    }
}

/// A lazily connecting, self-reconnecting Redis handle with short timeouts.
#[derive(Clone)]
pub struct Redis {
    args: RedisArgs,
    conn: RedisConnection,
    prefix: String,
    session_key: Option<Arc<DataKey>>,
    /// Announcements being retried in the background ([`Redis::deliver`]).
    retrying: Arc<AtomicUsize>,
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
        let conn = args.connection()?;
        Ok(Self {
            args: args.clone(),
            conn,
            prefix: args.redis_prefix.clone(),
            session_key: None,
            retrying: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// This handle, caching and trusting session entries MACed under `key` (the
    /// [`hafen_crypto::Purpose::SessionCache`] sub-key). Without it, no session is cached.
    pub fn with_session_key(mut self, key: DataKey) -> Self {
        self.session_key = Some(Arc::new(key));
        self
    }

    /// A handle for `args`, after one round trip to check the link: a TLS link to a server
    /// that does not speak TLS (or whose certificate does not verify) is a configuration
    /// error and fails here, so a service never starts on a link it was not configured for.
    /// Redis being down is not an error: it is a cache, and the service starts without it.
    pub async fn connect(args: &RedisArgs) -> Result<Self, String> {
        let redis = Self::new(args).map_err(|err| format!("redis: {err}"))?;
        if args.tls() {
            match tls_probe(args).await {
                Probe::Handshake => {}
                Probe::Unreachable(reason) => {
                    tracing::warn!(error = %reason, "redis unreachable at start; running without the cache");
                }
                Probe::NotTls(reason) => {
                    return Err(format!(
                        "redis: the TLS handshake failed ({reason}); the server does not speak \
                         TLS or its certificate does not verify against --redis-ca. A rediss:// \
                         link never falls back to plaintext"
                    ));
                }
            }
        } else {
            tracing::warn!("the link to redis is plaintext (redis:// URL)");
        }
        Ok(redis)
    }

    /// The key or channel `name` under this deployment's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The tenant's sharded channel of event-log wake-ups: whoever writes to a tenant's log
    /// publishes on it after commit (SPUBLISH), and the messaging service's feeds follow it.
    /// The braces make the tenant id the cluster hash tag.
    pub fn events_channel(&self, tenant: uuid::Uuid) -> String {
        self.key(&format!("events:{{{}}}", tenant.simple()))
    }

    /// Wakes the feeds of `tenant` on every replica (see [`Redis::events_channel`]); an empty
    /// message: they read what is new from the database.
    pub async fn publish_events(&self, tenant: uuid::Uuid) -> redis::RedisResult<()> {
        redis::cmd("SPUBLISH")
            .arg(self.events_channel(tenant))
            .arg("")
            .query_async(&mut self.conn())
            .await
    }

    /// A multiplexed connection (cheap to clone).
    pub fn conn(&self) -> RedisConnection {
        self.conn.clone()
    }

    /// The settings this handle was made from (e.g. for
    /// [`RedisArgs::push_connection`]).
    pub fn args(&self) -> &RedisArgs {
        &self.args
    }

    /// The revocation channel.
    pub fn revocation_channel(&self) -> String {
        self.key("revocations")
    }

    /// The key of `session`'s cache entry.
    pub fn session_key(&self, session: Uuid) -> String {
        self.key(&format!("session:{{{}}}", session.simple()))
    }

    /// The key of `session`'s revocation marker; in the same cluster slot as its entry.
    pub fn revoked_key(&self, session: Uuid) -> String {
        self.key(&format!("revoked:{{{}}}", session.simple()))
    }

    /// Drops `sessions`' cache entries without revoking them (a role changed).
    pub async fn forget_sessions(&self, sessions: &[Uuid]) -> redis::RedisResult<()> {
        let deleted = self
            .pipelined(sessions.len(), |pipe, i| {
                pipe.del(self.session_key(sessions[i]));
            })
            .await;
        crate::link::all_ok(deleted)
    }

    /// The cached session, if its entry verifies, and, if any, why it was revoked.
    pub async fn lookup(
        &self,
        session: Uuid,
    ) -> redis::RedisResult<(Option<CachedSession>, Option<RevokeReason>)> {
        let key = self.session_key(session);
        let (cached, revoked): (Option<String>, Option<String>) = redis::pipe()
            .get(&key)
            .get(self.revoked_key(session))
            .query_async(&mut self.conn())
            .await?;
        let verified = cached.and_then(|entry| {
            let opened = self
                .session_key
                .as_deref()
                .and_then(|mac_key| open_entry(mac_key, &key, &entry))
                .filter(|cached| cached.session_id == session && cached.fresh(Utc::now()));
            if opened.is_none() {
                tracing::warn!(session_id = %session, "session cache entry failed verification; ignored");
            }
            opened
        });
        Ok((verified, revoked.as_deref().and_then(RevokeReason::parse)))
    }

    /// Caches `session` for at most [`CACHE_FRESH`], and never past its access token's expiry.
    /// Atomically: nothing is written when the session was revoked meanwhile, or when the
    /// entry there is for a later access token (a Refresh that overtook an introspection
    /// which read the row before it). Returns whether the entry was written.
    pub async fn store(&self, session: &CachedSession) -> redis::RedisResult<bool> {
        let ttl = (session.expires_at - Utc::now())
            .num_seconds()
            .min(CACHE_FRESH.as_secs().try_into().unwrap_or(i64::MAX));
        if ttl <= 0 {
            return Ok(false);
        }
        let Some(mac_key) = self.session_key.as_deref() else {
            return Ok(false);
        };
        let key = self.session_key(session.session_id);
        let Some(entry) = seal_entry(mac_key, &key, session) else {
            return Ok(false);
        };
        let written: i64 = redis::Script::new(STORE)
            .key(&key)
            .key(self.revoked_key(session.session_id))
            .arg(entry)
            .arg(session.expires_at.timestamp_millis())
            .arg(ttl)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(written == 1)
    }

    /// [`Redis::store`] for the entry of a just refreshed session: until it is written, the
    /// previous access token could still be accepted from the cache, so a failed write is
    /// retried in the background like an announcement.
    pub async fn replace(&self, session: &CachedSession) -> bool {
        let redis = self.clone();
        let session = session.clone();
        self.deliver("session replacement", move || {
            let redis = redis.clone();
            let session = session.clone();
            Box::pin(async move { redis.store(&session).await.map(|_| ()) })
        })
        .await
    }

    /// Announces that `sessions` ended for `reason` (see [`Redis::revoke`]). When Redis
    /// cannot be reached, the announcement is retried in the background with back-off until
    /// it goes through or no access token of these sessions can still be valid
    /// ([`crate::MAX_ACCESS_TTL`]). Returns whether it went through at once.
    pub async fn announce(&self, sessions: &[Uuid], reason: RevokeReason) -> bool {
        if sessions.is_empty() {
            return true;
        }
        let redis = self.clone();
        let sessions = sessions.to_vec();
        self.deliver("revocation", move || {
            let redis = redis.clone();
            let sessions = sessions.clone();
            Box::pin(async move { redis.revoke(&sessions, reason, crate::MAX_ACCESS_TTL).await })
        })
        .await
    }

    /// Announces that `tenant` was deleted, so every service forgets its keys; retried like
    /// [`Redis::announce`].
    pub async fn announce_tenant_deleted(&self, tenant: Uuid) -> bool {
        self.announce_about("tenant deletion", "tenant", tenant)
            .await
    }

    /// Announces that `tenant`'s settings changed, so every service drops what it cached of
    /// them; retried like [`Redis::announce`].
    pub async fn announce_settings_changed(&self, tenant: Uuid) -> bool {
        self.announce_about("settings change", "settings", tenant)
            .await
    }

    /// Announces that `tenant` lives on another database now (a restore moved it), so every
    /// service forgets where it was; retried like [`Redis::announce`].
    pub async fn announce_tenant_moved(&self, tenant: Uuid) -> bool {
        self.announce_about("tenant move", "moved", tenant).await
    }

    /// Publishes `<kind> <tenant>` on the revocation channel, retried like
    /// [`Redis::announce`].
    async fn announce_about(&self, what: &'static str, kind: &'static str, tenant: Uuid) -> bool {
        let redis = self.clone();
        self.deliver(what, move || {
            let redis = redis.clone();
            Box::pin(async move {
                redis::cmd("PUBLISH")
                    .arg(redis.revocation_channel())
                    .arg(format!("{kind} {}", tenant.simple()))
                    .query_async::<()>(&mut redis.conn())
                    .await
            })
        })
        .await
    }

    /// Runs `attempt` once; if it fails, again in the background with back-off (200 ms
    /// doubling to 10 s) until it succeeds or [`crate::MAX_ACCESS_TTL`] has passed. At most
    /// [`MAX_RETRYING`] are retried at once: during a long outage the rest are dropped.
    async fn deliver<F>(&self, what: &'static str, attempt: F) -> bool
    where
        F: Fn() -> futures::future::BoxFuture<'static, redis::RedisResult<()>>
            + Send
            + Sync
            + 'static,
    {
        let first = match attempt().await {
            Ok(()) => return true,
            Err(err) => err,
        };
        let pending = Arc::clone(&self.retrying);
        if pending.fetch_add(1, Ordering::AcqRel) >= MAX_RETRYING {
            pending.fetch_sub(1, Ordering::AcqRel);
            // Open streams still end within seconds (they re-check PostgreSQL) and cache
            // entries age out after CACHE_FRESH: nothing is lost but speed.
            tracing::warn!(what, error = %first, "announcement not delivered to redis; too many retrying already");
            return false;
        }
        tracing::warn!(what, error = %first, "announcement not delivered to redis; retrying");
        tokio::spawn(async move {
            let _done = Retrying(pending);
            let give_up = tokio::time::Instant::now() + crate::MAX_ACCESS_TTL;
            let mut backoff = Duration::from_millis(200);
            while tokio::time::Instant::now() < give_up {
                tokio::time::sleep(backoff).await;
                match attempt().await {
                    Ok(()) => {
                        tracing::info!(what, "announcement delivered to redis after retrying");
                        return;
                    }
                    Err(err) => {
                        tracing::debug!(what, error = %err, "announcement still not delivered")
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            tracing::warn!(
                what,
                "announcement given up: no token it concerns is valid any more"
            );
        });
        false
    }

    /// Revokes sessions in the cache: drops them, marks them revoked for `marker_ttl`, and
    /// announces each on the revocation channel. One attempt; [`Redis::announce`] retries.
    pub async fn revoke(
        &self,
        sessions: &[Uuid],
        reason: RevokeReason,
        marker_ttl: Duration,
    ) -> redis::RedisResult<()> {
        if sessions.is_empty() {
            return Ok(());
        }
        // A group per session (its marker and entry share a slot), then the announcements.
        let written = self
            .pipelined(sessions.len() + 1, |pipe, i| match sessions.get(i) {
                Some(session) => {
                    pipe.set_ex(
                        self.revoked_key(*session),
                        reason.as_str(),
                        marker_ttl.as_secs().max(1),
                    )
                    .del(self.session_key(*session));
                }
                None => {
                    for session in sessions {
                        pipe.publish(
                            self.revocation_channel(),
                            format!("{} {}", session.simple(), reason.as_str()),
                        );
                    }
                }
            })
            .await;
        // Retried whole (by `announce`) when any group failed: each write is idempotent.
        crate::link::all_ok(written)
    }
}

/// `<expiry ms>.<base64 MAC>.<JSON>`: the MAC covers the entry's Redis key, a separator and
/// the JSON.
fn seal_entry(mac_key: &DataKey, redis_key: &str, session: &CachedSession) -> Option<String> {
    let json = serde_json::to_string(session).ok()?;
    let mac = entry_mac(mac_key, redis_key, json.as_bytes());
    Some(format!(
        "{}.{}.{json}",
        session.expires_at.timestamp_millis(),
        BASE64.encode(mac)
    ))
}

/// The session of an entry written by [`seal_entry`] under the same key and Redis key. The
/// leading expiry is only for [`STORE`]'s ordering; the one that counts is inside the MAC.
fn open_entry(mac_key: &DataKey, redis_key: &str, entry: &str) -> Option<CachedSession> {
    let (_, entry) = entry.split_once('.')?;
    let (mac, json) = entry.split_once('.')?;
    let mac = BASE64.decode(mac).ok()?;
    let expected = entry_mac(mac_key, redis_key, json.as_bytes());
    if !hafen_crypto::secret::constant_time_eq(&mac, &expected) {
        return None;
    }
    serde_json::from_str(json).ok()
}

fn entry_mac(mac_key: &DataKey, redis_key: &str, json: &[u8]) -> [u8; 32] {
    hafen_crypto::secret::keyed_hash(
        mac_key.expose(),
        &[b"hafen session cache v1", redis_key.as_bytes(), json],
    )
}

/// What a TLS handshake with Redis at start-up found.
enum Probe {
    /// The handshake completed: the server speaks TLS with a certificate that verifies.
    Handshake,
    /// No TCP connection: Redis is down, which a cache may be.
    Unreachable(String),
    /// TCP connected but no TLS handshake completed: the server speaks plaintext, or its
    /// certificate does not verify. A misconfiguration.
    NotTls(String),
}

/// Connects to the server of a `rediss://` URL and completes a TLS handshake with the
/// configured roots, within a few seconds.
async fn tls_probe(args: &RedisArgs) -> Probe {
    let Some(Ok(url)) = args.urls().first().map(|url| url::Url::parse(url)) else {
        return Probe::NotTls("not a valid URL".into());
    };
    let Some(host) = url
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_owned())
    else {
        return Probe::NotTls("the URL names no host".into());
    };
    let port = url.port().unwrap_or(6379);
    let roots = match tls_roots(args.redis_ca.as_deref()) {
        Ok(roots) => roots,
        Err(reason) => return Probe::NotTls(reason),
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(host.clone()) else {
        return Probe::NotTls("the host is not a valid TLS server name".into());
    };
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = match tokio::time::timeout(
        REDIS_TIMEOUT * 4,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => return Probe::Unreachable(err.kind().to_string()),
        Err(_) => return Probe::Unreachable("connecting timed out".into()),
    };
    match tokio::time::timeout(REDIS_TIMEOUT * 4, connector.connect(name, tcp)).await {
        Ok(Ok(_)) => Probe::Handshake,
        Ok(Err(err)) => Probe::NotTls(err.to_string()),
        Err(_) => Probe::NotTls("no TLS handshake within 2 s".into()),
    }
}

fn tls_roots(ca: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|err| format!("--redis-ca: {err}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| format!("--redis-ca: {err}"))?;
            roots.add_parsable_certificates(certs);
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        return Err("no CA certificate to verify Redis with".into());
    }
    Ok(roots)
}

/// Counts one background retry of [`Redis::deliver`] while it lives.
struct Retrying(Arc<AtomicUsize>);

impl Drop for Retrying {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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
    /// When this entry was made from the database's answer.
    pub cached_at: DateTime<Utc>,
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
            cached_at: Utc::now(),
        }
    }

    /// Whether the entry is young enough to trust at `now`: an entry replayed into Redis
    /// (after its session was revoked and the marker removed) is worth [`CACHE_FRESH`] at
    /// most.
    pub fn fresh(&self, now: DateTime<Utc>) -> bool {
        let age = now - self.cached_at;
        age < chrono::Duration::from_std(CACHE_FRESH).unwrap_or_default()
            && age > -chrono::Duration::seconds(CLOCK_SKEW_SECS)
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
