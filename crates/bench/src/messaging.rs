//! Messaging scenarios: `baseline`, `send`, `deliver`, `fanout` and `subscriptions`.
//!
//! - `baseline`: the row shape of a message inserted straight into PostgreSQL by a bare client,
//!   one row per transaction, at the same concurrency as `send`.
//! - `send`: 32 concurrent senders over TLS for a fixed time, taking turns with the baseline
//!   in rounds: messages per second (over all rounds, and each round's ratio to its baseline)
//!   and latency; then the same at half that rate, where the latency targets apply. Next to the
//!   peak, what a message cost in CPU time (this process, which runs the clients and the
//!   stack, and PostgreSQL) and the cores left idle, beside the same for a baseline row
//!   (`cpu.rs`): the two loads share this machine's cores with their clients. The senders are
//!   lean HTTP/2 clients (`lean.rs`), as the baseline's is a bare PostgreSQL client; each round
//!   also runs them on the SDK's tonic client, reported beside the peak without a target.
//! - `deliver`: send → subscriber latency at half of the peak rate.
//! - `fanout`: one conversation, 1,000 subscribers: time until every subscriber has a message.
//! - `subscriptions`: 10,000 idle streams on a separate `hafen-messaging` process: its RSS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use diesel_async::SimpleAsyncConnection;
use futures::StreamExt;
use futures::future::Either;
use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::messaging::v1 as pb;
use hafen_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use hafen_testkit::{Channel, TestStack, with_token};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::cpu::{self, Cost, Meter};
use crate::lean::LeanClient;
use crate::{Line, ms, quantile};

/// Concurrent senders of the `send` load (and of the live load in `purge`).
pub(crate) const SENDERS: usize = 32;

/// A user with a session.
pub(crate) struct Session {
    pub(crate) user_id: String,
    pub(crate) token: String,
}

/// `count` members of the tenant `bench`, each logged in.
pub(crate) async fn users(stack: &TestStack, owner: &str, count: usize) -> Vec<Session> {
    let mut auth = stack.auth_client().await;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let username = format!("user-{i}");
        let password = format!("password of user {i}");
        let user = auth
            .create_user(with_token(
                owner,
                auth_pb::CreateUserRequest {
                    username: username.clone(),
                    display_name: username.clone(),
                    role: hafen_proto::common::v1::Role::Member as i32,
                    credential: Some(auth_pb::create_user_request::Credential::Password(
                        password.clone(),
                    )),
                    ..Default::default()
                },
            ))
            .await
            .expect("CreateUser")
            .into_inner();
        let code = auth
            .issue_chat_code(with_token(
                owner,
                auth_pb::IssueChatCodeRequest {
                    user_id: user.user_id.clone(),
                    device_label: "bench".into(),
                },
            ))
            .await
            .expect("IssueChatCode")
            .into_inner()
            .code;
        let token = stack
            .login("bench", &username, &password, &code)
            .await
            .expect("login")
            .access_token;
        out.push(Session {
            user_id: user.user_id,
            token,
        });
    }
    out
}

/// A group of the owner and `members`.
pub(crate) async fn group(
    client: &mut MessagingServiceClient<Channel>,
    owner: &str,
    members: Vec<String>,
) -> String {
    client
        .create_conversation(with_token(
            owner,
            pb::CreateConversationRequest {
                kind: pb::ConversationKind::Group as i32,
                title: "bench".into(),
                member_user_ids: members,
                ..Default::default()
            },
        ))
        .await
        .expect("CreateConversation")
        .into_inner()
        .conversation_id
}

/// One SendMessage.
pub(crate) async fn send(
    client: &mut MessagingServiceClient<Channel>,
    token: &str,
    conversation: &str,
    body: String,
) {
    client
        .send_message(with_token(
            token,
            pb::SendMessageRequest {
                request_id: Uuid::now_v7().to_string(),
                conversation_id: conversation.to_owned(),
                body,
            },
        ))
        .await
        .expect("SendMessage");
}

/// A load phase: how many operations it did in how long, their latencies (sorted, ms; none
/// for the baseline) and what it cost.
struct Phase {
    operations: u64,
    elapsed: Duration,
    latencies: Vec<f64>,
    cost: Cost,
}

impl Phase {
    /// Operations per second.
    fn rate(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Several phases as one: their operations over their time, all their latencies, their
    /// pooled cost.
    fn pooled(phases: &[Phase]) -> Phase {
        let mut latencies: Vec<f64> = phases
            .iter()
            .flat_map(|p| p.latencies.iter().copied())
            .collect();
        latencies.sort_by(f64::total_cmp);
        let costs: Vec<(Cost, u64, Duration)> = phases
            .iter()
            .map(|p| (p.cost, p.operations, p.elapsed))
            .collect();
        Phase {
            operations: phases.iter().map(|p| p.operations).sum(),
            elapsed: phases.iter().map(|p| p.elapsed).sum(),
            latencies,
            cost: Cost::pooled(&costs),
        }
    }
}

/// Which client a send load's senders use.
#[derive(Clone, Copy, Debug)]
enum Load {
    /// [`LeanClient`]: a load generator that takes little of the cores the service needs.
    Lean,
    /// The SDK's client (tonic): what an application built on it costs its own machine.
    Tonic,
}

/// 32 senders, each in its own conversation and on its own connection, for `duration`; at
/// most `rate` messages per second in all (`None`: as fast as they can). `postmaster` from
/// [`cpu::postmaster`].
async fn send_load(
    stack: &TestStack,
    senders: &[(String, String)],
    duration: Duration,
    rate: Option<f64>,
    postmaster: Option<u32>,
    load: Load,
) -> Phase {
    let meter = Meter::start(postmaster);
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let interval = rate.map(|r| Duration::from_secs_f64(senders.len() as f64 / r));
    let mut tasks = Vec::new();
    for (conversation, token) in senders {
        let (conversation, token) = (conversation.clone(), token.clone());
        let mut client = match load {
            Load::Lean => Either::Left(LeanClient::connect(stack).await),
            Load::Tonic => Either::Right(stack.messaging_client().await),
        };
        let authorization: http::HeaderValue =
            format!("Bearer {token}").parse().expect("token header");
        let (latencies, count) = (latencies.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut next = Instant::now();
            let mut mine = Vec::new();
            while started.elapsed() < duration {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                }
                let body = "a benchmark message of ordinary length".to_owned();
                let at = Instant::now();
                match &mut client {
                    Either::Left(lean) => {
                        let request = pb::SendMessageRequest {
                            request_id: Uuid::now_v7().to_string(),
                            conversation_id: conversation.clone(),
                            body,
                        };
                        lean.send(&authorization, &request)
                            .await
                            .expect("SendMessage");
                    }
                    Either::Right(tonic) => send(tonic, &token, &conversation, body).await,
                }
                mine.push(ms(at.elapsed()));
                count.fetch_add(1, Ordering::Relaxed);
            }
            latencies.lock().await.extend(mine);
        }));
    }
    for task in tasks {
        task.await.expect("sender");
    }
    let sent = count.load(Ordering::Relaxed);
    let cost = meter.finish(sent);
    let elapsed = started.elapsed();
    let mut latencies = latencies.lock().await.clone();
    latencies.sort_by(f64::total_cmp);
    Phase {
        operations: sent,
        elapsed,
        latencies,
        cost,
    }
}

/// Creates the baseline's table: the row shape of a message, with two of the five indexes of
/// the service's `messages` (the primary key and the per-conversation sequence).
async fn baseline_table(stack: &TestStack) {
    let mut conn = stack.db.connect().await;
    conn.batch_execute(
        "CREATE SCHEMA bench; CREATE TABLE bench.baseline (id uuid PRIMARY KEY, conversation_id uuid NOT NULL, \
         sequence bigint NOT NULL, sender_id uuid NOT NULL, ciphertext bytea, masked boolean NOT NULL, \
         request_id uuid, created_at timestamptz NOT NULL, UNIQUE (conversation_id, sequence))",
    )
    .await
    .expect("baseline table");
}

/// The baseline: the same row shape, one row per transaction, `SENDERS` bare connections,
/// into the table of [`baseline_table`] (each run in conversations of its own).
async fn baseline(stack: &TestStack, duration: Duration, postmaster: Option<u32>) -> Phase {
    let count = Arc::new(AtomicU64::new(0));
    let mut connections = Vec::new();
    for _ in 0..SENDERS {
        connections.push(stack.db.connect().await);
    }
    let meter = Meter::start(postmaster);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (worker, mut conn) in connections.into_iter().enumerate() {
        let count = count.clone();
        tasks.push(tokio::spawn(async move {
            let conversation = Uuid::now_v7();
            let mut sequence = 0_i64;
            let body = "00".repeat(80);
            while started.elapsed() < duration {
                sequence += 1;
                conn.batch_execute(&format!(
                    "INSERT INTO bench.baseline VALUES ('{}', '{conversation}', {sequence}, '{}', \
                     '\\x{body}', false, '{}', now())",
                    Uuid::now_v7(),
                    Uuid::from_u128(worker as u128),
                    Uuid::now_v7()
                ))
                .await
                .expect("baseline insert");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("baseline worker");
    }
    let rows = count.load(Ordering::Relaxed);
    let cost = meter.finish(rows);
    Phase {
        operations: rows,
        elapsed: started.elapsed(),
        latencies: Vec::new(),
        cost,
    }
}

/// Runs `baseline`, `send` and `deliver` with senders running for `duration` each. The
/// baseline and the peak take turns, `rounds` times, each for its share of `duration`: the
/// machine's state drifts over a run (the same binary measured 0.66× to 1.15× with one turn
/// each), and taking turns lets both loads see the same drift.
pub async fn run(duration: Duration, rounds: u32) -> (Vec<Line>, Vec<serde_json::Value>) {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("bench").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let senders = users(&stack, &owner, SENDERS).await;
    let mut client = stack.messaging_client().await;
    let mut pairs = Vec::new();
    for sender in &senders {
        let conversation = group(&mut client, &owner, vec![sender.user_id.clone()]).await;
        pairs.push((conversation, sender.token.clone()));
    }

    let postmaster = cpu::postmaster(&mut stack.db.connect().await).await;
    baseline_table(&stack).await;
    let rounds = rounds.max(1);
    let turn = duration / rounds;
    let (mut baselines, mut peaks, mut tonic_peaks) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        baselines.push(baseline(&stack, turn, postmaster).await);
        peaks.push(send_load(&stack, &pairs, turn, None, postmaster, Load::Lean).await);
        tonic_peaks.push(send_load(&stack, &pairs, turn, None, postmaster, Load::Tonic).await);
    }
    let round_ratios: Vec<f64> = baselines
        .iter()
        .zip(&peaks)
        .map(|(baseline, peak)| peak.rate() / baseline.rate())
        .collect();
    let (baseline_phase, peak_phase) = (Phase::pooled(&baselines), Phase::pooled(&peaks));
    let round_rates = |phases: &[Phase]| phases.iter().map(Phase::rate).collect::<Vec<_>>();
    let (baseline_rate, baseline_cost) = (baseline_phase.rate(), baseline_phase.cost);
    let (peak, peak_latencies, peak_cost) =
        (peak_phase.rate(), peak_phase.latencies, peak_phase.cost);
    let tonic_phase = Phase::pooled(&tonic_peaks);
    let (tonic_peak, tonic_cost) = (tonic_phase.rate(), tonic_phase.cost);
    let half_phase = send_load(
        &stack,
        &pairs,
        duration,
        Some(peak / 2.0),
        postmaster,
        Load::Lean,
    )
    .await;
    let (half, half_latencies) = (half_phase.rate(), half_phase.latencies);

    // deliver: a subscriber in one conversation while the load runs at half the peak.
    let mut subscriber = stack.messaging_client().await;
    let mut stream = subscriber
        .subscribe(with_token(
            &senders[0].token,
            pb::SubscribeRequest::default(),
        ))
        .await
        .expect("Subscribe")
        .into_inner();
    let _ = stream.next().await; // caught up
    let others = pairs[1..].to_vec();
    let rate = peak / 2.0 * (others.len() as f64 / SENDERS as f64);
    let load = send_load(&stack, &others, duration, Some(rate), None, Load::Lean);
    let probe = async {
        let mut delivered = Vec::new();
        let mut sender = stack.messaging_client().await;
        let (conversation, token) = &pairs[0];
        let started = Instant::now();
        while started.elapsed() < duration {
            let at = Instant::now();
            send(&mut sender, token, conversation, "probe".into()).await;
            loop {
                let event = stream.next().await.expect("open").expect("ok").event;
                if matches!(
                    event,
                    Some(pb::subscribe_response::Event::MessageCreated(_))
                ) {
                    break;
                }
            }
            delivered.push(ms(at.elapsed()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        delivered
    };
    let (_, mut delivered) = tokio::join!(load, probe);
    delivered.sort_by(f64::total_cmp);

    let ratio = peak / baseline_rate;
    let lines = vec![
        Line {
            scenario: "baseline",
            metric: format!("bare INSERTs, {SENDERS} connections"),
            value: format!("{baseline_rate:.0}/s"),
            baseline: String::new(),
            target: String::new(),
        },
        Line {
            scenario: "send",
            metric: format!("SendMessage peak, {SENDERS} senders"),
            value: format!("{peak:.0}/s"),
            baseline: format!("{baseline_rate:.0}/s ({ratio:.2}x)"),
            target: ">= 1.0x".into(),
        },
        Line {
            scenario: "send",
            metric: format!("peak / baseline, {rounds} rounds"),
            value: round_ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            baseline: String::new(),
            target: String::new(),
        },
        Line {
            scenario: "send",
            metric: "CPU per message: bench + PostgreSQL".into(),
            value: peak_cost.split(),
            baseline: format!("{} per row", baseline_cost.split()),
            target: String::new(),
        },
        Line {
            scenario: "send",
            metric: "peak with the SDK's tonic client".into(),
            value: format!("{tonic_peak:.0}/s"),
            baseline: format!("{baseline_rate:.0}/s ({:.2}x)", tonic_peak / baseline_rate),
            target: String::new(),
        },
        Line {
            scenario: "send",
            metric: "CPU per message, tonic client".into(),
            value: tonic_cost.split(),
            baseline: String::new(),
            target: String::new(),
        },
        Line {
            scenario: "send",
            metric: "idle cores: peak / baseline".into(),
            value: idle(peak_cost),
            baseline: idle(baseline_cost),
            target: String::new(),
        },
        Line {
            scenario: "send",
            metric: "p50/p99 at peak".into(),
            value: format!(
                "{:.1}/{:.1} ms",
                quantile(&peak_latencies, 0.5),
                quantile(&peak_latencies, 0.99)
            ),
            baseline: String::new(),
            target: String::new(),
        },
        Line {
            scenario: "send",
            metric: format!("p50/p99 at half peak ({half:.0}/s)"),
            value: format!(
                "{:.1}/{:.1} ms",
                quantile(&half_latencies, 0.5),
                quantile(&half_latencies, 0.99)
            ),
            baseline: String::new(),
            target: "p99 <= 5 ms".into(),
        },
        Line {
            scenario: "deliver",
            metric: "send -> subscriber p50/p99".into(),
            value: format!(
                "{:.1}/{:.1} ms",
                quantile(&delivered, 0.5),
                quantile(&delivered, 0.99)
            ),
            baseline: String::new(),
            target: "p99 <= 10 ms".into(),
        },
    ];
    let mut baseline_json = serde_json::json!({
        "scenario": "baseline", "rows_per_sec": baseline_rate, "connections": SENDERS,
    });
    let mut send_json = serde_json::json!({
        "scenario": "send", "senders": SENDERS, "peak_per_sec": peak, "ratio_to_baseline": ratio,
        "round_ratios": round_ratios,
        "round_peaks_per_sec": round_rates(&peaks),
        "round_baselines_per_sec": round_rates(&baselines),
        "tonic_peak_per_sec": tonic_peak, "tonic_ratio_to_baseline": tonic_peak / baseline_rate,
        "round_tonic_peaks_per_sec": round_rates(&tonic_peaks),
        "peak_p50_ms": quantile(&peak_latencies, 0.5), "peak_p99_ms": quantile(&peak_latencies, 0.99),
        "half_rate_per_sec": half, "half_p50_ms": quantile(&half_latencies, 0.5),
        "half_p99_ms": quantile(&half_latencies, 0.99),
        "meets_target": ratio >= 1.0 && quantile(&half_latencies, 0.99) <= 5.0,
    });
    if let (Some(baseline), Some(send)) = (baseline_json.as_object_mut(), send_json.as_object_mut())
    {
        baseline.extend(baseline_cost.json(""));
        send.extend(peak_cost.json("peak_"));
        send.extend(tonic_cost.json("tonic_peak_"));
    }
    let json = vec![
        baseline_json,
        send_json,
        serde_json::json!({
            "scenario": "deliver", "p50_ms": quantile(&delivered, 0.5), "p99_ms": quantile(&delivered, 0.99),
            "meets_target": quantile(&delivered, 0.99) <= 10.0,
        }),
    ];
    (lines, json)
}

/// Idle cores over a phase, as far as known.
fn idle(cost: Cost) -> String {
    cost.idle_cores
        .map_or_else(|| "n/a".to_owned(), |cores| format!("{cores:.2}"))
}

/// `fanout`: one conversation with `subscribers` members, each streaming.
pub async fn fanout(subscribers: usize, messages: usize) -> (Vec<Line>, serde_json::Value) {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("bench").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let members = users(&stack, &owner, subscribers).await;
    let mut client = stack.messaging_client().await;
    let ids: Vec<String> = members.iter().map(|m| m.user_id.clone()).collect();
    let conversation = group(&mut client, &owner, ids.iter().take(500).cloned().collect()).await;
    for chunk in ids[ids.len().min(500)..].chunks(500) {
        client
            .add_members(with_token(
                &owner,
                pb::AddMembersRequest {
                    conversation_id: conversation.clone(),
                    user_ids: chunk.to_vec(),
                },
            ))
            .await
            .expect("AddMembers");
    }
    let received = Arc::new((0..messages).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
    let last_at = Arc::new(
        (0..messages)
            .map(|_| std::sync::Mutex::new(None::<Instant>))
            .collect::<Vec<_>>(),
    );
    let ready = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut channels = Vec::new();
    for _ in 0..subscribers.div_ceil(100) {
        channels.push(stack.messaging.channel(&stack.secrets).await);
    }
    let mut tasks = Vec::new();
    for (i, member) in members.iter().enumerate() {
        let mut client = MessagingServiceClient::new(channels[i / 100].clone());
        let (token, received, last_at, ready, stop) = (
            member.token.clone(),
            received.clone(),
            last_at.clone(),
            ready.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut stream = client
                .subscribe(with_token(&token, pb::SubscribeRequest::default()))
                .await
                .expect("Subscribe")
                .into_inner();
            let _ = stream.next().await;
            ready.fetch_add(1, Ordering::SeqCst);
            while !stop.load(Ordering::Relaxed) {
                let Ok(Some(Ok(response))) =
                    tokio::time::timeout(Duration::from_secs(1), stream.next()).await
                else {
                    continue;
                };
                if let Some(pb::subscribe_response::Event::MessageCreated(m)) = response.event {
                    let index = usize::try_from(m.sequence).unwrap_or(1) - 1;
                    if index < received.len() {
                        received[index].fetch_add(1, Ordering::SeqCst);
                        if let Ok(mut at) = last_at[index].lock() {
                            *at = Some(Instant::now());
                        }
                    }
                }
            }
        }));
    }
    while ready.load(Ordering::SeqCst) < subscribers as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut spreads = Vec::new();
    for i in 0..messages {
        let sent_at = Instant::now();
        send(&mut client, &owner, &conversation, format!("fan-out {i}")).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while received[i].load(Ordering::SeqCst) < subscribers as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let last = last_at[i]
            .lock()
            .ok()
            .and_then(|at| *at)
            .unwrap_or_else(Instant::now);
        spreads.push(ms(last.duration_since(sent_at)));
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        let _ = task.await;
    }
    let complete = received
        .iter()
        .all(|r| r.load(Ordering::SeqCst) == subscribers as u64);
    spreads.sort_by(f64::total_cmp);
    let lines = vec![Line {
        scenario: "fanout",
        metric: format!("1 conversation, {subscribers} subscribers"),
        value: format!(
            "{:.0}/{:.0} ms",
            quantile(&spreads, 0.5),
            quantile(&spreads, 0.99)
        ),
        baseline: "send -> last subscriber p50/p99".into(),
        target: if complete {
            "all delivered".into()
        } else {
            "INCOMPLETE".into()
        },
    }];
    let json = serde_json::json!({
        "scenario": "fanout", "subscribers": subscribers, "messages": messages,
        "last_delivery_p50_ms": quantile(&spreads, 0.5), "last_delivery_p99_ms": quantile(&spreads, 0.99),
        "all_delivered": complete,
    });
    (lines, json)
}

/// `subscriptions`: `streams` idle streams on a `hafen-messaging` process of its own.
pub async fn subscriptions(streams: usize) -> (Vec<Line>, serde_json::Value) {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("bench").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("hafen-messaging")))
        .filter(|path| path.exists())
        .expect("hafen-messaging next to hafen-bench (make bench builds both)");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let config = stack.secrets.messaging_config(&stack.db);
    let mut child = tokio::process::Command::new(binary)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(config.server.tls.tls_cert.clone().expect("cert"))
        .arg("--tls-key")
        .arg(config.server.tls.tls_key.clone().expect("key"))
        .arg("--tls-ca")
        .arg(config.server.tls.tls_ca.clone().expect("ca"))
        .args(["--database-url", stack.db.url()])
        .args(["--keystore-url", stack.db.keystore().url()])
        .args([
            "--redis-url",
            &config.redis.redis_url,
            "--redis-prefix",
            &config.redis.redis_prefix,
        ])
        .args([
            "--auth-endpoint",
            &stack.auth.uri(),
            "--auth-server-name",
            "localhost",
        ])
        .arg("--master-key-file")
        .arg(stack.secrets.master_key_file())
        .env("HAFEN_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start hafen-messaging");
    let pid = child.id().expect("pid");
    let uri = format!("https://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .expect("uri")
        .tls_config(stack.secrets.client_tls(None))
        .expect("tls");
    while endpoint.connect().await.is_err() {
        assert!(Instant::now() < deadline, "hafen-messaging did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = rss_kib(pid);
    let mut channels = Vec::new();
    for _ in 0..streams.div_ceil(100) {
        channels.push(endpoint.connect().await.expect("connect"));
    }
    let mut open = Vec::with_capacity(streams);
    for i in 0..streams {
        let mut client = MessagingServiceClient::new(channels[i / 100].clone());
        let mut stream = client
            .subscribe(with_token(&owner, pb::SubscribeRequest::default()))
            .await
            .expect("Subscribe")
            .into_inner();
        let _ = stream.next().await;
        open.push(stream);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    drop(open);
    let _ = child.start_kill();
    let mib = after as f64 / 1024.0;
    let lines = vec![Line {
        scenario: "subscriptions",
        metric: format!("{streams} idle streams: messaging RSS"),
        value: format!("{mib:.0} MiB"),
        baseline: format!("{:.0} MiB with none", before as f64 / 1024.0),
        target: "<= 500 MB".into(),
    }];
    let json = serde_json::json!({
        "scenario": "subscriptions", "streams": streams, "rss_mib": mib,
        "rss_mib_idle": before as f64 / 1024.0, "meets_target": mib * 1.048_576 <= 500.0,
    });
    (lines, json)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or_default()
}
