//! `migrate`: `hafen-tenant migrate` over many tenants that each lack the newest migration.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use diesel::Connection;
use diesel::connection::SimpleConnection;
use diesel_migrations::MigrationHarness;
use hafen_store::TenantId;
use hafen_store::tenancy::{SyncConnection, TENANT_MIGRATIONS};
use hafen_tenant::tenants::{NewTenantInput, Slug, Tenants};
use hafen_testkit::{TestDatabase, TestSecrets};

use crate::Line;

/// Target of the issue: 1,000 tenants in at most 60 s.
const TARGET_SECS_PER_1000: f64 = 60.0;

/// The newest tenant migration, applied raw by the baseline.
const NEWEST_UP: &str =
    include_str!("../../store/migrations/tenant/2026-12-03-000009_user_erasure/up.sql");
const NEWEST_VERSION: &str = "20261203000009";

/// Runs `job` for every tenant on `concurrency` blocking workers, each with its own
/// connection to `url`.
async fn for_each_tenant(
    url: &str,
    tenants: &[TenantId],
    concurrency: usize,
    job: fn(&mut SyncConnection, &TenantId),
) {
    let queue = Arc::new(Mutex::new(tenants.iter().copied().collect::<VecDeque<_>>()));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let queue = queue.clone();
        let url = url.to_owned();
        workers.push(tokio::task::spawn_blocking(move || {
            let mut conn = hafen_store::connect::establish_sync(&url).expect("connect");
            loop {
                // Its own statement, so the lock is released before the job runs.
                let next = queue.lock().expect("queue").pop_front();
                let Some(tenant) = next else { break };
                job(&mut conn, &tenant);
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
}

fn enter(conn: &mut SyncConnection, tenant: &TenantId) {
    let name = tenant.schema();
    conn.batch_execute(&format!(
        "SELECT set_config('role', '{name}', true), set_config('search_path', '{name}', true)"
    ))
    .expect("enter tenant scope");
}

/// Takes a tenant back to before its newest migration.
fn revert(conn: &mut SyncConnection, tenant: &TenantId) {
    conn.transaction(|conn| {
        enter(conn, tenant);
        conn.revert_last_migration(TENANT_MIGRATIONS)
            .map_err(diesel::result::Error::QueryBuilderError)?;
        Ok::<_, diesel::result::Error>(())
    })
    .expect("revert newest migration");
}

/// The baseline: the newest migration's SQL and its bookkeeping row, sent raw.
fn apply_raw(conn: &mut SyncConnection, tenant: &TenantId) {
    conn.transaction(|conn| {
        enter(conn, tenant);
        conn.batch_execute(NEWEST_UP)?;
        conn.batch_execute(&format!(
            "INSERT INTO __diesel_schema_migrations (version) VALUES ('{NEWEST_VERSION}')"
        ))?;
        Ok::<_, diesel::result::Error>(())
    })
    .expect("raw migration");
}

/// Runs the scenario over `count` tenants with `concurrency` workers.
pub async fn run(count: usize, concurrency: usize) -> (Vec<Line>, serde_json::Value) {
    let secrets = TestSecrets::generate();
    let db = TestDatabase::create().await;
    let mut config = secrets.tenant_config(&db, &[]);
    config.bcrypt_cost = 4;
    let tenants = Tenants::new(
        hafen_store::Databases::new(&config.databases).expect("databases"),
        secrets.master_key(),
        Some(secrets.master_key_file()),
        config.policy(),
        None,
    );

    // Set-up (not measured): provision the tenants, several at a time.
    let semaphore = Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = Vec::new();
    for i in 0..count {
        let tenants = tenants.clone();
        let permit = semaphore.clone().acquire_owned().await.expect("semaphore");
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let input = NewTenantInput {
                request_id: None,
                slug: Slug::parse(&format!("m-{i}")).expect("slug"),
                display_name: hafen_store::accounts::DisplayName::parse("Bench").expect("name"),
                owner_username: hafen_store::accounts::Username::parse("owner").expect("user"),
                owner_display_name: hafen_store::accounts::DisplayName::parse("Owner")
                    .expect("name"),
                owner_password: zeroize::Zeroizing::new("correct horse battery".into()),
                dpa_version: "2025-01".into(),
                region: "eu-central".into(),
                database: "default".into(),
            };
            TenantId::from(tenants.create(input).await.expect("provision").tenant.id)
        }));
    }
    let mut ids = Vec::with_capacity(count);
    for task in tasks {
        ids.push(task.await.expect("provision task"));
    }
    for_each_tenant(db.url(), &ids, concurrency, revert).await;

    let options = hafen_tenant::migrate::Options {
        concurrency,
        progress: false,
    };
    // Each DDL round leaves dead catalog rows behind, so whatever runs later is slower:
    // alternate migrate and baseline twice and keep the better run of each.
    let mut migrate_secs = f64::INFINITY;
    let mut raw_secs = f64::INFINITY;
    let mut noop_secs = f64::INFINITY;
    for _ in 0..2 {
        let started = Instant::now();
        let report = hafen_tenant::migrate::migrate_all(
            db.url(),
            Some(db.keystore().url()),
            &Default::default(),
            &options,
        )
        .await
        .expect("migrate");
        migrate_secs = migrate_secs.min(started.elapsed().as_secs_f64());
        assert_eq!(
            report.upgraded, count,
            "every tenant received the migration"
        );
        assert!(report.failed.is_empty());

        let started = Instant::now();
        let second = hafen_tenant::migrate::migrate_all(
            db.url(),
            Some(db.keystore().url()),
            &Default::default(),
            &options,
        )
        .await
        .expect("migrate again");
        noop_secs = noop_secs.min(started.elapsed().as_secs_f64());
        assert_eq!(second.current, count, "a second run changes nothing");

        for_each_tenant(db.url(), &ids, concurrency, revert).await;
        let started = Instant::now();
        for_each_tenant(db.url(), &ids, concurrency, apply_raw).await;
        raw_secs = raw_secs.min(started.elapsed().as_secs_f64());
        for_each_tenant(db.url(), &ids, concurrency, revert).await;
    }

    let per_1000 = migrate_secs * 1000.0 / count.max(1) as f64;
    let lines = vec![
        Line {
            scenario: "migrate",
            metric: format!("{count} tenants, concurrency {concurrency}"),
            value: format!("{migrate_secs:.2} s"),
            baseline: format!("raw SQL {raw_secs:.2} s ({:.2}x)", migrate_secs / raw_secs),
            target: format!("<= {:.0} s /1000", TARGET_SECS_PER_1000),
        },
        Line {
            scenario: "migrate",
            metric: "second run (all current)".into(),
            value: format!("{noop_secs:.2} s"),
            baseline: String::new(),
            target: String::new(),
        },
    ];
    let json = serde_json::json!({
        "scenario": "migrate",
        "tenants": count,
        "concurrency": concurrency,
        "seconds": migrate_secs,
        "seconds_per_1000": per_1000,
        "noop_seconds": noop_secs,
        "baseline_raw_seconds": raw_secs,
        "ratio_to_baseline": migrate_secs / raw_secs,
        "target_seconds_per_1000": TARGET_SECS_PER_1000,
        "meets_target": per_1000 <= TARGET_SECS_PER_1000,
    });
    (lines, json)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use diesel::migration::MigrationSource;
    use diesel::pg::Pg;

    #[test]
    fn the_raw_baseline_is_the_newest_tenant_migration() {
        let migrations = MigrationSource::<Pg>::migrations(&super::TENANT_MIGRATIONS).unwrap();
        let newest = migrations.last().unwrap().name().version().to_string();
        assert_eq!(
            newest,
            super::NEWEST_VERSION,
            "point NEWEST_UP and NEWEST_VERSION at the newest tenant migration"
        );
    }
}
