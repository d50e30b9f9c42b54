//! What Hafen trusts with what (DESIGN "Trust model"): Redis is never an authority (BX3),
//! every link is TLS and never falls back to plaintext (OC4, TM5), the master key is only
//! where data keys are wrapped and unwrapped keys are bounded and forgotten (BX1), and a
//! revocation whose announcement is lost still ends the device's streams (OC5).

use std::time::Duration;

use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::messaging::v1 as pb;
use hafen_proto::tenant::v1 as tenant_pb;
use hafen_testkit::{PrivatePostgres, PrivateRedis, TestStack, eventually, with_token};
use redis::AsyncCommands;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn bx3_a_forged_session_cache_entry_is_refused() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("forged").await;
    let login = stack.login_owner(&tenant).await;
    let redis = stack.secrets.redis();
    let mut conn = redis.connect().await;

    // A token of the attacker's choosing, and the cache entry that would make it the owner.
    let session = Uuid::now_v7();
    let secret = "forgedsecretforgedsecretforgedsecretforged1";
    let token = format!("{}.{secret}", session.simple());
    let entry = serde_json::json!({
        "session_id": session,
        "tenant_id": tenant.id,
        "user_id": tenant.owner_id,
        "role": "owner",
        "chat_code_id": tenant.owner_code_id,
        "access_digest": hex_digest(secret),
        "expires_at": chrono_in(600),
        "cached_at": chrono_in(0),
    })
    .to_string();
    let key = format!("{}session:{{{}}}", redis.prefix(), session.simple());
    // Without a MAC (what was accepted before), and with a MAC under a key of its own.
    let forgeries = [
        entry.clone(),
        format!("{}.{entry}", "A".repeat(43)),
        format!("{}={}", "QUJD".repeat(10), entry),
        format!("{}.{}=.{entry}", i64::MAX, "A".repeat(43)),
    ];
    for forged in forgeries {
        let () = conn.set_ex(&key, &forged, 600).await.unwrap();
        let refused = stack
            .auth_client()
            .await
            .list_users(with_token(&token, auth_pb::ListUsersRequest::default()))
            .await
            .expect_err("a forged cache entry must not authenticate");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let refused = stack
            .messaging_client()
            .await
            .list_conversations(with_token(&token, pb::ListConversationsRequest::default()))
            .await
            .expect_err("no other service trusts it either");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }

    // The genuine session is cached with its MAC and keeps working from the cache.
    let ok = stack
        .auth_client()
        .await
        .list_users(with_token(
            &login.access_token,
            auth_pb::ListUsersRequest::default(),
        ))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
    let genuine_id = login.access_token.split('.').next().unwrap_or_default();
    let genuine: Option<String> = conn
        .get(format!("{}session:{{{genuine_id}}}", redis.prefix()))
        .await
        .unwrap();
    let genuine = genuine.expect("the real session is cached");
    let mut parts = genuine.splitn(3, '.');
    let (expiry, mac, json) = (parts.next(), parts.next(), parts.next());
    assert!(
        expiry.is_some_and(|ms| ms.parse::<i64>().is_ok()),
        "EXPIRY.MAC.JSON"
    );
    assert_eq!(mac.map(str::len), Some(44), "a base64 HMAC-SHA-256");
    assert!(json.is_some_and(|json| json.starts_with('{')));
}

fn hex_digest(secret: &str) -> String {
    hafen_authn::token::digest(secret)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn chrono_in(seconds: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(seconds)).to_rfc3339()
}

#[derive(QueryableByName)]
struct Links {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    total: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    encrypted: i64,
}

#[tokio::test(flavor = "multi_thread")]
async fn oc4_database_link_is_tls() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("tls-db").await;
    let login = stack.login_owner(&tenant).await;
    stack
        .messaging_client()
        .await
        .list_conversations(with_token(
            &login.access_token,
            pb::ListConversationsRequest::default(),
        ))
        .await
        .expect("a call that reads the tenant's schema");
    // What the server says about every connection the services hold to this test's database.
    let mut admin = stack.db.connect_admin().await;
    let links: Links = diesel::sql_query(
        "SELECT count(*) AS total, count(*) FILTER (WHERE s.ssl) AS encrypted \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.datname = $1 AND a.usename <> 'postgres'",
    )
    .bind::<diesel::sql_types::Text, _>(stack.db.name())
    .get_result(&mut admin)
    .await
    .unwrap();
    assert!(
        links.total >= 3,
        "the services hold connections: {}",
        links.total
    );
    assert_eq!(
        links.encrypted, links.total,
        "every connection of the services is TLS"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oc4_redis_link_is_tls() {
    let redis = PrivateRedis::start();
    let args = redis.args("hafen:");
    assert!(args.redis_url.starts_with("rediss://"));
    let stack = TestStack::start_with_redis(Some(args.clone())).await;
    let tenant = stack.create_tenant("tls-redis").await;
    let login = stack.login_owner(&tenant).await;
    // The server has no plaintext port: the session the auth service cached there went over
    // TLS, and a plaintext client gets nothing.
    let mut conn = args
        .client()
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let session = login.access_token.split('.').next().unwrap_or_default();
    let cached: bool = conn
        .exists(format!("hafen:session:{{{session}}}"))
        .await
        .unwrap();
    assert!(cached, "the session was cached over TLS");
    let plaintext = redis.url().replace("rediss://", "redis://");
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        let client = redis::Client::open(plaintext.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a plaintext client must not be served"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oc4_a_service_configured_for_tls_refuses_a_plaintext_server() {
    let secrets = hafen_testkit::TestSecrets::generate();
    let db = hafen_testkit::TestDatabase::create().await;
    let ca = hafen_testkit::TestEnv::get()
        .redis_ca
        .clone()
        .expect("HAFEN_REDIS_CA: the development CA");

    // Redis that speaks only plaintext, configured as rediss://.
    let plain_redis = PrivateRedis::start_plaintext();
    let mut config = secrets.auth_config(&db);
    config.redis.redis_url = plain_redis.url().replace("redis://", "rediss://");
    config.redis.redis_ca = Some(ca.clone());
    let err = hafen_auth::build(&config)
        .await
        .expect_err("a TLS link to a plaintext Redis is a configuration error")
        .to_string();
    assert!(err.contains("TLS"), "{err}");

    // PostgreSQL that speaks only plaintext, with sslmode=verify-full (and require).
    let plain_pg = PrivatePostgres::start_plaintext();
    for mode in ["verify-full", "require"] {
        let mut config = secrets.auth_config(&db);
        config.databases.main.database_url =
            format!("{}&sslrootcert={}", plain_pg.url(mode), ca.display());
        let err = hafen_auth::build(&config)
            .await
            .expect_err("a TLS link to a plaintext PostgreSQL is refused")
            .to_string();
        assert!(err.contains("TLS"), "{mode}: {err}");
        assert!(err.contains("never falls back"), "{mode}: {err}");
    }
    // The same server is reachable when plaintext is what the URL says.
    let conn = hafen_store::connect::establish(&plain_pg.url("disable")).await;
    assert!(conn.is_ok(), "sslmode=disable connects");
}

#[test]
fn tm2_only_services_that_wrap_data_keys_take_the_master_key() {
    let takes_master = |command: clap::Command| {
        command
            .get_arguments()
            .any(|arg| arg.get_long() == Some("master-key-file"))
    };
    let takes_keys_file = |command: clap::Command| {
        command
            .get_arguments()
            .any(|arg| arg.get_long() == Some("keys-file"))
    };
    assert!(takes_master(hafen_tenant::command()));
    assert!(takes_master(hafen_messaging::command()));
    assert!(takes_master(hafen_webchat::command()));
    for (name, command) in [
        ("auth", hafen_auth::command()),
        ("audit", hafen_audit::command()),
        ("retention", hafen_retention::command()),
    ] {
        assert!(!takes_master(command.clone()), "{name} takes no master key");
        assert!(takes_keys_file(command), "{name} takes its derived keys");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bx1_unwrapped_keys_are_bounded_and_forgotten_when_their_tenant_is_deleted() {
    let stack = TestStack::start().await;
    let tenants = [
        stack.create_tenant("keys-a").await,
        stack.create_tenant("keys-b").await,
        stack.create_tenant("keys-c").await,
    ];
    let databases = hafen_store::Databases::new(&stack.db.databases()).unwrap();
    let ring = hafen_store::keyring::KeyRing::new(
        databases,
        stack.secrets.master_key(),
        std::num::NonZeroUsize::new(2).unwrap(),
    );
    let revocations = hafen_authn::Revocations::new(Duration::from_secs(60));
    revocations.listen(hafen_authn::Redis::new(&stack.secrets.redis_args()).unwrap());
    ring.follow(revocations.tenant_deletions());
    let id = |t: &hafen_testkit::TestTenant| Uuid::parse_str(&t.id).unwrap();
    let owner = |t: &hafen_testkit::TestTenant| Uuid::parse_str(&t.owner_id).unwrap();

    for tenant in &tenants {
        ring.user_key(id(tenant), owner(tenant)).await.unwrap();
    }
    let (held_tenants, held_users, _) = ring.held(id(&tenants[0]));
    assert_eq!(
        (held_tenants, held_users),
        (2, 2),
        "bounded to the capacity"
    );
    let (_, _, holds_first) = ring.held(id(&tenants[0]));
    assert!(!holds_first, "the least recently used went first");

    // The newest is held; its deletion is announced, and its keys go.
    let deleted = &tenants[2];
    assert!(ring.held(id(deleted)).2);
    // The listener follows the channel before the announcement, or would miss it.
    eventually(
        "the revocation channel is followed",
        Duration::from_secs(10),
        || std::future::ready(revocations.following_since()),
    )
    .await;
    stack
        .tenant_client()
        .await
        .delete_tenant(stack.secrets.operator(tenant_pb::DeleteTenantRequest {
            tenant_id: deleted.id.clone(),
            confirm_slug: deleted.slug.clone(),
            ..Default::default()
        }))
        .await
        .expect("DeleteTenant");
    eventually(
        "the deleted tenant's key is forgotten",
        Duration::from_secs(5),
        || std::future::ready((!ring.held(id(deleted)).2).then_some(())),
    )
    .await;
    assert!(
        ring.user_key(id(deleted), owner(deleted)).await.is_err(),
        "and cannot be had again"
    );
    assert!(
        ring.user_key(id(&tenants[1]), owner(&tenants[1]))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oc5_a_lost_revocation_still_ends_the_stream_within_6s() {
    let mut redis = PrivateRedis::start();
    let stack = TestStack::start_with_redis(Some(redis.args("hafen:"))).await;
    let tenant = stack.create_tenant("lost-revocation").await;
    let owner = stack.login_owner(&tenant).await;
    let (member, device) = stack
        .create_logged_in_member(&tenant, &owner.access_token, "device", "member password 1")
        .await;
    let mut stream = stack
        .messaging_client()
        .await
        .subscribe(with_token(
            &device.access_token,
            pb::SubscribeRequest::default(),
        ))
        .await
        .expect("Subscribe")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("caught-up event");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");

    // Redis goes away: the revocation is stored in PostgreSQL, its announcement is lost.
    redis.stop();
    stack
        .auth_client()
        .await
        .revoke_chat_code(with_token(
            &owner.access_token,
            auth_pb::RevokeChatCodeRequest {
                chat_code_id: member.chat_code_id,
            },
        ))
        .await
        .expect("RevokeChatCode");
    let revoked_at = Instant::now();
    let ended =
        hafen_testkit::ending_status(&mut stream, "after the revocation", Duration::from_secs(6))
            .await;
    assert_eq!(ended.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        hafen_platform::status::reason(&ended).as_deref(),
        Some("DEVICE_WIPED"),
        "{ended:?}"
    );
    assert!(revoked_at.elapsed() <= Duration::from_secs(6));
    let next = stack
        .messaging_client()
        .await
        .list_conversations(with_token(
            &device.access_token,
            pb::ListConversationsRequest::default(),
        ))
        .await
        .expect_err("the wiped device's next call is refused");
    assert_eq!(
        hafen_platform::status::reason(&next).as_deref(),
        Some("DEVICE_WIPED")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oc4_internal_rpcs_accept_only_the_services_on_their_allow_lists() {
    use hafen_proto::audit::v1 as audit_pb;
    use hafen_proto::audit::v1::audit_service_client::AuditServiceClient;
    use hafen_proto::auth::v1::auth_service_client::AuthServiceClient;
    use hafen_proto::retention::v1 as retention_pb;
    use hafen_proto::retention::v1::retention_service_client::RetentionServiceClient;

    let stack = TestStack::start().await;
    let denied = |result: &Result<(), tonic::Status>| matches!(result, Err(status) if status.code() == tonic::Code::PermissionDenied);
    let identities = ["auth", "messaging", "tenant", "retention", "audit", "redis"];
    for identity in identities {
        let tls = || stack.secrets.client_tls(Some(identity));
        let replay = RetentionServiceClient::new(stack.retention.try_channel(tls()).await.unwrap())
            .replay_deletions(retention_pb::ReplayDeletionsRequest { dry_run: true })
            .await
            .map(drop);
        let introspect = AuthServiceClient::new(stack.auth.try_channel(tls()).await.unwrap())
            .introspect(auth_pb::IntrospectRequest {
                access_token: "unknown".to_owned(),
            })
            .await
            .map(drop);
        let append = AuditServiceClient::new(stack.audit.try_channel(tls()).await.unwrap())
            .append_events(audit_pb::AppendEventsRequest::default())
            .await
            .map(drop);
        assert_eq!(
            !denied(&replay),
            identity == "retention",
            "{identity} ReplayDeletions: {replay:?}"
        );
        assert_eq!(
            !denied(&introspect),
            identity != "redis",
            "{identity} Introspect: {introspect:?}"
        );
        assert_eq!(
            !denied(&append),
            ["auth", "messaging", "tenant", "retention"].contains(&identity),
            "{identity} AppendEvents: {append:?}"
        );
        if denied(&replay) {
            let status = replay.unwrap_err();
            assert_eq!(
                hafen_platform::status::metadata(&status, "required").as_deref(),
                Some("internal")
            );
        }
    }

    // A certificate of another CA, even one naming a Hafen service, gets nowhere.
    let other = hafen_testkit::TestSecrets::generate();
    let foreign = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            stack.secrets.ca_pem(),
        ))
        .domain_name(hafen_platform::tls::DEV_SERVER_NAME)
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read_to_string(other.dir().join("retention.pem")).unwrap(),
            std::fs::read_to_string(other.dir().join("retention-key.pem")).unwrap(),
        ));
    let replay = match stack.retention.try_channel(foreign).await {
        Ok(channel) => RetentionServiceClient::new(channel)
            .replay_deletions(retention_pb::ReplayDeletionsRequest { dry_run: true })
            .await
            .map(drop),
        Err(err) => Err(tonic::Status::unavailable(err.to_string())),
    };
    assert!(replay.is_err(), "a foreign CA's certificate was accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn gr7_the_record_states_only_measures_in_force() {
    use hafen_proto::audit::v1 as audit_pb;

    let record_of = |json: &str| -> serde_json::Value { serde_json::from_str(json).unwrap() };

    // Every link TLS: the record says so, from what the six services report.
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("record-tls").await;
    let record = stack
        .audit_client()
        .await
        .get_processing_record(
            stack
                .secrets
                .operator(audit_pb::GetProcessingRecordRequest {
                    tenant_id: tenant.id.clone(),
                }),
        )
        .await
        .unwrap()
        .into_inner();
    let tls = record_of(&record.json);
    let measures = &tls["technical_organisational_measures"];
    assert_eq!(measures["links"]["database_encrypted"], true, "{measures}");
    assert_eq!(measures["links"]["redis_encrypted"], true);
    assert_eq!(
        measures["links"]["reporting_services"],
        serde_json::json!([
            "audit",
            "auth",
            "messaging",
            "retention",
            "tenant",
            "webchat"
        ])
    );
    assert!(
        measures["transport_encryption"]
            .as_str()
            .unwrap()
            .contains("TLS to the PostgreSQL databases (sslmode verify-full")
    );
    assert!(
        record.markdown.contains("erasing a user"),
        "the auth service reports user erasure"
    );

    // The audit service alone, on a PostgreSQL whose link is plaintext (sslmode=disable).
    let plain = PrivatePostgres::start_plaintext();
    let url = plain.url("disable");
    hafen_store::migrate::migrate_control_plane(&url)
        .await
        .unwrap();
    let tenant_id = Uuid::now_v7();
    let mut conn = hafen_store::connect::establish(&url).await.unwrap();
    diesel::sql_query(
        "INSERT INTO hafen.tenants (id, slug, display_name, status, region, dpa_version, \
         dpa_accepted_at, dpa_accepted_by, database_name, settings, created_at, updated_at) \
         VALUES ($1, 'plain', 'Plain GmbH', 'active', 'eu-central', '2025-01', now(), $1, \
         'default', '{}'::jsonb, now(), now())",
    )
    .bind::<diesel::sql_types::Uuid, _>(tenant_id)
    .execute(&mut conn)
    .await
    .unwrap();
    let secrets = hafen_testkit::TestSecrets::generate();
    let unused = hafen_testkit::TestDatabase::create().await;
    let mut config = secrets.audit_config(&unused);
    config.databases.main = hafen_store::DatabaseArgs::new(url);
    let audit = hafen_testkit::TestServer::spawn(|l, s| hafen_audit::serve(config, l, s)).await;
    let record = hafen_proto::audit::v1::audit_service_client::AuditServiceClient::new(
        audit.channel(&secrets).await,
    )
    .get_processing_record(secrets.operator(audit_pb::GetProcessingRecordRequest {
        tenant_id: tenant_id.to_string(),
    }))
    .await
    .unwrap()
    .into_inner();
    let plaintext = record_of(&record.json);
    let measures = &plaintext["technical_organisational_measures"];
    assert_eq!(measures["links"]["database_encrypted"], false, "{measures}");
    assert_eq!(measures["links"]["weakest_database_sslmode"], "disable");
    let transport = measures["transport_encryption"].as_str().unwrap();
    assert!(!transport.contains("PostgreSQL"), "{transport}");
    assert!(
        !record.markdown.contains("PostgreSQL databases"),
        "{}",
        record.markdown
    );
    // Only the audit service reported: it states no deletion it does not carry out.
    assert!(
        !plaintext["retention"]["accounts"]
            .as_str()
            .unwrap()
            .contains("destroys"),
        "{plaintext}"
    );
}
