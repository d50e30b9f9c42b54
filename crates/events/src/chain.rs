//! The hash chain of audit events (BX2): per tenant (and one platform chain), events are
//! numbered 1, 2, 3, ... and `hash = SHA-256(prev_hash || canonical)`, where `canonical` is
//! the event's canonical encoding: a JSON object with its keys sorted, no whitespace, times
//! in RFC 3339 UTC with exactly six fractional digits, and every value a string except
//! `sequence`. The first event's `prev_hash` is 32 zero bytes ([`GENESIS`]).
//!
//! The audit service computes the hashes; [`verify_export`] checks an export offline, exactly
//! as documented in `hafen.audit.v1.ExportAuditLogResponse`.

use std::collections::BTreeMap;

use base64::Engine;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The `prev_hash` of a chain's first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// One event as it is chained: every field the hash covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainedEvent {
    /// The tenant (`None`: the platform chain).
    pub tenant_id: Option<Uuid>,
    /// Position in the chain, from 1.
    pub sequence: u64,
    /// The producer's event id.
    pub event_id: Uuid,
    /// When the audited change happened (microsecond precision, as stored).
    pub time: DateTime<Utc>,
    /// `user`, `operator`, `service` or `system`.
    pub actor_kind: String,
    /// The actor's id.
    pub actor_id: String,
    /// `<service>.<object>.<verb>`.
    pub action: String,
    /// Kind of the affected object, or empty.
    pub target_type: String,
    /// Id of the affected object, or empty.
    pub target_id: String,
    /// The request id, or empty.
    pub request_id: String,
    /// `success`, `failure` or `denied`.
    pub outcome: String,
    /// Ids and counts.
    pub attributes: BTreeMap<String, String>,
}

impl ChainedEvent {
    /// The canonical encoding that is hashed.
    pub fn canonical(&self) -> Vec<u8> {
        let mut object = BTreeMap::<&str, serde_json::Value>::new();
        let text = |s: &str| serde_json::Value::String(s.to_owned());
        object.insert(
            "tenant_id",
            text(&self.tenant_id.map(|t| t.to_string()).unwrap_or_default()),
        );
        object.insert("sequence", serde_json::Value::from(self.sequence));
        object.insert("event_id", text(&self.event_id.to_string()));
        object.insert("time", text(&rfc3339(self.time)));
        object.insert("actor_kind", text(&self.actor_kind));
        object.insert("actor_id", text(&self.actor_id));
        object.insert("action", text(&self.action));
        object.insert("target_type", text(&self.target_type));
        object.insert("target_id", text(&self.target_id));
        object.insert("request_id", text(&self.request_id));
        object.insert("outcome", text(&self.outcome));
        object.insert(
            "attributes",
            serde_json::Value::Object(
                self.attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), text(v)))
                    .collect(),
            ),
        );
        // A map of strings and numbers always serialises.
        serde_json::to_vec(&object).unwrap_or_default()
    }

    /// This event's hash after `prev_hash`.
    pub fn hash(&self, prev_hash: &[u8]) -> [u8; 32] {
        link(prev_hash, &self.canonical())
    }
}

/// `SHA-256(prev_hash || canonical)`.
pub fn link(prev_hash: &[u8], canonical: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    hasher.update(canonical);
    hasher.finalize().into()
}

/// A time as the chain writes it: RFC 3339, UTC, six fractional digits.
pub fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// One line of an audit-log export (JSON Lines).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportLine {
    pub event_id: String,
    pub tenant_id: String,
    pub sequence: u64,
    pub time: String,
    pub actor_kind: String,
    pub actor_id: String,
    pub action: String,
    pub target_type: String,
    pub target_id: String,
    pub request_id: String,
    pub outcome: String,
    pub attributes: BTreeMap<String, String>,
    /// Lowercase hex.
    pub prev_hash: String,
    /// Lowercase hex.
    pub hash: String,
    /// Base64 of the exact bytes that were hashed.
    pub canonical: String,
}

impl ExportLine {
    /// The export line of a stored event and its hashes.
    pub fn new(event: &ChainedEvent, prev_hash: &[u8], hash: &[u8]) -> Self {
        Self {
            event_id: event.event_id.to_string(),
            tenant_id: event.tenant_id.map(|t| t.to_string()).unwrap_or_default(),
            sequence: event.sequence,
            time: rfc3339(event.time),
            actor_kind: event.actor_kind.clone(),
            actor_id: event.actor_id.clone(),
            action: event.action.clone(),
            target_type: event.target_type.clone(),
            target_id: event.target_id.clone(),
            request_id: event.request_id.clone(),
            outcome: event.outcome.clone(),
            attributes: event.attributes.clone(),
            prev_hash: hex::encode(prev_hash),
            hash: hex::encode(hash),
            canonical: base64::engine::general_purpose::STANDARD.encode(event.canonical()),
        }
    }
}

/// What an offline verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportVerification {
    /// Lines checked.
    pub events: u64,
    /// The first line's `prev_hash` (links to the event before the export), hex.
    pub first_prev_hash: Option<String>,
    /// The last line's hash (compare with a trusted VerifyChain head_hash), hex.
    pub last_hash: Option<String>,
    /// The sequence number of the first broken link, with what is wrong.
    pub broken: Option<(u64, String)>,
}

/// Verifies an export (JSON Lines) without Hafen: every line's hash must be
/// `SHA-256(prev_hash || canonical)`, its canonical bytes must encode the line's own fields,
/// each line's `prev_hash` must be the previous line's hash and sequences must follow each
/// other. Stops at the first broken link.
pub fn verify_export(document: &str) -> Result<ExportVerification, String> {
    let mut result = ExportVerification {
        events: 0,
        first_prev_hash: None,
        last_hash: None,
        broken: None,
    };
    let mut previous: Option<ExportLine> = None;
    for (number, text) in document.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let line: ExportLine = serde_json::from_str(text)
            .map_err(|err| format!("line {}: not an export line: {err}", number + 1))?;
        result.events += 1;
        if result.first_prev_hash.is_none() {
            result.first_prev_hash = Some(line.prev_hash.clone());
        }
        let problem = check_line(&line, previous.as_ref());
        result.last_hash = Some(line.hash.clone());
        if let Some(problem) = problem {
            result.broken = Some((line.sequence, problem));
            return Ok(result);
        }
        previous = Some(line);
    }
    Ok(result)
}

fn check_line(line: &ExportLine, previous: Option<&ExportLine>) -> Option<String> {
    if let Some(previous) = previous {
        if line.prev_hash != previous.hash {
            return Some("prev_hash is not the previous event's hash".into());
        }
        if line.sequence != previous.sequence + 1 {
            return Some(format!("sequence follows {}", previous.sequence));
        }
    }
    let Ok(canonical) = base64::engine::general_purpose::STANDARD.decode(&line.canonical) else {
        return Some("canonical is not base64".into());
    };
    let Ok(prev_hash) = hex::decode(&line.prev_hash) else {
        return Some("prev_hash is not hex".into());
    };
    if hex::encode(link(&prev_hash, &canonical)) != line.hash {
        return Some("hash does not match SHA-256(prev_hash || canonical)".into());
    }
    match from_line(line) {
        Some(event) if event.canonical() == canonical => None,
        _ => Some("the canonical bytes do not encode the line's fields".into()),
    }
}

fn from_line(line: &ExportLine) -> Option<ChainedEvent> {
    Some(ChainedEvent {
        tenant_id: if line.tenant_id.is_empty() {
            None
        } else {
            Some(Uuid::try_parse(&line.tenant_id).ok()?)
        },
        sequence: line.sequence,
        event_id: Uuid::try_parse(&line.event_id).ok()?,
        time: DateTime::parse_from_rfc3339(&line.time)
            .ok()?
            .with_timezone(&Utc),
        actor_kind: line.actor_kind.clone(),
        actor_id: line.actor_id.clone(),
        action: line.action.clone(),
        target_type: line.target_type.clone(),
        target_id: line.target_id.clone(),
        request_id: line.request_id.clone(),
        outcome: line.outcome.clone(),
        attributes: line.attributes.clone(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn event(sequence: u64) -> ChainedEvent {
        ChainedEvent {
            tenant_id: Some(Uuid::nil()),
            sequence,
            event_id: Uuid::now_v7(),
            time: DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap(),
            actor_kind: "user".into(),
            actor_id: Uuid::nil().to_string(),
            action: "auth.login.succeeded".into(),
            target_type: String::new(),
            target_id: String::new(),
            request_id: String::new(),
            outcome: "success".into(),
            attributes: BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]),
        }
    }

    fn export(events: &[ChainedEvent]) -> String {
        let mut prev = GENESIS.to_vec();
        let mut out = String::new();
        for e in events {
            let hash = e.hash(&prev);
            out.push_str(&serde_json::to_string(&ExportLine::new(e, &prev, &hash)).unwrap());
            out.push('\n');
            prev = hash.to_vec();
        }
        out
    }

    #[test]
    fn canonical_encoding_is_sorted_and_compact() {
        let text = String::from_utf8(event(1).canonical()).unwrap();
        assert!(text.starts_with(r#"{"action":"auth.login.succeeded","actor_id""#));
        assert!(text.contains(r#""attributes":{"a":"1","b":"2"}"#));
        assert!(text.contains(r#""time":"2023-11-14T22:13:20.123456Z""#));
        assert!(!text.contains(' '));
    }

    #[test]
    fn bx2_an_export_verifies_offline_and_a_changed_line_is_found() {
        let events: Vec<_> = (1..=4).map(event).collect();
        let document = export(&events);
        let verified = verify_export(&document).unwrap();
        assert_eq!(verified.events, 4);
        assert_eq!(verified.broken, None);
        assert_eq!(verified.first_prev_hash.unwrap(), hex::encode(GENESIS));

        let mut lines: Vec<String> = document.lines().map(String::from).collect();
        lines[2] = lines[2].replace("auth.login.succeeded", "auth.login.failed");
        let verified = verify_export(&lines.join("\n")).unwrap();
        assert_eq!(verified.broken.map(|(s, _)| s), Some(3));
    }
}
