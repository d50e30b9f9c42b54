//! Replay of the deletion log after a backup restore (GR4, BX1).
//!
//! The deletion log (`hafen_keys.deletion_log`, in the key store) lists every deleted tenant and
//! erased user; it is kept apart from the backups, so a restore brings back data but not the
//! fact that it was deleted. The
//! replay looks for what came back and deletes it again:
//!
//! - a deleted tenant whose schema or role exists on any database, whose control-plane row is
//!   active, or whose key, user keys or sessions exist: its schema and role are dropped
//!   ([`hafen_store::tenancy::drop_schema`], placement databases first), its control-plane
//!   rows cleaned up as at deletion ([`hafen_store::control::blocking::mark_deleted`]) in
//!   one transaction on the main database, and then its keys destroyed in the key store;
//! - an erased user whose key or sessions exist: both are deleted again; and whose rows came
//!   back (an account not pseudonymised, messages with their bodies, memberships, chat
//!   codes): they are erased again ([`hafen_store::erasure::erase_rows`]);
//! - a visitor who deleted their data and whose key exists: it is deleted again;
//! - a message deleted by its sender or an admin whose body came back: it is a tombstone
//!   again, with a `message_deleted` event.
//!
//! Sessions ended this way are announced on Redis, so no cached session outlives them. The
//! replay is idempotent; a dry run only counts. Each replay is audited on the platform chain.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use diesel::prelude::*;
use diesel::sql_types::{Bool, Text};
use diesel_async::RunQueryDsl;
use hafen_authn::{Redis, RevokeReason};
use hafen_events::{Actor, Event, Relay};
use hafen_store::control::{self, status};
use hafen_store::keystore;
use hafen_store::schema::{deletion_log, sessions, tenant_keys, user_keys};
use hafen_store::tenancy::{self, SyncConnection};
use hafen_store::{DEFAULT_DATABASE, Databases, TenantId};
use uuid::Uuid;

use crate::error::Error;

/// A deletion-log entry: kind, tenant, user (or visit), message, time.
type LogEntry = (String, Uuid, Option<Uuid>, Option<Uuid>, DateTime<Utc>);

/// Deleted messages made tombstones again per transaction.
const MESSAGE_BATCH: usize = 500;

/// What a replay found (and, unless it was a dry run, deleted again). Counts only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Deletion-log entries examined.
    pub entries_checked: u64,
    /// Tenants that had reappeared.
    pub tenants_deleted: u64,
    /// Users whose key or sessions had reappeared.
    pub users_erased: u64,
    /// Deleted messages whose bodies had reappeared.
    pub messages_deleted: u64,
}

/// What is left of a deleted tenant.
#[derive(Debug, Default)]
struct TenantTraces {
    /// Its control-plane row, with its placement.
    row: Option<(String, String)>,
    /// Databases holding its schema or (on their cluster) its role.
    databases: Vec<String>,
    key: bool,
    user_keys: i64,
    sessions: i64,
}

impl TenantTraces {
    fn control_rows_left(&self) -> bool {
        self.row
            .as_ref()
            .is_some_and(|(state, _)| state == status::ACTIVE)
            || self.key
            || self.user_keys > 0
            || self.sessions > 0
    }

    fn reappeared(&self) -> bool {
        self.control_rows_left() || !self.databases.is_empty()
    }
}

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = Bool)]
    schema: bool,
    #[diesel(sql_type = Bool)]
    role: bool,
}

/// Applies the deletion log again.
#[derive(Clone)]
pub struct Replayer {
    databases: Databases,
    redis: Option<Redis>,
    relay: Option<Relay>,
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer").finish_non_exhaustive()
    }
}

impl Replayer {
    /// Replays over `databases`; ended sessions are announced on `redis` (when given), and
    /// `relay` (when given) is woken after the audit event.
    pub fn new(databases: Databases, redis: Option<Redis>, relay: Option<Relay>) -> Self {
        Self {
            databases,
            redis,
            relay,
        }
    }

    /// Deletes again whatever the deletion log lists and a restore brought back; with
    /// `dry_run`, only counts. Every entry is tried; the first failure is returned after
    /// the others were done (running again is safe).
    pub async fn replay(&self, dry_run: bool, actor: Actor) -> Result<ReplayReport, Error> {
        let logged: Vec<LogEntry> = {
            let mut conn = self.databases.keystore_connection().await?;
            deletion_log::table
                .order((deletion_log::deleted_at.asc(), deletion_log::id.asc()))
                .select((
                    deletion_log::kind,
                    deletion_log::tenant_id,
                    deletion_log::user_id,
                    deletion_log::message_id,
                    deletion_log::deleted_at,
                ))
                .load(&mut conn)
                .await?
        };
        // Deleted messages, by tenant, with when they were deleted.
        let mut deleted_messages: BTreeMap<Uuid, Vec<(Uuid, DateTime<Utc>)>> = BTreeMap::new();
        for (kind, tenant, _, message, at) in &logged {
            if let (true, Some(message)) = (kind == "message", message) {
                deleted_messages
                    .entry(*tenant)
                    .or_default()
                    .push((*message, *at));
            }
        }
        let entries: Vec<(String, Uuid, Option<Uuid>)> = logged
            .into_iter()
            .map(|(kind, tenant, user, _, _)| (kind, tenant, user))
            .collect();
        let mut report = ReplayReport {
            entries_checked: u64::try_from(entries.len()).unwrap_or(u64::MAX),
            ..ReplayReport::default()
        };
        let deleted_tenants: BTreeSet<Uuid> = entries
            .iter()
            .filter(|(kind, _, _)| kind == "tenant")
            .map(|(_, tenant, _)| *tenant)
            .collect();
        // (tenant, user, whether a user rather than a visitor)
        let erased_users: BTreeSet<(Uuid, Uuid, bool)> = entries
            .iter()
            .filter_map(|(kind, tenant, user)| match (kind.as_str(), user) {
                // A visitor's key is kept under their visit's id, like a user's.
                (kind @ ("user" | "visitor"), Some(user)) if !deleted_tenants.contains(tenant) => {
                    Some((*tenant, *user, kind == "user"))
                }
                _ => None,
            })
            .collect();

        let mut first_error = None;
        for tenant in &deleted_tenants {
            match self.tenant(*tenant, dry_run).await {
                Ok(true) => report.tenants_deleted += 1,
                Ok(false) => {}
                Err(err) => {
                    tracing::error!(tenant_id = %tenant, error = %err, "deleted tenant not deleted again");
                    first_error.get_or_insert(err);
                }
            }
        }
        for (tenant, user, is_user) in &erased_users {
            match self.user(*tenant, *user, *is_user, dry_run).await {
                Ok(true) => report.users_erased += 1,
                Ok(false) => {}
                Err(err) => {
                    tracing::error!(tenant_id = %tenant, user_id = %user, error = %err, "erased user not erased again");
                    first_error.get_or_insert(err);
                }
            }
        }

        for (tenant, messages) in &deleted_messages {
            if deleted_tenants.contains(tenant) {
                continue;
            }
            match self.messages(*tenant, messages, dry_run).await {
                Ok(found) => report.messages_deleted += found,
                Err(err) => {
                    tracing::error!(tenant_id = %tenant, error = %err, "deleted messages not deleted again");
                    first_error.get_or_insert(err);
                }
            }
        }

        let mut event = Event::new(None, actor, "retention.deletions.replayed")
            .attribute("entries_checked", report.entries_checked)
            .attribute("tenants_deleted", report.tenants_deleted)
            .attribute("users_erased", report.users_erased)
            .attribute("messages_deleted", report.messages_deleted)
            .attribute("dry_run", dry_run);
        if first_error.is_some() {
            event = event.failed();
        }
        hafen_events::record_alone(self.databases.main(), &event).await;
        if let Some(relay) = &self.relay {
            relay.wake();
        }
        tracing::info!(
            entries_checked = report.entries_checked,
            tenants_deleted = report.tenants_deleted,
            users_erased = report.users_erased,
            messages_deleted = report.messages_deleted,
            dry_run,
            "deletion log replayed"
        );
        match first_error {
            Some(err) => Err(err),
            None => Ok(report),
        }
    }

    /// Makes the deleted `messages` of `tenant` that a restore brought back tombstones again
    /// (unless `dry_run`, which only counts them); how many had come back.
    async fn messages(
        &self,
        tenant: Uuid,
        messages: &[(Uuid, DateTime<Utc>)],
        dry_run: bool,
    ) -> Result<u64, Error> {
        let id = TenantId::from(tenant);
        let pool = match self.databases.tenant_pool(&id).await {
            Ok(pool) => pool,
            // The organisation itself is gone: nothing of it is left.
            Err(hafen_store::Error::UnknownTenant) => return Ok(0),
            Err(err) => return Err(err.into()),
        };
        let mut found = 0;
        for batch in messages.chunks(MESSAGE_BATCH) {
            let ids: Vec<Uuid> = batch.iter().map(|(message, _)| *message).collect();
            let at = batch
                .iter()
                .map(|(_, at)| *at)
                .max()
                .unwrap_or_else(hafen_store::now);
            found += hafen_store::with_tenant(&pool, &id, move |conn| {
                Box::pin(async move {
                    Ok::<_, Error>(
                        hafen_store::erasure::delete_messages_again(conn, &ids, at, dry_run)
                            .await?,
                    )
                })
            })
            .await?;
        }
        if found > 0 && !dry_run {
            if let Some(redis) = &self.redis
                && let Err(err) = redis.publish_events(tenant).await
            {
                tracing::warn!(error = %err, "streams not woken after deletions were replayed");
            }
            tracing::warn!(tenant_id = %tenant, messages = found, "deleted messages reappeared and were deleted again");
        }
        Ok(found)
    }

    /// Looks for what is left of a deleted tenant and, unless `dry_run`, deletes it again.
    /// Returns whether anything had reappeared.
    async fn tenant(&self, tenant: Uuid, dry_run: bool) -> Result<bool, Error> {
        let traces = self.traces(tenant).await?;
        if !traces.reappeared() {
            return Ok(false);
        }
        tracing::warn!(tenant_id = %tenant, dry_run, "a deleted tenant reappeared");
        if dry_run {
            return Ok(true);
        }
        let mut urls = Vec::new();
        for name in &traces.databases {
            let url = self
                .databases
                .url(name)
                .ok_or_else(|| Error::Config(format!("unknown database {name}")))?;
            urls.push((name == DEFAULT_DATABASE, url.to_owned()));
        }
        // Placement databases first: the control plane says "deleted" only once the data is.
        urls.sort_by_key(|(main, _)| *main);
        let main_url = self.databases.main_url().to_owned();
        let keystore_url =
            (traces.key || traces.user_keys > 0).then(|| self.databases.keystore_url().to_owned());
        let clean_control = traces.control_rows_left();
        let ended = tokio::task::spawn_blocking(move || {
            delete_tenant_blocking(
                TenantId::from(tenant),
                &urls,
                &main_url,
                clean_control,
                keystore_url.as_deref(),
            )
        })
        .await??;
        self.announce(&ended, RevokeReason::TenantDeleted).await;
        if let Some(redis) = &self.redis {
            redis.announce_tenant_deleted(tenant).await;
        }
        tracing::info!(tenant_id = %tenant, "deleted tenant deleted again");
        Ok(true)
    }

    async fn traces(&self, tenant: Uuid) -> Result<TenantTraces, Error> {
        let name = TenantId::from(tenant).schema();
        let mut traces = TenantTraces::default();
        {
            let mut conn = self.databases.main_connection().await?;
            traces.row = control::find(&mut conn, tenant)
                .await?
                .map(|row| (row.status, row.database_name));
            traces.sessions = sessions::table
                .filter(sessions::tenant_id.eq(tenant))
                .count()
                .get_result(&mut conn)
                .await?;
        }
        {
            let mut conn = self.databases.keystore_connection().await?;
            traces.key = diesel::select(diesel::dsl::exists(tenant_keys::table.find(tenant)))
                .get_result(&mut conn)
                .await?;
            traces.user_keys = user_keys::table
                .filter(user_keys::tenant_id.eq(tenant))
                .count()
                .get_result(&mut conn)
                .await?;
        }
        for database in self.databases.names() {
            let Some(pool) = self.databases.pool(&database) else {
                continue;
            };
            let mut conn = pool.get().await.map_err(hafen_store::Error::from)?;
            let found: Found = diesel::sql_query(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) AS schema, \
                        EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS role",
            )
            .bind::<Text, _>(&name)
            .get_result(&mut conn)
            .await?;
            if found.schema || found.role {
                traces.databases.push(database);
            }
        }
        Ok(traces)
    }

    /// Deletes an erased user's (or visitor's) key and sessions again and erases a user's rows
    /// again, unless `dry_run`. Returns whether any had reappeared.
    async fn user(
        &self,
        tenant: Uuid,
        user: Uuid,
        is_user: bool,
        dry_run: bool,
    ) -> Result<bool, Error> {
        let rows = if is_user {
            self.user_rows(tenant, user, dry_run).await?
        } else {
            false
        };
        let key_filter = user_keys::table
            .filter(user_keys::tenant_id.eq(tenant))
            .filter(user_keys::user_id.eq(user));
        let session_filter = sessions::table
            .filter(sessions::tenant_id.eq(tenant))
            .filter(sessions::user_id.eq(user));
        let mut keystore = self.databases.keystore_connection().await?;
        let mut control = self.databases.main_connection().await?;
        if dry_run {
            let keys: i64 = key_filter.count().get_result(&mut keystore).await?;
            let sessions: i64 = session_filter.count().get_result(&mut control).await?;
            return Ok(rows || keys + sessions > 0);
        }
        let keys = diesel::delete(key_filter).execute(&mut keystore).await?;
        let ended: Vec<Uuid> = diesel::delete(session_filter)
            .returning(sessions::id)
            .get_results(&mut control)
            .await?;
        if keys == 0 && ended.is_empty() {
            return Ok(rows);
        }
        self.announce(&ended, RevokeReason::UserDeactivated).await;
        tracing::info!(tenant_id = %tenant, user_id = %user, "erased user's key and sessions deleted again");
        Ok(true)
    }

    /// Erases again what the tenant's schema holds of an erased user after a restore, unless
    /// `dry_run`; whether anything was there. The key went first (the caller's next step is
    /// only the clean-up of a key that came back with a control-plane restore).
    async fn user_rows(&self, tenant: Uuid, user: Uuid, dry_run: bool) -> Result<bool, Error> {
        let id = TenantId::from(tenant);
        let pool = match self.databases.tenant_pool(&id).await {
            Ok(pool) => pool,
            // The organisation itself is gone: nothing of it is left to erase.
            Err(hafen_store::Error::UnknownTenant) => return Ok(false),
            Err(err) => return Err(err.into()),
        };
        let found = hafen_store::with_tenant(&pool, &id, move |conn| {
            Box::pin(
                async move { Ok::<_, Error>(hafen_store::erasure::remains(conn, user).await?) },
            )
        })
        .await?;
        if found && !dry_run {
            hafen_store::erasure::erase_rows(&pool, &id, user, hafen_store::now(), |_, _| {
                Box::pin(async { Ok(()) })
            })
            .await?;
        }
        if found && !dry_run {
            if let Some(redis) = &self.redis
                && let Err(err) = redis.publish_events(tenant).await
            {
                tracing::warn!(error = %err, "streams not woken after an erasure was replayed");
            }
            tracing::warn!(tenant_id = %tenant, user_id = %user, "an erased user's rows reappeared and were erased again");
        }
        Ok(found)
    }

    /// Tells every service that `sessions` ended (they may be cached since the restore);
    /// retried in the background when Redis is down.
    async fn announce(&self, sessions: &[Uuid], reason: RevokeReason) {
        if let Some(redis) = &self.redis {
            redis.announce(sessions, reason).await;
        }
    }
}

/// Drops the tenant's schema and role on each database in `urls` (placements first), the
/// last step on the main database together with the control-plane clean-up; then destroys its
/// keys in the key store at `keystore_url`, if given. Returns the sessions that ended.
fn delete_tenant_blocking(
    tenant: TenantId,
    urls: &[(bool, String)],
    main_url: &str,
    clean_control: bool,
    keystore_url: Option<&str>,
) -> Result<Vec<Uuid>, Error> {
    for (is_main, url) in urls {
        if *is_main {
            continue;
        }
        let mut placed =
            hafen_store::connect::establish_sync(url).map_err(hafen_store::Error::from)?;
        placed.transaction(|conn| drop_everywhere(conn, &tenant))?;
    }
    let on_main = urls.iter().any(|(is_main, _)| *is_main);
    let mut main =
        hafen_store::connect::establish_sync(main_url).map_err(hafen_store::Error::from)?;
    let ended = main.transaction(|conn| -> Result<_, Error> {
        if on_main {
            drop_everywhere(conn, &tenant)?;
        }
        if clean_control {
            let (_, ended) = control::blocking::mark_deleted(conn, tenant.as_uuid())?;
            return Ok(ended);
        }
        Ok(Vec::new())
    })?;
    if let Some(url) = keystore_url {
        let mut keys =
            hafen_store::connect::establish_sync(url).map_err(hafen_store::Error::from)?;
        keys.transaction(|conn| {
            keystore::blocking::destroy_tenant_keys(conn, tenant.as_uuid(), hafen_store::now())
        })?;
    }
    Ok(ended)
}

/// [`tenancy::drop_schema`]; a schema left without its role (restored without owners) is
/// dropped by the login role, which then owns it.
fn drop_everywhere(conn: &mut SyncConnection, tenant: &TenantId) -> Result<(), Error> {
    use diesel::connection::SimpleConnection as _;
    tenancy::drop_schema(conn, tenant)?;
    conn.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {} CASCADE",
        tenant.schema()
    ))?;
    Ok(())
}
