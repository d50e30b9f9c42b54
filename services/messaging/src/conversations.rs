//! Conversations and their members (OC7): direct conversations (one per pair), groups,
//! channels open to the tenant, and website chats. A membership change is an event of the log.

use chrono::{DateTime, Utc};
use hafen_authn::Principal;
use hafen_store::{AsyncPgConnection, now};
use uuid::Uuid;

use crate::error::Error;
use crate::repo::{self, NewConversationRow};
use crate::rows::{ConversationRow, ConversationView, Membership, event_kind, kind};
use crate::service::Messaging;

/// Most users AddMembers or CreateConversation takes at once.
const MAX_MEMBERS_PER_CALL: usize = 500;

/// A validated CreateConversation request.
#[derive(Debug, Clone)]
pub struct NewConversation {
    pub request_id: Option<Uuid>,
    pub kind: &'static str,
    pub title: String,
    pub members: Vec<Uuid>,
}

impl Messaging {
    /// Creates a conversation (a direct one only once per pair).
    pub async fn create_conversation(
        &self,
        caller: &Principal,
        new: NewConversation,
    ) -> Result<ConversationView, Error> {
        match new.kind {
            kind::CHANNEL if !caller.role.is_admin() => {
                return Err(Error::PermissionDenied(
                    "only admins and the owner create channels",
                ));
            }
            kind::WEBCHAT
                if !self
                    .inner
                    .rules
                    .get(caller.tenant_id)
                    .await?
                    .settings
                    .features
                    .webchat =>
            {
                return Err(Error::FeatureDisabled("webchat"));
            }
            _ => {}
        }
        let mut wanted: Vec<Uuid> = new.members.clone();
        wanted.retain(|id| *id != caller.user_id);
        wanted.sort();
        wanted.dedup();
        if new.kind == kind::DIRECT && wanted.len() != 1 {
            return Err(Error::invalid(
                "member_user_ids",
                "a direct conversation has exactly one other user",
            ));
        }
        if wanted.len() > MAX_MEMBERS_PER_CALL {
            return Err(Error::invalid("member_user_ids", "at most 500 users"));
        }
        let direct_key = (new.kind == kind::DIRECT).then(|| {
            let mut pair = [caller.user_id, wanted[0]];
            pair.sort();
            format!("{}:{}", pair[0].simple(), pair[1].simple())
        });
        let me = caller.user_id;
        let created = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    require_active_users(conn, &wanted, "member_user_ids").await?;
                    if let Some(request_id) = new.request_id
                        && let Some(existing) =
                            repo::conversation_by_request(conn, me, request_id).await?
                    {
                        if existing.kind != new.kind || existing.title != new.title {
                            return Err(Error::RequestIdConflict);
                        }
                        return repo::conversation_view(conn, existing, me).await;
                    }
                    if let Some(key) = &direct_key
                        && let Some(existing) = repo::direct_conversation(conn, key).await?
                    {
                        return repo::conversation_view(conn, existing, me).await;
                    }
                    let at = now();
                    let row = repo::insert_conversation(
                        conn,
                        NewConversationRow {
                            id: Uuid::now_v7(),
                            kind: new.kind,
                            title: &new.title,
                            creator: me,
                            direct_key: direct_key.as_deref(),
                            request_id: new.request_id,
                            at,
                        },
                    )
                    .await?;
                    let mut everyone = wanted.clone();
                    everyone.push(me);
                    repo::add_members(conn, row.id, &everyone, at).await?;
                    let detail = Membership {
                        added: everyone,
                        removed: Vec::new(),
                        actor: Some(me),
                    };
                    repo::append_event(
                        conn,
                        row.id,
                        event_kind::MEMBERSHIP,
                        None,
                        Some(&detail),
                        at,
                    )
                    .await?;
                    repo::conversation_view(conn, row, me).await
                })
            })
            .await?;
        self.inner.hub.wake(caller.tenant_id);
        Ok(created)
    }

    /// Conversations the caller is a member of, and every channel, oldest first, after
    /// `after` (creation time and id); at most `limit`, and whether there are more. A page
    /// takes the same number of queries whatever its size.
    pub async fn list_conversations(
        &self,
        caller: &Principal,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: usize,
    ) -> Result<(Vec<ConversationView>, bool), Error> {
        let me = caller.user_id;
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        self.scoped(caller.tenant_id, move |conn| {
            Box::pin(async move {
                let mut rows = repo::conversations_page(conn, me, after, fetch).await?;
                let more = rows.len() > limit;
                rows.truncate(limit);
                Ok((repo::conversation_views(conn, rows, me).await?, more))
            })
        })
        .await
    }

    /// Adds users to a group or channel; returns the conversation and who was added.
    pub async fn add_members(
        &self,
        caller: &Principal,
        conversation: Uuid,
        users: Vec<Uuid>,
    ) -> Result<(ConversationView, Vec<Uuid>), Error> {
        if users.is_empty() || users.len() > MAX_MEMBERS_PER_CALL {
            return Err(Error::invalid("user_ids", "name 1 to 500 users"));
        }
        let me = caller.user_id;
        let admin = caller.role.is_admin();
        let result = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    let row = visible_conversation(conn, conversation, me).await?;
                    let is_member = repo::is_member(conn, conversation, me).await?;
                    match row.kind.as_str() {
                        kind::DIRECT => {
                            return Err(Error::InvalidState(
                                "direct conversations have fixed members",
                            ));
                        }
                        kind::CHANNEL if !(admin || users == [me]) => {
                            return Err(Error::PermissionDenied(
                                "users join channels themselves; admins add others",
                            ));
                        }
                        kind::GROUP | kind::WEBCHAT if !is_member => {
                            return Err(Error::NotFound("conversation"));
                        }
                        _ => {}
                    }
                    require_active_users(conn, &users, "user_ids").await?;
                    let at = now();
                    let added = repo::add_members(conn, conversation, &users, at).await?;
                    if !added.is_empty() {
                        log_membership(conn, conversation, added.clone(), Vec::new(), me, at)
                            .await?;
                        repo::touch(conn, conversation, at).await?;
                    }
                    let row = visible_conversation(conn, conversation, me).await?;
                    Ok((repo::conversation_view(conn, row, me).await?, added))
                })
            })
            .await?;
        self.inner.hub.wake(caller.tenant_id);
        Ok(result)
    }

    /// Removes one member (an admin removing anyone, or a user leaving).
    pub async fn remove_member(
        &self,
        caller: &Principal,
        conversation: Uuid,
        user: Uuid,
    ) -> Result<(ConversationView, bool), Error> {
        let me = caller.user_id;
        let admin = caller.role.is_admin();
        let result = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    // Visibility first: someone who may not see the conversation learns
                    // nothing about it, not even that removing is not theirs to do.
                    let row = visible_conversation(conn, conversation, me).await?;
                    if user != me && !admin {
                        return Err(Error::PermissionDenied(
                            "only admins remove others; anyone may leave",
                        ));
                    }
                    if row.kind == kind::DIRECT {
                        return Err(Error::InvalidState(
                            "direct conversations have fixed members",
                        ));
                    }
                    let removed = repo::remove_member(conn, conversation, user).await?;
                    if removed {
                        let at = now();
                        log_membership(conn, conversation, Vec::new(), vec![user], me, at).await?;
                        repo::touch(conn, conversation, at).await?;
                    }
                    let row = repo::conversation(conn, conversation)
                        .await?
                        .ok_or(Error::NotFound("conversation"))?;
                    Ok((repo::conversation_view(conn, row, me).await?, removed))
                })
            })
            .await?;
        self.inner.hub.wake(caller.tenant_id);
        Ok(result)
    }
}

/// Appends the event of a membership change of `conversation` by `actor`.
async fn log_membership(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    added: Vec<Uuid>,
    removed: Vec<Uuid>,
    actor: Uuid,
    at: DateTime<Utc>,
) -> Result<(), Error> {
    let detail = Membership {
        added,
        removed,
        actor: Some(actor),
    };
    let kind = event_kind::MEMBERSHIP;
    repo::append_event(conn, conversation, kind, None, Some(&detail), at).await?;
    Ok(())
}

/// A conversation the caller may know of: one they belong to, or any channel.
async fn visible_conversation(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    me: Uuid,
) -> Result<ConversationRow, Error> {
    let row = repo::conversation(conn, conversation)
        .await?
        .ok_or(Error::NotFound("conversation"))?;
    if row.kind == kind::CHANNEL || repo::is_member(conn, conversation, me).await? {
        Ok(row)
    } else {
        Err(Error::NotFound("conversation"))
    }
}

/// Refuses unless every one of `ids` is an active user, naming `field`.
async fn require_active_users(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    field: &str,
) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    if repo::active_users(conn, ids).await? != ids.len() {
        return Err(Error::invalid(field, "names unknown or deactivated users"));
    }
    Ok(())
}
