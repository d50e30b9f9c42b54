//! A visit's chat with the organisation (CB1): a conversation of kind webchat in the tenant's
//! schema, its agent the one member, the visitor its other sender. Visitors' messages are
//! masked, sealed under the visitor's key and stored by the tenant schema's `store_messages`
//! (the messaging service's own send path, which counts a visit's visitor as a member); the
//! messaging service's feeds are woken through Redis, so agents get them like any message.
//! The visitor reads the chat's part of the event log from here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Bool, Bytea, Integer, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::RunQueryDsl;
use hafen_proto::webchat::v1 as pb;
use hafen_store::keyring::body_context;
use hafen_store::masking::Masker;
use hafen_store::prepared::{INDEX_PROBES_ONLY, Prepared, Statement, bind};
use hafen_store::schema::{conversations, legal_holds, members, messages, visit_fields, visits};
use hafen_store::{AsyncPgConnection, now};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::Service;
use crate::commit::VisitorSend;
use crate::error::Error;
use crate::visits::Visitor;

/// Largest message body, in bytes of UTF-8.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Log entries read per query of a stream.
const PAGE: i64 = 200;

/// Streams one visit may hold open at once, in this process.
const MAX_STREAMS_PER_VISIT: usize = 2;

/// How long a visitor's stream lives; the visitor then resubscribes with its cursor.
const MAX_STREAM_AGE: Duration = Duration::from_secs(3600);

/// One of a visit's open streams, given back when the stream ends.
pub(crate) struct StreamSlot {
    service: std::sync::Arc<Service>,
    visit: Uuid,
}

impl StreamSlot {
    fn take(service: &std::sync::Arc<Service>, visit: Uuid) -> Result<Self, Error> {
        let mut open = service
            .streams
            .lock()
            .map_err(|_| Error::Bug("stream count poisoned"))?;
        let count = open.entry(visit).or_default();
        if *count >= MAX_STREAMS_PER_VISIT {
            return Err(Error::RateLimited(Duration::from_secs(1)));
        }
        *count += 1;
        Ok(Self {
            service: std::sync::Arc::clone(service),
            visit,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.service.streams.lock()
            && let Some(count) = open.get_mut(&self.visit)
        {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.visit);
            }
        }
    }
}

/// A message row.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = messages)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub(crate) struct MessageRow {
    pub id: Uuid,
    pub sequence: i64,
    pub sender_id: Uuid,
    pub request_id: Option<Uuid>,
    pub ciphertext: Option<Vec<u8>>,
    pub masked: bool,
    pub created_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// One entry of a chat's part of the event log.
#[derive(Debug, Clone, QueryableByName)]
pub(crate) struct LogEntry {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = SqlUuid)]
    pub message_id: Uuid,
}

/// The log of one conversation after `$2`, at most `$3` entries: messages' creations (kept in
/// their rows) and their edits and deletions (rows of `events`), in id order. Within a
/// conversation messages' event ids follow their sequence (both are given under the
/// conversation's lock, in commit order), so the creations are read along the
/// conversation's (conversation_id, sequence) key: a cached generic plan cannot walk the
/// tenant's whole event key instead.
const CHAT_LOG: &str = "\
    SELECT * FROM ( \
        (SELECT m.event_id AS id, 'message_created' AS kind, m.id AS message_id \
         FROM messages m WHERE m.conversation_id = $1 AND m.event_id > $2 \
         ORDER BY m.conversation_id, m.sequence LIMIT $3) \
        UNION ALL \
        (SELECT e.id, e.kind, e.message_id FROM events e \
         WHERE e.conversation_id = $1 AND e.id > $2 AND e.message_id IS NOT NULL \
         ORDER BY e.id LIMIT $3) \
    ) log ORDER BY id LIMIT $3";

/// A send's first statement: the visit of the token (`$1` its id, `$2` the token's hash),
/// live, locked against a concurrent change of its consent (which locks it too).
const SEND_LOCK: &str = "\
    SELECT id FROM visits \
    WHERE id = $1 AND token_sha256 = $2 AND expires_at > now() \
    FOR NO KEY UPDATE";

/// A send's check, after [`SEND_LOCK`] (so it sees a consent change that lock waited for):
/// the visit's chat; whether its latest consent answer grants the widget's current text; and
/// how many of the required fields (`$2`) it has.
const SEND_CHECK: &str = "\
    SELECT v.conversation_id, \
           coalesce((SELECT c.granted AND c.version = \
                            (SELECT max(t.version) FROM consent_texts t \
                             WHERE t.widget_id = v.widget_id) \
                     FROM consent_records c WHERE c.visit_id = v.id \
                     ORDER BY c.decided_at DESC, c.id DESC LIMIT 1), false) AS consented, \
           (SELECT count(*) FROM visit_fields f \
            WHERE f.visit_id = v.id AND f.key = ANY($2)) AS required_given \
    FROM visits v WHERE v.id = $1";

/// What [`SEND_LOCK`] finds: a row means the token is good.
#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = SqlUuid)]
    #[allow(dead_code, reason = "only whether a row came back counts")]
    id: Uuid,
}

#[derive(QueryableByName)]
struct SendCheck {
    #[diesel(sql_type = Nullable<SqlUuid>)]
    conversation_id: Option<Uuid>,
    #[diesel(sql_type = Bool)]
    consented: bool,
    #[diesel(sql_type = BigInt)]
    required_given: i64,
}

/// One call of the tenant schema's `store_messages` (tenant migration `000004`), looking for
/// retries: a visitor's sends are few, and a retry must return the first message.
const STORE: &str = "SELECT * FROM store_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// The request id of a visitor's send, once its fields are checked.
fn checked(request: &pb::SendVisitorMessageRequest) -> Result<Uuid, Error> {
    let request_id = Uuid::try_parse(&request.request_id)
        .map_err(|_| Error::invalid("request_id", "required: a UUID"))?;
    if request.body.trim().is_empty() {
        return Err(Error::invalid("body", "must not be empty"));
    }
    if request.body.len() > MAX_BODY_BYTES {
        return Err(Error::BodyTooLarge(MAX_BODY_BYTES));
    }
    Ok(request_id)
}

/// The [`STORE`] of one visitor message.
fn store(
    id: Uuid,
    conversation: Uuid,
    visit: Uuid,
    request_id: Uuid,
    sealed: Vec<u8>,
    masked: bool,
) -> Statement<impl hafen_store::prepared::Binds> {
    Statement::new(
        STORE,
        (
            bind::<Array<SqlUuid>, _>(vec![id]),
            bind::<Array<SqlUuid>, _>(vec![conversation]),
            bind::<Array<SqlUuid>, _>(vec![visit]),
            bind::<Array<SqlUuid>, _>(vec![request_id]),
            bind::<Array<Bytea>, _>(vec![sealed]),
            bind::<Array<Bool>, _>(vec![masked]),
            bind::<Array<Integer>, _>(vec![1]),
            bind::<Timestamptz, _>(now()),
            bind::<Nullable<BigInt>, _>(None::<i64>),
            bind::<Array<Nullable<BigInt>>, _>(vec![None::<i64>]),
            bind::<Bool, _>(true),
        ),
    )
}

/// A visitor's message on its way to the group commit.
struct Outgoing {
    tenant: Uuid,
    visit: Uuid,
    conversation: Uuid,
    token_sha256: Vec<u8>,
    needs_consent: bool,
    required: Vec<String>,
    request_id: Uuid,
    body: String,
    masked: bool,
}

/// The message stored for the send `id` (`body` its text, masked): the new one, or, for a
/// retry, the first, opened under the visitor's `key`.
fn opened(
    row: MessageRow,
    id: Uuid,
    visit: Uuid,
    conversation: Uuid,
    key: &hafen_crypto::DataKey,
    body: String,
) -> Result<pb::VisitMessage, Error> {
    if row.id == id {
        return Ok(row.to_proto(visit, body));
    }
    let body = match &row.ciphertext {
        Some(sealed) => open_text(key, &body_context(row.id, conversation), sealed)?,
        None => String::new(),
    };
    Ok(row.to_proto(visit, body))
}

impl MessageRow {
    fn to_proto(&self, visit: Uuid, body: String) -> pb::VisitMessage {
        pb::VisitMessage {
            message_id: self.id.to_string(),
            sequence: u64::try_from(self.sequence).unwrap_or_default(),
            from_visitor: self.sender_id == visit,
            body,
            masked: self.masked,
            create_time: Some(hafen_platform::timestamp(self.created_at)),
            edit_time: self.edited_at.map(hafen_platform::timestamp),
            delete_time: self.deleted_at.map(hafen_platform::timestamp),
        }
    }
}

impl Service {
    /// The visit's chat, opened on its first message: routed to the widget's agent with the
    /// fewest open chats, or the agent the visit had; within business hours unless `offline`
    /// (a message left for later, which needs consent even where anonymous chats are allowed).
    async fn chat(&self, visitor: &Visitor, offline: bool) -> Result<Uuid, Error> {
        let visit = visitor.visit.id;
        let widget = visitor.widget.row.id;
        let settings = &visitor.widget.settings;
        let hours = settings.business_hours.clone();
        let agents = settings.agents.clone();
        let title = settings.name.clone();
        let anonymous = settings.allow_anonymous_chat;
        let required: Vec<String> = settings
            .pre_chat_fields
            .iter()
            .filter(|field| field.required)
            .map(|field| field.key.clone())
            .collect();
        self.scoped(visitor.tenant, move |conn| {
            Box::pin(async move {
                // The visit's row, locked: two first messages at once open one chat, and a
                // withdrawal of consent is not overtaken.
                let (conversation, agent): (Option<Uuid>, Option<Uuid>) = visits::table
                    .find(visit)
                    .select((visits::conversation_id, visits::agent_id))
                    .for_update()
                    .first(conn)
                    .await?;
                // The widget's conditions, at every message: consent to the current text
                // unless it allows anonymous chats, and the required pre-chat fields given.
                if (offline || !anonymous) && !crate::visits::consented(conn, widget, visit).await?
                {
                    return Err(Error::ConsentRequired);
                }
                if !required.is_empty() {
                    let given: Vec<String> = visit_fields::table
                        .filter(visit_fields::visit_id.eq(visit))
                        .filter(visit_fields::key.eq_any(&required))
                        .select(visit_fields::key)
                        .load(conn)
                        .await?;
                    if required.iter().any(|key| !given.contains(key)) {
                        return Err(Error::InvalidState(
                            "a required pre-chat field is missing; give it with SubmitFields",
                        ));
                    }
                }
                if let Some(conversation) = conversation {
                    return Ok(conversation);
                }
                if !offline && !hours.open_now(conn).await? {
                    return Err(Error::AgentUnavailable);
                }
                let agent = match agent {
                    Some(agent) => agent,
                    None => least_busy(conn, &agents)
                        .await?
                        .ok_or(Error::AgentUnavailable)?,
                };
                let at = now();
                let id = Uuid::now_v7();
                diesel::insert_into(conversations::table)
                    .values((
                        conversations::id.eq(id),
                        conversations::kind.eq("webchat"),
                        conversations::title.eq(&title),
                        conversations::creator_id.eq(agent),
                        conversations::created_at.eq(at),
                        conversations::updated_at.eq(at),
                    ))
                    .execute(conn)
                    .await?;
                diesel::insert_into(members::table)
                    .values((
                        members::conversation_id.eq(id),
                        members::user_id.eq(agent),
                        members::joined_at.eq(at),
                    ))
                    .execute(conn)
                    .await?;
                let detail = serde_json::json!({"added": [agent], "removed": [], "actor": null});
                append_event(conn, id, "membership_changed", None, Some(detail)).await?;
                diesel::update(visits::table.find(visit))
                    .set((visits::conversation_id.eq(id), visits::agent_id.eq(agent)))
                    .execute(conn)
                    .await?;
                Ok(id)
            })
        })
        .await
    }

    /// SendVisitorMessage and LeaveMessage from a visitor token. A message into a chat this
    /// process has seen the visit send into goes through the tenant's group commit
    /// ([`crate::commit`]); any other, or one its batch refused, is sent alone, in one
    /// transaction: the token's check, the widget's conditions and the store (the widget comes
    /// from memory). A visit's first message, which opens its chat, takes
    /// [`Self::send_visitor_message`]. Returns the tenant and the visit with the message.
    pub async fn send_with_token(
        &self,
        token: &str,
        origin: Option<&str>,
        request: pb::SendVisitorMessageRequest,
        offline: bool,
    ) -> Result<(Uuid, Uuid, pb::VisitMessage), Error> {
        let request_id = checked(&request)?;
        let refused = || Error::Unauthenticated("no valid visitor token; start a visit");
        let (widget, visit) = crate::visits::token_ids(token).ok_or_else(refused)?;
        let widget = match self.live_widget(widget, origin).await {
            Ok(widget) => widget,
            Err(Error::NotFound(_)) => return Err(refused()),
            Err(err) => return Err(err),
        };
        let tenant = widget.tenant;
        let hash = crate::visits::token_hash(token);
        let required: Vec<String> = widget
            .settings
            .pre_chat_fields
            .iter()
            .filter(|field| field.required)
            .map(|field| field.key.clone())
            .collect();
        let needs_consent = offline || !widget.settings.allow_anonymous_chat;
        let masker = Masker::new(&widget.tenant_settings.masking);
        let (body, masked) = masker.apply(&request.body);
        let mut counted = false;
        if let Some(conversation) = self.chats.get(visit, &hash) {
            // The token was good when the chat was remembered (the batch checks it again).
            self.limits
                .count(crate::limits::Subject::Visitor(visit))
                .map_err(Error::RateLimited)?;
            counted = true;
            let outgoing = Outgoing {
                tenant,
                visit,
                conversation,
                token_sha256: hash.clone(),
                needs_consent,
                required: required.clone(),
                request_id,
                body: body.clone(),
                masked,
            };
            match self.send_batched(outgoing).await {
                Ok(Some(sent)) => return Ok((tenant, visit, sent)),
                Err(Error::Overloaded) => return Err(Error::Overloaded),
                // Refused by a check, or the visitor's key is gone: sent alone, which says
                // why.
                Ok(None) | Err(_) => self.chats.forget(visit),
            }
        }
        let limits = Arc::clone(&self.limits);
        let id = Uuid::now_v7();
        let keys = self.keys.clone();
        let sealed_body = body.clone();
        let lock_hash = hash.clone();
        let stored = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    let wanted = i64::try_from(required.len()).unwrap_or(i64::MAX);
                    // The transaction's statements are planned once per connection (generic
                    // plans of index probes; `store_messages` is written for them): planned
                    // anew at every call they cost more than they do.
                    let (planned, locked) = futures::join!(
                        Prepared::text(INDEX_PROBES_ONLY).execute(&mut &*conn),
                        Statement::new(
                            SEND_LOCK,
                            (bind::<SqlUuid, _>(visit), bind::<Bytea, _>(lock_hash)),
                        )
                        .load::<Locked>(&mut &*conn),
                    );
                    planned?;
                    let locked = locked?;
                    if locked.is_empty() {
                        return Err(refused());
                    }
                    // Counted once the token is known good: a forged one cannot use up a
                    // visitor's calls.
                    if !counted {
                        limits
                            .count(crate::limits::Subject::Visitor(visit))
                            .map_err(Error::RateLimited)?;
                    }
                    let check: Option<SendCheck> = Statement::new(
                        SEND_CHECK,
                        (bind::<SqlUuid, _>(visit), bind::<Array<Text>, _>(required)),
                    )
                    .load(conn)
                    .await?
                    .into_iter()
                    .next();
                    let check = check.ok_or_else(refused)?;
                    if needs_consent && !check.consented {
                        return Err(Error::ConsentRequired);
                    }
                    if check.required_given < wanted {
                        return Err(Error::InvalidState(
                            "a required pre-chat field is missing; give it with SubmitFields",
                        ));
                    }
                    let Some(conversation) = check.conversation_id else {
                        return Ok(None);
                    };
                    let key = keys.user_key(tenant, visit).await?;
                    let sealed =
                        key.seal(&body_context(id, conversation), sealed_body.as_bytes())?;
                    let rows: Vec<MessageRow> =
                        store(id, conversation, visit, request_id, sealed, masked)
                            .load(conn)
                            .await?;
                    Ok(Some((conversation, key, rows)))
                })
            })
            .await?;
        let Some((conversation, key, rows)) = stored else {
            // The first message: it opens the chat.
            let visitor = self.visitor(token, origin).await?;
            let (conversation, sent) = self
                .send_visitor_message(&visitor, request, offline)
                .await?;
            self.chats.remember(visit, hash, conversation);
            return Ok((tenant, visit, sent));
        };
        self.chats.remember(visit, hash, conversation);
        let sent = self
            .sent(rows, id, tenant, visit, conversation, &key, body)
            .await?;
        Ok((tenant, visit, sent))
    }

    /// A visitor's message through the tenant's group commit, into the chat the visit was
    /// seen sending into: `None` when its batch refused it (a check failed; sent alone, it is
    /// told why).
    async fn send_batched(&self, outgoing: Outgoing) -> Result<Option<pb::VisitMessage>, Error> {
        let Outgoing {
            tenant,
            visit,
            conversation,
            token_sha256,
            needs_consent,
            required,
            request_id,
            body,
            masked,
        } = outgoing;
        let id = Uuid::now_v7();
        let key = self.keys.user_key(tenant, visit).await?;
        let sealed = key.seal(&body_context(id, conversation), body.as_bytes())?;
        let row = self
            .committer
            .submit(tenant, |reply| VisitorSend {
                id,
                conversation,
                visit,
                token_sha256,
                needs_consent,
                required,
                request_id,
                sealed,
                masked,
                reply,
            })
            .await?;
        row.map(|row| opened(row, id, visit, conversation, &key, body))
            .transpose()
    }

    /// A visit's first message, which opens its chat (`offline`: a message left outside
    /// business hours too). Returns the chat with the message.
    async fn send_visitor_message(
        &self,
        visitor: &Visitor,
        request: pb::SendVisitorMessageRequest,
        offline: bool,
    ) -> Result<(Uuid, pb::VisitMessage), Error> {
        let request_id = checked(&request)?;
        let (tenant, visit) = (visitor.tenant, visitor.visit.id);
        let conversation = self.chat(visitor, offline).await?;
        let masker = Masker::new(&visitor.widget.tenant_settings.masking);
        let (body, masked) = masker.apply(&request.body);
        let id = Uuid::now_v7();
        let key = self.keys.user_key(tenant, visit).await?;
        let sealed = key.seal(&body_context(id, conversation), body.as_bytes())?;
        let stored: Vec<MessageRow> = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    let (planned, stored) = futures::join!(
                        Prepared::text(INDEX_PROBES_ONLY).execute(&mut &*conn),
                        store(id, conversation, visit, request_id, sealed, masked)
                            .load::<MessageRow>(&mut &*conn),
                    );
                    planned?;
                    Ok(stored?)
                })
            })
            .await?;
        let sent = self
            .sent(stored, id, tenant, visit, conversation, &key, body)
            .await?;
        Ok((conversation, sent))
    }

    /// The message `store_messages` returned for the send `id` (`body` its text): the new
    /// one, whose store wakes the tenant's feeds, or, for a retry, the first, as stored.
    #[allow(clippy::too_many_arguments, reason = "the parts of one send, named")]
    async fn sent(
        &self,
        rows: Vec<MessageRow>,
        id: Uuid,
        tenant: Uuid,
        visit: Uuid,
        conversation: Uuid,
        key: &hafen_crypto::DataKey,
        body: String,
    ) -> Result<pb::VisitMessage, Error> {
        let row = rows
            .into_iter()
            .next()
            .ok_or(Error::Bug("a visitor's message was not stored"))?;
        if row.id == id {
            self.wake(tenant).await;
        }
        opened(row, id, visit, conversation, key, body)
    }

    /// Wakes the messaging service's feeds of `tenant`; when Redis is down they poll.
    async fn wake(&self, tenant: Uuid) {
        if let Some(redis) = &self.redis
            && let Err(err) = redis.publish_events(tenant).await
        {
            tracing::debug!(error = %err, "event notification not published; feeds poll");
        }
    }

    /// Up to [`PAGE`] entries of the visit's chat after `after`, with their messages opened,
    /// and the event counter as it stood before they were read (when the page is not full,
    /// every entry of the chat up to it is in); `None` when the visit is gone.
    async fn chat_after(&self, visitor: &Visitor, after: i64) -> Result<Option<ChatPage>, Error> {
        let visit = visitor.visit.id;
        let read = self
            .scoped(visitor.tenant, move |conn| {
                Box::pin(async move { read_chat(conn, visit, after).await })
            })
            .await?;
        let Some((conversation, entries, rows, head)) = read else {
            return Ok(None);
        };
        let by_id: HashMap<Uuid, MessageRow> = rows.into_iter().map(|r| (r.id, r)).collect();
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            // A message named twice (created, then edited) is opened for each entry.
            let Some(row) = by_id.get(&entry.message_id).cloned() else {
                continue; // purged since
            };
            let body = self.opened_body(visitor.tenant, conversation, &row).await?;
            out.push((entry, row, body));
        }
        Ok(Some(ChatPage {
            conversation,
            entries: out,
            head,
        }))
    }

    /// The body of `row`, a message of `conversation`, opened under its sender's key; empty
    /// once deleted.
    async fn opened_body(
        &self,
        tenant: Uuid,
        conversation: Uuid,
        row: &MessageRow,
    ) -> Result<String, Error> {
        match &row.ciphertext {
            Some(sealed) => {
                let key = self.keys.user_key(tenant, row.sender_id).await?;
                open_text(&key, &body_context(row.id, conversation), sealed)
            }
            None => Ok(String::new()),
        }
    }

    /// The visit's chat as it stands: each message once, oldest first, with its current body
    /// (empty once deleted).
    pub(crate) async fn transcript(
        &self,
        visitor: &Visitor,
    ) -> Result<Vec<pb::VisitMessage>, Error> {
        let mut order = Vec::new();
        let mut latest: HashMap<Uuid, pb::VisitMessage> = HashMap::new();
        let mut last = 0;
        loop {
            let Some(ChatPage { entries: page, .. }) = self.chat_after(visitor, last).await? else {
                return Err(Error::Unauthenticated("the visit has ended"));
            };
            let full = i64::try_from(page.len()).unwrap_or(i64::MAX) >= PAGE;
            for (entry, row, body) in page {
                last = entry.id;
                if !latest.contains_key(&row.id) {
                    order.push(row.id);
                }
                latest.insert(row.id, row.to_proto(visitor.visit.id, body));
            }
            if !full {
                break;
            }
        }
        Ok(order
            .into_iter()
            .filter_map(|id| latest.remove(&id))
            .collect())
    }

    /// SubscribeVisit: replays the chat after `after`, then follows it: what the tenant's
    /// watcher hands the stream ([`crate::watch`]), or, where that may not be whole (before
    /// the watcher covers the chat, after the stream fell behind, while the visit has no chat,
    /// when an entry says the visit ended), a read of its own; until the visit ends or the
    /// receiver goes away.
    pub async fn subscribe_visit(
        self: std::sync::Arc<Self>,
        visitor: Visitor,
        after: i64,
    ) -> Result<mpsc::Receiver<Result<pb::SubscribeVisitResponse, Error>>, Error> {
        let slot = StreamSlot::take(&self, visitor.visit.id)?;
        let (out, receiver) = mpsc::channel(64);
        let ends = tokio::time::Instant::now() + MAX_STREAM_AGE;
        let wake = crate::watch::Watches::register(&self, visitor.tenant);
        tokio::spawn(async move {
            let _slot = slot;
            let visit = visitor.visit.id;
            // The cursor: the last entry sent.
            let mut last = after;
            // The chat, once known, and how far the stream's own reads saw the log whole.
            let mut chat: Option<Uuid> = None;
            let mut read_to: Option<i64> = None;
            let mut read = true;
            let mut caught_up = false;
            loop {
                // Enabled before the read: a change committed during it wakes the wait.
                let woken = wake.notify.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let inbox = wake.take();
                let gap = inbox.lost
                    || inbox
                        .covered_from
                        .is_some_and(|from| read_to.is_none_or(|to| from > to));
                let ended = inbox.entries.iter().any(|e| !e.live);
                let mut page = Vec::new();
                let mut full = false;
                if read || gap || ended || chat.is_none() {
                    match self.chat_after(&visitor, last).await {
                        Ok(Some(read)) => {
                            if !read.conversation.is_nil() {
                                wake.follow(read.conversation);
                                chat = Some(read.conversation);
                            }
                            full = i64::try_from(read.entries.len()).unwrap_or(i64::MAX) >= PAGE;
                            if !full {
                                read_to = Some(read.head);
                            }
                            page = read.entries;
                        }
                        Ok(None) => {
                            let _ = out
                                .send(Err(Error::Unauthenticated("the visit has ended")))
                                .await;
                            return;
                        }
                        Err(err) => {
                            let _ = out.send(Err(err)).await;
                            return;
                        }
                    }
                } else if let Some(conversation) = chat {
                    for handed in inbox.entries {
                        if handed.entry.id <= last {
                            continue;
                        }
                        match self
                            .opened_body(visitor.tenant, conversation, &handed.row)
                            .await
                        {
                            Ok(body) => page.push((handed.entry, handed.row, body)),
                            Err(err) => {
                                let _ = out.send(Err(err)).await;
                                return;
                            }
                        }
                    }
                }
                for (entry, row, body) in page {
                    use pb::subscribe_visit_response::Event;
                    if entry.id <= last {
                        continue;
                    }
                    let message = row.to_proto(visit, body);
                    let event = match entry.kind.as_str() {
                        "message_created" => Event::MessageCreated(message),
                        "message_edited" => Event::MessageEdited(message),
                        _ => Event::MessageDeleted(message),
                    };
                    last = entry.id;
                    let item = pb::SubscribeVisitResponse {
                        cursor: last.to_string(),
                        event: Some(event),
                    };
                    if out.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
                read = full;
                if full {
                    continue;
                }
                if !caught_up {
                    caught_up = true;
                    let item = pb::SubscribeVisitResponse {
                        cursor: last.to_string(),
                        event: Some(pb::subscribe_visit_response::Event::CaughtUp(
                            pb::CaughtUp {},
                        )),
                    };
                    if out.send(Ok(item)).await.is_err() {
                        return;
                    }
                }
                if tokio::time::Instant::now() >= ends {
                    let _ = out.send(Err(Error::StreamAged)).await;
                    return;
                }
                tokio::select! {
                    () = out.closed() => return,
                    () = &mut woken => {}
                    () = tokio::time::sleep(crate::watch::STREAM_SAFETY_NET) => read = true,
                }
            }
        });
        Ok(receiver)
    }
}

/// The UTF-8 text `sealed` holds under `key`, with `context` as associated data.
pub(crate) fn open_text(
    key: &hafen_crypto::DataKey,
    context: &[u8],
    sealed: &[u8],
) -> Result<String, Error> {
    let plain = key.open(context, sealed)?;
    String::from_utf8(plain.to_vec()).map_err(|_| Error::Bug("stored text is not UTF-8"))
}

/// The agent among `agents` (active users) with the fewest open chats.
async fn least_busy(conn: &mut AsyncPgConnection, agents: &[Uuid]) -> Result<Option<Uuid>, Error> {
    let active = crate::widgets::active_agents(conn, agents).await?;
    if active.is_empty() {
        return Ok(None);
    }
    let open: Vec<Option<Uuid>> = visits::table
        .filter(visits::agent_id.eq_any(&active))
        .filter(visits::expires_at.gt(now()))
        .select(visits::agent_id)
        .load(conn)
        .await?;
    let mut load: HashMap<Uuid, usize> = active.iter().map(|a| (*a, 0)).collect();
    for agent in open.into_iter().flatten() {
        *load.entry(agent).or_default() += 1;
    }
    // Ties go to the agent listed first.
    Ok(agents
        .iter()
        .filter(|agent| load.contains_key(agent))
        .min_by_key(|agent| load.get(agent).copied().unwrap_or_default())
        .copied())
}

/// The visit's conversation, its log after `after` and the messages it names; `None` when
/// the visit is gone.
async fn read_chat(
    conn: &mut AsyncPgConnection,
    visit: Uuid,
    after: i64,
) -> Result<Option<ChatRead>, Error> {
    // First, in a snapshot of its own: every entry up to it is committed, and seen by the
    // statements below.
    let head: i64 = {
        use hafen_store::schema::event_counter;
        event_counter::table
            .select(event_counter::last_id)
            .first(conn)
            .await?
    };
    let found: Option<Option<Uuid>> = visits::table
        .find(visit)
        .filter(visits::expires_at.gt(now()))
        .select(visits::conversation_id)
        .first(conn)
        .await
        .optional()?;
    let Some(conversation) = found else {
        return Ok(None);
    };
    let Some(conversation) = conversation else {
        return Ok(Some((Uuid::nil(), Vec::new(), Vec::new(), head)));
    };
    let entries: Vec<LogEntry> = Statement::new(
        CHAT_LOG,
        (
            bind::<SqlUuid, _>(conversation),
            bind::<BigInt, _>(after),
            bind::<BigInt, _>(PAGE),
        ),
    )
    .load(conn)
    .await?;
    let ids: Vec<Uuid> = entries.iter().map(|e| e.message_id).collect();
    let rows: Vec<MessageRow> = messages::table
        .filter(messages::id.eq_any(&ids))
        .select(MessageRow::as_select())
        .load(conn)
        .await?;
    Ok(Some((conversation, entries, rows, head)))
}

/// What [`read_chat`] found: the chat (nil while the visit has none), its entries, their
/// messages and the event counter read first.
type ChatRead = (Uuid, Vec<LogEntry>, Vec<MessageRow>, i64);

/// A page of a visit's chat (see [`Service::chat_after`]).
pub(crate) struct ChatPage {
    conversation: Uuid,
    entries: Vec<(LogEntry, MessageRow, String)>,
    head: i64,
}

/// A visitor's own message in `visit`'s chat, for a change: its conversation, and whether it
/// is deleted. Refuses what is not theirs, and what a legal hold keeps.
async fn own_message(
    conn: &mut AsyncPgConnection,
    visit: Uuid,
    message: Uuid,
) -> Result<(Uuid, bool), Error> {
    let found: Option<(Uuid, Option<DateTime<Utc>>)> = messages::table
        .find(message)
        .filter(messages::sender_id.eq(visit))
        .select((messages::conversation_id, messages::deleted_at))
        .for_update()
        .first(conn)
        .await
        .optional()?;
    let (conversation, deleted_at) = found.ok_or(Error::NotFound("message"))?;
    if held(conn, conversation).await? {
        return Err(Error::LegalHold);
    }
    Ok((conversation, deleted_at.is_some()))
}

/// Whether a legal hold in force covers `conversation`. Its SHARE lock on the holds makes a
/// hold committed before it seen, and one placed meanwhile wait for this transaction.
pub(crate) async fn held(conn: &mut AsyncPgConnection, conversation: Uuid) -> Result<bool, Error> {
    diesel::sql_query("LOCK TABLE legal_holds IN SHARE MODE")
        .execute(conn)
        .await?;
    Ok(diesel::select(diesel::dsl::exists(
        legal_holds::table
            .filter(legal_holds::lifted_at.is_null())
            .filter(legal_holds::conversation_id.eq(conversation)),
    ))
    .get_result(conn)
    .await?)
}

/// Appends the event of a change of `message` (edited or deleted).
async fn log_change(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    message: Uuid,
    kind: &str,
) -> Result<(), Error> {
    append_event(conn, conversation, kind, Some(message), None).await
}

/// Appends an event of `kind` for `conversation` to the tenant's log.
pub(crate) async fn append_event(
    conn: &mut AsyncPgConnection,
    conversation: Uuid,
    kind: &str,
    message: Option<Uuid>,
    detail: Option<serde_json::Value>,
) -> Result<(), Error> {
    hafen_store::log::append_event(conn, conversation, kind, message, detail, now()).await?;
    Ok(())
}

impl Service {
    /// EditVisitorMessage.
    pub async fn edit_visitor_message(
        &self,
        visitor: &Visitor,
        request: pb::EditVisitorMessageRequest,
    ) -> Result<pb::VisitMessage, Error> {
        let message = crate::widgets::parse_id("message_id", &request.message_id)?;
        if request.body.trim().is_empty() {
            return Err(Error::invalid("body", "must not be empty"));
        }
        if request.body.len() > MAX_BODY_BYTES {
            return Err(Error::BodyTooLarge(MAX_BODY_BYTES));
        }
        let (tenant, visit) = (visitor.tenant, visitor.visit.id);
        let masker = Masker::new(&visitor.widget.tenant_settings.masking);
        let (body, masked) = masker.apply(&request.body);
        let key = self.keys.user_key(tenant, visit).await?;
        let sealed_body = body.clone();
        let row = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    let (conversation, deleted) = own_message(conn, visit, message).await?;
                    if deleted {
                        return Err(Error::InvalidState("the message is deleted"));
                    }
                    let sealed =
                        key.seal(&body_context(message, conversation), sealed_body.as_bytes())?;
                    let row: MessageRow = diesel::update(messages::table.find(message))
                        .set((
                            messages::ciphertext.eq(Some(sealed)),
                            messages::masked.eq(masked),
                            messages::edited_at.eq(Some(now())),
                        ))
                        .returning(MessageRow::as_returning())
                        .get_result(conn)
                        .await?;
                    log_change(conn, conversation, message, "message_edited").await?;
                    Ok(row)
                })
            })
            .await?;
        self.wake(tenant).await;
        Ok(row.to_proto(visit, body))
    }

    /// DeleteVisitorMessage.
    pub async fn delete_visitor_message(
        &self,
        visitor: &Visitor,
        request: pb::DeleteVisitorMessageRequest,
    ) -> Result<pb::VisitMessage, Error> {
        let message = crate::widgets::parse_id("message_id", &request.message_id)?;
        let (tenant, visit) = (visitor.tenant, visitor.visit.id);
        let (row, changed) = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    let (conversation, deleted) = own_message(conn, visit, message).await?;
                    if deleted {
                        let row = messages::table
                            .find(message)
                            .select(MessageRow::as_select())
                            .first(conn)
                            .await?;
                        return Ok((row, false));
                    }
                    let row: MessageRow = diesel::update(messages::table.find(message))
                        .set((
                            messages::ciphertext.eq(None::<Vec<u8>>),
                            messages::deleted_at.eq(Some(now())),
                        ))
                        .returning(MessageRow::as_returning())
                        .get_result(conn)
                        .await?;
                    log_change(conn, conversation, message, "message_deleted").await?;
                    Ok((row, true))
                })
            })
            .await?;
        if changed {
            self.wake(tenant).await;
        }
        // In the deletion log, so a restore of an older backup deletes it again; a retry logs
        // a deletion an earlier call could not.
        if let Some(at) = row.deleted_at {
            let mut conn = self.databases.keystore_connection().await?;
            hafen_store::keystore::log_message_deletion(&mut conn, tenant, message, at).await?;
        }
        Ok(row.to_proto(visit, String::new()))
    }

    /// GetVisitorFields: for the chat's agents (members), admins and the owner.
    pub async fn visitor_fields(
        &self,
        caller: &hafen_authn::Principal,
        request: pb::GetVisitorFieldsRequest,
    ) -> Result<pb::GetVisitorFieldsResponse, Error> {
        let conversation = crate::widgets::parse_id("conversation_id", &request.conversation_id)?;
        let (me, admin, tenant) = (caller.user_id, caller.role.is_admin(), caller.tenant_id);
        let (visit, rows) = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    let visit: Option<Uuid> = visits::table
                        .filter(visits::conversation_id.eq(conversation))
                        .select(visits::id)
                        .first(conn)
                        .await
                        .optional()?;
                    let member: bool = diesel::select(diesel::dsl::exists(
                        members::table
                            .filter(members::conversation_id.eq(conversation))
                            .filter(members::user_id.eq(me)),
                    ))
                    .get_result(conn)
                    .await?;
                    let Some(visit) = visit.filter(|_| member || admin) else {
                        return Err(Error::NotFound("conversation"));
                    };
                    let rows: Vec<(String, Vec<u8>, Option<DateTime<Utc>>)> = visit_fields::table
                        .filter(visit_fields::visit_id.eq(visit))
                        .order(visit_fields::key.asc())
                        .select((
                            visit_fields::key,
                            visit_fields::sealed,
                            visit_fields::released_at,
                        ))
                        .load(conn)
                        .await?;
                    let event = hafen_events::Event::new(
                        Some(tenant),
                        hafen_events::Actor::User(me),
                        "webchat.visitor.fields_read",
                    )
                    .target("visit", visit)
                    .attribute("conversation_id", conversation);
                    hafen_events::record(conn, &event).await?;
                    Ok((visit, rows))
                })
            })
            .await?;
        self.audited();
        let key = self.keys.user_key(caller.tenant_id, visit).await?;
        let mut fields = Vec::with_capacity(rows.len());
        for (name, sealed, released_at) in rows {
            let value = open_text(&key, &crate::visits::field_context(visit, &name), &sealed)?;
            fields.push(pb::FieldValue {
                key: name,
                value,
                released: released_at.is_some(),
            });
        }
        Ok(pb::GetVisitorFieldsResponse {
            visit_id: visit.to_string(),
            fields,
        })
    }
}
