//! Chat codes (OC2) and remote wipe (OC5); the owner's TOTP second factor (GR3).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_authn::{Principal, RevokeReason, Role};
use hafen_events::{Actor, Event};
use hafen_store::accounts::DeviceLabel;
use hafen_store::schema::{chat_codes, users};
use hafen_store::sessions;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::auth::Auth;
use crate::error::Error;
use crate::rows::{CodeRow, UserRow, code_state, now, state};
use crate::users::require_admin;

/// A freshly issued chat code: shown once.
pub struct IssuedCode {
    /// Its record.
    pub row: CodeRow,
    /// The code itself.
    pub code: Zeroizing<String>,
}

impl Auth {
    /// Issues a chat code for one device of an active user.
    pub async fn issue_code(
        &self,
        caller: &Principal,
        user_id: Uuid,
        label: DeviceLabel,
    ) -> Result<IssuedCode, Error> {
        require_admin(caller)?;
        let user = self.user(caller.tenant_id, user_id).await?;
        // Only the owner manages the owner's devices: an admin must not be able to lock the
        // owner out or add a device of theirs (recovery is an operator act, TenantService).
        if user.role() == Role::Owner && caller.role != Role::Owner {
            return Err(Error::OwnerProtected);
        }
        if !user.is_active() {
            return Err(Error::InvalidState("the user is deactivated"));
        }
        let code = Zeroizing::new(hafen_crypto::secret::chat_code()?);
        let hash = self.code_hash(caller.tenant_id, &code);
        let issuer = caller.user_id;
        let tenant = caller.tenant_id;
        let row = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    let id = Uuid::now_v7();
                    let event =
                        Event::new(Some(tenant), Actor::User(issuer), "auth.chat_code.issued")
                            .target("chat_code", id)
                            .attribute("user_id", user_id);
                    hafen_events::record(conn, &event).await?;
                    Ok(diesel::insert_into(chat_codes::table)
                        .values((
                            chat_codes::id.eq(id),
                            chat_codes::user_id.eq(user_id),
                            chat_codes::device_label.eq(label.as_str()),
                            chat_codes::code_hash.eq(hash.to_vec()),
                            chat_codes::state.eq(code_state::ACTIVE),
                            chat_codes::created_at.eq(now()),
                            chat_codes::issued_by.eq(issuer),
                        ))
                        .returning(CodeRow::as_returning())
                        .get_result(conn)
                        .await?)
                })
            })
            .await?;
        self.audited();
        tracing::info!(tenant_id = %caller.tenant_id, user_id = %user_id, chat_code_id = %row.id, "chat code issued");
        Ok(IssuedCode { row, code })
    }

    /// Chat codes, newest first, of `user` (admins: anyone's; members: their own).
    pub async fn list_codes(
        &self,
        caller: &Principal,
        user: Option<Uuid>,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: usize,
    ) -> Result<(Vec<CodeRow>, bool), Error> {
        let user = match user {
            Some(user) if user != caller.user_id => {
                require_admin(caller).map_err(|_| {
                    Error::PermissionDenied("members see their own chat codes only")
                })?;
                self.user(caller.tenant_id, user).await?;
                Some(user)
            }
            Some(user) => Some(user),
            None if caller.role.is_admin() => None,
            None => Some(caller.user_id),
        };
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let mut rows = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    let mut query = chat_codes::table
                        .select(CodeRow::as_select())
                        .order((chat_codes::created_at.desc(), chat_codes::id.desc()))
                        .limit(fetch)
                        .into_boxed();
                    if let Some(user) = user {
                        query = query.filter(chat_codes::user_id.eq(user));
                    }
                    if let Some((created, id)) = after {
                        query = query.filter(
                            chat_codes::created_at.lt(created).or(chat_codes::created_at
                                .eq(created)
                                .and(chat_codes::id.lt(id))),
                        );
                    }
                    Ok(query.load(conn).await?)
                })
            })
            .await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        Ok((rows, more))
    }

    /// Revokes a chat code: remote wipe (OC5). The code is revoked first, then every session
    /// opened with it, so a login racing with the revocation cannot keep a session (it checks
    /// the code again after creating its session). Idempotent.
    pub async fn revoke_code(&self, caller: &Principal, code_id: Uuid) -> Result<CodeRow, Error> {
        let own_or_admin = caller.role.is_admin();
        let caller_is_owner = caller.role == Role::Owner;
        let caller_id = caller.user_id;
        let tenant = caller.tenant_id;
        let row = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    let row: CodeRow = chat_codes::table
                        .find(code_id)
                        .select(CodeRow::as_select())
                        .first(conn)
                        .await
                        .optional()?
                        .ok_or(Error::NotFound("chat_code"))?;
                    if !own_or_admin && row.user_id != caller_id {
                        return Err(Error::PermissionDenied(
                            "members may revoke their own chat codes only",
                        ));
                    }
                    if !caller_is_owner && row.user_id != caller_id {
                        let role: String = users::table
                            .find(row.user_id)
                            .select(users::role)
                            .first(conn)
                            .await?;
                        if role == hafen_store::accounts::role::OWNER {
                            return Err(Error::OwnerProtected);
                        }
                    }
                    if row.state != code_state::ACTIVE {
                        return Ok(row);
                    }
                    let event = Event::new(
                        Some(tenant),
                        Actor::User(caller_id),
                        "auth.chat_code.revoked",
                    )
                    .target("chat_code", code_id)
                    .attribute("user_id", row.user_id);
                    hafen_events::record(conn, &event).await?;
                    Ok(diesel::update(chat_codes::table.find(code_id))
                        .set((
                            chat_codes::state.eq(code_state::REVOKED),
                            chat_codes::revoked_at.eq(now()),
                        ))
                        .returning(CodeRow::as_returning())
                        .get_result(conn)
                        .await?)
                })
            })
            .await?;
        // Also when the code was revoked before: a crash may have come between the two steps.
        let ended = {
            let mut conn = self.control().await?;
            sessions::revoke_all(
                &mut conn,
                caller.tenant_id,
                sessions::Scope::ChatCode(code_id),
                RevokeReason::DeviceWiped.as_str(),
            )
            .await?
        };
        self.announce(&ended, RevokeReason::DeviceWiped).await;
        self.audited();
        tracing::info!(tenant_id = %caller.tenant_id, chat_code_id = %code_id, sessions = ended.len(), "chat code revoked: remote wipe");
        Ok(row)
    }

    /// Starts TOTP enrollment: a new secret, sealed and pending until confirmed.
    pub async fn enroll_totp(
        &self,
        caller: &Principal,
        password: Zeroizing<String>,
    ) -> Result<(String, String), Error> {
        let user = self.confirm_password(caller, password).await?;
        if user.totp_enabled_at.is_some() {
            return Err(Error::InvalidState("TOTP is already enrolled"));
        }
        let secret = Zeroizing::new(hafen_crypto::totp::generate_secret()?);
        let sealed =
            hafen_crypto::totp::seal_secret(&self.inner.totp_key, user.id.as_bytes(), &*secret)?;
        let id = user.id;
        self.scoped(caller.tenant_id, move |conn| {
            Box::pin(async move {
                diesel::update(users::table.find(id))
                    .set(users::totp_pending.eq(sealed))
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .await?;
        let tenant_slug = {
            let mut conn = self.control().await?;
            hafen_store::control::find(&mut conn, caller.tenant_id)
                .await?
                .and_then(|row| row.slug)
                .unwrap_or_default()
        };
        let account = format!("{tenant_slug}:{}", user.username);
        Ok((
            hafen_crypto::totp::base32(&*secret),
            hafen_crypto::totp::otpauth_uri("Hafen", &account, &*secret),
        ))
    }

    /// Completes TOTP enrollment with a current code.
    pub async fn confirm_totp(&self, caller: &Principal, code: &str) -> Result<UserRow, Error> {
        let subject = format!("totp:{}", caller.user_id);
        self.inner
            .limiter
            .acquire(&subject)
            .await
            .map_err(Error::RateLimited)?;
        let user = self.user(caller.tenant_id, caller.user_id).await?;
        let pending = user
            .totp_pending
            .clone()
            .ok_or(Error::InvalidState("no TOTP enrollment is pending"))?;
        let secret =
            hafen_crypto::totp::open_secret(&self.inner.totp_key, user.id.as_bytes(), &pending)?;
        let Some(step) = hafen_crypto::totp::matching_step(&secret, code, unix_now()) else {
            return Err(Error::ConfirmationFailed);
        };
        let id = user.id;
        let tenant = caller.tenant_id;
        let updated = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    // The confirming code is used up: it cannot confirm anything else.
                    if !hafen_store::accounts::use_totp_step(conn, id, step).await? {
                        return Err(Error::ConfirmationFailed);
                    }
                    let event = Event::new(Some(tenant), Actor::User(id), "auth.totp.enabled")
                        .target("user", id);
                    hafen_events::record(conn, &event).await?;
                    Ok(diesel::update(
                        users::table
                            .find(id)
                            .filter(users::status.eq(state::ACTIVE)),
                    )
                    .set((
                        users::totp_secret.eq(Some(pending)),
                        users::totp_pending.eq(None::<Vec<u8>>),
                        users::totp_enabled_at.eq(now()),
                        users::updated_at.eq(now()),
                    ))
                    .returning(UserRow::as_returning())
                    .get_result(conn)
                    .await?)
                })
            })
            .await?;
        // Only a code that was not used before clears the count of guesses.
        self.inner.limiter.succeeded(&subject).await;
        self.audited();
        tracing::info!(tenant_id = %caller.tenant_id, user_id = %id, "TOTP enrolled");
        Ok(updated)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
