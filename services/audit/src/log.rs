//! The audit log: appending batches to the hash chains, listing, verifying, and reading
//! ranges for exports. Testable without gRPC; `api` only parses and converts.
//!
//! An append is one transaction: the heads of every chain the batch touches are locked in
//! ascending chain order (so concurrent batches never deadlock), event ids already stored are
//! dropped as duplicates, and each new event gets the next sequence number, its predecessor's
//! hash and `SHA-256(prev_hash || canonical)`; then each touched chain's new head is signed
//! with the chain's Ed25519 key ([`crate::signing`]) and the signed head stored, in the same
//! transaction. Verification recomputes every hash from the stored columns, in batches, so a
//! changed column breaks exactly that event's link, and checks every signed head against the
//! row it signs: a chain edited and recomputed consistently breaks at the first signed head
//! after the edit, and a head without a signature is not intact either.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use diesel_async::{AnsiTransactionManager, AsyncPgConnection, TransactionManager};
use hafen_events::chain::GENESIS;
use hafen_store::Pool;
use hafen_store::control::TenantRow;
use uuid::Uuid;

use crate::error::Error;
use crate::event::{Chain, NewEvent};
use crate::repo::{self, EventRow, Filter, Head, NewRow, SignedHead};
use crate::signing::Signer;

/// Rows read per query while verifying or exporting.
pub const READ_BATCH: i64 = 1000;

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    /// Events newly chained.
    pub appended: u32,
    /// Events whose id was stored already, or came earlier in the same batch.
    pub duplicates: u32,
}

/// What a verification found (BX2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Every link intact.
    pub intact: bool,
    /// Events checked.
    pub events_checked: u64,
    /// The first broken link's sequence number; 0 when intact.
    pub first_broken_sequence: u64,
    /// The head's sequence number; 0 for an empty chain.
    pub head_sequence: u64,
    /// The head's hash; empty for an empty chain.
    pub head_hash: Vec<u8>,
    /// How many links are broken (for the log; the API reports the first).
    pub broken_links: u64,
    /// Signed heads whose signature verified and whose hash is the stored event's.
    pub signatures_checked: u64,
    /// Whether the head is a signed head (always true for a chain appended to since the
    /// chains were signed; false for an empty chain).
    pub head_signed: bool,
    /// The chain's public key; empty before its first append.
    pub public_key: Vec<u8>,
}

/// The audit log over the control plane's chain tables.
#[derive(Clone)]
pub struct AuditLog {
    pool: Pool,
    signer: Arc<Signer>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// The log stored in the database behind `pool` (the main database), signing heads
    /// with `signer`.
    pub fn new(pool: Pool, signer: Signer) -> Self {
        Self {
            pool,
            signer: Arc::new(signer),
        }
    }

    async fn conn(&self) -> Result<hafen_store::PooledConnection, Error> {
        self.pool
            .get()
            .await
            .map_err(|err| Error::Store(hafen_store::Error::Pool(err)))
    }

    /// Appends `events` atomically: all of them are chained (or counted as duplicates), or,
    /// on any error, none.
    pub async fn append(&self, events: &[NewEvent]) -> Result<Appended, Error> {
        let mut conn = self.conn().await?;
        let conn: &mut AsyncPgConnection = &mut conn;
        AnsiTransactionManager::begin_transaction(conn).await?;
        match append_in(conn, events, &self.signer).await {
            Ok(appended) => {
                AnsiTransactionManager::commit_transaction(conn).await?;
                Ok(appended)
            }
            Err(err) => {
                // A failed rollback leaves the connection marked broken; the pool discards it.
                let _ = AnsiTransactionManager::rollback_transaction(conn).await;
                Err(err)
            }
        }
    }

    /// Records an event of this service itself (TM2: operator calls and exports), through
    /// the same validation and append as every other event.
    pub async fn record(&self, event: &hafen_events::Event) -> Result<(), Error> {
        let parsed = crate::event::parse_event("event", &event.to_proto())
            .map_err(|err| Error::OwnEvent(err.to_string()))?;
        self.append(std::slice::from_ref(&parsed)).await?;
        Ok(())
    }

    /// Up to `limit` events of `chain` matching `filter` after the sequence `after`, and
    /// whether more follow.
    pub async fn list(
        &self,
        chain: Chain,
        filter: &Filter,
        after: Option<i64>,
        limit: usize,
        oldest_first: bool,
    ) -> Result<(Vec<EventRow>, bool), Error> {
        let mut conn = self.conn().await?;
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
        let mut rows =
            repo::list(&mut conn, chain.key(), filter, after, fetch, oldest_first).await?;
        let more = rows.len() > limit;
        rows.truncate(limit);
        Ok((rows, more))
    }

    /// Verifies `chain` from its first event to its head, reading rows in batches.
    pub async fn verify(&self, chain: Chain) -> Result<Verification, Error> {
        let mut conn = self.conn().await?;
        // The head first: every row up to it was committed with it, so the rows read next
        // are complete even while appends continue.
        let head = repo::head(&mut conn, chain.key()).await?;
        let until = head.as_ref().map_or(i64::MAX, |h| h.sequence);
        let key = self
            .signer
            .verified_public_key(&mut conn, chain.key())
            .await?;
        let key_consistent = key.as_ref().is_none_or(|(_, consistent)| *consistent);
        let mut verifier = Verifier::default();
        let mut signatures = Signatures::new(chain, key.map(|(public_key, _)| public_key));
        if !key_consistent {
            // The stored public key is not the one the chain's sealed key has: someone
            // replaced it, so nothing from the first event on can be vouched for.
            signatures.first_bad = Some(1);
        }
        let mut after = 0;
        loop {
            let rows = repo::rows_between(&mut conn, chain.key(), after, until, READ_BATCH).await?;
            for row in &rows {
                verifier.check(row);
            }
            let full = rows.len() as i64 == READ_BATCH;
            let signed_until = match rows.last() {
                Some(last) if full => last.sequence,
                _ => until,
            };
            let signed =
                repo::signed_heads_between(&mut conn, chain.key(), after, signed_until).await?;
            signatures.check(&rows, &signed);
            match rows.last() {
                Some(last) if full => after = last.sequence,
                _ => break,
            }
        }
        Ok(signatures.finish(verifier.finish(head.as_ref())))
    }

    /// `chain`'s signed heads with `after < sequence <= until`, and its public key.
    pub async fn signed_heads_between(
        &self,
        chain: Chain,
        after: i64,
        until: i64,
    ) -> Result<(Vec<SignedHead>, Option<Vec<u8>>), Error> {
        let mut conn = self.conn().await?;
        let heads = repo::signed_heads_between(&mut conn, chain.key(), after, until).await?;
        let key = self
            .signer
            .verified_public_key(&mut conn, chain.key())
            .await?
            .map(|(key, _)| key);
        Ok((heads, key))
    }

    /// What the running service instances report about themselves (GR7).
    pub async fn service_facts(&self) -> Result<Vec<hafen_store::facts::ServiceFacts>, Error> {
        let mut conn = self.conn().await?;
        Ok(hafen_store::facts::current(&mut conn).await?)
    }

    /// The newest complete backup run that is recent enough to state, if any.
    pub async fn last_backup(&self) -> Result<Option<hafen_store::facts::BackupRun>, Error> {
        let mut conn = self.conn().await?;
        Ok(hafen_store::facts::last_complete_backup(&mut conn).await?)
    }

    /// The tenant row with `id`, whatever its status.
    pub async fn tenant(&self, id: Uuid) -> Result<Option<TenantRow>, Error> {
        let mut conn = self.conn().await?;
        Ok(hafen_store::control::find(&mut conn, id).await?)
    }

    /// The sequence numbers an export of `chain` in `[start, end)` covers, bounded by the head
    /// now: from the first event in the range to the last, including any event in between
    /// whose time lies outside (producers deliver late), so the export is one unbroken piece
    /// of the chain that verifies offline. `None` when nothing is in the range.
    pub async fn export_range(
        &self,
        chain: Chain,
        start: Option<DateTime<Utc>>,
        end: Option<DateTime<Utc>>,
    ) -> Result<Option<(i64, i64)>, Error> {
        let mut conn = self.conn().await?;
        let Some(head) = repo::head(&mut conn, chain.key()).await? else {
            return Ok(None);
        };
        let Some((first, last)) =
            repo::sequence_range(&mut conn, chain.key(), start, end, head.sequence).await?
        else {
            return Ok(None);
        };
        // To the next signed head, so the whole export is covered by a signature.
        let signed = repo::next_signed_sequence(&mut conn, chain.key(), last)
            .await?
            .filter(|signed| *signed <= head.sequence)
            .unwrap_or(last);
        Ok(Some((first, signed)))
    }

    /// Up to [`READ_BATCH`] events of `chain` with `after < sequence <= until`, ascending.
    pub async fn rows_between(
        &self,
        chain: Chain,
        after: i64,
        until: i64,
    ) -> Result<Vec<EventRow>, Error> {
        let mut conn = self.conn().await?;
        Ok(repo::rows_between(&mut conn, chain.key(), after, until, READ_BATCH).await?)
    }
}

async fn append_in(
    conn: &mut AsyncPgConnection,
    events: &[NewEvent],
    signer: &Signer,
) -> Result<Appended, Error> {
    let mut result = Appended::default();
    let mut seen = HashSet::new();
    let mut fresh = Vec::with_capacity(events.len());
    for event in events {
        if seen.insert(event.event_id) {
            fresh.push(event);
        } else {
            result.duplicates += 1;
        }
    }
    // BTreeMap: the heads are locked in ascending chain order.
    let mut heads: BTreeMap<Uuid, Head> = fresh
        .iter()
        .map(|e| (e.chain.key(), Head::default()))
        .collect();
    for (chain, head) in &mut heads {
        *head = repo::lock_head(conn, *chain).await?;
    }
    let empty_before: HashSet<Uuid> = heads
        .iter()
        .filter(|(_, head)| head.sequence == 0)
        .map(|(chain, _)| *chain)
        .collect();
    // Read after the locks: a concurrent batch with the same events has committed by now.
    let ids: Vec<Uuid> = fresh.iter().map(|e| e.event_id).collect();
    let stored: HashSet<Uuid> = repo::stored_ids(conn, &ids).await?.into_iter().collect();
    let mut rows = Vec::with_capacity(fresh.len());
    let mut moved = Vec::new();
    for event in fresh {
        if stored.contains(&event.event_id) {
            result.duplicates += 1;
            continue;
        }
        let Some(head) = heads.get_mut(&event.chain.key()) else {
            continue;
        };
        let sequence = head.sequence + 1;
        let chained = event.chained(u64::try_from(sequence).unwrap_or_default());
        let hash = chained.hash(&head.hash).to_vec();
        rows.push(NewRow {
            chain: event.chain.key(),
            sequence,
            event_id: event.event_id,
            occurred_at: event.time,
            actor_kind: event.actor_kind,
            actor_id: &event.actor_id,
            action: &event.action,
            target_type: &event.target_type,
            target_id: &event.target_id,
            request_id: &event.request_id,
            outcome: event.outcome,
            attributes: serde_json::to_value(&event.attributes).unwrap_or_default(),
            prev_hash: std::mem::replace(&mut head.hash, hash.clone()),
            hash,
        });
        head.sequence = sequence;
        moved.push(event.chain.key());
        result.appended += 1;
    }
    repo::insert(conn, &rows).await?;
    moved.sort_unstable();
    moved.dedup();
    for chain in moved {
        if let Some(head) = heads.get(&chain) {
            repo::set_head(conn, chain, head).await?;
            let key = signer
                .key(conn, chain, empty_before.contains(&chain))
                .await?;
            let (signed_at, signature) =
                crate::signing::sign(&key, chain, head.sequence, &head.hash);
            repo::insert_signed_head(
                conn,
                &SignedHead {
                    chain,
                    sequence: head.sequence,
                    hash: head.hash.clone(),
                    signed_at,
                    signature,
                },
            )
            .await?;
        }
    }
    Ok(result)
}

/// Checks a chain's signed heads batch by batch, against the rows read in the same range.
struct Signatures {
    chain: Chain,
    public_key: Option<Vec<u8>>,
    checked: u64,
    first_bad: Option<u64>,
    last_signed: i64,
}

impl Signatures {
    fn new(chain: Chain, public_key: Option<Vec<u8>>) -> Self {
        Self {
            chain,
            public_key,
            checked: 0,
            first_bad: None,
            last_signed: 0,
        }
    }

    /// A signed head is good when its hash is the stored event's at its sequence and its
    /// signature verifies with the chain's public key.
    fn check(&mut self, rows: &[EventRow], signed: &[SignedHead]) {
        let hashes: HashMap<i64, &[u8]> = rows
            .iter()
            .map(|row| (row.sequence, row.hash.as_slice()))
            .collect();
        for head in signed {
            let sequence = u64::try_from(head.sequence).unwrap_or_default();
            let statement = hafen_events::chain::head_statement(
                self.chain.tenant(),
                sequence,
                &head.hash,
                head.signed_at,
            );
            let good = hashes.get(&head.sequence) == Some(&head.hash.as_slice())
                && self.public_key.as_deref().is_some_and(|key| {
                    hafen_events::chain::verify_head(key, &statement, &head.signature)
                });
            if good {
                self.checked += 1;
                self.last_signed = self.last_signed.max(head.sequence);
            } else {
                self.first_bad.get_or_insert(sequence);
            }
        }
    }

    fn finish(self, mut result: Verification) -> Verification {
        result.signatures_checked = self.checked;
        result.public_key = self.public_key.unwrap_or_default();
        result.head_signed = result.head_sequence > 0
            && u64::try_from(self.last_signed).ok() == Some(result.head_sequence);
        let unsigned_head =
            (result.head_sequence > 0 && !result.head_signed).then_some(result.head_sequence);
        let first = [
            (!result.intact).then_some(result.first_broken_sequence),
            self.first_bad,
            unsigned_head,
        ]
        .into_iter()
        .flatten()
        .min();
        if let Some(first) = first {
            result.intact = false;
            result.first_broken_sequence = first;
        }
        result
    }
}

impl Default for Head {
    fn default() -> Self {
        Self {
            sequence: 0,
            hash: GENESIS.to_vec(),
        }
    }
}

/// Checks a chain's rows in ascending order, one at a time, remembering the first broken
/// link: a sequence gap (the missing number is reported), a `prev_hash` that is not the
/// previous row's stored hash, or a stored hash that differs from the hash recomputed from
/// the row's columns.
#[derive(Debug)]
pub struct Verifier {
    expected: u64,
    prev_hash: Vec<u8>,
    checked: u64,
    first_broken: Option<u64>,
    broken_links: u64,
    last: Option<(u64, Vec<u8>)>,
}

impl Default for Verifier {
    fn default() -> Self {
        Self {
            expected: 1,
            prev_hash: GENESIS.to_vec(),
            checked: 0,
            first_broken: None,
            broken_links: 0,
            last: None,
        }
    }
}

impl Verifier {
    /// Checks the next row.
    pub fn check(&mut self, row: &EventRow) {
        let sequence = u64::try_from(row.sequence).unwrap_or_default();
        self.checked += 1;
        if sequence != self.expected {
            self.broken(self.expected);
        } else if row.prev_hash != self.prev_hash {
            self.broken(sequence);
        } else {
            let recomputed = row.chained().map(|event| event.hash(&row.prev_hash));
            if recomputed.as_ref().map(|h| h.as_slice()) != Some(row.hash.as_slice()) {
                self.broken(sequence);
            }
        }
        // Later links are checked against what is stored, so one edited row breaks only its
        // own link.
        self.expected = sequence.saturating_add(1);
        self.prev_hash.clone_from(&row.hash);
        self.last = Some((sequence, row.hash.clone()));
    }

    fn broken(&mut self, sequence: u64) {
        self.first_broken.get_or_insert(sequence);
        self.broken_links += 1;
    }

    /// The result, given the chain's recorded head (rows missing at the end, or a head that
    /// is not the last row, are broken links too).
    pub fn finish(mut self, head: Option<&Head>) -> Verification {
        let recorded = head.filter(|h| h.sequence > 0).map(|h| {
            (
                u64::try_from(h.sequence).unwrap_or_default(),
                h.hash.clone(),
            )
        });
        if let Some((sequence, hash)) = &recorded {
            match &self.last {
                Some((last, _)) if last < sequence => self.broken(self.expected),
                None => self.broken(1),
                Some((_, last_hash)) if last_hash != hash => self.broken(*sequence),
                Some(_) => {}
            }
        }
        let (head_sequence, head_hash) = recorded.or(self.last).unwrap_or_default();
        Verification {
            intact: self.first_broken.is_none(),
            events_checked: self.checked,
            first_broken_sequence: self.first_broken.unwrap_or_default(),
            head_sequence,
            head_hash,
            broken_links: self.broken_links,
            signatures_checked: 0,
            head_signed: false,
            public_key: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::event::{actor_kind, outcome};

    fn chain_of(n: usize) -> Vec<EventRow> {
        let tenant = Uuid::now_v7();
        let mut prev = GENESIS.to_vec();
        (1..=n)
            .map(|sequence| {
                let event = NewEvent {
                    event_id: Uuid::now_v7(),
                    chain: Chain::Tenant(tenant),
                    time: hafen_store::now(),
                    actor_kind: actor_kind::SERVICE,
                    actor_id: "hafen-test".into(),
                    action: "test.event.happened".into(),
                    target_type: String::new(),
                    target_id: String::new(),
                    request_id: String::new(),
                    outcome: outcome::SUCCESS,
                    attributes: [("n".to_owned(), sequence.to_string())].into(),
                };
                let hash = event.chained(sequence as u64).hash(&prev).to_vec();
                let row = EventRow {
                    chain: tenant,
                    sequence: sequence as i64,
                    event_id: event.event_id,
                    occurred_at: event.time,
                    actor_kind: event.actor_kind.into(),
                    actor_id: event.actor_id.clone(),
                    action: event.action.clone(),
                    target_type: String::new(),
                    target_id: String::new(),
                    request_id: String::new(),
                    outcome: event.outcome.into(),
                    attributes: serde_json::to_value(&event.attributes).unwrap(),
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                row
            })
            .collect()
    }

    fn verify(rows: &[EventRow], head: Option<&Head>) -> Verification {
        let mut verifier = Verifier::default();
        for row in rows {
            verifier.check(row);
        }
        verifier.finish(head)
    }

    fn head_of(rows: &[EventRow]) -> Head {
        let last = rows.last().unwrap();
        Head {
            sequence: last.sequence,
            hash: last.hash.clone(),
        }
    }

    #[test]
    fn bx2_an_intact_chain_verifies() {
        let rows = chain_of(5);
        let result = verify(&rows, Some(&head_of(&rows)));
        assert!(result.intact);
        assert_eq!(result.events_checked, 5);
        assert_eq!(result.head_sequence, 5);
        assert_eq!(result.head_hash, rows[4].hash);
        let empty = verify(&[], None);
        assert!(empty.intact);
        assert_eq!((empty.head_sequence, empty.head_hash.len()), (0, 0));
    }

    #[test]
    fn bx2_an_edited_column_breaks_exactly_its_link() {
        let rows = chain_of(6);
        let head = head_of(&rows);
        let mut edited = rows.clone();
        edited[2].action = "test.event.forged".into();
        let result = verify(&edited, Some(&head));
        assert_eq!(result.first_broken_sequence, 3);
        // The next link points at the stored hash, which did not change: it stays intact.
        assert_eq!(result.broken_links, 1);

        let mut edited = rows.clone();
        edited[4].attributes = serde_json::json!({"n": 5});
        assert_eq!(verify(&edited, Some(&head)).first_broken_sequence, 5);

        let mut edited = rows.clone();
        edited[1].hash = vec![7; 32];
        let result = verify(&edited, Some(&head));
        assert_eq!(result.first_broken_sequence, 2);
        assert_eq!(
            result.broken_links, 2,
            "its own link and the next one's prev_hash"
        );
    }

    #[test]
    fn bx2_missing_rows_are_broken_links() {
        let rows = chain_of(6);
        let head = head_of(&rows);
        let mut gap = rows.clone();
        gap.remove(3);
        let result = verify(&gap, Some(&head));
        assert_eq!(result.first_broken_sequence, 4);
        assert_eq!(result.events_checked, 5);

        let truncated = &rows[..4];
        assert_eq!(verify(truncated, Some(&head)).first_broken_sequence, 5);
        assert_eq!(verify(&rows[1..], Some(&head)).first_broken_sequence, 1);
        assert_eq!(verify(&[], Some(&head)).first_broken_sequence, 1);
    }
}
