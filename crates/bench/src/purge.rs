//! `purge`: the retention purge (CB5) of expired messages across 10 tenants, by the retention
//! service's own purge code, while the `send` load runs; next to a raw batched DELETE of an
//! identical copy (same rows, same indexes, same batch size) under the same load.
//!
//! Figures: purge rows per second against the raw DELETE (target ≥ 0.8×), and SendMessage
//! p99 during the purge against the same load just before it (target ≤ 1.5×). The load runs
//! at half of a short peak measurement, as in `send`, without a break; tenant by tenant, it
//! runs alone for a moment (the reference), then during the tenant's purge, then during the
//! raw DELETE of the tenant's copy. Interleaving gives all three the same conditions on a
//! shared, noisy machine, where send latency also drifts upward as the load goes on. Each
//! send's latency counts for the phase it started in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use hafen_retention::PurgeArgs;
use hafen_retention::purge::{Purger, Trigger};
use hafen_testkit::TestStack;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::messaging::{SENDERS, group, send, users};
use crate::{Line, ms, quantile};

/// Tenants the expired messages are spread over.
const TENANTS: usize = 10;
/// Conversations per tenant.
const CONVERSATIONS: usize = 10;
const TARGET_RATE_RATIO: f64 = 0.8;
const TARGET_P99_RATIO: f64 = 1.5;
/// How long the load runs before anything is measured.
const WARM_UP: Duration = Duration::from_secs(5);
/// How long the load runs alone before each tenant's purge, for the reference latency.
const IDLE: Duration = Duration::from_secs(2);

/// A superuser connection to the stack's database (for generating rows fast).
async fn admin(stack: &TestStack) -> AsyncPgConnection {
    stack.db.connect_admin().await
}

/// `count` messages older than any retention period, each with its creation event (in its
/// row, as sends store it), in conversations of `owner` in the tenant schema `schema`; then
/// an identical copy in the plain schema `copy` for the raw baseline.
async fn generate(
    conn: &mut AsyncPgConnection,
    schema: &str,
    copy: &str,
    owner: &str,
    count: usize,
) {
    let per_conversation = count.div_ceil(CONVERSATIONS);
    conn.batch_execute(&format!(
        "BEGIN;
         INSERT INTO {schema}.conversations (id, kind, title, creator_id, last_sequence, created_at, updated_at)
             SELECT gen_random_uuid(), 'group', 'expired ' || c, '{owner}', {per_conversation},
                    now() - interval '900 days', now() - interval '900 days'
             FROM generate_series(1, {CONVERSATIONS}) c;
         INSERT INTO {schema}.messages (id, conversation_id, sequence, sender_id, ciphertext, masked, created_at, event_id)
             SELECT gen_random_uuid(), c.id, g, '{owner}', decode(repeat('a5', 96), 'hex'), false,
                    now() - interval '800 days' - g * interval '1 second',
                    (SELECT last_id FROM {schema}.event_counter) + row_number() OVER ()
             FROM {schema}.conversations c, generate_series(1, {per_conversation}) g
             WHERE c.title LIKE 'expired %'
             LIMIT {count};
         UPDATE {schema}.event_counter SET last_id = (SELECT max(event_id) FROM {schema}.messages);
         COMMIT;
         CREATE SCHEMA {copy};
         CREATE TABLE {copy}.messages (LIKE {schema}.messages INCLUDING ALL);
         CREATE TABLE {copy}.events (LIKE {schema}.events INCLUDING ALL);
         INSERT INTO {copy}.messages SELECT * FROM {schema}.messages;
         INSERT INTO {copy}.events SELECT * FROM {schema}.events;"
    ))
    .await
    .expect("generate expired messages");
    // On its own: VACUUM cannot run inside the implicit transaction of a multi-statement batch.
    conn.batch_execute(&format!(
        "VACUUM ANALYZE {schema}.messages, {schema}.events, {copy}.messages, {copy}.events"
    ))
    .await
    .expect("vacuum");
}

/// The baseline: the same batched DELETE (messages and their events, oldest first,
/// `batch` at a time, one statement per transaction) by a bare client, no pause.
async fn raw_delete(conn: &mut AsyncPgConnection, copy: &str, batch: i64) -> u64 {
    #[derive(diesel::QueryableByName)]
    struct Deleted {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let sql = format!(
        "WITH doomed AS MATERIALIZED (
             SELECT id FROM {copy}.messages WHERE created_at < now() - interval '730 days'
             ORDER BY created_at, id LIMIT {batch}),
         gone_events AS (
             DELETE FROM {copy}.events WHERE message_id IS NOT NULL
             AND message_id IN (SELECT id FROM doomed)),
         gone AS (DELETE FROM {copy}.messages WHERE id IN (SELECT id FROM doomed) RETURNING 1)
         SELECT count(*) AS n FROM gone"
    );
    let mut total = 0;
    loop {
        let deleted: Deleted = diesel_async::RunQueryDsl::get_result(diesel::sql_query(&sql), conn)
            .await
            .expect("raw delete");
        total += u64::try_from(deleted.n).unwrap_or_default();
        if deleted.n < batch {
            return total;
        }
    }
}

/// What the load's latencies are attributed to: the phase when the send started.
pub(crate) mod phase {
    /// The load alone, just before a tenant's purge.
    pub const BEFORE: u8 = 0;
    /// The retention purge runs.
    pub const PURGE: u8 = 1;
    /// The raw baseline runs.
    pub const RAW: u8 = 2;
    /// Between phases, or after: not counted.
    pub const OTHER: u8 = 3;
}

/// SendMessage by every sender at `rate` in all until `stop`; the latencies in ms of each
/// phase (by index), sorted.
pub(crate) async fn load_until(
    stack: &TestStack,
    senders: &[(String, String)],
    rate: f64,
    current: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
) -> [Vec<f64>; 4] {
    let latencies = Arc::new(Mutex::new(<[Vec<f64>; 4]>::default()));
    let interval = Duration::from_secs_f64(senders.len() as f64 / rate.max(1.0));
    let mut tasks = Vec::new();
    for (conversation, token) in senders {
        let (conversation, token) = (conversation.clone(), token.clone());
        let mut client = stack.messaging_client().await;
        let (latencies, current, stop) = (latencies.clone(), current.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut next = Instant::now();
            let mut mine = <[Vec<f64>; 4]>::default();
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep_until(next.into()).await;
                next += interval;
                let phase = usize::from(current.load(Ordering::Relaxed).min(phase::OTHER));
                let at = Instant::now();
                send(
                    &mut client,
                    &token,
                    &conversation,
                    "a live message during the purge".into(),
                )
                .await;
                mine[phase].push(ms(at.elapsed()));
            }
            let mut all = latencies.lock().await;
            for (all, mine) in all.iter_mut().zip(mine) {
                all.extend(mine);
            }
        }));
    }
    for task in tasks {
        task.await.expect("sender");
    }
    let mut latencies = latencies.lock().await.clone();
    for phase in &mut latencies {
        phase.sort_by(f64::total_cmp);
    }
    latencies
}

/// Half of the send rate `senders` reach in a short peak measurement: the rate the load of
/// `purge` and `erasure` runs at.
pub(crate) async fn half_peak(stack: &TestStack, senders: &[(String, String)]) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let (peak, ()) = tokio::join!(
        load_until(
            stack,
            senders,
            1e9,
            Arc::new(AtomicU8::new(phase::BEFORE)),
            stop.clone()
        ),
        async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            stop.store(true, Ordering::Relaxed);
        }
    );
    peak[0].len() as f64 / started.elapsed().as_secs_f64() / 2.0
}

/// Runs the scenario with `messages` expired messages in all, purged `batch` at a time with
/// `pause` between batches.
pub async fn run(messages: usize, batch: i64, pause: Duration) -> (Vec<Line>, serde_json::Value) {
    let stack = TestStack::start().await;
    // The live load: 32 senders of their own tenant.
    let bench = stack.create_tenant("bench").await;
    let owner = stack.login_owner(&bench).await.access_token;
    let senders = users(&stack, &owner, SENDERS).await;
    let mut client = stack.messaging_client().await;
    let mut pairs = Vec::new();
    for sender in &senders {
        let conversation = group(&mut client, &owner, vec![sender.user_id.clone()]).await;
        pairs.push((conversation, sender.token.clone()));
    }

    // The expired messages, and their copies for the baseline.
    let per_tenant = messages.div_ceil(TENANTS);
    let mut tenants = Vec::new();
    let mut conn = admin(&stack).await;
    let generated = Instant::now();
    for i in 0..TENANTS {
        let tenant = stack.create_tenant(&format!("expired-{i}")).await;
        let id: Uuid = tenant.id.parse().expect("tenant id");
        let schema = hafen_store::TenantId::from(id).schema();
        generate(
            &mut conn,
            &schema,
            &format!("raw_copy_{i}"),
            &tenant.owner_id,
            per_tenant,
        )
        .await;
        tenants.push(id);
    }
    conn.batch_execute("CHECKPOINT").await.expect("checkpoint");
    let generate_secs = generated.elapsed().as_secs_f64();

    // The load runs at half of a short peak measurement.
    let rate = half_peak(&stack, &pairs).await;

    let purger = Purger::new(
        hafen_store::Databases::new(&stack.db.databases()).expect("databases"),
        PurgeArgs {
            purge_interval: Duration::from_secs(3600),
            purge_batch: batch,
            purge_pause: pause,
        },
        None,
    );
    // Under one load, tenant by tenant: the load alone, the purge (by the retention
    // service's code), and the raw DELETE of the same tenant's copy. Interleaved, so all three
    // see the same conditions on a shared, noisy machine whose latency drifts as the load
    // goes on.
    let current = Arc::new(AtomicU8::new(phase::OTHER));
    let stop = Arc::new(AtomicBool::new(false));
    let work = async {
        tokio::time::sleep(WARM_UP).await;
        let (mut purged, mut purge_time, mut raw, mut raw_time) =
            (0_u64, Duration::ZERO, 0_u64, Duration::ZERO);
        for (i, tenant) in tenants.iter().enumerate() {
            current.store(phase::BEFORE, Ordering::Relaxed);
            tokio::time::sleep(IDLE).await;
            current.store(phase::PURGE, Ordering::Relaxed);
            let started = Instant::now();
            let run = purger
                .purge(*tenant, Trigger::Scheduled)
                .await
                .expect("purge")
                .expect("no run in progress");
            purge_time += started.elapsed();
            purged += u64::try_from(run.messages_deleted).unwrap_or_default();
            current.store(phase::RAW, Ordering::Relaxed);
            let started = Instant::now();
            raw += raw_delete(&mut conn, &format!("raw_copy_{i}"), batch).await;
            raw_time += started.elapsed();
        }
        current.store(phase::OTHER, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        (purged, purge_time, raw, raw_time)
    };
    let (latencies, (purged, purge_time, raw, raw_time)) = tokio::join!(
        load_until(&stack, &pairs, rate, current.clone(), stop.clone()),
        work
    );
    let [before, during, during_raw, _] = latencies;

    let purge_rate = purged as f64 / purge_time.as_secs_f64();
    let raw_rate = raw as f64 / raw_time.as_secs_f64();
    let rate_ratio = purge_rate / raw_rate;
    let p99_before = quantile(&before, 0.99);
    let p99_during = quantile(&during, 0.99);
    let p99_raw = quantile(&during_raw, 0.99);
    let p99_ratio = p99_during / p99_before;
    let complete = purged == raw && purged as usize == per_tenant * TENANTS;
    let lines = vec![
        Line {
            scenario: "purge",
            metric: format!("{purged} expired rows, {TENANTS} tenants, batch {batch}"),
            value: format!("{purge_rate:.0} rows/s"),
            baseline: format!("{raw_rate:.0} rows/s raw ({rate_ratio:.2}x)"),
            target: format!(">= {TARGET_RATE_RATIO}x"),
        },
        Line {
            scenario: "purge",
            metric: format!("send p99 during purge ({rate:.0}/s)"),
            value: format!("{p99_during:.1} ms"),
            baseline: format!("{p99_before:.1} ms before ({p99_ratio:.2}x)"),
            target: format!("<= {TARGET_P99_RATIO}x"),
        },
        Line {
            scenario: "purge",
            metric: "send p99 during raw DELETE".into(),
            value: format!("{p99_raw:.1} ms"),
            baseline: format!("{:.2}x before", p99_raw / p99_before),
            target: String::new(),
        },
    ];
    let json = serde_json::json!({
        "scenario": "purge", "messages": purged, "tenants": TENANTS, "batch": batch,
        "pause_ms": ms(pause), "generate_secs": generate_secs,
        "purge_secs": purge_time.as_secs_f64(), "purge_rows_per_sec": purge_rate,
        "raw_secs": raw_time.as_secs_f64(), "raw_rows_per_sec": raw_rate,
        "rate_ratio": rate_ratio, "send_rate_per_sec": rate,
        "send_p50_before_ms": quantile(&before, 0.5), "send_p99_before_ms": p99_before,
        "send_p50_during_ms": quantile(&during, 0.5), "send_p99_during_ms": p99_during,
        "send_p99_during_raw_ms": p99_raw, "p99_ratio": p99_ratio,
        "all_purged": complete,
        "meets_target": complete && rate_ratio >= TARGET_RATE_RATIO && p99_ratio <= TARGET_P99_RATIO,
    });
    (lines, json)
}
