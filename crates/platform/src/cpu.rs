//! A small pool of low-priority threads for CPU-heavy work such as password hashing.
//!
//! bcrypt is deliberately slow. Run on Tokio's blocking pool, a burst of logins puts one
//! busy thread per login on a machine with few cores, and the scheduler then shares the cores
//! between them and the async workers: every other call waits. These threads run at the
//! lowest scheduling priority (nice 19) and are no more than the cores, so hashing gets all
//! the CPU that is idle and the async workers get the CPU whenever they need it.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// The pool; cheap to clone.
#[derive(Clone)]
pub struct CpuPool {
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for CpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPool").finish_non_exhaustive()
    }
}

/// The work was lost: its thread panicked.
#[derive(Debug, thiserror::Error)]
#[error("CPU pool task failed")]
pub struct TaskFailed;

impl CpuPool {
    /// A pool of one low-priority thread per core, named `<name>-<n>`.
    pub fn new(name: &str) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let (jobs, queue) = mpsc::channel::<Job>();
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
        self.jobs.send(job).map_err(|_| TaskFailed)?;
        result.await.map_err(|_| TaskFailed)
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
}
