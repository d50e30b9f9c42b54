//! ExportTenant (GR5): what the owner may read of the tenant, as a ZIP archive streamed in
//! chunks.
//!
//! The archive holds:
//! - `README.txt`: what is in it and what is not;
//! - `tenant.json`: the tenant record, its settings and its DPA acceptance;
//! - `users.json`: every user: id, username, display name, role, state, times, whether TOTP is
//!   enrolled; never a password hash, TOTP secret or chat code;
//! - `conversations.json`: the conversations the owner is a member of, and every channel
//!   (channels are open to every user), with their members;
//! - `messages/<conversation id>.jsonl`: their messages, oldest first, as stored: bodies
//!   decrypted, masked as they were at sending; deleted ones as tombstones without a body.
//!
//! Other users' direct, group and website-chat conversations are not in it, not even by id.
//!
//! Rows (users, conversations, messages) are read page by page while a ZIP writer on a
//! blocking thread compresses them into chunks, both sides behind bounded channels: memory
//! does not grow with the tenant, and a slow client slows the export instead of filling the
//! server.

use std::io::Write;

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_proto::tenant::v1 as pb;
use hafen_store::keyring::{KeyRing, body_context};
use hafen_store::schema::{conversations, members, messages, users};
use hafen_store::{Databases, TenantId};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::Status;
use uuid::Uuid;

use crate::error::Error;

/// Messages read per query.
pub(crate) const PAGE: i64 = 500;

/// Chunk sizes a client may ask for, and the default.
const MIN_CHUNK: usize = 16 * 1024;
const MAX_CHUNK: usize = 1024 * 1024;
const DEFAULT_CHUNK: usize = 256 * 1024;

const README: &str = "\
Export of a Hafen organisation, made for its owner (GDPR Art. 20).

tenant.json         the organisation, its settings and the accepted data-processing agreement
users.json          every user: id, username, display name, role, state, times; no password
                    hashes, TOTP secrets or chat codes
conversations.json  the conversations the owner is a member of, and every channel
messages/<id>.jsonl their messages, oldest first, one JSON object per line; bodies as stored,
                    i.e. masked as they were when sent; deleted messages without a body

Other users' private conversations are not part of this export.
";

/// The chunk size for a requested `chunk_size` (0: the default).
pub fn chunk_size(requested: i32) -> usize {
    match usize::try_from(requested) {
        Ok(0) | Err(_) => DEFAULT_CHUNK,
        Ok(size) => size.clamp(MIN_CHUNK, MAX_CHUNK),
    }
}

/// What the archive writer is given, in order.
pub(crate) enum Piece {
    /// A new file in the archive.
    File(String, bool),
    /// Bytes of the current file.
    Bytes(Vec<u8>),
    /// Everything was given: the archive may be finished. Without it the writer never writes
    /// the end of the archive, so a failed export cannot pass for a complete one.
    End,
}

/// Streams the export of `tenant` for `owner`: chunks of the archive, the last one with the
/// size and SHA-256, or an error status that ends the stream.
pub fn stream(
    databases: Databases,
    keys: KeyRing,
    tenant: TenantId,
    owner: Uuid,
    chunk: usize,
) -> mpsc::Receiver<Result<pb::ExportTenantResponse, Status>> {
    stream_archive(tenant, chunk, move |pieces| async move {
        read_all(&databases, &keys, &tenant, owner, &pieces).await
    })
}

/// Streams an archive of `tenant`'s whose files `read` gives, file by file, as [`Piece`]s:
/// chunks of the archive, the last one with the size and SHA-256, or an error status that
/// ends the stream.
pub(crate) fn stream_archive<R, F>(
    tenant: TenantId,
    chunk: usize,
    read: R,
) -> mpsc::Receiver<Result<pb::ExportTenantResponse, Status>>
where
    R: FnOnce(mpsc::Sender<Piece>) -> F + Send + 'static,
    F: std::future::Future<Output = Result<(), Error>> + Send + 'static,
{
    let (chunks, out) = mpsc::channel(4);
    let (pieces, to_write) = mpsc::channel::<Piece>(16);
    let writer_chunks = chunks.clone();
    let writer = tokio::task::spawn_blocking(move || write_archive(to_write, writer_chunks, chunk));
    tokio::spawn(async move {
        let read = read(pieces.clone()).await;
        if let Err(err) = read {
            tracing::warn!(tenant_id = %tenant, error = %err, "export failed");
            // The writer stops without finishing the archive; its chunks so far are sent
            // before the error, which ends the stream without a last chunk.
            drop(pieces);
            let _ = writer.await;
            let _ = chunks.send(Err(Status::from(err))).await;
            return;
        }
        let _ = pieces.send(Piece::End).await;
        drop(pieces);
        match writer.await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(tenant_id = %tenant, error = %err, "export not written");
                let _ = chunks
                    .send(Err(hafen_platform::status::unavailable(
                        "the export could not be completed; start it again",
                    )))
                    .await;
            }
            Err(_) => {}
        }
    });
    out
}

/// The writer's side: a streaming ZIP writer whose output is cut into chunks.
fn write_archive(
    mut pieces: mpsc::Receiver<Piece>,
    chunks: mpsc::Sender<Result<pb::ExportTenantResponse, Status>>,
    chunk: usize,
) -> std::io::Result<()> {
    use zip::write::SimpleFileOptions;
    let sink = Chunks {
        chunks,
        buffer: Vec::with_capacity(chunk),
        chunk,
        offset: 0,
        hasher: Sha256::new(),
    };
    let mut zip = zip::ZipWriter::new_stream(sink);
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    loop {
        match pieces.blocking_recv() {
            Some(Piece::File(name, large)) => zip
                .start_file(name, options.large_file(large))
                .map_err(std::io::Error::other)?,
            Some(Piece::Bytes(bytes)) => zip.write_all(&bytes)?,
            Some(Piece::End) => break,
            None => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "export given up before its end",
                ));
            }
        }
    }
    let sink = zip.finish().map_err(std::io::Error::other)?.into_inner();
    sink.finish()
}

/// Cuts what the ZIP writer writes into chunks, hashing and counting as it goes.
struct Chunks {
    chunks: mpsc::Sender<Result<pb::ExportTenantResponse, Status>>,
    buffer: Vec<u8>,
    chunk: usize,
    offset: u64,
    hasher: Sha256,
}

impl Chunks {
    fn send(&mut self, last: bool) -> std::io::Result<()> {
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(self.chunk));
        self.hasher.update(&data);
        let offset = self.offset;
        self.offset += data.len() as u64;
        let mut response = pb::ExportTenantResponse {
            data,
            offset,
            ..Default::default()
        };
        if last {
            response.last_chunk = true;
            response.total_size = self.offset;
            response.sha256 = std::mem::take(&mut self.hasher).finalize().to_vec();
        }
        self.chunks
            .blocking_send(Ok(response))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "client gone"))
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.send(true)
    }
}

impl Write for Chunks {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= self.chunk {
            self.send(false)?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Queryable)]
struct UserRow {
    id: Uuid,
    username: String,
    display_name: String,
    role: String,
    status: String,
    created_at: DateTime<Utc>,
    deactivated_at: Option<DateTime<Utc>>,
    totp_enabled_at: Option<DateTime<Utc>>,
}

#[derive(Queryable)]
struct ConversationRow {
    id: Uuid,
    kind: String,
    title: String,
    creator_id: Uuid,
    created_at: DateTime<Utc>,
}

#[derive(Queryable)]
struct MessageRow {
    id: Uuid,
    sequence: i64,
    sender_id: Uuid,
    ciphertext: Option<Vec<u8>>,
    masked: bool,
    created_at: DateTime<Utc>,
    edited_at: Option<DateTime<Utc>>,
    deleted_at: Option<DateTime<Utc>>,
}

pub(crate) fn time(at: DateTime<Utc>) -> String {
    hafen_events::chain::rfc3339(at)
}

/// Reads everything the export holds and hands it to the writer, file by file.
async fn read_all(
    databases: &Databases,
    keys: &KeyRing,
    tenant: &TenantId,
    owner: Uuid,
    pieces: &mpsc::Sender<Piece>,
) -> Result<(), Error> {
    let give = |piece: Piece| async move {
        pieces
            .send(piece)
            .await
            .map_err(|_| Error::Config("the export's writer stopped".into()))
    };
    let file = |name: &str, json: serde_json::Value| {
        let bytes = serde_json::to_vec_pretty(&json).unwrap_or_default();
        (name.to_owned(), bytes)
    };

    let row = {
        let mut conn = databases.main_connection().await?;
        hafen_store::control::find(&mut conn, tenant.as_uuid())
            .await?
            .ok_or(Error::NotFound)?
    };
    let record = crate::to_proto(&row);
    let tenant_json = json!({
        "tenant_id": record.tenant_id,
        "slug": record.slug,
        "display_name": record.display_name,
        "region": record.region,
        "dpa": record.dpa.as_ref().map(|dpa| json!({
            "version": dpa.version,
            "accepted_by_user_id": dpa.accepted_by_user_id,
            "accepted_at": time(row.dpa_accepted_at),
        })),
        "settings": row.settings,
        "created_at": time(row.created_at),
        "audit_public_key": hex::encode(row.audit_public_key.clone().unwrap_or_default()),
    });
    give(Piece::File("README.txt".into(), false)).await?;
    give(Piece::Bytes(README.as_bytes().to_vec())).await?;
    let (name, bytes) = file("tenant.json", tenant_json);
    give(Piece::File(name, false)).await?;
    give(Piece::Bytes(bytes)).await?;

    let pool = databases.tenant_pool(tenant).await?;

    // users.json, one page of users at a time.
    give(Piece::File("users.json".into(), false)).await?;
    let mut list = JsonList::default();
    let mut after: Option<(DateTime<Utc>, Uuid)> = None;
    loop {
        let page: Vec<UserRow> = hafen_store::with_tenant(&pool, tenant, move |conn| {
            Box::pin(async move {
                let mut query = users::table
                    .order((users::created_at.asc(), users::id.asc()))
                    .limit(PAGE)
                    .select((
                        users::id,
                        users::username,
                        users::display_name,
                        users::role,
                        users::status,
                        users::created_at,
                        users::deactivated_at,
                        users::totp_enabled_at,
                    ))
                    .into_boxed();
                if let Some((at, id)) = after {
                    query = query.filter(
                        users::created_at
                            .gt(at)
                            .or(users::created_at.eq(at).and(users::id.gt(id))),
                    );
                }
                Ok::<_, Error>(query.load(conn).await?)
            })
        })
        .await?;
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.id));
        let items = page.iter().map(|u| {
            json!({
                "user_id": u.id,
                "username": u.username,
                "display_name": u.display_name,
                "role": u.role,
                "state": u.status,
                "created_at": time(u.created_at),
                "deactivated_at": u.deactivated_at.map(time),
                "totp_enrolled": u.totp_enabled_at.is_some(),
            })
        });
        give(Piece::Bytes(list.items(items))).await?;
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    give(Piece::Bytes(list.end())).await?;

    // conversations.json, a page of conversations with their members at a time.
    give(Piece::File("conversations.json".into(), false)).await?;
    let mut list = JsonList::default();
    let mut after = None;
    loop {
        let page = shared_page(&pool, tenant, owner, after).await?;
        let Some(last) = page.last() else { break };
        after = Some((last.created_at, last.id));
        let ids: Vec<Uuid> = page.iter().map(|c| c.id).collect();
        let membership: Vec<(Uuid, Uuid)> = hafen_store::with_tenant(&pool, tenant, move |conn| {
            Box::pin(async move {
                Ok::<_, Error>(
                    members::table
                        .filter(members::conversation_id.eq_any(ids))
                        .order((members::conversation_id, members::joined_at))
                        .select((members::conversation_id, members::user_id))
                        .load(conn)
                        .await?,
                )
            })
        })
        .await?;
        let mut of: std::collections::HashMap<Uuid, Vec<Uuid>> = std::collections::HashMap::new();
        for (conversation, user) in membership {
            of.entry(conversation).or_default().push(user);
        }
        let items = page.iter().map(|c| {
            json!({
                "conversation_id": c.id,
                "kind": c.kind,
                "title": c.title,
                "creator_user_id": c.creator_id,
                "created_at": time(c.created_at),
                "member_user_ids": of.remove(&c.id).unwrap_or_default(),
            })
        });
        give(Piece::Bytes(list.items(items))).await?;
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    give(Piece::Bytes(list.end())).await?;

    // messages/<id>.jsonl per conversation, the conversations paged once more.
    let mut after = None;
    loop {
        let shared = shared_page(&pool, tenant, owner, after).await?;
        let Some(last) = shared.last() else { break };
        after = Some((last.created_at, last.id));
        write_messages(&pool, keys, tenant, &shared, &give).await?;
        if (shared.len() as i64) < PAGE {
            break;
        }
    }
    Ok(())
}

/// A page of the conversations in the export (the owner's, and every channel), after the
/// `(created_at, id)` given.
async fn shared_page(
    pool: &hafen_store::Pool,
    tenant: &TenantId,
    owner: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
) -> Result<Vec<ConversationRow>, Error> {
    hafen_store::with_tenant(pool, tenant, move |conn| {
        Box::pin(async move {
            let mine = members::table
                .filter(members::user_id.eq(owner))
                .select(members::conversation_id);
            let mut query = conversations::table
                .filter(
                    conversations::id
                        .eq_any(mine)
                        .or(conversations::kind.eq("channel")),
                )
                .order((conversations::created_at.asc(), conversations::id.asc()))
                .limit(PAGE)
                .select((
                    conversations::id,
                    conversations::kind,
                    conversations::title,
                    conversations::creator_id,
                    conversations::created_at,
                ))
                .into_boxed();
            if let Some((at, id)) = after {
                query = query.filter(
                    conversations::created_at
                        .gt(at)
                        .or(conversations::created_at
                            .eq(at)
                            .and(conversations::id.gt(id))),
                );
            }
            Ok::<_, Error>(query.load(conn).await?)
        })
    })
    .await
}

/// A JSON array written a few items at a time.
#[derive(Default)]
pub(crate) struct JsonList {
    started: bool,
}

impl JsonList {
    /// The bytes of `items`, continuing the array.
    pub(crate) fn items(&mut self, items: impl Iterator<Item = serde_json::Value>) -> Vec<u8> {
        let mut out = Vec::new();
        for item in items {
            out.extend_from_slice(if self.started { b",\n" } else { b"[\n" });
            self.started = true;
            serde_json::to_writer_pretty(&mut out, &item).unwrap_or_default();
        }
        out
    }

    /// The bytes that close the array (an empty one if no item came).
    pub(crate) fn end(self) -> Vec<u8> {
        if self.started {
            b"\n]\n".to_vec()
        } else {
            b"[]\n".to_vec()
        }
    }
}

/// The messages of `shared`, one JSON Lines file per conversation.
async fn write_messages<F, Fut>(
    pool: &hafen_store::Pool,
    keys: &KeyRing,
    tenant: &TenantId,
    shared: &[ConversationRow],
    give: &F,
) -> Result<(), Error>
where
    F: Fn(Piece) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    for conversation in shared {
        give(Piece::File(
            format!("messages/{}.jsonl", conversation.id),
            true,
        ))
        .await?;
        let mut after = 0_i64;
        loop {
            let id = conversation.id;
            let page: Vec<MessageRow> = hafen_store::with_tenant(pool, tenant, move |conn| {
                Box::pin(async move {
                    Ok::<_, Error>(
                        messages::table
                            .filter(messages::conversation_id.eq(id))
                            .filter(messages::sequence.gt(after))
                            .order(messages::sequence.asc())
                            .limit(PAGE)
                            .select((
                                messages::id,
                                messages::sequence,
                                messages::sender_id,
                                messages::ciphertext,
                                messages::masked,
                                messages::created_at,
                                messages::edited_at,
                                messages::deleted_at,
                            ))
                            .load(conn)
                            .await?,
                    )
                })
            })
            .await?;
            let Some(last) = page.last() else { break };
            after = last.sequence;
            let mut lines = Vec::new();
            for message in &page {
                let body = match &message.ciphertext {
                    Some(sealed) => {
                        match keys.user_key(tenant.as_uuid(), message.sender_id).await {
                            Ok(key) => {
                                let plain = key
                                    .open(&body_context(message.id, conversation.id), sealed)
                                    .map_err(hafen_store::Error::from)?;
                                Some(String::from_utf8_lossy(&plain).into_owned())
                            }
                            // The sender was erased; their message becomes a tombstone shortly.
                            Err(hafen_store::Error::KeyDestroyed) => None,
                            Err(err) => return Err(err.into()),
                        }
                    }
                    None => None,
                };
                let line = json!({
                    "message_id": message.id,
                    "sequence": message.sequence,
                    "sender_user_id": message.sender_id,
                    "body": body,
                    "masked": message.masked,
                    "created_at": time(message.created_at),
                    "edited_at": message.edited_at.map(time),
                    "deleted_at": message.deleted_at.map(time),
                });
                serde_json::to_writer(&mut lines, &line).unwrap_or_default();
                lines.push(b'\n');
            }
            give(Piece::Bytes(lines)).await?;
            if (page.len() as i64) < PAGE {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(pieces: Vec<Piece>) -> (std::io::Result<()>, Vec<pb::ExportTenantResponse>) {
        let (give, take) = mpsc::channel(pieces.len().max(1));
        let (chunks, mut out) = mpsc::channel(1024);
        for piece in pieces {
            assert!(give.try_send(piece).is_ok(), "room for every piece");
        }
        drop(give);
        let result = write_archive(take, chunks, MIN_CHUNK);
        let mut sent = Vec::new();
        while let Ok(chunk) = out.try_recv() {
            sent.push(chunk.unwrap_or_else(|status| panic!("no error from the writer: {status}")));
        }
        (result, sent)
    }

    #[test]
    fn gr5_an_export_given_up_never_ends_with_a_last_chunk() {
        // Bytes that do not compress, so that chunks are sent before the end.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let noise: Vec<u8> = (0..400_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[3]
            })
            .collect();
        let (result, sent) = written(vec![
            Piece::File("a.bin".into(), false),
            Piece::Bytes(noise.clone()),
        ]);
        assert!(result.is_err(), "no end given: the writer fails");
        assert!(!sent.is_empty(), "chunks went out before the failure");
        assert!(sent.iter().all(|chunk| !chunk.last_chunk));

        let (result, sent) = written(vec![
            Piece::File("a.bin".into(), false),
            Piece::Bytes(noise),
            Piece::End,
        ]);
        assert!(result.is_ok());
        let last = sent.last().unwrap_or_else(|| panic!("chunks"));
        assert!(last.last_chunk);
        let all: Vec<u8> = sent.iter().flat_map(|c| c.data.clone()).collect();
        assert_eq!(last.sha256, Sha256::digest(&all).to_vec());
    }
}
