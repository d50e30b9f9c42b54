//! The purge job (CB5): deletes a tenant's expired messages, with their events, in bounded
//! and throttled batches, so live traffic keeps its latency.
//!
//! Retention is age-based: a message expires when its `created_at` is older than the period
//! that applies to its conversation (the tenant's, or the conversation's own shorter one),
//! however quiet the conversation is. Messages in a held conversation or sent by a held user
//! are never deleted; they are counted as `held_skipped`.
//!
//! A run works through keyset-ordered scopes: first every message older than the tenant's
//! period (the `created_at` index), then, per conversation with a shorter period, the messages
//! between the two cut-offs (the conversation's sequence index). Each batch is one statement
//! in its own transaction: it advances the run's heartbeat and counts, examines at most
//! `purge_batch` messages, deletes the unheld ones (by the `ctid` it read them at) and their
//! `events` rows, and reports what it did. It runs after a SHARE lock on `legal_holds`, so a hold committed before the batch
//! is always seen, and one placed during it waits for the batch to end. `purge_pause`
//! separates two batches.
//!
//! A batch costs one round trip: the run keeps one connection, and pipelines `BEGIN`, the
//! tenant's scope (the statement `with_tenant` enters it with), the lock, the batch and
//! `COMMIT`. Everything else here goes through [`hafen_store::with_tenant`].
//!
//! `purge_runs` allows one running run per tenant. A run whose heartbeat stopped for a minute
//! (its process died) is taken over: marked failed, and a new run starts; a batch of a run
//! that was taken over deletes nothing. Every run ends with its final counts and the
//! `retention.purge.completed` audit event (counts only) in one transaction.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Timestamptz};
use diesel_async::RunQueryDsl;
use hafen_events::{Actor, Event, Relay};
use hafen_store::prepared::Prepared;
use hafen_store::schema::{conversations, purge_runs};
use hafen_store::{AsyncPgConnection, Databases, Pool, TenantId, now};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::PurgeArgs;
use crate::error::Error;
use crate::policy::tenant_period;
use crate::rows::{PurgeRunRow, state, trigger};

/// A running run whose heartbeat is older than this is taken over as failed.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// The audit actor of scheduled runs.
const SCHEDULER: &str = "retention.purge";

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The background schedule.
    Scheduled,
    /// RunPurge by the admin with this id.
    Manual(Uuid),
}

impl Trigger {
    fn stored(self) -> &'static str {
        match self {
            Trigger::Scheduled => trigger::SCHEDULED,
            Trigger::Manual(_) => trigger::MANUAL,
        }
    }

    fn user(self) -> Option<Uuid> {
        match self {
            Trigger::Scheduled => None,
            Trigger::Manual(user) => Some(user),
        }
    }

    fn actor(self) -> Actor {
        match self {
            Trigger::Scheduled => Actor::System(SCHEDULER),
            Trigger::Manual(user) => Actor::User(user),
        }
    }
}

/// A batch in the tenant's scope, and in one conversation's (see the module documentation).
/// Both raise each conversation's sequence floor (`conversations.last_sequence`) to the
/// highest sequence deleted: sends number after the newest message left, or after the floor,
/// so a conversation purged to its last message never gives a sequence twice.
///
/// Messages are deleted by the `ctid` the candidate scan read, in one TID scan, and events by
/// one index scan over the array of ids: no per-row join. A message that a concurrent edit
/// moved to a new version between the scan and the delete is not deleted (its old `ctid` no
/// longer matches); the batch reports fewer deletions than unheld candidates, and the run
/// examines the same range once more.
const TENANT_BATCH: &str = include_str!("purge/tenant_batch.sql");
const CONVERSATION_BATCH: &str = include_str!("purge/conversation_batch.sql");

/// What one batch did.
#[derive(Debug, QueryableByName)]
struct Batch {
    #[diesel(sql_type = BigInt)]
    claimed: i64,
    #[diesel(sql_type = BigInt)]
    examined: i64,
    #[diesel(sql_type = BigInt)]
    held: i64,
    #[diesel(sql_type = BigInt)]
    deleted: i64,
    #[diesel(sql_type = Nullable<Array<diesel::sql_types::Uuid>>)]
    conversations: Option<Vec<Uuid>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    last_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    last_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<BigInt>)]
    last_sequence: Option<i64>,
}

/// A scope of a run, and where it continues.
#[derive(Debug, Clone, Copy)]
enum Cursor {
    /// Every message older than the tenant's cut-off, by (created_at, id).
    Tenant {
        cutoff: DateTime<Utc>,
        at: DateTime<Utc>,
        id: Uuid,
    },
    /// One conversation's messages between the tenant's cut-off and its own, by sequence.
    Conversation {
        cutoff: DateTime<Utc>,
        tenant_cutoff: DateTime<Utc>,
        id: Uuid,
        after: i64,
    },
}

impl Cursor {
    /// The cursor after `batch`; `None` when the batch examined nothing.
    fn after(self, batch: &Batch) -> Option<Self> {
        match self {
            Cursor::Tenant { cutoff, .. } => Some(Cursor::Tenant {
                cutoff,
                at: batch.last_at?,
                id: batch.last_id?,
            }),
            Cursor::Conversation {
                cutoff,
                tenant_cutoff,
                id,
                ..
            } => Some(Cursor::Conversation {
                cutoff,
                tenant_cutoff,
                id,
                after: batch.last_sequence?,
            }),
        }
    }
}

/// Counts of a run so far.
#[derive(Debug, Clone, Default)]
struct Progress {
    deleted: i64,
    held: i64,
    touched: HashSet<Uuid>,
    /// The website chat's part.
    visits: crate::visits::Purged,
}

impl Progress {
    fn touched(&self) -> i64 {
        i64::try_from(self.touched.len()).unwrap_or(i64::MAX)
    }
}

/// The purge job of every tenant.
#[derive(Clone)]
pub struct Purger {
    inner: Arc<Inner>,
}

struct Inner {
    databases: Databases,
    args: PurgeArgs,
    relay: Option<Relay>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for Purger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Purger")
            .field("args", &self.inner.args)
            .finish_non_exhaustive()
    }
}

impl Purger {
    /// The purge job over `databases` with batch size and pause from `args`; `relay` (if
    /// any) is woken after each run's audit event.
    pub fn new(databases: Databases, args: PurgeArgs, relay: Option<Relay>) -> Self {
        Self {
            inner: Arc::new(Inner {
                databases,
                args,
                relay,
                stop: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        }
    }

    /// Stops the schedule and every run between two batches (runs end as failed; the next
    /// run continues); new runs are refused.
    pub fn stop(&self) {
        self.inner.stop.cancel();
    }

    /// [`Purger::stop`], then waits up to `timeout` for the runs to record how they ended.
    pub async fn shutdown(&self, timeout: Duration) {
        self.stop();
        self.inner.tasks.close();
        if tokio::time::timeout(timeout, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("purge runs did not stop in time");
        }
    }

    /// Purges every active tenant every `purge_interval`, in the background, until
    /// [`Purger::shutdown`]. The first round starts one interval after this call.
    pub fn schedule(&self) {
        let this = self.clone();
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    () = this.inner.stop.cancelled() => return,
                    () = tokio::time::sleep(this.inner.args.purge_interval) => {}
                }
                this.purge_all().await;
            }
        });
    }

    /// One scheduled round over every active tenant, one tenant at a time.
    async fn purge_all(&self) {
        let tenants = match self.inner.databases.main().get().await {
            Ok(mut conn) => hafen_store::control::active_placements(&mut conn)
                .await
                .map_err(Error::from),
            Err(err) => Err(Error::Store(err.into())),
        };
        let tenants = match tenants {
            Ok(tenants) => tenants,
            Err(err) => {
                tracing::warn!(error = %err, "scheduled purge: tenants not listed; next round retries");
                return;
            }
        };
        for (tenant, _) in tenants {
            if self.inner.stop.is_cancelled() {
                return;
            }
            match self.purge(tenant, Trigger::Scheduled).await {
                Ok(Some(run)) => tracing::info!(
                    tenant_id = %tenant,
                    purge_run_id = %run.id,
                    messages_deleted = run.messages_deleted,
                    held_skipped = run.held_skipped,
                    "scheduled purge done"
                ),
                Ok(None) => tracing::debug!(tenant_id = %tenant, "purge already running"),
                Err(Error::ShuttingDown) => return,
                Err(err) => {
                    tracing::warn!(tenant_id = %tenant, error = %err, "scheduled purge failed")
                }
            }
        }
    }

    /// Starts a run for `tenant` in the background and returns it at once; when a run is
    /// already in progress, returns that one and starts none.
    pub async fn start(&self, tenant: Uuid, trigger: Trigger) -> Result<PurgeRunRow, Error> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let (run, fresh) = self.claim(tenant, trigger).await?;
        if fresh {
            let this = self.clone();
            let started = run.clone();
            self.inner.tasks.spawn(async move {
                if let Err(err) = this.run_claimed(tenant, started, trigger).await {
                    tracing::warn!(tenant_id = %tenant, error = %err, "purge run failed");
                }
            });
        }
        Ok(run)
    }

    /// Purges `tenant` now and waits for the run to end; `None` when a run was already in
    /// progress (none is started then).
    pub async fn purge(
        &self,
        tenant: Uuid,
        trigger: Trigger,
    ) -> Result<Option<PurgeRunRow>, Error> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let (run, fresh) = self.claim(tenant, trigger).await?;
        if !fresh {
            return Ok(None);
        }
        self.run_claimed(tenant, run, trigger).await.map(Some)
    }

    /// The tenant's runs, newest first: up to `limit` after the keyset position `after`, and
    /// whether more follow.
    pub async fn list(
        &self,
        tenant: Uuid,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: usize,
    ) -> Result<(Vec<PurgeRunRow>, bool), Error> {
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let tenant_id = TenantId::from(tenant);
        let pool = self.pool(&tenant_id).await?;
        hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
            Box::pin(async move {
                let mut query = purge_runs::table
                    .select(PurgeRunRow::as_select())
                    .order((purge_runs::started_at.desc(), purge_runs::id.desc()))
                    .limit(fetch)
                    .into_boxed();
                if let Some((at, id)) = after {
                    query = query.filter(
                        purge_runs::started_at
                            .lt(at)
                            .or(purge_runs::started_at.eq(at).and(purge_runs::id.lt(id))),
                    );
                }
                let mut rows: Vec<PurgeRunRow> = query.load(conn).await?;
                let more = rows.len() > limit;
                rows.truncate(limit);
                Ok::<_, Error>((rows, more))
            })
        })
        .await
    }

    async fn pool(&self, tenant: &TenantId) -> Result<Pool, Error> {
        Ok(self.inner.databases.tenant_pool(tenant).await?)
    }

    fn audited(&self) {
        if let Some(relay) = &self.inner.relay {
            relay.wake();
        }
    }

    /// Inserts a running run for `tenant`, first taking over a run whose heartbeat stopped.
    /// Returns the new run and `true`, or the run already in progress and `false`.
    async fn claim(&self, tenant: Uuid, trigger: Trigger) -> Result<(PurgeRunRow, bool), Error> {
        let tenant_id = TenantId::from(tenant);
        let pool = self.pool(&tenant_id).await?;
        let stale_before = now()
            - chrono::Duration::from_std(STALE_AFTER).unwrap_or_else(|_| chrono::Duration::zero());
        let (run, fresh, taken_over) = hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
            Box::pin(async move {
                let at = now();
                let stale: Vec<PurgeRunRow> = diesel::update(
                    purge_runs::table
                        .filter(purge_runs::state.eq(state::RUNNING))
                        .filter(purge_runs::heartbeat_at.lt(stale_before)),
                )
                .set((
                    purge_runs::state.eq(state::FAILED),
                    purge_runs::ended_at.eq(at),
                ))
                .returning(PurgeRunRow::as_returning())
                .get_results(conn)
                .await?;
                for run in &stale {
                    tracing::warn!(tenant_id = %tenant, purge_run_id = %run.id, "purge run taken over: its heartbeat stopped");
                    let event = completed_event(tenant, run, Actor::System(SCHEDULER)).failed();
                    hafen_events::record(conn, &event).await?;
                }
                let taken_over = !stale.is_empty();
                // A concurrent claim may end between our insert and our read: try twice.
                for _ in 0..2 {
                    let run = PurgeRunRow {
                        id: Uuid::now_v7(),
                        trigger: trigger.stored().to_owned(),
                        state: state::RUNNING.to_owned(),
                        started_at: at,
                        ended_at: None,
                        heartbeat_at: at,
                        messages_deleted: 0,
                        conversations_touched: 0,
                        held_skipped: 0,
                        triggered_by: trigger.user(),
                    };
                    let inserted = diesel::insert_into(purge_runs::table)
                        .values(&run)
                        .on_conflict_do_nothing()
                        .returning(PurgeRunRow::as_returning())
                        .get_result(conn)
                        .await
                        .optional()?;
                    if let Some(run) = inserted {
                        return Ok((run, true, taken_over));
                    }
                    let running = purge_runs::table
                        .filter(purge_runs::state.eq(state::RUNNING))
                        .select(PurgeRunRow::as_select())
                        .first(conn)
                        .await
                        .optional()?;
                    if let Some(run) = running {
                        return Ok((run, false, taken_over));
                    }
                }
                Err(Error::Config("purge run could not be claimed".into()))
            })
        })
        .await?;
        if taken_over {
            self.audited();
        }
        Ok((run, fresh))
    }

    /// Runs the batches of a claimed run and ends it: succeeded, or failed with the counts
    /// so far. Returns the ended run.
    async fn run_claimed(
        &self,
        tenant: Uuid,
        run: PurgeRunRow,
        trigger: Trigger,
    ) -> Result<PurgeRunRow, Error> {
        let mut progress = Progress::default();
        let outcome = self.batches(tenant, &run, &mut progress).await;
        match outcome {
            Ok(()) => self.finish(tenant, &run, trigger, &progress, true).await,
            Err(Error::TakenOver(id)) => Err(Error::TakenOver(id)),
            Err(err) => {
                tracing::warn!(tenant_id = %tenant, purge_run_id = %run.id, error = %err, "purge run stopped");
                if let Err(finish) = self.finish(tenant, &run, trigger, &progress, false).await {
                    // The heartbeat stops; the next claim takes the run over.
                    tracing::warn!(tenant_id = %tenant, purge_run_id = %run.id, error = %finish, "purge run not marked failed");
                }
                Err(err)
            }
        }
    }

    async fn batches(
        &self,
        tenant: Uuid,
        run: &PurgeRunRow,
        progress: &mut Progress,
    ) -> Result<(), Error> {
        let tenant_id = TenantId::from(tenant);
        let pool = self.pool(&tenant_id).await?;
        let period = tenant_period(&self.inner.databases, tenant).await?;
        let cutoff = run.started_at - chrono::Duration::days(i64::from(period));
        let period_days = i32::try_from(period).unwrap_or(i32::MAX);
        // Conversations whose own period is shorter than the tenant's; longer ones are capped.
        let shorter: Vec<(Uuid, Option<i32>)> =
            hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
                Box::pin(async move {
                    Ok::<_, Error>(
                        conversations::table
                            .filter(conversations::retention_days.lt(period_days))
                            .select((conversations::id, conversations::retention_days))
                            .load(conn)
                            .await?,
                    )
                })
            })
            .await?;
        // Nothing is older than year 1; the tenant-wide scope starts there.
        let origin = DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).unwrap_or(cutoff);
        let mut scopes = vec![Cursor::Tenant {
            cutoff,
            at: origin,
            id: Uuid::nil(),
        }];
        for (conversation, days) in shorter {
            let Some(days) = days else { continue };
            scopes.push(Cursor::Conversation {
                cutoff: run.started_at - chrono::Duration::days(i64::from(days)),
                tenant_cutoff: cutoff,
                id: conversation,
                after: 0,
            });
        }
        // The run keeps one connection for its batches; it goes back to the pool (reset)
        // when the run ends.
        let conn = pool.get().await.map_err(hafen_store::Error::from)?;
        let mut first = true;
        for mut cursor in scopes {
            let mut retried = false;
            loop {
                if !first {
                    self.pause().await?;
                }
                first = false;
                let batch = self
                    .batch(&conn, &tenant_id, run.id, cursor, progress)
                    .await?;
                // A message edited while the batch ran is left (see DELETE_AND_REPORT): the
                // same range once more deletes it in its new version.
                if batch.deleted < batch.examined - batch.held && !retried {
                    retried = true;
                    // Its held messages are examined, and counted, again.
                    progress.held -= batch.held;
                    continue;
                }
                retried = false;
                match cursor.after(&batch) {
                    Some(next) if batch.examined >= self.limit() => cursor = next,
                    _ => break,
                }
            }
        }
        progress.visits =
            crate::visits::purge(&self.inner.databases, tenant, run.started_at, cutoff).await?;
        Ok(())
    }

    /// Messages examined per batch.
    fn limit(&self) -> i64 {
        self.inner.args.purge_batch.max(1)
    }

    /// Waits `purge_pause` between two batches; stops at shutdown.
    async fn pause(&self) -> Result<(), Error> {
        let pause = self.inner.args.purge_pause;
        if self.inner.stop.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if pause.is_zero() {
            return Ok(());
        }
        tokio::select! {
            () = self.inner.stop.cancelled() => Err(Error::ShuttingDown),
            () = tokio::time::sleep(pause) => Ok(()),
        }
    }

    /// One batch in its own transaction, in one pipelined round trip on the run's connection
    /// (see [`hafen_store::tenancy::pipelined`]): the SHARE lock on the holds and the batch
    /// statement (heartbeat, examine, delete, report).
    async fn batch(
        &self,
        conn: &AsyncPgConnection,
        tenant: &TenantId,
        run: Uuid,
        cursor: Cursor,
        progress: &mut Progress,
    ) -> Result<Batch, Error> {
        let statement = batch_statement(run, progress, cursor, self.limit());
        let statements = async {
            let (locked, batch) = futures::join!(
                Prepared::text(&["LOCK TABLE legal_holds IN SHARE MODE"]).execute(&mut &*conn),
                statement.get_result::<Batch>(&mut &*conn),
            );
            locked.and(batch)
        };
        let batch = hafen_store::tenancy::pipelined(conn, &["BEGIN"], tenant, statements).await?;
        if batch.claimed == 0 {
            return Err(Error::TakenOver(run));
        }
        progress.deleted += batch.deleted;
        progress.held += batch.held;
        progress
            .touched
            .extend(batch.conversations.iter().flatten());
        Ok(batch)
    }

    /// Ends a run with its final counts and its audit event, in one transaction.
    async fn finish(
        &self,
        tenant: Uuid,
        run: &PurgeRunRow,
        trigger: Trigger,
        progress: &Progress,
        succeeded: bool,
    ) -> Result<PurgeRunRow, Error> {
        let tenant_id = TenantId::from(tenant);
        let pool = self.pool(&tenant_id).await?;
        let (id, deleted, touched, held) =
            (run.id, progress.deleted, progress.touched(), progress.held);
        let visits = progress.visits;
        metrics::counter!("hafen_purge_deleted_total", "kind" => "messages")
            .increment(u64::try_from(deleted).unwrap_or(0));
        metrics::counter!("hafen_purge_runs_total", "result" => if succeeded { "succeeded" } else { "failed" })
            .increment(1);
        metrics::gauge!("hafen_purge_last_run_timestamp_seconds")
            .set(chrono::Utc::now().timestamp() as f64);
        let ended = hafen_store::with_tenant(&pool, &tenant_id, move |conn| {
            Box::pin(async move {
                let at = now();
                let ended: PurgeRunRow = diesel::update(
                    purge_runs::table
                        .find(id)
                        .filter(purge_runs::state.eq(state::RUNNING)),
                )
                .set((
                    purge_runs::state.eq(if succeeded {
                        state::SUCCEEDED
                    } else {
                        state::FAILED
                    }),
                    purge_runs::ended_at.eq(at),
                    purge_runs::heartbeat_at.eq(at),
                    purge_runs::messages_deleted.eq(deleted),
                    purge_runs::conversations_touched.eq(touched),
                    purge_runs::held_skipped.eq(held),
                ))
                .returning(PurgeRunRow::as_returning())
                .get_result(conn)
                .await
                .optional()?
                .ok_or(Error::TakenOver(id))?;
                let mut event = completed_event(tenant, &ended, trigger.actor())
                    .attribute("visits_deleted", visits.visits)
                    .attribute("consent_records_deleted", visits.consent_records);
                if !succeeded {
                    event = event.failed();
                }
                hafen_events::record(conn, &event).await?;
                Ok::<_, Error>(ended)
            })
        })
        .await?;
        self.audited();
        Ok(ended)
    }
}

/// The batch statement of `run` from `cursor`, examining `limit` messages; it records
/// `progress` (the batches before) as the run's counts.
fn batch_statement(
    run: Uuid,
    progress: &Progress,
    cursor: Cursor,
    limit: i64,
) -> diesel::query_builder::BoxedSqlQuery<'static, diesel::pg::Pg, diesel::query_builder::SqlQuery>
{
    let claim = |sql: &'static str| {
        diesel::sql_query(sql)
            .into_boxed()
            .bind::<diesel::sql_types::Uuid, _>(run)
            .bind::<BigInt, _>(progress.deleted)
            .bind::<BigInt, _>(progress.touched())
            .bind::<BigInt, _>(progress.held)
    };
    match cursor {
        Cursor::Tenant { cutoff, at, id } => claim(TENANT_BATCH)
            .bind::<Timestamptz, _>(cutoff)
            .bind::<Timestamptz, _>(at)
            .bind::<diesel::sql_types::Uuid, _>(id)
            .bind::<BigInt, _>(limit),
        Cursor::Conversation {
            cutoff,
            tenant_cutoff,
            id,
            after,
        } => claim(CONVERSATION_BATCH)
            .bind::<Timestamptz, _>(cutoff)
            .bind::<Timestamptz, _>(tenant_cutoff)
            .bind::<diesel::sql_types::Uuid, _>(id)
            .bind::<BigInt, _>(limit)
            .bind::<BigInt, _>(after),
    }
}

/// The `retention.purge.completed` event of a run: ids and counts only.
fn completed_event(tenant: Uuid, run: &PurgeRunRow, actor: Actor) -> Event {
    Event::new(Some(tenant), actor, "retention.purge.completed")
        .target("purge_run", run.id)
        .attribute("purge_run_id", run.id)
        .attribute("messages_deleted", run.messages_deleted)
        .attribute("conversations_touched", run.conversations_touched)
        .attribute("held_skipped", run.held_skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_statements_are_complete() {
        for sql in [TENANT_BATCH, CONVERSATION_BATCH] {
            assert_eq!(sql.matches('(').count(), sql.matches(')').count(), "{sql}");
            assert!(sql.contains("DELETE FROM events"));
            assert!(sql.contains("EXISTS (SELECT FROM claim)"));
        }
    }
}
