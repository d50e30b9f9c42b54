//! Accounts (OC1, OC3, GR6): creation (with a password or an imported hash), listing,
//! updates, deactivation and password changes.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_authn::{Principal, RevokeReason, Role};
use hafen_events::{Actor, Event};
use hafen_store::accounts::{DisplayName, Username};
use hafen_store::schema::users;
use hafen_store::sessions;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::auth::Auth;
use crate::error::Error;
use crate::rows::{UserRow, now, state};
use hafen_store::is_unique_violation;

/// The credential of a new account.
pub enum Credential {
    /// A password to hash with the configured scheme.
    Password(Zeroizing<String>),
    /// An imported bcrypt or argon2id hash, kept until the first login re-hashes it (OC3).
    Hash(String),
}

/// A validated CreateUser request.
pub struct NewUserInput {
    /// Client request id, for idempotent retries.
    pub request_id: Option<Uuid>,
    /// Login name.
    pub username: Username,
    /// Display name.
    pub display_name: DisplayName,
    /// Member or admin.
    pub role: Role,
    /// Password or imported hash.
    pub credential: Credential,
}

/// A page of users.
pub struct UserPage {
    /// The users.
    pub users: Vec<UserRow>,
    /// Whether more follow.
    pub more: bool,
}

/// Admins and the owner.
pub fn require_admin(caller: &Principal) -> Result<(), Error> {
    if caller.role.is_admin() {
        Ok(())
    } else {
        Err(Error::PermissionDenied(
            "only admins and the owner may do this",
        ))
    }
}

impl Auth {
    /// Checks a new password against the policy (the error names `field`).
    pub fn check_new_password(&self, field: &'static str, password: &str) -> Result<(), Error> {
        hafen_crypto::password::check_policy(password, self.inner.policy.min_password_chars)
            .map_err(|violation| Error::PasswordRefused { field, violation })
    }

    /// Creates an account in the caller's tenant.
    pub async fn create_user(
        &self,
        caller: &Principal,
        input: NewUserInput,
    ) -> Result<UserRow, Error> {
        require_admin(caller)?;
        match input.role {
            Role::Member => {}
            Role::Admin if caller.role == Role::Owner => {}
            Role::Admin => return Err(Error::PermissionDenied("only the owner may create admins")),
            Role::Owner => return Err(Error::invalid("role", "ROLE_OWNER cannot be assigned")),
        }
        if let Some(request_id) = input.request_id
            && let Some(existing) = self.user_by_request(caller.tenant_id, request_id).await?
        {
            let same = existing.username == input.username.as_str()
                && existing.display_name == input.display_name.as_str()
                && existing.role() == input.role;
            return if same {
                Ok(existing)
            } else {
                Err(Error::RequestIdConflict)
            };
        }
        let hash = match input.credential {
            Credential::Password(password) => {
                self.check_new_password("password", &password)?;
                self.hash(password).await?
            }
            Credential::Hash(hash) => {
                if hafen_crypto::password::scheme(&hash).is_none() {
                    return Err(Error::invalid(
                        "password_hash",
                        "must be a bcrypt hash ($2a$/$2b$/$2y$, cost 4-14) or an argon2id PHC \
                         hash (m at most 65536 KiB, t at most 10, p at most 4)",
                    ));
                }
                hash
            }
        };
        let created = now();
        let id = Uuid::now_v7();
        let username = input.username.as_str().to_owned();
        let display_name = input.display_name.as_str().to_owned();
        let role = input.role.as_str();
        let request_id = input.request_id;
        let mut event = Event::new(
            Some(caller.tenant_id),
            Actor::User(caller.user_id),
            "auth.user.created",
        )
        .target("user", id)
        .attribute("role", role);
        if let Some(request_id) = request_id {
            event = event.request_id(request_id);
        }
        let inserted = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    hafen_events::record(conn, &event).await?;
                    diesel::insert_into(users::table)
                        .values((
                            users::id.eq(id),
                            users::username.eq(&username),
                            users::display_name.eq(&display_name),
                            users::password_hash.eq(&hash),
                            users::role.eq(role),
                            users::status.eq(state::ACTIVE),
                            users::created_at.eq(created),
                            users::updated_at.eq(created),
                            users::create_request_id.eq(request_id),
                        ))
                        .returning(UserRow::as_returning())
                        .get_result(conn)
                        .await
                        .map_err(|err| {
                            if is_unique_violation(&err, "users_username_key") {
                                Error::AlreadyExists("username")
                            } else {
                                Error::from(err)
                            }
                        })
                })
            })
            .await?;
        self.audited();
        tracing::info!(tenant_id = %caller.tenant_id, user_id = %id, "user created");
        Ok(inserted)
    }

    async fn user_by_request(
        &self,
        tenant: Uuid,
        request_id: Uuid,
    ) -> Result<Option<UserRow>, Error> {
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                Ok(users::table
                    .filter(users::create_request_id.eq(request_id))
                    .select(UserRow::as_select())
                    .first(conn)
                    .await
                    .optional()?)
            })
        })
        .await
    }

    /// The user `id` of `tenant`; erased users count as missing.
    pub async fn user(&self, tenant: Uuid, id: Uuid) -> Result<UserRow, Error> {
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                users::table
                    .find(id)
                    .filter(users::status.ne(state::ERASED))
                    .select(UserRow::as_select())
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or(Error::NotFound("user"))
            })
        })
        .await
    }

    /// User `id`, erased or not.
    pub async fn any_user(&self, tenant: Uuid, id: Uuid) -> Result<UserRow, Error> {
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                users::table
                    .find(id)
                    .select(UserRow::as_select())
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or(Error::NotFound("user"))
            })
        })
        .await
    }

    /// Users ordered by username (ignoring case), after the keyset position `after`.
    pub async fn list_users(
        &self,
        caller: &Principal,
        after: Option<(String, Uuid)>,
        limit: usize,
        include_deactivated: bool,
    ) -> Result<UserPage, Error> {
        if include_deactivated {
            require_admin(caller)?;
        }
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let mut rows = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    let lower = diesel::dsl::sql::<diesel::sql_types::Text>("lower(username)");
                    let mut query = users::table
                        .select(UserRow::as_select())
                        .filter(users::status.ne(state::ERASED))
                        .order((lower.clone().asc(), users::id.asc()))
                        .limit(fetch)
                        .into_boxed();
                    if !include_deactivated {
                        query = query.filter(users::status.eq(state::ACTIVE));
                    }
                    if let Some((name, id)) = after {
                        query = query.filter(
                            diesel::dsl::sql::<diesel::sql_types::Bool>(
                                "(lower(username), id) > (",
                            )
                            .bind::<diesel::sql_types::Text, _>(name)
                            .sql(", ")
                            .bind::<diesel::sql_types::Uuid, _>(id)
                            .sql(")"),
                        );
                    }
                    Ok(query.load(conn).await?)
                })
            })
            .await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        Ok(UserPage { users: rows, more })
    }

    /// Changes a display name (self or admin) or a role (owner only).
    pub async fn update_user(
        &self,
        caller: &Principal,
        id: Uuid,
        display_name: Option<DisplayName>,
        role: Option<Role>,
    ) -> Result<UserRow, Error> {
        if display_name.is_some() && caller.user_id != id {
            require_admin(caller)?;
        }
        let current = self.user(caller.tenant_id, id).await?;
        if let Some(role) = role {
            if caller.role != Role::Owner {
                return Err(Error::PermissionDenied("only the owner may change roles"));
            }
            if role == Role::Owner {
                return Err(Error::invalid("user.role", "ROLE_OWNER cannot be assigned"));
            }
            if current.role() == Role::Owner {
                return Err(Error::OwnerProtected);
            }
        }
        let name = display_name.map(|n| n.as_str().to_owned());
        let new_role = role.map(Role::as_str);
        let event = new_role
            .filter(|role| *role != current.role().as_str())
            .map(|role| {
                Event::new(
                    Some(caller.tenant_id),
                    Actor::User(caller.user_id),
                    "auth.user.role_changed",
                )
                .target("user", id)
                .attribute("old_role", current.role().as_str())
                .attribute("new_role", role)
            });
        let updated = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    if let Some(event) = event {
                        hafen_events::record(conn, &event).await?;
                    }
                    let target = users::table.find(id);
                    let now = now();
                    if let Some(name) = name {
                        diesel::update(target)
                            .set((users::display_name.eq(name), users::updated_at.eq(now)))
                            .execute(conn)
                            .await?;
                    }
                    if let Some(role) = new_role {
                        diesel::update(target)
                            .set((users::role.eq(role), users::updated_at.eq(now)))
                            .execute(conn)
                            .await?;
                    }
                    Ok(target.select(UserRow::as_select()).first(conn).await?)
                })
            })
            .await?;
        if let Some(role) = role {
            let mut conn = self.control().await?;
            let live = sessions::set_role(&mut conn, caller.tenant_id, id, role.as_str()).await?;
            drop(conn);
            self.forget(&live).await;
            self.audited();
            tracing::info!(tenant_id = %caller.tenant_id, user_id = %id, role = role.as_str(), "role changed");
        }
        Ok(updated)
    }

    /// Deactivates a user by hand (GR6): no more logins, and every session ends at once.
    pub async fn deactivate(&self, caller: &Principal, id: Uuid) -> Result<UserRow, Error> {
        require_admin(caller)?;
        let current = self.user(caller.tenant_id, id).await?;
        if current.role() == Role::Owner {
            return Err(Error::OwnerProtected);
        }
        let event = Event::new(
            Some(caller.tenant_id),
            Actor::User(caller.user_id),
            "auth.user.deactivated",
        )
        .target("user", id);
        let updated = self
            .set_status(
                caller.tenant_id,
                id,
                state::ACTIVE,
                state::DEACTIVATED,
                event,
            )
            .await?;
        let ended = {
            let mut conn = self.control().await?;
            sessions::revoke_all(
                &mut conn,
                caller.tenant_id,
                sessions::Scope::User {
                    user: id,
                    keep: None,
                },
                RevokeReason::UserDeactivated.as_str(),
            )
            .await?
        };
        self.announce(&ended, RevokeReason::UserDeactivated).await;
        tracing::info!(tenant_id = %caller.tenant_id, user_id = %id, sessions = ended.len(), "user deactivated");
        Ok(updated)
    }

    /// Reactivates a deactivated user; ended sessions stay ended.
    pub async fn reactivate(&self, caller: &Principal, id: Uuid) -> Result<UserRow, Error> {
        require_admin(caller)?;
        self.user(caller.tenant_id, id).await?;
        let event = Event::new(
            Some(caller.tenant_id),
            Actor::User(caller.user_id),
            "auth.user.reactivated",
        )
        .target("user", id);
        // A waiting erasure request is cancelled before the account can log in again.
        self.cancel_erasure(caller.tenant_id, id).await?;
        let updated = self
            .set_status(
                caller.tenant_id,
                id,
                state::DEACTIVATED,
                state::ACTIVE,
                event,
            )
            .await?;
        tracing::info!(tenant_id = %caller.tenant_id, user_id = %id, "user reactivated");
        Ok(updated)
    }

    /// Moves a user from status `from` to `to` (a no-op in any other status, so both calls
    /// are idempotent) and returns the user as it is afterwards. `event` is recorded when the
    /// status changed.
    pub(crate) async fn set_status(
        &self,
        tenant: Uuid,
        id: Uuid,
        from: &'static str,
        to: &'static str,
        event: Event,
    ) -> Result<UserRow, Error> {
        let user = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    let now = now();
                    let deactivated_at = (to == state::DEACTIVATED).then_some(now);
                    let changed =
                        diesel::update(users::table.find(id).filter(users::status.eq(from)))
                            .set((
                                users::status.eq(to),
                                users::deactivated_at.eq(deactivated_at),
                                users::updated_at.eq(now),
                            ))
                            .execute(conn)
                            .await?;
                    if changed == 1 {
                        hafen_events::record(conn, &event).await?;
                    }
                    Ok(users::table
                        .find(id)
                        .select(UserRow::as_select())
                        .first(conn)
                        .await?)
                })
            })
            .await?;
        self.audited();
        Ok(user)
    }

    /// Re-authenticates the caller with their password (rate-limited like logins).
    pub async fn confirm_password(
        &self,
        caller: &Principal,
        password: Zeroizing<String>,
    ) -> Result<UserRow, Error> {
        let subject = format!("confirm:{}", caller.user_id);
        self.inner
            .limiter
            .acquire(&subject)
            .await
            .map_err(Error::RateLimited)?;
        let user = self.user(caller.tenant_id, caller.user_id).await?;
        let verified = self
            .verify(password, Some(user.password_hash.clone()))
            .await?;
        if !verified.matches {
            return Err(Error::ConfirmationFailed);
        }
        self.inner.limiter.succeeded(&subject).await;
        Ok(user)
    }

    /// Changes the caller's password; every other session of theirs ends.
    pub async fn change_password(
        &self,
        caller: &Principal,
        old: Zeroizing<String>,
        new: Zeroizing<String>,
    ) -> Result<(chrono::DateTime<chrono::Utc>, usize), Error> {
        self.check_new_password("new_password", &new)?;
        self.confirm_password(caller, old).await?;
        let hash = self.hash(new).await?;
        let id = caller.user_id;
        let changed = now();
        let event = Event::new(
            Some(caller.tenant_id),
            Actor::User(id),
            "auth.password.changed",
        )
        .target("user", id);
        self.scoped(caller.tenant_id, move |conn| {
            Box::pin(async move {
                hafen_events::record(conn, &event).await?;
                diesel::update(users::table.find(id))
                    .set((users::password_hash.eq(hash), users::updated_at.eq(changed)))
                    .execute(conn)
                    .await?;
                Ok(())
            })
        })
        .await?;
        let ended = {
            let mut conn = self.control().await?;
            sessions::revoke_all(
                &mut conn,
                caller.tenant_id,
                sessions::Scope::User {
                    user: id,
                    keep: Some(caller.session_id),
                },
                RevokeReason::PasswordChanged.as_str(),
            )
            .await?
        };
        self.announce(&ended, RevokeReason::PasswordChanged).await;
        tracing::info!(tenant_id = %caller.tenant_id, user_id = %id, sessions = ended.len(), "password changed");
        Ok((changed, ended.len()))
    }
}
