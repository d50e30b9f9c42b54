//! Erasure of users (GDPR Art. 17, BX1): EraseUser by an admin or the owner, and a user's own
//! RequestErasure, carried out at once or, after the organisation's grace period, by
//! [`Auth::erase_due`]. The steps are [`hafen_store::erasure`]'s, in its order.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_authn::{Principal, RevokeReason, Role};
use hafen_events::{Actor, Event};
use hafen_proto::auth::v1 as pb;
use hafen_store::schema::{erasure_requests, users};
use hafen_store::{TenantId, sessions};
use uuid::Uuid;

use crate::auth::Auth;
use crate::error::Error;
use crate::rows::{UserRow, now, state, timestamp};
use crate::users::require_admin;

/// How often [`Auth::erase_due`] looks for requests whose grace period ended.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// How long a due request waits before it is tried again while a legal hold stops it.
const HELD_RETRY: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// Most requests carried out in one sweep.
const SWEEP_BATCH: i64 = 100;

/// Messages of an erased user made tombstones before EraseUser answers; the rest follow in the
/// background, paced (their ciphertext is unreadable from the start either way).
pub const TOMBSTONES_AT_ONCE: usize = 1000;

/// How long the background tombstoning rests after each batch, as a multiple of the batch's
/// time: it takes at most a fifth of one database connection's time, so live sends keep
/// their latency.
const TOMBSTONE_REST: f64 = 4.0;

/// How long another replica leaves an erasure whose tombstoning one replica runs before it
/// takes it over (the first one stopped, say).
const TOMBSTONE_LEASE: chrono::TimeDelta = chrono::TimeDelta::minutes(10);

impl Auth {
    /// EraseUser: admins erase members, the owner erases admins and members.
    pub async fn erase_user(&self, caller: &Principal, id: Uuid) -> Result<UserRow, Error> {
        require_admin(caller)?;
        let target = self.any_user(caller.tenant_id, id).await?;
        if target.role() == Role::Owner {
            return Err(Error::OwnerProtected);
        }
        if target.role() == Role::Admin && caller.role != Role::Owner {
            return Err(Error::PermissionDenied("only the owner erases admins"));
        }
        self.erase(caller.tenant_id, id, Actor::User(caller.user_id))
            .await
    }

    /// RequestErasure: the caller's own erasure, at once without a grace period; else the
    /// account is deactivated and the request kept until it is due.
    pub async fn request_erasure(&self, caller: &Principal) -> Result<pb::User, Error> {
        if caller.role == Role::Owner {
            return Err(Error::OwnerProtected);
        }
        let (tenant, me) = (caller.tenant_id, caller.user_id);
        let grace = self.inner.policy.erasure_grace;
        if grace.is_zero() {
            let erased = self.erase(tenant, me, Actor::User(me)).await?;
            return Ok(erased.to_proto());
        }
        let requested = now();
        let due = requested + chrono::TimeDelta::from_std(grace).unwrap_or(chrono::TimeDelta::MAX);
        {
            let mut conn = self.control().await?;
            diesel::insert_into(erasure_requests::table)
                .values((
                    erasure_requests::tenant_id.eq(tenant),
                    erasure_requests::user_id.eq(me),
                    erasure_requests::requested_at.eq(requested),
                    erasure_requests::due_at.eq(due),
                ))
                .on_conflict((erasure_requests::tenant_id, erasure_requests::user_id))
                .do_nothing()
                .execute(&mut conn)
                .await?;
        }
        let event = Event::new(Some(tenant), Actor::User(me), "auth.user.erasure_requested")
            .target("user", me)
            .attribute("due_at", due.to_rfc3339());
        let row = self
            .set_status(tenant, me, state::ACTIVE, state::DEACTIVATED, event)
            .await?;
        self.end_sessions(tenant, me, RevokeReason::UserDeactivated)
            .await?;
        tracing::info!(tenant_id = %tenant, user_id = %me, "user asked for their erasure");
        let mut user = row.to_proto();
        user.erasure_due_time = self
            .erasure_due(tenant, &[me])
            .await?
            .get(&me)
            .map(|at| timestamp(*at));
        Ok(user)
    }

    /// When the erasure requests of `users` of `tenant` are due, for those with one.
    pub async fn erasure_due(
        &self,
        tenant: Uuid,
        users: &[Uuid],
    ) -> Result<HashMap<Uuid, DateTime<Utc>>, Error> {
        if users.is_empty() {
            return Ok(HashMap::new());
        }
        let mut conn = self.control().await?;
        let due: Vec<(Uuid, DateTime<Utc>)> = erasure_requests::table
            .filter(erasure_requests::tenant_id.eq(tenant))
            .filter(erasure_requests::user_id.eq_any(users))
            .select((erasure_requests::user_id, erasure_requests::due_at))
            .load(&mut conn)
            .await?;
        Ok(due.into_iter().collect())
    }

    /// The API form of `rows` of `tenant`, with their erasure requests' due times.
    pub async fn users_proto(
        &self,
        tenant: Uuid,
        rows: &[UserRow],
    ) -> Result<Vec<pb::User>, Error> {
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        let due = self.erasure_due(tenant, &ids).await?;
        Ok(rows
            .iter()
            .map(|row| {
                let mut user = row.to_proto();
                // An erased user's request only marks tombstoning still under way.
                if row.status != state::ERASED {
                    user.erasure_due_time = due.get(&row.id).map(|at| timestamp(*at));
                }
                user
            })
            .collect())
    }

    /// Cancels the erasure request of `user` of `tenant`, if one waits.
    pub async fn cancel_erasure(&self, tenant: Uuid, user: Uuid) -> Result<(), Error> {
        let mut conn = self.control().await?;
        diesel::delete(erasure_requests::table.find((tenant, user)))
            .execute(&mut conn)
            .await?;
        Ok(())
    }

    /// Carries out the erasure of `user` of `tenant` (see [`hafen_store::erasure`]): refused
    /// while a legal hold covers them; then their sessions end and are deleted, their key is destroyed and
    /// logged, and their rows are erased, with the audit event `auth.user.erased` once. Safe
    /// to run again on a user whose erasure stopped midway, or is complete.
    pub(crate) async fn erase(
        &self,
        tenant: Uuid,
        user: Uuid,
        actor: Actor,
    ) -> Result<UserRow, Error> {
        // Nothing is destroyed while a hold covers the user; until the rows are erased, the
        // account cannot log in.
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                let status: String = users::table
                    .find(user)
                    .select(users::status)
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or(Error::NotFound("user"))?;
                if status == state::ERASED {
                    return Ok(());
                }
                if hafen_store::erasure::held(conn, user).await? {
                    return Err(Error::LegalHold);
                }
                if status == state::ACTIVE {
                    diesel::update(users::table.find(user))
                        .set((
                            users::status.eq(state::DEACTIVATED),
                            users::deactivated_at.eq(now()),
                        ))
                        .execute(conn)
                        .await?;
                }
                Ok(())
            })
        })
        .await?;
        self.end_sessions(tenant, user, RevokeReason::UserDeactivated)
            .await?;
        // Ended sessions stay listed for a while, with their device labels; an erased user's
        // go at once (GR3).
        {
            let mut conn = self.control().await?;
            sessions::delete_user(&mut conn, tenant, user).await?;
        }
        let at = now();
        {
            let mut conn = self.inner.databases.keystore_connection().await?;
            hafen_store::erasure::destroy_key(
                &mut conn,
                hafen_store::erasure::Subject::User,
                tenant,
                user,
                at,
            )
            .await?;
        }
        let event = Event::new(Some(tenant), actor, "auth.user.erased").target("user", user);
        let id = TenantId::from(tenant);
        let pool = self.inner.databases.tenant_pool(&id).await?;
        let pending = hafen_store::with_tenant(&pool, &id, move |conn| {
            Box::pin(async move {
                Ok::<_, Error>(hafen_store::erasure::pending_messages(conn, user).await?)
            })
        })
        .await?;
        let (now_ids, later_ids) = pending.split_at(pending.len().min(TOMBSTONES_AT_ONCE));
        hafen_store::erasure::erase_messages_paced(&pool, &id, now_ids, at, 0.0).await?;
        if !later_ids.is_empty() {
            // The request stays (due after the lease) until every message is a tombstone, so
            // an erasure whose tombstoning stopped with this process is completed by a sweep.
            let mut conn = self.control().await?;
            diesel::insert_into(erasure_requests::table)
                .values((
                    erasure_requests::tenant_id.eq(tenant),
                    erasure_requests::user_id.eq(user),
                    erasure_requests::requested_at.eq(at),
                    erasure_requests::due_at.eq(at + TOMBSTONE_LEASE),
                ))
                .on_conflict((erasure_requests::tenant_id, erasure_requests::user_id))
                .do_update()
                .set(erasure_requests::due_at.eq(at + TOMBSTONE_LEASE))
                .execute(&mut conn)
                .await?;
        }
        let messages = u64::try_from(pending.len()).unwrap_or(u64::MAX);
        let erased = hafen_store::erasure::erase_account_rows(
            &pool,
            &id,
            user,
            at,
            messages,
            move |conn, erased| {
                Box::pin(async move {
                    // Once, with the erasure that pseudonymised the account.
                    if erased.account {
                        let event = event
                            .attribute("messages", erased.messages)
                            .attribute("memberships", erased.memberships)
                            .attribute("chat_codes", erased.chat_codes);
                        hafen_events::record(conn, &event).await?;
                    }
                    Ok(())
                })
            },
        )
        .await?;
        let row = self.any_user(tenant, user).await?;
        self.audited();
        if later_ids.is_empty() {
            self.cancel_erasure(tenant, user).await?;
        } else {
            self.tombstone_later(tenant, user, pool.clone(), later_ids.to_vec(), at);
        }
        if erased.any()
            && let Some(redis) = &self.inner.redis
            && let Err(err) = redis.publish_events(tenant).await
        {
            // Streams poll as well; they see the tombstones a moment later.
            tracing::warn!(error = %err, "streams not woken after an erasure");
        }
        tracing::info!(
            tenant_id = %tenant,
            user_id = %user,
            messages = erased.messages,
            memberships = erased.memberships,
            "user erased"
        );
        Ok(row)
    }

    /// Makes `ids`, messages of the erased `user`, tombstones in the background, paced; then
    /// ends their erasure request. Not twice at once in this process.
    fn tombstone_later(
        &self,
        tenant: Uuid,
        user: Uuid,
        pool: hafen_store::Pool,
        ids: Vec<Uuid>,
        at: DateTime<Utc>,
    ) {
        let running = self
            .inner
            .tombstoning
            .lock()
            .map(|mut set| !set.insert((tenant, user)))
            .unwrap_or(true);
        if running {
            return;
        }
        let auth = self.clone();
        tokio::spawn(async move {
            let id = TenantId::from(tenant);
            let done =
                hafen_store::erasure::erase_messages_paced(&pool, &id, &ids, at, TOMBSTONE_REST)
                    .await;
            match done {
                Ok(count) => {
                    if let Err(err) = auth.cancel_erasure(tenant, user).await {
                        tracing::warn!(tenant_id = %tenant, user_id = %user, error = %err, "erasure request not ended");
                    }
                    tracing::info!(tenant_id = %tenant, user_id = %user, messages = count, "erased user's messages are tombstones");
                }
                Err(err) => {
                    tracing::warn!(tenant_id = %tenant, user_id = %user, error = %err, "tombstoning stopped; a sweep completes it");
                }
            }
            if let Some(redis) = &auth.inner.redis
                && let Err(err) = redis.publish_events(tenant).await
            {
                tracing::warn!(error = %err, "streams not woken after tombstoning");
            }
            if let Ok(mut set) = auth.inner.tombstoning.lock() {
                set.remove(&(tenant, user));
            }
        });
    }

    /// Ends every session of `user` of `tenant`, everywhere.
    async fn end_sessions(
        &self,
        tenant: Uuid,
        user: Uuid,
        reason: RevokeReason,
    ) -> Result<(), Error> {
        let ended = {
            let mut conn = self.control().await?;
            sessions::revoke_all(
                &mut conn,
                tenant,
                sessions::Scope::User { user, keep: None },
                reason.as_str(),
            )
            .await?
        };
        self.announce(&ended, reason).await;
        Ok(())
    }

    /// Carries out the erasure requests whose grace period ended; returns how many users were
    /// erased. A request a legal hold stops is tried again an hour later; one that fails
    /// otherwise (its database unreachable, say) does not hold up the others, and its error is
    /// returned after them.
    pub async fn erase_due(&self) -> Result<usize, Error> {
        let due: Vec<(Uuid, Uuid)> = {
            let mut conn = self.control().await?;
            erasure_requests::table
                .filter(erasure_requests::due_at.le(now()))
                .order(erasure_requests::due_at.asc())
                .limit(SWEEP_BATCH)
                .select((erasure_requests::tenant_id, erasure_requests::user_id))
                .load(&mut conn)
                .await?
        };
        let mut erased = 0;
        let mut first_error = None;
        for (tenant, user) in due {
            let here = self
                .inner
                .tombstoning
                .lock()
                .is_ok_and(|set| set.contains(&(tenant, user)));
            if here {
                continue;
            }
            match self.erase(tenant, user, Actor::Service(crate::NAME)).await {
                Ok(_) => erased += 1,
                Err(Error::LegalHold) => {
                    let mut conn = self.control().await?;
                    diesel::update(erasure_requests::table.find((tenant, user)))
                        .set(erasure_requests::due_at.eq(now() + HELD_RETRY))
                        .execute(&mut conn)
                        .await?;
                    tracing::info!(tenant_id = %tenant, user_id = %user, "erasure waits for a legal hold");
                }
                Err(Error::NotFound(_) | Error::Store(hafen_store::Error::UnknownTenant)) => {
                    // The user or their organisation is gone already.
                    self.cancel_erasure(tenant, user).await?;
                }
                Err(err) => {
                    tracing::warn!(tenant_id = %tenant, user_id = %user, error = %err, "due erasure failed; trying again");
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(erased),
        }
    }

    /// Runs [`Auth::erase_due`] every [`SWEEP_EVERY`] for the life of the process.
    pub fn spawn_erasure_sweep(&self) {
        let auth = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(err) = auth.erase_due().await {
                    tracing::warn!(error = %err, "due erasures not carried out; trying again");
                }
            }
        });
    }
}
