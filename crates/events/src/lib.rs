//! Audit events for every Hafen service (BX6, TM2).
//!
//! - [`Event`]: who did what to which target; ids, actions and counts, never content,
//!   passwords, tokens or chat codes.
//! - [`record`] / [`record_sync`]: write an event into `hafen.outbox` inside the caller's
//!   transaction (a tenant transaction too: tenant roles may insert there), so the event
//!   commits or rolls back with the change it records. [`record_alone`] commits an event on
//!   its own, for what changes nothing else (a failed login, an operator's read).
//! - [`relay::Relay`]: delivers the outbox to the audit service and deletes what it
//!   acknowledged (at-least-once; the audit service drops duplicates by event id).
//! - [`chain`]: the hash chain's canonical encoding, and offline verification of exports.

pub mod chain;
pub mod relay;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use hafen_proto::audit::v1 as pb;
use hafen_store::schema::outbox;
use hafen_store::tenancy::SyncConnection;
use hafen_store::{AsyncPgConnection, Pool};
use prost::Message;
use uuid::Uuid;

pub use relay::{AuditEndpointArgs, Relay};

/// Who performed an audited action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A user of the tenant.
    User(Uuid),
    /// A login attempt for a username that does not exist (nothing typed is recorded).
    UnknownUser,
    /// The platform operator (platform token).
    Operator,
    /// Another Hafen service, by name.
    Service(&'static str),
    /// An automatic job, by name.
    System(&'static str),
}

impl Actor {
    fn to_proto(&self) -> pb::Actor {
        let (kind, id) = match self {
            Actor::User(id) => (pb::ActorKind::User, id.to_string()),
            Actor::UnknownUser => (pb::ActorKind::User, String::new()),
            Actor::Operator => (pb::ActorKind::Operator, "platform".to_owned()),
            Actor::Service(name) => (pb::ActorKind::Service, (*name).to_owned()),
            Actor::System(name) => (pb::ActorKind::System, (*name).to_owned()),
        };
        pb::Actor {
            kind: kind as i32,
            id,
        }
    }
}

/// One audit event, built with its setters and written with [`record`].
#[derive(Debug, Clone)]
pub struct Event {
    id: Uuid,
    tenant: Option<Uuid>,
    time: DateTime<Utc>,
    actor: Actor,
    action: &'static str,
    target_type: &'static str,
    target_id: String,
    request_id: String,
    outcome: pb::Outcome,
    attributes: BTreeMap<String, String>,
}

impl Event {
    /// `actor` did `action` (`<service>.<object>.<verb>`) in `tenant` (`None`: a platform
    /// event), successfully, now.
    pub fn new(tenant: Option<Uuid>, actor: Actor, action: &'static str) -> Self {
        Self {
            id: Uuid::now_v7(),
            tenant,
            time: hafen_store::now(),
            actor,
            action,
            target_type: "",
            target_id: String::new(),
            request_id: String::new(),
            outcome: pb::Outcome::Success,
            attributes: BTreeMap::new(),
        }
    }

    /// The affected object: its kind (`user`, `chat_code`, ...) and id.
    pub fn target(mut self, kind: &'static str, id: Uuid) -> Self {
        self.target_type = kind;
        self.target_id = id.to_string();
        self
    }

    /// The request id of the call that caused the event.
    pub fn request_id(mut self, id: impl ToString) -> Self {
        self.request_id = id.to_string();
        self
    }

    /// The action failed.
    pub fn failed(mut self) -> Self {
        self.outcome = pb::Outcome::Failure;
        self
    }

    /// The action was refused for lack of permission.
    pub fn denied(mut self) -> Self {
        self.outcome = pb::Outcome::Denied;
        self
    }

    /// A detail: an id or a count, never free text.
    pub fn attribute(mut self, key: &'static str, value: impl ToString) -> Self {
        self.attributes.insert(key.to_owned(), value.to_string());
        self
    }

    /// The event's id (its idempotency key at the audit service).
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The action.
    pub fn action(&self) -> &'static str {
        self.action
    }

    /// The wire form, as stored in the outbox and sent with AppendEvents.
    pub fn to_proto(&self) -> pb::AuditEvent {
        pb::AuditEvent {
            event_id: self.id.to_string(),
            tenant_id: self.tenant.map(|t| t.to_string()).unwrap_or_default(),
            time: Some(hafen_platform::timestamp(self.time)),
            actor: Some(self.actor.to_proto()),
            action: self.action.to_owned(),
            target_type: self.target_type.to_owned(),
            target_id: self.target_id.clone(),
            request_id: self.request_id.clone(),
            outcome: self.outcome as i32,
            attributes: self.attributes.clone().into_iter().collect(),
            ..Default::default()
        }
    }

    fn row(&self) -> OutboxRow {
        (
            outbox::id.eq(self.id),
            outbox::tenant_id.eq(self.tenant),
            outbox::event.eq(self.to_proto().encode_to_vec()),
        )
    }
}

/// The values of one outbox row.
type OutboxRow = (
    diesel::dsl::Eq<outbox::id, Uuid>,
    diesel::dsl::Eq<outbox::tenant_id, Option<Uuid>>,
    diesel::dsl::Eq<outbox::event, Vec<u8>>,
);

/// Writes `event` into the outbox inside the transaction open on `conn` (tenant scope or
/// not).
pub async fn record(conn: &mut AsyncPgConnection, event: &Event) -> QueryResult<()> {
    diesel_async::RunQueryDsl::execute(diesel::insert_into(outbox::table).values(event.row()), conn)
        .await
        .map(drop)
}

/// [`record`] on a synchronous connection (the tenant service's DDL transactions).
pub fn record_sync(conn: &mut SyncConnection, event: &Event) -> QueryResult<()> {
    diesel::RunQueryDsl::execute(diesel::insert_into(outbox::table).values(event.row()), conn)
        .map(drop)
}

/// Commits `event` on its own, for actions that change nothing else (a failed login, an
/// operator's read). A failure is logged, never passed on: the call it records has happened.
pub async fn record_alone(pool: &Pool, event: &Event) {
    let written = match pool.get().await {
        Ok(mut conn) => record(&mut conn, event).await.map_err(|e| e.to_string()),
        Err(err) => Err(err.to_string()),
    };
    if let Err(err) = written {
        tracing::error!(action = event.action, error = %err, "audit event not written");
    }
}
