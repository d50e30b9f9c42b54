//! What feeds visitors' streams: per tenant with visitor streams in this process, one watcher
//! reads the tenant's log after what it read last — woken by the tenant's event channel
//! ([`crate::wakes`]), and every poll interval as a safety net for a missed wake-up (one query
//! per tenant) — and hands each stream the new entries of its chat, with their messages as
//! stored: a message reaches its visitor's stream without a query of the stream's own. Streams
//! of visits without a chat yet are woken on any change (their chat may just have opened) and
//! read for themselves.
//!
//! Every read covers the log from where the previous one ended (the event counter's value in
//! the read's own snapshot), so the entries a stream is handed are gapless from the first read
//! that included its chat ([`Inbox::covered_from`]); a stream that read its chat itself up to
//! an earlier point reads once more before it takes what it is handed (`chat.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bool, Bytea, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use hafen_store::prepared::{INDEX_PROBES_ONLY, Prepared, Statement, bind};
use hafen_store::{AsyncPgConnection, PooledConnection, TenantId};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::Service;
use crate::chat::{LogEntry, MessageRow};
use crate::error::Error;

/// Entries read per query of the watcher.
const PAGE: i64 = 500;

/// How long an idle watcher keeps its connection.
const LINGER: Duration = Duration::from_millis(50);

/// Most entries a stream holds unread; beyond, it is told to read its chat itself.
const MAX_INBOX: usize = 1000;

/// The log of the chats `$2` after `$1`, at most `$3` entries, with their messages as stored
/// and whether the chat's visit is live; and the event counter, in the same snapshot (one row
/// with no entry when there is none): every entry up to it is committed and seen. Messages'
/// creations are kept in their rows, edits and deletions in `events`.
const CHAT_ENTRIES: &str = "\
    SELECT c.last_id AS head, e.* FROM event_counter c LEFT JOIN LATERAL ( \
        SELECT log.id, log.kind, m.id AS message_id, m.conversation_id, m.sequence, \
               m.sender_id, m.request_id, m.ciphertext, m.masked, m.created_at, m.edited_at, \
               m.deleted_at, coalesce(v.expires_at > now(), false) AS live \
        FROM ( \
            (SELECT event_id AS id, 'message_created' AS kind, id AS message_id FROM messages \
             WHERE event_id > $1 AND conversation_id = ANY($2) ORDER BY event_id LIMIT $3) \
            UNION ALL \
            (SELECT id, kind, message_id FROM events \
             WHERE id > $1 AND conversation_id = ANY($2) AND message_id IS NOT NULL \
             ORDER BY id LIMIT $3) \
        ) log \
        JOIN messages m ON m.id = log.message_id \
        LEFT JOIN visits v ON v.conversation_id = m.conversation_id \
        ORDER BY log.id LIMIT $3 \
    ) e ON true";

/// A row of [`CHAT_ENTRIES`].
#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    head: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    id: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    kind: Option<String>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    message_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    conversation_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<BigInt>)]
    sequence: Option<i64>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    sender_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    request_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<Bytea>)]
    ciphertext: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Bool>)]
    masked: Option<bool>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    edited_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    deleted_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Bool>)]
    live: Option<bool>,
}

/// An entry of a chat's log as the watcher hands it to the chat's streams.
pub struct Entry {
    pub entry: LogEntry,
    pub row: MessageRow,
    /// Whether the chat's visit was live when the entry was read.
    pub live: bool,
}

impl Row {
    /// The entry of the row, with its chat; none on the row of a read that found none.
    fn entry(self) -> Option<(Uuid, Entry)> {
        let conversation = self.conversation_id?;
        Some((
            conversation,
            Entry {
                entry: LogEntry {
                    id: self.id?,
                    kind: self.kind?,
                    message_id: self.message_id?,
                },
                row: MessageRow {
                    id: self.message_id?,
                    sequence: self.sequence?,
                    sender_id: self.sender_id?,
                    request_id: self.request_id,
                    ciphertext: self.ciphertext,
                    masked: self.masked?,
                    created_at: self.created_at?,
                    edited_at: self.edited_at,
                    deleted_at: self.deleted_at,
                },
                live: self.live.unwrap_or(false),
            },
        ))
    }
}

/// What a stream has been handed and not taken yet.
#[derive(Default)]
pub struct Inbox {
    /// Where the first read that included the stream's chat began: from there on the entries
    /// handed to the stream are gapless (until `lost`).
    pub covered_from: Option<i64>,
    pub entries: VecDeque<Entry>,
    /// Entries were dropped (the stream fell [`MAX_INBOX`] behind): it reads its chat itself.
    pub lost: bool,
}

/// One stream's wake-up and what it is handed.
#[derive(Default)]
pub struct StreamWake {
    pub notify: Notify,
    /// The stream's chat, once it has one.
    conversation: Mutex<Option<Uuid>>,
    pub inbox: Mutex<Inbox>,
}

impl StreamWake {
    /// Tells the watcher which chat the stream follows.
    pub fn follow(&self, conversation: Uuid) {
        if let Ok(mut slot) = self.conversation.lock() {
            *slot = Some(conversation);
        }
    }

    fn conversation(&self) -> Option<Uuid> {
        self.conversation.lock().map(|slot| *slot).unwrap_or(None)
    }

    /// Takes what the stream was handed.
    pub fn take(&self) -> Inbox {
        match self.inbox.lock() {
            Ok(mut inbox) => Inbox {
                covered_from: inbox.covered_from,
                entries: std::mem::take(&mut inbox.entries),
                lost: std::mem::take(&mut inbox.lost),
            },
            Err(_) => Inbox {
                lost: true,
                ..Inbox::default()
            },
        }
    }

    /// Hands the stream what a read that began `after` found for its chat.
    fn hand(&self, after: i64, entries: impl Iterator<Item = Entry>) {
        let Ok(mut inbox) = self.inbox.lock() else {
            return;
        };
        inbox.covered_from.get_or_insert(after);
        inbox.entries.extend(entries);
        if inbox.entries.len() > MAX_INBOX {
            inbox.entries.clear();
            inbox.lost = true;
        }
    }
}

/// The tenants watched here and their streams.
#[derive(Default)]
pub struct Watches {
    tenants: Mutex<HashMap<Uuid, Vec<Weak<StreamWake>>>>,
}

impl Watches {
    /// Registers a stream of `tenant`, starting the tenant's watcher if it has none; the
    /// stream is forgotten when the returned wake is dropped.
    pub fn register(service: &Arc<Service>, tenant: Uuid) -> Arc<StreamWake> {
        let wake = Arc::new(StreamWake::default());
        let start = match service.watches.tenants.lock() {
            Ok(mut tenants) => {
                let streams = tenants.entry(tenant).or_default();
                streams.push(Arc::downgrade(&wake));
                streams.len() == 1
            }
            Err(_) => false,
        };
        if start {
            let service = Arc::clone(service);
            tokio::spawn(async move { watch(service, tenant).await });
        }
        wake
    }

    /// The live streams of `tenant`; none when no stream is left (the watcher is then
    /// forgotten, and the next stream starts a new one).
    fn streams(&self, tenant: Uuid) -> Option<Vec<Arc<StreamWake>>> {
        let mut tenants = self.tenants.lock().ok()?;
        let streams = tenants.get_mut(&tenant)?;
        let mut live = Vec::with_capacity(streams.len());
        streams.retain(|stream| match stream.upgrade() {
            Some(stream) => {
                live.push(stream);
                true
            }
            None => false,
        });
        if live.is_empty() {
            tenants.remove(&tenant);
            return None;
        }
        Some(live)
    }
}

/// The watcher of `tenant`: runs while the tenant has streams here. While wakes keep coming
/// it keeps its connection (each read is then one round trip); it gives it back to the pool
/// after [`LINGER`] without one.
async fn watch(service: Arc<Service>, tenant: Uuid) {
    let poll = service.stream_poll;
    let registration = service.wakes.register(tenant);
    // Where the last read ended; none before the first, which only learns where the log
    // stands (the streams read their chats themselves when they start).
    let mut last: Option<i64> = None;
    let mut held: Option<PooledConnection> = None;
    loop {
        // Enabled before the read: a change committed during it wakes the wait.
        let woken = registration.notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let Some(streams) = service.watches.streams(tenant) else {
            return;
        };
        let conn = match held.as_mut() {
            Some(conn) => Ok(conn),
            None => service
                .databases
                .tenant_connection(&TenantId::from(tenant))
                .await
                .map(|conn| held.insert(conn)),
        };
        let mut more = false;
        let outcome = match (conn, last) {
            (Err(err), _) => Err(Error::from(err)),
            // After the largest id: no entry is read, only the counter.
            (Ok(conn), None) => read(conn, tenant, i64::MAX, &[])
                .await
                .map(|(head, _)| last = Some(head)),
            (Ok(conn), Some(after)) => {
                let chats: HashSet<Uuid> =
                    streams.iter().filter_map(|s| s.conversation()).collect();
                let list: Vec<Uuid> = chats.iter().copied().collect();
                read(conn, tenant, after, &list)
                    .await
                    .map(|(head, entries)| {
                        let full = entries.len() >= usize::try_from(PAGE).unwrap_or(usize::MAX);
                        let end = match entries.last() {
                            Some((_, entry)) if full => entry.entry.id,
                            _ => head,
                        };
                        hand_out(&streams, &chats, after, end, entries);
                        last = Some(end);
                        more = full;
                    })
            }
        };
        if let Err(err) = outcome {
            // The connection may be in any state: a fresh one next time.
            held = None;
            tracing::debug!(error = %err, "the tenant's log was not read; polling on");
        }
        drop(streams);
        if more {
            continue;
        }
        let wait = if held.is_some() { LINGER } else { poll };
        let woken_up = tokio::select! {
            () = &mut woken => true,
            () = tokio::time::sleep(wait) => false,
        };
        if !woken_up && held.take().is_some() {
            tokio::select! {
                () = &mut woken => {}
                () = tokio::time::sleep(poll.saturating_sub(LINGER)) => {}
            }
        }
    }
}

/// Hands each stream whose chat was read the new entries of its chat (and wakes it when there
/// are any), and wakes the streams without a chat when the log moved on (`after` to `end`).
fn hand_out(
    streams: &[Arc<StreamWake>],
    read_for: &HashSet<Uuid>,
    after: i64,
    end: i64,
    entries: Vec<(Uuid, Entry)>,
) {
    let mut by_chat: HashMap<Uuid, Vec<Entry>> = HashMap::new();
    for (chat, entry) in entries {
        by_chat.entry(chat).or_default().push(entry);
    }
    for stream in streams {
        match stream.conversation() {
            Some(chat) if read_for.contains(&chat) => {
                // A chat followed by two streams of its visit: each gets its own copy.
                let found: Vec<Entry> = by_chat.get(&chat).map(|e| copies(e)).unwrap_or_default();
                let any = !found.is_empty();
                stream.hand(after, found.into_iter());
                if any {
                    stream.notify.notify_waiters();
                }
            }
            // Its chat was not known when the read began: the next read includes it.
            Some(_) => {}
            None if end > after => stream.notify.notify_waiters(),
            None => {}
        }
    }
}

fn copies(entries: &[Entry]) -> Vec<Entry> {
    entries
        .iter()
        .map(|e| Entry {
            entry: e.entry.clone(),
            row: e.row.clone(),
            live: e.live,
        })
        .collect()
}

/// The tenant's log after `after` for `chats`, at most [`PAGE`] entries in id order, each
/// with its chat; and the event counter in the same snapshot. One round trip on `conn`: the
/// transaction, its scope and the query go out together.
async fn read(
    conn: &AsyncPgConnection,
    tenant: Uuid,
    after: i64,
    chats: &[Uuid],
) -> Result<(i64, Vec<(Uuid, Entry)>), Error> {
    let statements = async {
        let (planned, rows) = futures::join!(
            Prepared::text(INDEX_PROBES_ONLY).execute(&mut &*conn),
            Statement::new(
                CHAT_ENTRIES,
                (
                    bind::<BigInt, _>(after),
                    bind::<Array<SqlUuid>, _>(chats.to_vec()),
                    bind::<BigInt, _>(PAGE),
                ),
            )
            .load::<Row>(&mut &*conn),
        );
        planned.and(rows)
    };
    let rows = hafen_store::tenancy::pipelined(
        conn,
        &["BEGIN READ ONLY"],
        &TenantId::from(tenant),
        statements,
    )
    .await?;
    let head = <[Row]>::first(&rows).map_or(after, |row| row.head);
    Ok((head, rows.into_iter().filter_map(Row::entry).collect()))
}

/// How long a stream waits without a wake-up before it reads its chat anyway: a safety net
/// only, the watcher polls for it.
pub const STREAM_SAFETY_NET: Duration = Duration::from_secs(30);
