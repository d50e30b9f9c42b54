//! `backup`: `hafen-tenant backup` and `restore` of a tenant with 1,000,000 messages, next to
//! plain `pg_dump -n` and `pg_restore` of the same schema in the same run, taking turns.
//!
//! Figures: MB of dump per second and seconds, each next to its plain counterpart (target for
//! both ≥ 0.7×). Message bodies are 96 bytes that do not compress, like the sealed bodies
//! they stand for. The backup adds the sealing and the checksum to pg_dump's work; the restore
//! adds the check and the opening of the file, the migration check and the deletion-log
//! replay to pg_restore's.

use std::path::Path;
use std::time::{Duration, Instant};

use diesel_async::SimpleAsyncConnection;
use hafen_tenant::backup;
use hafen_testkit::TestStack;
use uuid::Uuid;

use crate::Line;

const TARGET_RATIO: f64 = 0.7;
/// Turns each side takes.
const ROUNDS: usize = 2;
/// Conversations the messages are spread over.
const CONVERSATIONS: usize = 100;

fn databases(stack: &TestStack) -> hafen_store::Databases {
    hafen_store::Databases::new(&stack.db.databases()).expect("databases")
}

/// Plain pg_dump of `schema` (as its role, the way the backup runs it) into `file`.
fn plain_dump(url: &str, schema: &str, file: &Path) -> Duration {
    let started = Instant::now();
    let status = std::process::Command::new("pg_dump")
        .arg("--format=custom")
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg(format!("--schema={schema}"))
        .arg(format!("--role={schema}"))
        .arg(format!("--dbname={url}"))
        .arg(format!("--file={}", file.display()))
        .status()
        .expect("pg_dump");
    assert!(status.success(), "pg_dump");
    started.elapsed()
}

/// Plain restore of `dump` into a fresh `schema`: drop it, create role and schema, pg_restore
/// everything but the schema entry as the role, in one transaction (what `restore` does
/// around its own work).
async fn plain_restore(
    stack: &TestStack,
    url: &str,
    schema: &str,
    dump: &Path,
    work: &Path,
) -> Duration {
    let started = Instant::now();
    let mut conn = stack.db.connect().await;
    conn.batch_execute(&format!(
        "SET ROLE {schema}; DROP SCHEMA {schema} CASCADE; RESET ROLE; \
         CREATE SCHEMA {schema} AUTHORIZATION {schema};"
    ))
    .await
    .expect("recreate the schema");
    let listed = std::process::Command::new("pg_restore")
        .arg("--list")
        .arg(dump)
        .output()
        .expect("pg_restore --list");
    let entry = format!(" SCHEMA - {schema} ");
    let list: String = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|line| !format!("{line} ").contains(&entry))
        .map(|line| format!("{line}\n"))
        .collect();
    let list_file = work.join("plain.list");
    std::fs::write(&list_file, list).expect("list");
    let status = std::process::Command::new("pg_restore")
        .arg("--no-owner")
        .arg("--no-privileges")
        .arg("--single-transaction")
        .arg("--exit-on-error")
        .arg(format!("--role={schema}"))
        .arg(format!("--use-list={}", list_file.display()))
        .arg(format!("--dbname={url}"))
        .arg(dump)
        .status()
        .expect("pg_restore");
    assert!(status.success(), "pg_restore");
    started.elapsed()
}

/// Runs the scenario with `messages` messages.
pub async fn run(messages: usize) -> (Vec<Line>, serde_json::Value) {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("bench").await;
    let id: Uuid = tenant.id.parse().expect("tenant id");
    let schema = hafen_store::TenantId::from(id).schema();
    let owner = &tenant.owner_id;
    let per_conversation = messages.div_ceil(CONVERSATIONS);
    let mut conn = stack.db.connect_admin().await;
    conn.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {schema}.conversations (id, kind, title, creator_id, last_sequence, created_at, updated_at)
             SELECT gen_random_uuid(), 'group', 'bench ' || c, '{owner}', {per_conversation}, now(), now()
             FROM generate_series(1, {CONVERSATIONS}) c;
         INSERT INTO {schema}.messages (id, conversation_id, sequence, sender_id, ciphertext, masked, created_at, event_id)
             SELECT gen_random_uuid(), c.id, g, '{owner}', decode(md5(c.id::text || g) || md5(g || c.id::text) || md5(c.id::text || g || 'a')
                        || md5(c.id::text || g || 'b') || md5(c.id::text || g || 'c')
                        || md5(c.id::text || g || 'd'), 'hex'), false,
                    now() - g * interval '1 second',
                    (SELECT last_id FROM {schema}.event_counter) + row_number() OVER ()
             FROM {schema}.conversations c, generate_series(1, {per_conversation}) g
             LIMIT {messages};
         UPDATE {schema}.event_counter SET last_id = (SELECT max(event_id) FROM {schema}.messages);
         COMMIT;"
    ))
    .await
    .expect("generate messages");
    conn.batch_execute(&format!("VACUUM ANALYZE {schema}.messages"))
        .await
        .expect("vacuum");
    conn.batch_execute("CHECKPOINT").await.expect("checkpoint");

    let work = tempfile::tempdir().expect("a work directory");
    let url = stack.db.url().to_owned();
    let key = backup::backup_key(&stack.secrets.master_key());
    let databases = databases(&stack);
    let (mut backup_time, mut dump_time, mut restore_time, mut raw_restore_time) = (
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
        Duration::ZERO,
    );
    let (mut dump_bytes, mut file_bytes) = (0_u64, 0_u64);
    for round in 0..ROUNDS {
        let out = work.path().join(format!("round-{round}"));
        let started = Instant::now();
        let manifest = backup::backup_one(&databases, &key, Path::new("pg_dump"), "bench", &out)
            .await
            .expect("backup");
        backup_time += started.elapsed();
        dump_bytes = manifest.dump_bytes;
        file_bytes = manifest.file_bytes;
        let plain = work.path().join(format!("plain-{round}.dump"));
        dump_time += plain_dump(&url, &schema, &plain);

        let manifest_path = out.join(&tenant.id).join(format!(
            "{}.manifest.json",
            manifest.file.trim_end_matches(".hafenbak")
        ));
        let started = Instant::now();
        backup::restore(&backup::RestoreArgs {
            databases: stack.db.databases(),
            redis: stack.secrets.redis_args(),
            master_key_file: stack.secrets.master_key_file(),
            manifest: manifest_path,
            database: None,
            replace: true,
            pg_restore: "pg_restore".into(),
            telemetry: hafen_platform::TelemetryArgs {
                log_format: hafen_platform::LogFormat::Auto,
                log_filter: "warn".into(),
            },
        })
        .await
        .expect("restore");
        restore_time += started.elapsed();
        raw_restore_time += plain_restore(&stack, &url, &schema, &plain, work.path()).await;
    }
    let mb = dump_bytes as f64 / 1e6;
    let per = |total: Duration| total.as_secs_f64() / ROUNDS as f64;
    let (backup_secs, dump_secs) = (per(backup_time), per(dump_time));
    let (restore_secs, raw_restore_secs) = (per(restore_time), per(raw_restore_time));
    let backup_ratio = dump_secs / backup_secs;
    let restore_ratio = raw_restore_secs / restore_secs;
    let lines = vec![
        Line {
            scenario: "backup",
            metric: format!("backup, {messages} messages ({mb:.0} MB dump)"),
            value: format!("{:.1} MB/s, {backup_secs:.2} s", mb / backup_secs),
            baseline: format!("{:.1} MB/s pg_dump ({backup_ratio:.2}x)", mb / dump_secs),
            target: format!(">= {TARGET_RATIO}x"),
        },
        Line {
            scenario: "backup",
            metric: "restore (with migration check, replay)".into(),
            value: format!("{:.1} MB/s, {restore_secs:.2} s", mb / restore_secs),
            baseline: format!(
                "{:.1} MB/s pg_restore ({restore_ratio:.2}x)",
                mb / raw_restore_secs
            ),
            target: format!(">= {TARGET_RATIO}x"),
        },
    ];
    let json = serde_json::json!({
        "scenario": "backup", "messages": messages, "rounds": ROUNDS,
        "dump_bytes": dump_bytes, "file_bytes": file_bytes,
        "backup_secs": backup_secs, "pg_dump_secs": dump_secs, "backup_ratio": backup_ratio,
        "restore_secs": restore_secs, "pg_restore_secs": raw_restore_secs,
        "restore_ratio": restore_ratio,
        "meets_target": backup_ratio >= TARGET_RATIO && restore_ratio >= TARGET_RATIO,
    });
    (lines, json)
}
