//! The `hafen` client commands as a user runs them: the real binary against the services over
//! TLS (OC5, DC5): login with a stored 0600 session, chat, admin, JSON output, exit codes,
//! and a wiped device's session deleted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use hafen_testkit::{OWNER_PASSWORD, TestStack, TestTenant};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

struct Cli {
    config_dir: tempfile::TempDir,
    args: Vec<String>,
}

impl Cli {
    fn new(stack: &TestStack) -> Self {
        let args = vec![
            format!("--auth-url={}", stack.auth.uri()),
            format!("--messaging-url={}", stack.messaging.uri()),
            format!("--tenant-url={}", stack.tenant.uri()),
            format!("--retention-url={}", stack.retention.uri()),
            format!("--audit-url={}", stack.audit.uri()),
            format!("--webchat-url={}", stack.webchat.uri()),
            format!("--ca-file={}", stack.secrets.dir().join("ca.pem").display()),
            "--server-name=localhost".to_owned(),
            format!(
                "--platform-token-file={}",
                stack.secrets.platform_token_file().display()
            ),
        ];
        Self {
            config_dir: tempfile::tempdir().unwrap(),
            args,
        }
    }

    fn command(&self, words: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_hafen"));
        command
            .args(words)
            .args(&self.args)
            .arg(format!("--config-dir={}", self.config_dir.path().display()))
            .env_remove("HAFEN_PASSWORD")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    async fn run(&self, words: &[&str], env: &[(&str, &str)]) -> Output {
        tokio::time::timeout(Duration::from_secs(30), self.command(words, env).output())
            .await
            .expect("the command finishes")
            .unwrap()
    }

    async fn json(&self, words: &[&str]) -> Value {
        let mut all = words.to_vec();
        all.push("--output=json");
        let out = self.run(&all, &[]).await;
        assert!(out.status.success(), "{words:?}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{words:?}: not JSON ({e}): {}", text(&out.stdout)))
    }

    fn session_file(&self, profile: &str) -> PathBuf {
        self.config_dir
            .path()
            .join("sessions")
            .join(format!("{profile}.json"))
    }

    async fn login(
        &self,
        tenant: &TestTenant,
        profile: &str,
        user: &str,
        password: &str,
        code: &str,
    ) -> Output {
        self.run(
            &[
                "login",
                "--profile",
                profile,
                "--tenant",
                &tenant.slug,
                "--username",
                user,
                "--chat-code",
                code,
            ],
            &[("HAFEN_PASSWORD", password)],
        )
        .await
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_chats_from_the_command_line() {
    let stack = TestStack::start().await;
    let cli = Cli::new(&stack);

    // The operator creates an organisation; the owner's chat code is printed once.
    let created = cli
        .run(
            &[
                "admin", "tenant", "create", "cli-org", "--name", "CLI Org", "--output", "json",
            ],
            &[("HAFEN_OWNER_PASSWORD", OWNER_PASSWORD)],
        )
        .await;
    assert!(created.status.success(), "{}", text(&created.stderr));
    let created: Value = serde_json::from_slice(&created.stdout).unwrap();
    let tenant = TestTenant {
        id: created["tenant"]["tenant_id"].as_str().unwrap().to_owned(),
        slug: "cli-org".to_owned(),
        owner_id: created["owner_user_id"].as_str().unwrap().to_owned(),
        owner_code: created["owner_chat_code"].as_str().unwrap().to_owned(),
        owner_code_id: created["owner_chat_code_id"].as_str().unwrap().to_owned(),
    };
    let listed = cli.json(&["admin", "tenant", "list"]).await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["slug"] == "cli-org")
    );

    // A wrong password: exit code 3, and nothing stored.
    let failed = cli
        .login(
            &tenant,
            "owner",
            "owner",
            "not the password",
            &tenant.owner_code,
        )
        .await;
    assert_eq!(failed.status.code(), Some(3), "{}", text(&failed.stderr));
    assert!(!cli.session_file("owner").exists());

    let ok = cli
        .login(
            &tenant,
            "owner",
            "owner",
            OWNER_PASSWORD,
            &tenant.owner_code,
        )
        .await;
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(
        mode(&cli.session_file("owner")),
        0o600,
        "only the user may read it"
    );
    let stored = std::fs::read_to_string(cli.session_file("owner")).unwrap();
    assert!(!stored.contains(OWNER_PASSWORD));

    // Users, chat codes, a conversation, messages.
    let user = cli
        .run(
            &[
                "admin",
                "user",
                "create",
                "carol",
                "--name",
                "Carol",
                "--profile",
                "owner",
            ],
            &[("HAFEN_NEW_PASSWORD", "carol's password")],
        )
        .await;
    assert!(user.status.success(), "{}", text(&user.stderr));
    let code = cli
        .json(&[
            "admin",
            "chat-code",
            "issue",
            "carol",
            "--label",
            "laptop",
            "--profile",
            "owner",
        ])
        .await;
    let carol_code = code["code"].as_str().unwrap().to_owned();
    let carol_code_id = code["chat_code_id"].as_str().unwrap().to_owned();
    let ok = cli
        .login(&tenant, "carol", "carol", "carol's password", &carol_code)
        .await;
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    let group = cli
        .json(&[
            "chat",
            "create",
            "team",
            "--member",
            "carol",
            "--profile",
            "owner",
        ])
        .await;
    assert_eq!(group["title"], "team");
    let sent = cli
        .json(&[
            "chat",
            "send",
            "team",
            "hello",
            "carol",
            "--profile",
            "owner",
        ])
        .await;
    assert_eq!(sent["body"], "hello carol");
    let history = cli
        .json(&["chat", "history", "team", "--profile", "carol"])
        .await;
    assert_eq!(history[0]["body"], "hello carol");
    let missing = cli
        .run(
            &["chat", "send", "nowhere", "hi", "--profile", "carol"],
            &[],
        )
        .await;
    assert_eq!(missing.status.code(), Some(5), "{}", text(&missing.stderr));
    let members_only = cli
        .run(
            &["admin", "user", "list", "--all", "--profile", "carol"],
            &[],
        )
        .await;
    assert_eq!(
        members_only.status.code(),
        Some(4),
        "{}",
        text(&members_only.stderr)
    );

    // Carol follows the conversation; her laptop is wiped while she does.
    let mut tail = cli
        .command(
            &["chat", "tail", "--profile", "carol", "--output", "json"],
            &[],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `tail` follows from the moment it has subscribed: say hello until it shows.
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut shown = None;
    for attempt in 0..20 {
        let text = format!("are you there? ({attempt})");
        cli.json(&["chat", "send", "team", &text, "--profile", "owner"])
            .await;
        if let Ok(line) = tokio::time::timeout(Duration::from_secs(1), lines.next_line()).await {
            shown = line.unwrap();
            break;
        }
    }
    let shown: Value = serde_json::from_str(&shown.expect("tail shows a message")).unwrap();
    assert!(
        shown["body"]
            .as_str()
            .unwrap()
            .starts_with("are you there?")
    );
    assert_eq!(shown["event"], "created");
    let revoked = cli
        .json(&[
            "admin",
            "chat-code",
            "revoke",
            &carol_code_id,
            "--profile",
            "owner",
        ])
        .await;
    assert_eq!(revoked["state"], "revoked");
    let ended = tokio::time::timeout(Duration::from_secs(15), tail.wait())
        .await
        .expect("tail ends after the wipe")
        .unwrap();
    assert_eq!(ended.code(), Some(8), "exit code 8: wiped");
    assert!(
        !cli.session_file("carol").exists(),
        "the wiped device's session is deleted"
    );
    let refused = cli
        .run(&["chat", "conversations", "--profile", "carol"], &[])
        .await;
    assert_eq!(refused.status.code(), Some(3));

    // The audit chain, on the server and offline from an export.
    let verified = cli
        .json(&["admin", "audit", "verify", "--profile", "owner"])
        .await;
    assert_eq!(verified["intact"], true);
    let export = cli.config_dir.path().join("audit.jsonl");
    let exported = cli
        .run(
            &[
                "admin",
                "audit",
                "export",
                "--profile",
                "owner",
                "--out",
                export.to_str().unwrap(),
            ],
            &[],
        )
        .await;
    assert!(exported.status.success(), "{}", text(&exported.stderr));
    let offline = cli
        .json(&[
            "admin",
            "audit",
            "verify",
            "--file",
            export.to_str().unwrap(),
        ])
        .await;
    assert_eq!(offline["intact"], true);
    let mut document = std::fs::read_to_string(&export).unwrap();
    document = document.replacen("auth.login.succeeded", "auth.login.failed", 1);
    std::fs::write(&export, document).unwrap();
    let broken = cli
        .run(
            &[
                "admin",
                "audit",
                "verify",
                "--file",
                export.to_str().unwrap(),
            ],
            &[],
        )
        .await;
    assert_eq!(broken.status.code(), Some(10), "{}", text(&broken.stdout));

    // Own data, and Carol's for a data-subject request, as checked ZIP archives.
    let mine = cli.config_dir.path().join("mine.zip");
    let saved = cli
        .json(&[
            "chat",
            "export-me",
            "--out",
            mine.to_str().unwrap(),
            "--profile",
            "owner",
        ])
        .await;
    assert_eq!(saved["size"], std::fs::metadata(&mine).unwrap().len());
    let hers = cli.config_dir.path().join("carol.zip");
    let saved = cli
        .json(&[
            "admin",
            "user",
            "export",
            "carol",
            "--out",
            hers.to_str().unwrap(),
            "--profile",
            "owner",
        ])
        .await;
    assert!(saved["size"].as_u64().unwrap() > 0);
    assert!(
        std::fs::read(&hers).unwrap().starts_with(b"PK"),
        "a ZIP archive"
    );

    // Carol is erased: only when it is confirmed.
    let unconfirmed = cli
        .run(
            &["admin", "user", "erase", "carol", "--profile", "owner"],
            &[],
        )
        .await;
    assert_eq!(
        unconfirmed.status.code(),
        Some(6),
        "{}",
        text(&unconfirmed.stderr)
    );
    let erased = cli
        .json(&[
            "admin",
            "user",
            "erase",
            "carol",
            "--yes",
            "--profile",
            "owner",
        ])
        .await;
    assert_eq!(erased["state"], "erased");
    assert_eq!(erased["display_name"], "Erased user");
    let listed = cli
        .json(&["admin", "user", "list", "--all", "--profile", "owner"])
        .await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|u| u["user_id"] != erased["user_id"]),
        "{listed}"
    );

    let out = cli.run(&["logout", "--profile", "owner"], &[]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!cli.session_file("owner").exists());
}

#[tokio::test]
async fn help_and_completions_work_without_a_server() {
    let hafen = env!("CARGO_BIN_EXE_hafen");
    for words in [
        vec!["--help"],
        vec!["chat", "--help"],
        vec!["chat", "tail", "--help"],
        vec!["admin", "--help"],
        vec!["admin", "tenant", "create", "--help"],
        vec!["login", "--help"],
        vec!["completions", "bash"],
    ] {
        let out = std::process::Command::new(hafen)
            .args(&words)
            .output()
            .unwrap();
        assert!(out.status.success(), "{words:?}");
        assert!(!out.stdout.is_empty(), "{words:?}");
    }
    let help = std::process::Command::new(hafen)
        .arg("--help")
        .output()
        .unwrap();
    assert!(text(&help.stdout).contains("Exit codes"));
    let usage = std::process::Command::new(hafen)
        .args(["chat", "send"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn cb1_cb9_a_visitor_and_an_agent_use_the_website_chat_from_the_command_line() {
    let stack = TestStack::start().await;
    let cli = Cli::new(&stack);
    let tenant = stack.create_tenant("webshop").await;
    let ok = cli
        .login(
            &tenant,
            "owner",
            "owner",
            OWNER_PASSWORD,
            &tenant.owner_code,
        )
        .await;
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let agent = cli
        .run(
            &["admin", "user", "create", "dana", "--profile", "owner"],
            &[("HAFEN_NEW_PASSWORD", "dana's password")],
        )
        .await;
    assert!(agent.status.success(), "{}", text(&agent.stderr));
    let code = cli
        .json(&["admin", "chat-code", "issue", "dana", "--profile", "owner"])
        .await;
    let ok = cli
        .login(
            &tenant,
            "dana",
            "dana",
            "dana's password",
            code["code"].as_str().unwrap(),
        )
        .await;
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    // The admin side: the feature, a widget with dana as its agent.
    let on = cli
        .json(&["admin", "widget", "feature", "on", "--profile", "owner"])
        .await;
    assert_eq!(on["webchat"], true);
    let widget = cli
        .json(&[
            "admin",
            "widget",
            "create",
            "--name",
            "Shop",
            "--origin",
            "https://shop.example.com",
            "--privacy-url",
            "https://shop.example.com/privacy",
            "--field",
            "topic|Topic|To route the chat",
            "--field",
            "email|E-mail|To answer by e-mail|personal",
            "--agent",
            "dana",
            "--consent-text",
            "We keep what you write for 30 days to answer you.",
            "--open",
            "mon-sun=00:00-23:59",
            "--time-zone",
            "Europe/Berlin",
            "--enabled",
            "--profile",
            "owner",
        ])
        .await;
    let widget_id = widget["widget_id"].as_str().unwrap().to_owned();
    assert_eq!(widget["consent_text"]["version"], 1);
    assert_eq!(widget["pre_chat_fields"][1]["personal"], true);
    assert_eq!(
        widget["business_hours"]["intervals"]
            .as_array()
            .unwrap()
            .len(),
        7
    );
    let updated = cli
        .json(&[
            "admin",
            "widget",
            "update",
            &widget_id,
            "--welcome",
            "Hi!",
            "--always-open",
            "--profile",
            "owner",
        ])
        .await;
    assert_eq!(updated["welcome_message"], "Hi!");
    assert_eq!(
        updated["business_hours"]["intervals"],
        serde_json::json!([])
    );
    assert_eq!(updated["business_hours"]["time_zone"], "Europe/Berlin");
    assert_eq!(updated["enabled"], true, "update keeps what was not given");
    assert_eq!(updated["allowed_origins"][0], "https://shop.example.com");
    // German texts: the widget's, then a consent text version with its German wording.
    let translated = cli
        .json(&[
            "admin",
            "widget",
            "translation",
            &widget_id,
            "de",
            "--welcome",
            "Hallo!",
            "--field",
            "topic|Thema|Um den Chat weiterzuleiten",
            "--profile",
            "owner",
        ])
        .await;
    assert_eq!(translated["language"], "en");
    assert_eq!(translated["translations"][0]["language"], "de");
    assert_eq!(
        translated["translations"][0]["pre_chat_fields"][0]["label"],
        "Thema"
    );
    let published = cli
        .json(&[
            "admin",
            "widget",
            "consent-text",
            &widget_id,
            "We keep what you write for 30 days to answer you.",
            "--translation",
            "de=Wir bewahren auf, was Sie schreiben, 30 Tage lang, um Ihnen zu antworten.",
            "--profile",
            "owner",
        ])
        .await;
    assert_eq!(published["version"], 2);
    assert_eq!(published["translations"][0]["language"], "de");
    let listed = cli
        .json(&["admin", "widget", "list", "--profile", "owner"])
        .await;
    assert_eq!(listed[0]["widget_id"], widget_id.as_str());
    let secret = cli
        .json(&[
            "admin",
            "widget",
            "identity-secret",
            &widget_id,
            "--profile",
            "owner",
        ])
        .await;
    assert_eq!(secret["secret"].as_str().unwrap().len(), 43);
    let shown = cli
        .json(&["admin", "widget", "show", &widget_id, "--profile", "owner"])
        .await;
    assert_eq!(shown["identity_verification"], true);
    let bad = cli
        .run(
            &[
                "admin",
                "widget",
                "update",
                &widget_id,
                "--origin",
                "http://shop.example.com",
                "--profile",
                "owner",
            ],
            &[],
        )
        .await;
    assert_eq!(bad.status.code(), Some(6), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("settings.allowed_origins"));

    // A page of another origin gets nothing; the shop's page starts a visit.
    let foreign = cli
        .run(
            &[
                "visit",
                "start",
                &widget_id,
                "--origin",
                "https://evil.example.net",
            ],
            &[],
        )
        .await;
    assert_eq!(foreign.status.code(), Some(4), "{}", text(&foreign.stderr));
    let visit = cli
        .json(&[
            "visit",
            "start",
            &widget_id,
            "--origin",
            "https://shop.example.com",
        ])
        .await;
    assert_eq!(visit["resumed"], false);
    assert_eq!(visit["welcome_message"], "Hi!");
    assert_eq!(visit["online"], true);
    let visit_file = cli.config_dir.path().join("visits").join("default.json");
    assert_eq!(
        mode(&visit_file),
        0o600,
        "the visitor token is a credential"
    );
    let again = cli
        .json(&["visit", "start", &widget_id, "--language", "de-DE,en"])
        .await;
    assert_eq!(again["language"], "de");
    assert_eq!(again["welcome_message"], "Hallo!");
    assert_eq!(again["consent_text"]["language"], "de");
    assert_eq!(again["resumed"], true);
    assert_eq!(again["identified"], false);
    assert_eq!(again["visit_id"], visit["visit_id"]);

    // A personal field before consent is refused; after it, only when released (UL3).
    let early = cli
        .run(
            &[
                "visit",
                "fields",
                "email=v@example.com",
                "--release",
                "email",
            ],
            &[],
        )
        .await;
    assert_eq!(early.status.code(), Some(6), "{}", text(&early.stderr));
    assert!(text(&early.stderr).contains("CONSENT_REQUIRED"));
    let consent = cli
        .json(&["visit", "consent", "--grant", "--language", "de"])
        .await;
    assert_eq!(consent["granted"], true);
    assert_eq!(consent["language"], "de", "the German text was answered");
    let unreleased = cli
        .run(&["visit", "fields", "email=v@example.com"], &[])
        .await;
    assert_eq!(unreleased.status.code(), Some(6));
    assert!(text(&unreleased.stderr).contains("fields[0].released"));
    let stored = cli
        .json(&[
            "visit",
            "fields",
            "topic=Billing",
            "email=v@example.com",
            "--release",
            "email",
        ])
        .await;
    assert_eq!(stored["stored_keys"].as_array().unwrap().len(), 2);
    let sent = cli
        .json(&[
            "visit",
            "send",
            "My card is 4111 1111 1111 1111, please help",
        ])
        .await;
    assert_eq!(sent["masked"], true);

    // The agent sees the chat with the released fields and answers it.
    let chats = cli.json(&["chat", "visitors", "--profile", "dana"]).await;
    let chat = &chats[0];
    assert_eq!(chat["kind"], "webchat");
    assert_eq!(chat["fields"]["email"], "v@example.com");
    assert_eq!(chat["fields"]["topic"], "Billing");
    let conversation = chat["conversation_id"].as_str().unwrap().to_owned();
    let history = cli
        .json(&["chat", "history", &conversation, "--profile", "dana"])
        .await;
    let first = history.as_array().unwrap().last().unwrap()["body"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!first.contains("4111 1111"), "masked: {first}");
    cli.json(&[
        "chat",
        "send",
        &conversation,
        "Happy to help!",
        "--profile",
        "dana",
    ])
    .await;
    let messages = cli.run(&["visit", "messages", "--output=json"], &[]).await;
    assert!(messages.status.success(), "{}", text(&messages.stderr));
    let lines: Vec<Value> = text(&messages.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["from_visitor"], false);
    assert_eq!(lines[1]["body"], "Happy to help!");

    // Self-service: see, correct, export, delete.
    let corrected = cli
        .json(&[
            "visit",
            "correct",
            "email=w@example.com",
            "--release",
            "email",
        ])
        .await;
    assert!(corrected["fields"].to_string().contains("w@example.com"));
    assert_eq!(corrected["messages"].as_array().unwrap().len(), 2);
    let export_file = cli.config_dir.path().join("my-data.json");
    let export_arg = export_file.display().to_string();
    cli.json(&["visit", "export", "--file", &export_arg]).await;
    assert_eq!(mode(&export_file), 0o600);
    let exported: Value =
        serde_json::from_str(&std::fs::read_to_string(&export_file).unwrap()).unwrap();
    assert!(exported.to_string().contains("w@example.com"));
    assert_eq!(exported["messages"][1]["body"], "Happy to help!");
    assert_eq!(exported["messages"][1]["from"], "agent");
    let deleted = cli.json(&["visit", "delete"]).await;
    assert!(deleted["delete_time"].as_str().is_some());
    assert!(!visit_file.exists(), "the dead token is forgotten");
    let gone = cli.run(&["visit", "my-data"], &[]).await;
    assert_eq!(gone.status.code(), Some(3), "{}", text(&gone.stderr));
    let chats = cli.json(&["chat", "visitors", "--profile", "dana"]).await;
    assert_eq!(chats[0]["visit_id"], Value::Null, "{chats}");
    assert_eq!(chats[0]["fields"], serde_json::json!({}));
}
