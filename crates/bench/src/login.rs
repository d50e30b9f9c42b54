//! `login`: logins per second at concurrency 8 over TLS, next to raw bcrypt verifications per
//! second at the same cost and concurrency; and ListUsers latency while logins saturate the
//! machine, next to the same calls when idle (hashing must never block the async workers).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hafen_proto::auth::v1 as pb;
use hafen_proto::auth::v1::auth_service_client::AuthServiceClient;
use hafen_testkit::{Channel, TestDatabase, TestSecrets, TestServer, with_token};

use crate::{Line, ms, quantile};

const CONCURRENCY: usize = 8;
const PHASE: Duration = Duration::from_secs(10);
const TARGET_RATIO: f64 = 0.9;
const TARGET_LATENCY_RATIO: f64 = 2.0;

struct Account {
    username: String,
    password: String,
    code: String,
}

/// Runs the scenario with bcrypt at `cost`.
pub async fn run(cost: u32) -> (Vec<Line>, serde_json::Value) {
    let secrets = TestSecrets::generate();
    let db = TestDatabase::create().await;
    let mut auth_config = secrets.auth_config(&db);
    auth_config.bcrypt_cost = cost;
    let auth = TestServer::spawn(|l, s| hafen_auth::serve(auth_config, l, s)).await;
    let mut tenant_config = secrets.tenant_config(&db, &[]);
    tenant_config.bcrypt_cost = cost;
    tenant_config.auth.auth_endpoint = auth.uri();
    let tenant = TestServer::spawn(|l, s| hafen_tenant::serve(tenant_config, l, s)).await;

    let created = hafen_proto::tenant::v1::tenant_service_client::TenantServiceClient::new(
        tenant.channel(&secrets).await,
    )
    .create_tenant(
        secrets.operator(hafen_proto::tenant::v1::CreateTenantRequest {
            slug: "bench".into(),
            display_name: "Bench".into(),
            owner_username: "owner".into(),
            owner_display_name: "Owner".into(),
            owner_password: hafen_testkit::OWNER_PASSWORD.into(),
            dpa_version: "2025-01".into(),
            region: "eu-central".into(),
            ..Default::default()
        }),
    )
    .await
    .expect("CreateTenant")
    .into_inner();
    let channel = auth.channel(&secrets).await;
    let mut client = AuthServiceClient::new(channel.clone());
    let owner = login(
        &mut client,
        &Account {
            username: "owner".into(),
            password: hafen_testkit::OWNER_PASSWORD.into(),
            code: created.owner_chat_code.clone(),
        },
    )
    .await
    .expect("owner login");
    let mut accounts = Vec::new();
    for i in 0..CONCURRENCY {
        let username = format!("bench-{i}");
        let password = format!("bench password {i}");
        let user = client
            .create_user(with_token(
                &owner,
                pb::CreateUserRequest {
                    username: username.clone(),
                    display_name: username.clone(),
                    role: hafen_proto::common::v1::Role::Member as i32,
                    credential: Some(pb::create_user_request::Credential::Password(
                        password.clone(),
                    )),
                    ..Default::default()
                },
            ))
            .await
            .expect("CreateUser")
            .into_inner();
        let code = client
            .issue_chat_code(with_token(
                &owner,
                pb::IssueChatCodeRequest {
                    user_id: user.user_id,
                    device_label: "bench".into(),
                },
            ))
            .await
            .expect("IssueChatCode")
            .into_inner()
            .code;
        accounts.push(Account {
            username,
            password,
            code,
        });
    }

    // Baseline: raw bcrypt verifications at the same cost and concurrency.
    let hash = hafen_crypto::password::hash("bench password", cost).expect("hash");
    let verifications = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (hash, count) = (hash.clone(), verifications.clone());
        workers.push(tokio::task::spawn_blocking(move || {
            while started.elapsed() < PHASE {
                let _ = hafen_crypto::password::verify("bench password", &hash, cost);
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for worker in workers {
        worker.await.expect("bcrypt worker");
    }
    let bcrypt_per_sec =
        verifications.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    // ListUsers when idle.
    let idle = list_users_latencies(&channel, &owner, 200, None).await;

    // The login storm, with ListUsers measured during it.
    let logins = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let started = Instant::now();
    let mut storm = Vec::new();
    for account in accounts {
        let (mut client, count, running) = (
            AuthServiceClient::new(channel.clone()),
            logins.clone(),
            running.clone(),
        );
        storm.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) && started.elapsed() < PHASE {
                login(&mut client, &account)
                    .await
                    .expect("login during the storm");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy =
        list_users_latencies(&channel, &owner, 200, Some(PHASE - Duration::from_secs(1))).await;
    for task in storm {
        task.await.expect("login worker");
    }
    running.store(false, Ordering::Relaxed);
    let logins_per_sec = logins.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();

    let ratio = logins_per_sec / bcrypt_per_sec;
    let idle_p99 = quantile(&idle, 0.99);
    let busy_p99 = quantile(&busy, 0.99);
    let latency_ratio = busy_p99 / idle_p99;
    let lines = vec![
        Line {
            scenario: "login",
            metric: format!("logins/s, concurrency {CONCURRENCY}, bcrypt {cost}"),
            value: format!("{logins_per_sec:.1}/s"),
            baseline: format!("bcrypt {bcrypt_per_sec:.1}/s ({ratio:.2}x)"),
            target: format!(">= {TARGET_RATIO:.1}x"),
        },
        Line {
            scenario: "login",
            metric: "ListUsers p99 during the storm".into(),
            value: format!("{busy_p99:.1} ms"),
            baseline: format!("idle {idle_p99:.1} ms ({latency_ratio:.2}x)"),
            target: format!("<= {TARGET_LATENCY_RATIO:.0}x"),
        },
    ];
    let json = serde_json::json!({
        "scenario": "login",
        "concurrency": CONCURRENCY,
        "bcrypt_cost": cost,
        "logins_per_sec": logins_per_sec,
        "baseline_bcrypt_verifications_per_sec": bcrypt_per_sec,
        "ratio_to_baseline": ratio,
        "list_users_idle_p50_ms": quantile(&idle, 0.5),
        "list_users_idle_p99_ms": idle_p99,
        "list_users_storm_p50_ms": quantile(&busy, 0.5),
        "list_users_storm_p99_ms": busy_p99,
        "latency_ratio": latency_ratio,
        "meets_target": ratio >= TARGET_RATIO && latency_ratio <= TARGET_LATENCY_RATIO,
    });
    (lines, json)
}

async fn login(
    client: &mut AuthServiceClient<Channel>,
    account: &Account,
) -> Result<String, tonic::Status> {
    Ok(client
        .login(pb::LoginRequest {
            tenant_slug: "bench".into(),
            username: account.username.clone(),
            password: account.password.clone(),
            chat_code: account.code.clone(),
            device_label: String::new(),
        })
        .await?
        .into_inner()
        .access_token)
}

/// Sorted latencies (ms) of `count` sequential ListUsers calls, spread over `within` if given.
async fn list_users_latencies(
    channel: &Channel,
    token: &str,
    count: usize,
    within: Option<Duration>,
) -> Vec<f64> {
    let mut client = AuthServiceClient::new(channel.clone());
    let pause = within.map(|d| d / count as u32);
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        client
            .list_users(with_token(token, pb::ListUsersRequest::default()))
            .await
            .expect("ListUsers");
        let elapsed = started.elapsed();
        latencies.push(ms(elapsed));
        if let Some(pause) = pause {
            tokio::time::sleep(pause.saturating_sub(elapsed)).await;
        }
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}
