//! Audit-log exports (BX2): the events of one stretch of a chain as JSON Lines (one
//! [`ExportLine`] per event, oldest first), streamed in chunks that end at line boundaries,
//! with the totals and the SHA-256 of the whole document on the last chunk.
//!
//! Rows are read in batches on a fresh pooled connection each, so a slow client holds no
//! connection; the stream stops as soon as the client goes away.

use std::collections::HashMap;

use hafen_events::chain::ExportLine;
use hafen_proto::audit::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::event::Chain;
use crate::log::AuditLog;
use crate::repo::SignedHead;

/// Chunks hold at most this many bytes, unless a single line is longer (it then travels
/// alone: a chunk always ends at a line boundary).
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Cuts a document into chunks at line boundaries, keeping offsets, the count and the hash.
#[derive(Debug)]
pub struct Chunker {
    buffer: Vec<u8>,
    offset: u64,
    events: u64,
    hasher: Sha256,
}

impl Default for Chunker {
    fn default() -> Self {
        Self {
            buffer: Vec::with_capacity(CHUNK_BYTES),
            offset: 0,
            events: 0,
            hasher: Sha256::new(),
        }
    }
}

impl Chunker {
    /// Adds one line (without its newline); returns a full chunk when the line did not fit
    /// into the current one.
    pub fn push(&mut self, line: &[u8]) -> Option<pb::ExportAuditLogResponse> {
        let full = if !self.buffer.is_empty() && self.buffer.len() + line.len() + 1 > CHUNK_BYTES {
            Some(self.take())
        } else {
            None
        };
        self.buffer.extend_from_slice(line);
        self.buffer.push(b'\n');
        self.events += 1;
        full
    }

    fn take(&mut self) -> pb::ExportAuditLogResponse {
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES));
        self.hasher.update(&data);
        let offset = self.offset;
        self.offset += data.len() as u64;
        pb::ExportAuditLogResponse {
            data,
            offset,
            ..Default::default()
        }
    }

    /// The last chunk: what is left (possibly nothing), with the totals.
    pub fn finish(mut self) -> pb::ExportAuditLogResponse {
        let mut last = self.take();
        last.last_chunk = true;
        last.events_exported = self.events;
        last.total_size = self.offset;
        last.sha256 = self.hasher.finalize().to_vec();
        last
    }
}

/// Streams the events of `chain` with sequence numbers in `range` (inclusive; `None`: an
/// empty document).
pub fn stream(
    log: AuditLog,
    chain: Chain,
    range: Option<(i64, i64)>,
) -> ReceiverStream<Result<pb::ExportAuditLogResponse, Status>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut chunker = Chunker::default();
        if let Some((first, last)) = range {
            let mut after = first - 1;
            while after < last {
                let rows = match log.rows_between(chain, after, last).await {
                    Ok(rows) => rows,
                    Err(err) => {
                        let _ = tx.send(Err(Status::from(err))).await;
                        return;
                    }
                };
                let Some(newest) = rows.last() else { break };
                let (signed, key) = match log
                    .signed_heads_between(chain, after, newest.sequence)
                    .await
                {
                    Ok(signed) => signed,
                    Err(err) => {
                        let _ = tx.send(Err(Status::from(err))).await;
                        return;
                    }
                };
                let signed: HashMap<i64, SignedHead> =
                    signed.into_iter().map(|h| (h.sequence, h)).collect();
                after = newest.sequence;
                for row in &rows {
                    let event = row.chained_lossy();
                    let mut line = ExportLine::new(&event, &row.prev_hash, &row.hash);
                    if let (Some(head), Some(key)) = (signed.get(&row.sequence), &key) {
                        line = line.signed(head.signed_at, &head.signature, key);
                    }
                    let bytes = serde_json::to_vec(&line).unwrap_or_default();
                    if let Some(chunk) = chunker.push(&bytes)
                        && tx.send(Ok(chunk)).await.is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Ok(chunker.finish())).await;
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bx2_chunks_end_at_line_boundaries_and_add_up() {
        let mut chunker = Chunker::default();
        let line = vec![b'x'; 1000];
        let mut chunks = Vec::new();
        for _ in 0..200 {
            chunks.extend(chunker.push(&line));
        }
        chunks.push(chunker.finish());
        let mut document = Vec::new();
        for chunk in &chunks {
            assert_eq!(chunk.offset, document.len() as u64);
            assert!(chunk.data.len() <= CHUNK_BYTES);
            assert!(chunk.data.is_empty() || chunk.data.ends_with(b"\n"));
            document.extend_from_slice(&chunk.data);
        }
        let last = chunks.last().cloned().unwrap_or_default();
        assert!(last.last_chunk);
        assert_eq!(chunks.iter().filter(|c| c.last_chunk).count(), 1);
        assert_eq!(last.events_exported, 200);
        assert_eq!(last.total_size, document.len() as u64);
        assert_eq!(last.sha256, Sha256::digest(&document).to_vec());
        assert_eq!(document.len(), 200 * 1001);
    }

    #[test]
    fn an_empty_export_is_one_empty_last_chunk() {
        let last = Chunker::default().finish();
        assert!(last.last_chunk && last.data.is_empty());
        assert_eq!(last.events_exported, 0);
        assert_eq!(last.sha256, Sha256::digest(b"").to_vec());
    }

    #[test]
    fn a_line_longer_than_a_chunk_travels_alone() {
        let mut chunker = Chunker::default();
        assert!(chunker.push(b"short").is_none());
        let long = vec![b'y'; CHUNK_BYTES + 10];
        let first = chunker.push(&long).map(|c| c.data);
        assert_eq!(first.as_deref(), Some(&b"short\n"[..]));
        let second = chunker.push(b"after").map(|c| c.data.len());
        assert_eq!(second, Some(CHUNK_BYTES + 11));
    }
}
