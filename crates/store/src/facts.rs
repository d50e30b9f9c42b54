//! What each running service instance reports about itself (GR7), so that the Art. 30
//! record states only measures actually in force: how its links are secured (database TLS
//! as its URLs say, Redis over TLS or not, mutual TLS between services) and which deletions
//! and other measures it carries out. Rows of `hafen.service_facts`, one per instance,
//! refreshed every [`REPORT_EVERY`]; a report older than [`FRESH_FOR`] is not used.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::connect::{SslMode, Target};
use crate::databases::DatabasesArgs;
use crate::pool::Pool;
use crate::schema::service_facts;

/// How often a running instance renews its report.
pub const REPORT_EVERY: Duration = Duration::from_secs(60);

/// How old a report may be and still count.
pub const FRESH_FOR: Duration = Duration::from_secs(300);

/// Measures a service may report carrying out. The record mentions a measure only when a
/// running service reports it.
pub mod measure {
    /// Deleting a tenant drops its schema and role and destroys its keys (tenant service).
    pub const TENANT_DELETION: &str = "tenant_deletion";
    /// Erasing a user destroys the user's key and erases their rows (auth service).
    pub const USER_ERASURE: &str = "user_erasure";
    /// Expired messages are purged (retention service).
    pub const RETENTION_PURGE: &str = "retention_purge";
    /// The deletion log is replayed after a restore (retention service).
    pub const DELETION_REPLAY: &str = "deletion_replay";
    /// Message bodies are masked and encrypted under per-user keys (messaging service).
    pub const ENCRYPTED_MESSAGES: &str = "encrypted_messages";
    /// Audit chains are hash-linked and their heads signed (audit service).
    pub const SIGNED_AUDIT_CHAIN: &str = "signed_audit_chain";
    /// Data keys and the deletion log are kept in a key store apart from tenant data and the
    /// control plane (tenant service, when given `--keystore-url`).
    pub const KEY_STORE_APART: &str = "key_store_apart";
    /// Revoking a chat code wipes the device (auth service).
    pub const REMOTE_WIPE: &str = "remote_wipe";
}

/// One instance's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceFacts {
    /// The service's short name.
    pub service: String,
    /// Its listener and the calls it makes to other services are TLS (always, in Hafen).
    pub service_tls: bool,
    /// It presents and verifies client certificates between services.
    pub mutual_tls: bool,
    /// The weakest `sslmode` among its database links.
    pub database_sslmode: String,
    /// Its Redis link is TLS (`None`: it uses no Redis).
    pub redis_tls: Option<bool>,
    /// The measures it carries out (see [`measure`]).
    pub measures: Vec<String>,
}

impl ServiceFacts {
    /// The facts of `service` configured with `databases` and a Redis link (`redis_tls`).
    pub fn new(
        service: &str,
        mutual_tls: bool,
        databases: &DatabasesArgs,
        redis_tls: Option<bool>,
        measures: &[&str],
    ) -> Self {
        Self {
            service: service.to_owned(),
            service_tls: true,
            mutual_tls,
            database_sslmode: weakest(databases).as_str().to_owned(),
            redis_tls,
            measures: measures.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    /// Whether every database link of the instance is encrypted.
    pub fn database_encrypted(&self) -> bool {
        self.database_sslmode != SslMode::Disable.as_str()
    }
}

/// The weakest TLS mode among the main and the placement databases.
fn weakest(databases: &DatabasesArgs) -> SslMode {
    std::iter::once(databases.main.database_url.as_str())
        .chain(databases.placements.iter().map(|(_, url)| url.as_str()))
        .map(|url| Target::parse(url).map_or(SslMode::Disable, |t| t.ssl_mode()))
        .min_by_key(|mode| match mode {
            SslMode::Disable => 0,
            SslMode::Require => 1,
            SslMode::VerifyCa => 2,
            SslMode::VerifyFull => 3,
        })
        .unwrap_or(SslMode::Disable)
}

/// Stores (or renews) one instance's report, and drops reports long gone stale.
pub async fn report(
    conn: &mut AsyncPgConnection,
    instance: Uuid,
    facts: &ServiceFacts,
) -> QueryResult<()> {
    let now = crate::now();
    let value = serde_json::to_value(facts).unwrap_or_default();
    diesel::insert_into(service_facts::table)
        .values((
            service_facts::service.eq(&facts.service),
            service_facts::instance.eq(instance),
            service_facts::reported_at.eq(now),
            service_facts::facts.eq(&value),
        ))
        .on_conflict((service_facts::service, service_facts::instance))
        .do_update()
        .set((
            service_facts::reported_at.eq(excluded(service_facts::reported_at)),
            service_facts::facts.eq(excluded(service_facts::facts)),
        ))
        .execute(conn)
        .await?;
    let long_gone = now - chrono::Duration::from_std(FRESH_FOR * 12).unwrap_or_default();
    diesel::delete(service_facts::table.filter(service_facts::reported_at.lt(long_gone)))
        .execute(conn)
        .await?;
    Ok(())
}

/// The reports of the instances running now (reported within [`FRESH_FOR`]).
pub async fn current(conn: &mut AsyncPgConnection) -> QueryResult<Vec<ServiceFacts>> {
    let since: DateTime<Utc> =
        crate::now() - chrono::Duration::from_std(FRESH_FOR).unwrap_or_default();
    let rows: Vec<serde_json::Value> = service_facts::table
        .filter(service_facts::reported_at.ge(since))
        .order((service_facts::service, service_facts::instance))
        .select(service_facts::facts)
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|value| serde_json::from_value(value).ok())
        .collect())
}

/// Reports `facts` for a new instance now (awaited, so the record knows the instance as
/// soon as it serves) and then every [`REPORT_EVERY`] for the life of the process. A
/// failed report is logged; the next one tries again.
pub async fn start_reporting(pool: Pool, facts: ServiceFacts) -> tokio::task::JoinHandle<()> {
    let instance = Uuid::now_v7();
    let once = move |pool: Pool, facts: ServiceFacts| async move {
        let result = match pool.get().await {
            Ok(mut conn) => report(&mut conn, instance, &facts)
                .await
                .map_err(|err| err.to_string()),
            Err(err) => Err(err.to_string()),
        };
        if let Err(err) = result {
            tracing::warn!(service = %facts.service, error = %err, "service facts not reported");
        }
    };
    once(pool.clone(), facts.clone()).await;
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(REPORT_EVERY);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            once(pool.clone(), facts.clone()).await;
        }
    })
}

/// How recent a complete backup run must be for the record to state backups.
pub const BACKUP_FRESH_FOR: chrono::TimeDelta = chrono::TimeDelta::hours(48);

/// A `hafen-tenant backup --all` run: when it ended, how many organisations it backed up, how
/// many failed, and how long backups are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRun {
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// Organisations backed up.
    pub tenants: i32,
    /// Organisations whose backup failed.
    pub failed: i32,
    /// Days backups are kept.
    pub keep_days: i32,
}

/// Records a backup run.
pub async fn record_backup_run(conn: &mut AsyncPgConnection, run: &BackupRun) -> QueryResult<()> {
    use crate::schema::backup_runs;
    diesel::insert_into(backup_runs::table)
        .values((
            backup_runs::id.eq(Uuid::now_v7()),
            backup_runs::finished_at.eq(run.finished_at),
            backup_runs::tenants.eq(run.tenants),
            backup_runs::failed.eq(run.failed),
            backup_runs::keep_days.eq(run.keep_days),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// The newest backup run without failures that ended within [`BACKUP_FRESH_FOR`], if any.
pub async fn last_complete_backup(conn: &mut AsyncPgConnection) -> QueryResult<Option<BackupRun>> {
    use crate::schema::backup_runs;
    let row: Option<(DateTime<Utc>, i32, i32, i32)> = backup_runs::table
        .filter(backup_runs::failed.eq(0))
        .filter(backup_runs::finished_at.gt(Utc::now() - BACKUP_FRESH_FOR))
        .order(backup_runs::finished_at.desc())
        .select((
            backup_runs::finished_at,
            backup_runs::tenants,
            backup_runs::failed,
            backup_runs::keep_days,
        ))
        .first(conn)
        .await
        .optional()?;
    Ok(
        row.map(|(finished_at, tenants, failed, keep_days)| BackupRun {
            finished_at,
            tenants,
            failed,
            keep_days,
        }),
    )
}
