//! ExportUserData (GDPR Art. 15 and 20; CB9 for users): one user's own data as a ZIP archive,
//! streamed like ExportTenant (`crate::export::stream_archive`).
//!
//! The archive holds README.txt, profile.json, devices.json, memberships.json,
//! messages.jsonl (everything the user sent, bodies decrypted) and audit.jsonl (the
//! organisation's audit events by or about them). Messages, sessions and audit events are
//! read page by page, so memory does not grow with the user's history.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_store::keyring::{KeyRing, body_context};
use hafen_store::schema::{
    audit_events, chat_codes, conversations, members, messages, sessions, users,
};
use hafen_store::{Databases, TenantId};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::Error;
use crate::export::{JsonList, PAGE, Piece, time};

const README: &str = "\
Export of your data in a Hafen organisation (GDPR Art. 15 and 20).

profile.json        your account: id, username, display name, role, state, times, whether a
                    second factor is enrolled; no password hash, secret or chat code
devices.json        the devices your chat codes were issued for, and your sessions with their
                    times; no token or code
memberships.json    the conversations you are a member of
messages.jsonl      every message you sent, in any conversation, oldest first, one JSON object
                    per line; bodies as stored, i.e. masked as they were when sent; deleted
                    messages without a body
audit.jsonl         the organisation's audit events you did or that were about you, oldest
                    first; ids and actions only, never content

Messages other people sent are not part of this export.
";

#[derive(Queryable)]
struct Profile {
    id: Uuid,
    username: String,
    display_name: String,
    role: String,
    status: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    deactivated_at: Option<DateTime<Utc>>,
    totp_enabled_at: Option<DateTime<Utc>>,
}

#[derive(Queryable)]
struct Code {
    id: Uuid,
    device_label: String,
    state: String,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

#[derive(Queryable)]
struct Session {
    id: Uuid,
    device_label: String,
    created_at: DateTime<Utc>,
    refreshed_at: Option<DateTime<Utc>>,
    refresh_expires_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    revoke_reason: Option<String>,
}

#[derive(Queryable)]
struct Audit {
    sequence: i64,
    event_id: Uuid,
    occurred_at: DateTime<Utc>,
    actor_kind: String,
    actor_id: String,
    action: String,
    target_type: String,
    target_id: String,
    outcome: String,
    attributes: serde_json::Value,
}

#[derive(Queryable)]
struct Message {
    id: Uuid,
    conversation_id: Uuid,
    sequence: i64,
    ciphertext: Option<Vec<u8>>,
    masked: bool,
    created_at: DateTime<Utc>,
    edited_at: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
}

/// Whether `user` is a user of `tenant` whose data can be exported (not erased).
pub async fn exportable(
    databases: &Databases,
    tenant: &TenantId,
    user: Uuid,
) -> Result<bool, Error> {
    let pool = databases.tenant_pool(tenant).await?;
    hafen_store::with_tenant(&pool, tenant, move |conn| {
        Box::pin(async move {
            Ok::<_, Error>(
                diesel::select(diesel::dsl::exists(
                    users::table.find(user).filter(users::status.ne("erased")),
                ))
                .get_result(conn)
                .await?,
            )
        })
    })
    .await
}

/// Reads everything of `user` the archive holds and hands it to the writer, file by file.
pub(crate) async fn read_user(
    databases: &Databases,
    keys: &KeyRing,
    tenant: &TenantId,
    user: Uuid,
    pieces: &mpsc::Sender<Piece>,
) -> Result<(), Error> {
    let give = |piece: Piece| async move {
        pieces
            .send(piece)
            .await
            .map_err(|_| Error::Config("the export's writer stopped".into()))
    };
    let pool = databases.tenant_pool(tenant).await?;

    give(Piece::File("README.txt".into(), false)).await?;
    give(Piece::Bytes(README.as_bytes().to_vec())).await?;

    let (profile, codes, memberships) = hafen_store::with_tenant(&pool, tenant, move |conn| {
        Box::pin(async move {
            let profile: Profile = users::table
                .find(user)
                .select((
                    users::id,
                    users::username,
                    users::display_name,
                    users::role,
                    users::status,
                    users::created_at,
                    users::updated_at,
                    users::deactivated_at,
                    users::totp_enabled_at,
                ))
                .first(conn)
                .await
                .optional()?
                .ok_or(Error::NotFound)?;
            let codes: Vec<Code> = chat_codes::table
                .filter(chat_codes::user_id.eq(user))
                .order(chat_codes::created_at.asc())
                .select((
                    chat_codes::id,
                    chat_codes::device_label,
                    chat_codes::state,
                    chat_codes::created_at,
                    chat_codes::last_used_at,
                    chat_codes::revoked_at,
                ))
                .load(conn)
                .await?;
            let memberships: Vec<(Uuid, String, String, DateTime<Utc>)> = members::table
                .inner_join(conversations::table)
                .filter(members::user_id.eq(user))
                .order(members::joined_at.asc())
                .select((
                    conversations::id,
                    conversations::kind,
                    conversations::title,
                    members::joined_at,
                ))
                .load(conn)
                .await?;
            Ok::<_, Error>((profile, codes, memberships))
        })
    })
    .await?;

    let profile_json = json!({
        "user_id": profile.id,
        "username": profile.username,
        "display_name": profile.display_name,
        "role": profile.role,
        "state": profile.status,
        "created_at": time(profile.created_at),
        "updated_at": time(profile.updated_at),
        "deactivated_at": profile.deactivated_at.map(time),
        "totp_enrolled": profile.totp_enabled_at.is_some(),
    });
    give(Piece::File("profile.json".into(), false)).await?;
    give(Piece::Bytes(
        serde_json::to_vec_pretty(&profile_json).unwrap_or_default(),
    ))
    .await?;

    // devices.json: the chat codes' devices, then the sessions (control plane), a page at a time.
    give(Piece::File("devices.json".into(), false)).await?;
    let mut head = b"{\n\"chat_codes\": ".to_vec();
    let codes_json: Vec<_> = codes
        .iter()
        .map(|c| {
            json!({
                "chat_code_id": c.id,
                "device_label": c.device_label,
                "state": c.state,
                "created_at": time(c.created_at),
                "last_used_at": c.last_used_at.map(time),
                "revoked_at": c.revoked_at.map(time),
            })
        })
        .collect();
    head.extend(serde_json::to_vec_pretty(&codes_json).unwrap_or_default());
    head.extend(b",\n\"sessions\": ");
    give(Piece::Bytes(head)).await?;
    let mut list = JsonList::default();
    let mut after: Option<(DateTime<Utc>, Uuid)> = None;
    loop {
        let page: Vec<Session> = {
            let mut conn = databases.main_connection().await?;
            let mut query = sessions::table
                .filter(sessions::tenant_id.eq(tenant.as_uuid()))
                .filter(sessions::user_id.eq(user))
                .order((sessions::created_at.asc(), sessions::id.asc()))
                .limit(PAGE)
                .select((
                    sessions::id,
                    sessions::device_label,
                    sessions::created_at,
                    sessions::refreshed_at,
                    sessions::refresh_expires_at,
                    sessions::revoked_at,
                    sessions::revoke_reason,
                ))
                .into_boxed();
            if let Some((at, id)) = after {
                query = query.filter(
                    sessions::created_at
                        .gt(at)
                        .or(sessions::created_at.eq(at).and(sessions::id.gt(id))),
                );
            }
            query.load(&mut conn).await?
        };
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.id));
        let items = page.iter().map(|session| {
            json!({
                "session_id": session.id,
                "device_label": session.device_label,
                "created_at": time(session.created_at),
                "refreshed_at": session.refreshed_at.map(time),
                "expires_at": time(session.refresh_expires_at),
                "revoked_at": session.revoked_at.map(time),
                "revoke_reason": session.revoke_reason,
            })
        });
        give(Piece::Bytes(list.items(items))).await?;
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    let mut tail = list.end();
    tail.extend(b"}\n");
    give(Piece::Bytes(tail)).await?;

    let memberships_json: Vec<_> = memberships
        .iter()
        .map(|(id, kind, title, joined)| {
            json!({
                "conversation_id": id,
                "kind": kind,
                "title": title,
                "joined_at": time(*joined),
            })
        })
        .collect();
    give(Piece::File("memberships.json".into(), false)).await?;
    give(Piece::Bytes(
        serde_json::to_vec_pretty(&memberships_json).unwrap_or_default(),
    ))
    .await?;

    // messages.jsonl: what the user sent, oldest first, opened with their key.
    give(Piece::File("messages.jsonl".into(), true)).await?;
    let mut after: Option<(DateTime<Utc>, Uuid)> = None;
    loop {
        let page: Vec<Message> = hafen_store::with_tenant(&pool, tenant, move |conn| {
            Box::pin(async move {
                let mut query = messages::table
                    .filter(messages::sender_id.eq(user))
                    .order((messages::created_at.asc(), messages::id.asc()))
                    .limit(PAGE)
                    .select((
                        messages::id,
                        messages::conversation_id,
                        messages::sequence,
                        messages::ciphertext,
                        messages::masked,
                        messages::created_at,
                        messages::edited_at,
                        messages::deleted_at,
                    ))
                    .into_boxed();
                if let Some((at, id)) = after {
                    query = query.filter(
                        messages::created_at
                            .gt(at)
                            .or(messages::created_at.eq(at).and(messages::id.gt(id))),
                    );
                }
                Ok::<_, Error>(query.load(conn).await?)
            })
        })
        .await?;
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.id));
        let mut lines = Vec::new();
        for message in &page {
            let body = match &message.ciphertext {
                Some(sealed) => {
                    let key = keys.user_key(tenant.as_uuid(), user).await?;
                    let plain = key
                        .open(&body_context(message.id, message.conversation_id), sealed)
                        .map_err(hafen_store::Error::from)?;
                    Some(String::from_utf8_lossy(&plain).into_owned())
                }
                None => None,
            };
            let line = json!({
                "message_id": message.id,
                "conversation_id": message.conversation_id,
                "sequence": message.sequence,
                "body": body,
                "masked": message.masked,
                "created_at": time(message.created_at),
                "edited_at": message.edited_at.map(time),
                "deleted_at": message.deleted_at.map(time),
            });
            serde_json::to_writer(&mut lines, &line).unwrap_or_default();
            lines.push(b'\n');
        }
        give(Piece::Bytes(lines)).await?;
        if (page.len() as i64) < PAGE {
            break;
        }
    }

    // audit.jsonl: the tenant's chain, events by or about the user.
    give(Piece::File("audit.jsonl".into(), true)).await?;
    let (me, chain) = (user.to_string(), tenant.as_uuid());
    let mut after = 0_i64;
    loop {
        let me = me.clone();
        let page: Vec<Audit> = {
            let mut conn = databases.main_connection().await?;
            audit_events::table
                .filter(audit_events::chain.eq(chain))
                .filter(audit_events::sequence.gt(after))
                .filter(
                    audit_events::actor_kind
                        .eq("user")
                        .and(audit_events::actor_id.eq(me.clone()))
                        .or(audit_events::target_type
                            .eq("user")
                            .and(audit_events::target_id.eq(me))),
                )
                .order(audit_events::sequence.asc())
                .limit(PAGE)
                .select((
                    audit_events::sequence,
                    audit_events::event_id,
                    audit_events::occurred_at,
                    audit_events::actor_kind,
                    audit_events::actor_id,
                    audit_events::action,
                    audit_events::target_type,
                    audit_events::target_id,
                    audit_events::outcome,
                    audit_events::attributes,
                ))
                .load(&mut conn)
                .await?
        };
        let Some(last) = page.last() else { break };
        after = last.sequence;
        let mut lines = Vec::new();
        for event in &page {
            let line = json!({
                "sequence": event.sequence,
                "event_id": event.event_id,
                "occurred_at": time(event.occurred_at),
                "actor": { "kind": event.actor_kind, "id": event.actor_id },
                "action": event.action,
                "target": { "type": event.target_type, "id": event.target_id },
                "outcome": event.outcome,
                "attributes": event.attributes,
            });
            serde_json::to_writer(&mut lines, &line).unwrap_or_default();
            lines.push(b'\n');
        }
        give(Piece::Bytes(lines)).await?;
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    Ok(())
}
