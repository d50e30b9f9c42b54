//! Audit events as the service accepts them. [`parse_batch`] turns an AppendEvents request
//! into validated [`NewEvent`]s, naming the first bad field (`events[3].action`), before
//! anything touches the database; [`Chain`] says which hash chain an event joins.
//!
//! The limits are the contract's (`hafen.audit.v1.AuditEvent`): ids are UUIDs, actions are
//! dotted lowercase names, attributes are few and short. What the contract only describes in
//! words (actor and request ids are ids, not free text) is enforced as lengths and the
//! absence of control characters.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, SubsecRound, Utc};
use hafen_events::chain::ChainedEvent;
use hafen_proto::audit::v1 as pb;
use uuid::Uuid;

use crate::error::Error;

/// Most events in one AppendEvents call.
pub const MAX_BATCH: usize = 500;
/// Longest action name, in characters.
pub const MAX_ACTION_CHARS: usize = 100;
/// Most attributes of one event.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute key, in characters.
pub const MAX_ATTRIBUTE_KEY_CHARS: usize = 64;
/// Longest attribute value, in characters.
pub const MAX_ATTRIBUTE_VALUE_CHARS: usize = 256;
/// Longest actor id or request id, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest target type, in characters.
pub const MAX_TARGET_TYPE_CHARS: usize = 64;

/// One hash chain: a tenant's, or the platform chain of operator events not bound to a
/// tenant. Stored as the `chain` column: the tenant id, the nil UUID for the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Chain {
    /// Operator events not bound to a tenant.
    Platform,
    /// A tenant's events.
    Tenant(Uuid),
}

impl Chain {
    /// The stored key.
    pub fn key(self) -> Uuid {
        match self {
            Chain::Platform => Uuid::nil(),
            Chain::Tenant(id) => id,
        }
    }

    /// The chain a stored key names.
    pub fn from_key(key: Uuid) -> Self {
        if key.is_nil() {
            Chain::Platform
        } else {
            Chain::Tenant(key)
        }
    }

    /// The tenant, `None` for the platform chain.
    pub fn tenant(self) -> Option<Uuid> {
        match self {
            Chain::Platform => None,
            Chain::Tenant(id) => Some(id),
        }
    }
}

/// Stored forms of the actor kinds.
pub mod actor_kind {
    /// A user of the tenant.
    pub const USER: &str = "user";
    /// The platform operator.
    pub const OPERATOR: &str = "operator";
    /// Another Hafen service.
    pub const SERVICE: &str = "service";
    /// An automatic job.
    pub const SYSTEM: &str = "system";
}

/// Stored forms of the outcomes.
pub mod outcome {
    /// The action succeeded.
    pub const SUCCESS: &str = "success";
    /// The action failed.
    pub const FAILURE: &str = "failure";
    /// The action was refused.
    pub const DENIED: &str = "denied";
}

/// A validated event, before the chain gives it a sequence number and hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// The producer's id, the idempotency key.
    pub event_id: Uuid,
    /// The chain it joins.
    pub chain: Chain,
    /// When the audited change happened, truncated to microseconds (what PostgreSQL keeps,
    /// so the hash computed now is the hash recomputed from the stored row later).
    pub time: DateTime<Utc>,
    /// One of [`actor_kind`].
    pub actor_kind: &'static str,
    /// The actor's id (a user id in canonical form, or a name).
    pub actor_id: String,
    /// `<service>.<object>.<verb>`.
    pub action: String,
    /// Kind of the affected object, or empty.
    pub target_type: String,
    /// Id of the affected object in canonical form, or empty.
    pub target_id: String,
    /// Request id, or empty.
    pub request_id: String,
    /// One of [`outcome`].
    pub outcome: &'static str,
    /// Ids and counts.
    pub attributes: BTreeMap<String, String>,
}

impl NewEvent {
    /// The event as chained at `sequence`: what the hash covers.
    pub fn chained(&self, sequence: u64) -> ChainedEvent {
        ChainedEvent {
            tenant_id: self.chain.tenant(),
            sequence,
            event_id: self.event_id,
            time: self.time,
            actor_kind: self.actor_kind.to_owned(),
            actor_id: self.actor_id.clone(),
            action: self.action.clone(),
            target_type: self.target_type.clone(),
            target_id: self.target_id.clone(),
            request_id: self.request_id.clone(),
            outcome: self.outcome.to_owned(),
            attributes: self.attributes.clone(),
        }
    }
}

/// Validates an AppendEvents batch: 1-[`MAX_BATCH`] events, each valid. The first problem is
/// named by its field path.
pub fn parse_batch(events: &[pb::AuditEvent]) -> Result<Vec<NewEvent>, Error> {
    if events.is_empty() || events.len() > MAX_BATCH {
        return Err(Error::invalid(
            "events",
            format!("1-{MAX_BATCH} events per call, got {}", events.len()),
        ));
    }
    events
        .iter()
        .enumerate()
        .map(|(i, event)| parse_event(&format!("events[{i}]"), event))
        .collect()
}

/// Validates one event; `path` prefixes the field names in errors.
pub fn parse_event(path: &str, event: &pb::AuditEvent) -> Result<NewEvent, Error> {
    let field = |name: &str| format!("{path}.{name}");
    let event_id = parse_id(&field("event_id"), &event.event_id)?
        .ok_or_else(|| Error::invalid(field("event_id"), "required"))?;
    let chain = match parse_id(&field("tenant_id"), &event.tenant_id)? {
        None => Chain::Platform,
        Some(id) if id.is_nil() => {
            return Err(Error::invalid(
                field("tenant_id"),
                "must not be the nil UUID; leave it empty for platform events",
            ));
        }
        Some(id) => Chain::Tenant(id),
    };
    let time = event
        .time
        .as_ref()
        .ok_or_else(|| Error::invalid(field("time"), "required"))?;
    let time = hafen_platform::datetime(time)
        .filter(|t| (1..=9999).contains(&t.year()))
        .ok_or_else(|| Error::invalid(field("time"), "not a valid timestamp"))?
        .trunc_subsecs(6);
    let actor = event
        .actor
        .as_ref()
        .ok_or_else(|| Error::invalid(field("actor"), "required"))?;
    let (actor_kind, actor_id) = parse_actor(&field("actor"), actor)?;
    if !is_action(&event.action) {
        return Err(Error::invalid(
            field("action"),
            format!(
                "a lowercase dotted name `<service>.<object>.<verb>` of at most \
                 {MAX_ACTION_CHARS} characters (a-z, 0-9, '_')"
            ),
        ));
    }
    let target_type_ok = event.target_type.chars().count() <= MAX_TARGET_TYPE_CHARS
        && event.target_type.chars().all(is_name_char);
    if !target_type_ok {
        return Err(Error::invalid(
            field("target_type"),
            format!("at most {MAX_TARGET_TYPE_CHARS} characters of a-z, 0-9, '_' and '.'"),
        ));
    }
    let target_id = parse_id(&field("target_id"), &event.target_id)?
        .map(|id| id.to_string())
        .unwrap_or_default();
    if !is_plain_id(&event.request_id) {
        return Err(Error::invalid(
            field("request_id"),
            format!("at most {MAX_ID_CHARS} characters, no control characters"),
        ));
    }
    let outcome = match pb::Outcome::try_from(event.outcome) {
        Ok(pb::Outcome::Success) => outcome::SUCCESS,
        Ok(pb::Outcome::Failure) => outcome::FAILURE,
        Ok(pb::Outcome::Denied) => outcome::DENIED,
        _ => {
            return Err(Error::invalid(
                field("outcome"),
                "required: SUCCESS, FAILURE or DENIED",
            ));
        }
    };
    let attributes = parse_attributes(&field("attributes"), &event.attributes)?;
    Ok(NewEvent {
        event_id,
        chain,
        time,
        actor_kind,
        actor_id,
        action: event.action.clone(),
        target_type: event.target_type.clone(),
        target_id,
        request_id: event.request_id.clone(),
        outcome,
        attributes,
    })
}

/// An optional UUID field: `None` when empty.
fn parse_id(field: &str, value: &str) -> Result<Option<Uuid>, Error> {
    if value.is_empty() {
        return Ok(None);
    }
    Uuid::try_parse(value)
        .map(Some)
        .map_err(|_| Error::invalid(field, "must be a UUID"))
}

fn parse_actor(field: &str, actor: &pb::Actor) -> Result<(&'static str, String), Error> {
    let id_field = format!("{field}.id");
    let kind = match pb::ActorKind::try_from(actor.kind) {
        Ok(pb::ActorKind::User) => {
            // An unknown username at login is recorded without an id: nothing typed is kept.
            let id = parse_id(&id_field, &actor.id)?
                .map(|id| id.to_string())
                .unwrap_or_default();
            return Ok((actor_kind::USER, id));
        }
        Ok(pb::ActorKind::Operator) => actor_kind::OPERATOR,
        Ok(pb::ActorKind::Service) => actor_kind::SERVICE,
        Ok(pb::ActorKind::System) => actor_kind::SYSTEM,
        _ => {
            return Err(Error::invalid(
                format!("{field}.kind"),
                "required: USER, OPERATOR, SERVICE or SYSTEM",
            ));
        }
    };
    if actor.id.is_empty() || !is_plain_id(&actor.id) {
        return Err(Error::invalid(
            id_field,
            format!("required: at most {MAX_ID_CHARS} characters, no control characters"),
        ));
    }
    Ok((kind, actor.id.clone()))
}

fn parse_attributes(
    field: &str,
    attributes: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, Error> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_ATTRIBUTES} entries"),
        ));
    }
    // Sorted, so that the same bad batch always names the same field.
    let sorted: BTreeMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (key, value) in &sorted {
        if !is_attribute_key(key) {
            // The key itself is not echoed: it is whatever the producer sent.
            return Err(Error::invalid(
                field,
                format!("keys are 1-{MAX_ATTRIBUTE_KEY_CHARS} characters of a-z, 0-9, '_' and '.'"),
            ));
        }
        if value.chars().count() > MAX_ATTRIBUTE_VALUE_CHARS {
            return Err(Error::invalid(
                format!("{field}.{key}"),
                format!("at most {MAX_ATTRIBUTE_VALUE_CHARS} characters"),
            ));
        }
    }
    Ok(sorted)
}

/// Whether `action` is a valid action name: at least two dot-separated segments, each a
/// lowercase letter followed by lowercase letters, digits or `_`; at most
/// [`MAX_ACTION_CHARS`] characters.
pub fn is_action(action: &str) -> bool {
    action.len() <= MAX_ACTION_CHARS
        && action.split('.').count() >= 2
        && action.split('.').all(is_segment)
}

/// Whether `prefix` is a valid action prefix for filtering: one or more valid segments, each
/// followed by a dot (`auth.` or `auth.login.`).
pub fn is_action_prefix(prefix: &str) -> bool {
    prefix.len() <= MAX_ACTION_CHARS
        && prefix
            .strip_suffix('.')
            .is_some_and(|head| head.split('.').all(is_segment))
}

fn is_segment(segment: &str) -> bool {
    let mut chars = segment.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.'
}

fn is_attribute_key(key: &str) -> bool {
    !key.is_empty()
        && key.chars().count() <= MAX_ATTRIBUTE_KEY_CHARS
        && key.chars().all(is_name_char)
}

/// An id-like string: at most [`MAX_ID_CHARS`] characters, none of them control characters.
pub fn is_plain_id(value: &str) -> bool {
    value.chars().count() <= MAX_ID_CHARS && !value.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn valid() -> pb::AuditEvent {
        pb::AuditEvent {
            event_id: Uuid::now_v7().to_string(),
            tenant_id: Uuid::now_v7().to_string(),
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            }),
            actor: Some(pb::Actor {
                kind: pb::ActorKind::User as i32,
                id: Uuid::now_v7().to_string(),
            }),
            action: "auth.login.succeeded".into(),
            outcome: pb::Outcome::Success as i32,
            attributes: [("chat_code_id".to_owned(), Uuid::now_v7().to_string())].into(),
            ..Default::default()
        }
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::InvalidField { field, .. } => field,
            other => panic!("not an invalid field: {other}"),
        }
    }

    #[test]
    fn a_valid_event_is_accepted_and_its_time_truncated_to_microseconds() {
        let event = parse_event("events[0]", &valid()).unwrap();
        assert_eq!(event.time.timestamp_subsec_nanos(), 123_456_000);
        assert!(matches!(event.chain, Chain::Tenant(_)));
        assert_eq!(event.outcome, outcome::SUCCESS);
    }

    #[test]
    fn every_bad_field_is_named() {
        type Change = Box<dyn Fn(&mut pb::AuditEvent)>;
        let cases: Vec<(&str, Change)> = vec![
            ("events[0].event_id", Box::new(|e| e.event_id.clear())),
            ("events[0].event_id", Box::new(|e| e.event_id = "x".into())),
            (
                "events[0].tenant_id",
                Box::new(|e| e.tenant_id = "nope".into()),
            ),
            (
                "events[0].tenant_id",
                Box::new(|e| e.tenant_id = Uuid::nil().to_string()),
            ),
            ("events[0].time", Box::new(|e| e.time = None)),
            ("events[0].actor", Box::new(|e| e.actor = None)),
            (
                "events[0].actor.kind",
                Box::new(|e| e.actor.as_mut().unwrap().kind = 0),
            ),
            (
                "events[0].actor.id",
                Box::new(|e| e.actor.as_mut().unwrap().id = "someone".into()),
            ),
            (
                "events[0].action",
                Box::new(|e| e.action = "Auth.Login".into()),
            ),
            ("events[0].action", Box::new(|e| e.action = "auth".into())),
            (
                "events[0].action",
                Box::new(|e| e.action = "auth..x".into()),
            ),
            (
                "events[0].action",
                Box::new(|e| e.action = format!("a.{}", "b".repeat(99))),
            ),
            (
                "events[0].target_type",
                Box::new(|e| e.target_type = "User Row".into()),
            ),
            (
                "events[0].target_id",
                Box::new(|e| e.target_id = "1".into()),
            ),
            (
                "events[0].request_id",
                Box::new(|e| e.request_id = "a\nb".into()),
            ),
            ("events[0].outcome", Box::new(|e| e.outcome = 0)),
            (
                "events[0].attributes",
                Box::new(|e| {
                    e.attributes.insert("Bad Key".into(), "1".into());
                }),
            ),
            (
                "events[0].attributes",
                Box::new(|e| {
                    e.attributes.insert("k".repeat(65), "1".into());
                }),
            ),
            (
                "events[0].attributes",
                Box::new(|e| {
                    for i in 0..33 {
                        e.attributes.insert(format!("k{i}"), "1".into());
                    }
                }),
            ),
            (
                "events[0].attributes.count",
                Box::new(|e| {
                    e.attributes.insert("count".into(), "9".repeat(257));
                }),
            ),
        ];
        for (expected, change) in cases {
            let mut event = valid();
            change(&mut event);
            let err = parse_event("events[0]", &event).unwrap_err();
            assert_eq!(field_of(err), expected);
        }
    }

    #[test]
    fn the_limits_themselves_are_accepted() {
        let mut event = valid();
        event.action = format!("a.{}", "b".repeat(98));
        event.tenant_id.clear();
        event.actor = Some(pb::Actor {
            kind: pb::ActorKind::User as i32,
            id: String::new(),
        });
        for i in 0..32 {
            event
                .attributes
                .insert(format!("{i:0>64}"), "é".repeat(256));
        }
        event.attributes.remove("chat_code_id");
        let parsed = parse_event("e", &event).unwrap();
        assert_eq!(parsed.chain, Chain::Platform);
        assert_eq!(parsed.actor_id, "");
    }

    #[test]
    fn batches_hold_one_to_five_hundred_events() {
        assert_eq!(field_of(parse_batch(&[]).unwrap_err()), "events");
        let many = vec![valid(); MAX_BATCH + 1];
        assert_eq!(field_of(parse_batch(&many).unwrap_err()), "events");
        assert_eq!(parse_batch(&many[..MAX_BATCH]).unwrap().len(), MAX_BATCH);
        let mut bad = vec![valid(); 3];
        bad[1].action = "nope".into();
        assert_eq!(field_of(parse_batch(&bad).unwrap_err()), "events[1].action");
    }

    #[test]
    fn action_prefixes_end_with_a_dot() {
        assert!(is_action_prefix("auth."));
        assert!(is_action_prefix("auth.login."));
        assert!(!is_action_prefix("auth"));
        assert!(!is_action_prefix("."));
        assert!(!is_action_prefix("auth..login."));
        assert!(is_action("tenant.created"));
        assert!(is_action("messaging.message.deleted_by_admin"));
        assert!(!is_action("tenant.Created"));
    }
}
