//! A Redis key namespace per test.

use redis::AsyncCommands;

use crate::env::TestEnv;

/// A key prefix no other test uses; every key under it is deleted on drop.
#[derive(Debug)]
pub struct TestRedis {
    args: hafen_authn::RedisArgs,
}

impl TestRedis {
    /// A fresh namespace `test:<uuid>:` on the development Redis.
    pub fn new() -> Self {
        crate::init_test_logging();
        let env = TestEnv::get();
        Self {
            args: hafen_authn::RedisArgs {
                redis_url: env.redis_url.clone(),
                redis_ca: env.redis_ca.clone(),
                redis_prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
                redis_cluster: false,
            },
        }
    }

    /// The Redis URL.
    pub fn url(&self) -> &str {
        &self.args.redis_url
    }

    /// The prefix every key of this test starts with.
    pub fn prefix(&self) -> &str {
        &self.args.redis_prefix
    }

    /// Settings that keep every key and channel in this namespace (TLS as configured).
    pub fn args(&self) -> hafen_authn::RedisArgs {
        self.args.clone()
    }

    /// A client of the development Redis, over TLS as configured.
    pub fn client(&self) -> redis::Client {
        self.args
            .client()
            .expect("valid HAFEN_REDIS_URL and HAFEN_REDIS_CA")
    }

    /// A connection manager (reconnects on its own).
    pub async fn connect(&self) -> redis::aio::ConnectionManager {
        self.client()
            .get_connection_manager()
            .await
            .expect("connect to Redis (HAFEN_REDIS_URL)")
    }

    /// Keys currently under this namespace.
    pub async fn keys(&self) -> Vec<String> {
        let mut conn = self.connect().await;
        scan(&mut conn, self.prefix()).await
    }
}

impl Default for TestRedis {
    fn default() -> Self {
        Self::new()
    }
}

async fn scan(conn: &mut redis::aio::ConnectionManager, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut iter: redis::AsyncIter<'_, String> = conn
        .scan_match(format!("{prefix}*"))
        .await
        .expect("SCAN test namespace");
    while let Some(key) = futures::StreamExt::next(&mut iter).await {
        keys.push(key.expect("SCAN result"));
    }
    keys
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let args = self.args.clone();
        let prefix = self.args.redis_prefix.clone();
        let cleaned = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime for cleaning the Redis namespace");
            runtime.block_on(async {
                let client = args.client()?;
                let mut conn = client.get_connection_manager().await?;
                let keys = scan(&mut conn, &prefix).await;
                if !keys.is_empty() {
                    let _: () = conn.del(keys).await?;
                }
                Ok::<_, redis::RedisError>(())
            })
        })
        .join();
        if !matches!(cleaned, Ok(Ok(()))) {
            eprintln!(
                "warning: could not clean Redis namespace {}",
                self.args.redis_prefix
            );
        }
    }
}
