//! A small pool of low-priority threads for CPU-heavy work such as password hashing.
//!
//! bcrypt is deliberately slow. Run on Tokio's blocking pool, a burst of logins puts one
//! busy thread per login on a machine with few cores, and the scheduler then shares the cores
//! between them and the async workers: every other call waits. These threads run at the
//! lowest scheduling priority (nice 19) and are no more than the cores, so hashing gets all
//! the CPU that is idle and the async workers get the CPU whenever they need it. The queue in
//! front of them is bounded: beyond it, work is turned away at once ([`TaskFailed::Overloaded`],
//! RESOURCE_EXHAUSTED for clients) instead of piling up memory and waiting time.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// Jobs queued per thread before new ones are turned away: at bcrypt's default cost a core
/// hashes about four passwords a second, so a full queue is several seconds of work.
pub const QUEUED_PER_THREAD: usize = 32;

/// The pool; cheap to clone.
#[derive(Clone)]
pub struct CpuPool {
    jobs: mpsc::SyncSender<Job>,
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool").finish_non_exhaustive()
    }
}

/// Why work did not run.
#[derive(Debug, thiserror::Error)]
pub enum TaskFailed {
    /// Its thread panicked, or the pool is gone.
    #[error("CPU pool task failed")]
    Lost,
    /// The queue is full: the pool is busy for a while; retry later.
    #[error("CPU pool overloaded")]
    Overloaded,
}

impl CpuPool {
    /// A pool of one low-priority thread per core, named `<name>-<n>`, queueing at most
    /// [`QUEUED_PER_THREAD`] jobs per thread.
    pub fn new(name: &str) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        Self::with_limits(name, threads, threads * QUEUED_PER_THREAD)
    }

    /// A pool of `threads` low-priority threads queueing at most `queued` jobs.
    pub fn with_limits(name: &str, threads: usize, queued: usize) -> Self {
        let (jobs, queue) = mpsc::sync_channel::<Job>(queued);
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..threads {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{n}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(err) = spawned {
                tracing::error!(error = %err, "cannot start a CPU pool thread");
            }
        }
        Self { jobs }
    }

    /// Runs `work` on the pool and waits for its result without blocking the caller's thread.
    pub async fn run<T, F>(&self, work: F) -> Result<T, TaskFailed>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            if let Ok(value) = std::panic::catch_unwind(AssertUnwindSafe(work)) {
                let _ = done.send(value);
            }
        });
        self.jobs.try_send(job).map_err(|err| match err {
            mpsc::TrySendError::Full(_) => TaskFailed::Overloaded,
            mpsc::TrySendError::Disconnected(_) => TaskFailed::Lost,
        })?;
        result.await.map_err(|_| TaskFailed::Lost)
    }
}

fn lower_priority() {
    let thread = rustix::thread::gettid();
    if let Err(err) = rustix::process::setpriority_process(Some(thread), 19) {
        tracing::warn!(error = %err, "cannot lower the priority of a CPU pool thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_and_panics_do_not_kill_the_pool() {
        let pool = CpuPool::new("test");
        assert_eq!(pool.run(|| 40 + 2).await.unwrap(), 42);
        assert!(pool.run(|| panic!("boom")).await.is_err());
        for _ in 0..8 {
            assert_eq!(pool.run(|| 1).await.unwrap(), 1, "threads survive panics");
        }
        let name = pool
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("test-"));
    }

    #[tokio::test]
    async fn a_full_queue_turns_work_away_at_once() {
        let pool = CpuPool::with_limits("bounded", 1, 1);
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(move || wait.recv().is_ok()).await }
        });
        // The thread takes the first job; the second waits in the queue; the third is refused.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let queued = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(|| 2).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(matches!(pool.run(|| 3).await, Err(TaskFailed::Overloaded)));
        release.send(()).unwrap();
        assert!(busy.await.unwrap().unwrap());
        assert_eq!(queued.await.unwrap().unwrap(), 2, "queued work still runs");
        assert_eq!(
            pool.run(|| 4).await.unwrap(),
            4,
            "and the pool takes work again"
        );
    }
}
