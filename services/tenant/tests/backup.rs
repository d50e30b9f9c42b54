//! Per-tenant backups (TM6, BX7): `hafen-tenant backup` against a real stack and the real
//! pg_dump.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::path::Path;

use hafen_proto::messaging::v1 as msg;
use hafen_tenant::backup::{self, BackupArgs, Manifest};
use hafen_testkit::{TestStack, with_token};

fn databases(stack: &TestStack) -> hafen_store::Databases {
    hafen_store::Databases::new(&stack.db.databases()).unwrap()
}

fn args(stack: &TestStack, out: &Path) -> BackupArgs {
    BackupArgs {
        databases: stack.db.databases(),
        master_key_file: stack.secrets.master_key_file(),
        tenant: None,
        all: true,
        out: out.to_owned(),
        keep: backup::MIN_KEEP,
        concurrency: 2,
        pg_dump: "pg_dump".into(),
        telemetry: hafen_platform::TelemetryArgs {
            log_format: hafen_platform::config::LogFormat::Auto,
            log_filter: "info".into(),
        },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tm6_a_backup_is_unreadable_without_its_key_and_its_checksum_catches_a_flipped_byte() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("backed").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let mut messaging = stack.messaging_client().await;
    let conversation = messaging
        .create_conversation(with_token(
            &owner,
            msg::CreateConversationRequest {
                kind: msg::ConversationKind::Channel as i32,
                title: "all hands".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    messaging
        .send_message(with_token(
            &owner,
            msg::SendMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                conversation_id: conversation,
                body: "in the backup".into(),
            },
        ))
        .await
        .unwrap();

    let out = tempfile::tempdir().unwrap();
    let key = backup::backup_key(&stack.secrets.master_key());
    let manifest = backup::backup_one(
        &databases(&stack),
        &key,
        Path::new("pg_dump"),
        "backed",
        out.path(),
    )
    .await
    .unwrap();
    let dir = out.path().join(&tenant.id);
    assert_eq!(manifest.tenant_id.to_string(), tenant.id);
    assert_eq!(manifest.slug, "backed");
    assert!(manifest.schema_version.starts_with("2026"), "{manifest:?}");
    let file = std::fs::read(dir.join(&manifest.file)).unwrap();
    assert_eq!(file.len() as u64, manifest.file_bytes);
    assert!(manifest.dump_bytes > 1000, "{manifest:?}");
    assert_eq!(
        backup::manifests(out.path(), manifest.tenant_id).unwrap(),
        std::slice::from_ref(&manifest)
    );

    // With the key it opens: the tenant's row (no key in it) and pg_dump's archive.
    let opened = backup::open(&dir, &manifest, &key).unwrap();
    assert_eq!(opened.control["slug"], "backed");
    assert!(opened.control.get("wrapped_key").is_none());
    assert!(
        opened.dump.starts_with(b"PGDMP"),
        "a pg_dump custom archive"
    );
    let listed = std::process::Command::new("pg_restore")
        .arg("--list")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(&opened.dump)?;
            child.wait_with_output()
        })
        .unwrap();
    let toc = String::from_utf8_lossy(&listed.stdout);
    assert!(
        toc.contains("TABLE DATA") && toc.contains(" messages "),
        "{toc}"
    );
    let schema = format!("t_{}", uuid::Uuid::parse_str(&tenant.id).unwrap().simple());
    assert!(
        toc.lines()
            .filter(|line| line.contains("TABLE DATA"))
            .all(|line| line.contains(&schema)),
        "only the tenant's schema: {toc}"
    );
    assert!(
        !toc.contains("user_keys") && !toc.contains("tenant_keys"),
        "no key"
    );

    // Without it nothing: not the dump's magic, not another key's opening.
    assert!(!file.windows(5).any(|w| w == b"PGDMP"));
    let other = hafen_testkit::TestSecrets::generate();
    assert!(backup::open(&dir, &manifest, &backup::backup_key(&other.master_key())).is_err());

    // A flipped byte: the checksum says so; with the checksum forged too, the box does.
    let mut flipped = file.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(dir.join(&manifest.file), &flipped).unwrap();
    let refused = backup::open(&dir, &manifest, &key)
        .err()
        .unwrap()
        .to_string();
    assert!(refused.contains("checksum"), "{refused}");
    let forged = Manifest {
        sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&flipped)),
        ..manifest.clone()
    };
    assert!(backup::open(&dir, &forged, &key).is_err());
    std::fs::write(dir.join(&manifest.file), &file).unwrap();
    assert!(backup::open(&dir, &manifest, &key).is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn tm6_backup_all_backs_up_every_tenant_and_prunes_only_what_is_past_the_retention() {
    let stack = TestStack::start().await;
    let first = stack.create_tenant("first").await;
    let second = stack.create_tenant("second").await;
    let out = tempfile::tempdir().unwrap();

    // Two old backups of the first tenant: one past the six weeks, one within.
    let key = backup::backup_key(&stack.secrets.master_key());
    let databases = databases(&stack);
    let mut old = Vec::new();
    for age_days in [43, 41] {
        let manifest =
            backup::backup_one(&databases, &key, Path::new("pg_dump"), "first", out.path())
                .await
                .unwrap();
        let dir = out.path().join(&first.id);
        let stem = manifest.file.trim_end_matches(".hafenbak").to_owned();
        let aged = Manifest {
            created_at: manifest.created_at - chrono::TimeDelta::days(age_days),
            ..manifest
        };
        std::fs::write(
            dir.join(format!("{stem}.manifest.json")),
            serde_json::to_vec(&aged).unwrap(),
        )
        .unwrap();
        old.push(aged);
    }

    // The Art. 30 record states backups only once a complete run is recent.
    let backups_stated = || async {
        let record = stack
            .audit_client()
            .await
            .get_processing_record(stack.secrets.operator(
                hafen_proto::audit::v1::GetProcessingRecordRequest {
                    tenant_id: first.id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let record: serde_json::Value = serde_json::from_str(&record.json).unwrap();
        record["technical_organisational_measures"]["backups"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let before = backups_stated().await;
    assert!(before.starts_with("Not stated"), "{before}");

    let report = backup::run(&args(&stack, out.path())).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let after = backups_stated().await;
    assert!(after.contains("every organisation backed up by"), "{after}");
    assert!(after.contains("kept 42 days"), "{after}");
    let mut backed: Vec<String> = report
        .backed_up
        .iter()
        .map(|m| m.tenant_id.to_string())
        .collect();
    backed.sort();
    let mut expected = vec![first.id.clone(), second.id.clone()];
    expected.sort();
    assert_eq!(backed, expected, "every active tenant");
    assert_eq!(report.pruned, 1, "only what is older than the retention");
    let kept = backup::manifests(out.path(), old[0].tenant_id).unwrap();
    assert_eq!(kept.len(), 2);
    assert!(kept.iter().all(|m| m.backup_id != old[0].backup_id));
    assert!(kept.iter().any(|m| m.backup_id == old[1].backup_id));
    assert!(!out.path().join(&first.id).join(&old[0].file).exists());

    // Less than six weeks is refused on the command line.
    let refused = <hafen_tenant::BackupCli as clap::Parser>::try_parse_from([
        "hafen-tenant backup",
        "--all",
        "--out",
        "/nowhere",
        "--master-key-file",
        "/nowhere",
        "--database-url",
        "postgres://nowhere",
        "--keep",
        "30days",
    ])
    .unwrap_err()
    .to_string();
    assert!(refused.contains("42days"), "{refused}");
}

fn restore_args(stack: &TestStack, manifest: &Path, replace: bool) -> backup::RestoreArgs {
    backup::RestoreArgs {
        databases: stack.db.databases(),
        redis: stack.secrets.redis_args(),
        master_key_file: stack.secrets.master_key_file(),
        manifest: manifest.to_owned(),
        database: None,
        replace,
        pg_restore: "pg_restore".into(),
        telemetry: hafen_platform::TelemetryArgs {
            log_format: hafen_platform::config::LogFormat::Auto,
            log_filter: "info".into(),
        },
    }
}

fn manifest_path(out: &Path, manifest: &Manifest) -> std::path::PathBuf {
    out.join(manifest.tenant_id.to_string()).join(format!(
        "{}.manifest.json",
        manifest.file.trim_end_matches(".hafenbak")
    ))
}

async fn count(stack: &TestStack, sql: &str) -> i64 {
    count_in(&stack.db, sql).await
}

async fn count_in(db: &hafen_testkit::TestDatabase, sql: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = db.connect_admin().await;
    let found: Count = diesel_async::RunQueryDsl::get_result(diesel::sql_query(sql), &mut conn)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
    found.n
}

#[tokio::test(flavor = "multi_thread")]
async fn bx7_gr4_a_backup_restored_into_a_fresh_database_ends_with_the_erasures_and_deletions_made_since()
 {
    use hafen_proto::auth::v1 as auth_pb;
    let stack = TestStack::start_with_placement("spare").await;
    let spare = stack.db.placement("spare");
    let tenant = stack.create_tenant("drill").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let (erin, erin_session) = stack
        .create_logged_in_member(&tenant, &owner, "erin", "erin password 1")
        .await;
    let (finn, finn_session) = stack
        .create_logged_in_member(&tenant, &owner, "finn", "finn password 1")
        .await;
    let mut messaging = stack.messaging_client().await;
    let team = messaging
        .create_conversation(with_token(
            &owner,
            msg::CreateConversationRequest {
                kind: msg::ConversationKind::Group as i32,
                title: "Team".into(),
                member_user_ids: vec![erin.user_id.clone(), finn.user_id.clone()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let send = |token: &str, body: &str| {
        with_token(
            token,
            msg::SendMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                conversation_id: team.clone(),
                body: body.into(),
            },
        )
    };
    for body in ["erin one", "erin two"] {
        messaging
            .send_message(send(&erin_session.access_token, body))
            .await
            .unwrap();
    }
    let finns = messaging
        .send_message(send(&finn_session.access_token, "finn's"))
        .await
        .unwrap()
        .into_inner();
    messaging
        .send_message(send(&finn_session.access_token, "finn's second"))
        .await
        .unwrap();
    // Another organisation, which no restore touches.
    let bystander = stack.create_tenant("bystander").await;
    let bystander_owner = stack.login_owner(&bystander).await.access_token;
    let channel = messaging
        .create_conversation(with_token(
            &bystander_owner,
            msg::CreateConversationRequest {
                kind: msg::ConversationKind::Channel as i32,
                title: "news".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    messaging
        .send_message(with_token(
            &bystander_owner,
            msg::SendMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                conversation_id: channel,
                body: "untouched".into(),
            },
        ))
        .await
        .unwrap();
    let bystander_schema = format!(
        "t_{}",
        uuid::Uuid::parse_str(&bystander.id).unwrap().simple()
    );
    let bystander_rows = format!("SELECT count(*) AS n FROM {bystander_schema}.messages");
    let before = count(&stack, &bystander_rows).await;

    // The backup, then Erin is erased.
    let out = tempfile::tempdir().unwrap();
    let key = backup::backup_key(&stack.secrets.master_key());
    let manifest = backup::backup_one(
        &databases(&stack),
        &key,
        Path::new("pg_dump"),
        "drill",
        out.path(),
    )
    .await
    .unwrap();
    stack
        .auth_client()
        .await
        .erase_user(with_token(
            &owner,
            auth_pb::EraseUserRequest {
                user_id: erin.user_id.clone(),
            },
        ))
        .await
        .unwrap();

    // Finn deletes one of his messages after the backup too.
    messaging
        .delete_message(with_token(
            &finn_session.access_token,
            msg::DeleteMessageRequest {
                message_id: finns.message_id.clone(),
            },
        ))
        .await
        .unwrap();

    // A live tenant is replaced only when told.
    let path = manifest_path(out.path(), &manifest);
    let refused = backup::restore(&restore_args(&stack, &path, false))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(refused.contains("--replace"), "{refused}");

    // Restored into a fresh database, while the services run: the tenant moves there (which
    // replaces what it has, so only when told).
    let mut to_spare = restore_args(&stack, &path, false);
    to_spare.database = Some("spare".into());
    let refused = backup::restore(&to_spare).await.err().unwrap().to_string();
    assert!(refused.contains("--replace"), "{refused}");
    to_spare.replace = true;
    let restored = backup::restore(&to_spare).await.unwrap();
    assert!(restored.replay.users_erased >= 1, "{:?}", restored.replay);
    assert_eq!(restored.replay.messages_deleted, 1, "{:?}", restored.replay);
    assert_eq!(restored.left, ["default"]);
    let schema = format!("t_{}", uuid::Uuid::parse_str(&tenant.id).unwrap().simple());
    assert_eq!(
        count(
            &stack,
            &format!(
                "SELECT count(*) AS n FROM hafen.tenants WHERE id = '{}' \
                 AND database_name = 'spare'",
                tenant.id
            )
        )
        .await,
        1,
        "the control plane places the tenant on the fresh database"
    );
    assert_eq!(
        count(
            &stack,
            &format!("SELECT count(*) AS n FROM pg_namespace WHERE nspname = '{schema}'")
        )
        .await,
        0,
        "the schema it left on the old database is dropped"
    );
    assert_eq!(
        count_in(
            spare,
            &format!(
                "SELECT count(*) AS n FROM {schema}.messages WHERE sender_id = '{}' \
                 AND (ciphertext IS NOT NULL OR NOT erased)",
                erin.user_id
            )
        )
        .await,
        0,
        "Erin's messages are erased again after the replay"
    );
    assert_eq!(
        count_in(
            spare,
            &format!(
                "SELECT count(*) AS n FROM {schema}.users WHERE id = '{}' AND status = 'erased' \
                 AND username NOT LIKE '%erin%'",
                erin.user_id
            )
        )
        .await,
        1
    );
    let ring = hafen_store::keyring::KeyRing::new(
        databases(&stack),
        stack.secrets.master_key(),
        std::num::NonZeroUsize::new(4).unwrap(),
    );
    assert!(matches!(
        ring.user_key(
            uuid::Uuid::parse_str(&tenant.id).unwrap(),
            uuid::Uuid::parse_str(&erin.user_id).unwrap()
        )
        .await,
        Err(hafen_store::Error::KeyDestroyed)
    ));
    assert_eq!(
        count(&stack, &bystander_rows).await,
        before,
        "the other tenant untouched"
    );
    assert_eq!(
        count_in(
            spare,
            &format!(
                "SELECT count(*) AS n FROM pg_namespace WHERE nspname = '{schema}' \
                 AND nspowner = '{schema}'::regrole \
                 AND NOT has_database_privilege('{schema}', current_database(), 'CREATE')"
            )
        )
        .await,
        1,
        "the schema is the tenant role's, which keeps no right to create schemas"
    );

    // The restored tenant works: logins, reads, sends, streams.
    let owner = stack.login_owner(&tenant).await.access_token;
    let listed = messaging
        .list_messages(with_token(
            &owner,
            msg::ListMessagesRequest {
                conversation_id: team.clone(),
                page_size: 10,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .messages;
    let bodies: Vec<&str> = listed.iter().map(|m| m.body.as_str()).collect();
    assert!(bodies.contains(&"finn's second"), "{bodies:?}");
    assert!(
        !bodies.contains(&"finn's"),
        "deleted after the backup: {bodies:?}"
    );
    let deleted = listed
        .iter()
        .find(|m| m.message_id == finns.message_id)
        .unwrap();
    assert!(deleted.delete_time.is_some() && !deleted.sender_erased);
    assert!(!bodies.iter().any(|b| b.contains("erin")), "{bodies:?}");
    let mut stream = messaging
        .subscribe(with_token(&owner, msg::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    loop {
        let item = stream.message().await.unwrap().unwrap();
        if matches!(
            item.event,
            Some(msg::subscribe_response::Event::CaughtUp(_))
        ) {
            break;
        }
    }
    let sent = messaging
        .send_message(send(&owner, "after the restore"))
        .await
        .unwrap()
        .into_inner();
    let seen = loop {
        let item = stream.message().await.unwrap().unwrap();
        if let Some(msg::subscribe_response::Event::MessageCreated(m)) = item.event {
            break m;
        }
    };
    assert_eq!(seen.message_id, sent.message_id);

    // A deleted tenant restored from its backup ends deleted again.
    let gone = stack.create_tenant("gone").await;
    let gone_backup = backup::backup_one(
        &databases(&stack),
        &key,
        Path::new("pg_dump"),
        "gone",
        out.path(),
    )
    .await
    .unwrap();
    stack
        .tenant_client()
        .await
        .delete_tenant(
            stack
                .secrets
                .operator(hafen_proto::tenant::v1::DeleteTenantRequest {
                    tenant_id: gone.id.clone(),
                    confirm_slug: "gone".into(),
                    ..Default::default()
                }),
        )
        .await
        .unwrap();
    let mut gone_to_spare = restore_args(&stack, &manifest_path(out.path(), &gone_backup), false);
    gone_to_spare.database = Some("spare".into());
    let restored = backup::restore(&gone_to_spare).await.unwrap();
    assert!(
        restored.replay.tenants_deleted >= 1,
        "{:?}",
        restored.replay
    );
    let gone_schema = format!("t_{}", uuid::Uuid::parse_str(&gone.id).unwrap().simple());
    let gone_left = format!(
        "SELECT count(*) AS n FROM pg_namespace WHERE nspname = '{gone_schema}' \
         UNION ALL SELECT count(*) FROM pg_roles WHERE rolname = '{gone_schema}'"
    );
    for db in [&stack.db, spare] {
        assert_eq!(
            count_in(
                db,
                &format!("SELECT sum(n)::bigint AS n FROM ({gone_left}) AS c")
            )
            .await,
            0,
            "schema and role dropped again"
        );
    }

    // A control plane that lost a tenant's row gets it back from the backup, when the key
    // store still holds the tenant's key; never a key from the backup.
    let lost = stack.create_tenant("lost").await;
    let lost_owner = stack.login_owner(&lost).await.access_token;
    let notes = messaging
        .create_conversation(with_token(
            &lost_owner,
            msg::CreateConversationRequest {
                kind: msg::ConversationKind::Channel as i32,
                title: "notes".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    messaging
        .send_message(with_token(
            &lost_owner,
            msg::SendMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                conversation_id: notes.clone(),
                body: "kept through a lost control plane".into(),
            },
        ))
        .await
        .unwrap();
    let lost_backup = backup::backup_one(
        &databases(&stack),
        &key,
        Path::new("pg_dump"),
        "lost",
        out.path(),
    )
    .await
    .unwrap();
    let lost_id = uuid::Uuid::parse_str(&lost.id).unwrap();
    {
        use diesel_async::SimpleAsyncConnection as _;
        stack
            .db
            .connect_admin()
            .await
            .batch_execute(&format!(
                "DELETE FROM hafen.sessions WHERE tenant_id = '{lost_id}'; \
                 DELETE FROM hafen.tenants WHERE id = '{lost_id}'"
            ))
            .await
            .unwrap();
    }
    let (version, wrapped) = {
        let mut keys = stack.db.keystore().connect().await;
        hafen_store::keystore::tenant_key(&mut keys, lost_id)
            .await
            .unwrap()
            .unwrap()
    };
    let keystore = stack.db.keystore();
    let keys_sql = |sql: String| async move {
        use diesel_async::SimpleAsyncConnection as _;
        keystore
            .connect_admin()
            .await
            .batch_execute(&sql)
            .await
            .unwrap();
    };
    keys_sql(format!(
        "DELETE FROM hafen_keys.tenant_keys WHERE tenant_id = '{lost_id}'"
    ))
    .await;
    let path = manifest_path(out.path(), &lost_backup);
    let refused = backup::restore(&restore_args(&stack, &path, true))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(refused.contains("restore the key store first"), "{refused}");
    let hex: String = wrapped.iter().map(|b| format!("{b:02x}")).collect();
    keys_sql(format!(
        "INSERT INTO hafen_keys.tenant_keys (tenant_id, key_version, wrapped_key) \
         VALUES ('{lost_id}', {version}, '\\x{hex}')"
    ))
    .await;
    backup::restore(&restore_args(&stack, &path, true))
        .await
        .unwrap();
    let lost_owner = stack.login_owner(&lost).await.access_token;
    let listed = messaging
        .list_messages(with_token(
            &lost_owner,
            msg::ListMessagesRequest {
                conversation_id: notes,
                page_size: 10,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(listed[0].body, "kept through a lost control plane");
}
