//! The demo organisation `make run` seeds (`hafen dev --demo`): tenant `demo` with its owner
//! and two users, alice and bob, each with a password and a chat code for one device, a group
//! conversation "general" with both, and the website chat: the `webchat` feature on and one
//! enabled widget with a consent text, pre-chat fields and alice and bob as its agents. The
//! credentials are random, printed once, and
//! kept in `.dev/demo.txt` (mode 0600) for the README's walk-through. Seeding happens once;
//! later starts only point at the file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use hafen_sdk::proto::auth::v1 as auth_pb;
use hafen_sdk::proto::common::v1::Role;
use hafen_sdk::proto::messaging::v1 as pb;
use hafen_sdk::proto::tenant::v1 as tenant_pb;
use hafen_sdk::proto::webchat::v1 as webchat_pb;
use hafen_sdk::{Config, Endpoints, Error, Hafen, Login};

use crate::dev::DevArgs;

/// The demo tenant's slug.
pub const SLUG: &str = "demo";

/// The origin the demo widget may be embedded in: the demo website on this machine
/// (`--demo-page-port`).
pub fn demo_origin(port: u16) -> String {
    format!("https://localhost:{port}")
}

struct Person {
    username: &'static str,
    name: &'static str,
    password: String,
    code: String,
}

fn password() -> Result<String, Error> {
    hafen_crypto::secret::random_token()
        .map(|t| format!("demo-{}", &t[..12]))
        .map_err(|e| Error::Config(e.to_string()))
}

fn config(args: &DevArgs) -> Result<Config, Error> {
    let ca = std::fs::read(args.dev_certs_dir.join("ca.pem"))
        .map_err(|e| Error::Config(format!("the development CA: {e}")))?;
    let host = if args.host.is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        args.host.to_string()
    };
    let at = |port: u16| format!("https://{host}:{port}");
    Ok(Config {
        endpoints: Endpoints {
            auth: at(args.auth_port),
            messaging: at(args.messaging_port),
            tenant: at(args.tenant_port),
            retention: at(args.retention_port),
            audit: at(args.audit_port),
            webchat: at(args.webchat_port),
        },
        ca_pem: Some(ca),
        server_name: Some(hafen_platform::tls::DEV_SERVER_NAME.to_owned()),
        timeout: Duration::from_secs(30),
    })
}

/// The line of the demo file that names the widget.
const WIDGET_LINE: &str = "Website chat: widget ";

/// Seeds the demo organisation unless it exists; prints what a newcomer needs. Returns the
/// demo widget's id.
pub async fn seed(args: &DevArgs, file: &Path) -> Result<String, Error> {
    let config = config(args)?;
    let operator = Hafen::connect(config.clone())?;
    let token = std::fs::read_to_string(&args.platform_token_file)
        .map_err(|e| Error::Config(format!("platform token: {e}")))?;
    operator.act_as_operator(&token);

    // The services were just started: wait until the tenant service answers.
    let mut existing = None;
    for attempt in 0..50 {
        let answer = operator
            .tenant()
            .get_tenant(tenant_pb::GetTenantRequest {
                tenant_id: String::new(),
                slug: SLUG.to_owned(),
            })
            .await;
        match operator.check(answer).await {
            Ok(tenant) => {
                existing = Some(tenant);
                break;
            }
            Err(err) if err.code() == Some(tonic::Code::NotFound) => break,
            Err(err) if err.is_transient() && attempt < 49 => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => return Err(err),
        }
    }
    if existing.is_some() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "Demo organisation '{SLUG}' exists; its users and chat codes are in {}.",
            file.display()
        );
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
        return text
            .lines()
            .find_map(|line| line.strip_prefix(WIDGET_LINE)?.split_whitespace().next())
            .map(str::to_owned)
            .ok_or_else(|| Error::Config(format!("{}: no demo widget named", file.display())));
    }

    let owner_password = password()?;
    let created = operator
        .tenant()
        .create_tenant(tenant_pb::CreateTenantRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            slug: SLUG.to_owned(),
            display_name: "Demo Organisation".to_owned(),
            owner_username: "owner".to_owned(),
            owner_display_name: "Demo Owner".to_owned(),
            owner_password: owner_password.clone(),
            dpa_version: crate::dev::DEV_DPA_VERSION.to_owned(),
            region: crate::dev::DEV_REGION.to_owned(),
            database: String::new(),
        })
        .await;
    let created = operator.check(created).await?;

    let owner = Hafen::connect(config)?;
    owner
        .login(Login {
            tenant: SLUG.to_owned(),
            username: "owner".to_owned(),
            password: owner_password.clone(),
            chat_code: created.owner_chat_code.clone(),
            device_label: "seed".to_owned(),
        })
        .await?;
    let mut people = vec![
        Person {
            username: "alice",
            name: "Alice (demo)",
            password: password()?,
            code: String::new(),
        },
        Person {
            username: "bob",
            name: "Bob (demo)",
            password: password()?,
            code: String::new(),
        },
    ];
    let mut ids = Vec::new();
    for person in &mut people {
        let user = owner
            .auth()
            .create_user(auth_pb::CreateUserRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                username: person.username.to_owned(),
                display_name: person.name.to_owned(),
                role: Role::Member as i32,
                credential: Some(auth_pb::create_user_request::Credential::Password(
                    person.password.clone(),
                )),
            })
            .await;
        let user = owner.check(user).await?;
        let code = owner
            .auth()
            .issue_chat_code(auth_pb::IssueChatCodeRequest {
                user_id: user.user_id.clone(),
                device_label: "terminal".to_owned(),
            })
            .await;
        person.code = owner.check(code).await?.code;
        ids.push(user.user_id);
    }
    let group = owner
        .messaging()
        .create_conversation(pb::CreateConversationRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            kind: pb::ConversationKind::Group as i32,
            title: "general".to_owned(),
            member_user_ids: ids.clone(),
        })
        .await;
    owner.check(group).await?;
    let widget = website_chat(&owner, ids, &demo_origin(args.demo_page_port)).await?;
    let _ = owner.logout().await;

    let mut text = String::new();
    let _ = writeln!(
        text,
        "DEMO ONLY - throwaway credentials of the demo organisation '{SLUG}' (development stack)."
    );
    let _ = writeln!(
        text,
        "  owner  password {owner_password}  chat code {}",
        created.owner_chat_code
    );
    for person in &people {
        let _ = writeln!(
            text,
            "  {:<6} password {}  chat code {}",
            person.username, person.password, person.code
        );
    }
    let _ = writeln!(text, "Chat in two terminals (see README):");
    for person in &people {
        let _ = writeln!(
            text,
            "  HAFEN_PASSWORD={} hafen login --profile {} --tenant {SLUG} --username {} --chat-code {}",
            person.password, person.username, person.username, person.code
        );
    }
    let _ = writeln!(text, "  hafen chat tail --profile alice");
    let _ = writeln!(
        text,
        "  hafen chat send --profile bob general \"Hello Alice!\""
    );
    let _ = writeln!(
        text,
        "{WIDGET_LINE}{widget} (agents alice and bob; see README):"
    );
    let _ = writeln!(text, "  hafen visit start {widget}");
    crate::client::write_private(file, text.as_bytes())
        .map_err(|e| Error::Config(format!("{}: {e}", file.display())))?;
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{text}");
    let _ = writeln!(out, "(Also kept in {}.)", file.display());
    Ok(widget)
}

/// Switches the website chat on and creates the demo widget answered by `agents`; its id.
async fn website_chat(owner: &Hafen, agents: Vec<String>, origin: &str) -> Result<String, Error> {
    owner.set_webchat_feature(true).await?;
    let field = |key: &str, label: &str, personal: bool, purpose: &str| webchat_pb::PreChatField {
        key: key.to_owned(),
        label: label.to_owned(),
        personal,
        purpose: purpose.to_owned(),
        required: false,
    };
    let field_text = |key: &str, label: &str, purpose: &str| webchat_pb::PreChatFieldText {
        key: key.to_owned(),
        label: label.to_owned(),
        purpose: purpose.to_owned(),
    };
    let widget = owner
        .widgets()
        .create_widget(webchat_pb::CreateWidgetRequest {
            settings: Some(webchat_pb::WidgetSettings {
                name: "Demo website".to_owned(),
                allowed_origins: vec![origin.to_owned()],
                privacy_policy_url: format!("{origin}/privacy"),
                pre_chat_fields: vec![
                    field(
                        "topic",
                        "Topic",
                        false,
                        "To pass your question to the right person",
                    ),
                    field(
                        "email",
                        "E-mail",
                        true,
                        "To answer you by e-mail if the chat ends",
                    ),
                ],
                welcome_message: "Hello! Ask us anything.".to_owned(),
                offline_message: "Nobody is here right now; leave your e-mail and we answer \
                    later."
                    .to_owned(),
                allow_anonymous_chat: true,
                agent_user_ids: agents,
                remember_visitors: true,
                language: "en".to_owned(),
                translations: vec![webchat_pb::WidgetTranslation {
                    language: "de".to_owned(),
                    welcome_message: "Hallo! Fragen Sie uns, was Sie möchten.".to_owned(),
                    offline_message: "Gerade ist niemand da; hinterlassen Sie Ihre \
                        E-Mail-Adresse, wir antworten später."
                        .to_owned(),
                    pre_chat_fields: vec![
                        field_text(
                            "topic",
                            "Thema",
                            "Damit Ihre Frage die richtige Person erreicht",
                        ),
                        field_text(
                            "email",
                            "E-Mail",
                            "Damit wir Ihnen per E-Mail antworten können, falls der Chat endet",
                        ),
                    ],
                }],
                ..Default::default()
            }),
            enabled: true,
            consent_text: "The demo organisation stores what you enter in this chat to answer \
                you, for 30 days after your last visit. You can see, correct, download and \
                delete it in the chat at any time."
                .to_owned(),
            consent_translations: vec![webchat_pb::ConsentTranslation {
                language: "de".to_owned(),
                text: "Die Demo-Organisation speichert, was Sie in diesem Chat eingeben, um \
                    Ihnen zu antworten, bis 30 Tage nach Ihrem letzten Besuch. Sie können es \
                    im Chat jederzeit einsehen, berichtigen, herunterladen und löschen."
                    .to_owned(),
                ..Default::default()
            }],
            request_id: uuid::Uuid::new_v4().to_string(),
        })
        .await;
    Ok(owner.check(widget).await?.widget_id)
}
