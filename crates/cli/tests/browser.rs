//! The website chat in a real browser (headless Chromium, driven by `web/widget/test/browser.mjs`
//! with puppeteer-core) against the whole stack of `make run` over TLS: the demo website on
//! its own origin embeds the built widget; a visitor declines and then grants consent,
//! releases a field, chats with an agent who answers here through the Rust SDK, reloads and
//! resumes, downloads and deletes their data (CB1, CB2, CB7, CB8, CB9, UL3, UL4, TM1). The
//! browser's side of each step is checked in the script; what the agent sees afterwards is
//! checked here.
//!
//! Needs the built widget (`scripts/widget.sh build`), its npm packages and Chromium
//! (`scripts/widget.sh browser`); `make test` runs both first.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

mod support;

use std::time::Duration;

use futures::StreamExt;
use hafen_sdk::proto::messaging::v1 as pb;
use hafen_sdk::{Hafen, Login};
use support::{DevStack, repo_root};

/// What the agents answer, followed by a count: the script waits for it in the chat.
const ANSWER: &str = "Agent answer";

/// How long the browser's part may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(240);

/// Logs in a demo agent.
async fn agent(stack: &DevStack, username: &str) -> Hafen {
    let (password, chat_code) = stack.credentials(username);
    let hafen = Hafen::connect(stack.config()).unwrap();
    hafen
        .login(Login {
            tenant: "demo".to_owned(),
            username: username.to_owned(),
            password,
            chat_code,
            device_label: "browser test".to_owned(),
        })
        .await
        .unwrap();
    hafen
}

/// Answers every message of someone else in the agent's conversations, as an agent at their
/// desk would.
async fn answer_all(hafen: Hafen) {
    let me = hafen.session().unwrap().user_id;
    let mut events = hafen.subscribe(None);
    let mut answered = 0_usize;
    while let Some(Ok(event)) = events.next().await {
        if let Some(pb::subscribe_response::Event::MessageCreated(message)) = event.event
            && message.sender_user_id != me
        {
            answered += 1;
            hafen
                .send_message(&message.conversation_id, &format!("{ANSWER} {answered}"))
                .await
                .unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cb1_cb2_cb9_a_visitor_chats_in_chromium_from_consent_to_deleting_their_data() {
    let root = repo_root();
    let widget_dir =
        std::env::var_os("HAFEN_WIDGET_DIR").map_or_else(|| root.join("target/widget"), Into::into);
    let script = root.join("web/widget/test/browser.mjs");
    for (needed, how) in [
        (
            widget_dir.join("hafen-widget.js"),
            "scripts/widget.sh build",
        ),
        (
            root.join("web/widget/node_modules"),
            "scripts/widget.sh build",
        ),
        ("/usr/bin/chromium".into(), "scripts/widget.sh browser"),
    ] {
        assert!(
            needed.exists(),
            "{} is missing: run `{how}` (make test does)",
            needed.display()
        );
    }
    let mut stack = DevStack::start(&["--widget-dir".as_ref(), widget_dir.as_os_str()]).await;
    let page_port = stack.page_port;

    // Both agents answer: the chat goes to whichever is less busy.
    let alice = agent(&stack, "alice").await;
    let bob = agent(&stack, "bob").await;
    let answering = [
        tokio::spawn(answer_all(alice.clone())),
        tokio::spawn(answer_all(bob.clone())),
    ];

    let screenshots = root.join("target/widget-screenshots");
    std::fs::create_dir_all(&screenshots).unwrap();
    let downloads = stack.tmp.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let mut browser = tokio::process::Command::new("node");
    browser
        .arg(&script)
        .current_dir(root.join("web/widget"))
        .env("HAFEN_PAGE", format!("https://localhost:{page_port}/"))
        // The same page on another origin, which the widget does not allow.
        .env(
            "HAFEN_FOREIGN_PAGE",
            format!("https://127.0.0.1:{page_port}/"),
        )
        .env(
            "HAFEN_ENDPOINT",
            format!("https://127.0.0.1:{}", stack.port("webchat")),
        )
        .env("HAFEN_CERTS_DIR", &stack.certs)
        .env("HAFEN_DOWNLOADS", &downloads)
        .env("HAFEN_SCREENSHOTS", &screenshots)
        .env("HAFEN_ANSWER", ANSWER)
        .kill_on_drop(true);
    let finished = tokio::time::timeout(BROWSER_TIMEOUT, browser.status())
        .await
        .expect("the browser's part ends in time")
        .unwrap();
    stack.alive();
    assert!(
        finished.success(),
        "the browser's part failed ({finished}); the stack logged: {}",
        stack.stderr()
    );

    // The agent's side after the visitor deleted their data: the chat is still theirs, the
    // visitor's messages are tombstones, the agents' answers stay.
    let mut chats = Vec::new();
    for hafen in [&alice, &bob] {
        for conversation in hafen.conversations().await.unwrap() {
            if conversation.kind == pb::ConversationKind::Webchat as i32 {
                chats.push((hafen, conversation.conversation_id));
            }
        }
    }
    assert_eq!(chats.len(), 1, "one chat was opened");
    let (hafen, chat) = &chats[0];
    let me = hafen.session().unwrap().user_id;
    let messages = hafen.history(chat, 100).await.unwrap();
    let (visitor, answers): (Vec<_>, Vec<_>) =
        messages.iter().partition(|m| m.sender_user_id != me);
    assert!(!visitor.is_empty() && !answers.is_empty());
    for message in visitor {
        assert!(
            message.body.is_empty() && message.delete_time.is_some(),
            "message #{} of the visitor was erased",
            message.sequence
        );
    }
    assert!(answers.iter().all(|m| m.body.starts_with(ANSWER)));
    // The download the browser saved is the visitor's export.
    let saved: Vec<_> = std::fs::read_dir(&downloads)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let export: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&saved[0]).unwrap()).unwrap();
    assert!(export["visit_id"].is_string(), "{export}");

    for task in answering {
        task.abort();
    }
    stack.stop().await;
}
