//! Where the test PostgreSQL and Redis are.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Connection URLs of the development services the tests run against.
#[derive(Debug, Clone)]
pub struct TestEnv {
    /// The application login role (`hafen_app`) on the main database.
    pub database_url: String,
    /// A superuser, for creating and dropping test databases.
    pub admin_database_url: String,
    /// Redis (`rediss://` in the development set-up).
    pub redis_url: String,
    /// The CA Redis's certificate chains to, when not the system's.
    pub redis_ca: Option<PathBuf>,
    /// Nodes of the development Redis Cluster (`HAFEN_DEV_CLUSTER_URLS`), when named.
    pub cluster_urls: Option<String>,
}

impl TestEnv {
    /// The environment, read once per process from variables or `.dev/env`.
    pub fn get() -> &'static TestEnv {
        static ENV: OnceLock<TestEnv> = OnceLock::new();
        ENV.get_or_init(|| {
            let file = dev_env_file();
            let lookup = |name: &str| -> String {
                std::env::var(name)
                    .ok()
                    .or_else(|| file.get(name).cloned())
                    .unwrap_or_else(|| {
                        panic!(
                            "{name} is not set and .dev/env does not name it: start the \
                             development services with `scripts/dev-services.sh up` (or run \
                             `make test`)"
                        )
                    })
            };
            TestEnv {
                database_url: lookup("HAFEN_DATABASE_URL"),
                admin_database_url: lookup("HAFEN_ADMIN_DATABASE_URL"),
                redis_url: lookup("HAFEN_REDIS_URL"),
                redis_ca: std::env::var("HAFEN_REDIS_CA")
                    .ok()
                    .or_else(|| file.get("HAFEN_REDIS_CA").cloned())
                    .filter(|path| !path.is_empty())
                    .map(PathBuf::from),
                cluster_urls: std::env::var("HAFEN_DEV_CLUSTER_URLS")
                    .ok()
                    .or_else(|| file.get("HAFEN_DEV_CLUSTER_URLS").cloned())
                    .filter(|urls| !urls.is_empty()),
            }
        })
    }
}

/// The workspace's root directory.
pub(crate) fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `KEY=value` lines of `.dev/env`; empty when the file does not exist.
fn dev_env_file() -> HashMap<String, String> {
    let path = workspace_root().join(".dev/env");
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|line| {
            let line = line.trim().trim_start_matches("export ");
            let (key, value) = line.split_once('=')?;
            Some((
                key.trim().to_owned(),
                value.trim().trim_matches('"').trim_matches('\'').to_owned(),
            ))
        })
        .collect()
}
