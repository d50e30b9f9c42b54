//! Authentication of calls to every Hafen service.
//!
//! Every call carries `authorization: Bearer <token>`: either the operator's platform token
//! (read from a file, compared in constant time) or a user's access token from the auth
//! service (`<session id>.<secret>`). An access token is resolved in steps, cheapest first:
//!
//! 1. sessions this process knows to be revoked (from the Redis revocation channel) are
//!    refused at once;
//! 2. a per-process cache of at most one second;
//! 3. the shared Redis cache (with its revocation markers);
//! 4. the auth service itself ([`Resolver`]: `Introspect` over mTLS, or the auth service's
//!    own database in process), which is the truth.
//!
//! [`AuthnLayer`] does this for every call of a service and puts the [`Caller`] into the
//! request's extensions; handlers read it with [`caller`], [`user`] or [`require_operator`].
//! Open streams end when their session does: [`end_on_revocation`].
//!
//! - [`operator`]: the platform token. [`token`]: minting and parsing access tokens.
//! - [`cache`]: Redis. [`link`]: one Redis server or a Redis Cluster. [`revocations`]:
//!   revoked sessions and waiting for them.
//! - [`limits`]: brute-force protection, atomic in Redis, per process when Redis is down.
//! - [`principal`]: roles, principals, revocation reasons and how they map to statuses.

pub mod cache;
mod channels;
mod layer;
pub mod limits;
pub mod link;
pub mod operator;
pub mod principal;
pub mod remote;
pub mod revocations;
pub mod token;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::future::BoxFuture;
use tonic::Status;
use tonic::metadata::MetadataMap;
use uuid::Uuid;

pub use cache::{CachedSession, Redis, RedisArgs};
pub use channels::follow_event_channels;
pub use layer::{AuthnLayer, AuthnService};
pub use link::RedisConnection;
pub use operator::{OperatorArgs, PlatformToken, TokenFileError};
pub use principal::{Caller, Principal, Rejection, RevokeReason, Role};
pub use revocations::{Revocations, STREAM_RECHECK};

/// How long this process trusts a session it resolved, before asking Redis again. Bounds how
/// late a revocation can take effect when the revocation channel itself is down.
const LOCAL_TTL: Duration = Duration::from_secs(1);

/// The longest an access token can live: revocations are remembered this long.
pub const MAX_ACCESS_TTL: Duration = Duration::from_secs(60 * 60);

/// What the auth service says about an access token.
#[derive(Debug, Clone)]
pub enum Introspection {
    /// A live session.
    Active(Principal),
    /// Not (or no longer) a valid token.
    Inactive(Rejection),
}

/// The source of truth for sessions: the auth service.
pub trait Resolver: Send + Sync + 'static {
    /// Resolves a presented access token. Transport failures are errors (UNAVAILABLE);
    /// invalid tokens are [`Introspection::Inactive`].
    fn introspect(&self, token: &str) -> BoxFuture<'static, Result<Introspection, Status>>;
}

/// The bearer token of a call, if any. A malformed `authorization` header is an error.
pub fn bearer(metadata: &MetadataMap) -> Result<Option<&str>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| hafen_platform::status::unauthenticated("malformed authorization header"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            hafen_platform::status::unauthenticated("authorization must be `Bearer <token>`")
        })?;
    Ok(Some(token.trim()))
}

/// Authenticates calls: the operator's token and users' access tokens.
#[derive(Clone)]
pub struct Authenticator {
    platform: Option<PlatformToken>,
    sessions: Option<Arc<Sessions>>,
}

struct Sessions {
    redis: Option<Redis>,
    resolver: Arc<dyn Resolver>,
    revocations: Revocations,
    local: Mutex<HashMap<Uuid, (CachedSession, Instant)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("sessions", &self.sessions.is_some())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Accepts the operator only.
    pub fn operator_only(platform: PlatformToken) -> Self {
        Self {
            platform: Some(platform),
            sessions: None,
        }
    }

    /// Accepts users' access tokens, resolved through `redis` (when given) and `resolver`,
    /// and the operator when `platform` is given; `revocations` is what this process knows of
    /// revoked sessions.
    pub fn new(
        platform: Option<PlatformToken>,
        redis: Option<Redis>,
        resolver: Arc<dyn Resolver>,
        revocations: Revocations,
    ) -> Self {
        Self {
            platform,
            sessions: Some(Arc::new(Sessions {
                redis,
                resolver,
                revocations,
                local: Mutex::new(HashMap::new()),
            })),
        }
    }

    /// Who made the call with `metadata`; UNAUTHENTICATED when nobody known.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let Some(token) = bearer(metadata)? else {
            return Err(hafen_platform::status::unauthenticated(
                "missing bearer token (authorization metadata)",
            ));
        };
        if self.platform.as_ref().is_some_and(|p| p.matches(token)) {
            return Ok(Caller::Operator);
        }
        let Some(sessions) = &self.sessions else {
            return Err(hafen_platform::status::unauthenticated("unknown token"));
        };
        let principal = sessions.resolve(token).await?;
        hafen_platform::telemetry::record_ids(&[
            ("tenant_id", &principal.tenant_id),
            ("user_id", &principal.user_id),
        ]);
        Ok(Caller::User(principal))
    }

    /// Resolves when `session` is revoked, with the reason (for open streams).
    pub async fn revoked(&self, session: Uuid) -> RevokeReason {
        match &self.sessions {
            Some(sessions) => sessions.revocations.wait(session).await,
            None => std::future::pending().await,
        }
    }

    /// What this process knows of revocations.
    pub fn revocations(&self) -> Option<&Revocations> {
        self.sessions.as_ref().map(|s| &s.revocations)
    }
}

impl Sessions {
    async fn resolve(&self, token: &str) -> Result<Principal, Status> {
        let (session, digest) = token::parse(token).ok_or(Rejection::Unknown)?;
        if let Some(reason) = self.revocations.reason(session) {
            return Err(Rejection::Revoked(reason).into());
        }
        let now = Instant::now();
        let local = self
            .local
            .lock()
            .ok()
            .and_then(|local| local.get(&session).cloned());
        // A cached entry with another digest may be stale (the token was just refreshed):
        // then ask further instead of refusing.
        if let Some((cached, at)) = local
            && now.duration_since(at) < LOCAL_TTL
            && cached.principal(&digest).is_some()
        {
            return accept(&cached, &digest);
        }
        if let Some(redis) = &self.redis {
            match redis.lookup(session).await {
                Ok((_, Some(reason))) => {
                    self.revocations.record(session, reason);
                    return Err(Rejection::Revoked(reason).into());
                }
                Ok((Some(cached), None)) if cached.principal(&digest).is_some() => {
                    self.remember(&cached);
                    return accept(&cached, &digest);
                }
                Ok((Some(_), None)) => {}
                Ok((None, None)) => {}
                Err(err) => tracing::debug!(error = %err, "session cache unavailable"),
            }
        }
        match self.resolver.introspect(token).await? {
            Introspection::Active(principal) => {
                self.remember(&CachedSession::new(&principal, &digest));
                Ok(principal)
            }
            Introspection::Inactive(rejection) => {
                if let Rejection::Revoked(reason) = rejection {
                    self.revocations.record(session, reason);
                }
                Err(rejection.into())
            }
        }
    }

    fn remember(&self, cached: &CachedSession) {
        if let Ok(mut local) = self.local.lock() {
            if local.len() > 100_000 {
                local.clear();
            }
            local.insert(cached.session_id, (cached.clone(), Instant::now()));
        }
    }
}

fn accept(cached: &CachedSession, digest: &[u8; 32]) -> Result<Principal, Status> {
    let principal = cached.principal(digest).ok_or(Rejection::Unknown)?;
    if principal.expires_at <= Utc::now() {
        return Err(Rejection::Expired.into());
    }
    Ok(principal)
}

/// A response stream that ends, with the session's status (e.g. UNAUTHENTICATED
/// `DEVICE_WIPED`), as soon as `session` is revoked (OC5). Every server stream a user opens
/// goes through this.
pub fn end_on_revocation<S, T>(
    stream: S,
    authenticator: Authenticator,
    session: Uuid,
) -> futures::stream::BoxStream<'static, Result<T, Status>>
where
    S: futures::Stream<Item = Result<T, Status>> + Send + 'static,
    T: Send + 'static,
{
    use futures::StreamExt;
    let revoked: BoxFuture<'static, RevokeReason> =
        Box::pin(async move { authenticator.revoked(session).await });
    futures::stream::unfold(
        (Box::pin(stream), Some(revoked)),
        move |(mut stream, revoked)| async move {
            let mut revoked = revoked?;
            tokio::select! {
                reason = &mut revoked => {
                    tracing::info!(session_id = %session, reason = %reason, "stream ended: session revoked");
                    let status = Status::from(Rejection::Revoked(reason));
                    Some((Err(status), (stream, None)))
                }
                item = stream.next() => item.map(|item| (item, (stream, Some(revoked)))),
            }
        },
    )
    .boxed()
}

/// The caller [`AuthnLayer`] found; UNAUTHENTICATED when the call carried no token.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Caller, Status> {
    request.extensions().get::<Caller>().ok_or_else(|| {
        hafen_platform::status::unauthenticated("missing bearer token (authorization metadata)")
    })
}

/// The logged-in user making the call; PERMISSION_DENIED for the operator.
pub fn user<T>(request: &tonic::Request<T>) -> Result<&Principal, Status> {
    match caller(request)? {
        Caller::User(principal) => Ok(principal),
        Caller::Operator => Err(hafen_platform::status::permission_denied(
            "this call is for users of a tenant, not the operator",
        )),
    }
}

/// Only the operator may make this call.
pub fn require_operator<T>(request: &tonic::Request<T>) -> Result<(), Status> {
    match caller(request)? {
        Caller::Operator => Ok(()),
        Caller::User(_) => Err(hafen_platform::status::permission_denied(
            "only the operator may make this call",
        )),
    }
}

/// Which Hafen service made this call, if it is one of `allowed` (short names such as
/// `"retention"`): the caller must have presented a client certificate that rustls verified
/// against the service CA (mutual TLS) and that names the service, `hafen-<service>`, among
/// its DNS names. Each internal RPC passes its own allow-list; any other caller, another
/// service's certificate or one of the same CA issued to something else (the database's, say),
/// gets PERMISSION_DENIED with `required` = `internal`.
pub fn require_service<T>(
    request: &tonic::Request<T>,
    allowed: &[&'static str],
) -> Result<&'static str, Status> {
    let denied = || {
        hafen_platform::status::error(
            tonic::Code::PermissionDenied,
            "PERMISSION_DENIED",
            "internal call: this service's certificate may not make it",
            &[("required", "internal")],
        )
    };
    let certs = request.peer_certs().ok_or_else(denied)?;
    hafen_platform::identity::service_of(&certs, allowed).ok_or_else(denied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", value.parse().unwrap());
        metadata
    }

    #[tokio::test]
    async fn operator_is_recognised_only_by_the_exact_token() {
        let token = "a".repeat(40);
        let auth = Authenticator::operator_only(PlatformToken::new(&token).unwrap());
        assert_eq!(
            auth.authenticate(&with_auth(&format!("Bearer {token}")))
                .await
                .unwrap(),
            Caller::Operator
        );
        let wrong = auth
            .authenticate(&with_auth(&format!("Bearer {}", "b".repeat(40))))
            .await
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        let missing = auth.authenticate(&MetadataMap::new()).await.unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("missing"));
        let malformed = auth.authenticate(&with_auth(&token)).await.unwrap_err();
        assert!(malformed.message().contains("Bearer"));
        assert_eq!(
            hafen_platform::status::reason(&wrong).as_deref(),
            Some("UNAUTHENTICATED")
        );
    }

    #[test]
    fn short_tokens_are_refused_and_files_are_created_private() {
        assert!(PlatformToken::new("short").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let token = PlatformToken::load_or_create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(token.matches(&text));
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[tokio::test]
    async fn revocations_wake_waiters_and_are_remembered() {
        let revocations = Revocations::new(Duration::from_secs(60));
        let session = Uuid::now_v7();
        let waiter = tokio::spawn({
            let revocations = revocations.clone();
            async move { revocations.wait(session).await }
        });
        tokio::task::yield_now().await;
        revocations.record(Uuid::now_v7(), RevokeReason::Logout);
        revocations.record(session, RevokeReason::DeviceWiped);
        assert_eq!(waiter.await.unwrap(), RevokeReason::DeviceWiped);
        assert_eq!(revocations.reason(session), Some(RevokeReason::DeviceWiped));
        assert_eq!(revocations.wait(session).await, RevokeReason::DeviceWiped);
    }
}
