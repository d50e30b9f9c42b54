//! Test helpers, so that every test runs against the real thing without sharing anything:
//!
//! - [`TestDatabase`]: a fresh PostgreSQL database per test, copied from a template that
//!   holds the migrated control plane (so creating one takes milliseconds), dropped on drop.
//! - [`TestRedis`]: a Redis key namespace per test, whose keys are deleted on drop.
//! - [`TestRedisCluster`]: a namespace on the development Redis Cluster, whose nodes a test
//!   can kill and start again.
//! - [`PrivateRedis`], [`PrivatePostgres`]: servers of a test's own, to stop mid-test or to
//!   run set up differently (plaintext) from the development ones, which speak only TLS.
//! - [`TestSecrets`]: a throwaway CA and service certificates in a temporary directory.
//! - [`TestServer`]: any service started on `127.0.0.1:0` with TLS, a connected tonic
//!   [`Channel`], and an orderly shutdown.
//! - [`TestStack`]: the auth and tenant services together, with helpers to create tenants
//!   and members ([`TestMember`]) and log in.
//! - [`eventually`]: waits, bounded, for a condition the test can observe, where sleeping
//!   would only hope it holds; [`ending_status`]: waits, bounded, for a stream's end.
//!
//! Where PostgreSQL and Redis are comes from `HAFEN_DATABASE_URL`, `HAFEN_ADMIN_DATABASE_URL`
//! and `HAFEN_REDIS_URL`, or from `.dev/env`, which `scripts/dev-services.sh up` writes.
//! Logs stay quiet unless `TEST_LOG` is set (to an EnvFilter such as `debug`);
//! [`LogCapture`] records them instead, for tests proving that no secret is logged (BX5).

#![allow(
    clippy::expect_used,
    reason = "test set-up that fails must fail the test loudly, with the reason"
)]

mod env;
mod logs;
mod postgres_server;
mod redis_cluster;
mod redis_ns;
mod redis_server;
mod server;
mod stack;
mod wait;
pub mod web;

use std::sync::Once;

pub use env::TestEnv;
pub use logs::LogCapture;
pub use postgres_server::PrivatePostgres;
pub use redis_cluster::{ClusterNode, TestRedisCluster};
pub use redis_ns::TestRedis;
pub use redis_server::PrivateRedis;
pub use server::{Service, TestSecrets, TestServer};
pub use stack::{OWNER_PASSWORD, TestMember, TestStack, TestTenant, with_token};
pub use wait::{ending_status, eventually};

mod database;
pub use database::TestDatabase;

pub use tonic::transport::Channel;

/// Installs a log subscriber for tests when `TEST_LOG` is set; otherwise tests stay quiet.
pub fn init_test_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        hafen_platform::telemetry::install_crypto_provider();
        if let Ok(filter) = std::env::var("TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        }
    });
}
