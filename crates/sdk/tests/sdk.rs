//! The SDK against the real services over TLS, on real PostgreSQL and Redis (OC5, OC7, BX4).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use hafen_sdk::proto::auth::v1 as auth_pb;
use hafen_sdk::proto::messaging::v1 as pb;
use hafen_sdk::{Config, Endpoints, Error, Hafen, Login};
use hafen_testkit::{OWNER_PASSWORD, TestServer, TestStack, TestTenant};

fn config(stack: &TestStack, messaging: &str) -> Config {
    Config {
        endpoints: Endpoints {
            auth: stack.auth.uri(),
            messaging: messaging.to_owned(),
            tenant: stack.tenant.uri(),
            retention: stack.retention.uri(),
            audit: stack.audit.uri(),
            webchat: stack.webchat.uri(),
        },
        ca_pem: Some(stack.secrets.ca_pem().as_bytes().to_vec()),
        server_name: Some("localhost".to_owned()),
        timeout: Duration::from_secs(10),
    }
}

async fn owner(stack: &TestStack, tenant: &TestTenant, messaging: &str) -> Hafen {
    let hafen = Hafen::connect(config(stack, messaging)).unwrap();
    hafen
        .login(Login {
            tenant: tenant.slug.clone(),
            username: "owner".into(),
            password: OWNER_PASSWORD.into(),
            chat_code: tenant.owner_code.clone(),
            device_label: "sdk test".into(),
        })
        .await
        .unwrap();
    hafen
}

async fn group(hafen: &Hafen, title: &str, members: Vec<String>) -> String {
    hafen
        .messaging()
        .create_conversation(pb::CreateConversationRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            kind: pb::ConversationKind::Group as i32,
            title: title.into(),
            member_user_ids: members,
        })
        .await
        .unwrap()
        .into_inner()
        .conversation_id
}

/// The body of the next new message on `events`.
async fn next(events: &mut hafen_sdk::Subscription) -> String {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(15), events.next())
            .await
            .expect("an event in time")
            .expect("the subscription goes on")
            .expect("no error");
        if let Some(body) = body(&event) {
            return body;
        }
    }
}

fn body(event: &pb::SubscribeResponse) -> Option<String> {
    match &event.event {
        Some(pb::subscribe_response::Event::MessageCreated(m)) => Some(m.body.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bx4_the_sdk_subscription_resumes_after_the_server_restarts() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("sdk-resume").await;
    // The subscriber's own replica, which this test restarts.
    let mut replica_config = stack.secrets.messaging_config(&stack.db);
    replica_config.auth.auth_endpoint = stack.auth.uri();
    let again = replica_config.clone();
    let mut replica = TestServer::spawn(|l, s| hafen_messaging::serve(replica_config, l, s)).await;
    let sender = owner(&stack, &tenant, &stack.messaging.uri()).await;
    let member = stack
        .create_member(
            sender.session().unwrap().access_token(),
            "reader",
            "member password",
        )
        .await;
    let conversation = group(&sender, "resumable", vec![member.user_id]).await;

    let reader = Hafen::connect(config(&stack, &replica.uri())).unwrap();
    reader
        .login(Login {
            tenant: tenant.slug.clone(),
            username: "reader".into(),
            password: "member password".into(),
            chat_code: member.chat_code,
            device_label: String::new(),
        })
        .await
        .unwrap();
    let mut events = reader.subscribe(None);
    // "From now on" starts when the server has the subscription: wait for it.
    let caught_up = tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        caught_up.event,
        Some(pb::subscribe_response::Event::CaughtUp(_))
    ));
    sender.send_message(&conversation, "one").await.unwrap();
    assert_eq!(next(&mut events).await, "one");

    // The replica goes away; messages sent meanwhile arrive after it is back.
    let addr = replica.addr();
    replica.stop().await.unwrap();
    for text in ["two", "three", "four"] {
        sender.send_message(&conversation, text).await.unwrap();
    }
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    replica = TestServer::spawn_on(listener, |l, s| hafen_messaging::serve(again, l, s)).await;
    sender.send_message(&conversation, "five").await.unwrap();
    let mut received = Vec::new();
    while received.len() < 4 {
        received.push(next(&mut events).await);
    }
    assert_eq!(
        received,
        ["two", "three", "four", "five"],
        "each once, in order"
    );
    drop(events);
    replica.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn oc5_a_wiped_device_runs_its_handler_confirms_and_refuses_calls() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("sdk-wipe").await;
    let admin = owner(&stack, &tenant, &stack.messaging.uri()).await;
    let member = stack
        .create_member(
            admin.session().unwrap().access_token(),
            "lost-phone",
            "member password",
        )
        .await;
    let device = Hafen::connect(config(&stack, &stack.messaging.uri())).unwrap();
    let wiped = Arc::new(AtomicUsize::new(0));
    let seen = wiped.clone();
    device.on_wipe(move || {
        seen.fetch_add(1, Ordering::SeqCst);
    });
    device
        .login(Login {
            tenant: tenant.slug.clone(),
            username: "lost-phone".into(),
            password: "member password".into(),
            chat_code: member.chat_code,
            device_label: String::new(),
        })
        .await
        .unwrap();
    let mut events = device.subscribe(None);
    let caught_up = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        caught_up.event,
        Some(pb::subscribe_response::Event::CaughtUp(_))
    ));

    let codes = admin
        .auth()
        .list_chat_codes(auth_pb::ListChatCodesRequest {
            user_id: member.user_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .chat_codes;
    admin
        .auth()
        .revoke_chat_code(auth_pb::RevokeChatCodeRequest {
            chat_code_id: codes[0].chat_code_id.clone(),
        })
        .await
        .unwrap();

    let ended = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the stream ends in time")
        .expect("with an error");
    assert!(matches!(ended, Err(Error::Wiped)), "{ended:?}");
    assert_eq!(wiped.load(Ordering::SeqCst), 1, "the handler ran once");
    assert!(device.is_wiped());
    assert!(device.session().is_none(), "the tokens are forgotten");
    let refused = device.conversations().await.unwrap_err();
    assert!(matches!(refused, Error::Wiped));
    assert_eq!(refused.reason(), Some("DEVICE_WIPED"));
    let typed = device
        .messaging()
        .list_conversations(pb::ListConversationsRequest::default())
        .await;
    assert!(matches!(device.check(typed).await, Err(Error::Wiped)));

    // The server knows the device confirmed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let state = admin
            .auth()
            .list_chat_codes(auth_pb::ListChatCodesRequest {
                user_id: codes[0].user_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .chat_codes[0]
            .state;
        if state == auth_pb::ChatCodeState::Wiped as i32 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "wipe not confirmed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_carry_the_reason_and_the_field() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("sdk-errors").await;
    let hafen = Hafen::connect(config(&stack, &stack.messaging.uri())).unwrap();
    let failed = hafen
        .login(Login {
            tenant: tenant.slug.clone(),
            username: "owner".into(),
            password: "wrong password!".into(),
            chat_code: tenant.owner_code.clone(),
            device_label: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(failed.reason(), Some("LOGIN_FAILED"));
    assert!(matches!(
        hafen.conversations().await,
        Err(Error::NotLoggedIn)
    ));

    let hafen = owner(&stack, &tenant, &stack.messaging.uri()).await;
    let err = hafen.send_message("not-a-uuid", "hello").await.unwrap_err();
    match err {
        Error::Rpc {
            code,
            reason,
            field,
            ..
        } => {
            assert_eq!(code, tonic::Code::InvalidArgument);
            assert_eq!(reason, "INVALID_FIELD");
            assert_eq!(field.as_deref(), Some("conversation_id"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oc7_history_pages_and_an_expiring_session_is_refreshed() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("sdk-history").await;
    let hafen = owner(&stack, &tenant, &stack.messaging.uri()).await;
    let changes = Arc::new(AtomicUsize::new(0));
    let counted = changes.clone();
    hafen.on_session_change(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
    });
    let conversation = group(&hafen, "notes", Vec::new()).await;
    for n in 0..30 {
        hafen
            .send_message(&conversation, &format!("note {n}"))
            .await
            .unwrap();
    }
    let last = hafen.history(&conversation, 5).await.unwrap();
    let bodies: Vec<&str> = last.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(
        bodies,
        ["note 25", "note 26", "note 27", "note 28", "note 29"]
    );

    // The stored session, as if its access token were about to expire: resuming refreshes
    // it (new tokens, reported to the listener) and the whole history is there.
    let mut stored = hafen.session().unwrap();
    drop(hafen);
    let before = changes.load(Ordering::SeqCst);
    stored.access_expires_at = chrono::Utc::now();
    let resumed = Hafen::connect(config(&stack, &stack.messaging.uri())).unwrap();
    let seen = changes.clone();
    resumed.on_session_change(move |_| {
        seen.fetch_add(1, Ordering::SeqCst);
    });
    let fresh = resumed.resume(stored.clone()).await.unwrap();
    assert_ne!(fresh.access_token(), stored.access_token());
    assert!(fresh.access_expires_at > chrono::Utc::now() + chrono::Duration::minutes(5));
    assert!(
        changes.load(Ordering::SeqCst) >= before + 2,
        "start and refresh reported"
    );
    assert_eq!(resumed.history(&conversation, 100).await.unwrap().len(), 30);
}
