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
    hafen_store::Databases::new(&hafen_store::DatabasesArgs {
        main: stack.db.args(),
        placements: Vec::new(),
    })
    .unwrap()
}

fn args(stack: &TestStack, out: &Path) -> BackupArgs {
    BackupArgs {
        databases: hafen_store::DatabasesArgs {
            main: stack.db.args(),
            placements: Vec::new(),
        },
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

    let report = backup::run(&args(&stack, out.path())).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
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
