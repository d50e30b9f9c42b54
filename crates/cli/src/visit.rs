//! `hafen visit …`: a website visitor's side of the website chat from a terminal — what the
//! widget does in a browser — to try a widget out and for scripts. The visit (widget, origin
//! and visitor token) is kept per --profile in the config directory (mode 0600) and forgotten
//! when the visitor deletes their data.

use std::io::Write;
use std::path::PathBuf;

use futures::StreamExt;
use hafen_sdk::Visitor;
use hafen_sdk::proto::webchat::v1 as pb;
use serde_json::{Value, json};

use crate::client::{ClientArgs, Failure, Outcome, exit, store_private_json, time};

/// `hafen visit`.
#[derive(clap::Args, Debug)]
pub struct VisitArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// The visitor's languages, best first, as a browser names them (`de-AT,de,en`): the
    /// widget's texts and consent text come in the first it has, else in its own language.
    #[arg(
        long = "language",
        global = true,
        env = "HAFEN_VISIT_LANGUAGES",
        value_delimiter = ','
    )]
    pub languages: Vec<String>,

    #[command(subcommand)]
    pub command: VisitCommand,
}

/// What a visitor does.
#[derive(clap::Subcommand, Debug)]
pub enum VisitCommand {
    /// Show what a widget shows before a chat: its welcome text, consent text, privacy link
    /// and pre-chat fields. Stores nothing.
    Config {
        /// The widget's id (public; it is in the website's embed code).
        widget: String,
        /// Call as a page of this origin (`https://host[:port]`), as a browser would.
        #[arg(long, env = "HAFEN_VISIT_ORIGIN")]
        origin: Option<String>,
    },
    /// Open a visit on a widget (or resume the stored one); nothing is asked.
    Start {
        /// The widget's id.
        widget: String,
        /// Call as a page of this origin (`https://host[:port]`), as a browser would.
        #[arg(long, env = "HAFEN_VISIT_ORIGIN")]
        origin: Option<String>,
        /// As a person the website vouches for: the site's id for them (with --issued-at and
        /// --signature).
        #[arg(long, requires = "signature", env = "HAFEN_VISIT_EXTERNAL_ID")]
        external_id: Option<String>,
        /// When the website's server signed, in seconds since the Unix epoch (good for 24
        /// hours).
        #[arg(long, requires = "signature", env = "HAFEN_VISIT_ISSUED_AT")]
        issued_at: Option<i64>,
        /// The hex HMAC-SHA256 of `<issued-at>.<external-id>` under the widget's identity
        /// secret, as the website's server computes it.
        #[arg(
            long,
            requires_all = ["external_id", "issued_at"],
            env = "HAFEN_VISIT_SIGNATURE"
        )]
        signature: Option<String>,
    },
    /// Answer the widget's current consent text.
    Consent {
        /// Grant consent.
        #[arg(
            long,
            conflicts_with = "decline",
            required_unless_present = "decline",
            env = "HAFEN_VISIT_GRANT"
        )]
        grant: bool,
        /// Decline consent.
        #[arg(long, env = "HAFEN_VISIT_DECLINE")]
        decline: bool,
    },
    /// Give pre-chat fields, e.g. `topic=Billing email=me@example.com --release email`.
    Fields(FieldArgs),
    /// Send a message to the organisation's agents.
    Send {
        /// The message.
        #[arg(required = true)]
        text: Vec<String>,
    },
    /// Leave a message when nobody answers now (outside business hours: the offline form).
    /// It needs consent; an agent answers when back.
    Leave {
        /// The message.
        #[arg(required = true)]
        text: Vec<String>,
    },
    /// Show the chat so far; with --follow, then wait for new messages until interrupted.
    Messages {
        /// Keep following new messages.
        #[arg(long, short = 'f', env = "HAFEN_VISIT_FOLLOW")]
        follow: bool,
    },
    /// Everything stored about this visit (GDPR Art. 15).
    MyData,
    /// Correct stored fields (Art. 16), e.g. `email=new@example.com --release email`.
    Correct(FieldArgs),
    /// Download this visit's data as JSON (Art. 15 and 20) to a file (or standard output
    /// with `-`).
    Export {
        /// Where to write it (default: the file name the service suggests).
        #[arg(long, env = "HAFEN_VISIT_EXPORT_FILE")]
        file: Option<PathBuf>,
    },
    /// Delete this visit's data for good (Art. 17); the stored visit is forgotten.
    Delete,
}

/// Field values on the command line.
#[derive(clap::Args, Debug)]
pub struct FieldArgs {
    /// KEY=VALUE pairs.
    #[arg(required = true)]
    fields: Vec<String>,
    /// Release a personal field to the organisation (repeatable); personal fields that are
    /// not released are refused.
    #[arg(
        long = "release",
        short = 'r',
        value_delimiter = ',',
        env = "HAFEN_VISIT_RELEASE"
    )]
    release: Vec<String>,
}

impl FieldArgs {
    /// The pairs as field values, `released` for the keys in `release`.
    fn values(&self) -> Result<Vec<pb::FieldValue>, Failure> {
        self.fields
            .iter()
            .map(|pair| {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| Failure::usage("fields are KEY=VALUE"))?;
                Ok(pb::FieldValue {
                    key: key.to_owned(),
                    value: value.to_owned(),
                    released: self.release.iter().any(|r| r == key),
                })
            })
            .collect()
    }
}

/// `hafen visit …`.
pub async fn run(args: VisitArgs) -> Outcome {
    let client = &args.client;
    match args.command {
        VisitCommand::Config { widget, origin } => {
            let visitor = connect(client, origin.as_deref())?;
            let config = widget_config(&visitor, &widget, &args.languages).await?;
            client.print(config_json(&config), || config_text(&config));
        }
        VisitCommand::Start {
            widget,
            origin,
            external_id,
            issued_at,
            signature,
        } => {
            let stored = Stored::load(client)?;
            if let Some(other) = stored.as_ref().filter(|s| s.widget != widget) {
                // Its token is the only way to that visit's data: never dropped silently.
                return Err(Failure::usage(format!(
                    "profile {} holds a visit of widget {}: delete it with `hafen visit \
                     delete`, or use another --profile",
                    client.profile, other.widget
                )));
            }
            let origin = origin.or_else(|| stored.as_ref().and_then(|s| s.origin.clone()));
            let mut visitor = connect(client, origin.as_deref())?;
            if let Some(stored) = &stored {
                visitor = visitor.with_token(&stored.token);
            }
            let config = widget_config(&visitor, &widget, &args.languages).await?;
            let visit = match (&external_id, issued_at, &signature) {
                (Some(id), Some(issued_at), Some(signature)) => {
                    visitor
                        .start_identified(&widget, id, issued_at, signature)
                        .await?
                }
                _ => visitor.start(&widget).await?,
            };
            Stored {
                widget: widget.clone(),
                origin,
                token: visit.visitor_token.clone(),
            }
            .store(client)?;
            let mut out = config_json(&config);
            out["visit_id"] = json!(visit.visit_id);
            out["resumed"] = json!(visit.resumed);
            out["identified"] = json!(visit.identified);
            out["expire_time"] = json!(time(visit.expire_time.as_ref()));
            out["consent"] = json!(visit.consent.as_ref().map(consent_json));
            client.print(out, || {
                format!(
                    "{} {}visit {} (until {}).\n\n{}",
                    if visit.resumed { "Resumed" } else { "Started" },
                    if visit.identified { "identified " } else { "" },
                    visit.visit_id,
                    time(visit.expire_time.as_ref()),
                    config_text(&config)
                )
            });
        }
        VisitCommand::Consent { grant, decline: _ } => {
            let (stored, visitor) = resume(client)?;
            let config = widget_config(&visitor, &stored.widget, &args.languages).await?;
            let text = config.consent_text.unwrap_or_default();
            let record = visitor
                .client()
                .give_consent(pb::GiveConsentRequest {
                    version: text.version,
                    granted: grant,
                    language: text.language,
                })
                .await
                .map_err(hafen_sdk::Error::from)?
                .into_inner();
            client.print(consent_json(&record), || {
                format!(
                    "Consent to text version {} {}.",
                    record.version,
                    if record.granted {
                        "granted"
                    } else {
                        "declined"
                    }
                )
            });
        }
        VisitCommand::Fields(fields) => {
            let (_, visitor) = resume(client)?;
            let fields = fields.values()?;
            let stored = visitor
                .client()
                .submit_fields(pb::SubmitFieldsRequest { fields })
                .await
                .map_err(hafen_sdk::Error::from)?
                .into_inner();
            client.print(json!({"stored_keys": stored.stored_keys}), || {
                format!("Stored: {}", stored.stored_keys.join(", "))
            });
        }
        command @ (VisitCommand::Send { .. } | VisitCommand::Leave { .. }) => {
            let (_, visitor) = resume(client)?;
            let mut calls = visitor.client();
            let sent = match command {
                VisitCommand::Leave { text } => {
                    calls
                        .leave_message(pb::SendVisitorMessageRequest {
                            request_id: uuid::Uuid::new_v4().to_string(),
                            body: text.join(" "),
                        })
                        .await
                }
                VisitCommand::Send { text } => {
                    calls
                        .send_visitor_message(pb::SendVisitorMessageRequest {
                            request_id: uuid::Uuid::new_v4().to_string(),
                            body: text.join(" "),
                        })
                        .await
                }
                _ => return Err(Failure::usage("send or leave")),
            }
            .map_err(hafen_sdk::Error::from)?
            .into_inner();
            client.print(message_json(&sent), || {
                format!(
                    "Sent (#{}{})",
                    sent.sequence,
                    if sent.masked { ", masked" } else { "" }
                )
            });
        }
        VisitCommand::Messages { follow } => {
            let (_, visitor) = resume(client)?;
            let mut stream = visitor
                .streaming_client()
                .subscribe_visit(pb::SubscribeVisitRequest {
                    after: String::new(),
                })
                .await
                .map_err(hafen_sdk::Error::from)?
                .into_inner();
            loop {
                let next = tokio::select! {
                    next = stream.next() => next,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(item) = next else { return Ok(()) };
                let item = item.map_err(hafen_sdk::Error::from)?;
                let (label, message) = match item.event {
                    Some(pb::subscribe_visit_response::Event::MessageCreated(m)) => ("created", m),
                    Some(pb::subscribe_visit_response::Event::MessageEdited(m)) => ("edited", m),
                    Some(pb::subscribe_visit_response::Event::MessageDeleted(m)) => ("deleted", m),
                    Some(pb::subscribe_visit_response::Event::CaughtUp(_)) if !follow => {
                        return Ok(());
                    }
                    _ => continue,
                };
                let mut line = message_json(&message);
                line["event"] = json!(label);
                line["cursor"] = json!(item.cursor);
                client.print(line, || match label {
                    "created" => message_line(&message),
                    other => format!("message #{} {other}", message.sequence),
                });
            }
        }
        VisitCommand::MyData => {
            let (_, visitor) = resume(client)?;
            let data = visitor
                .client()
                .get_my_data(pb::GetMyDataRequest {})
                .await
                .map_err(hafen_sdk::Error::from)?
                .into_inner();
            client.print(my_data_json(&data), || my_data_text(&data));
        }
        VisitCommand::Correct(fields) => {
            let (_, visitor) = resume(client)?;
            let fields = fields.values()?;
            let data = visitor
                .client()
                .correct_my_data(pb::CorrectMyDataRequest { fields })
                .await
                .map_err(hafen_sdk::Error::from)?
                .into_inner();
            client.print(my_data_json(&data), || my_data_text(&data));
        }
        VisitCommand::Export { file } => {
            let (_, visitor) = resume(client)?;
            let export = visitor
                .client()
                .export_my_data(pb::ExportMyDataRequest {})
                .await
                .map_err(hafen_sdk::Error::from)?
                .into_inner();
            // The suggested name, never a path: a file in the current directory.
            let suggested = std::path::Path::new(&export.file_name)
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("hafen-visit.json"));
            let file = file.unwrap_or(suggested);
            if file.as_os_str() == "-" {
                let mut out = std::io::stdout().lock();
                writeln!(out, "{}", export.json)?;
                return Ok(());
            }
            crate::client::write_private(&file, export.json.as_bytes())?;
            client.print(json!({"file": file.display().to_string()}), || {
                format!("Your data is in {}.", file.display())
            });
        }
        VisitCommand::Delete => {
            let (_, visitor) = resume(client)?;
            let deleted = visitor.delete_my_data().await?;
            Stored::forget(client)?;
            client.print(
                json!({"delete_time": time(deleted.delete_time.as_ref())}),
                || "Your data is deleted; this visit is over.".to_owned(),
            );
        }
    }
    Ok(())
}

/// The visit kept for a profile.
struct Stored {
    widget: String,
    origin: Option<String>,
    token: String,
}

impl Stored {
    fn load(client: &ClientArgs) -> Result<Option<Self>, Failure> {
        let file = client.profile_file("visits")?;
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let value: Value = serde_json::from_str(&text)
            .map_err(|_| Failure::usage("the stored visit is unreadable: start a new one"))?;
        let text = |key: &str| value[key].as_str().map(str::to_owned);
        Ok(match (text("widget"), text("token")) {
            (Some(widget), Some(token)) => Some(Self {
                widget,
                origin: text("origin"),
                token,
            }),
            _ => None,
        })
    }

    fn store(&self, client: &ClientArgs) -> Result<(), Failure> {
        let file = client.profile_file("visits")?;
        store_private_json(
            &file,
            &json!({"widget": self.widget, "origin": self.origin, "token": self.token}),
        )?;
        Ok(())
    }

    fn forget(client: &ClientArgs) -> Result<(), Failure> {
        match std::fs::remove_file(client.profile_file("visits")?) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err.into()),
            _ => Ok(()),
        }
    }
}

fn connect(client: &ClientArgs, origin: Option<&str>) -> Result<Visitor, Failure> {
    let visitor = Visitor::connect(&client.config()?)?;
    Ok(match origin {
        Some(origin) => visitor.with_origin(origin)?,
        None => visitor,
    })
}

/// The stored visit and a visitor carrying its token.
fn resume(client: &ClientArgs) -> Result<(Stored, Visitor), Failure> {
    let stored = Stored::load(client)?.ok_or_else(|| {
        Failure::new(
            exit::UNAUTHENTICATED,
            format!(
                "no visit (profile {}): run `hafen visit start <widget>` first",
                client.profile
            ),
        )
    })?;
    let visitor = connect(client, stored.origin.as_deref())?.with_token(&stored.token);
    Ok((stored, visitor))
}

async fn widget_config(
    visitor: &Visitor,
    widget: &str,
    languages: &[String],
) -> Result<pb::WidgetConfig, Failure> {
    Ok(visitor
        .client()
        .get_widget_config(pb::GetWidgetConfigRequest {
            widget_id: widget.to_owned(),
            languages: languages.to_vec(),
        })
        .await
        .map_err(hafen_sdk::Error::from)?
        .into_inner())
}

fn config_json(c: &pb::WidgetConfig) -> Value {
    json!({
        "widget_id": c.widget_id,
        "privacy_policy_url": c.privacy_policy_url,
        "welcome_message": c.welcome_message,
        "offline_message": c.offline_message,
        "allow_anonymous_chat": c.allow_anonymous_chat,
        "online": c.online,
        "language": c.language,
        "consent_text": c.consent_text.as_ref().map(|t| json!({
            "version": t.version,
            "language": t.language,
            "text": t.text,
            "text_sha256": hex::encode(&t.text_sha256),
        })),
        "pre_chat_fields": c.pre_chat_fields.iter().map(|f| json!({
            "key": f.key,
            "label": f.label,
            "personal": f.personal,
            "purpose": f.purpose,
            "required": f.required,
        })).collect::<Vec<_>>(),
    })
}

fn config_text(c: &pb::WidgetConfig) -> String {
    let mut out = vec![if c.online {
        c.welcome_message.clone()
    } else {
        format!(
            "{} (Nobody answers now: `hafen visit leave` leaves a message.)",
            c.offline_message
        )
    }];
    if let Some(text) = &c.consent_text {
        out.push(format!(
            "Consent (version {}, {}): {}",
            text.version, text.language, text.text
        ));
    }
    out.push(format!("Privacy policy: {}", c.privacy_policy_url));
    for f in &c.pre_chat_fields {
        out.push(format!(
            "Field {} ({}{}{}): {}",
            f.key,
            f.label,
            if f.personal { ", personal" } else { "" },
            if f.required { ", required" } else { "" },
            f.purpose
        ));
    }
    out.join("\n")
}

fn consent_json(r: &pb::ConsentRecord) -> Value {
    json!({
        "version": r.version,
        "text_sha256": hex::encode(&r.text_sha256),
        "granted": r.granted,
        "decide_time": time(r.decide_time.as_ref()),
        "language": r.language,
    })
}

fn message_json(m: &pb::VisitMessage) -> Value {
    json!({
        "message_id": m.message_id,
        "sequence": m.sequence,
        "from_visitor": m.from_visitor,
        "body": m.body,
        "masked": m.masked,
        "create_time": time(m.create_time.as_ref()),
        "edit_time": time(m.edit_time.as_ref()),
        "delete_time": time(m.delete_time.as_ref()),
    })
}

fn message_line(m: &pb::VisitMessage) -> String {
    let who = if m.from_visitor { "you" } else { "agent" };
    let body = if m.delete_time.is_some() {
        "(deleted)"
    } else {
        &m.body
    };
    format!("{} {who}: {body}", time(m.create_time.as_ref()))
}

fn my_data_json(d: &pb::MyData) -> Value {
    json!({
        "visit_id": d.visit_id,
        "create_time": time(d.create_time.as_ref()),
        "expire_time": time(d.expire_time.as_ref()),
        "fields": d.fields.iter().map(|f| json!({
            "key": f.key, "value": f.value, "released": f.released,
        })).collect::<Vec<_>>(),
        "consent_records": d.consent_records.iter().map(consent_json).collect::<Vec<_>>(),
        "messages": d.messages.iter().map(message_json).collect::<Vec<_>>(),
    })
}

fn my_data_text(d: &pb::MyData) -> String {
    let mut out = vec![format!(
        "Visit {} since {}, until {}",
        d.visit_id,
        time(d.create_time.as_ref()),
        time(d.expire_time.as_ref())
    )];
    for f in &d.fields {
        out.push(format!(
            "  {} = {}{}",
            f.key,
            f.value,
            if f.released { " (released)" } else { "" }
        ));
    }
    for r in &d.consent_records {
        out.push(format!(
            "  consent version {} {} at {}",
            r.version,
            if r.granted { "granted" } else { "declined" },
            time(r.decide_time.as_ref())
        ));
    }
    for m in &d.messages {
        out.push(format!("  {}", message_line(m)));
    }
    out.join("\n")
}
