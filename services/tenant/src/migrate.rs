//! `hafen-tenant migrate`: the key store, the control plane, then every tenant schema, to the newest
//! migration set — with bounded concurrency, a progress bar on a terminal, and a report of
//! the tenants that failed (the others are migrated regardless). Tenants already current are
//! left untouched. Provisioning left half-done on a placement database by a crash is resolved
//! first.

use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use hafen_store::TenantId;
use hafen_store::control;
use hafen_store::tenancy::{self, SyncConnection};
use uuid::Uuid;

use crate::PREPARED_MIN_AGE;
use crate::error::Error;
use crate::tenants::{DEFAULT_DATABASE, Placements};

/// What a migration run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Key-store migrations applied.
    pub keystore: Vec<String>,
    /// Keys and deletion-log entries moved from the control plane to the key store.
    pub moved_to_keystore: u64,
    /// Control-plane migrations applied.
    pub control_plane: Vec<String>,
    /// Active tenants found.
    pub tenants: usize,
    /// Tenants that received at least one migration.
    pub upgraded: usize,
    /// Tenants that were already current.
    pub current: usize,
    /// Tenants whose migration failed, with the reason (their schema is unchanged).
    pub failed: Vec<(Uuid, String)>,
    /// Provisioning transactions left prepared by a crash, now resolved.
    pub resolved_prepared: usize,
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tenants migrated at the same time (each on its own connection).
    pub concurrency: usize,
    /// Show a progress bar (only when standard error is a terminal).
    pub progress: bool,
}

/// Migrates the key store at `keystore_url` (the main database when `None`), moves keys a
/// control plane from before the key store holds there, migrates the control plane at
/// `main_url`, then every active tenant on its database.
pub async fn migrate_all(
    main_url: &str,
    keystore_url: Option<&str>,
    placements: &Placements,
    options: &Options,
) -> Result<Report, Error> {
    let keystore_url = keystore_url.unwrap_or(main_url);
    let keystore = hafen_store::migrate::migrate_keystore(keystore_url).await?;
    let moved_to_keystore =
        hafen_store::migrate::move_keys_to_keystore(main_url, keystore_url).await?;
    let control_plane = hafen_store::migrate::migrate_control_plane(main_url).await?;
    let resolved_prepared =
        crate::tenants::resolve_prepared(main_url, keystore_url, placements, PREPARED_MIN_AGE)
            .await?;
    let pool = hafen_store::pool::build_pool(&hafen_store::DatabaseArgs::new(main_url))?;
    let tenants = {
        let mut conn = pool.get().await.map_err(hafen_store::Error::from)?;
        control::active_placements(&mut conn).await?
    };
    let mut urls: HashMap<String, String> = placements.clone().into_iter().collect();
    urls.insert(DEFAULT_DATABASE.to_owned(), main_url.to_owned());

    let total = tenants.len();
    let bar = (options.progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "migrating tenants {bar:40} {pos}/{len} ({eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let queue = Arc::new(Mutex::new(tenants.into_iter().collect::<VecDeque<_>>()));
    let urls = Arc::new(urls);
    let mut workers = Vec::new();
    for _ in 0..options.concurrency.clamp(1, 64) {
        let queue = queue.clone();
        let urls = urls.clone();
        let bar = bar.clone();
        workers.push(tokio::task::spawn_blocking(move || {
            worker(&queue, &urls, bar.as_ref())
        }));
    }
    let mut report = Report {
        keystore,
        moved_to_keystore,
        control_plane,
        tenants: total,
        resolved_prepared,
        ..Report::default()
    };
    for worker in workers {
        let outcome = worker.await?;
        report.upgraded += outcome.upgraded;
        report.current += outcome.current;
        report.failed.extend(outcome.failed);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    for (tenant, reason) in &report.failed {
        tracing::error!(tenant_id = %tenant, error = %reason, "tenant migration failed");
    }
    tracing::info!(
        tenants = report.tenants,
        upgraded = report.upgraded,
        current = report.current,
        failed = report.failed.len(),
        "tenant migrations done"
    );
    Ok(report)
}

#[derive(Default)]
struct Outcome {
    upgraded: usize,
    current: usize,
    failed: Vec<(Uuid, String)>,
}

/// Takes tenants off the queue until it is empty, keeping one connection per database.
fn worker(
    queue: &Mutex<VecDeque<(Uuid, String)>>,
    urls: &HashMap<String, String>,
    bar: Option<&indicatif::ProgressBar>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let mut connections: HashMap<String, SyncConnection> = HashMap::new();
    loop {
        let next = match queue.lock() {
            Ok(mut queue) => queue.pop_front(),
            Err(_) => None,
        };
        let Some((id, database)) = next else {
            break;
        };
        let result = migrate_one(&mut connections, urls, &database, &TenantId::from(id));
        match result {
            Ok(applied) if applied.is_empty() => outcome.current += 1,
            Ok(_) => outcome.upgraded += 1,
            Err(err) => {
                // A broken connection must not fail the tenants after this one.
                connections.remove(&database);
                outcome.failed.push((id, err.to_string()));
            }
        }
        if let Some(bar) = bar {
            bar.inc(1);
        }
    }
    outcome
}

fn migrate_one(
    connections: &mut HashMap<String, SyncConnection>,
    urls: &HashMap<String, String>,
    database: &str,
    tenant: &TenantId,
) -> Result<Vec<String>, Error> {
    if !connections.contains_key(database) {
        let url = urls.get(database).ok_or_else(|| {
            Error::Config(format!("tenant placed on unknown database {database}"))
        })?;
        let conn = hafen_store::connect::establish_sync(url).map_err(hafen_store::Error::from)?;
        connections.insert(database.to_owned(), conn);
    }
    let conn = connections
        .get_mut(database)
        .ok_or_else(|| Error::Config("connection vanished".into()))?;
    Ok(tenancy::migrate_schema(conn, tenant)?)
}
