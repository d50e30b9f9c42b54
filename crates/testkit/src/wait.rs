//! Waiting on a condition a test can observe, instead of sleeping and hoping it holds.

use std::future::Future;
use std::time::Duration;

/// How long [`eventually`] waits between two looks.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Calls `look` until it returns `Some`, every 20 ms, and returns that value; panics naming
/// `what` once `timeout` has passed without it. The first look is made at once, so a
/// condition that already holds costs no wait.
pub async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut look: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(found) = look().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {timeout:?}: {what}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}
