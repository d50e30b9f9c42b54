//! `erasure`: erasing a user (AuthService.EraseUser) who sent 100,000 messages, over gRPC,
//! while members of the same organisation send (the harder case: the erasure numbers its
//! tombstones' events from the organisation's event counter, which every send takes too).
//!
//! Figures: seconds until EraseUser answers, the erasure in effect (target ≤ 5 s), and until
//! the last of the user's messages is a tombstone (the rest follow the answer in the
//! background, paced), next to one raw UPDATE of the same rows in a copy by a bare client (the
//! least the database must do); and SendMessage p99 from the call until the last tombstone
//! against the same load just before it and just after (target ≤ 1.5×). The load runs at half of a short
//! peak measurement, as in `purge`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use diesel_async::SimpleAsyncConnection;
use hafen_proto::auth::v1 as auth_pb;
use hafen_testkit::{TestStack, with_token};
use uuid::Uuid;

use crate::messaging::{SENDERS, group, users};
use crate::purge::{half_peak, load_until, phase};
use crate::{Line, ms, quantile};

/// Conversations the erased user's messages are spread over.
const CONVERSATIONS: usize = 10;
const TARGET_SECS: f64 = 5.0;
const TARGET_P99_RATIO: f64 = 1.5;
/// How long the load runs before anything is measured, and alone before the erasure and again
/// after its last tombstone (together the baseline, bracketing the erasure).
const WARM_UP: Duration = Duration::from_secs(5);
const IDLE: Duration = Duration::from_secs(10);
/// Longest wait for the background tombstoning.
const TOMBSTONES_WITHIN: Duration = Duration::from_secs(300);

/// Runs the scenario for a user with `messages` messages.
pub async fn run(messages: usize) -> (Vec<Line>, serde_json::Value) {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("bench").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let senders = users(&stack, &owner, SENDERS + 1).await;
    let (victim, senders) = senders.split_last().expect("users");
    let mut client = stack.messaging_client().await;
    let mut pairs = Vec::new();
    for sender in senders {
        let conversation = group(&mut client, &owner, vec![sender.user_id.clone()]).await;
        pairs.push((conversation, sender.token.clone()));
    }
    let mut theirs = Vec::new();
    for _ in 0..CONVERSATIONS {
        theirs.push(group(&mut client, &owner, vec![victim.user_id.clone()]).await);
    }

    // The user's messages (sealed-sized ciphertext, each with its creation event in its row,
    // as sends store them), and a copy of the table for the baseline.
    let id: Uuid = tenant.id.parse().expect("tenant id");
    let schema = hafen_store::TenantId::from(id).schema();
    let per_conversation = messages.div_ceil(CONVERSATIONS);
    let list = theirs
        .iter()
        .map(|c| format!("'{c}'::uuid"))
        .collect::<Vec<_>>()
        .join(", ");
    let victim_id = &victim.user_id;
    let mut conn = stack.db.connect_admin().await;
    let generated = Instant::now();
    conn.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {schema}.messages (id, conversation_id, sequence, sender_id, ciphertext, masked, created_at, event_id)
             SELECT gen_random_uuid(), c, g, '{victim_id}', decode(repeat('a5', 96), 'hex'), false,
                    now() - g * interval '1 second',
                    (SELECT last_id FROM {schema}.event_counter) + row_number() OVER ()
             FROM unnest(ARRAY[{list}]) c, generate_series(1, {per_conversation}) g
             LIMIT {messages};
         UPDATE {schema}.conversations SET last_sequence = {per_conversation} WHERE id IN ({list});
         UPDATE {schema}.event_counter SET last_id = (SELECT max(event_id) FROM {schema}.messages);
         COMMIT;
         CREATE SCHEMA raw_erasure;
         CREATE TABLE raw_erasure.messages (LIKE {schema}.messages INCLUDING ALL);
         INSERT INTO raw_erasure.messages SELECT * FROM {schema}.messages;"
    ))
    .await
    .expect("generate the user's messages");
    conn.batch_execute(&format!(
        "VACUUM ANALYZE {schema}.messages, {schema}.events, raw_erasure.messages"
    ))
    .await
    .expect("vacuum");
    conn.batch_execute("CHECKPOINT").await.expect("checkpoint");
    let generate_secs = generated.elapsed().as_secs_f64();

    // The load runs at half of a short peak measurement.
    let rate = half_peak(&stack, &pairs).await;

    // Under one load: alone, then the erasure, then the raw UPDATE of the copy.
    let current = Arc::new(AtomicU8::new(phase::OTHER));
    let stop = Arc::new(AtomicBool::new(false));
    let mut auth = stack.auth_client().await;
    let work = async {
        tokio::time::sleep(WARM_UP).await;
        current.store(phase::BEFORE, Ordering::Relaxed);
        tokio::time::sleep(IDLE).await;
        current.store(phase::PURGE, Ordering::Relaxed);
        let started = Instant::now();
        let erased = auth
            .erase_user(with_token(
                &owner,
                auth_pb::EraseUserRequest {
                    user_id: victim.user_id.clone(),
                },
            ))
            .await
            .expect("EraseUser")
            .into_inner();
        let erase_time = started.elapsed();
        // The background tombstoning, under the same load: its erasure request goes when the
        // last message is a tombstone (a lookup by key; counting the messages would load the
        // database more than the erasure does).
        let pending = format!(
            "SELECT count(*) AS n FROM hafen.erasure_requests WHERE user_id = '{victim_id}'"
        );
        while left_of(&mut conn, &pending).await > 0 && started.elapsed() < TOMBSTONES_WITHIN {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let tombstones_time = started.elapsed();
        current.store(phase::BEFORE, Ordering::Relaxed);
        tokio::time::sleep(IDLE).await;
        current.store(phase::RAW, Ordering::Relaxed);
        let started = Instant::now();
        conn.batch_execute(&format!(
            "UPDATE raw_erasure.messages SET ciphertext = NULL, deleted_at = now(), erased = true \
             WHERE sender_id = '{victim_id}'"
        ))
        .await
        .expect("raw update");
        let raw_time = started.elapsed();
        current.store(phase::OTHER, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        (erased, erase_time, tombstones_time, raw_time)
    };
    let (latencies, (erased, erase_time, tombstones_time, raw_time)) = tokio::join!(
        load_until(&stack, &pairs, rate, current.clone(), stop.clone()),
        work
    );
    let [before, during, during_raw, _] = latencies;

    let left = left_of(
        &mut conn,
        &format!(
            "SELECT count(*) AS n FROM {schema}.messages \
             WHERE sender_id = '{victim_id}' AND (ciphertext IS NOT NULL OR NOT erased)"
        ),
    )
    .await;
    let complete = left == 0 && erased.state == auth_pb::UserState::Erased as i32;
    let erase_secs = erase_time.as_secs_f64();
    let raw_secs = raw_time.as_secs_f64();
    let tombstones_secs = tombstones_time.as_secs_f64();
    let p99_before = quantile(&before, 0.99);
    let p99_during = quantile(&during, 0.99);
    let p99_ratio = p99_during / p99_before;
    let lines = vec![
        Line {
            scenario: "erasure",
            metric: format!("EraseUser, {messages} messages"),
            value: format!("{erase_secs:.2} s"),
            baseline: format!("{raw_secs:.2} s raw UPDATE ({:.1}x)", erase_secs / raw_secs),
            target: format!("<= {TARGET_SECS} s"),
        },
        Line {
            scenario: "erasure",
            metric: "every message a tombstone (paced, background)".into(),
            value: format!("{tombstones_secs:.2} s"),
            baseline: String::new(),
            target: String::new(),
        },
        Line {
            scenario: "erasure",
            metric: format!("send p99 until the last tombstone ({rate:.0}/s)"),
            value: format!("{p99_during:.1} ms"),
            baseline: format!("{p99_before:.1} ms before and after ({p99_ratio:.2}x)"),
            target: format!("<= {TARGET_P99_RATIO}x"),
        },
        Line {
            scenario: "erasure",
            metric: "send p99 during raw UPDATE".into(),
            value: format!("{:.1} ms", quantile(&during_raw, 0.99)),
            baseline: String::new(),
            target: String::new(),
        },
    ];
    let json = serde_json::json!({
        "scenario": "erasure", "messages": messages, "generate_secs": generate_secs,
        "erase_secs": erase_secs, "tombstones_secs": tombstones_secs, "raw_update_secs": raw_secs,
        "send_rate_per_sec": rate, "sends_during": during.len(),
        "send_p50_before_ms": quantile(&before, 0.5), "send_p99_before_ms": p99_before,
        "send_p50_during_ms": quantile(&during, 0.5), "send_p99_during_ms": p99_during,
        "send_p99_during_raw_ms": quantile(&during_raw, 0.99), "p99_ratio": p99_ratio,
        "erased_completely": complete,
        "meets_target": complete && erase_secs <= TARGET_SECS && p99_ratio <= TARGET_P99_RATIO,
        "erase_ms": ms(erase_time),
    });
    (lines, json)
}

/// The count `sql` (one row, column `n`) returns.
async fn left_of(conn: &mut diesel_async::AsyncPgConnection, sql: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Left {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let left: Left = diesel_async::RunQueryDsl::get_result(diesel::sql_query(sql), conn)
        .await
        .expect("count what is left");
    left.n
}
