//! Group commit: the writes of one tenant that arrive while a commit is in flight are
//! committed together, in one transaction with one WAL flush, and each is acknowledged only
//! after that commit. A lone write waits for nothing; under load, batches form by themselves.
//!
//! The machinery is the same for every kind of write: one queue and one committer task per
//! tenant, on a thread of its own ([`commit_thread`]), holding a connection in the tenant's
//! scope while writes keep coming. What a batch is and how it is stored is the caller's
//! ([`Batches`]): the messaging service's sends, the webchat service's visitor messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel_async::RunQueryDsl;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::prepared::{INDEX_PROBES_ONLY_FOR_SESSION, Prepared};
use crate::{AsyncPgConnection, Databases, Error, PooledConnection, TenantId};

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 256;

/// How long an idle committer keeps its connection.
const LINGER: Duration = Duration::from_millis(50);

/// How a kind of write is stored in batches.
pub trait Batches: Send + Sync + 'static {
    /// One write, with the channel its answer goes back on.
    type Item: Send + 'static;
    /// What a tenant's committer remembers from one batch to the next (valid only while its
    /// connection and transactions hold up: it starts afresh after a failed batch).
    type State: Default + Send + 'static;

    /// Stores `batch` for `tenant` on `conn` and answers each of its writes; false when the
    /// transaction failed and the connection may be in any state.
    fn commit<'a>(
        &'a self,
        tenant: Uuid,
        conn: &'a AsyncPgConnection,
        state: &'a mut Self::State,
        batch: Vec<Self::Item>,
    ) -> BoxFuture<'a, bool>;

    /// Answers every write of `batch`: no connection to `tenant`'s database could be had.
    fn unavailable(&self, tenant: Uuid, batch: Vec<Self::Item>, err: &Error);
}

/// Why a write was not queued, or not answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The tenant's queue is full (RESOURCE_EXHAUSTED for the client).
    Full,
    /// The commit thread is gone, or dropped the write unanswered (UNAVAILABLE).
    Closed,
}

/// One batching task per tenant that writes. Each holds at most `capacity` writes before new
/// ones are turned away ([`Refused::Full`]): far above what one committer stores in a second,
/// so only a stalled database or a flood reaches it, and then the queue (and memory) stops
/// growing.
pub struct Committer<B: Batches> {
    queues: Mutex<HashMap<Uuid, mpsc::Sender<B::Item>>>,
    capacity: usize,
    shared: Arc<Shared<B>>,
}

struct Shared<B> {
    /// The committers' pools: their connections are driven on the commit thread.
    databases: Databases,
    batches: B,
}

impl<B: Batches> Committer<B> {
    /// Committers queueing at most `capacity` writes each, storing through connections of
    /// `databases` (pools of their own: their connections are driven on [`commit_thread`])
    /// as `batches` says.
    pub fn new(databases: Databases, batches: B, capacity: usize) -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            shared: Arc::new(Shared { databases, batches }),
        }
    }

    /// Queues `item` for `tenant`'s next batch. Its answer comes on the channel it carries;
    /// when it is refused, it is dropped (and that channel with it).
    pub fn submit(&self, tenant: Uuid, item: B::Item) -> Result<(), Refused> {
        let queue = {
            let mut queues = self.queues.lock().map_err(|_| Refused::Closed)?;
            queues
                .entry(tenant)
                .or_insert_with(|| {
                    let (queue, receiver) = mpsc::channel(self.capacity);
                    commit_thread().spawn(run(Arc::clone(&self.shared), tenant, receiver));
                    queue
                })
                .clone()
        };
        queue.try_send(item).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => Refused::Full,
            mpsc::error::TrySendError::Closed(_) => Refused::Closed,
        })
    }

    /// Queues the write `make` builds around its answer's channel for `tenant`'s next batch,
    /// and waits for the answer.
    pub async fn call<R>(
        &self,
        tenant: Uuid,
        make: impl FnOnce(oneshot::Sender<R>) -> B::Item,
    ) -> Result<R, Refused> {
        let (reply, answer) = oneshot::channel();
        self.submit(tenant, make(reply))?;
        answer.await.map_err(|_| Refused::Closed)
    }
}

/// The runtime the committers run on: a thread of their own, shared by every committer of the
/// process. A tenant's commits are serial, so the time between PostgreSQL's answer and the
/// next batch going out limits its writes; on the request runtime that answer would wait in
/// line behind the request tasks whenever they keep the workers busy. The committers' work
/// between two round trips is small, and their connections are driven on this thread too.
/// Falls back to the calling runtime if the thread cannot be started.
pub fn commit_thread() -> tokio::runtime::Handle {
    static THREAD: std::sync::OnceLock<Option<tokio::runtime::Handle>> = std::sync::OnceLock::new();
    fn start() -> std::io::Result<tokio::runtime::Handle> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("hafen-commit".into())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        Ok(handle)
    }
    THREAD
        .get_or_init(|| {
            start()
                .inspect_err(|err| {
                    tracing::warn!(error = %err, "commit thread not started; committing on the request runtime");
                })
                .ok()
        })
        .clone()
        .unwrap_or_else(tokio::runtime::Handle::current)
}

/// A connection to `tenant`'s database from the committers' pools, in the tenant's scope and
/// under `INDEX_PROBES_ONLY` for the whole session (see [`crate::tenancy::enter_session`]):
/// for the tenant's committer alone, until it gives the connection back (the pool then resets
/// both).
async fn connection(databases: &Databases, tenant: Uuid) -> Result<PooledConnection, Error> {
    let tenant = TenantId::from(tenant);
    let conn = databases.tenant_connection(&tenant).await?;
    let (scoped, planned) = futures::join!(
        crate::tenancy::enter_session(&conn, &tenant),
        Prepared::text(INDEX_PROBES_ONLY_FOR_SESSION).execute(&mut &*conn),
    );
    scoped.and(planned)?;
    Ok(conn)
}

async fn run<B: Batches>(shared: Arc<Shared<B>>, tenant: Uuid, mut queue: mpsc::Receiver<B::Item>) {
    // The connection stays with this committer while writes keep coming, and goes back to the
    // pool once none came for `LINGER`: a writer that waits for its answer before writing
    // again finds it still there, and its batch does not pay for the pool's reset.
    let mut held: Option<PooledConnection> = None;
    let mut state = B::State::default();
    loop {
        let next = match queue.try_recv() {
            Ok(item) => Some(item),
            Err(_) if held.is_some() => tokio::time::timeout(LINGER, queue.recv())
                .await
                .unwrap_or_else(|_| {
                    held = None;
                    None
                }),
            Err(_) => None,
        };
        let first = match next {
            Some(item) => item,
            None => match queue.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        if held.is_none() {
            match connection(&shared.databases, tenant).await {
                Ok(conn) => held = Some(conn),
                Err(err) => {
                    shared.batches.unavailable(tenant, batch, &err);
                    continue;
                }
            }
        }
        let size = batch.len();
        let since = std::time::Instant::now();
        let committed = match held.as_mut() {
            Some(conn) => Some(shared.batches.commit(tenant, conn, &mut state, batch).await),
            None => None,
        };
        metrics::histogram!("hafen_commit_batch_size").record(size as f64);
        metrics::histogram!("hafen_commit_seconds").record(since.elapsed().as_secs_f64());
        if committed == Some(false) {
            // After a failure the connection may be in any state: a fresh one next time, and
            // nothing remembered of the batches before.
            held = None;
            state = B::State::default();
        }
    }
}

#[cfg(test)]
mod tests {
    /// The committers, and the connections they open, run off the request runtime: a commit's
    /// answer from PostgreSQL does not wait behind request tasks.
    #[tokio::test]
    async fn committers_run_on_a_thread_of_their_own() {
        let on = super::commit_thread()
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await;
        assert_eq!(on.ok().flatten().as_deref(), Some("hafen-commit"));
        assert_ne!(
            std::thread::current().name(),
            Some("hafen-commit"),
            "the test itself runs elsewhere"
        );
    }
}
