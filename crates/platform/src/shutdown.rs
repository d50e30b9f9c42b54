//! Turning SIGTERM and SIGINT into a shutdown future.

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

/// A shutdown future that can be cloned and handed to several servers; all of them see the
/// same signal.
pub type SharedShutdown = Shared<BoxFuture<'static, ()>>;

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM; only SIGINT stops the process");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => tracing::info!("received SIGTERM"),
        result = tokio::signal::ctrl_c() => match result {
            Ok(()) => tracing::info!("received SIGINT"),
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        },
    }
}

/// [`signal`] as a cloneable future, installed immediately so a signal arriving before the
/// first poll is not lost.
pub fn shared_signal() -> SharedShutdown {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        signal().await;
        let _ = tx.send(());
    });
    async move {
        // A dropped sender (runtime shutting down) also means: stop.
        let _ = rx.await;
    }
    .boxed()
    .shared()
}
