//! The databases a deployment uses: the main one (control plane, and the default placement
//! of tenants), named others that tenants can be placed on (TM3), and the key store
//! ([`crate::keystore`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::config::DatabaseArgs;
use crate::error::{Error, Result};
use crate::pool::{Pool, build_pool};
use crate::tenancy::TenantId;

/// Name of the main database in placements.
pub const DEFAULT_DATABASE: &str = "default";

/// How long a tenant's placement is taken from the cache before the control plane is asked
/// again. A restore that moves a tenant announces the move, and every process forgets the
/// old placement at once ([`Databases::forget`]); this bounds the time a lost announcement
/// leaves a process on the old database.
pub const PLACEMENT_RECHECK: Duration = Duration::from_secs(30);

/// The main database and the placement databases, on the command line.
#[derive(clap::Args, Clone, Debug)]
pub struct DatabasesArgs {
    #[command(flatten)]
    pub main: DatabaseArgs,

    /// A further database tenants can be placed on (TM3), as `name=postgres://…`; repeat the
    /// flag, or separate entries by commas in the environment variable. Placement databases
    /// need `max_prepared_transactions` > 0 (provisioning there commits in two phases).
    #[arg(
        long = "database",
        env = "HAFEN_DATABASES",
        value_delimiter = ',',
        value_parser = parse_placement,
        hide_env_values = true
    )]
    pub placements: Vec<(String, String)>,

    /// PostgreSQL URL of the key store: wrapped data keys and the deletion log, in a database
    /// of their own, backed up apart from tenant data and kept briefly (TLS as for
    /// `--database-url`). Needs `max_prepared_transactions` > 0 (provisioning and deletion
    /// commit there in two phases). Unset: the main database holds them, and a backup of it
    /// holds keys; the Art. 30 record then does not claim a key store apart.
    #[arg(long, env = "HAFEN_KEYSTORE_URL", hide_env_values = true)]
    pub keystore_url: Option<String>,
}

impl DatabasesArgs {
    /// The placement databases by name, with their URLs.
    pub fn placements_map(&self) -> BTreeMap<String, String> {
        self.placements.iter().cloned().collect()
    }
}

fn parse_placement(value: &str) -> Result<(String, String), String> {
    let (name, url) = value.split_once('=').ok_or("expected name=postgres://…")?;
    let valid_name = (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid_name || name == DEFAULT_DATABASE {
        return Err(format!(
            "database name `{name}` must be 1-40 characters of a-z, 0-9, '-', '_' and not `default`"
        ));
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(format!("database `{name}`: expected a postgres:// URL"));
    }
    Ok((name.to_owned(), url.to_owned()))
}

/// A connection from `pool`, its wait recorded (`hafen_db_pool_wait_seconds`).
async fn timed_get(pool: &Pool) -> Result<crate::pool::PooledConnection> {
    let since = Instant::now();
    let conn = pool.get().await;
    metrics::histogram!("hafen_db_pool_wait_seconds").record(since.elapsed().as_secs_f64());
    Ok(conn?)
}

/// Pools of every database, and where each tenant lives.
#[derive(Clone)]
pub struct Databases {
    inner: Arc<Inner>,
}

struct Inner {
    main_url: String,
    main: Pool,
    keystore_url: String,
    keystore: Pool,
    placements: BTreeMap<String, (String, Pool)>,
    /// Where tenants live, as the control plane said, and when it said so: trusted for
    /// [`PLACEMENT_RECHECK`] or until forgotten.
    placed: RwLock<HashMap<Uuid, (String, Instant)>>,
    /// Counts [`Databases::forget`] calls: a lookup that began before one does not cache what
    /// it read, which may be the placement just forgotten.
    forgotten: AtomicU64,
}

impl std::fmt::Debug for Databases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Databases")
            .field(
                "placements",
                &self.inner.placements.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Databases {
    /// Pools for `args`; connections open lazily, on first use.
    pub fn new(args: &DatabasesArgs) -> Result<Self> {
        let mut placements = BTreeMap::new();
        for (name, url) in &args.placements {
            let mut placement = args.main.clone();
            placement.database_url = url.clone();
            placements.insert(name.clone(), (url.clone(), build_pool(&placement)?));
        }
        let main = build_pool(&args.main)?;
        let keystore_url = args
            .keystore_url
            .clone()
            .unwrap_or_else(|| args.main.database_url.clone());
        let keystore = if keystore_url == args.main.database_url {
            main.clone()
        } else {
            let mut keystore = args.main.clone();
            keystore.database_url = keystore_url.clone();
            build_pool(&keystore)?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                main_url: args.main.database_url.clone(),
                main,
                keystore_url,
                keystore,
                placements,
                placed: RwLock::new(HashMap::new()),
                forgotten: AtomicU64::new(0),
            }),
        })
    }

    /// The main database's pool (control plane).
    pub fn main(&self) -> &Pool {
        &self.inner.main
    }

    /// A connection from the main database's pool (control plane).
    pub async fn main_connection(&self) -> Result<crate::pool::PooledConnection> {
        timed_get(&self.inner.main).await
    }

    /// The main database's URL.
    pub fn main_url(&self) -> &str {
        &self.inner.main_url
    }

    /// The key store's pool.
    pub fn keystore(&self) -> &Pool {
        &self.inner.keystore
    }

    /// A connection to the key store.
    pub async fn keystore_connection(&self) -> Result<crate::pool::PooledConnection> {
        timed_get(&self.inner.keystore).await
    }

    /// The key store's URL (the main database's when none was given).
    pub fn keystore_url(&self) -> &str {
        &self.inner.keystore_url
    }

    /// Whether the key store is a database apart from the main one.
    pub fn keystore_apart(&self) -> bool {
        self.inner.keystore_url != self.inner.main_url
    }

    /// The URL of the database named `name`.
    pub fn url(&self, name: &str) -> Option<&str> {
        if name == DEFAULT_DATABASE {
            Some(&self.inner.main_url)
        } else {
            self.inner.placements.get(name).map(|(url, _)| url.as_str())
        }
    }

    /// The pool of the database named `name`.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        if name == DEFAULT_DATABASE {
            Some(&self.inner.main)
        } else {
            self.inner.placements.get(name).map(|(_, pool)| pool)
        }
    }

    /// Every database's name, the default first.
    pub fn names(&self) -> Vec<String> {
        std::iter::once(DEFAULT_DATABASE.to_owned())
            .chain(self.inner.placements.keys().cloned())
            .collect()
    }

    /// The placement databases by name, with their URLs.
    pub fn placements(&self) -> BTreeMap<String, String> {
        self.inner
            .placements
            .iter()
            .map(|(name, (url, _))| (name.clone(), url.clone()))
            .collect()
    }

    /// A connection from the pool of the database `tenant` lives on (not in its scope: see
    /// [`crate::tenancy`]). Fails as [`Databases::tenant_pool`] does.
    pub async fn tenant_connection(
        &self,
        tenant: &TenantId,
    ) -> Result<crate::pool::PooledConnection> {
        timed_get(&self.tenant_pool(tenant).await?).await
    }

    /// The pool of the database `tenant` lives on. Fails with `Error::UnknownTenant` for a
    /// tenant that does not exist or is deleted.
    pub async fn tenant_pool(&self, tenant: &TenantId) -> Result<Pool> {
        let now = Instant::now();
        let cached = self.inner.placed.read().ok().and_then(|placed| {
            placed
                .get(&tenant.as_uuid())
                .filter(|(_, since)| now.duration_since(*since) < PLACEMENT_RECHECK)
                .map(|(name, _)| name.clone())
        });
        let name = match cached {
            Some(name) => name,
            None => {
                let forgotten = self.inner.forgotten.load(Ordering::Acquire);
                let mut conn = self.inner.main.get().await?;
                let row = crate::control::find(&mut conn, tenant.as_uuid()).await?;
                let name = row
                    .filter(|row| row.status == crate::control::status::ACTIVE)
                    .map(|row| row.database_name)
                    .ok_or(Error::UnknownTenant)?;
                if let Ok(mut placed) = self.inner.placed.write()
                    && self.inner.forgotten.load(Ordering::Acquire) == forgotten
                {
                    placed.insert(tenant.as_uuid(), (name.clone(), now));
                }
                name
            }
        };
        self.pool(&name)
            .cloned()
            .ok_or_else(|| Error::Migration(format!("tenant placed on unknown database {name}")))
    }

    /// Forgets where `tenant` lives (it moved): the next lookup asks the control plane.
    pub fn forget(&self, tenant: Uuid) {
        if let Ok(mut placed) = self.inner.placed.write() {
            self.inner.forgotten.fetch_add(1, Ordering::AcqRel);
            placed.remove(&tenant);
        }
    }

    /// Reports the state of every pool as gauges (`hafen_db_pool_*`, labelled with the
    /// `service`, the database's name and `pool`), every 5 s for the life of the process.
    pub fn report_pool_metrics(
        &self,
        service: &'static str,
        pool: &'static str,
    ) -> tokio::task::JoinHandle<()> {
        let mut pools: Vec<(String, Pool)> = self
            .names()
            .into_iter()
            .filter_map(|name| self.pool(&name).cloned().map(|p| (name, p)))
            .collect();
        if self.keystore_apart() {
            pools.push(("keystore".to_owned(), self.inner.keystore.clone()));
        }
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                for (database, p) in &pools {
                    let status = p.status();
                    let labels = [
                        ("service", service.to_owned()),
                        ("database", database.clone()),
                        ("pool", pool.to_owned()),
                    ];
                    let in_use = status.size.saturating_sub(status.available);
                    let gauge = |state: &'static str| {
                        let mut with_state = labels.to_vec();
                        with_state.push(("state", state.to_owned()));
                        metrics::gauge!("hafen_db_pool_connections", with_state.as_slice())
                    };
                    gauge("in_use").set(in_use as f64);
                    gauge("idle").set(status.available as f64);
                    metrics::gauge!("hafen_db_pool_max_connections", labels.as_slice())
                        .set(status.max_size as f64);
                    metrics::gauge!("hafen_db_pool_waiting", labels.as_slice())
                        .set(status.waiting as f64);
                }
            }
        })
    }

    /// Forgets where every tenant lives (moves may have gone unheard).
    pub fn forget_all(&self) {
        if let Ok(mut placed) = self.inner.placed.write() {
            self.inner.forgotten.fetch_add(1, Ordering::AcqRel);
            placed.clear();
        }
    }
}
