//! Rows of the messaging tables and their API forms.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use hafen_platform::timestamp;
use hafen_proto::messaging::v1 as pb;
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
    /// newest message's; `view` in `domain.rs` fills that in.
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
    pub members: Vec<Uuid>,
    pub caller_is_member: bool,
}

impl ConversationView {
    /// The API form. Member ids are listed for direct and group conversations only.
    pub fn to_proto(&self) -> pb::Conversation {
        let row = &self.row;
        pb::Conversation {
            conversation_id: row.id.to_string(),
            kind: match row.kind.as_str() {
                kind::DIRECT => pb::ConversationKind::Direct,
                kind::GROUP => pb::ConversationKind::Group,
                kind::CHANNEL => pb::ConversationKind::Channel,
                _ => pb::ConversationKind::Webchat,
            } as i32,
            title: row.title.clone(),
            create_time: Some(timestamp(row.created_at)),
            update_time: Some(timestamp(row.updated_at)),
            last_sequence: u64::try_from(row.last_sequence).unwrap_or_default(),
            member_count: i32::try_from(self.members.len()).unwrap_or(i32::MAX),
            member_user_ids: if matches!(row.kind.as_str(), kind::DIRECT | kind::GROUP) {
                self.members.iter().map(Uuid::to_string).collect()
            } else {
                Vec::new()
            },
            caller_is_member: self.caller_is_member,
            creator_user_id: row.creator_id.to_string(),
        }
    }
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
}

impl MessageView {
    /// The API form.
    pub fn to_proto(&self) -> pb::Message {
        pb::Message {
            message_id: self.id.to_string(),
            conversation_id: self.conversation_id.to_string(),
            sequence: u64::try_from(self.sequence).unwrap_or_default(),
            sender_user_id: self.sender_id.to_string(),
            body: self.body.clone(),
            create_time: Some(timestamp(self.created_at)),
            edit_time: self.edited_at.map(timestamp),
            delete_time: self.deleted_at.map(timestamp),
            masked: self.masked,
        }
    }
}

/// Event kinds as stored.
pub mod event_kind {
    /// A message was sent.
    pub const CREATED: &str = "message_created";
    /// A message was edited.
    pub const EDITED: &str = "message_edited";
    /// A message was deleted.
    pub const DELETED: &str = "message_deleted";
    /// Members were added or removed.
    pub const MEMBERSHIP: &str = "membership_changed";
}

/// An event row.
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
