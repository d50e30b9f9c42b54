//! `provision`: CreateTenant over gRPC, one tenant at a time. CreateTenant also creates the
//! owner account, whose bcrypt hash (about 250 ms at the production cost 12 on this
//! machine) dominates; the scenario therefore reports provisioning at bcrypt's minimum cost
//! as well, next to the same DDL sent raw, and the production figure next to raw bcrypt.

use std::time::Instant;

use diesel_async::SimpleAsyncConnection;
use hafen_proto::tenant::v1 as pb;
use hafen_proto::tenant::v1::tenant_service_client::TenantServiceClient;
use hafen_testkit::{Channel, TestDatabase, TestSecrets, TestServer};

use crate::{Line, ms, quantile};

/// The tenant-schema DDL, sent raw by the baseline: every tenant migration.
const TENANT_DDL: [&str; 5] = [
    include_str!("../../store/migrations/tenant/2026-12-02-000001_accounts/up.sql"),
    include_str!("../../store/migrations/tenant/2026-12-02-000002_messaging/up.sql"),
    include_str!("../../store/migrations/tenant/2026-12-02-000003_retention/up.sql"),
    include_str!("../../store/migrations/tenant/2026-12-02-000004_store_messages/up.sql"),
    include_str!("../../store/migrations/tenant/2026-12-02-000005_webchat/up.sql"),
];

/// Target of the issue: at most this many ms per tenant.
const TARGET_MS: f64 = 150.0;

async fn create(client: &mut TenantServiceClient<Channel>, secrets: &TestSecrets, slug: &str) {
    let request = pb::CreateTenantRequest {
        slug: slug.to_owned(),
        display_name: format!("Bench {slug}"),
        owner_username: "owner".into(),
        owner_display_name: "Owner".into(),
        owner_password: "correct horse battery".into(),
        dpa_version: "2025-01".into(),
        region: "eu-central".into(),
        ..Default::default()
    };
    client
        .create_tenant(secrets.operator(request))
        .await
        .expect("CreateTenant");
}

/// Sorted CreateTenant latencies (ms) of `tenants` tenants created one by one on a fresh
/// stack whose bcrypt cost is `cost`.
async fn measure(tenants: usize, cost: u32) -> Vec<f64> {
    let secrets = TestSecrets::generate();
    let db = TestDatabase::create().await;
    let mut config = secrets.tenant_config(&db, &[]);
    config.bcrypt_cost = cost;
    let server = TestServer::spawn(|l, s| hafen_tenant::serve(config, l, s)).await;
    let mut client = TenantServiceClient::new(server.channel(&secrets).await);
    for i in 0..3 {
        create(&mut client, &secrets, &format!("warm-up-{i}")).await;
    }
    let mut latencies = Vec::with_capacity(tenants);
    for i in 0..tenants {
        let started = Instant::now();
        create(&mut client, &secrets, &format!("bench-{i}")).await;
        latencies.push(ms(started.elapsed()));
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// Runs the scenario with `tenants` tenants: once with bcrypt at `cost` (what production
/// pays: the owner's password is hashed inside CreateTenant), once at bcrypt's minimum cost 4
/// (what provisioning itself costs).
pub async fn run(tenants: usize, cost: u32) -> (Vec<Line>, serde_json::Value) {
    let latencies = measure(tenants, cost).await;
    let provisioning = measure(tenants, 4).await;
    let db = TestDatabase::create().await;

    // Baseline 1: bcrypt at the same cost, alone.
    let mut bcrypt = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        tokio::task::spawn_blocking(move || {
            hafen_crypto::password::hash("correct horse battery", cost)
        })
        .await
        .expect("bcrypt task")
        .expect("bcrypt");
        bcrypt.push(ms(started.elapsed()));
    }
    bcrypt.sort_by(f64::total_cmp);

    // Baseline 2: the same DDL from a bare client on one open connection, one transaction
    // per tenant.
    let mut conn = db.connect().await;
    let mut raw = Vec::with_capacity(tenants);
    for _ in 0..tenants {
        let name = format!("t_{}", uuid::Uuid::now_v7().simple());
        let sql = format!(
            "BEGIN; CREATE ROLE {name} NOLOGIN; GRANT {name} TO CURRENT_USER; \
             CREATE SCHEMA {name} AUTHORIZATION {name}; \
             SELECT set_config('role', '{name}', true), set_config('search_path', '{name}', true); \
             {} COMMIT;",
            TENANT_DDL.concat()
        );
        let started = Instant::now();
        conn.batch_execute(&sql).await.expect("raw DDL");
        raw.push(ms(started.elapsed()));
    }
    raw.sort_by(f64::total_cmp);
    drop(conn);

    let p50 = quantile(&latencies, 0.5);
    let p99 = quantile(&latencies, 0.99);
    let bcrypt_p50 = quantile(&bcrypt, 0.5);
    let raw_p50 = quantile(&raw, 0.5);
    let provisioning_p50 = quantile(&provisioning, 0.5);
    let provisioning_p99 = quantile(&provisioning, 0.99);
    let lines = vec![
        Line {
            scenario: "provision",
            metric: "CreateTenant p50 (bcrypt 4)".into(),
            value: format!("{provisioning_p50:.1} ms"),
            baseline: format!("raw DDL {raw_p50:.1} ms"),
            target: format!("<= {TARGET_MS:.0} ms"),
        },
        Line {
            scenario: "provision",
            metric: "CreateTenant p99 (bcrypt 4)".into(),
            value: format!("{provisioning_p99:.1} ms"),
            baseline: String::new(),
            target: String::new(),
        },
        Line {
            scenario: "provision",
            metric: format!("CreateTenant p50 (bcrypt {cost})"),
            value: format!("{p50:.1} ms"),
            baseline: format!("bcrypt {bcrypt_p50:.1} + DDL {raw_p50:.1} ms"),
            target: String::new(),
        },
        Line {
            scenario: "provision",
            metric: "CreateTenant p99".into(),
            value: format!("{p99:.1} ms"),
            baseline: format!("DDL p99 {:.1} ms", quantile(&raw, 0.99)),
            target: String::new(),
        },
    ];
    let json = serde_json::json!({
        "scenario": "provision",
        "tenants": tenants,
        "bcrypt_cost": cost,
        "provisioning_p50_ms": provisioning_p50,
        "provisioning_p99_ms": provisioning_p99,
        "with_bcrypt_p50_ms": p50,
        "with_bcrypt_p99_ms": p99,
        "baseline_bcrypt_p50_ms": bcrypt_p50,
        "baseline_raw_ddl_p50_ms": raw_p50,
        "target_ms": TARGET_MS,
        "meets_target": provisioning_p50 <= TARGET_MS,
    });
    (lines, json)
}
