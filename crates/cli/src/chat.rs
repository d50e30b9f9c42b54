//! `hafen login`, `hafen logout` and `hafen chat …`: a user's side of Hafen, on the SDK.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use futures::StreamExt;
use hafen_sdk::Hafen;
use hafen_sdk::proto::auth::v1 as auth_pb;
use hafen_sdk::proto::messaging::v1 as pb;
use hafen_sdk::proto::webchat::v1 as webchat_pb;
use serde_json::{Value, json};

use crate::client::{ClientArgs, Failure, Outcome, exit, secret, time};

/// Options of `hafen login`.
#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// The organisation's short name (slug).
    #[arg(long, env = "HAFEN_TENANT")]
    pub tenant: String,

    /// Your username.
    #[arg(long, env = "HAFEN_USERNAME")]
    pub username: String,

    /// This device's chat code (from your administrator; shown once when issued).
    #[arg(long, env = "HAFEN_CHAT_CODE", hide_env_values = true)]
    pub chat_code: String,

    /// A name for this device in your list of devices (default: the chat code's label).
    #[arg(long, env = "HAFEN_DEVICE_LABEL", default_value = "")]
    pub device_label: String,

    /// Read the password from this file instead of HAFEN_PASSWORD or the terminal.
    #[arg(long, env = "HAFEN_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
}

/// Options of `hafen logout`.
#[derive(clap::Args, Debug)]
pub struct LogoutArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `hafen chat`.
#[derive(clap::Args, Debug)]
pub struct ChatArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    #[command(subcommand)]
    pub command: ChatCommand,
}

/// What `hafen chat` does. A conversation is named by its id or by its title.
#[derive(clap::Subcommand, Debug)]
pub enum ChatCommand {
    /// List my conversations.
    Conversations,
    /// List my website chats (as an agent) with what each visitor gave agents to see: the
    /// fields that are not personal and the personal ones the visitor released. Answer with
    /// `hafen chat send <conversation id>`.
    Visitors,
    /// Start a group conversation with other users (by username or user id).
    Create {
        /// The group's title.
        title: String,
        /// A member (repeatable).
        #[arg(
            long = "member",
            short = 'm',
            env = "HAFEN_CHAT_MEMBERS",
            value_delimiter = ','
        )]
        members: Vec<String>,
        /// Make it a channel open to everyone in the organisation instead.
        #[arg(long, env = "HAFEN_CHAT_CHANNEL")]
        channel: bool,
    },
    /// Open (or find) the direct conversation with one user.
    Direct {
        /// Username or user id.
        user: String,
    },
    /// Send a message; without TEXT, the message is read from standard input.
    Send {
        /// Conversation id or title.
        conversation: String,
        /// The message.
        text: Vec<String>,
    },
    /// Show the latest messages of a conversation, oldest first.
    History {
        /// Conversation id or title.
        conversation: String,
        /// How many.
        #[arg(long, env = "HAFEN_HISTORY_LIMIT", default_value_t = 20)]
        limit: usize,
    },
    /// Follow new messages in all my conversations (or one) until interrupted. Reconnects and
    /// resumes by itself; ends with exit code 8 when this device is wiped.
    Tail {
        /// Only this conversation (id or title).
        #[arg(long, env = "HAFEN_TAIL_CONVERSATION")]
        conversation: Option<String>,
        /// Resume after this cursor (printed with every event in JSON output).
        #[arg(long, env = "HAFEN_TAIL_AFTER")]
        after: Option<String>,
    },
    /// Ask for the erasure of my account (GDPR Art. 17): my key is destroyed, so my messages
    /// can never be read again, my account is pseudonymised and every session of mine ends.
    /// Carried out at once, or after the organisation's grace period (the account is
    /// deactivated meanwhile; an admin reactivating it cancels the request). Final.
    EraseMe {
        /// Confirm that this is meant.
        #[arg(long, env = "HAFEN_CONFIRM_ERASE")]
        yes: bool,
    },
    /// Download my data (GDPR Art. 15 and 20) as a ZIP archive: my account, devices and
    /// sessions, memberships, every message I sent (decrypted) and the audit events about me.
    ExportMe {
        /// Where to write the archive.
        #[arg(long, env = "HAFEN_EXPORT_OUT")]
        out: PathBuf,
    },
}

/// `hafen login`.
pub async fn login(args: LoginArgs) -> Outcome {
    let password = secret(args.password_file.as_deref(), "HAFEN_PASSWORD", "Password")?;
    let hafen = args.client.connect_storing()?;
    let session = hafen
        .login(hafen_sdk::Login {
            tenant: args.tenant.clone(),
            username: args.username.clone(),
            password,
            chat_code: args.chat_code.clone(),
            device_label: args.device_label.clone(),
        })
        .await?;
    args.client.print(
        json!({
            "tenant": session.tenant,
            "tenant_id": session.tenant_id,
            "user_id": session.user_id,
            "session_id": session.session_id,
            "profile": args.client.profile,
        }),
        || {
            format!(
                "Logged in to {} as {} (profile {}).",
                args.tenant, args.username, args.client.profile
            )
        },
    );
    Ok(())
}

/// `hafen logout`.
pub async fn logout(args: LogoutArgs) -> Outcome {
    match args.client.logged_in().await {
        Ok(hafen) => {
            let ended = hafen.logout().await;
            args.client.forget_session()?;
            // A session the server had already ended counts as logged out.
            if let Err(err) = ended
                && err.code() != Some(tonic::Code::Unauthenticated)
            {
                return Err(err.into());
            }
        }
        Err(failure) if failure.code == exit::UNAUTHENTICATED => args.client.forget_session()?,
        Err(failure) => return Err(failure),
    }
    args.client
        .print(json!({"logged_out": true}), || "Logged out.".to_owned());
    Ok(())
}

/// Downloads the export of `user`'s data (empty: mine) to `out`, checking every chunk's
/// offset and the archive's SHA-256 before the file is kept; what it wrote, as JSON.
pub(crate) async fn save_user_export(
    hafen: &Hafen,
    user: String,
    out: &std::path::Path,
) -> Result<Value, Failure> {
    use sha2::Digest as _;
    let result = hafen
        .tenant()
        .export_user_data(hafen_sdk::proto::tenant::v1::ExportUserDataRequest {
            user_id: user,
            chunk_size: 0,
        })
        .await;
    let mut stream = hafen.check(result).await?;
    let partial = out.with_extension("partial");
    let mut file = std::fs::File::create(&partial)
        .map_err(|err| Failure::new(exit::FAILED, format!("{}: {err}", partial.display())))?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0_u64;
    let mut complete = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(hafen_sdk::Error::from)?;
        if chunk.offset != size {
            return Err(Failure::new(
                exit::FAILED,
                "a chunk of the export is missing",
            ));
        }
        std::io::Write::write_all(&mut file, &chunk.data)
            .map_err(|err| Failure::new(exit::FAILED, format!("{}: {err}", partial.display())))?;
        hasher.update(&chunk.data);
        size += chunk.data.len() as u64;
        if chunk.last_chunk {
            complete = Some((chunk.total_size, chunk.sha256));
            break;
        }
    }
    let digest = hasher.finalize().to_vec();
    match complete {
        Some((total, sha256)) if total == size && sha256 == digest => {}
        _ => {
            let _ = std::fs::remove_file(&partial);
            return Err(Failure::new(
                exit::FAILED,
                "the export is incomplete or damaged; run it again",
            ));
        }
    }
    std::fs::rename(&partial, out)
        .map_err(|err| Failure::new(exit::FAILED, format!("{}: {err}", out.display())))?;
    Ok(json!({"file": out.display().to_string(), "size": size, "sha256": hex::encode(digest)}))
}

/// `hafen chat …`.
pub async fn run(args: ChatArgs) -> Outcome {
    let client = &args.client;
    let hafen = client.logged_in().await?;
    match args.command {
        ChatCommand::ExportMe { out } => {
            let saved = save_user_export(&hafen, String::new(), &out).await?;
            client.print(saved.clone(), || {
                format!(
                    "Wrote your data to {} ({} bytes).",
                    out.display(),
                    saved["size"]
                )
            });
        }
        ChatCommand::EraseMe { yes } => {
            if !yes {
                return Err(Failure::usage(
                    "erasing your account is final: run again with --yes",
                ));
            }
            let result = hafen
                .auth()
                .request_erasure(auth_pb::RequestErasureRequest {})
                .await;
            let user = hafen.check(result).await?;
            // Every session of the account ended, this one too.
            client.forget_session()?;
            let due = time(user.erasure_due_time.as_ref());
            client.print(
                json!({
                    "user_id": user.user_id,
                    "erased": user.state == auth_pb::UserState::Erased as i32,
                    "erasure_due_time": due,
                }),
                || {
                    if user.state == auth_pb::UserState::Erased as i32 {
                        "Your account is erased.".to_owned()
                    } else {
                        format!("Your account is deactivated and will be erased at {due}.")
                    }
                },
            );
        }
        ChatCommand::Conversations => {
            let conversations = hafen.conversations().await?;
            client.print(
                Value::Array(conversations.iter().map(conversation_json).collect()),
                || {
                    conversations
                        .iter()
                        .map(|c| {
                            format!(
                                "{}  {:<8} {:<24} {} members, {} messages",
                                c.conversation_id,
                                kind_name(c.kind),
                                c.title,
                                c.member_count,
                                c.last_sequence
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        ChatCommand::Visitors => {
            let chats = visitor_chats(&hafen).await?;
            client.print(
                Value::Array(chats.iter().map(|c| c.json()).collect()),
                || {
                    if chats.is_empty() {
                        return "No website chats.".to_owned();
                    }
                    chats
                        .iter()
                        .map(VisitorChat::line)
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        ChatCommand::Create {
            title,
            members,
            channel,
        } => {
            let mut ids = Vec::new();
            for member in &members {
                ids.push(user_id(&hafen, member).await?);
            }
            let kind = if channel {
                pb::ConversationKind::Channel
            } else {
                pb::ConversationKind::Group
            };
            let created = create(&hafen, kind, &title, ids).await?;
            client.print(conversation_json(&created), || {
                format!("Created {} ({})", created.title, created.conversation_id)
            });
        }
        ChatCommand::Direct { user } => {
            let other = user_id(&hafen, &user).await?;
            let created = create(&hafen, pb::ConversationKind::Direct, "", vec![other]).await?;
            client.print(conversation_json(&created), || {
                format!("Direct conversation {}", created.conversation_id)
            });
        }
        ChatCommand::Send { conversation, text } => {
            let conversation = conversation_id(&hafen, &conversation).await?;
            let body = if text.is_empty() {
                let mut body = String::new();
                std::io::stdin().read_to_string(&mut body)?;
                body.trim_end_matches('\n').to_owned()
            } else {
                text.join(" ")
            };
            let sent = hafen.send_message(&conversation, &body).await?;
            client.print(message_json(&sent), || {
                format!(
                    "Sent (#{}{})",
                    sent.sequence,
                    if sent.masked { ", masked" } else { "" }
                )
            });
        }
        ChatCommand::History {
            conversation,
            limit,
        } => {
            let conversation = conversation_id(&hafen, &conversation).await?;
            let messages = hafen.history(&conversation, limit).await?;
            let names = Names::load(&hafen).await;
            client.print(
                Value::Array(messages.iter().map(message_json).collect()),
                || {
                    messages
                        .iter()
                        .map(|m| names.line(m, None))
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        ChatCommand::Tail {
            conversation,
            after,
        } => {
            let only = match conversation {
                Some(conversation) => Some(conversation_id(&hafen, &conversation).await?),
                None => None,
            };
            let mut titles: HashMap<String, String> = hafen
                .conversations()
                .await?
                .into_iter()
                .map(|c| (c.conversation_id, c.title))
                .collect();
            let mut names = Names::load(&hafen).await;
            if client.output == crate::client::Output::Text {
                eprintln!("Following new messages; Ctrl-C to stop.");
            }
            let mut events = hafen.subscribe(after);
            loop {
                let next = tokio::select! {
                    next = events.next() => next,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                };
                let Some(event) = next else { return Ok(()) };
                let event = event?;
                let Some(payload) = event.event else { continue };
                let (label, message) = match payload {
                    pb::subscribe_response::Event::MessageCreated(m) => ("created", m),
                    pb::subscribe_response::Event::MessageEdited(m) => ("edited", m),
                    pb::subscribe_response::Event::MessageDeleted(m) => ("deleted", m),
                    pb::subscribe_response::Event::MembershipChanged(change) => {
                        if let Some(c) = &change.conversation {
                            titles.insert(c.conversation_id.clone(), c.title.clone());
                        }
                        names = Names::load(&hafen).await;
                        continue;
                    }
                    pb::subscribe_response::Event::CaughtUp(_) => continue,
                };
                if only.as_ref().is_some_and(|c| *c != message.conversation_id) {
                    continue;
                }
                let title = titles
                    .get(&message.conversation_id)
                    .cloned()
                    .unwrap_or_default();
                let mut line = message_json(&message);
                line["event"] = json!(label);
                line["cursor"] = json!(event.cursor);
                client.print(line, || match label {
                    "created" => names.line(&message, Some(&title)),
                    other => format!("[{title}] message #{} {other}", message.sequence),
                });
            }
        }
    }
    Ok(())
}

/// A website chat of mine and what its visitor released.
struct VisitorChat {
    conversation: pb::Conversation,
    /// `None`: the visitor's data is gone (deleted by the visitor, or the visit expired).
    visitor: Option<webchat_pb::GetVisitorFieldsResponse>,
}

impl VisitorChat {
    fn fields(&self) -> Vec<(String, String)> {
        self.visitor
            .iter()
            .flat_map(|v| &v.fields)
            .map(|f| (f.key.clone(), f.value.clone()))
            .collect()
    }

    fn json(&self) -> Value {
        let mut out = conversation_json(&self.conversation);
        out["visit_id"] = json!(self.visitor.as_ref().map(|v| v.visit_id.clone()));
        out["fields"] = self
            .fields()
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
        out
    }

    fn line(&self) -> String {
        let c = &self.conversation;
        let about = match &self.visitor {
            None => "visitor's data deleted".to_owned(),
            Some(_) if self.fields().is_empty() => "no fields given".to_owned(),
            Some(_) => self
                .fields()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        format!(
            "{}  {} messages, last {}  [{about}]",
            c.conversation_id,
            c.last_sequence,
            time(c.update_time.as_ref()),
        )
    }
}

/// My website chats, newest activity first, each with its visitor's released fields.
async fn visitor_chats(hafen: &Hafen) -> Result<Vec<VisitorChat>, Failure> {
    let mut chats: Vec<pb::Conversation> = hafen
        .conversations()
        .await?
        .into_iter()
        .filter(|c| c.kind == pb::ConversationKind::Webchat as i32)
        .collect();
    chats.sort_by_key(|c| std::cmp::Reverse(c.update_time.as_ref().map(|t| (t.seconds, t.nanos))));
    let mut out = Vec::with_capacity(chats.len());
    for conversation in chats {
        let result = hafen
            .widgets()
            .get_visitor_fields(webchat_pb::GetVisitorFieldsRequest {
                conversation_id: conversation.conversation_id.clone(),
            })
            .await;
        let visitor = match hafen.check(result).await {
            Ok(fields) => Some(fields),
            Err(err) if err.code() == Some(tonic::Code::NotFound) => None,
            Err(err) => return Err(err.into()),
        };
        out.push(VisitorChat {
            conversation,
            visitor,
        });
    }
    Ok(out)
}

async fn create(
    hafen: &Hafen,
    kind: pb::ConversationKind,
    title: &str,
    members: Vec<String>,
) -> Result<pb::Conversation, Failure> {
    let result = hafen
        .messaging()
        .create_conversation(pb::CreateConversationRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            kind: kind as i32,
            title: title.to_owned(),
            member_user_ids: members,
        })
        .await;
    Ok(hafen.check(result).await?)
}

/// The id of the conversation named by `name` (an id, or a unique title of mine).
async fn conversation_id(hafen: &Hafen, name: &str) -> Result<String, Failure> {
    if uuid::Uuid::try_parse(name).is_ok() {
        return Ok(name.to_owned());
    }
    let matching: Vec<pb::Conversation> = hafen
        .conversations()
        .await?
        .into_iter()
        .filter(|c| c.title.eq_ignore_ascii_case(name))
        .collect();
    match matching.as_slice() {
        [one] => Ok(one.conversation_id.clone()),
        [] => Err(Failure::new(
            exit::NOT_FOUND,
            format!("no conversation titled {name:?}; see `hafen chat conversations`"),
        )),
        _ => Err(Failure::usage(format!(
            "several conversations are titled {name:?}: use the id"
        ))),
    }
}

/// The id of the user named by `name` (an id or a username).
pub(crate) async fn user_id(hafen: &Hafen, name: &str) -> Result<String, Failure> {
    if uuid::Uuid::try_parse(name).is_ok() {
        return Ok(name.to_owned());
    }
    let users = all_users(hafen, false).await?;
    users
        .into_iter()
        .find(|u| u.username.eq_ignore_ascii_case(name))
        .map(|u| u.user_id)
        .ok_or_else(|| Failure::new(exit::NOT_FOUND, format!("no user {name:?}")))
}

/// Every user of my organisation (all pages).
pub(crate) async fn all_users(
    hafen: &Hafen,
    include_deactivated: bool,
) -> Result<Vec<auth_pb::User>, Failure> {
    let mut users = Vec::new();
    let mut page_token = String::new();
    loop {
        let result = hafen
            .auth()
            .list_users(auth_pb::ListUsersRequest {
                page_size: 500,
                page_token: page_token.clone(),
                include_deactivated,
            })
            .await;
        let page = hafen.check(result).await?;
        users.extend(page.users);
        if page.next_page_token.is_empty() {
            return Ok(users);
        }
        page_token = page.next_page_token;
    }
}

/// Display names by user id, for printing.
struct Names(HashMap<String, String>);

impl Names {
    async fn load(hafen: &Hafen) -> Self {
        let users = all_users(hafen, false).await.unwrap_or_default();
        Self(
            users
                .into_iter()
                .map(|u| (u.user_id, u.display_name))
                .collect(),
        )
    }

    fn line(&self, message: &pb::Message, title: Option<&str>) -> String {
        let sender = self
            .0
            .get(&message.sender_user_id)
            .cloned()
            .unwrap_or_else(|| message.sender_user_id.chars().take(8).collect());
        let at = time(message.create_time.as_ref());
        let body = if message.sender_erased {
            "(erased with its sender)".to_owned()
        } else if message.delete_time.is_some() {
            "(deleted)".to_owned()
        } else {
            message.body.clone()
        };
        match title {
            Some(title) => format!("{at} [{title}] {sender}: {body}"),
            None => format!("{at} {sender}: {body}"),
        }
    }
}

fn kind_name(kind: i32) -> &'static str {
    match pb::ConversationKind::try_from(kind) {
        Ok(pb::ConversationKind::Direct) => "direct",
        Ok(pb::ConversationKind::Group) => "group",
        Ok(pb::ConversationKind::Channel) => "channel",
        Ok(pb::ConversationKind::Webchat) => "webchat",
        _ => "unknown",
    }
}

fn conversation_json(c: &pb::Conversation) -> Value {
    json!({
        "conversation_id": c.conversation_id,
        "kind": kind_name(c.kind),
        "title": c.title,
        "member_count": c.member_count,
        "member_user_ids": c.member_user_ids,
        "last_sequence": c.last_sequence,
        "create_time": time(c.create_time.as_ref()),
        "update_time": time(c.update_time.as_ref()),
    })
}

fn message_json(m: &pb::Message) -> Value {
    json!({
        "message_id": m.message_id,
        "conversation_id": m.conversation_id,
        "sequence": m.sequence,
        "sender_user_id": m.sender_user_id,
        "body": m.body,
        "masked": m.masked,
        "create_time": time(m.create_time.as_ref()),
        "edit_time": time(m.edit_time.as_ref()),
        "delete_time": time(m.delete_time.as_ref()),
        "sender_erased": m.sender_erased,
    })
}
