//! Logging in, refreshing, logging out, introspection and the wipe confirmation (OC2, OC3,
//! OC5).

use hafen_events::{Actor, Event};
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use futures::future::BoxFuture;
use hafen_authn::{
    CachedSession, Introspection, Principal, Rejection, Resolver, RevokeReason, Role, token,
};
use hafen_store::schema::{chat_codes, users};
use hafen_store::sessions::{self, NewSession, Rotation, SessionRow};
use tonic::Status;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::auth::Auth;
use crate::error::Error;
use crate::rows::{CodeRow, UserRow, code_state, now};

/// A validated Login request.
pub struct LoginInput {
    /// The tenant's slug.
    pub tenant_slug: String,
    /// The login name as typed.
    pub username: String,
    /// The password.
    pub password: Zeroizing<String>,
    /// The chat code as typed.
    pub chat_code: Zeroizing<String>,
    /// Optional device label.
    pub device_label: String,
    /// The client's address, for rate limiting.
    pub client: Option<IpAddr>,
}

/// A new session's tokens.
pub struct Issued {
    /// The session.
    pub session_id: Uuid,
    /// Access token (shown once).
    pub access_token: Zeroizing<String>,
    /// Its expiry.
    pub access_expires_at: DateTime<Utc>,
    /// Refresh token (shown once).
    pub refresh_token: Zeroizing<String>,
    /// Its expiry.
    pub refresh_expires_at: DateTime<Utc>,
}

/// The result of a login.
pub struct LoggedIn {
    /// Tokens.
    pub issued: Issued,
    /// The user.
    pub user: UserRow,
    /// The tenant.
    pub tenant_id: Uuid,
    /// The chat code used.
    pub chat_code_id: Uuid,
}

fn ttl(duration: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(duration).unwrap_or(chrono::Duration::MAX)
}

impl Auth {
    /// Opens a session. Every failure is the same LOGIN_FAILED, after the same hashing work,
    /// so nothing tells which factor was wrong or whether the user exists.
    ///
    /// Guessing is limited without letting a guesser lock the real user out. Every attempt is
    /// counted before the password is checked: per client address, which backs off outright
    /// (the guesser's address, not the user's), and per tenant and username. Once a username
    /// backs off, an attempt goes on only with a chat code of an active device of that
    /// account, counted per device: the second factor proves the device, so the user logs in
    /// from their own device while a guesser without one is refused (RATE_LIMITED).
    pub async fn login(&self, input: LoginInput) -> Result<LoggedIn, Error> {
        if let Some(ip) = input.client
            && let Err(wait) = self
                .inner
                .limiter
                .acquire(&format!(
                    "login-addr:{}",
                    hafen_platform::net::limit_subject(ip)
                ))
                .await
        {
            return Err(self.rate_limited(&input.tenant_slug, wait).await);
        }

        let tenant = self.active_tenant(&input.tenant_slug).await?;
        let code = hafen_crypto::secret::normalize_chat_code(&input.chat_code);
        let found = match tenant {
            Some(tenant) => {
                let username = input.username.to_lowercase();
                let code_hash = code.as_ref().map(|code| self.code_hash(tenant, code));
                self.scoped(tenant, move |conn| {
                    Box::pin(async move { find_user_and_code(conn, &username, code_hash).await })
                })
                .await?
            }
            None => None,
        };
        let (user, code) = match found {
            Some((user, code)) => (Some(user), code),
            None => (None, None),
        };
        let account = format!(
            "login-user:{}:{}",
            input.tenant_slug,
            input.username.to_lowercase()
        );
        let device = match self.inner.limiter.acquire(&account).await {
            Ok(()) => None,
            Err(wait) => {
                let known = code
                    .as_ref()
                    .filter(|_| user.as_ref().is_some_and(UserRow::is_active));
                let Some(known) = known else {
                    return Err(self.rate_limited(&input.tenant_slug, wait).await);
                };
                let device = format!("login-device:{}", known.id);
                if let Err(wait) = self.inner.limiter.acquire(&device).await {
                    return Err(self.rate_limited(&input.tenant_slug, wait).await);
                }
                Some(device)
            }
        };
        let stored = user
            .as_ref()
            .filter(|u| u.is_active())
            .map(|u| u.password_hash.clone());
        let verified = self.verify(input.password.clone(), stored).await?;
        let user_id = user.as_ref().map(|u| u.id);
        let (Some(tenant), Some(user), Some(code), true) = (tenant, user, code, verified.matches)
        else {
            // The user's id when the username exists, so an admin sees attacks on an
            // account; nothing that was typed.
            let actor = user_id.map_or(Actor::UnknownUser, Actor::User);
            self.record_alone(&Event::new(tenant, actor, "auth.login.failed").failed())
                .await;
            return Err(Error::LoginFailed);
        };
        self.inner.limiter.succeeded(&account).await;
        if let Some(device) = &device {
            self.inner.limiter.succeeded(device).await;
        }
        if let Some(ip) = input.client {
            self.inner
                .limiter
                .refund(&format!(
                    "login-addr:{}",
                    hafen_platform::net::limit_subject(ip)
                ))
                .await;
        }

        if verified.needs_rehash {
            // OC3: imported argon2id (or bcrypt at another cost) becomes the configured scheme.
            let fresh = self.hash(input.password.clone()).await?;
            let user_id = user.id;
            self.scoped(tenant, move |conn| {
                Box::pin(async move {
                    diesel::update(users::table.find(user_id))
                        .set(users::password_hash.eq(fresh))
                        .execute(conn)
                        .await?;
                    Ok(())
                })
            })
            .await?;
            tracing::info!(user_id = %user.id, "password re-hashed to the configured scheme");
        }

        let label = if input.device_label.trim().is_empty() {
            code.device_label.clone()
        } else {
            input.device_label.trim().to_owned()
        };
        let principal_role = user.role();
        let issued = self
            .open_session(tenant, user.id, code.id, principal_role, &label)
            .await?;

        // The code may have been revoked while this login ran: then the new session goes too.
        let code_id = code.id;
        let still_active = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    let updated = diesel::update(
                        chat_codes::table
                            .find(code_id)
                            .filter(chat_codes::state.eq(code_state::ACTIVE)),
                    )
                    .set(chat_codes::last_used_at.eq(now()))
                    .execute(conn)
                    .await?;
                    Ok(updated == 1)
                })
            })
            .await?;
        if !still_active {
            let mut conn = self.control().await?;
            sessions::revoke(
                &mut conn,
                issued.session_id,
                RevokeReason::DeviceWiped.as_str(),
            )
            .await?;
            self.announce(&[issued.session_id], RevokeReason::DeviceWiped)
                .await;
            return Err(Error::LoginFailed);
        }
        tracing::info!(tenant_id = %tenant, user_id = %user.id, session_id = %issued.session_id, "logged in");
        Ok(LoggedIn {
            issued,
            user,
            tenant_id: tenant,
            chat_code_id: code.id,
        })
    }

    /// Audits a login refused for its back-off and says how long to wait.
    async fn rate_limited(&self, slug: &str, wait: std::time::Duration) -> Error {
        let tenant = self.active_tenant(slug).await.ok().flatten();
        let event = Event::new(tenant, Actor::UnknownUser, "auth.login.failed")
            .denied()
            .attribute("reason", "rate_limited");
        self.record_alone(&event).await;
        Error::RateLimited(wait)
    }

    /// The id of the active tenant with `slug`.
    async fn active_tenant(&self, slug: &str) -> Result<Option<Uuid>, Error> {
        let mut conn = self.control().await?;
        Ok(hafen_store::control::find_by_slug(&mut conn, slug)
            .await?
            .filter(|row| row.status == hafen_store::control::status::ACTIVE)
            .map(|row| row.id))
    }

    async fn open_session(
        &self,
        tenant: Uuid,
        user: Uuid,
        chat_code: Uuid,
        role: Role,
        device_label: &str,
    ) -> Result<Issued, Error> {
        let session_id = Uuid::now_v7();
        let access = token::mint(session_id)?;
        let refresh = token::mint(session_id)?;
        let created_at = now();
        let access_expires_at = created_at + ttl(self.inner.policy.access_ttl);
        let refresh_expires_at = created_at + ttl(self.inner.policy.refresh_ttl);
        {
            let device_label = device_label.to_owned();
            let (access_digest, refresh_digest) = (access.digest, refresh.digest);
            let event = Event::new(Some(tenant), Actor::User(user), "auth.login.succeeded")
                .target("session", session_id)
                .attribute("chat_code_id", chat_code);
            hafen_store::in_transaction(self.inner.databases.main(), move |conn| {
                Box::pin(async move {
                    sessions::insert(
                        conn,
                        &NewSession {
                            id: session_id,
                            tenant_id: tenant,
                            user_id: user,
                            chat_code_id: chat_code,
                            role: role.as_str(),
                            device_label: &device_label,
                            access_digest: &access_digest,
                            access_expires_at,
                            refresh_digest: &refresh_digest,
                            refresh_expires_at,
                            created_at,
                        },
                    )
                    .await?;
                    hafen_events::record(conn, &event).await?;
                    Ok::<_, Error>(())
                })
            })
            .await?;
            self.audited();
        }
        self.cache(
            &Principal {
                session_id,
                tenant_id: tenant,
                user_id: user,
                role,
                chat_code_id: chat_code,
                expires_at: access_expires_at,
            },
            &access.digest,
        )
        .await;
        Ok(Issued {
            session_id,
            access_token: access.token,
            access_expires_at,
            refresh_token: refresh.token,
            refresh_expires_at,
        })
    }

    async fn cache(&self, principal: &Principal, digest: &[u8; 32]) {
        if let Some(redis) = &self.inner.redis
            && let Err(err) = redis.store(&CachedSession::new(principal, digest)).await
        {
            tracing::debug!(error = %err, "session not cached");
        }
    }

    /// Exchanges a refresh token for new tokens; a reused one revokes the session.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Issued, Error> {
        let (session_id, presented) =
            token::parse(refresh_token).ok_or(Error::Rejected(Rejection::Unknown))?;
        let access = token::mint(session_id)?;
        let refresh = token::mint(session_id)?;
        let issued_at = now();
        let access_expires_at = issued_at + ttl(self.inner.policy.access_ttl);
        let refresh_expires_at = issued_at + ttl(self.inner.policy.refresh_ttl);
        let mut conn = self.control().await?;
        let rotated = sessions::rotate(
            &mut conn,
            session_id,
            Rotation {
                presented: &presented,
                access_digest: &access.digest,
                access_expires_at,
                refresh_digest: &refresh.digest,
                refresh_expires_at,
            },
        )
        .await?;
        if let Some(row) = rotated {
            // The entry of the previous access token is replaced (retried until it is), so
            // that token stops being accepted from the cache.
            if let Some(redis) = &self.inner.redis {
                redis
                    .replace(&CachedSession::new(&principal(&row)?, &access.digest))
                    .await;
            }
            return Ok(Issued {
                session_id,
                access_token: access.token,
                access_expires_at,
                refresh_token: refresh.token,
                refresh_expires_at,
            });
        }
        let row = sessions::find(&mut conn, session_id)
            .await?
            .ok_or(Error::Rejected(Rejection::Unknown))?;
        if let Some(reason) = revoked(&row) {
            return Err(Error::Rejected(Rejection::Revoked(reason)));
        }
        if row
            .used_refresh_digests
            .iter()
            .any(|used| hafen_crypto::secret::constant_time_eq(used, &presented))
        {
            sessions::revoke(&mut conn, session_id, RevokeReason::RefreshReuse.as_str()).await?;
            drop(conn);
            self.announce(&[session_id], RevokeReason::RefreshReuse)
                .await;
            tracing::warn!(session_id = %session_id, "refresh token reused: session revoked");
            return Err(Error::RefreshReused);
        }
        if hafen_crypto::secret::constant_time_eq(&row.refresh_digest, &presented) {
            return Err(Error::Rejected(Rejection::Expired));
        }
        Err(Error::Rejected(Rejection::Unknown))
    }

    /// Ends the session of `access_token`. Idempotent for ended or expired sessions.
    pub async fn logout(&self, access_token: &str) -> Result<(), Error> {
        let row = self.session_of(access_token).await?;
        let mut conn = self.control().await?;
        if sessions::revoke(&mut conn, row.id, RevokeReason::Logout.as_str()).await? {
            drop(conn);
            self.announce(&[row.id], RevokeReason::Logout).await;
            tracing::info!(session_id = %row.id, "logged out");
        }
        Ok(())
    }

    /// The session an access token belongs to, whatever its state; UNAUTHENTICATED when the
    /// token is not one of ours.
    async fn session_of(&self, access_token: &str) -> Result<SessionRow, Error> {
        let (session_id, digest) =
            token::parse(access_token).ok_or(Error::Rejected(Rejection::Unknown))?;
        let mut conn = self.control().await?;
        sessions::find(&mut conn, session_id)
            .await?
            .filter(|row| hafen_crypto::secret::constant_time_eq(&row.access_digest, &digest))
            .ok_or(Error::Rejected(Rejection::Unknown))
    }

    /// What an access token is worth right now (the truth behind every service's cache).
    pub async fn introspect(&self, access_token: &str) -> Result<Introspection, Error> {
        let row = match self.session_of(access_token).await {
            Ok(row) => row,
            Err(Error::Rejected(rejection)) => return Ok(Introspection::Inactive(rejection)),
            Err(err) => return Err(err),
        };
        if let Some(reason) = revoked(&row) {
            return Ok(Introspection::Inactive(Rejection::Revoked(reason)));
        }
        if row.access_expires_at <= Utc::now() {
            return Ok(Introspection::Inactive(Rejection::Expired));
        }
        let principal = principal(&row)?;
        let digest: [u8; 32] = row
            .access_digest
            .as_slice()
            .try_into()
            .map_err(|_| Error::Config("stored digest has the wrong length".into()))?;
        self.cache(&principal, &digest).await;
        Ok(Introspection::Active(principal))
    }

    /// Records that the device of a wiped session has deleted its local data (OC5). Only a
    /// session ended by a wipe qualifies; idempotent.
    pub async fn confirm_wipe(&self, access_token: &str) -> Result<CodeRow, Error> {
        let row = self.session_of(access_token).await?;
        if revoked(&row) != Some(RevokeReason::DeviceWiped) {
            return Err(Error::InvalidState("this session was not wiped"));
        }
        let code_id = row.chat_code_id;
        let (tenant, user, session) = (row.tenant_id, row.user_id, row.id);
        let code = self
            .scoped(row.tenant_id, move |conn| {
                Box::pin(async move {
                    let event = Event::new(Some(tenant), Actor::User(user), "auth.wipe.confirmed")
                        .target("chat_code", code_id)
                        .attribute("session_id", session);
                    hafen_events::record(conn, &event).await?;
                    let code: CodeRow = diesel::update(chat_codes::table.find(code_id).filter(
                        chat_codes::state.eq_any([code_state::REVOKED, code_state::WIPED]),
                    ))
                    .set((
                        chat_codes::state.eq(code_state::WIPED),
                        chat_codes::wipe_confirmed_at.eq(diesel::dsl::sql::<
                            diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
                        >(
                            "coalesce(wipe_confirmed_at, now())"
                        )),
                    ))
                    .returning(CodeRow::as_returning())
                    .get_result(conn)
                    .await
                    .optional()?
                    .ok_or(Error::InvalidState("the chat code is not revoked"))?;
                    Ok(code)
                })
            })
            .await?;
        self.audited();
        tracing::info!(session_id = %row.id, chat_code_id = %code.id, "wipe confirmed");
        Ok(code)
    }
}

/// The user named `username` (lower-cased) and, if it matches one of theirs, the active chat
/// code with hash `code_hash`.
async fn find_user_and_code(
    conn: &mut hafen_store::AsyncPgConnection,
    username: &str,
    code_hash: Option<[u8; 32]>,
) -> Result<Option<(UserRow, Option<CodeRow>)>, Error> {
    let user: Option<UserRow> = users::table
        .filter(
            diesel::dsl::sql::<diesel::sql_types::Bool>("lower(username) = ")
                .bind::<diesel::sql_types::Text, _>(username),
        )
        .select(UserRow::as_select())
        .first(conn)
        .await
        .optional()?;
    let Some(user) = user else {
        return Ok(None);
    };
    let code = match code_hash {
        Some(hash) => chat_codes::table
            .filter(chat_codes::code_hash.eq(hash.to_vec()))
            .filter(chat_codes::user_id.eq(user.id))
            .filter(chat_codes::state.eq(code_state::ACTIVE))
            .select(CodeRow::as_select())
            .first(conn)
            .await
            .optional()?,
        None => None,
    };
    Ok(Some((user, code)))
}

fn revoked(row: &SessionRow) -> Option<RevokeReason> {
    row.revoke_reason
        .as_deref()
        .map(|reason| RevokeReason::parse(reason).unwrap_or(RevokeReason::Logout))
}

fn principal(row: &SessionRow) -> Result<Principal, Error> {
    Ok(Principal {
        session_id: row.id,
        tenant_id: row.tenant_id,
        user_id: row.user_id,
        role: Role::parse(&row.role).unwrap_or(Role::Member),
        chat_code_id: row.chat_code_id,
        expires_at: row.access_expires_at,
    })
}

impl Resolver for Auth {
    fn introspect(&self, token: &str) -> BoxFuture<'static, Result<Introspection, Status>> {
        let this = self.clone();
        let token = Zeroizing::new(token.to_owned());
        Box::pin(async move { this.introspect(&token).await.map_err(Status::from) })
    }
}
