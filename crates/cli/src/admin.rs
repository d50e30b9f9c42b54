//! `hafen admin …`: organisations (operator), users and chat codes (admins), widgets
//! ([`crate::widget`]), the audit trail and migrations.

use std::io::Write;
use std::path::PathBuf;

use futures::StreamExt;
use hafen_sdk::Hafen;
use hafen_sdk::proto::audit::v1 as audit_pb;
use hafen_sdk::proto::auth::v1 as auth_pb;
use hafen_sdk::proto::common::v1::Role;
use hafen_sdk::proto::tenant::v1 as tenant_pb;
use serde_json::{Value, json};

use crate::chat::{all_users, user_id};
use crate::client::{ClientArgs, Failure, Outcome, exit, secret, time};

/// `hafen admin`.
#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    #[command(subcommand)]
    pub command: AdminCommand,
}

/// What `hafen admin` manages.
#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Organisations (tenants); needs the operator's platform token.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Users of my organisation (admins and the owner).
    #[command(subcommand)]
    User(UserCommand),
    /// Chat codes: one per device; revoking one wipes that device (admins and the owner).
    #[command(subcommand)]
    ChatCode(ChatCodeCommand),
    /// The website chat's widgets of my organisation (admins and the owner).
    #[command(subcommand)]
    Widget(crate::widget::WidgetCommand),
    /// The tamper-evident audit trail of my organisation.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Upgrade the control plane and every tenant schema, then exit (once per deploy).
    Migrate(MigrateArgs),
}

/// `hafen admin tenant`.
#[derive(clap::Subcommand, Debug)]
pub enum TenantCommand {
    /// Create an organisation with its owner; prints the owner's first chat code once.
    Create {
        /// Short name, used at login: 3-40 of a-z, 0-9 and '-'.
        slug: String,
        /// The organisation's name.
        #[arg(long, env = "HAFEN_TENANT_NAME")]
        name: String,
        /// The owner's username.
        #[arg(long, env = "HAFEN_OWNER_USERNAME", default_value = "owner")]
        owner: String,
        /// The owner's display name.
        #[arg(long, env = "HAFEN_OWNER_NAME", default_value = "Owner")]
        owner_name: String,
        /// Read the owner's password from this file instead of HAFEN_OWNER_PASSWORD or the
        /// terminal.
        #[arg(long, env = "HAFEN_OWNER_PASSWORD_FILE")]
        owner_password_file: Option<PathBuf>,
        /// Version of the data-processing agreement the organisation accepted.
        #[arg(long, env = "HAFEN_DPA_VERSION", default_value = "2025-01")]
        dpa_version: String,
        /// Hosting region.
        #[arg(long, env = "HAFEN_REGION", default_value = "eu-central")]
        region: String,
    },
    /// List organisations.
    List {
        /// Include deleted ones.
        #[arg(long, env = "HAFEN_SHOW_DELETED")]
        deleted: bool,
    },
    /// Delete an organisation and all its data for good.
    Delete {
        /// The organisation's slug.
        slug: String,
        /// Type the slug again to confirm.
        #[arg(long, env = "HAFEN_CONFIRM_SLUG")]
        confirm: String,
    },
    /// Recover an owner who lost every device: wipes the owner's devices and prints one new
    /// chat code, once, to hand to the owner over a verified channel (audited in the
    /// organisation's chain; you never learn the owner's password).
    RecoverOwner {
        /// The organisation's slug.
        slug: String,
    },
}

/// `hafen admin user`.
#[derive(clap::Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user (password from --password-file, HAFEN_NEW_PASSWORD or the terminal).
    Create {
        /// Username (login name).
        username: String,
        /// Display name (default: the username).
        #[arg(long, env = "HAFEN_DISPLAY_NAME")]
        name: Option<String>,
        /// Make the user an admin (owner only).
        #[arg(long, env = "HAFEN_MAKE_ADMIN")]
        admin: bool,
        /// Read the new user's password from this file.
        #[arg(long, env = "HAFEN_NEW_PASSWORD_FILE")]
        password_file: Option<PathBuf>,
    },
    /// List users.
    List {
        /// Include deactivated users.
        #[arg(long, env = "HAFEN_INCLUDE_DEACTIVATED")]
        all: bool,
    },
    /// Deactivate a user: no more logins, and every session ends at once.
    Deactivate {
        /// Username or user id.
        user: String,
    },
    /// Download a user's data for a data-subject request (GDPR Art. 15 and 20) as a ZIP
    /// archive, as the user would get it with `hafen chat export-me`; audited.
    Export {
        /// Username or user id.
        user: String,
        /// Where to write the archive.
        #[arg(long, env = "HAFEN_EXPORT_OUT")]
        out: PathBuf,
    },
    /// Erase a user (GDPR Art. 17), at once and for good: their key is destroyed, so their
    /// messages can never be read again (in backups neither), their messages become
    /// tombstones, their memberships, sessions and chat codes end, and the account is
    /// pseudonymised (the username is free again). Refused under a legal hold.
    Erase {
        /// Username or user id.
        user: String,
        /// Confirm that this is meant.
        #[arg(long, env = "HAFEN_CONFIRM_ERASE")]
        yes: bool,
    },
}

/// `hafen admin chat-code`.
#[derive(clap::Subcommand, Debug)]
pub enum ChatCodeCommand {
    /// Issue a chat code for one device of a user; printed once, never again.
    Issue {
        /// Username or user id.
        user: String,
        /// Which device it is for.
        #[arg(long, env = "HAFEN_DEVICE_LABEL", default_value = "device")]
        label: String,
    },
    /// List chat codes (of one user with --user).
    List {
        /// Username or user id.
        #[arg(long, env = "HAFEN_CHAT_CODE_USER")]
        user: Option<String>,
    },
    /// Revoke a chat code: the device's sessions end and it is told to wipe itself.
    Revoke {
        /// The chat code's id.
        chat_code_id: String,
    },
}

/// `hafen admin audit`.
#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify the audit chain on the server, or an exported file offline (--file). Exit code
    /// 10 when a link is broken.
    Verify {
        /// Verify this export (JSON Lines from `audit export`) without asking the server:
        /// every hash link and every signed head.
        #[arg(long, env = "HAFEN_AUDIT_FILE")]
        file: Option<PathBuf>,
        /// With --file: the chain's public key (hex, as the tenant record and VerifyChain
        /// give it), which every signature must verify with. Without it the export's own key
        /// is used, which proves consistency but not who signed.
        #[arg(long, env = "HAFEN_AUDIT_PUBLIC_KEY", requires = "file")]
        public_key: Option<String>,
    },
    /// List audit events, newest first (ids, actions and outcomes; never content).
    Events {
        /// Only this action; ending in "." it is a prefix, e.g. `auth.login.`.
        #[arg(long, env = "HAFEN_AUDIT_ACTION", default_value = "")]
        action: String,
        /// Only events of this actor (a user id).
        #[arg(long, env = "HAFEN_AUDIT_ACTOR", default_value = "")]
        actor: String,
        /// How many.
        #[arg(long, env = "HAFEN_AUDIT_LIMIT", default_value_t = 50)]
        limit: usize,
    },
    /// Export the audit trail as JSON Lines with its hashes, verifiable offline.
    Export {
        /// Write to this file instead of standard output.
        #[arg(long, env = "HAFEN_AUDIT_OUT")]
        out: Option<PathBuf>,
    },
}

/// `hafen admin migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub databases: hafen_store::DatabasesArgs,

    /// Tenants migrated at the same time.
    #[arg(long, env = "HAFEN_MIGRATE_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
}

/// `hafen admin …`.
pub async fn run(args: AdminArgs) -> Outcome {
    let client = &args.client;
    match args.command {
        AdminCommand::Tenant(command) => tenant(client, command).await,
        AdminCommand::User(command) => user(client, command).await,
        AdminCommand::ChatCode(command) => chat_code(client, command).await,
        AdminCommand::Widget(command) => crate::widget::run(client, command).await,
        AdminCommand::Audit(command) => audit(client, command).await,
        AdminCommand::Migrate(migrate) => {
            let options = hafen_tenant::migrate::Options {
                concurrency: migrate.concurrency,
                progress: true,
            };
            let report = hafen_tenant::migrate::migrate_all(
                &migrate.databases.main.database_url,
                migrate.databases.keystore_url.as_deref(),
                &migrate.databases.placements_map(),
                &options,
            )
            .await
            .map_err(|err| Failure::new(exit::FAILED, err.to_string()))?;
            client.print(
                json!({
                    "control_plane": report.control_plane,
                    "tenants": report.tenants,
                    "upgraded": report.upgraded,
                    "current": report.current,
                    "failed": report.failed.iter().map(|(id, why)| json!({"tenant_id": id, "error": why})).collect::<Vec<_>>(),
                }),
                || {
                    format!(
                        "{} tenants: {} upgraded, {} current, {} failed",
                        report.tenants,
                        report.upgraded,
                        report.current,
                        report.failed.len()
                    )
                },
            );
            if report.failed.is_empty() {
                Ok(())
            } else {
                Err(Failure::new(exit::FAILED, "some tenants were not migrated"))
            }
        }
    }
}

async fn tenant(client: &ClientArgs, command: TenantCommand) -> Outcome {
    let hafen = client.operator()?;
    match command {
        TenantCommand::Create {
            slug,
            name,
            owner,
            owner_name,
            owner_password_file,
            dpa_version,
            region,
        } => {
            let password = secret(
                owner_password_file.as_deref(),
                "HAFEN_OWNER_PASSWORD",
                "Owner's password",
            )?;
            let result = hafen
                .tenant()
                .create_tenant(tenant_pb::CreateTenantRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    slug,
                    display_name: name,
                    owner_username: owner.clone(),
                    owner_display_name: owner_name,
                    owner_password: password,
                    dpa_version,
                    region,
                    database: String::new(),
                })
                .await;
            let created = hafen.check(result).await?;
            let tenant = created.tenant.unwrap_or_default();
            client.print(
                json!({
                    "tenant": tenant_json(&tenant),
                    "owner_user_id": created.owner_user_id,
                    "owner_chat_code": created.owner_chat_code,
                    "owner_chat_code_id": created.owner_chat_code_id,
                }),
                || {
                    format!(
                        "Created {} ({}).\nOwner {owner}'s chat code (shown once): {}",
                        tenant.slug, tenant.tenant_id, created.owner_chat_code
                    )
                },
            );
        }
        TenantCommand::List { deleted } => {
            let mut tenants = Vec::new();
            let mut page_token = String::new();
            loop {
                let result = hafen
                    .tenant()
                    .list_tenants(tenant_pb::ListTenantsRequest {
                        page_size: 500,
                        page_token: page_token.clone(),
                        show_deleted: deleted,
                    })
                    .await;
                let page = hafen.check(result).await?;
                tenants.extend(page.tenants);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            client.print(
                Value::Array(tenants.iter().map(tenant_json).collect()),
                || {
                    tenants
                        .iter()
                        .map(|t| format!("{}  {:<20} {}", t.tenant_id, t.slug, t.display_name))
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        TenantCommand::Delete { slug, confirm } => {
            let result = hafen
                .tenant()
                .get_tenant(tenant_pb::GetTenantRequest {
                    tenant_id: String::new(),
                    slug: slug.clone(),
                })
                .await;
            let tenant = hafen.check(result).await?;
            let result = hafen
                .tenant()
                .delete_tenant(tenant_pb::DeleteTenantRequest {
                    tenant_id: tenant.tenant_id.clone(),
                    confirm_slug: confirm,
                    password: String::new(),
                    totp_code: String::new(),
                })
                .await;
            let deleted = hafen.check(result).await?;
            client.print(
                json!({"tenant_id": deleted.tenant_id, "delete_time": time(deleted.delete_time.as_ref())}),
                || format!("Deleted {slug} ({}).", deleted.tenant_id),
            );
        }
        TenantCommand::RecoverOwner { slug } => {
            let result = hafen
                .tenant()
                .get_tenant(tenant_pb::GetTenantRequest {
                    tenant_id: String::new(),
                    slug: slug.clone(),
                })
                .await;
            let tenant = hafen.check(result).await?;
            let result = hafen
                .tenant()
                .recover_owner(tenant_pb::RecoverOwnerRequest {
                    tenant_id: tenant.tenant_id.clone(),
                })
                .await;
            let recovered = hafen.check(result).await?;
            client.print(
                json!({
                    "tenant_id": tenant.tenant_id,
                    "owner_chat_code": recovered.owner_chat_code,
                    "owner_chat_code_id": recovered.owner_chat_code_id,
                }),
                || {
                    format!(
                        "The owner of {slug} has a new chat code (shown once): {}\nTheir other devices are wiped.",
                        recovered.owner_chat_code
                    )
                },
            );
        }
    }
    Ok(())
}

async fn user(client: &ClientArgs, command: UserCommand) -> Outcome {
    let hafen = client.logged_in().await?;
    match command {
        UserCommand::Create {
            username,
            name,
            admin,
            password_file,
        } => {
            let password = secret(
                password_file.as_deref(),
                "HAFEN_NEW_PASSWORD",
                "The new user's password",
            )?;
            let result = hafen
                .auth()
                .create_user(auth_pb::CreateUserRequest {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    display_name: name.unwrap_or_else(|| username.clone()),
                    username,
                    role: if admin { Role::Admin } else { Role::Member } as i32,
                    credential: Some(auth_pb::create_user_request::Credential::Password(password)),
                })
                .await;
            let user = hafen.check(result).await?;
            client.print(user_json(&user), || {
                format!("Created {} ({}).", user.username, user.user_id)
            });
        }
        UserCommand::List { all } => {
            let users = all_users(&hafen, all).await?;
            client.print(Value::Array(users.iter().map(user_json).collect()), || {
                users
                    .iter()
                    .map(|u| {
                        format!(
                            "{}  {:<20} {:<24} {}",
                            u.user_id,
                            u.username,
                            u.display_name,
                            role_name(u.role)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        UserCommand::Deactivate { user } => {
            let id = user_id(&hafen, &user).await?;
            let result = hafen
                .auth()
                .deactivate_user(auth_pb::DeactivateUserRequest { user_id: id })
                .await;
            let user = hafen.check(result).await?;
            client.print(user_json(&user), || {
                format!("Deactivated {}.", user.username)
            });
        }
        UserCommand::Export { user, out } => {
            let id = user_id(&hafen, &user).await?;
            let saved = crate::chat::save_user_export(&hafen, id, &out).await?;
            client.print(saved.clone(), || {
                format!(
                    "Wrote {user}'s data to {} ({} bytes).",
                    out.display(),
                    saved["size"]
                )
            });
        }
        UserCommand::Erase { user, yes } => {
            if !yes {
                return Err(Failure::usage(
                    "erasing a user is final: run again with --yes",
                ));
            }
            let id = user_id(&hafen, &user).await?;
            let result = hafen
                .auth()
                .erase_user(auth_pb::EraseUserRequest { user_id: id })
                .await;
            let erased = hafen.check(result).await?;
            client.print(user_json(&erased), || format!("Erased {user}."));
        }
    }
    Ok(())
}

async fn chat_code(client: &ClientArgs, command: ChatCodeCommand) -> Outcome {
    let hafen = client.logged_in().await?;
    match command {
        ChatCodeCommand::Issue { user, label } => {
            let id = user_id(&hafen, &user).await?;
            let result = hafen
                .auth()
                .issue_chat_code(auth_pb::IssueChatCodeRequest {
                    user_id: id,
                    device_label: label,
                })
                .await;
            let issued = hafen.check(result).await?;
            let record = issued.chat_code.unwrap_or_default();
            let mut out = code_json(&record);
            out["code"] = json!(issued.code);
            client.print(out, || {
                format!(
                    "Chat code for {} (shown once, hand it over separately): {}",
                    record.device_label, issued.code
                )
            });
        }
        ChatCodeCommand::List { user } => {
            let user_id = match user {
                Some(user) => user_id(&hafen, &user).await?,
                None => String::new(),
            };
            let mut codes = Vec::new();
            let mut page_token = String::new();
            loop {
                let result = hafen
                    .auth()
                    .list_chat_codes(auth_pb::ListChatCodesRequest {
                        user_id: user_id.clone(),
                        page_size: 500,
                        page_token: page_token.clone(),
                    })
                    .await;
                let page = hafen.check(result).await?;
                codes.extend(page.chat_codes);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            client.print(Value::Array(codes.iter().map(code_json).collect()), || {
                codes
                    .iter()
                    .map(|c| {
                        format!(
                            "{}  {:<16} {:<8} user {}",
                            c.chat_code_id,
                            c.device_label,
                            code_state(c.state),
                            c.user_id
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        ChatCodeCommand::Revoke { chat_code_id } => {
            let result = hafen
                .auth()
                .revoke_chat_code(auth_pb::RevokeChatCodeRequest { chat_code_id })
                .await;
            let code = hafen.check(result).await?;
            client.print(code_json(&code), || {
                format!(
                    "Revoked {}: its sessions ended and the device is told to wipe itself.",
                    code.device_label
                )
            });
        }
    }
    Ok(())
}

async fn audit(client: &ClientArgs, command: AuditCommand) -> Outcome {
    match command {
        AuditCommand::Verify {
            file: Some(file),
            public_key,
        } => {
            let document = std::fs::read_to_string(&file)
                .map_err(|err| Failure::usage(format!("{}: {err}", file.display())))?;
            let trusted = public_key
                .map(|key| hex::decode(key.trim()))
                .transpose()
                .map_err(|_| Failure::usage("--public-key: expected hex"))?;
            let verified = hafen_events::chain::verify_export(&document, trusted.as_deref())
                .map_err(|err| Failure::new(exit::BROKEN_CHAIN, err))?;
            let broken = verified.broken.clone();
            let key_trusted = trusted.is_some();
            client.print(
                json!({
                    "intact": broken.is_none(),
                    "events_checked": verified.events,
                    "signatures_checked": verified.signatures,
                    "public_key": verified.public_key,
                    "public_key_trusted": key_trusted,
                    "first_broken_sequence": broken.as_ref().map(|(s, _)| *s),
                    "problem": broken.as_ref().map(|(_, why)| why.clone()),
                    "first_prev_hash": verified.first_prev_hash,
                    "last_hash": verified.last_hash,
                }),
                || match &broken {
                    None if !key_trusted => format!(
                        "Consistent: {} events, {} signed heads (key {}, taken from the export \
                         itself); last hash {}. This does not prove who signed: compare the key \
                         with the tenant record's, or pass it with --public-key",
                        verified.events,
                        verified.signatures,
                        verified.public_key.clone().unwrap_or_default(),
                        verified.last_hash.clone().unwrap_or_default()
                    ),
                    None => format!(
                        "Intact: {} events, {} signed heads (key {}); last hash {}",
                        verified.events,
                        verified.signatures,
                        verified.public_key.clone().unwrap_or_default(),
                        verified.last_hash.clone().unwrap_or_default()
                    ),
                    Some((sequence, why)) => format!("BROKEN at event {sequence}: {why}"),
                },
            );
            match broken {
                None => Ok(()),
                Some(_) => Err(Failure::new(
                    exit::BROKEN_CHAIN,
                    "the export does not verify",
                )),
            }
        }
        AuditCommand::Verify { file: None, .. } => {
            let hafen = client.logged_in().await?;
            let result = hafen
                .audit()
                .verify_chain(audit_pb::VerifyChainRequest::default())
                .await;
            let verified = hafen.check(result).await?;
            client.print(
                json!({
                    "intact": verified.intact,
                    "events_checked": verified.events_checked,
                    "signatures_checked": verified.signatures_checked,
                    "head_signed": verified.head_signed,
                    "public_key": hex::encode(&verified.public_key),
                    "first_broken_sequence": verified.first_broken_sequence,
                    "head_sequence": verified.head_sequence,
                    "head_hash": hex::encode(&verified.head_hash),
                }),
                || {
                    if verified.intact {
                        format!(
                            "Intact: {} events, {} signed heads; head {} hash {}; public key {}",
                            verified.events_checked,
                            verified.signatures_checked,
                            verified.head_sequence,
                            hex::encode(&verified.head_hash),
                            hex::encode(&verified.public_key)
                        )
                    } else {
                        format!("BROKEN at event {}", verified.first_broken_sequence)
                    }
                },
            );
            if verified.intact {
                Ok(())
            } else {
                Err(Failure::new(
                    exit::BROKEN_CHAIN,
                    "the audit chain is broken",
                ))
            }
        }
        AuditCommand::Events {
            action,
            actor,
            limit,
        } => {
            let hafen = client.logged_in().await?;
            let mut events = Vec::new();
            let mut page_token = String::new();
            while events.len() < limit {
                let result = hafen
                    .audit()
                    .list_events(audit_pb::ListEventsRequest {
                        action: action.clone(),
                        actor_id: actor.clone(),
                        page_size: i32::try_from(limit - events.len()).unwrap_or(500).min(500),
                        page_token: page_token.clone(),
                        ..Default::default()
                    })
                    .await;
                let page = hafen.check(result).await?;
                events.extend(page.events);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            client.print(
                Value::Array(events.iter().map(event_json).collect()),
                || {
                    events
                        .iter()
                        .map(|e| {
                            let actor = e.actor.clone().unwrap_or_default();
                            format!(
                                "#{:<5} {}  {:<36} {:<9} by {} {}",
                                e.sequence,
                                time(e.time.as_ref()),
                                e.action,
                                outcome_name(e.outcome),
                                actor_kind(actor.kind),
                                actor.id
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
            Ok(())
        }
        AuditCommand::Export { out } => {
            let hafen = client.logged_in().await?;
            export(client, &hafen, out).await
        }
    }
}

async fn export(client: &ClientArgs, hafen: &Hafen, out: Option<PathBuf>) -> Outcome {
    let result = hafen
        .audit()
        .export_audit_log(audit_pb::ExportAuditLogRequest::default())
        .await;
    let mut stream = hafen.check(result).await?;
    let mut sink: Box<dyn Write> = match &out {
        Some(path) => Box::new(std::fs::File::create(path)?),
        None => Box::new(std::io::stdout()),
    };
    let bar = out.is_some().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(
            indicatif::ProgressStyle::with_template("exporting {bytes} {spinner}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        bar
    });
    let mut events = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(status) => {
                return Err(hafen.check::<()>(Err(status)).await.err().map_or_else(
                    || Failure::new(exit::FAILED, "export failed"),
                    Failure::from,
                ));
            }
        };
        sink.write_all(&chunk.data)?;
        if let Some(bar) = &bar {
            bar.set_position(chunk.offset + chunk.data.len() as u64);
        }
        if chunk.last_chunk {
            events = chunk.events_exported;
        }
    }
    sink.flush()?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(path) = out {
        client.print(
            json!({"events_exported": events, "file": path.display().to_string()}),
            || format!("Exported {events} events to {}.", path.display()),
        );
    }
    Ok(())
}

fn outcome_name(outcome: i32) -> &'static str {
    match audit_pb::Outcome::try_from(outcome) {
        Ok(audit_pb::Outcome::Success) => "success",
        Ok(audit_pb::Outcome::Failure) => "failure",
        Ok(audit_pb::Outcome::Denied) => "denied",
        _ => "unknown",
    }
}

fn actor_kind(kind: i32) -> &'static str {
    match audit_pb::ActorKind::try_from(kind) {
        Ok(audit_pb::ActorKind::User) => "user",
        Ok(audit_pb::ActorKind::Operator) => "operator",
        Ok(audit_pb::ActorKind::Service) => "service",
        Ok(audit_pb::ActorKind::System) => "system",
        _ => "unknown",
    }
}

fn event_json(e: &audit_pb::AuditEvent) -> Value {
    let actor = e.actor.clone().unwrap_or_default();
    json!({
        "sequence": e.sequence,
        "event_id": e.event_id,
        "time": time(e.time.as_ref()),
        "action": e.action,
        "actor_kind": actor_kind(actor.kind),
        "actor_id": actor.id,
        "target_type": e.target_type,
        "target_id": e.target_id,
        "outcome": outcome_name(e.outcome),
        "attributes": e.attributes,
        "hash": hex::encode(&e.hash),
    })
}

fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Member) => "member",
        Ok(Role::Admin) => "admin",
        Ok(Role::Owner) => "owner",
        _ => "unknown",
    }
}

fn code_state(state: i32) -> &'static str {
    match auth_pb::ChatCodeState::try_from(state) {
        Ok(auth_pb::ChatCodeState::Active) => "active",
        Ok(auth_pb::ChatCodeState::Revoked) => "revoked",
        Ok(auth_pb::ChatCodeState::Wiped) => "wiped",
        _ => "unknown",
    }
}

fn tenant_json(t: &tenant_pb::Tenant) -> Value {
    json!({
        "tenant_id": t.tenant_id,
        "slug": t.slug,
        "display_name": t.display_name,
        "region": t.region,
        "database": t.database,
    })
}

fn user_json(u: &auth_pb::User) -> Value {
    json!({
        "user_id": u.user_id,
        "username": u.username,
        "display_name": u.display_name,
        "role": role_name(u.role),
        "active": u.state == auth_pb::UserState::Active as i32,
        "state": match auth_pb::UserState::try_from(u.state) {
            Ok(auth_pb::UserState::Active) => "active",
            Ok(auth_pb::UserState::Deactivated) => "deactivated",
            Ok(auth_pb::UserState::Erased) => "erased",
            _ => "unknown",
        },
        "erasure_due_time": u.erasure_due_time.as_ref().map(|t| time(Some(t))),
        "create_time": time(u.create_time.as_ref()),
    })
}

fn code_json(c: &auth_pb::ChatCode) -> Value {
    json!({
        "chat_code_id": c.chat_code_id,
        "user_id": c.user_id,
        "device_label": c.device_label,
        "state": code_state(c.state),
        "create_time": time(c.create_time.as_ref()),
        "last_use_time": time(c.last_use_time.as_ref()),
    })
}
