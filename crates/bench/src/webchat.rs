//! `webchat`: the website chat (CB1) with 1,000 concurrent visits answered by 10 agents, next
//! to the members' SendMessage of the same run.
//!
//! One tenant with the feature `webchat` on, 10 agents (members, logged in) and one enabled
//! widget that they answer, which allows anonymous chats (so no consent is asked before a
//! message) and declares no pre-chat fields; 32 further members, each in a group of their own
//! with the owner, for the baseline. Browsers' calls carry `origin: https://shop.example.com`.
//!
//! - visits: 1,000 StartVisit calls, 32 at a time: visits started per second, and StartVisit
//!   p50/p99. Then each visit's first message, which opens its chat (a conversation routed to
//!   the least busy agent), 32 at a time: per second and p50/p99.
//! - send: 32 visitor senders (SendVisitorMessage; sender k sends for visits k, k+32, …, in
//!   turn) for a fixed time, taking turns in rounds with 32 members sending SendMessage in
//!   their groups: messages per second, the ratio of the two (over all rounds, and per
//!   round; target ≥ 0.8×), p50/p99, CPU per message (`cpu.rs`) and PostgreSQL transactions
//!   per message (`pg_stat_database` of the run's database, the rate of the idle stack
//!   subtracted). Both use the SDK's tonic client, one connection per sender, the same body.
//! - deliver: every visit (or the first `--webchat-streams`) has its SubscribeVisit stream
//!   open and every agent its Subscribe stream; the 32 visitor senders send for those visits
//!   (sharing them when there are fewer) at half of their peak for a fixed time, paced, and
//!   each agent answers every visitor message it receives, at once, with SendMessage into its
//!   conversation. Visitor → agent: from the start of SendVisitorMessage until the agent's
//!   stream has the message; agent → visitor: from the start of the agent's SendMessage until
//!   the visitor's stream has it. p50/p99 each, target p99 ≤ 10 ms; messages not delivered
//!   within a grace period after the load count as lost. The streams start from the log's
//!   present. Before the load, the cores the open streams keep busy while nothing happens,
//!   this process's and PostgreSQL's. Where this load both ways (each visitor message brings
//!   an answer, and both reach two streams) cannot keep up with half the visitor send peak,
//!   what it reached is its own peak ("chat peak"), and delivery is measured again at half of
//!   that; the target is judged there (half the peak of the load that delivers), and no
//!   message may be lost in either measurement.
//!
//! The stack's webchat and messaging services are replaced by ones of this run's own
//! configuration: the abuse limits of the webchat service (visits per client address and per
//! widget, calls per visitor, per minute) raised out of the way — every visit of the bench
//! comes from 127.0.0.1, so the per-address limit would count all 1,000 together — and the
//! key caches and the visitor streams' poll at their production defaults (10,000 keys, 500 ms;
//! the testkit's 1,000 keys would be too few for 1,000 visitors' keys and the agents'). The
//! JSON line has each visit's calls per minute at the peak (the visits take turns evenly), to
//! compare with the production limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diesel_async::AsyncPgConnection;
use futures::StreamExt;
use hafen_proto::messaging::v1 as msg_pb;
use hafen_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use hafen_proto::webchat::v1 as pb;
use hafen_proto::webchat::v1::visitor_service_client::VisitorServiceClient;
use hafen_testkit::{Channel, TestServer, TestStack, with_token};
use tokio::sync::watch;
use tonic::metadata::AsciiMetadataValue;
use uuid::Uuid;

use crate::cpu::{self, Cost, Meter};
use crate::messaging::{SENDERS, Session, group, users};
use crate::{Line, ms, quantile};

/// Where the widget is embedded: every visitor call comes from there.
const ORIGIN: &str = "https://shop.example.com";
/// Agents answering the widget.
const AGENTS: usize = 10;
/// The body of every message, visitor's and member's alike.
const BODY: &str = "a benchmark message of ordinary length";
/// Visitor send throughput against member send throughput.
const TARGET_RATIO: f64 = 0.8;
/// Delivery p99 at half the peak, either way.
const TARGET_DELIVERY_MS: f64 = 10.0;

/// A delivery load that reaches less than this share of the rate asked is saturated: what it
/// reached is the peak of the load both ways.
const SATURATED: f64 = 0.9;
/// How long deliveries may still arrive after the delivery load stopped.
const GRACE: Duration = Duration::from_secs(3);
/// How long PostgreSQL's statistics take to include a phase's transactions: backends report
/// them at most once a second.
const SETTLE: Duration = Duration::from_millis(1500);
/// How long the open visitor streams are watched while nothing happens.
const IDLE: Duration = Duration::from_secs(3);
/// Visitor streams per HTTP/2 connection.
const STREAMS_PER_CHANNEL: usize = 100;
/// The production default of calls per visitor per minute (`--calls-per-visitor`).
const PRODUCTION_CALLS_PER_VISITOR: f64 = 120.0;

/// A visit as its browser knows it.
#[derive(Clone)]
struct Visit {
    /// `Visitor <token>`.
    authorization: AsciiMetadataValue,
}

/// A call from a page of the shop.
fn from_shop<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("origin", AsciiMetadataValue::from_static(ORIGIN));
    request
}

/// A call of `visit`'s visitor from a page of the shop.
fn as_visitor<T>(visit: &Visit, message: T) -> tonic::Request<T> {
    let mut request = from_shop(message);
    request
        .metadata_mut()
        .insert("authorization", visit.authorization.clone());
    request
}

/// `Bearer <token>`.
fn bearer(token: &str) -> AsciiMetadataValue {
    format!("Bearer {token}").parse().expect("token header")
}

/// Replaces the stack's webchat and messaging services by ones configured for this run: the
/// webchat service's limits out of the way, key caches and the visitor streams' poll at
/// their production defaults.
async fn restart_services(stack: &mut TestStack) {
    let key_cache = std::num::NonZeroUsize::new(10_000).expect("non-zero");
    let mut webchat = stack.secrets.webchat_config(&stack.db);
    webchat.auth.auth_endpoint = stack.auth.uri();
    webchat.audit.audit_endpoint = stack.audit.uri();
    webchat.limits.visits_per_address = u32::MAX;
    webchat.limits.visits_per_widget = u32::MAX;
    webchat.limits.calls_per_visitor = u32::MAX;
    webchat.key_cache_size = key_cache;
    webchat.stream_poll = Duration::from_millis(500);
    stack
        .webchat
        .stop()
        .await
        .expect("the webchat service stops");
    stack.webchat = TestServer::spawn(|l, s| hafen_webchat::serve(webchat, l, s)).await;
    let mut messaging = stack.secrets.messaging_config(&stack.db);
    messaging.auth.auth_endpoint = stack.auth.uri();
    messaging.audit.audit_endpoint = stack.audit.uri();
    messaging.key_cache_size = key_cache;
    stack
        .messaging
        .stop()
        .await
        .expect("the messaging service stops");
    stack.messaging = TestServer::spawn(|l, s| hafen_messaging::serve(messaging, l, s)).await;
}

/// An enabled widget on [`ORIGIN`] answered by `agents`, allowing anonymous chats.
async fn widget(stack: &TestStack, owner: &str, agents: &[Session]) -> String {
    stack
        .widget_client()
        .await
        .create_widget(with_token(
            owner,
            pb::CreateWidgetRequest {
                settings: Some(pb::WidgetSettings {
                    name: "Bench shop".into(),
                    allowed_origins: vec![ORIGIN.into()],
                    privacy_policy_url: format!("{ORIGIN}/privacy"),
                    welcome_message: "Hello!".into(),
                    allow_anonymous_chat: true,
                    agent_user_ids: agents.iter().map(|a| a.user_id.clone()).collect(),
                    ..Default::default()
                }),
                enabled: true,
                consent_text: "We store what you give us to answer you.".into(),
                request_id: Uuid::now_v7().to_string(),
                ..Default::default()
            },
        ))
        .await
        .expect("CreateWidget")
        .into_inner()
        .widget_id
}

/// Calls made `CONCURRENCY` at a time: how many, how long in all, their latencies.
struct Calls {
    done: usize,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    /// Sorted, ms.
    latencies: Vec<f64>,
}

impl Calls {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Starts `count` visits of `widget`, [`SENDERS`] at a time, each worker on its own
/// connection.
async fn start_visits(stack: &TestStack, widget: &str, count: usize) -> (Vec<Visit>, Calls) {
    let mut clients = Vec::new();
    for _ in 0..SENDERS {
        clients.push(stack.visitor_client().await);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut client in clients {
        let (next, widget) = (next.clone(), widget.to_owned());
        tasks.push(tokio::spawn(async move {
            let (mut visits, mut latencies, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let at = Instant::now();
                let request = from_shop(pb::StartVisitRequest {
                    widget_id: widget.clone(),
                    visitor_token: String::new(),
                    ..Default::default()
                });
                match client.start_visit(request).await {
                    Ok(started) => {
                        latencies.push(ms(at.elapsed()));
                        let token = started.into_inner().visitor_token;
                        visits.push(Visit {
                            authorization: format!("Visitor {token}")
                                .parse()
                                .expect("visitor token header"),
                        });
                    }
                    Err(status) => errors.push(status.to_string()),
                }
            }
            (visits, latencies, errors)
        }));
    }
    let (mut visits, mut latencies, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        let (v, l, e) = task.await.expect("visit starter");
        visits.extend(v);
        latencies.extend(l);
        errors.extend(e);
    }
    let elapsed = started.elapsed();
    latencies.sort_by(f64::total_cmp);
    let calls = Calls {
        done: visits.len(),
        errors: errors.len() as u64,
        first_error: errors.into_iter().next(),
        elapsed,
        latencies,
    };
    (visits, calls)
}

/// Sends each visit's first message, which opens its chat, [`SENDERS`] at a time.
async fn open_chats(stack: &TestStack, visits: &[Visit]) -> Calls {
    let mut clients = Vec::new();
    for _ in 0..SENDERS {
        clients.push(stack.visitor_client().await);
    }
    let visits = Arc::new(visits.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut client in clients {
        let (next, visits) = (next.clone(), visits.clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), Vec::new());
            while let Some(visit) = visits.get(next.fetch_add(1, Ordering::Relaxed)) {
                let at = Instant::now();
                let request = as_visitor(
                    visit,
                    pb::SendVisitorMessageRequest {
                        request_id: Uuid::now_v7().to_string(),
                        body: BODY.into(),
                    },
                );
                match client.send_visitor_message(request).await {
                    Ok(_) => latencies.push(ms(at.elapsed())),
                    Err(status) => errors.push(status.to_string()),
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), Vec::new());
    for task in tasks {
        let (l, e) = task.await.expect("chat opener");
        latencies.extend(l);
        errors.extend(e);
    }
    let elapsed = started.elapsed();
    latencies.sort_by(f64::total_cmp);
    Calls {
        done: latencies.len(),
        errors: errors.len() as u64,
        first_error: errors.into_iter().next(),
        elapsed,
        latencies,
    }
}

/// One sender of a send load, on its own connection.
enum Sender {
    /// A visitor's browser, sending for its visits in turn.
    Visitor {
        client: VisitorServiceClient<Channel>,
        visits: Vec<Visit>,
        next: usize,
    },
    /// A member, in their group.
    Member {
        client: MessagingServiceClient<Channel>,
        authorization: AsciiMetadataValue,
        conversation: String,
    },
}

impl Sender {
    /// Sends one message; its id.
    async fn send(&mut self) -> Result<String, tonic::Status> {
        let request_id = Uuid::now_v7().to_string();
        match self {
            Sender::Visitor {
                client,
                visits,
                next,
            } => {
                let visit = &visits[*next % visits.len()];
                *next += 1;
                let request = as_visitor(
                    visit,
                    pb::SendVisitorMessageRequest {
                        request_id,
                        body: BODY.into(),
                    },
                );
                Ok(client
                    .send_visitor_message(request)
                    .await?
                    .into_inner()
                    .message_id)
            }
            Sender::Member {
                client,
                authorization,
                conversation,
            } => {
                let mut request = tonic::Request::new(msg_pb::SendMessageRequest {
                    request_id,
                    conversation_id: conversation.clone(),
                    body: BODY.into(),
                });
                request
                    .metadata_mut()
                    .insert("authorization", authorization.clone());
                Ok(client.send_message(request).await?.into_inner().message_id)
            }
        }
    }
}

/// [`SENDERS`] visitor senders: sender k sends for visits k, k + 32, … in turn (with fewer
/// visits than senders, for visit k modulo their number).
async fn visitor_senders(stack: &TestStack, visits: &[Visit]) -> Vec<Sender> {
    if visits.is_empty() {
        return Vec::new();
    }
    let mut senders = Vec::with_capacity(SENDERS);
    for k in 0..SENDERS {
        let mine = if visits.len() >= SENDERS {
            visits.iter().skip(k).step_by(SENDERS).cloned().collect()
        } else {
            vec![visits[k % visits.len()].clone()]
        };
        senders.push(Sender::Visitor {
            client: stack.visitor_client().await,
            visits: mine,
            next: 0,
        });
    }
    senders
}

/// One member sender per (conversation, token).
async fn member_senders(stack: &TestStack, pairs: &[(String, String)]) -> Vec<Sender> {
    let mut senders = Vec::with_capacity(pairs.len());
    for (conversation, token) in pairs {
        senders.push(Sender::Member {
            client: stack.messaging_client().await,
            authorization: bearer(token),
            conversation: conversation.clone(),
        });
    }
    senders
}

/// A send load: what it sent, how long it took, what it cost.
struct Phase {
    operations: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    /// Sorted, ms.
    latencies: Vec<f64>,
    /// Each message sent: its id and when its send started.
    sent: Vec<(String, Instant)>,
    cost: Cost,
    /// PostgreSQL transactions per message, the idle stack's subtracted.
    transactions: Option<f64>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Several phases as one (their messages are left out).
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
        let operations: u64 = phases.iter().map(|p| p.operations).sum();
        let transactions = phases
            .iter()
            .map(|p| p.transactions.map(|t| t * p.operations as f64))
            .sum::<Option<f64>>()
            .filter(|_| operations > 0)
            .map(|t| t / operations as f64);
        Phase {
            operations,
            errors: phases.iter().map(|p| p.errors).sum(),
            first_error: phases.iter().find_map(|p| p.first_error.clone()),
            elapsed: phases.iter().map(|p| p.elapsed).sum(),
            latencies,
            sent: Vec::new(),
            cost: Cost::pooled(&costs),
            transactions,
        }
    }
}

/// `senders` sending for `duration`; at most `rate` messages per second in all, their starts
/// spread evenly (`None`: as fast as they can). `postmaster` from [`cpu::postmaster`].
async fn load(
    senders: Vec<Sender>,
    duration: Duration,
    rate: Option<f64>,
    postmaster: Option<u32>,
) -> Phase {
    let count = senders.len().max(1);
    let interval = rate.map(|r| Duration::from_secs_f64(count as f64 / r.max(1e-3)));
    let meter = Meter::start(postmaster);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (k, mut sender) in senders.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut next =
                started + interval.map_or(Duration::ZERO, |i| i * k as u32 / count as u32);
            let (mut latencies, mut sent, mut errors) = (Vec::new(), Vec::new(), Vec::new());
            loop {
                if let Some(interval) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += interval;
                }
                if started.elapsed() >= duration {
                    break;
                }
                let at = Instant::now();
                match sender.send().await {
                    Ok(id) => {
                        latencies.push(ms(at.elapsed()));
                        sent.push((id, at));
                    }
                    Err(status) => errors.push(status.to_string()),
                }
            }
            (latencies, sent, errors)
        }));
    }
    let (mut latencies, mut sent, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for task in tasks {
        let (l, s, e) = task.await.expect("sender");
        latencies.extend(l);
        sent.extend(s);
        errors.extend(e);
    }
    let elapsed = started.elapsed();
    let operations = sent.len() as u64;
    let cost = meter.finish(operations);
    latencies.sort_by(f64::total_cmp);
    Phase {
        operations,
        errors: errors.len() as u64,
        first_error: errors.into_iter().next(),
        elapsed,
        latencies,
        sent,
        cost,
        transactions: None,
    }
}

/// Counts the run database's transactions (committed and rolled back), as PostgreSQL's
/// statistics have them.
struct Transactions {
    conn: AsyncPgConnection,
    /// Of the idle stack (audit relays, …), per second.
    background: f64,
}

impl Transactions {
    async fn read(&mut self) -> Option<(i64, Instant)> {
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let count: Count = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query(
                "SELECT (xact_commit + xact_rollback)::bigint AS n FROM pg_stat_database \
                 WHERE datname = current_database()",
            ),
            &mut self.conn,
        )
        .await
        .ok()?;
        Some((count.n, Instant::now()))
    }

    /// Starts counting: measures the idle stack's transactions for a moment.
    async fn start(conn: AsyncPgConnection) -> Self {
        let mut this = Self {
            conn,
            background: 0.0,
        };
        tokio::time::sleep(SETTLE).await;
        let before = this.read().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        if let (Some((a, at)), Some((b, bt))) = (before, this.read().await) {
            this.background = (b - a) as f64 / bt.duration_since(at).as_secs_f64();
        }
        this
    }

    /// [`load`], with its transactions per message.
    async fn load(
        &mut self,
        senders: Vec<Sender>,
        duration: Duration,
        postmaster: Option<u32>,
    ) -> Phase {
        let before = self.read().await;
        let mut phase = load(senders, duration, None, postmaster).await;
        tokio::time::sleep(SETTLE).await;
        if let (Some((a, at)), Some((b, bt))) = (before, self.read().await)
            && phase.operations > 0
        {
            let background = self.background * bt.duration_since(at).as_secs_f64();
            phase.transactions = Some(((b - a) as f64 - background) / phase.operations as f64);
        }
        phase
    }
}

/// What `deliver` measured.
struct Delivery {
    /// Visitor → agent, sorted, ms.
    to_agent: Vec<f64>,
    to_agent_lost: usize,
    /// Agent → visitor, sorted, ms.
    to_visitor: Vec<f64>,
    to_visitor_lost: usize,
    /// The visitors' sends.
    sends: Phase,
    answers: usize,
    /// Answers that failed, and agents' streams that ended early.
    agent_errors: u64,
    /// Visitor streams that failed to open or ended early.
    stream_errors: u64,
    /// The first of those errors.
    first_error: Option<String>,
    /// What the stack cost over [`IDLE`] while nothing happened, before the streams opened
    /// and with them open.
    idle_before: Cost,
    idle: Cost,
    /// Visitor streams open.
    streams: usize,
}

/// Latencies (sorted, ms) of the `received` messages from when they were sent (`sent`), and
/// how many sent were not received.
fn latencies(sent: &[(String, Instant)], received: &[(String, Instant)]) -> (Vec<f64>, usize) {
    let at: HashMap<&str, Instant> = sent.iter().map(|(id, at)| (id.as_str(), *at)).collect();
    let mut out: Vec<f64> = received
        .iter()
        .filter_map(|(id, got)| {
            at.get(id.as_str())
                .map(|sent| ms(got.duration_since(*sent)))
        })
        .collect();
    out.sort_by(f64::total_cmp);
    let lost = sent.len().saturating_sub(out.len());
    (out, lost)
}

/// An agent following their conversations and answering every visitor's message at once:
/// when each visitor message arrived, each answer's id and when its send started, and what
/// failed (answers, or the stream).
type AgentLog = (Vec<(String, Instant)>, Vec<(String, Instant)>, Vec<String>);

async fn agent(
    stack: &TestStack,
    agent: &Session,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<AgentLog> {
    let client = stack.messaging_client().await;
    let mut stream = client
        .clone()
        .subscribe(with_token(
            &agent.token,
            msg_pb::SubscribeRequest::default(),
        ))
        .await
        .expect("Subscribe")
        .into_inner();
    // Nothing before now is replayed: the stream starts with CaughtUp.
    let _ = stream.next().await;
    let (me, authorization) = (agent.user_id.clone(), bearer(&agent.token));
    tokio::spawn(async move {
        let (mut received, mut answering, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let item = tokio::select! {
                _ = stop.changed() => break,
                item = stream.next() => item,
            };
            let item = match item {
                Some(Ok(item)) => item,
                Some(Err(status)) => {
                    errors.push(format!("agent's stream: {status}"));
                    break;
                }
                None => {
                    errors.push("agent's stream ended".to_owned());
                    break;
                }
            };
            let at = Instant::now();
            if let Some(msg_pb::subscribe_response::Event::MessageCreated(message)) = item.event
                && message.sender_user_id != me
            {
                received.push((message.message_id, at));
                let (mut client, authorization) = (client.clone(), authorization.clone());
                answering.push(tokio::spawn(async move {
                    let mut request = tonic::Request::new(msg_pb::SendMessageRequest {
                        request_id: Uuid::now_v7().to_string(),
                        conversation_id: message.conversation_id,
                        body: BODY.into(),
                    });
                    request
                        .metadata_mut()
                        .insert("authorization", authorization);
                    let at = Instant::now();
                    client
                        .send_message(request)
                        .await
                        .map(|answer| (answer.into_inner().message_id, at))
                }));
            }
        }
        let mut answers = Vec::new();
        for answer in answering {
            match answer.await {
                Ok(Ok(answer)) => answers.push(answer),
                Ok(Err(status)) => errors.push(format!("answer: {status}")),
                Err(err) => errors.push(format!("answer: {err}")),
            }
        }
        (received, answers, errors)
    })
}

/// Why a stream ended: its status, or that it just ended.
fn ended<T>(item: Option<Result<T, tonic::Status>>) -> String {
    match item {
        Some(Err(status)) => format!("visitor's stream: {status}"),
        _ => "visitor's stream ended".to_owned(),
    }
}

/// A visitor's stream, open once it has caught up: when each agent's message arrived, and
/// why the stream failed, if it did.
async fn visitor_stream(
    mut client: VisitorServiceClient<Channel>,
    visit: Visit,
    after: String,
    ready: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> (Vec<(String, Instant)>, Option<String>) {
    let mut received = Vec::new();
    let opened = client
        .subscribe_visit(as_visitor(&visit, pb::SubscribeVisitRequest { after }))
        .await;
    let mut stream = match opened {
        Ok(opened) => opened.into_inner(),
        Err(status) => {
            ready.fetch_add(1, Ordering::SeqCst);
            return (received, Some(format!("SubscribeVisit: {status}")));
        }
    };
    loop {
        match stream.next().await {
            Some(Ok(item)) => {
                if matches!(
                    item.event,
                    Some(pb::subscribe_visit_response::Event::CaughtUp(_))
                ) {
                    break;
                }
            }
            other => {
                ready.fetch_add(1, Ordering::SeqCst);
                return (received, Some(ended(other)));
            }
        }
    }
    ready.fetch_add(1, Ordering::SeqCst);
    loop {
        let item = tokio::select! {
            _ = stop.changed() => return (received, None),
            item = stream.next() => item,
        };
        let item = match item {
            Some(Ok(item)) => item,
            other => return (received, Some(ended(other))),
        };
        let at = Instant::now();
        if let Some(pb::subscribe_visit_response::Event::MessageCreated(message)) = item.event
            && !message.from_visitor
        {
            received.push((message.message_id, at));
        }
    }
}

/// The event counter of the tenant schema `schema`: where its log stands.
async fn head(stack: &TestStack, schema: &str) -> i64 {
    use diesel_async::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Head {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        last_id: i64,
    }
    let head: Head = diesel::sql_query(format!("SELECT last_id FROM {schema}.event_counter"))
        .get_result(&mut stack.db.connect_admin().await)
        .await
        .expect("the tenant's event counter");
    head.last_id
}

/// Every one of `visits` streaming (from the log's present, `schema`'s event counter), every
/// agent streaming and answering, the visitors of `visits` sending at `rate` for `duration`.
async fn deliver(
    stack: &TestStack,
    schema: &str,
    agents: &[Session],
    visits: &[Visit],
    duration: Duration,
    rate: f64,
    postmaster: Option<u32>,
) -> Delivery {
    let after = head(stack, schema).await.to_string();
    // What the stack costs while nothing happens, before any stream is open.
    let meter = Meter::start(postmaster);
    tokio::time::sleep(IDLE).await;
    let idle_before = meter.finish(1);

    let (stop_visitors, visitors_stopped) = watch::channel(false);
    let ready = Arc::new(AtomicUsize::new(0));
    let mut channels = Vec::new();
    for _ in 0..visits.len().div_ceil(STREAMS_PER_CHANNEL) {
        channels.push(stack.webchat.channel(&stack.secrets).await);
    }
    let mut streams = Vec::with_capacity(visits.len());
    for (i, visit) in visits.iter().enumerate() {
        let client = VisitorServiceClient::new(channels[i / STREAMS_PER_CHANNEL].clone());
        streams.push(tokio::spawn(visitor_stream(
            client,
            visit.clone(),
            after.clone(),
            ready.clone(),
            visitors_stopped.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::SeqCst) < visits.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (stop_agents, agents_stopped) = watch::channel(false);
    let mut followers = Vec::with_capacity(agents.len());
    for a in agents {
        followers.push(agent(stack, a, agents_stopped.clone()).await);
    }

    // What the open streams cost while nothing happens.
    let meter = Meter::start(postmaster);
    tokio::time::sleep(IDLE).await;
    let idle = meter.finish(1);

    let senders = visitor_senders(stack, visits).await;
    let sends = load(senders, duration, Some(rate), postmaster).await;
    tokio::time::sleep(GRACE).await;
    let _ = stop_agents.send(true);
    let (mut received, mut answers, mut agent_errors) = (Vec::new(), Vec::new(), Vec::new());
    for follower in followers {
        let (r, a, e) = follower.await.expect("agent");
        received.extend(r);
        answers.extend(a);
        agent_errors.extend(e);
    }
    // The answers sent last have as long to arrive as the visitors' messages had.
    tokio::time::sleep(GRACE).await;
    let _ = stop_visitors.send(true);
    let (mut to_visitors, mut stream_errors) = (Vec::new(), Vec::new());
    for stream in streams {
        let (r, failed) = stream.await.expect("visitor stream");
        to_visitors.extend(r);
        stream_errors.extend(failed);
    }
    let (to_agent, to_agent_lost) = latencies(&sends.sent, &received);
    let (to_visitor, to_visitor_lost) = latencies(&answers, &to_visitors);
    Delivery {
        to_agent,
        to_agent_lost,
        to_visitor,
        to_visitor_lost,
        sends,
        answers: answers.len(),
        agent_errors: agent_errors.len() as u64,
        stream_errors: stream_errors.len() as u64,
        first_error: agent_errors.into_iter().chain(stream_errors).next(),
        idle_before,
        idle,
        streams: visits.len(),
    }
}

/// `p50/p99 ms` of sorted latencies.
fn p50_p99(sorted: &[f64]) -> String {
    format!(
        "{:.1}/{:.1} ms",
        quantile(sorted, 0.5),
        quantile(sorted, 0.99)
    )
}

/// A figure to two places, as far as known.
fn shown(figure: Option<f64>) -> String {
    figure.map_or_else(|| "n/a".to_owned(), |f| format!("{f:.2}"))
}

/// A transaction count per message, as far as known.
fn per_message(transactions: Option<f64>) -> String {
    transactions.map_or_else(|| "n/a".to_owned(), |t| format!("{t:.1}"))
}

/// A PostgreSQL setting of the run's server.
async fn setting(conn: &mut AsyncPgConnection, name: &str) -> String {
    #[derive(diesel::QueryableByName)]
    struct Setting {
        #[diesel(sql_type = diesel::sql_types::Text)]
        value: String,
    }
    diesel_async::RunQueryDsl::get_result::<Setting>(
        diesel::sql_query("SELECT current_setting($1) AS value")
            .bind::<diesel::sql_types::Text, _>(name),
        conn,
    )
    .await
    .map_or_else(|_| "unknown".to_owned(), |s| s.value)
}

/// Runs the scenario with `visits` visits; the visitor and the member send loads run for
/// `duration` each, taking turns `rounds` times; the delivery load runs for `duration` with
/// the first `streams` visits streaming (all when `None`).
pub async fn run(
    visits: usize,
    streams: Option<usize>,
    duration: Duration,
    rounds: u32,
) -> (Vec<Line>, serde_json::Value) {
    let mut stack = TestStack::start().await;
    restart_services(&mut stack).await;
    let tenant = stack.create_tenant("bench").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    stack.set_webchat_feature(&owner, true).await;
    let mut agents = Vec::with_capacity(AGENTS);
    for i in 0..AGENTS {
        let (member, session) = stack
            .create_logged_in_member(
                &tenant,
                &owner,
                &format!("agent-{i}"),
                &format!("agent password {i}"),
            )
            .await;
        agents.push(Session {
            user_id: member.user_id,
            token: session.access_token,
        });
    }
    let widget = widget(&stack, &owner, &agents).await;
    let members = users(&stack, &owner, SENDERS).await;
    let mut client = stack.messaging_client().await;
    let mut pairs = Vec::new();
    for member in &members {
        let conversation = group(&mut client, &owner, vec![member.user_id.clone()]).await;
        pairs.push((conversation, member.token.clone()));
    }
    let mut conn = stack.db.connect().await;
    let postmaster = cpu::postmaster(&mut conn).await;
    let durability = format!(
        "fsync={} synchronous_commit={}",
        setting(&mut conn, "fsync").await,
        setting(&mut conn, "synchronous_commit").await
    );

    // Visits, then their chats.
    let (visits, started) = start_visits(&stack, &widget, visits).await;
    let opened = open_chats(&stack, &visits).await;

    // Visitors' and members' sends, taking turns.
    let mut transactions = Transactions::start(conn).await;
    let rounds = rounds.max(1);
    let turn = duration / rounds;
    let (mut visitor_phases, mut member_phases) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let senders = visitor_senders(&stack, &visits).await;
        visitor_phases.push(transactions.load(senders, turn, postmaster).await);
        let senders = member_senders(&stack, &pairs).await;
        member_phases.push(transactions.load(senders, turn, postmaster).await);
    }
    let round_ratios: Vec<f64> = visitor_phases
        .iter()
        .zip(&member_phases)
        .map(|(v, m)| v.rate() / m.rate())
        .collect();
    let round_rates = |phases: &[Phase]| phases.iter().map(Phase::rate).collect::<Vec<_>>();
    let (round_visitor_rates, round_member_rates) =
        (round_rates(&visitor_phases), round_rates(&member_phases));
    let (visitor, member) = (
        Phase::pooled(&visitor_phases),
        Phase::pooled(&member_phases),
    );
    let (peak, member_peak) = (visitor.rate(), member.rate());
    let ratio = peak / member_peak;
    // Each visit's calls per minute at the peak: the visits take turns evenly.
    let calls_per_visit_minute = peak / visits.len().max(1) as f64 * 60.0;

    // Delivery at half the peak.
    let half = peak / 2.0;
    let streamed = &visits[..streams.unwrap_or(visits.len()).min(visits.len())];
    let schema = format!("t_{}", tenant.id.replace('-', ""));
    let delivery = deliver(
        &stack, &schema, &agents, streamed, duration, half, postmaster,
    )
    .await;
    // Where the load both ways cannot keep up with half the send peak, its own peak is what it
    // reached: delivery is measured again at half of that.
    let chat_peak = delivery.sends.rate();
    let at_chat_half = if chat_peak < SATURATED * half {
        Some(
            deliver(
                &stack,
                &schema,
                &agents,
                streamed,
                duration,
                chat_peak / 2.0,
                postmaster,
            )
            .await,
        )
    } else {
        None
    };
    let (to_agent_p99, to_visitor_p99) = (
        quantile(&delivery.to_agent, 0.99),
        quantile(&delivery.to_visitor, 0.99),
    );
    // The idle phase is one "operation": its CPU time over its length is the cores it kept busy.
    let cores = |us: Option<f64>| us.map(|us| us / 1e6 / IDLE.as_secs_f64());
    let (idle_process, idle_postgres) = (
        cores(delivery.idle.process_us),
        cores(delivery.idle.postgres_us),
    );
    let (none_process, none_postgres) = (
        cores(delivery.idle_before.process_us),
        cores(delivery.idle_before.postgres_us),
    );

    let errors = started.errors
        + opened.errors
        + visitor.errors
        + member.errors
        + delivery.sends.errors
        + delivery.agent_errors
        + delivery.stream_errors
        + at_chat_half
            .as_ref()
            .map_or(0, |d| d.sends.errors + d.agent_errors + d.stream_errors);
    let first_error = [
        &started.first_error,
        &opened.first_error,
        &visitor.first_error,
        &member.first_error,
        &delivery.sends.first_error,
        &delivery.first_error,
        &at_chat_half
            .as_ref()
            .and_then(|d| d.sends.first_error.clone()),
        &at_chat_half.as_ref().and_then(|d| d.first_error.clone()),
    ]
    .into_iter()
    .find_map(Clone::clone);

    let mut lines = vec![
        Line {
            scenario: "webchat",
            metric: format!("visits started, {SENDERS} at a time"),
            value: format!("{:.0}/s", started.rate()),
            baseline: format!("{} visits", started.done),
            target: String::new(),
        },
        Line {
            scenario: "webchat",
            metric: "StartVisit p50/p99".into(),
            value: p50_p99(&started.latencies),
            baseline: String::new(),
            target: String::new(),
        },
        Line {
            scenario: "webchat",
            metric: "first message (opens chat) p50/p99".into(),
            value: p50_p99(&opened.latencies),
            baseline: format!("{:.0}/s", opened.rate()),
            target: String::new(),
        },
        Line {
            scenario: "webchat",
            metric: format!("visitor send peak, {SENDERS} senders"),
            value: format!("{peak:.0}/s"),
            baseline: format!("{member_peak:.0}/s member ({ratio:.2}x)"),
            target: format!(">= {TARGET_RATIO}x"),
        },
        Line {
            scenario: "webchat",
            metric: format!("visitor / member send, {rounds} rounds"),
            value: round_ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            baseline: String::new(),
            target: String::new(),
        },
        Line {
            scenario: "webchat",
            metric: "visitor send p50/p99 at peak".into(),
            value: p50_p99(&visitor.latencies),
            baseline: format!("{} member", p50_p99(&member.latencies)),
            target: String::new(),
        },
        Line {
            scenario: "webchat",
            metric: "CPU per message: bench + PostgreSQL".into(),
            value: visitor.cost.split(),
            baseline: format!("{} member", member.cost.split()),
            target: String::new(),
        },
        Line {
            scenario: "webchat",
            metric: "PostgreSQL transactions / message".into(),
            value: per_message(visitor.transactions),
            baseline: format!("{} member", per_message(member.transactions)),
            target: String::new(),
        },
        Line {
            scenario: "webchat",
            metric: format!("{} idle visitor streams: cores", delivery.streams),
            value: format!("{} + {}", shown(idle_process), shown(idle_postgres)),
            baseline: format!(
                "{} + {} with none",
                shown(none_process),
                shown(none_postgres)
            ),
            target: String::new(),
        },
        Line {
            scenario: "webchat",
            metric: format!("visitor send at half ({:.0}/s)", delivery.sends.rate()),
            value: p50_p99(&delivery.sends.latencies),
            baseline: format!("{half:.0}/s asked"),
            target: String::new(),
        },
        Line {
            scenario: "webchat",
            metric: "visitor -> agent p50/p99".into(),
            value: p50_p99(&delivery.to_agent),
            baseline: format!("{} lost", delivery.to_agent_lost),
            target: format!("p99 <= {TARGET_DELIVERY_MS} ms"),
        },
        Line {
            scenario: "webchat",
            metric: "agent -> visitor p50/p99".into(),
            value: p50_p99(&delivery.to_visitor),
            baseline: format!(
                "{} lost of {} answers",
                delivery.to_visitor_lost, delivery.answers
            ),
            target: format!("p99 <= {TARGET_DELIVERY_MS} ms"),
        },
    ];
    if let Some(d) = &at_chat_half {
        lines.extend([
            Line {
                scenario: "webchat",
                metric: format!(
                    "visitor send at half the chat peak ({:.0}/s)",
                    d.sends.rate()
                ),
                value: p50_p99(&d.sends.latencies),
                baseline: format!("chat peak {chat_peak:.0}/s both ways"),
                target: String::new(),
            },
            Line {
                scenario: "webchat",
                metric: "  visitor -> agent p50/p99".into(),
                value: p50_p99(&d.to_agent),
                baseline: format!("{} lost", d.to_agent_lost),
                target: format!("p99 <= {TARGET_DELIVERY_MS} ms"),
            },
            Line {
                scenario: "webchat",
                metric: "  agent -> visitor p50/p99".into(),
                value: p50_p99(&d.to_visitor),
                baseline: format!("{} lost of {} answers", d.to_visitor_lost, d.answers),
                target: format!("p99 <= {TARGET_DELIVERY_MS} ms"),
            },
        ]);
    }
    if errors > 0 {
        lines.push(Line {
            scenario: "webchat",
            metric: "failed calls and streams".into(),
            value: errors.to_string(),
            baseline: format!("{} visitor streams", delivery.stream_errors),
            target: "none".into(),
        });
        if let Some(error) = &first_error {
            eprintln!("webchat: the first failure: {error}");
        }
    }
    // The delivery target holds at half the peak of the load that delivers: the chat peak
    // where the load both ways could not reach half the send peak.
    let judged = at_chat_half.as_ref().unwrap_or(&delivery);
    let meets_target = errors == 0
        && ratio >= TARGET_RATIO
        && quantile(&judged.to_agent, 0.99) <= TARGET_DELIVERY_MS
        && quantile(&judged.to_visitor, 0.99) <= TARGET_DELIVERY_MS
        && delivery.to_agent_lost == 0
        && delivery.to_visitor_lost == 0
        && judged.to_agent_lost == 0
        && judged.to_visitor_lost == 0;
    let mut json = serde_json::json!({
        "scenario": "webchat", "visits": visits.len(), "agents": AGENTS, "senders": SENDERS,
        "postgres": durability,
        "visits_per_sec": started.rate(), "start_visit_p50_ms": quantile(&started.latencies, 0.5),
        "start_visit_p99_ms": quantile(&started.latencies, 0.99),
        "first_messages_per_sec": opened.rate(),
        "first_message_p50_ms": quantile(&opened.latencies, 0.5),
        "first_message_p99_ms": quantile(&opened.latencies, 0.99),
        "visitor_peak_per_sec": peak, "member_peak_per_sec": member_peak, "ratio": ratio,
        "rounds": rounds, "round_ratios": round_ratios,
        "round_visitor_peaks_per_sec": round_visitor_rates,
        "round_member_peaks_per_sec": round_member_rates,
        "visitor_p50_ms": quantile(&visitor.latencies, 0.5),
        "visitor_p99_ms": quantile(&visitor.latencies, 0.99),
        "member_p50_ms": quantile(&member.latencies, 0.5),
        "member_p99_ms": quantile(&member.latencies, 0.99),
    });
    let more = serde_json::json!({
        "visitor_pg_transactions_per_message": visitor.transactions,
        "member_pg_transactions_per_message": member.transactions,
        "peak_calls_per_visit_per_minute": calls_per_visit_minute,
        "production_calls_per_visitor_per_minute": PRODUCTION_CALLS_PER_VISITOR,
        "streams": delivery.streams,
        "idle_streams_process_cores": idle_process, "idle_streams_postgres_cores": idle_postgres,
        "idle_process_cores": none_process, "idle_postgres_cores": none_postgres,
        "visitor_stream_errors": delivery.stream_errors, "agent_errors": delivery.agent_errors,
        "half_rate_asked_per_sec": half, "half_rate_per_sec": delivery.sends.rate(),
        "half_visitor_p50_ms": quantile(&delivery.sends.latencies, 0.5),
        "half_visitor_p99_ms": quantile(&delivery.sends.latencies, 0.99),
        "to_agent_p50_ms": quantile(&delivery.to_agent, 0.5), "to_agent_p99_ms": to_agent_p99,
        "to_agent_delivered": delivery.to_agent.len(), "to_agent_lost": delivery.to_agent_lost,
        "to_visitor_p50_ms": quantile(&delivery.to_visitor, 0.5),
        "to_visitor_p99_ms": to_visitor_p99,
        "answers": delivery.answers, "to_visitor_lost": delivery.to_visitor_lost,
        "errors": errors, "first_error": first_error, "meets_target": meets_target,
    });
    if let (Some(fields), serde_json::Value::Object(more)) = (json.as_object_mut(), more) {
        fields.extend(more);
        fields.extend(visitor.cost.json("visitor_peak_"));
        fields.extend(member.cost.json("member_peak_"));
        fields.extend(delivery.sends.cost.json("half_"));
        if let Some(d) = &at_chat_half {
            fields.extend(d.sends.cost.json("chat_half_"));
            fields.extend(
                [
                    ("chat_peak_per_sec", serde_json::json!(chat_peak)),
                    ("chat_half_rate_per_sec", serde_json::json!(d.sends.rate())),
                    (
                        "chat_half_to_agent_p50_ms",
                        serde_json::json!(quantile(&d.to_agent, 0.5)),
                    ),
                    (
                        "chat_half_to_agent_p99_ms",
                        serde_json::json!(quantile(&d.to_agent, 0.99)),
                    ),
                    (
                        "chat_half_to_visitor_p50_ms",
                        serde_json::json!(quantile(&d.to_visitor, 0.5)),
                    ),
                    (
                        "chat_half_to_visitor_p99_ms",
                        serde_json::json!(quantile(&d.to_visitor, 0.99)),
                    ),
                    (
                        "chat_half_lost",
                        serde_json::json!(d.to_agent_lost + d.to_visitor_lost),
                    ),
                ]
                .map(|(k, v)| (k.to_owned(), v)),
            );
        }
    }
    (lines, json)
}
