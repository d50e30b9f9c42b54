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

/// The status `stream` ends with, its items skipped; panics naming `what` when it does not
/// end within `timeout`, or ends without a status.
pub async fn ending_status<S, T>(stream: &mut S, what: &str, timeout: Duration) -> tonic::Status
where
    S: futures::Stream<Item = Result<T, tonic::Status>> + Unpin,
{
    use futures::StreamExt as _;
    let ended = tokio::time::timeout(timeout, async {
        while let Some(item) = stream.next().await {
            if let Err(status) = item {
                return Some(status);
            }
        }
        None
    })
    .await;
    match ended {
        Ok(Some(status)) => status,
        Ok(None) => panic!("{what}: the stream ended without a status"),
        Err(_) => panic!("{what}: the stream did not end within {timeout:?}"),
    }
}
