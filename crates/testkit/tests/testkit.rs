//! The test harness isolates tests from each other for real.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use hafen_testkit::{TestDatabase, TestRedis};
use redis::AsyncCommands;

#[tokio::test(flavor = "multi_thread")]
async fn each_test_gets_its_own_database_and_it_is_dropped() {
    let a = TestDatabase::create().await;
    let b = TestDatabase::create().await;
    assert_ne!(a.name(), b.name());
    let name = a.name().to_owned();
    drop(a);

    let probe = TestDatabase::create_empty().await;
    let mut conn = probe.connect().await;
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let left: Count = diesel_async::RunQueryDsl::get_result(
        diesel::sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
            .bind::<diesel::sql_types::Text, _>(&name),
        &mut conn,
    )
    .await
    .unwrap();
    assert_eq!(left.n, 0, "the dropped test database is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_test_gets_its_own_redis_namespace_and_it_is_cleaned() {
    let ns = TestRedis::new();
    let other = TestRedis::new();
    assert_ne!(ns.prefix(), other.prefix());

    let mut conn = ns.connect().await;
    let key = format!("{}session", ns.prefix());
    let _: () = conn.set(&key, "1").await.unwrap();
    assert_eq!(ns.keys().await, std::slice::from_ref(&key));
    assert!(other.keys().await.is_empty(), "namespaces do not overlap");

    drop(ns);
    let exists: bool = conn.exists(&key).await.unwrap();
    assert!(!exists, "the namespace's keys are deleted with it");
}
