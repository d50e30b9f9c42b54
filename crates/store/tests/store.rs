//! The store against the real PostgreSQL started by `scripts/dev-services.sh`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::time::Duration;

use diesel::QueryableByName;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use hafen_store::migrate::{
    migrate_control_plane, migrate_keystore, pending_control_plane, pending_keystore,
};
use hafen_store::pool::build_pool;
use hafen_testkit::TestDatabase;

#[derive(QueryableByName, Debug)]
struct Name {
    #[diesel(sql_type = diesel::sql_types::Text)]
    name: String,
}

async fn tables_in(db: &TestDatabase, schema: &str) -> Vec<String> {
    let mut conn = db.connect().await;
    let mut names: Vec<String> = diesel::sql_query(
        "SELECT table_name::text AS name FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind::<diesel::sql_types::Text, _>(schema)
    .load::<Name>(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .map(|row| row.name)
    .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn dc2_control_plane_migrations_run_once_on_real_postgres() {
    let db = TestDatabase::create_empty().await;
    let pending = pending_control_plane(db.url()).await.unwrap();
    assert!(
        !pending.is_empty(),
        "an empty database lacks every migration"
    );
    assert!(
        tables_in(&db, "hafen").await.is_empty(),
        "checking writes nothing"
    );

    let applied = migrate_control_plane(db.url()).await.unwrap();
    assert_eq!(applied, pending);
    assert!(pending_control_plane(db.url()).await.unwrap().is_empty());
    assert!(
        migrate_control_plane(db.url()).await.unwrap().is_empty(),
        "a second run is a no-op"
    );

    assert_eq!(
        tables_in(&db, "hafen").await,
        [
            "__diesel_schema_migrations",
            "audit_events",
            "audit_heads",
            "audit_keys",
            "audit_signed_heads",
            "audit_unsigned_chains",
            "backup_runs",
            "erasure_requests",
            "outbox",
            "service_facts",
            "sessions",
            "tenants",
            "widget_routes"
        ]
    );
    assert!(
        tables_in(&db, "public").await.is_empty(),
        "the control plane keeps everything, its migration table included, in `hafen`"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bx1_keys_and_the_deletion_log_live_in_the_key_store_and_older_control_planes_move_them_there()
 {
    use diesel_migrations::MigrationHarness;

    let db = TestDatabase::create_empty().await;
    let keystore = db.keystore();
    assert!(!pending_keystore(keystore.url()).await.unwrap().is_empty());
    migrate_keystore(keystore.url()).await.unwrap();
    assert!(pending_keystore(keystore.url()).await.unwrap().is_empty());
    assert_eq!(
        tables_in(keystore, "hafen_keys").await,
        [
            "__diesel_schema_migrations",
            "deletion_log",
            "tenant_keys",
            "user_keys"
        ]
    );
    assert!(tables_in(keystore, "hafen").await.is_empty());

    // A control plane from before the key store, holding keys and a deletion.
    let url = db.url().to_owned();
    tokio::task::spawn_blocking(move || {
        let mut conn = hafen_store::connect::establish_sync(&url).unwrap();
        diesel::connection::SimpleConnection::batch_execute(
            &mut conn,
            "CREATE SCHEMA hafen; SET search_path TO hafen",
        )
        .unwrap();
        while conn
            .applied_migrations()
            .unwrap()
            .iter()
            .all(|v| v.to_string().replace('-', "") != "20261203000008")
        {
            conn.run_next_migration(hafen_store::migrate::CONTROL_PLANE)
                .unwrap();
        }
    })
    .await
    .unwrap();
    let (tenant, user) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
    db.connect()
        .await
        .batch_execute(&format!(
            "INSERT INTO hafen.tenants (id, slug, display_name, status, region, dpa_version, \
             dpa_accepted_at, dpa_accepted_by, database_name) VALUES ('{tenant}', 'old', 'Old', \
             'active', 'eu-central', '2025-01', now(), '{user}', 'default'); \
             INSERT INTO hafen.tenant_keys (tenant_id, wrapped_key) VALUES ('{tenant}', '\\x01'); \
             INSERT INTO hafen.user_keys (tenant_id, user_id, wrapped_key) \
             VALUES ('{tenant}', '{user}', '\\x02'); \
             INSERT INTO hafen.deletion_log (id, kind, tenant_id, user_id) \
             VALUES ('{user}', 'user', '{tenant}', '{user}')"
        ))
        .await
        .unwrap();

    let moved = hafen_store::migrate::move_keys_to_keystore(db.url(), keystore.url())
        .await
        .unwrap();
    assert_eq!(moved, 3);
    migrate_control_plane(db.url()).await.unwrap();
    let tables = tables_in(&db, "hafen").await;
    assert!(
        !tables
            .iter()
            .any(|t| ["tenant_keys", "user_keys", "deletion_log"].contains(&t.as_str())),
        "{tables:?}"
    );
    let mut keys = keystore.connect().await;
    let (version, wrapped) = hafen_store::keystore::tenant_key(&mut keys, tenant)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((version, wrapped), (1, vec![1]));
    assert_eq!(
        hafen_store::keystore::deletion_log_entries(&mut keys, tenant)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        hafen_store::migrate::move_keys_to_keystore(db.url(), keystore.url())
            .await
            .unwrap(),
        0,
        "nothing left to move"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dc2_concurrent_migration_runs_apply_each_migration_once() {
    let db = TestDatabase::create_empty().await;
    let (a, b) = tokio::join!(
        migrate_control_plane(db.url()),
        migrate_control_plane(db.url())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        a.is_empty() != b.is_empty(),
        "one run applies, the other finds nothing to do: {a:?} / {b:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bx3_pooled_connections_are_reset_on_return() {
    let db = TestDatabase::create().await;
    let mut args = db.args();
    args.db_pool_size = 1;
    let pool = build_pool(&args).unwrap();

    let mut conn = pool.get().await.unwrap();
    // Session-level settings, as a committer keeps them or a buggy query might leave behind.
    conn.batch_execute("SET search_path TO hafen; SET enable_seqscan = off")
        .await
        .unwrap();
    drop(conn);

    let mut conn = pool.get().await.unwrap();
    let path: Name = diesel::sql_query("SELECT current_setting('search_path') AS name")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        path.name, "\"$user\", public",
        "the next user starts unscoped"
    );
    let err = diesel::sql_query("SELECT slug AS name FROM tenants")
        .load::<Name>(&mut conn)
        .await
        .expect_err("an unscoped query cannot find control-plane tables");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let planner: Name = diesel::sql_query("SELECT current_setting('enable_seqscan') AS name")
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(planner.name, "on", "planner settings are reset too");
}

#[tokio::test(flavor = "multi_thread")]
async fn cb1_a_session_scope_holds_across_statements_and_ends_with_the_pool() {
    use hafen_store::TenantId;
    use hafen_store::tenancy::enter_session;

    let db = TestDatabase::create().await;
    let tenant = TenantId::from(uuid::Uuid::now_v7());
    let name = tenant.schema();
    db.connect()
        .await
        .batch_execute(&format!(
            "CREATE ROLE {name} NOLOGIN; GRANT {name} TO CURRENT_USER; \
             CREATE SCHEMA {name} AUTHORIZATION {name}; \
             SET ROLE {name}; CREATE TABLE {name}.t (x int); \
             INSERT INTO {name}.t SELECT generate_series(1, 3); RESET ROLE;"
        ))
        .await
        .unwrap();
    let mut args = db.args();
    args.db_pool_size = 1;
    let pool = build_pool(&args).unwrap();
    let count = "SELECT count(*) AS n FROM t";

    let mut conn = pool.get().await.unwrap();
    enter_session(&conn, &tenant).await.unwrap();
    // Each statement is a transaction of its own, and each is in the tenant's scope.
    for _ in 0..2 {
        let seen: Count = diesel::sql_query(count)
            .get_result(&mut conn)
            .await
            .unwrap();
        assert_eq!(seen.n, 3);
    }
    drop(conn);

    let mut conn = pool.get().await.unwrap();
    let err = diesel::sql_query(count)
        .get_result::<Count>(&mut conn)
        .await
        .expect_err("the next user of the connection is out of the scope");
    assert!(err.to_string().contains("does not exist"), "{err}");
    drop(conn);
    db.connect()
        .await
        .batch_execute(&format!(
            "SET ROLE {name}; DROP SCHEMA {name} CASCADE; RESET ROLE; DROP ROLE {name};"
        ))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_wait_timeout_gives_a_clear_error() {
    let db = TestDatabase::create().await;
    let mut args = db.args();
    args.db_pool_size = 1;
    args.db_wait_timeout = Duration::from_millis(200);
    let pool = build_pool(&args).unwrap();

    let held = pool.get().await.unwrap();
    let Err(err) = pool.get().await.map_err(hafen_store::Error::from) else {
        panic!("the only connection is taken");
    };
    assert!(err.to_string().contains("database unavailable"), "{err}");
    drop(held);
    let _again = pool.get().await.expect("free again once returned");
}

#[derive(QueryableByName, Debug)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn cb1_a_prepared_statement_reads_the_tenant_whose_scope_is_entered() {
    // One connection, one cached statement, two tenants: each run reads the tables of the
    // scope it runs in, never those of the scope it was first prepared in.
    use hafen_store::TenantId;
    use hafen_store::prepared::Prepared;
    use hafen_store::tenancy::enter_statement;

    let db = TestDatabase::create().await;
    let tenants = [
        TenantId::from(uuid::Uuid::now_v7()),
        TenantId::from(uuid::Uuid::now_v7()),
    ];
    let mut conn = db.connect().await;
    for (rows, tenant) in [2, 5].into_iter().zip(&tenants) {
        let name = tenant.schema();
        conn.batch_execute(&format!(
            "CREATE ROLE {name} NOLOGIN; GRANT {name} TO CURRENT_USER; \
             CREATE SCHEMA {name} AUTHORIZATION {name}; \
             SET ROLE {name}; CREATE TABLE {name}.t (x int); \
             INSERT INTO {name}.t SELECT generate_series(1, {rows}); RESET ROLE;"
        ))
        .await
        .unwrap();
    }
    let count = || Prepared::text(&["SELECT count(*) AS n FROM t"]);
    let mut seen = Vec::new();
    for tenant in tenants.iter().chain(tenants.iter()) {
        conn.batch_execute("BEGIN").await.unwrap();
        enter_statement(tenant).execute(&mut conn).await.unwrap();
        seen.push(count().get_result::<Count>(&mut conn).await.unwrap().n);
        conn.batch_execute("COMMIT").await.unwrap();
    }
    assert_eq!(seen, [2, 5, 2, 5]);
    let prepared: Count = diesel::sql_query(
        "SELECT count(*) AS n FROM pg_prepared_statements WHERE statement LIKE '%count(*) AS n FROM t'",
    )
    .get_result(&mut conn)
    .await
    .unwrap();
    assert_eq!(prepared.n, 1, "one statement, prepared once");
    for tenant in &tenants {
        let name = tenant.schema();
        conn.batch_execute(&format!(
            "SET ROLE {name}; DROP SCHEMA {name} CASCADE; RESET ROLE; DROP ROLE {name};"
        ))
        .await
        .unwrap();
    }
}

#[derive(QueryableByName, Debug)]
struct PlanLine {
    #[diesel(sql_type = diesel::sql_types::Text)]
    #[diesel(column_name = "QUERY PLAN")]
    line: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generic_plan_made_on_empty_tables_probes_indexes_under_index_probes_only() {
    // A statement prepared once per connection may run with a generic plan made while its
    // tables were empty. Planned that way, a lookup scans the whole table (and would go on
    // scanning it as it grows); under INDEX_PROBES_ONLY, a lookup written as a LATERAL
    // subquery probes the index.
    use hafen_store::prepared::{INDEX_PROBES_ONLY, Prepared};

    let db = TestDatabase::create().await;
    let mut conn = db.connect().await;
    conn.batch_execute(
        "CREATE SCHEMA plans; \
         CREATE TABLE plans.parent (id uuid PRIMARY KEY, name text NOT NULL); \
         CREATE TABLE plans.child (id bigint PRIMARY KEY, parent_id uuid NOT NULL); \
         ANALYZE plans.parent, plans.child",
    )
    .await
    .unwrap();
    // Each its own statement: a plan, once made, is kept whatever the settings of later runs.
    let mut plan = async |name: &str, settings: bool| {
        conn.batch_execute(&format!(
            "PREPARE {name}(bigint) AS SELECT * FROM plans.child c CROSS JOIN LATERAL \
                 (SELECT * FROM plans.parent p WHERE p.id = c.parent_id LIMIT 1) p \
                 WHERE c.id > $1 ORDER BY c.id LIMIT 500; \
             BEGIN; SET LOCAL plan_cache_mode = force_generic_plan"
        ))
        .await
        .unwrap();
        if settings {
            Prepared::text(INDEX_PROBES_ONLY)
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let lines: Vec<PlanLine> = diesel::sql_query(format!("EXPLAIN EXECUTE {name}(0)"))
            .load(&mut conn)
            .await
            .unwrap();
        conn.batch_execute("COMMIT").await.unwrap();
        lines
            .into_iter()
            .map(|l| l.line)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let unguarded = plan("unguarded", false).await;
    assert!(unguarded.contains("Seq Scan on parent"), "{unguarded}");
    let guarded = plan("guarded", true).await;
    assert!(!guarded.contains("Seq Scan"), "{guarded}");
    assert!(
        guarded.contains("Index Cond: (id = c.parent_id)"),
        "{guarded}"
    );
}

/// Where a tenant lives is cached, so each request does not ask the control plane; a move
/// (a restore onto another database) is seen once the placement is forgotten.
#[tokio::test(flavor = "multi_thread")]
async fn tm3_a_cached_placement_holds_until_forgotten() {
    let mut db = TestDatabase::create().await;
    db.add_placement("spare").await;
    let databases = hafen_store::Databases::new(&db.databases()).unwrap();
    let tenant = hafen_store::tenancy::TenantId::generate();
    let mut control = db.connect().await;
    let place = |name: &str| {
        format!(
            "INSERT INTO hafen.tenants (id, slug, status, region, dpa_version, dpa_accepted_at, \
             dpa_accepted_by, database_name) VALUES ('{id}', 'moving', 'active', 'eu', 'v1', \
             now(), '{id}', '{name}') \
             ON CONFLICT (id) DO UPDATE SET database_name = excluded.database_name",
            id = tenant.as_uuid()
        )
    };
    let lives_on = async |databases: &hafen_store::Databases| {
        let mut conn = databases.tenant_connection(&tenant).await.unwrap();
        diesel::sql_query("SELECT current_database()::text AS name")
            .get_result::<Name>(&mut conn)
            .await
            .unwrap()
            .name
    };
    control.batch_execute(&place("default")).await.unwrap();
    assert_eq!(lives_on(&databases).await, db.name());
    control.batch_execute(&place("spare")).await.unwrap();
    assert_eq!(
        lives_on(&databases).await,
        db.name(),
        "cached: the control plane is not asked again"
    );
    databases.forget(tenant.as_uuid());
    assert_eq!(lives_on(&databases).await, db.placement("spare").name());
    control.batch_execute(&place("default")).await.unwrap();
    databases.forget_all();
    assert_eq!(lives_on(&databases).await, db.name());
}
