//! The chains as stored: `hafen.audit_events` (one row per event, keyed by chain and
//! sequence) and `hafen.audit_heads` (the newest link of each chain, whose row lock
//! serialises appends to that chain). Rows, their chained and API forms, and the queries.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use hafen_events::chain::{ChainedEvent, GENESIS};
use hafen_proto::audit::v1 as pb;
use hafen_store::schema::{audit_events, audit_heads, audit_signed_heads};
use uuid::Uuid;

use crate::event::{Chain, actor_kind, outcome};

/// A stored event.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = audit_events)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct EventRow {
    /// The tenant id; nil for the platform chain.
    pub chain: Uuid,
    /// Position in the chain, from 1.
    pub sequence: i64,
    /// The producer's id.
    pub event_id: Uuid,
    /// When the audited change happened.
    pub occurred_at: DateTime<Utc>,
    /// Stored actor kind.
    pub actor_kind: String,
    /// The actor's id.
    pub actor_id: String,
    /// The action.
    pub action: String,
    /// Kind of the affected object.
    pub target_type: String,
    /// Id of the affected object.
    pub target_id: String,
    /// Request id.
    pub request_id: String,
    /// Stored outcome.
    pub outcome: String,
    /// Attributes, a JSON object of strings.
    pub attributes: serde_json::Value,
    /// The previous event's hash.
    pub prev_hash: Vec<u8>,
    /// This event's hash.
    pub hash: Vec<u8>,
}

impl EventRow {
    /// The event as the hash covers it, recomputed from the stored columns (not from the
    /// stored hash); `None` when a column cannot be what the service wrote (e.g. an attribute
    /// that is not a string), which verification counts as a broken link.
    pub fn chained(&self) -> Option<ChainedEvent> {
        let attributes: BTreeMap<String, String> =
            serde_json::from_value(self.attributes.clone()).ok()?;
        Some(self.with(u64::try_from(self.sequence).ok()?, attributes))
    }

    /// [`EventRow::chained`] for rows whose attributes are not all strings too (only a
    /// tampered row has such): those values appear as their JSON text. Exports use it, so a
    /// tampered chain still exports and the offline check finds the broken link.
    pub fn chained_lossy(&self) -> ChainedEvent {
        self.chained().unwrap_or_else(|| {
            let attributes = match &self.attributes {
                serde_json::Value::Object(map) => map
                    .iter()
                    .map(|(k, v)| {
                        let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                        (k.clone(), text)
                    })
                    .collect(),
                _ => BTreeMap::new(),
            };
            self.with(u64::try_from(self.sequence).unwrap_or_default(), attributes)
        })
    }

    /// The stored columns with `sequence` and `attributes` as read.
    fn with(&self, sequence: u64, attributes: BTreeMap<String, String>) -> ChainedEvent {
        ChainedEvent {
            tenant_id: Chain::from_key(self.chain).tenant(),
            sequence,
            event_id: self.event_id,
            time: self.occurred_at,
            actor_kind: self.actor_kind.clone(),
            actor_id: self.actor_id.clone(),
            action: self.action.clone(),
            target_type: self.target_type.clone(),
            target_id: self.target_id.clone(),
            request_id: self.request_id.clone(),
            outcome: self.outcome.clone(),
            attributes,
        }
    }

    /// The API form (attributes as [`EventRow::chained_lossy`] reads them).
    pub fn to_proto(&self) -> pb::AuditEvent {
        let kind = match self.actor_kind.as_str() {
            actor_kind::USER => pb::ActorKind::User,
            actor_kind::OPERATOR => pb::ActorKind::Operator,
            actor_kind::SERVICE => pb::ActorKind::Service,
            actor_kind::SYSTEM => pb::ActorKind::System,
            _ => pb::ActorKind::Unspecified,
        };
        let outcome = match self.outcome.as_str() {
            outcome::SUCCESS => pb::Outcome::Success,
            outcome::FAILURE => pb::Outcome::Failure,
            outcome::DENIED => pb::Outcome::Denied,
            _ => pb::Outcome::Unspecified,
        };
        let attributes = self.chained_lossy().attributes.into_iter().collect();
        pb::AuditEvent {
            event_id: self.event_id.to_string(),
            tenant_id: Chain::from_key(self.chain)
                .tenant()
                .map(|t| t.to_string())
                .unwrap_or_default(),
            sequence: u64::try_from(self.sequence).unwrap_or_default(),
            time: Some(hafen_platform::timestamp(self.occurred_at)),
            actor: Some(pb::Actor {
                kind: kind as i32,
                id: self.actor_id.clone(),
            }),
            action: self.action.clone(),
            target_type: self.target_type.clone(),
            target_id: self.target_id.clone(),
            request_id: self.request_id.clone(),
            outcome: outcome as i32,
            attributes,
            prev_hash: self.prev_hash.clone(),
            hash: self.hash.clone(),
        }
    }
}

/// An event row to insert.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = audit_events)]
pub struct NewRow<'a> {
    /// The chain key.
    pub chain: Uuid,
    /// Its sequence.
    pub sequence: i64,
    /// The producer's id.
    pub event_id: Uuid,
    /// When it happened (microseconds).
    pub occurred_at: DateTime<Utc>,
    /// Stored actor kind.
    pub actor_kind: &'a str,
    /// Actor id.
    pub actor_id: &'a str,
    /// Action.
    pub action: &'a str,
    /// Target kind.
    pub target_type: &'a str,
    /// Target id.
    pub target_id: &'a str,
    /// Request id.
    pub request_id: &'a str,
    /// Stored outcome.
    pub outcome: &'a str,
    /// Attributes as a JSON object of strings.
    pub attributes: serde_json::Value,
    /// The previous link's hash.
    pub prev_hash: Vec<u8>,
    /// This link's hash.
    pub hash: Vec<u8>,
}

/// The head of a chain: the newest sequence number and its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// 0 for a chain without events.
    pub sequence: i64,
    /// [`GENESIS`] for a chain without events.
    pub hash: Vec<u8>,
}

/// Locks `chain`'s head row for the rest of the transaction, creating it (sequence 0,
/// [`GENESIS`]) for a new chain. Callers lock several chains in ascending key order, so two
/// batches never wait on each other crosswise.
pub async fn lock_head(conn: &mut AsyncPgConnection, chain: Uuid) -> QueryResult<Head> {
    diesel::insert_into(audit_heads::table)
        .values((
            audit_heads::chain.eq(chain),
            audit_heads::sequence.eq(0_i64),
            audit_heads::hash.eq(GENESIS.to_vec()),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    let (sequence, hash) = audit_heads::table
        .find(chain)
        .select((audit_heads::sequence, audit_heads::hash))
        .for_update()
        .first::<(i64, Vec<u8>)>(conn)
        .await?;
    Ok(Head { sequence, hash })
}

/// `chain`'s head as last committed, without locking; `None` for a chain never appended to.
pub async fn head(conn: &mut AsyncPgConnection, chain: Uuid) -> QueryResult<Option<Head>> {
    audit_heads::table
        .find(chain)
        .select((audit_heads::sequence, audit_heads::hash))
        .first::<(i64, Vec<u8>)>(conn)
        .await
        .optional()
        .map(|head| head.map(|(sequence, hash)| Head { sequence, hash }))
}

/// Moves `chain`'s head.
pub async fn set_head(conn: &mut AsyncPgConnection, chain: Uuid, head: &Head) -> QueryResult<()> {
    diesel::update(audit_heads::table.find(chain))
        .set((
            audit_heads::sequence.eq(head.sequence),
            audit_heads::hash.eq(&head.hash),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// Which of `ids` are stored already (in any chain).
pub async fn stored_ids(conn: &mut AsyncPgConnection, ids: &[Uuid]) -> QueryResult<Vec<Uuid>> {
    audit_events::table
        .filter(audit_events::event_id.eq_any(ids))
        .select(audit_events::event_id)
        .load(conn)
        .await
}

/// Inserts `rows`.
pub async fn insert(conn: &mut AsyncPgConnection, rows: &[NewRow<'_>]) -> QueryResult<usize> {
    if rows.is_empty() {
        return Ok(0);
    }
    diesel::insert_into(audit_events::table)
        .values(rows)
        .execute(conn)
        .await
}

/// Up to `limit` events of `chain` with `after < sequence <= until`, in ascending order.
pub async fn rows_between(
    conn: &mut AsyncPgConnection,
    chain: Uuid,
    after: i64,
    until: i64,
    limit: i64,
) -> QueryResult<Vec<EventRow>> {
    audit_events::table
        .filter(audit_events::chain.eq(chain))
        .filter(audit_events::sequence.gt(after))
        .filter(audit_events::sequence.le(until))
        .order(audit_events::sequence.asc())
        .limit(limit)
        .select(EventRow::as_select())
        .load(conn)
        .await
}

/// A signed head: the chain's head after one append, with its signature.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = audit_signed_heads)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct SignedHead {
    /// The chain key.
    pub chain: Uuid,
    /// The head's sequence number.
    pub sequence: i64,
    /// The head's hash.
    pub hash: Vec<u8>,
    /// When it was signed.
    pub signed_at: DateTime<Utc>,
    /// Ed25519 signature of the head statement.
    pub signature: Vec<u8>,
}

/// Stores a signed head.
pub async fn insert_signed_head(
    conn: &mut AsyncPgConnection,
    head: &SignedHead,
) -> QueryResult<()> {
    diesel::insert_into(audit_signed_heads::table)
        .values((
            audit_signed_heads::chain.eq(head.chain),
            audit_signed_heads::sequence.eq(head.sequence),
            audit_signed_heads::hash.eq(&head.hash),
            audit_signed_heads::signed_at.eq(head.signed_at),
            audit_signed_heads::signature.eq(&head.signature),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// `chain`'s signed heads with `after < sequence <= until`, ascending.
pub async fn signed_heads_between(
    conn: &mut AsyncPgConnection,
    chain: Uuid,
    after: i64,
    until: i64,
) -> QueryResult<Vec<SignedHead>> {
    audit_signed_heads::table
        .filter(audit_signed_heads::chain.eq(chain))
        .filter(audit_signed_heads::sequence.gt(after))
        .filter(audit_signed_heads::sequence.le(until))
        .order(audit_signed_heads::sequence.asc())
        .select(SignedHead::as_select())
        .load(conn)
        .await
}

/// The first of `chain`'s signed heads at or after `sequence`.
pub async fn next_signed_sequence(
    conn: &mut AsyncPgConnection,
    chain: Uuid,
    sequence: i64,
) -> QueryResult<Option<i64>> {
    audit_signed_heads::table
        .filter(audit_signed_heads::chain.eq(chain))
        .filter(audit_signed_heads::sequence.ge(sequence))
        .select(diesel::dsl::min(audit_signed_heads::sequence))
        .first(conn)
        .await
}

/// Which actions a listing includes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionFilter {
    /// Exactly this action.
    Exact(String),
    /// Every action starting with this prefix (which ends with a dot).
    Prefix(String),
}

/// The filters of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// At or after (inclusive).
    pub start: Option<DateTime<Utc>>,
    /// Before (exclusive).
    pub end: Option<DateTime<Utc>>,
    /// Only this actor id.
    pub actor_id: Option<String>,
    /// Only these actions.
    pub action: Option<ActionFilter>,
}

/// Up to `limit` events of `chain` matching `filter`, after the keyset position `after`
/// (a sequence number), newest first unless `oldest_first`.
pub async fn list(
    conn: &mut AsyncPgConnection,
    chain: Uuid,
    filter: &Filter,
    after: Option<i64>,
    limit: i64,
    oldest_first: bool,
) -> QueryResult<Vec<EventRow>> {
    let mut query = audit_events::table
        .filter(audit_events::chain.eq(chain))
        .select(EventRow::as_select())
        .limit(limit)
        .into_boxed();
    if let Some(start) = filter.start {
        query = query.filter(audit_events::occurred_at.ge(start));
    }
    if let Some(end) = filter.end {
        query = query.filter(audit_events::occurred_at.lt(end));
    }
    if let Some(actor) = &filter.actor_id {
        query = query.filter(audit_events::actor_id.eq(actor.clone()));
    }
    match &filter.action {
        Some(ActionFilter::Exact(action)) => {
            query = query.filter(audit_events::action.eq(action.clone()));
        }
        Some(ActionFilter::Prefix(prefix)) => {
            // `_` is a LIKE wildcard and occurs in action names; escape it (and `\`, `%`).
            let escaped = prefix
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            query = query.filter(audit_events::action.like(format!("{escaped}%")));
        }
        None => {}
    }
    query = if oldest_first {
        if let Some(after) = after {
            query = query.filter(audit_events::sequence.gt(after));
        }
        query.order(audit_events::sequence.asc())
    } else {
        if let Some(after) = after {
            query = query.filter(audit_events::sequence.lt(after));
        }
        query.order(audit_events::sequence.desc())
    };
    query.load(conn).await
}

/// The first and last sequence number of `chain`'s events at or below `until` whose time is in
/// `[start, end)`; `None` when no event is.
pub async fn sequence_range(
    conn: &mut AsyncPgConnection,
    chain: Uuid,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    until: i64,
) -> QueryResult<Option<(i64, i64)>> {
    let mut query = audit_events::table
        .filter(audit_events::chain.eq(chain))
        .filter(audit_events::sequence.le(until))
        .select((
            diesel::dsl::min(audit_events::sequence),
            diesel::dsl::max(audit_events::sequence),
        ))
        .into_boxed();
    if let Some(start) = start {
        query = query.filter(audit_events::occurred_at.ge(start));
    }
    if let Some(end) = end {
        query = query.filter(audit_events::occurred_at.lt(end));
    }
    let (first, last) = query.first::<(Option<i64>, Option<i64>)>(conn).await?;
    Ok(first.zip(last))
}
