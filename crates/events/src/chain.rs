//! The hash chain of audit events (BX2): per tenant (and one platform chain), events are
//! numbered 1, 2, 3, ... and `hash = SHA-256(prev_hash || canonical)`, where `canonical` is
//! the event's canonical encoding: a JSON object with its keys sorted, no whitespace, times
//! in RFC 3339 UTC with exactly six fractional digits, and every value a string except
//! `sequence`. The first event's `prev_hash` is 32 zero bytes ([`GENESIS`]).
//!
//! Every append signs the chain's new head, as Certificate Transparency signs tree heads: an
//! Ed25519 signature by the chain's own key over [`head_statement`] (sequence, hash, time).
//! Whoever can write the audit tables can recompute the hashes after editing an event, but not
//! the signatures; anyone can check them with the public key alone ([`verify_head`]).
//!
//! The audit service computes the hashes and signs; [`verify_export`] checks an export
//! offline, exactly as documented in `hafen.audit.v1.ExportAuditLogResponse`.

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

/// The text a chain head's signature covers, as UTF-8:
/// `hafen audit head v1\n<chain>\n<sequence>\n<hash, lowercase hex>\n<signed at, RFC 3339>\n`,
/// where `<chain>` is the tenant id (canonical hyphenated form) or `platform`.
pub fn head_statement(
    tenant: Option<Uuid>,
    sequence: u64,
    hash: &[u8],
    signed_at: DateTime<Utc>,
) -> String {
    let chain = tenant.map_or_else(|| "platform".to_owned(), |t| t.to_string());
    format!(
        "hafen audit head v1\n{chain}\n{sequence}\n{}\n{}\n",
        hex::encode(hash),
        rfc3339(signed_at)
    )
}

/// Whether `signature` is the Ed25519 signature of `statement` by `public_key` (32 bytes).
pub fn verify_head(public_key: &[u8], statement: &str, signature: &[u8]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
        .verify(statement.as_bytes(), signature)
        .is_ok()
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
    /// On a line whose event was a signed head: when it was signed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_signed_at: Option<String>,
    /// On a signed head's line: base64 of the Ed25519 signature of [`head_statement`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_signature: Option<String>,
    /// On a signed head's line: the chain's public key, lowercase hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
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
            head_signed_at: None,
            head_signature: None,
            public_key: None,
        }
    }

    /// This line with the signature of the head it ends.
    pub fn signed(mut self, signed_at: DateTime<Utc>, signature: &[u8], public_key: &[u8]) -> Self {
        self.head_signed_at = Some(rfc3339(signed_at));
        self.head_signature = Some(base64::engine::general_purpose::STANDARD.encode(signature));
        self.public_key = Some(hex::encode(public_key));
        self
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
    /// Signed heads checked.
    pub signatures: u64,
    /// The public key the signatures verified with, hex.
    pub public_key: Option<String>,
    /// The sequence number of the first broken link, with what is wrong.
    pub broken: Option<(u64, String)>,
}

/// Verifies an export (JSON Lines) without Hafen: every line's hash must be
/// `SHA-256(prev_hash || canonical)`, its canonical bytes must encode the line's own fields,
/// each line's `prev_hash` must be the previous line's hash and sequences must follow each
/// other; every signed head must carry a valid signature of [`head_statement`] by one public
/// key (`trusted_key` when given: take it from the tenant record, not from the export), and
/// the last line must be a signed head, so nothing after the last signature goes unchecked.
/// Stops at the first broken link.
pub fn verify_export(
    document: &str,
    trusted_key: Option<&[u8]>,
) -> Result<ExportVerification, String> {
    let mut result = ExportVerification {
        events: 0,
        first_prev_hash: None,
        last_hash: None,
        signatures: 0,
        public_key: trusted_key.map(hex::encode),
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
        let problem =
            check_line(&line, previous.as_ref()).or_else(|| check_signature(&line, &mut result));
        result.last_hash = Some(line.hash.clone());
        if let Some(problem) = problem {
            result.broken = Some((line.sequence, problem));
            return Ok(result);
        }
        previous = Some(line);
    }
    if let Some(last) = previous
        && last.head_signature.is_none()
    {
        result.broken = Some((
            last.sequence,
            "the export does not end at a signed head".into(),
        ));
    }
    Ok(result)
}

/// Checks the line's head signature, if it has one; every signature must be by the same key.
fn check_signature(line: &ExportLine, result: &mut ExportVerification) -> Option<String> {
    let (Some(signed_at), Some(signature), Some(key)) =
        (&line.head_signed_at, &line.head_signature, &line.public_key)
    else {
        return (line.head_signature.is_some() || line.public_key.is_some())
            .then(|| "an incomplete head signature".into());
    };
    match &result.public_key {
        Some(expected) if expected != key => {
            return Some("signed by another key than the chain's".into());
        }
        Some(_) => {}
        None => result.public_key = Some(key.clone()),
    }
    let (Ok(public_key), Ok(signature), Ok(signed_at), Ok(hash)) = (
        hex::decode(key),
        base64::engine::general_purpose::STANDARD.decode(signature),
        DateTime::parse_from_rfc3339(signed_at),
        hex::decode(&line.hash),
    ) else {
        return Some("a malformed head signature".into());
    };
    let tenant = if line.tenant_id.is_empty() {
        None
    } else {
        Uuid::try_parse(&line.tenant_id).ok()
    };
    let statement = head_statement(tenant, line.sequence, &hash, signed_at.with_timezone(&Utc));
    if !verify_head(&public_key, &statement, &signature) {
        return Some("the head signature does not verify".into());
    }
    result.signatures += 1;
    None
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

    fn new_key() -> ring::signature::Ed25519KeyPair {
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .unwrap();
        ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    /// An export whose heads are signed by `key` every `every` events, and at the end.
    fn export(
        events: &[ChainedEvent],
        key: &ring::signature::Ed25519KeyPair,
        every: usize,
    ) -> String {
        use ring::signature::KeyPair;
        let mut prev = GENESIS.to_vec();
        let mut out = String::new();
        let signed_at = DateTime::from_timestamp(1_700_000_100, 0).unwrap();
        for (i, e) in events.iter().enumerate() {
            let hash = e.hash(&prev);
            let mut line = ExportLine::new(e, &prev, &hash);
            if (i + 1) % every == 0 || i + 1 == events.len() {
                let statement = head_statement(e.tenant_id, e.sequence, &hash, signed_at);
                let signature = key.sign(statement.as_bytes());
                line = line.signed(signed_at, signature.as_ref(), key.public_key().as_ref());
            }
            out.push_str(&serde_json::to_string(&line).unwrap());
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
        use ring::signature::KeyPair;
        let key = new_key();
        let events: Vec<_> = (1..=4).map(event).collect();
        let document = export(&events, &key, 2);
        let verified = verify_export(&document, Some(key.public_key().as_ref())).unwrap();
        assert_eq!(verified.events, 4);
        assert_eq!(verified.signatures, 2);
        assert_eq!(verified.broken, None);
        assert_eq!(verified.first_prev_hash.unwrap(), hex::encode(GENESIS));

        let mut lines: Vec<String> = document.lines().map(String::from).collect();
        lines[2] = lines[2].replace("auth.login.succeeded", "auth.login.failed");
        let verified = verify_export(&lines.join("\n"), None).unwrap();
        assert_eq!(verified.broken.map(|(s, _)| s), Some(3));
    }

    #[test]
    fn bx2_a_consistently_recomputed_export_fails_its_signatures() {
        use ring::signature::KeyPair;
        let key = new_key();
        let mut events: Vec<_> = (1..=4).map(event).collect();
        let genuine = export(&events, &key, 4);
        // Rewrite event 2 and recompute every hash after it: the plain chain is consistent,
        // but the signed head at 4 no longer matches.
        events[1].action = "auth.login.failed".into();
        let forged_hashes = export(&events, &new_key(), 4);
        let genuine_last = genuine.lines().last().unwrap().to_owned();
        let mut forged: Vec<String> = forged_hashes.lines().map(String::from).collect();
        let signed: ExportLine = serde_json::from_str(&genuine_last).unwrap();
        let mut last: ExportLine = serde_json::from_str(&forged[3]).unwrap();
        last.head_signed_at = signed.head_signed_at;
        last.head_signature = signed.head_signature;
        last.public_key = signed.public_key;
        forged[3] = serde_json::to_string(&last).unwrap();
        let verified = verify_export(&forged.join("\n"), Some(key.public_key().as_ref())).unwrap();
        assert_eq!(verified.broken.map(|(s, _)| s), Some(4));
        // Re-signed with a key of the forger's: refused against the chain's real key.
        let verified = verify_export(&forged_hashes, Some(key.public_key().as_ref())).unwrap();
        assert!(
            verified
                .broken
                .is_some_and(|(_, why)| why.contains("another key"))
        );
        // And an export that stops after the last signature is refused.
        let unsigned_tail: String = genuine.lines().take(3).collect::<Vec<_>>().join("\n");
        let verified = verify_export(&unsigned_tail, None).unwrap();
        assert!(
            verified
                .broken
                .is_some_and(|(_, why)| why.contains("signed head"))
        );
    }
}
