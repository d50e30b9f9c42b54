//! Rows of the messaging tables, and the domain's forms of them.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use hafen_store::schema::{conversations, events, messages};
use uuid::Uuid;

/// Conversation kinds as stored.
pub mod kind {
    /// Two users.
    pub const DIRECT: &str = "direct";
    /// A private group.
    pub const GROUP: &str = "group";
    /// Open to the tenant.
    pub const CHANNEL: &str = "channel";
    /// A website visitor and agents.
    pub const WEBCHAT: &str = "webchat";
}

/// A conversation row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = conversations)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct ConversationRow {
    pub id: Uuid,
    pub kind: String,
    pub title: String,
    pub creator_id: Uuid,
    pub direct_key: Option<String>,
    /// As stored: a floor under the next sequence (the purge raises it when it removes a
    /// conversation's newest messages). The last sequence is the higher of it and the
    /// newest message's; `repo::conversation_views` fills that in.
    pub last_sequence: i64,
    pub create_request_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    /// As stored: the last change other than a send (sends do not write this row).
    pub updated_at: DateTime<Utc>,
}

/// A conversation with what the caller sees of its membership.
#[derive(Debug, Clone)]
pub struct ConversationView {
    pub row: ConversationRow,
    /// Its members, in the order they joined.
    pub members: Vec<Uuid>,
    pub caller_is_member: bool,
}

/// A message row: the body only as ciphertext, none once deleted.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = messages)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct MessageRow {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub sequence: i64,
    pub sender_id: Uuid,
    pub ciphertext: Option<Vec<u8>>,
    pub masked: bool,
    pub request_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// The id of its creation event.
    pub event_id: i64,
    /// Its sender was erased (a tombstone whose body is gone for good).
    pub erased: bool,
}

impl MessageRow {
    /// The message as delivered, with `body` in clear (empty when deleted).
    pub fn view(&self, body: String) -> MessageView {
        MessageView {
            id: self.id,
            conversation_id: self.conversation_id,
            sequence: self.sequence,
            sender_id: self.sender_id,
            body,
            masked: self.masked,
            created_at: self.created_at,
            edited_at: self.edited_at,
            deleted_at: self.deleted_at,
            erased: self.erased,
        }
    }

    /// Its creation event, as the log holds it.
    pub fn creation(&self) -> EventRow {
        EventRow {
            id: self.event_id,
            conversation_id: self.conversation_id,
            kind: event_kind::CREATED.to_owned(),
            message_id: Some(self.id),
            detail: None,
            created_at: self.created_at,
        }
    }
}

/// A message as delivered: decrypted (empty when deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageView {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub sequence: i64,
    pub sender_id: Uuid,
    pub body: String,
    pub masked: bool,
    pub created_at: DateTime<Utc>,
    pub edited_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    pub erased: bool,
}

/// Event kinds as the log holds them.
pub mod event_kind {
    /// A message was sent (kept in the message row, not in `events`).
    pub const CREATED: &str = "message_created";
    /// A message was edited.
    pub const EDITED: &str = "message_edited";
    /// A message was deleted.
    pub const DELETED: &str = "message_deleted";
    /// Members were added or removed.
    pub const MEMBERSHIP: &str = "membership_changed";
}

/// An event of the log: a row of `events`, or a message's creation.
#[derive(Debug, Clone, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = events)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct EventRow {
    pub id: i64,
    pub conversation_id: Uuid,
    pub kind: String,
    pub message_id: Option<Uuid>,
    pub detail: Option<serde_json::Value>,
    pub created_at: DateTime<Utc>,
}

/// Who joined or left, by whom (the `detail` of membership events).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Membership {
    pub added: Vec<Uuid>,
    pub removed: Vec<Uuid>,
    pub actor: Option<Uuid>,
}
