//! A fresh PostgreSQL database per test.
//!
//! The first test of a run migrates a template database (under an advisory lock, so parallel
//! test processes do it once); every test then gets `CREATE DATABASE … TEMPLATE`, a file copy
//! that takes milliseconds. The template's name carries a fingerprint of the migrations, so a
//! changed migration gets a new template instead of a stale one.

use diesel::{OptionalExtension, QueryableByName};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use hafen_store::DatabaseArgs;

use crate::env::{TestEnv, workspace_root};

/// Key of the advisory lock that serialises template creation across test processes.
const TEMPLATE_LOCK: i64 = 0x6861_6665_6e74_706c;

/// A database of its own for one test; dropped (with `FORCE`) when this value is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    env: TestEnv,
    /// The key store that goes with this database, a database of its own.
    keystore: Option<Box<TestDatabase>>,
    /// Placement databases (TM3) that go with this one, by name.
    placements: Vec<(String, TestDatabase)>,
}

impl TestDatabase {
    /// Creates a database holding the migrated control plane, owned by the application role,
    /// and a key store of its own beside it ([`TestDatabase::keystore`]).
    pub async fn create() -> Self {
        Self::create_in(TestEnv::get()).await
    }

    /// [`TestDatabase::create`] on the server `env` names (e.g. a
    /// [`crate::PrivatePostgres`]).
    pub async fn create_in(env: &TestEnv) -> Self {
        crate::init_test_logging();
        let (template, keystore) = ensure_template(env).await;
        let mut database = Self::create_from(env, &template).await;
        database.keystore = Some(Box::new(Self::create_from(env, &keystore).await));
        database
    }

    /// Creates an empty database (nothing migrated), owned by the application role, and an
    /// empty key store beside it.
    pub async fn create_empty() -> Self {
        crate::init_test_logging();
        let env = TestEnv::get();
        let mut database = Self::create_from(env, "template0").await;
        database.keystore = Some(Box::new(Self::create_from(env, "template0").await));
        database
    }

    async fn create_from(env: &TestEnv, template: &str) -> Self {
        let name = format!("hafen_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = admin_connection(env).await;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {name} TEMPLATE {template} OWNER {}",
                app_role(env)
            ))
            .await
            .expect("create test database");
        let url = with_database(&env.database_url, &name);
        Self {
            name,
            url,
            env: env.clone(),
            keystore: None,
            placements: Vec::new(),
        }
    }

    /// Adds an empty placement database named `name`, which services given
    /// [`TestDatabase::databases`] can place tenants on.
    pub async fn add_placement(&mut self, name: &str) {
        let placement = Self::create_from(&self.env, "template0").await;
        self.placements.push((name.to_owned(), placement));
    }

    /// The placement database named `name`.
    pub fn placement(&self, name: &str) -> &TestDatabase {
        self.placements
            .iter()
            .find(|(named, _)| named == name)
            .map(|(_, db)| db)
            .expect("a placement database of that name")
    }

    /// The key store beside this database.
    pub fn keystore(&self) -> &TestDatabase {
        self.keystore
            .as_deref()
            .expect("a test database has a key store")
    }

    /// Database settings for a service using this database, its placements and its key
    /// store.
    pub fn databases(&self) -> hafen_store::DatabasesArgs {
        hafen_store::DatabasesArgs {
            main: self.args(),
            placements: self
                .placements
                .iter()
                .map(|(name, db)| (name.clone(), db.url().to_owned()))
                .collect(),
            keystore_url: self.keystore.as_ref().map(|k| k.url().to_owned()),
        }
    }

    /// URL of this database for the application role.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Database settings for a service using this database.
    pub fn args(&self) -> DatabaseArgs {
        let mut args = DatabaseArgs::new(self.url.clone());
        args.db_pool_size = 4;
        args
    }

    /// A direct connection as the application role.
    pub async fn connect(&self) -> AsyncPgConnection {
        hafen_store::connect::establish(&self.url)
            .await
            .expect("connect to test database")
    }

    /// The superuser's URL of this database (tenant schemas are out of reach of the
    /// application role outside a tenant scope).
    pub fn admin_url(&self) -> String {
        with_database(&self.env.admin_database_url, &self.name)
    }

    /// A direct connection to this database as the superuser.
    pub async fn connect_admin(&self) -> AsyncPgConnection {
        hafen_store::connect::establish(&self.admin_url())
            .await
            .expect("connect to test database as the admin role")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        let env = self.env.clone();
        // Drop runs outside any async context we could await in: use a thread of our own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for dropping the test database");
            runtime.block_on(async {
                // Tenant roles are cluster-wide: drop those whose schemas lived here.
                let env = &env;
                let roles = {
                    let mut conn = hafen_store::connect::establish(&with_database(
                        &env.admin_database_url,
                        &name,
                    ))
                    .await?;
                    diesel::sql_query(
                        "SELECT nspname::text AS role FROM pg_namespace \
                         WHERE nspname ~ '^t_[0-9a-f]{32}$'",
                    )
                    .load::<RoleName>(&mut conn)
                    .await?
                };
                let mut admin = admin_connection(env).await;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                for RoleName { role } in roles {
                    admin
                        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
                        .await?;
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop test database {}", self.name);
        }
    }
}

async fn admin_connection(env: &TestEnv) -> AsyncPgConnection {
    hafen_store::connect::establish(&env.admin_database_url)
        .await
        .expect("connect to PostgreSQL as the admin role (HAFEN_ADMIN_DATABASE_URL)")
}

#[derive(QueryableByName)]
struct RoleName {
    #[diesel(sql_type = diesel::sql_types::Text)]
    role: String,
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    #[expect(dead_code, reason = "only the row's presence matters")]
    one: i32,
}

/// Creates the migrated templates (the control plane's and the key store's) once per
/// migration fingerprint; returns their names.
async fn ensure_template(env: &TestEnv) -> (String, String) {
    let fingerprint = migrations_fingerprint();
    let template = format!("hafen_template_{fingerprint:016x}");
    let keystore = format!("hafen_ktemplate_{fingerprint:016x}");
    let mut admin = admin_connection(env).await;
    admin
        .batch_execute(&format!("SELECT pg_advisory_lock({TEMPLATE_LOCK})"))
        .await
        .expect("template lock");
    for (name, keys) in [(&template, false), (&keystore, true)] {
        let exists = diesel::sql_query("SELECT 1 AS one FROM pg_database WHERE datname = $1")
            .bind::<diesel::sql_types::Text, _>(name)
            .get_result::<Exists>(&mut admin)
            .await
            .optional()
            .expect("look up template database")
            .is_some();
        if exists {
            continue;
        }
        // Built under a temporary name and renamed when complete, so a crash mid-migration
        // never leaves a half-migrated template behind under the real name.
        let building = format!("{name}_building");
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .await
            .expect("drop a half-built template");
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {building} OWNER {}",
                app_role(env)
            ))
            .await
            .expect("create template database");
        let url = with_database(&env.database_url, &building);
        if keys {
            hafen_store::migrate::migrate_keystore(&url).await
        } else {
            hafen_store::migrate::migrate_control_plane(&url).await
        }
        .expect("migrate template database");
        admin
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {name}"))
            .await
            .expect("rename template database");
    }
    admin
        .batch_execute(&format!("SELECT pg_advisory_unlock({TEMPLATE_LOCK})"))
        .await
        .expect("template unlock");
    (template, keystore)
}

/// FNV-1a over every migration file, so any edit yields a new template.
fn migrations_fingerprint() -> u64 {
    let mut files = Vec::new();
    collect_files(
        &workspace_root().join("crates/store/migrations"),
        &mut files,
    );
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for file in files {
        let contents = std::fs::read(&file).expect("read migration file");
        for byte in file.to_string_lossy().bytes().chain(contents) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// The user name in `url` (`postgres://user[:password]@host/...`).
fn app_role(env: &TestEnv) -> String {
    let url = &env.database_url;
    let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let userinfo = rest.split_once('@').map_or("", |(userinfo, _)| userinfo);
    let user = userinfo.split(':').next().unwrap_or_default();
    assert!(
        !user.is_empty() && user.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "HAFEN_DATABASE_URL must name a plain role (letters, digits, underscore)"
    );
    user.to_owned()
}

/// `url` with its database name replaced by `database`.
pub(crate) fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &base[..path_start]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://a@127.0.0.1:5/hafen", "x"),
            "postgres://a@127.0.0.1:5/x"
        );
        assert_eq!(
            with_database("postgres://a@h:5/hafen?sslmode=disable", "x"),
            "postgres://a@h:5/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://a@h:5", "x"), "postgres://a@h:5/x");
    }
}
