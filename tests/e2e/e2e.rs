//! The whole stack end to end, in both deployment modes, as real separate OS processes driven
//! only through the Rust SDK (`hafen_sdk`):
//!
//! - `dev`: one process, `hafen dev`, which migrates the database itself;
//! - `micro`: six processes `hafen-auth`, `hafen-messaging`, `hafen-tenant`,
//!   `hafen-retention`, `hafen-audit` and `hafen-webchat`, with mutual TLS between them, after
//!   `hafen admin migrate`.
//!
//! Both run the same scenario: an operator creates a tenant; its owner creates two users and
//! their devices; a group conversation with messages both ways and the full history on a
//! second device (OC7); a live subscription that is interrupted and resumed from its cursor
//! with every message exactly once, in order (BX4); an edit and a delete as events; the
//! remote wipe of a device while it streams (OC5); an intact audit chain with the expected
//! events (BX2, BX6); and a retention purge of backdated messages (CB5).
//!
//! The binaries are taken from next to the test executable (`<target>/debug/`): run
//! `cargo build --bins` first (`make test` does). Each process logs to a file in a temporary
//! directory; when a test fails, the tails of those logs are printed and the directory is kept.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hafen_sdk::proto::audit::v1 as audit_pb;
use hafen_sdk::proto::auth::v1 as auth_pb;
use hafen_sdk::proto::common::v1::Role;
use hafen_sdk::proto::messaging::v1 as pb;
use hafen_sdk::proto::retention::v1 as retention_pb;
use hafen_sdk::proto::tenant::v1 as tenant_pb;
use hafen_sdk::{Config, Endpoints, Error, Hafen, Login, Subscription};
use hafen_testkit::{Service, TestDatabase, TestSecrets};
use rustix::process::{Pid, Signal, kill_process};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Longest wait for every service of a stack to answer its health check.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Start-ups tried when a port picked as free was taken meanwhile.
const START_ATTEMPTS: usize = 3;
/// Longest wait for `hafen admin migrate`.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a process to exit after SIGTERM (the drain is 2 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for one event of a subscription.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for the audit relays to deliver the expected events.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for a purge run to finish.
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The whole scenario, once the stack is up.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of each log printed when a test fails.
const TAIL_LINES: usize = 40;

/// The owner's password (never printed).
const OWNER_PASSWORD: &str = "owner password for e2e";
/// Alice's password (never printed).
const ALICE_PASSWORD: &str = "alice password for e2e";
/// Bob's password (never printed).
const BOB_PASSWORD: &str = "bob password for e2e";

/// How the stack is deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `hafen dev`: all six services in one process.
    Dev,
    /// One process per service.
    Micro,
}

impl Mode {
    fn slug(self) -> &'static str {
        match self {
            Mode::Dev => "e2e-dev",
            Mode::Micro => "e2e-micro",
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_dev_mode_the_whole_stack_in_one_process() {
    run(Mode::Dev).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_microservices_mode_six_processes_with_mutual_tls() {
    run(Mode::Micro).await;
}

/// BX5 at the most verbose levels an operator might set: the whole stack in one process at
/// `HAFEN_LOG=debug,tokio_postgres=trace` through logins, a send and a remote wipe. No line
/// carries a password, token, chat code, message body or a statement's bind parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bx5_at_debug_and_trace_levels_no_secret_reaches_the_logs() {
    let secrets = TestSecrets::generate();
    let db = TestDatabase::create_empty().await;
    let mut stack =
        Stack::start_logging(Mode::Dev, &secrets, &db, Some("debug,tokio_postgres=trace")).await;
    let config = stack.config(&secrets);
    let mut secret_values: Vec<String> = vec![
        OWNER_PASSWORD.into(),
        ALICE_PASSWORD.into(),
        secrets.platform_token().into(),
    ];
    let body = format!("bx5 body {}", uuid::Uuid::new_v4().simple());
    let scenario = async {
        let operator = Hafen::connect(config.clone()).expect("SDK configuration");
        operator.act_as_operator(secrets.platform_token());
        let answer = operator
            .tenant()
            .create_tenant(tenant_pb::CreateTenantRequest {
                slug: "bx5-debug".into(),
                display_name: "Debug Logging".into(),
                owner_username: "owner".into(),
                owner_display_name: "The Owner".into(),
                owner_password: OWNER_PASSWORD.into(),
                dpa_version: "2025-01".into(),
                region: "eu-central".into(),
                ..Default::default()
            })
            .await;
        let created = ok(&operator, answer, "CreateTenant").await;
        secret_values.push(created.owner_chat_code.clone());
        let owner = device(
            &config,
            "bx5-debug",
            "owner",
            OWNER_PASSWORD,
            &created.owner_chat_code,
        )
        .await;
        let alice = create_user(&owner, "alice", "Alice", ALICE_PASSWORD).await;
        let code = issue_chat_code(&owner, &alice, "alice phone").await;
        secret_values.push(code.clone());
        let phone = device(&config, "bx5-debug", "alice", ALICE_PASSWORD, &code).await;
        for hafen in [&owner, &phone] {
            let session = hafen.session().expect("logged in");
            let token = session.access_token().to_owned();
            // The secret part, and the whole token.
            secret_values.push(token.split('.').nth(1).unwrap_or_default().to_owned());
            secret_values.push(token);
        }
        let answer = owner
            .messaging()
            .create_conversation(pb::CreateConversationRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                kind: pb::ConversationKind::Group as i32,
                title: "Debug".into(),
                member_user_ids: vec![alice.clone()],
            })
            .await;
        let conversation = ok(&owner, answer, "CreateConversation")
            .await
            .conversation_id;
        send(&phone, &conversation, &body).await;
        let history = owner.history(&conversation, 10).await.expect("history");
        assert!(history.iter().any(|m| m.body == body));
        let mut events = phone.subscribe(None);
        caught_up(&mut events).await;
        // A website visitor: their token, address, browser, page and what they give must not
        // reach the logs either (CB8).
        let owner_token = owner
            .session()
            .expect("logged in")
            .access_token()
            .to_owned();
        let visitor_values =
            webchat_visit(&secrets, stack.port(Service::Webchat), &owner, &owner_token).await;
        secret_values.extend(visitor_values);
        let answer = owner
            .auth()
            .revoke_chat_code(auth_pb::RevokeChatCodeRequest {
                chat_code_id: phone.session().expect("logged in").chat_code_id,
            })
            .await;
        ok(&owner, answer, "RevokeChatCode").await;
        loop {
            match tokio::time::timeout(EVENT_TIMEOUT, events.next()).await {
                Ok(Some(Ok(_))) => continue,
                Ok(_) => break,
                Err(_) => panic!("the wiped phone's stream did not end"),
            }
        }
    };
    tokio::time::timeout(SCENARIO_TIMEOUT, scenario)
        .await
        .expect("the scenario finished in time");
    stack.stop().await;

    let log = std::fs::read_to_string(stack.log_dir().join("hafen-dev.log")).expect("the log");
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.iter().filter(|l| l.contains("\"DEBUG\"")).count() > 10,
        "the stack logged at debug level"
    );
    for line in &lines {
        for secret in &secret_values {
            assert!(
                !line.contains(secret.as_str()),
                "a secret in the log: {line}"
            );
        }
        assert!(!line.contains(&body), "a message body in the log: {line}");
        assert!(
            !line.contains("with parameters"),
            "a statement's bind parameters in the log: {line}"
        );
    }
}

/// A visit of a website-chat widget the owner creates on the webchat service at `port`, as a
/// browser makes it; returns what must never be logged (the visitor's token, address, browser,
/// page, e-mail address and message).
async fn webchat_visit(
    secrets: &TestSecrets,
    port: u16,
    owner: &Hafen,
    owner_token: &str,
) -> Vec<String> {
    use hafen_proto::webchat::v1 as web_pb;
    use hafen_proto::webchat::v1::visitor_service_client::VisitorServiceClient;
    use hafen_proto::webchat::v1::widget_service_client::WidgetServiceClient;

    owner
        .set_webchat_feature(true)
        .await
        .expect("the webchat feature");
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("endpoint")
        .tls_config(secrets.client_tls(None))
        .expect("tls")
        .connect()
        .await
        .expect("the webchat service");
    let mut create = tonic::Request::new(web_pb::CreateWidgetRequest {
        settings: Some(web_pb::WidgetSettings {
            name: "Shop".into(),
            allowed_origins: vec!["https://shop.example.com".into()],
            privacy_policy_url: "https://shop.example.com/privacy".into(),
            pre_chat_fields: vec![web_pb::PreChatField {
                key: "email".into(),
                label: "E-mail".into(),
                personal: true,
                purpose: "To answer by e-mail".into(),
                required: false,
            }],
            ..Default::default()
        }),
        enabled: true,
        consent_text: "We store what you give us to answer you.".into(),
        request_id: String::new(),
        ..Default::default()
    });
    create.metadata_mut().insert(
        "authorization",
        format!("Bearer {owner_token}").parse().expect("metadata"),
    );
    let widget = WidgetServiceClient::new(channel.clone())
        .create_widget(create)
        .await
        .expect("CreateWidget")
        .into_inner();
    const ADDRESS: &str = "198.51.100.73";
    const AGENT: &str = "Mozilla/5.0 BrowserOfVisitor/77";
    const PAGE: &str = "https://shop.example.com/visitor-page-bx5";
    /// `message` as a browser on the shop's pages sends it, with the visitor's `token`.
    fn with<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let headers = request.metadata_mut();
        for (name, value) in [
            ("origin", "https://shop.example.com".to_owned()),
            ("user-agent", AGENT.to_owned()),
            ("referer", PAGE.to_owned()),
            ("x-forwarded-for", ADDRESS.to_owned()),
        ] {
            headers.insert(name, value.parse().expect("metadata"));
        }
        if let Some(token) = token {
            headers.insert(
                "authorization",
                format!("Visitor {token}").parse().expect("metadata"),
            );
        }
        request
    }
    let mut visitors = VisitorServiceClient::new(channel);
    let visit = visitors
        .start_visit(with(
            None,
            web_pb::StartVisitRequest {
                widget_id: widget.widget_id.clone(),
                visitor_token: String::new(),
                ..Default::default()
            },
        ))
        .await
        .expect("StartVisit")
        .into_inner();
    let token = visit.visitor_token.clone();
    visitors
        .give_consent(with(
            Some(&token),
            web_pb::GiveConsentRequest {
                version: 1,
                granted: true,
                ..Default::default()
            },
        ))
        .await
        .expect("GiveConsent");
    let email = "visitor-bx5@example.eu";
    visitors
        .submit_fields(with(
            Some(&token),
            web_pb::SubmitFieldsRequest {
                fields: vec![web_pb::FieldValue {
                    key: "email".into(),
                    value: email.into(),
                    released: true,
                }],
            },
        ))
        .await
        .expect("SubmitFields");
    // No agent: refused, and logged without anything of the visitor.
    let message = "visitor bx5 message text";
    let refused = visitors
        .send_visitor_message(with(
            Some(&token),
            web_pb::SendVisitorMessageRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                body: message.into(),
            },
        ))
        .await;
    assert!(refused.is_err(), "no agent takes the chat");
    visitors
        .get_my_data(with(Some(&token), web_pb::GetMyDataRequest {}))
        .await
        .expect("GetMyData");
    visitors
        .delete_my_data(with(Some(&token), web_pb::DeleteMyDataRequest {}))
        .await
        .expect("DeleteMyData");
    let secret = token.rsplit('.').next().unwrap_or_default().to_owned();
    vec![
        token,
        secret,
        ADDRESS.into(),
        AGENT.into(),
        PAGE.into(),
        email.into(),
        message.into(),
    ]
}

async fn run(mode: Mode) {
    let secrets = TestSecrets::generate();
    // Empty: the stack migrates it (`hafen dev` itself, or `hafen admin migrate`).
    let db = TestDatabase::create_empty().await;
    let mut stack = Stack::start(mode, &secrets, &db).await;
    let config = stack.config(&secrets);
    tokio::time::timeout(
        SCENARIO_TIMEOUT,
        scenario(&config, &secrets, &db, mode.slug()),
    )
    .await
    .unwrap_or_else(|_| panic!("the {mode:?} scenario did not finish within {SCENARIO_TIMEOUT:?}"));
    stack.stop().await;
}

// --- the scenario ------------------------------------------------------------------------

/// What a subscription delivered, in a form that compares well.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Created(String),
    Edited { id: String, body: String },
    Deleted { id: String, body: String },
    Other(String),
}

async fn scenario(config: &Config, secrets: &TestSecrets, db: &TestDatabase, slug: &str) {
    // The operator creates the tenant with the platform token.
    let operator = Hafen::connect(config.clone()).expect("SDK configuration");
    operator.act_as_operator(secrets.platform_token());
    let answer = operator
        .tenant()
        .create_tenant(tenant_pb::CreateTenantRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            slug: slug.to_owned(),
            display_name: "End-to-end Organisation".to_owned(),
            owner_username: "owner".to_owned(),
            owner_display_name: "The Owner".to_owned(),
            owner_password: OWNER_PASSWORD.to_owned(),
            dpa_version: "2025-01".to_owned(),
            region: "eu-central".to_owned(),
            database: String::new(),
        })
        .await;
    let created = ok(&operator, answer, "CreateTenant").await;
    let tenant_id = created
        .tenant
        .as_ref()
        .map(|t| t.tenant_id.clone())
        .expect("CreateTenant returns the tenant");
    assert!(!created.owner_chat_code.is_empty(), "the first chat code");

    // The owner logs in with the first chat code, creates two users and their chat codes.
    let owner = device(
        config,
        slug,
        "owner",
        OWNER_PASSWORD,
        &created.owner_chat_code,
    )
    .await;
    assert_eq!(
        owner.session().expect("logged in").user_id,
        created.owner_user_id
    );
    let alice = create_user(&owner, "alice", "Alice", ALICE_PASSWORD).await;
    let bob = create_user(&owner, "bob", "Bob", BOB_PASSWORD).await;
    let alice_laptop_code = issue_chat_code(&owner, &alice, "alice laptop").await;
    let alice_phone_code = issue_chat_code(&owner, &alice, "alice phone").await;
    let bob_code = issue_chat_code(&owner, &bob, "bob laptop").await;

    // Alice on two devices, Bob on one. The phone counts its wipes.
    let laptop = device(config, slug, "alice", ALICE_PASSWORD, &alice_laptop_code).await;
    let phone = Hafen::connect(config.clone()).expect("SDK configuration");
    let wipes = Arc::new(AtomicUsize::new(0));
    let counted = wipes.clone();
    phone.on_wipe(move || {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    login(&phone, slug, "alice", ALICE_PASSWORD, &alice_phone_code).await;
    let bob_device = device(config, slug, "bob", BOB_PASSWORD, &bob_code).await;
    let laptop_session = laptop.session().expect("logged in");
    let phone_session = phone.session().expect("logged in");
    assert_eq!(laptop_session.user_id, alice);
    assert_eq!(phone_session.user_id, alice);
    assert_ne!(
        laptop_session.chat_code_id, phone_session.chat_code_id,
        "one chat code per device"
    );
    assert_eq!(laptop_session.tenant_id, tenant_id);

    // A group with Alice and Bob (the owner, who creates it, is a member too); messages both
    // ways.
    let answer = owner
        .messaging()
        .create_conversation(pb::CreateConversationRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            kind: pb::ConversationKind::Group as i32,
            title: "Project".to_owned(),
            member_user_ids: vec![alice.clone(), bob.clone()],
        })
        .await;
    let conversation = ok(&owner, answer, "CreateConversation")
        .await
        .conversation_id;
    let mut sent = Vec::new();
    for (from, body) in [
        (&laptop, "hello from alice's laptop"),
        (&bob_device, "hello alice, bob here"),
        (&laptop, "how is the project going?"),
        (&bob_device, "fine, the draft is ready"),
    ] {
        sent.push(send(from, &conversation, body).await);
    }
    assert_eq!(sent[1].sender_user_id, bob);
    assert_eq!(sent[2].sender_user_id, alice);
    let listed = bob_device
        .conversations()
        .await
        .expect("Bob's conversations");
    assert!(
        listed.iter().any(|c| c.conversation_id == conversation),
        "Bob sees the group"
    );

    // Alice's second device sees the whole history, in order (OC7).
    let on_phone = phone.history(&conversation, 100).await.expect("history");
    assert_eq!(ids(&on_phone), ids(&sent), "the phone has the full history");
    assert_eq!(bodies(&on_phone), bodies(&sent));
    assert!(
        on_phone.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "in sequence order"
    );

    // The laptop follows live events (BX4)…
    let mut live = laptop.subscribe(None);
    let mut cursor = caught_up(&mut live).await;
    send(&bob_device, &conversation, "live: first").await;
    send(&phone, &conversation, "live: second, from the phone").await;
    for expected in ["live: first", "live: second, from the phone"] {
        let (change, at) = next_change(&mut live).await;
        assert_eq!(change, Change::Created(expected.to_owned()));
        cursor = at;
    }
    // …is interrupted, and resumes from its cursor: what was sent meanwhile arrives once, in
    // order, before what follows.
    drop(live);
    let away_edited = send(&bob_device, &conversation, "while away: one").await;
    send(&phone, &conversation, "while away: two").await;
    let mut live = laptop.subscribe(Some(cursor));
    send(&bob_device, &conversation, "back: three").await;

    let mut resumed = Vec::new();
    for _ in 0..3 {
        resumed.push(next_change(&mut live).await.0);
    }
    assert_eq!(
        resumed,
        ["while away: one", "while away: two", "back: three"].map(|b| Change::Created(b.into())),
        "after resuming: each message exactly once, in order"
    );

    // An edit and a delete arrive as events, next on the same stream (nothing repeated before
    // them). They come after the replay on purpose: a replay shows messages as they are now.
    let answer = bob_device
        .messaging()
        .edit_message(pb::EditMessageRequest {
            message_id: away_edited.message_id.clone(),
            body: "while away: one (edited)".to_owned(),
        })
        .await;
    let edited = ok(&bob_device, answer, "EditMessage").await;
    assert!(edited.edit_time.is_some());
    let deleted_id = sent[1].message_id.clone();
    let answer = bob_device
        .messaging()
        .delete_message(pb::DeleteMessageRequest {
            message_id: deleted_id.clone(),
        })
        .await;
    let tombstone = ok(&bob_device, answer, "DeleteMessage").await;
    assert!(tombstone.body.is_empty() && tombstone.delete_time.is_some());
    let mut changed = Vec::new();
    for _ in 0..2 {
        changed.push(next_change(&mut live).await.0);
    }
    assert_eq!(
        changed,
        [
            Change::Edited {
                id: away_edited.message_id.clone(),
                body: "while away: one (edited)".to_owned(),
            },
            Change::Deleted {
                id: deleted_id.clone(),
                body: String::new(),
            },
        ]
    );
    // The deleted body is gone from the history; the edit is there.
    let history = laptop.history(&conversation, 100).await.expect("history");
    assert!(
        history.iter().all(|m| m.body != "hello alice, bob here"),
        "the deleted body is gone"
    );
    let gone = history
        .iter()
        .find(|m| m.message_id == deleted_id)
        .expect("the tombstone stays in the history");
    assert!(gone.body.is_empty() && gone.delete_time.is_some());
    assert!(
        history
            .iter()
            .any(|m| m.message_id == away_edited.message_id
                && m.body == "while away: one (edited)")
    );

    // Remote wipe of the phone while it streams (OC5).
    let mut phone_events = phone.subscribe(None);
    caught_up(&mut phone_events).await;
    let answer = owner
        .auth()
        .revoke_chat_code(auth_pb::RevokeChatCodeRequest {
            chat_code_id: phone_session.chat_code_id.clone(),
        })
        .await;
    ok(&owner, answer, "RevokeChatCode").await;
    let ended = loop {
        match tokio::time::timeout(EVENT_TIMEOUT, phone_events.next()).await {
            Err(_) => panic!("the wiped phone's stream did not end within {EVENT_TIMEOUT:?}"),
            Ok(None) => panic!("the wiped phone's stream ended without an error"),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(err))) => break err,
        }
    };
    assert!(matches!(ended, Error::Wiped), "{ended:?}");
    assert_eq!(wipes.load(Ordering::SeqCst), 1, "the wipe handler ran once");
    assert!(phone.is_wiped());
    assert!(phone.session().is_none(), "the phone forgot its tokens");
    let refused = phone.conversations().await.expect_err("a wiped device");
    assert!(matches!(refused, Error::Wiped), "{refused:?}");
    assert_eq!(refused.reason(), Some("DEVICE_WIPED"));
    let refused = phone
        .send_message(&conversation, "from a wiped phone")
        .await
        .expect_err("a wiped device");
    assert!(matches!(refused, Error::Wiped), "{refused:?}");
    assert!(
        tokio::time::timeout(EVENT_TIMEOUT, phone_events.next())
            .await
            .expect("the stream ends")
            .is_none(),
        "nothing follows the wipe"
    );
    drop(phone_events);
    // The laptop keeps working: its stream goes on and it sends.
    send(&bob_device, &conversation, "after the wipe").await;
    assert_eq!(
        next_change(&mut live).await.0,
        Change::Created("after the wipe".to_owned())
    );
    send(&laptop, &conversation, "the laptop still works").await;
    assert_eq!(
        next_change(&mut live).await.0,
        Change::Created("the laptop still works".to_owned())
    );
    drop(live);
    // The server knows: the phone's code is wiped (confirmed by the SDK), the laptop's active.
    let answer = owner
        .auth()
        .list_chat_codes(auth_pb::ListChatCodesRequest {
            user_id: alice.clone(),
            ..Default::default()
        })
        .await;
    let codes = ok(&owner, answer, "ListChatCodes").await.chat_codes;
    let state = |id: &str| {
        codes
            .iter()
            .find(|c| c.chat_code_id == id)
            .map(|c| c.state)
            .expect("the chat code is listed")
    };
    assert_eq!(
        state(&phone_session.chat_code_id),
        auth_pb::ChatCodeState::Wiped as i32
    );
    assert_eq!(
        state(&laptop_session.chat_code_id),
        auth_pb::ChatCodeState::Active as i32
    );

    // The tenant's audit chain has the events (the relays deliver asynchronously) and is
    // intact; no event carries message content.
    let events = audit_events(
        &owner,
        &[
            "auth.login.succeeded",
            "auth.user.created",
            "auth.chat_code.issued",
            "auth.chat_code.revoked",
            "auth.wipe.confirmed",
        ],
    )
    .await;
    let logins = events
        .iter()
        .filter(|e| e.action == "auth.login.succeeded")
        .count();
    assert!(
        logins >= 4,
        "owner, laptop, phone and Bob logged in: {logins}"
    );
    for event in &events {
        for value in event.attributes.values().chain([&event.target_id]) {
            assert!(
                !value.contains("hello") && !value.contains("while away"),
                "{} carries message content",
                event.action
            );
        }
    }
    let answer = owner
        .audit()
        .verify_chain(audit_pb::VerifyChainRequest::default())
        .await;
    let verified = ok(&owner, answer, "VerifyChain").await;
    assert!(verified.intact, "the audit chain is intact: {verified:?}");
    assert_eq!(verified.first_broken_sequence, 0);
    assert!(
        verified.events_checked >= events.len() as u64,
        "{} events checked, {} listed",
        verified.events_checked,
        events.len()
    );

    // Retention (CB5): one day for the group; three messages made two days old are purged,
    // the rest stays.
    let answer = owner
        .retention()
        .set_conversation_policy(retention_pb::SetConversationPolicyRequest {
            conversation_id: conversation.clone(),
            retention_days: 1,
        })
        .await;
    let policy = ok(&owner, answer, "SetConversationPolicy").await;
    assert_eq!(policy.effective_retention_days, 1);
    let before = laptop.history(&conversation, 500).await.expect("history");
    let old = [&sent[0], &sent[2], &sent[3]].map(|m| m.message_id.clone());
    assert_eq!(backdate(db, &tenant_id, &old, 2).await, old.len());
    let run = purge(&owner).await;
    assert_eq!(
        run.messages_deleted,
        old.len() as u64,
        "the backdated messages were purged"
    );
    assert_eq!(run.conversations_touched, 1);
    assert_eq!(run.trigger, retention_pb::PurgeTrigger::Manual as i32);
    assert_eq!(run.triggered_by_user_id, created.owner_user_id);
    let after = laptop.history(&conversation, 500).await.expect("history");
    let expected: Vec<String> = ids(&before)
        .into_iter()
        .filter(|id| !old.contains(id))
        .collect();
    assert_eq!(
        ids(&after),
        expected,
        "the old messages are gone, the new stay"
    );
    assert!(after.len() >= 8, "new messages remain: {}", after.len());
    // The retention service's events reach the chain too, which stays intact.
    audit_events(
        &owner,
        &[
            "retention.conversation_policy.updated",
            "retention.purge.completed",
        ],
    )
    .await;
    let answer = owner
        .audit()
        .verify_chain(audit_pb::VerifyChainRequest::default())
        .await;
    let verified = ok(&owner, answer, "VerifyChain").await;
    assert!(verified.intact, "the audit chain is intact: {verified:?}");

    owner.logout().await.expect("logout");
}

/// Unwraps an answer of a typed client (acting on a wipe signal in it), naming the call.
async fn ok<T>(hafen: &Hafen, answer: Result<tonic::Response<T>, tonic::Status>, call: &str) -> T {
    hafen
        .check(answer)
        .await
        .unwrap_or_else(|err| panic!("{call}: {err}"))
}

async fn login(hafen: &Hafen, slug: &str, username: &str, password: &str, chat_code: &str) {
    hafen
        .login(Login {
            tenant: slug.to_owned(),
            username: username.to_owned(),
            password: password.to_owned(),
            chat_code: chat_code.to_owned(),
            device_label: String::new(),
        })
        .await
        .unwrap_or_else(|err| panic!("login of {username}: {err}"));
}

/// A device logged in as `username`.
async fn device(
    config: &Config,
    slug: &str,
    username: &str,
    password: &str,
    chat_code: &str,
) -> Hafen {
    let hafen = Hafen::connect(config.clone()).expect("SDK configuration");
    login(&hafen, slug, username, password, chat_code).await;
    hafen
}

/// A member with a password; returns the user id.
async fn create_user(owner: &Hafen, username: &str, name: &str, password: &str) -> String {
    let answer = owner
        .auth()
        .create_user(auth_pb::CreateUserRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            username: username.to_owned(),
            display_name: name.to_owned(),
            role: Role::Member as i32,
            credential: Some(auth_pb::create_user_request::Credential::Password(
                password.to_owned(),
            )),
        })
        .await;
    ok(owner, answer, "CreateUser").await.user_id
}

/// A fresh chat code for one more device of `user_id`.
async fn issue_chat_code(owner: &Hafen, user_id: &str, label: &str) -> String {
    let answer = owner
        .auth()
        .issue_chat_code(auth_pb::IssueChatCodeRequest {
            user_id: user_id.to_owned(),
            device_label: label.to_owned(),
        })
        .await;
    ok(owner, answer, "IssueChatCode").await.code
}

async fn send(from: &Hafen, conversation: &str, body: &str) -> pb::Message {
    from.send_message(conversation, body)
        .await
        .unwrap_or_else(|err| panic!("sending {body:?}: {err}"))
}

fn ids(messages: &[pb::Message]) -> Vec<String> {
    messages.iter().map(|m| m.message_id.clone()).collect()
}

fn bodies(messages: &[pb::Message]) -> Vec<&str> {
    messages.iter().map(|m| m.body.as_str()).collect()
}

/// The next event of `events`, in time.
async fn next_event(events: &mut Subscription) -> pb::SubscribeResponse {
    tokio::time::timeout(EVENT_TIMEOUT, events.next())
        .await
        .unwrap_or_else(|_| panic!("no event within {EVENT_TIMEOUT:?}"))
        .expect("the subscription goes on")
        .unwrap_or_else(|err| panic!("the subscription failed: {err}"))
}

/// Waits for the end of the replay of a new subscription; returns its cursor.
async fn caught_up(events: &mut Subscription) -> String {
    let event = next_event(events).await;
    assert!(
        matches!(
            event.event,
            Some(pb::subscribe_response::Event::CaughtUp(_))
        ),
        "a new subscription first says it caught up: {:?}",
        event.event
    );
    event.cursor
}

/// The next change (anything but the caught-up marker) and its cursor.
async fn next_change(events: &mut Subscription) -> (Change, String) {
    use pb::subscribe_response::Event;
    loop {
        let event = next_event(events).await;
        let change = match event.event {
            Some(Event::CaughtUp(_)) => continue,
            Some(Event::MessageCreated(m)) => Change::Created(m.body),
            Some(Event::MessageEdited(m)) => Change::Edited {
                id: m.message_id,
                body: m.body,
            },
            Some(Event::MessageDeleted(m)) => Change::Deleted {
                id: m.message_id,
                body: m.body,
            },
            other => Change::Other(format!("{other:?}")),
        };
        assert!(!event.cursor.is_empty(), "every change has a cursor");
        return (change, event.cursor);
    }
}

/// The tenant's audit events once all `actions` are among them.
async fn audit_events(owner: &Hafen, actions: &[&str]) -> Vec<audit_pb::AuditEvent> {
    let deadline = Instant::now() + AUDIT_TIMEOUT;
    loop {
        let answer = owner
            .audit()
            .list_events(audit_pb::ListEventsRequest {
                page_size: 500,
                oldest_first: true,
                ..Default::default()
            })
            .await;
        let events = ok(owner, answer, "ListEvents").await.events;
        let seen: BTreeSet<&str> = events.iter().map(|e| e.action.as_str()).collect();
        let missing: Vec<&str> = actions
            .iter()
            .copied()
            .filter(|a| !seen.contains(a))
            .collect();
        if missing.is_empty() {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "audit events missing after {AUDIT_TIMEOUT:?}: {missing:?} (seen: {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Makes messages `ids` of the tenant `days` older, straight in the database. The
/// application role reaches tenant data only in the tenant's role (see `hafen_store::tenancy`).
async fn backdate(db: &TestDatabase, tenant_id: &str, ids: &[String], days: u32) -> usize {
    use diesel_async::{RunQueryDsl, SimpleAsyncConnection};

    let schema = format!(
        "t_{}",
        uuid::Uuid::parse_str(tenant_id)
            .expect("the tenant id is a UUID")
            .simple()
    );
    let list = ids
        .iter()
        .map(|id| {
            let id = uuid::Uuid::parse_str(id).expect("message ids are UUIDs");
            format!("'{id}'")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut conn = db.connect().await;
    conn.batch_execute(&format!(
        "BEGIN; SET LOCAL ROLE {schema}; SET LOCAL search_path TO {schema}"
    ))
    .await
    .expect("enter the tenant's scope");
    let updated = diesel::sql_query(format!(
        "UPDATE messages SET created_at = created_at - interval '{days} days' \
         WHERE id IN ({list})"
    ))
    .execute(&mut conn)
    .await
    .expect("backdate messages");
    conn.batch_execute("COMMIT").await.expect("commit");
    updated
}

/// Starts a purge of the owner's tenant and waits until it succeeded.
async fn purge(owner: &Hafen) -> retention_pb::PurgeRun {
    let answer = owner
        .retention()
        .run_purge(retention_pb::RunPurgeRequest {})
        .await;
    if let Err(status) = &answer {
        assert_ne!(
            status.code(),
            tonic::Code::Unimplemented,
            "RetentionService.RunPurge is not implemented yet"
        );
    }
    let started = ok(owner, answer, "RunPurge").await;
    assert!(!started.purge_run_id.is_empty());
    let deadline = Instant::now() + PURGE_TIMEOUT;
    loop {
        let answer = owner
            .retention()
            .list_purge_runs(retention_pb::ListPurgeRunsRequest::default())
            .await;
        let runs = ok(owner, answer, "ListPurgeRuns").await.purge_runs;
        let run = runs
            .into_iter()
            .find(|r| r.purge_run_id == started.purge_run_id)
            .expect("the started run is listed");
        match retention_pb::PurgeRunState::try_from(run.state) {
            Ok(retention_pb::PurgeRunState::Succeeded) => return run,
            Ok(retention_pb::PurgeRunState::Running) => {}
            other => panic!("the purge run ended as {other:?}: {run:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "the purge did not finish within {PURGE_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// --- the processes -----------------------------------------------------------------------

/// One child process and the file it logs to.
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

/// Why a stack did not come up.
struct StartFailure {
    message: String,
    /// A port picked as free was taken meanwhile: trying again with others may help.
    port_in_use: bool,
}

/// A running stack: its processes, the services' ports (in the order of [`Service::ALL`]) and
/// the logs. Dropping it kills the processes; during a panic it first prints the logs' tails
/// and keeps their directory.
struct Stack {
    mode: Mode,
    ports: [u16; 6],
    processes: Vec<Process>,
    logs: Option<tempfile::TempDir>,
    /// `HAFEN_LOG` of the processes, when not their default (`info`).
    log_filter: Option<&'static str>,
}

impl Stack {
    /// Starts the stack of `mode` on `db`, trying other ports when one was taken meanwhile.
    async fn start(mode: Mode, secrets: &TestSecrets, db: &TestDatabase) -> Self {
        Self::start_logging(mode, secrets, db, None).await
    }

    /// [`Stack::start`] with the processes logging at `log_filter` (`HAFEN_LOG`), as JSON.
    async fn start_logging(
        mode: Mode,
        secrets: &TestSecrets,
        db: &TestDatabase,
        log_filter: Option<&'static str>,
    ) -> Self {
        for attempt in 1..=START_ATTEMPTS {
            let mut stack = Stack {
                mode,
                ports: free_ports(),
                processes: Vec::new(),
                logs: Some(tempfile::tempdir().expect("a directory for the logs")),
                log_filter,
            };
            match mode {
                Mode::Dev => stack.spawn_dev(secrets, db),
                Mode::Micro => {
                    stack.migrate(db).await;
                    stack.spawn_micro(secrets, db);
                }
            }
            match stack.wait_until_serving(secrets).await {
                Ok(()) => return stack,
                Err(failure) if failure.port_in_use && attempt < START_ATTEMPTS => {
                    eprintln!(
                        "{mode:?} stack: {}; starting again on other ports",
                        failure.message
                    );
                    stack.kill().await;
                }
                Err(failure) => panic!("the {mode:?} stack did not start: {}", failure.message),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn log_dir(&self) -> &Path {
        self.logs.as_ref().expect("the log directory").path()
    }

    fn port(&self, service: Service) -> u16 {
        let index = Service::ALL
            .iter()
            .position(|s| *s == service)
            .expect("one of the five");
        self.ports[index]
    }

    /// The SDK's configuration for this stack.
    fn config(&self, secrets: &TestSecrets) -> Config {
        let at = |service| format!("https://127.0.0.1:{}", self.port(service));
        Config {
            endpoints: Endpoints {
                auth: at(Service::Auth),
                messaging: at(Service::Messaging),
                tenant: at(Service::Tenant),
                retention: at(Service::Retention),
                audit: at(Service::Audit),
                webchat: at(Service::Webchat),
            },
            ca_pem: Some(secrets.ca_pem().as_bytes().to_vec()),
            server_name: Some("localhost".to_owned()),
            timeout: Duration::from_secs(10),
        }
    }

    /// A command for `binary` that logs to `<name>.log`, runs in the log directory, and sees
    /// none of this process's `HAFEN_*` settings: only `urls` (database and Redis URLs, which
    /// may carry passwords, so they go in the environment rather than on the command line).
    fn command(&self, binary: &str, name: &str, urls: &[(&str, &str)]) -> (Command, PathBuf) {
        let log = self.log_dir().join(format!("{name}.log"));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("create a log file");
        let mut command = Command::new(binary_path(binary));
        command
            .current_dir(self.log_dir())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("duplicate the log file"))
            .stderr(file)
            .kill_on_drop(true);
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if key_text.starts_with("HAFEN_") || key_text.starts_with("OTEL_") {
                command.env_remove(&key);
            }
        }
        command.envs(urls.iter().copied());
        if let Some(filter) = self.log_filter {
            command
                .env("HAFEN_LOG", filter)
                .env("HAFEN_LOG_FORMAT", "json");
        }
        if let Some(ca) = &hafen_testkit::TestEnv::get().redis_ca {
            command.env("HAFEN_REDIS_CA", ca);
        }
        (command, log)
    }

    fn spawn(&mut self, name: &str, mut command: Command, log: PathBuf) {
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("starting {name}: {err}"));
        self.processes.push(Process {
            name: name.to_owned(),
            child,
            log,
        });
    }

    fn spawn_dev(&mut self, secrets: &TestSecrets, db: &TestDatabase) {
        let redis = secrets.redis_args();
        let (mut command, log) = self.command(
            "hafen",
            "hafen-dev",
            &[
                ("HAFEN_DATABASE_URL", db.url()),
                ("HAFEN_KEYSTORE_URL", db.keystore().url()),
                ("HAFEN_REDIS_URL", &redis.redis_url),
            ],
        );
        let mut args: Vec<OsString> = vec!["dev".into(), "--host".into(), "127.0.0.1".into()];
        for (flag, service) in [
            ("--auth-port", Service::Auth),
            ("--messaging-port", Service::Messaging),
            ("--tenant-port", Service::Tenant),
            ("--retention-port", Service::Retention),
            ("--audit-port", Service::Audit),
            ("--webchat-port", Service::Webchat),
        ] {
            args.push(flag.into());
            args.push(self.port(service).to_string().into());
        }
        args.extend(flags(&[
            ("--dev-certs-dir", secrets.dir().into()),
            ("--master-key-file", secrets.master_key_file().into()),
            (
                "--platform-token-file",
                secrets.platform_token_file().into(),
            ),
            ("--bcrypt-cost", "4".into()),
            ("--drain-timeout", "2s".into()),
            ("--db-pool-size", "4".into()),
            ("--redis-prefix", redis.redis_prefix.clone().into()),
        ]));
        command.args(args);
        self.spawn("hafen dev", command, log);
    }

    /// `hafen admin migrate`: the control plane, before any service starts. (Not
    /// `hafen-tenant migrate`: it refuses to parse without the serving flags
    /// `--platform-token-file`, `--redis-url` and `--master-key-file`.)
    async fn migrate(&self, db: &TestDatabase) {
        let (mut command, log) = self.command(
            "hafen",
            "hafen-admin-migrate",
            &[
                ("HAFEN_DATABASE_URL", db.url()),
                ("HAFEN_KEYSTORE_URL", db.keystore().url()),
            ],
        );
        command.args(["admin", "migrate"]);
        let mut child = command.spawn().expect("starting hafen admin migrate");
        let status = tokio::time::timeout(MIGRATE_TIMEOUT, child.wait())
            .await
            .unwrap_or_else(|_| panic!("hafen admin migrate took over {MIGRATE_TIMEOUT:?}"))
            .expect("waiting for hafen admin migrate");
        assert!(
            status.success(),
            "hafen admin migrate failed ({status}):\n{}",
            tail(&log)
        );
    }

    fn spawn_micro(&mut self, secrets: &TestSecrets, db: &TestDatabase) {
        let redis = secrets.redis_args();
        let dir = secrets.dir();
        let endpoint = |service| format!("https://127.0.0.1:{}", self.port(service));
        let auth_endpoint = endpoint(Service::Auth);
        let audit_endpoint = endpoint(Service::Audit);
        for service in Service::ALL {
            let name = service.name();
            let binary = format!("hafen-{name}");
            let (mut command, log) = self.command(
                &binary,
                &binary,
                &[
                    ("HAFEN_DATABASE_URL", db.url()),
                    ("HAFEN_KEYSTORE_URL", db.keystore().url()),
                    ("HAFEN_REDIS_URL", &redis.redis_url),
                ],
            );
            // Every service: its own certificate, mutual TLS (the default) with the others.
            let mut args = flags(&[
                (
                    "--listen",
                    format!("127.0.0.1:{}", self.port(service)).into(),
                ),
                ("--tls-cert", dir.join(format!("{name}.pem")).into()),
                ("--tls-key", dir.join(format!("{name}-key.pem")).into()),
                ("--tls-ca", dir.join("ca.pem").into()),
                ("--dev-certs-dir", dir.clone().into()),
                ("--drain-timeout", "2s".into()),
                ("--db-pool-size", "4".into()),
                ("--redis-prefix", redis.redis_prefix.clone().into()),
            ]);
            let auth = [
                ("--auth-endpoint", auth_endpoint.clone().into()),
                ("--auth-server-name", "localhost".into()),
            ];
            let audit = [
                ("--audit-endpoint", audit_endpoint.clone().into()),
                ("--audit-server-name", "localhost".into()),
                ("--audit-relay-interval", "200ms".into()),
            ];
            let master_key = ("--master-key-file", secrets.master_key_file().into());
            let keys_file = ("--keys-file", secrets.keys_file(name).into());
            let platform_token = (
                "--platform-token-file",
                secrets.platform_token_file().into(),
            );
            let bcrypt = ("--bcrypt-cost", OsString::from("4"));
            match service {
                Service::Auth => {
                    args.extend(flags(&audit));
                    args.extend(flags(&[keys_file, bcrypt]));
                }
                Service::Messaging => {
                    args.extend(flags(&auth));
                    args.extend(flags(&audit));
                    args.extend(flags(&[master_key, ("--stream-poll", "500ms".into())]));
                }
                Service::Tenant => {
                    args.extend(flags(&auth));
                    args.extend(flags(&audit));
                    args.extend(flags(&[master_key, platform_token, bcrypt]));
                }
                Service::Retention => {
                    args.extend(flags(&auth));
                    args.extend(flags(&audit));
                    // Only the purges the test starts.
                    args.extend(flags(&[
                        platform_token,
                        keys_file,
                        ("--purge-interval", "1h".into()),
                    ]));
                }
                Service::Audit => {
                    args.extend(flags(&auth));
                    args.extend(flags(&[platform_token, keys_file]));
                }
                Service::Webchat => {
                    args.extend(flags(&auth));
                    args.extend(flags(&audit));
                    args.extend(flags(&[master_key]));
                }
            }
            command.args(args);
            self.spawn(&binary, command, log);
        }
    }

    /// Waits until every service answers its health check with SERVING over TLS.
    async fn wait_until_serving(&mut self, secrets: &TestSecrets) -> Result<(), StartFailure> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for service in Service::ALL {
            let port = self.port(service);
            loop {
                for process in &mut self.processes {
                    if let Ok(Some(status)) = process.child.try_wait() {
                        let log = std::fs::read_to_string(&process.log).unwrap_or_default();
                        return Err(StartFailure {
                            message: format!(
                                "{} exited with {status} while starting",
                                process.name
                            ),
                            port_in_use: log.to_lowercase().contains("in use"),
                        });
                    }
                }
                let last = match serving(secrets, port, service).await {
                    Ok(()) => break,
                    Err(err) => err,
                };
                if Instant::now() > deadline {
                    return Err(StartFailure {
                        message: format!(
                            "the {} service on port {port} did not report SERVING within \
                             {STARTUP_TIMEOUT:?}; last: {last}",
                            service.name()
                        ),
                        port_in_use: false,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// SIGTERM to every process, then waits for each to exit cleanly (killing any that does
    /// not within [`STOP_TIMEOUT`]).
    async fn stop(&mut self) {
        for process in &self.processes {
            if let Some(pid) = process
                .child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .and_then(Pid::from_raw)
            {
                let _ = kill_process(pid, Signal::TERM);
            }
        }
        let mut failures = Vec::new();
        for process in &mut self.processes {
            match tokio::time::timeout(STOP_TIMEOUT, process.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => failures.push(format!("{} exited with {status}", process.name)),
                Ok(Err(err)) => failures.push(format!("waiting for {}: {err}", process.name)),
                Err(_) => {
                    let _ = process.child.kill().await;
                    failures.push(format!(
                        "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM; killed",
                        process.name
                    ));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "the {:?} stack did not stop cleanly: {failures:?}",
            self.mode
        );
    }

    /// Kills every process (a failed start).
    async fn kill(&mut self) {
        for process in &mut self.processes {
            let _ = process.child.kill().await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for process in &self.processes {
            eprintln!(
                "----- {} ({}), last {TAIL_LINES} lines -----\n{}",
                process.name,
                process.log.display(),
                tail(&process.log)
            );
        }
        if let Some(dir) = self.logs.take() {
            eprintln!("----- the logs are kept in {}", dir.keep().display());
        }
        // The children are killed when `processes` is dropped (kill_on_drop).
    }
}

/// `(flag, value)` pairs as arguments.
fn flags(pairs: &[(&str, OsString)]) -> Vec<OsString> {
    pairs
        .iter()
        .flat_map(|(flag, value)| [OsString::from(flag), value.clone()])
        .collect()
}

/// Six loopback ports that were free a moment ago.
fn free_ports() -> [u16; 6] {
    let listeners: Vec<std::net::TcpListener> = (0..6)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().expect("bound").port())
        .collect();
    ports.try_into().expect("six ports")
}

/// A binary of the workspace, from next to this test executable
/// (`<target>/debug/deps/<test>` → `<target>/debug/<name>`).
fn binary_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable lies in <target>/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --bins` (`make test` does)",
        path.display()
    );
    path
}

/// Whether `service` on `port` answers its health check with SERVING, over TLS with the
/// test CA.
async fn serving(secrets: &TestSecrets, port: u16, service: Service) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .map_err(|err| err.to_string())?
        .tls_config(secrets.client_tls(None))
        .map_err(|err| err.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|err| format!("{err:?}"))?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.grpc_name(),
        })
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        .into_inner()
        .status;
    if status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!("health status {status}"))
    }
}

/// The last [`TAIL_LINES`] lines of a log.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|err| format!("(unreadable: {err})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}
