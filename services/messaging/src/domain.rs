//! Conversations and messages (OC7, CB3, CB4, UL1, UL2): membership, sending with masking
//! and encryption, edits, tombstones, listing. Every write appends to the tenant's event
//! log in the same transaction; after commit, subscribers are woken (see `hub`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use futures::future::BoxFuture;
use hafen_authn::Principal;
use hafen_store::prepared::{INDEX_PROBES_ONLY, INDEX_PROBES_ONLY_FOR_SESSION, Prepared, bind};
use hafen_store::schema::{
    conversations, event_counter, events, legal_holds, members, messages, users,
};
use hafen_store::settings::Settings;
use hafen_store::{AsyncPgConnection, Databases, TenantId, now};
use uuid::Uuid;

use crate::error::Error;
use crate::hub::Hub;
use crate::mask::Masker;
use crate::rows::{
    ConversationRow, ConversationView, EventRow, Membership, MessageRow, MessageView, event_kind,
    kind,
};
use hafen_store::keyring::{KeyRing, body_context};

/// How long a tenant's settings (masking rules) are cached when no announcement of their
/// changes can arrive (no Redis channel followed): a change takes this long at most.
const SETTINGS_TTL: Duration = Duration::from_secs(1);

/// How long cached settings are kept while changes are announced: each change drops them at
/// once, so this only bounds how long a lost announcement could go unnoticed.
const SETTINGS_TTL_FOLLOWED: Duration = Duration::from_secs(60);
/// Most users AddMembers or CreateConversation takes at once.
const MAX_MEMBERS_PER_CALL: usize = 500;

/// A statement over the log after a cursor, of one member's conversations or all, with
/// `$select` before its `FROM` and `$rest` after it. The log is the union of `events` and the
/// messages' creation events (kept in the message rows, see `commit.rs`), in id order; each
/// side is read by its own index from the cursor on, at most the limit. Parameters, for each
/// side: the cursor, the member or NULL twice, the limit; then the limit of the whole. Under
/// an `OR`, the membership check stays a subquery on the member's key: an index scan of their
/// memberships, whatever plan is cached.
macro_rules! after_cursor {
    ($select:literal, $rest:literal) => {
        &[
            concat!(
                $select,
                " FROM (SELECT * FROM ((SELECT e.id, e.conversation_id, e.kind, e.message_id, \
                 e.detail, e.created_at FROM events e WHERE e.id > "
            ),
            "::bigint AND (",
            "::uuid IS NULL OR EXISTS (SELECT FROM members b \
             WHERE b.conversation_id = e.conversation_id AND b.user_id = ",
            "::uuid)) ORDER BY e.id LIMIT ",
            "::bigint) UNION ALL (SELECT m.event_id, m.conversation_id, 'message_created', \
             m.id, NULL::jsonb, m.created_at FROM messages m WHERE m.event_id > ",
            "::bigint AND (",
            "::uuid IS NULL OR EXISTS (SELECT FROM members b \
             WHERE b.conversation_id = m.conversation_id AND b.user_id = ",
            "::uuid)) ORDER BY m.event_id LIMIT ",
            "::bigint)) u ORDER BY id LIMIT ",
            concat!("::bigint) e", $rest),
        ]
    };
}

/// The feed's events.
const FEED_EVENTS: &[&str] = after_cursor!("SELECT e.*", "");

/// The messages the feed's events name, each found by one probe of the primary key.
const FEED_MESSAGES: &[&str] = after_cursor!(
    "SELECT m.*",
    " CROSS JOIN LATERAL (SELECT * FROM messages m WHERE m.id = e.message_id LIMIT 1) m"
);

/// A tenant's settings with its masking rules compiled.
type TenantRules = (Settings, Masker);

/// A body as stored: sealed, and the masked text that was sealed.
struct Sealed {
    ciphertext: Vec<u8>,
    masked: bool,
    body: String,
}

/// A validated CreateConversation request.
#[derive(Debug, Clone)]
pub struct NewConversation {
    pub request_id: Option<Uuid>,
    pub kind: &'static str,
    pub title: String,
    pub members: Vec<Uuid>,
}

/// The messaging domain service.
#[derive(Clone)]
pub struct Messaging {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub databases: Databases,
    /// The committers' pools: their connections are driven on the commit thread.
    commit_databases: Databases,
    pub keys: KeyRing,
    pub hub: Hub,
    pub max_body_bytes: usize,
    committer: crate::commit::Committer,
    settings: Mutex<HashMap<Uuid, (Arc<TenantRules>, Instant)>>,
    /// Bumped by every dropped setting, so a read that raced with a change is not cached.
    settings_epoch: std::sync::atomic::AtomicU64,
    /// Where settings changes are announced, and how long to cache while they are not.
    settings_followed: std::sync::OnceLock<(hafen_authn::Revocations, Duration)>,
    /// Delivers the outbox to the audit service.
    relay: std::sync::OnceLock<hafen_events::Relay>,
}

impl std::fmt::Debug for Messaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messaging").finish_non_exhaustive()
    }
}

impl Messaging {
    /// The service over `databases`, encrypting with `keys` and waking subscribers via `hub`.
    /// `commit_databases` are pools of the same databases for the group commit only; see
    /// [`crate::commit`].
    pub fn new(
        databases: Databases,
        commit_databases: Databases,
        keys: KeyRing,
        hub: Hub,
        max_body_bytes: usize,
        max_queued_sends: usize,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                databases,
                commit_databases,
                keys,
                hub,
                max_body_bytes,
                committer: crate::commit::Committer::new(max_queued_sends),
                settings: Mutex::new(HashMap::new()),
                settings_epoch: std::sync::atomic::AtomicU64::new(0),
                settings_followed: std::sync::OnceLock::new(),
                relay: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Wakes `relay` whenever audit events were committed (set once at start-up).
    pub fn set_relay(&self, relay: hafen_events::Relay) {
        let _ = self.inner.relay.set(relay);
    }

    fn audited(&self) {
        if let Some(relay) = self.inner.relay.get() {
            relay.wake();
        }
    }

    /// A pooled connection to `tenant`'s database (not yet in its scope).
    pub(crate) async fn tenant_connection(
        &self,
        tenant: Uuid,
    ) -> Result<hafen_store::PooledConnection, Error> {
        let tenant = TenantId::from(tenant);
        Ok(self.inner.databases.tenant_connection(&tenant).await?)
    }

    /// A connection to `tenant`'s database from the committers' pools, in the tenant's scope
    /// and under [`INDEX_PROBES_ONLY`] for the whole session (see
    /// [`hafen_store::tenancy::enter_session`]): for the tenant's committer alone, until it
    /// gives the connection back (the pool then resets both).
    pub(crate) async fn commit_connection(
        &self,
        tenant: Uuid,
    ) -> Result<hafen_store::PooledConnection, Error> {
        let tenant = TenantId::from(tenant);
        let conn = self
            .inner
            .commit_databases
            .tenant_connection(&tenant)
            .await?;
        let (scoped, planned) = futures::join!(
            hafen_store::tenancy::enter_session(&conn, &tenant),
            Prepared::text(INDEX_PROBES_ONLY_FOR_SESSION).execute(&mut &*conn),
        );
        scoped.and(planned)?;
        Ok(conn)
    }

    /// Runs `f` in `tenant`'s scope.
    pub(crate) async fn scoped<R, F>(&self, tenant: Uuid, f: F) -> Result<R, Error>
    where
        F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<R, Error>>,
    {
        let tenant = TenantId::from(tenant);
        let pool = self.inner.databases.tenant_pool(&tenant).await?;
        hafen_store::with_tenant(&pool, &tenant, f).await
    }

    /// Drops cached settings whenever `revocations` hears of a change, for the life of the
    /// process; while it does not follow the announcements, cached settings live at most
    /// `unfollowed_ttl` (the streams' poll interval).
    pub fn follow_settings(
        &self,
        revocations: &hafen_authn::Revocations,
        unfollowed_ttl: Duration,
    ) {
        let _ = self
            .inner
            .settings_followed
            .set((revocations.clone(), unfollowed_ttl));
        let mut changes = revocations.settings_changes();
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let changed = changes.recv().await;
                this.inner
                    .settings_epoch
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                let Ok(mut cache) = this.inner.settings.lock() else {
                    return;
                };
                match changed {
                    Ok(tenant) => {
                        cache.remove(&tenant);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => cache.clear(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    fn settings_epoch(&self) -> u64 {
        // Called by path: diesel's `load` is in scope too.
        std::sync::atomic::AtomicU64::load(
            &self.inner.settings_epoch,
            std::sync::atomic::Ordering::Acquire,
        )
    }

    /// How long settings cached at `at` may be used: long when every change since then was
    /// announced to this process, else the short fallback.
    fn settings_ttl(&self, at: Instant) -> Duration {
        match self.inner.settings_followed.get() {
            Some((revocations, unfollowed)) => match revocations.following_since() {
                Some(since) if since <= at => SETTINGS_TTL_FOLLOWED,
                _ => *unfollowed,
            },
            None => SETTINGS_TTL,
        }
    }

    /// The tenant's settings and compiled masking rules (cached until they change).
    async fn settings(&self, tenant: Uuid) -> Result<Arc<TenantRules>, Error> {
        if let Some((cached, at)) = self
            .inner
            .settings
            .lock()
            .ok()
            .and_then(|s| s.get(&tenant).cloned())
            && at.elapsed() < self.settings_ttl(at)
        {
            return Ok(cached);
        }
        let epoch = self.settings_epoch();
        // The entry's age counts from before the read: a change between it and the insert is
        // what the epoch or the short TTL must catch.
        let read_at = Instant::now();
        let row = {
            let mut conn = self.inner.databases.main_connection().await?;
            hafen_store::control::find(&mut conn, tenant).await?
        };
        let settings = row
            .map(|row| Settings::from_json(&row.settings))
            .ok_or(Error::Store(hafen_store::Error::UnknownTenant))?;
        let masker = Masker::new(&settings.masking);
        let entry = Arc::new((settings, masker));
        // Not cached when a change was announced while reading: it may predate it.
        if let Ok(mut cache) = self.inner.settings.lock()
            && self.settings_epoch() == epoch
        {
            cache.insert(tenant, (entry.clone(), read_at));
        }
        Ok(entry)
    }

    /// Decrypts rows for delivery, with their senders' keys.
    pub(crate) async fn views(
        &self,
        tenant: Uuid,
        rows: Vec<MessageRow>,
    ) -> Result<Vec<MessageView>, Error> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let body = match &row.ciphertext {
                Some(sealed) => {
                    let key = self.inner.keys.user_key(tenant, row.sender_id).await?;
                    let plain = key.open(&body_context(row.id, row.conversation_id), sealed)?;
                    String::from_utf8(plain.to_vec())
                        .map_err(|_| Error::Bug("a stored body is not UTF-8"))?
                }
                None => String::new(),
            };
            out.push(row.view(body));
        }
        Ok(out)
    }

    /// Masks and encrypts `body` for message `id` in `conversation` by `sender`; returns the
    /// masked text too, so a fresh message is answered without decrypting it again.
    async fn seal(
        &self,
        tenant: Uuid,
        sender: Uuid,
        id: Uuid,
        conversation: Uuid,
        body: &str,
    ) -> Result<Sealed, Error> {
        if body.trim().is_empty() {
            return Err(Error::invalid("body", "must not be empty"));
        }
        if body.len() > self.inner.max_body_bytes {
            return Err(Error::BodyTooLarge(self.inner.max_body_bytes));
        }
        let settings = self.settings(tenant).await?;
        let (masked_body, masked) = settings.1.apply(body);
        let key = self.inner.keys.user_key(tenant, sender).await?;
        let sealed = key.seal(&body_context(id, conversation), masked_body.as_bytes())?;
        Ok(Sealed {
            ciphertext: sealed,
            masked,
            body: masked_body,
        })
    }

    // --- conversations -------------------------------------------------------------------

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
            kind::WEBCHAT if !self.settings(caller.tenant_id).await?.0.features.webchat => {
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
                        && let Some(existing) = conversations::table
                            .filter(conversations::creator_id.eq(me))
                            .filter(conversations::create_request_id.eq(request_id))
                            .select(ConversationRow::as_select())
                            .first(conn)
                            .await
                            .optional()?
                    {
                        if existing.kind != new.kind || existing.title != new.title {
                            return Err(Error::RequestIdConflict);
                        }
                        return view(conn, existing, me).await;
                    }
                    if let Some(key) = &direct_key
                        && let Some(existing) = conversations::table
                            .filter(conversations::direct_key.eq(key))
                            .select(ConversationRow::as_select())
                            .first(conn)
                            .await
                            .optional()?
                    {
                        return view(conn, existing, me).await;
                    }
                    let at = now();
                    let row: ConversationRow = diesel::insert_into(conversations::table)
                        .values((
                            conversations::id.eq(Uuid::now_v7()),
                            conversations::kind.eq(new.kind),
                            conversations::title.eq(&new.title),
                            conversations::creator_id.eq(me),
                            conversations::direct_key.eq(&direct_key),
                            conversations::create_request_id.eq(new.request_id),
                            conversations::created_at.eq(at),
                            conversations::updated_at.eq(at),
                        ))
                        .returning(ConversationRow::as_returning())
                        .get_result(conn)
                        .await?;
                    let mut everyone = wanted.clone();
                    everyone.push(me);
                    add_member_rows(conn, row.id, &everyone, at).await?;
                    let detail = Membership {
                        added: everyone,
                        removed: Vec::new(),
                        actor: Some(me),
                    };
                    append_event(conn, row.id, event_kind::MEMBERSHIP, None, Some(&detail)).await?;
                    view(conn, row, me).await
                })
            })
            .await?;
        self.inner.hub.wake(caller.tenant_id);
        Ok(created)
    }

    /// Conversations the caller is a member of, and every channel, oldest first.
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
                let mine = members::table
                    .filter(members::user_id.eq(me))
                    .select(members::conversation_id);
                let mut query = conversations::table
                    .filter(
                        conversations::id
                            .eq_any(mine)
                            .or(conversations::kind.eq(kind::CHANNEL)),
                    )
                    .order((conversations::created_at.asc(), conversations::id.asc()))
                    .select(ConversationRow::as_select())
                    .limit(fetch)
                    .into_boxed();
                if let Some((at, id)) = after {
                    query = query.filter(
                        conversations::created_at
                            .gt(at)
                            .or(conversations::created_at
                                .eq(at)
                                .and(conversations::id.gt(id))),
                    );
                }
                let mut rows: Vec<ConversationRow> = query.load(conn).await?;
                let more = rows.len() > limit;
                rows.truncate(limit);
                let mut views = Vec::with_capacity(rows.len());
                for row in rows {
                    views.push(view(conn, row, me).await?);
                }
                Ok((views, more))
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
                    let is_member = is_member(conn, conversation, me).await?;
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
                    let added = add_member_rows(conn, conversation, &users, at).await?;
                    if !added.is_empty() {
                        let detail = Membership {
                            added: added.clone(),
                            removed: Vec::new(),
                            actor: Some(me),
                        };
                        append_event(
                            conn,
                            conversation,
                            event_kind::MEMBERSHIP,
                            None,
                            Some(&detail),
                        )
                        .await?;
                        touch(conn, conversation, at).await?;
                    }
                    let row = visible_conversation(conn, conversation, me).await?;
                    Ok((view(conn, row, me).await?, added))
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
                    let removed = diesel::delete(
                        members::table
                            .filter(members::conversation_id.eq(conversation))
                            .filter(members::user_id.eq(user)),
                    )
                    .execute(conn)
                    .await?
                        == 1;
                    if removed {
                        let detail = Membership {
                            added: Vec::new(),
                            removed: vec![user],
                            actor: Some(me),
                        };
                        append_event(
                            conn,
                            conversation,
                            event_kind::MEMBERSHIP,
                            None,
                            Some(&detail),
                        )
                        .await?;
                        touch(conn, conversation, now()).await?;
                    }
                    let row = conversations::table
                        .find(conversation)
                        .select(ConversationRow::as_select())
                        .first(conn)
                        .await?;
                    Ok((view(conn, row, me).await?, removed))
                })
            })
            .await?;
        self.inner.hub.wake(caller.tenant_id);
        Ok(result)
    }

    // --- messages ------------------------------------------------------------------------

    /// Sends a message: masked and encrypted here, then numbered and logged by the tenant's
    /// group commit, and returned only once committed. A retry with the same request id
    /// returns the first; the same request id with another conversation or body is
    /// [`Error::RequestIdConflict`].
    pub async fn send(
        &self,
        caller: &Principal,
        conversation: Uuid,
        request_id: Uuid,
        body: &str,
    ) -> Result<MessageView, Error> {
        let id = Uuid::now_v7();
        let Sealed {
            ciphertext,
            masked,
            body,
        } = self
            .seal(caller.tenant_id, caller.user_id, id, conversation, body)
            .await?;
        let me = caller.user_id;
        let row = self
            .inner
            .committer
            .submit(self, caller.tenant_id, |reply| crate::commit::Send {
                id,
                sender: me,
                conversation,
                request_id,
                sealed: ciphertext,
                masked,
                body: body.clone(),
                reply,
                queued: std::time::Instant::now(),
            })
            .await?;
        if row.id != id {
            // A retry: the first message's body is the one stored, and it must be this one.
            let mut views = self.views(caller.tenant_id, vec![row]).await?;
            let first = views.pop().ok_or(Error::NotFound("message"))?;
            if first.conversation_id != conversation || first.body != body {
                return Err(Error::RequestIdConflict);
            }
            return Ok(first);
        }
        Ok(row.view(body))
    }

    /// Replaces the body of the caller's own message.
    pub async fn edit(
        &self,
        caller: &Principal,
        message: Uuid,
        body: &str,
    ) -> Result<MessageView, Error> {
        let me = caller.user_id;
        let current = self.message_for(caller, message).await?;
        if current.sender_id != me {
            return Err(Error::PermissionDenied("only the sender edits a message"));
        }
        if current.deleted_at.is_some() {
            return Err(Error::InvalidState("the message is deleted"));
        }
        let Sealed {
            ciphertext: sealed,
            masked,
            ..
        } = self
            .seal(caller.tenant_id, me, message, current.conversation_id, body)
            .await?;
        let conversation = current.conversation_id;
        let row = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    // Held evidence is kept as it is: no rewriting either.
                    if under_hold(conn, conversation, me).await? {
                        return Err(Error::LegalHold);
                    }
                    let event = next_event_id(conn).await?;
                    let at = now();
                    let row: MessageRow = diesel::update(
                        messages::table
                            .find(message)
                            .filter(messages::deleted_at.is_null()),
                    )
                    .set((
                        messages::ciphertext.eq(Some(sealed)),
                        messages::masked.eq(masked),
                        messages::edited_at.eq(at),
                    ))
                    .returning(MessageRow::as_returning())
                    .get_result(conn)
                    .await
                    .optional()?
                    .ok_or(Error::InvalidState("the message is deleted"))?;
                    insert_event(
                        conn,
                        event,
                        conversation,
                        event_kind::EDITED,
                        Some(message),
                        None,
                        at,
                    )
                    .await?;
                    Ok(row)
                })
            })
            .await?;
        self.inner.hub.wake(caller.tenant_id);
        let mut views = self.views(caller.tenant_id, vec![row]).await?;
        views.pop().ok_or(Error::NotFound("message"))
    }

    /// Deletes a message (CB4): the ciphertext goes, a tombstone stays. Idempotent.
    pub async fn delete(&self, caller: &Principal, message: Uuid) -> Result<MessageView, Error> {
        let current = self.message_for(caller, message).await?;
        if current.sender_id != caller.user_id && !caller.role.is_admin() {
            return Err(Error::PermissionDenied(
                "only the sender or an admin deletes a message",
            ));
        }
        if current.deleted_at.is_some() {
            let mut views = self.views(caller.tenant_id, vec![current]).await?;
            return views.pop().ok_or(Error::NotFound("message"));
        }
        let conversation = current.conversation_id;
        let sender = current.sender_id;
        let by_admin = (sender != caller.user_id).then(|| {
            hafen_events::Event::new(
                Some(caller.tenant_id),
                hafen_events::Actor::User(caller.user_id),
                "messaging.message.deleted_by_admin",
            )
            .target("message", message)
            .attribute("conversation_id", conversation)
            .attribute("sender_id", sender)
        });
        let audited = by_admin.is_some();
        let row = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    // A legal claim takes precedence over erasure (GDPR Art. 17(3)(e)).
                    if under_hold(conn, conversation, sender).await? {
                        return Err(Error::LegalHold);
                    }
                    if let Some(event) = &by_admin {
                        hafen_events::record(conn, event).await?;
                    }
                    let event = next_event_id(conn).await?;
                    let at = now();
                    let row: MessageRow = diesel::update(messages::table.find(message))
                        .set((
                            messages::ciphertext.eq(None::<Vec<u8>>),
                            messages::deleted_at.eq(diesel::dsl::sql::<
                                diesel::sql_types::Nullable<diesel::sql_types::Timestamptz>,
                            >(
                                "coalesce(deleted_at, now())"
                            )),
                        ))
                        .returning(MessageRow::as_returning())
                        .get_result(conn)
                        .await?;
                    insert_event(
                        conn,
                        event,
                        conversation,
                        event_kind::DELETED,
                        Some(message),
                        None,
                        at,
                    )
                    .await?;
                    Ok(row)
                })
            })
            .await?;
        if audited {
            self.audited();
            tracing::info!(tenant_id = %caller.tenant_id, message_id = %message, actor = %caller.user_id, "message deleted by an admin");
        }
        self.inner.hub.wake(caller.tenant_id);
        let mut views = self.views(caller.tenant_id, vec![row]).await?;
        views.pop().ok_or(Error::NotFound("message"))
    }

    /// A message the caller may see (member of its conversation); NOT_FOUND otherwise.
    async fn message_for(&self, caller: &Principal, message: Uuid) -> Result<MessageRow, Error> {
        let me = caller.user_id;
        self.scoped(caller.tenant_id, move |conn| {
            Box::pin(async move {
                let row: MessageRow = messages::table
                    .find(message)
                    .select(MessageRow::as_select())
                    .first(conn)
                    .await
                    .optional()?
                    .ok_or(Error::NotFound("message"))?;
                if !is_member(conn, row.conversation_id, me).await? {
                    return Err(Error::NotFound("message"));
                }
                Ok(row)
            })
        })
        .await
    }

    /// Messages of a conversation by sequence: after `from` going forward, or before it going
    /// backward (0: from the start, or from the end).
    pub async fn list_messages(
        &self,
        caller: &Principal,
        conversation: Uuid,
        forward: bool,
        from: i64,
        limit: usize,
    ) -> Result<(Vec<MessageView>, bool), Error> {
        let me = caller.user_id;
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let (rows, more) = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    if !is_member(conn, conversation, me).await? {
                        return Err(Error::NotFound("conversation"));
                    }
                    let query = messages::table
                        .filter(messages::conversation_id.eq(conversation))
                        .select(MessageRow::as_select())
                        .limit(fetch)
                        .into_boxed();
                    let query = match (forward, from) {
                        (true, from) => query
                            .filter(messages::sequence.gt(from))
                            .order(messages::sequence.asc()),
                        (false, 0) => query.order(messages::sequence.desc()),
                        (false, from) => query
                            .filter(messages::sequence.lt(from))
                            .order(messages::sequence.desc()),
                    };
                    let mut rows: Vec<MessageRow> = query.load(conn).await?;
                    let more = rows.len() > limit;
                    rows.truncate(limit);
                    Ok((rows, more))
                })
            })
            .await?;
        Ok((self.views(caller.tenant_id, rows).await?, more))
    }

    /// The tenant's newest event id (where a subscription with an empty cursor starts).
    pub(crate) async fn head(&self, tenant: Uuid) -> Result<i64, Error> {
        self.scoped(tenant, |conn| {
            Box::pin(async move {
                Ok(event_counter::table
                    .select(event_counter::last_id)
                    .first(conn)
                    .await?)
            })
        })
        .await
    }

    /// Up to `limit` events after `after` (of `member`'s conversations, or all), with their
    /// messages decrypted, on a pooled connection.
    pub(crate) async fn events_after(
        &self,
        tenant: Uuid,
        after: i64,
        member: Option<Uuid>,
        limit: i64,
    ) -> Result<(Vec<EventRow>, HashMap<Uuid, MessageView>), Error> {
        let conn = self.tenant_connection(tenant).await?;
        self.events_after_on(&conn, tenant, after, member, limit)
            .await
    }

    /// [`Messaging::events_after`] on `conn`, in one round trip (see
    /// [`hafen_store::tenancy::pipelined`]): one snapshot for both reads, the events and their
    /// messages (statements prepared once per connection, every lookup an index probe).
    pub(crate) async fn events_after_on(
        &self,
        conn: &AsyncPgConnection,
        tenant: Uuid,
        after: i64,
        member: Option<Uuid>,
        limit: i64,
    ) -> Result<(Vec<EventRow>, HashMap<Uuid, MessageView>), Error> {
        use diesel::sql_types::{BigInt, Nullable, Uuid as SqlUuid};
        let binds = || {
            (
                bind::<BigInt, _>(after),
                bind::<Nullable<SqlUuid>, _>(member),
                bind::<Nullable<SqlUuid>, _>(member),
                bind::<BigInt, _>(limit),
                bind::<BigInt, _>(after),
                bind::<Nullable<SqlUuid>, _>(member),
                bind::<Nullable<SqlUuid>, _>(member),
                bind::<BigInt, _>(limit),
                bind::<BigInt, _>(limit),
            )
        };
        let statements = async {
            let (planned, events, rows) = futures::join!(
                Prepared::text(INDEX_PROBES_ONLY).execute(&mut &*conn),
                Prepared::new(FEED_EVENTS, binds()).load::<EventRow>(&mut &*conn),
                Prepared::new(FEED_MESSAGES, binds()).load::<MessageRow>(&mut &*conn),
            );
            planned
                .and(events)
                .and_then(|events| rows.map(|rows| (events, rows)))
        };
        let (events, rows) = hafen_store::tenancy::pipelined(
            conn,
            &["BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"],
            &TenantId::from(tenant),
            statements,
        )
        .await?;
        let views = self.views(tenant, rows).await?;
        Ok((events, views.into_iter().map(|v| (v.id, v)).collect()))
    }

    /// The conversations `user` is a member of.
    pub(crate) async fn memberships(&self, tenant: Uuid, user: Uuid) -> Result<Vec<Uuid>, Error> {
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                Ok(members::table
                    .filter(members::user_id.eq(user))
                    .select(members::conversation_id)
                    .load(conn)
                    .await?)
            })
        })
        .await
    }

    /// A conversation as `user` sees it (for membership events).
    pub(crate) async fn conversation_view(
        &self,
        tenant: Uuid,
        conversation: Uuid,
        user: Uuid,
    ) -> Result<Option<ConversationView>, Error> {
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                let row = conversations::table
                    .find(conversation)
                    .select(ConversationRow::as_select())
                    .first(conn)
                    .await
                    .optional()?;
                match row {
                    Some(row) => Ok(Some(view(conn, row, user).await?)),
                    None => Ok(None),
                }
            })
        })
        .await
    }
}

/// `row` as `me` sees it. Sends do not write the conversation's row (see `commit.rs`): its
/// last sequence and update time come from its newest message where that is later.
async fn view(
    conn: &mut AsyncPgConnection,
    mut row: ConversationRow,
    me: Uuid,
) -> Result<ConversationView, Error> {
    let newest: Option<(i64, DateTime<Utc>)> = messages::table
        .filter(messages::conversation_id.eq(row.id))
        .order(messages::sequence.desc())
        .select((messages::sequence, messages::created_at))
        .first(conn)
        .await
        .optional()?;
    if let Some((sequence, at)) = newest {
        row.last_sequence = row.last_sequence.max(sequence);
        row.updated_at = row.updated_at.max(at);
    }
    let members: Vec<Uuid> = members::table
        .filter(members::conversation_id.eq(row.id))
        .order(members::joined_at.asc())
        .select(members::user_id)
        .load(conn)
        .await?;
    let caller_is_member = members.contains(&me);
    Ok(ConversationView {
        row,
        members,
        caller_is_member,
    })
}

pub(crate) async fn is_member(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    user: Uuid,
) -> Result<bool, Error> {
    Ok(diesel::select(diesel::dsl::exists(
        members::table
            .filter(members::conversation_id.eq(conversation))
            .filter(members::user_id.eq(user)),
    ))
    .get_result(conn)
    .await?)
}

/// A conversation the caller may know of: one they belong to, or any channel.
async fn visible_conversation(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    me: Uuid,
) -> Result<ConversationRow, Error> {
    let row: ConversationRow = conversations::table
        .find(conversation)
        .select(ConversationRow::as_select())
        .first(conn)
        .await
        .optional()?
        .ok_or(Error::NotFound("conversation"))?;
    if row.kind == kind::CHANNEL || is_member(conn, conversation, me).await? {
        Ok(row)
    } else {
        Err(Error::NotFound("conversation"))
    }
}

async fn require_active_users(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    field: &str,
) -> Result<(), Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let found: i64 = users::table
        .filter(users::id.eq_any(ids))
        .filter(users::status.eq("active"))
        .count()
        .get_result(conn)
        .await?;
    if usize::try_from(found).unwrap_or_default() != ids.len() {
        return Err(Error::invalid(field, "names unknown or deactivated users"));
    }
    Ok(())
}

/// Inserts member rows, skipping present ones; returns who was new.
async fn add_member_rows(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    users: &[Uuid],
    at: DateTime<Utc>,
) -> Result<Vec<Uuid>, Error> {
    let rows: Vec<_> = users
        .iter()
        .map(|user| {
            (
                members::conversation_id.eq(conversation),
                members::user_id.eq(*user),
                members::joined_at.eq(at),
            )
        })
        .collect();
    Ok(diesel::insert_into(members::table)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(members::user_id)
        .get_results(conn)
        .await?)
}

async fn touch(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    at: DateTime<Utc>,
) -> Result<(), Error> {
    diesel::update(conversations::table.find(conversation))
        .set(conversations::updated_at.eq(at))
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes the next event id; the counter row stays locked until the transaction ends.
async fn next_event_id(conn: &mut AsyncPgConnection) -> Result<i64, Error> {
    Ok(diesel::update(event_counter::table)
        .set(event_counter::last_id.eq(event_counter::last_id + 1))
        .returning(event_counter::last_id)
        .get_result(conn)
        .await?)
}

pub(crate) async fn insert_event(
    conn: &mut AsyncPgConnection,
    id: i64,
    conversation: Uuid,
    kind: &str,
    message: Option<Uuid>,
    detail: Option<&Membership>,
    at: DateTime<Utc>,
) -> Result<(), Error> {
    let detail = detail.and_then(|d| serde_json::to_value(d).ok());
    diesel::insert_into(events::table)
        .values((
            events::id.eq(id),
            events::conversation_id.eq(conversation),
            events::kind.eq(kind),
            events::message_id.eq(message),
            events::detail.eq(detail),
            events::created_at.eq(at),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

async fn append_event(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    kind: &str,
    message: Option<Uuid>,
    detail: Option<&Membership>,
) -> Result<i64, Error> {
    let id = next_event_id(conn).await?;
    insert_event(conn, id, conversation, kind, message, detail, now()).await?;
    Ok(id)
}

/// Whether a legal hold in force covers `conversation` or the messages of `sender`. Run in the
/// transaction that changes a message: a hold set by then is seen (SetLegalHold commits
/// before it answers).
async fn under_hold(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    sender: Uuid,
) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(
        legal_holds::table
            .filter(legal_holds::lifted_at.is_null())
            .filter(
                legal_holds::conversation_id
                    .eq(conversation)
                    .or(legal_holds::user_id.eq(sender)),
            ),
    ))
    .get_result(conn)
    .await
}
