//! Resumable subscriptions (BX4): a background task follows `Subscribe`, remembers the last
//! cursor it handed out, and after any interruption it can recover from (the server
//! restarting, the network, an expired access token) subscribes again after that cursor,
//! with back-off.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use hafen_proto::messaging::v1 as pb;
use tokio::sync::mpsc;

use crate::{Error, Hafen};

/// The events of a subscription; see [`Hafen::subscribe`]. Dropping it ends the
/// subscription.
#[derive(Debug)]
pub struct Subscription {
    events: mpsc::Receiver<Result<pb::SubscribeResponse, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Stream for Subscription {
    type Item = Result<pb::SubscribeResponse, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}

impl Subscription {
    pub(crate) fn start(hafen: Hafen, cursor: Option<String>) -> Self {
        let (out, events) = mpsc::channel(256);
        let task = tokio::spawn(follow(hafen, cursor, out));
        Self { events, task }
    }
}

async fn follow(
    hafen: Hafen,
    mut cursor: Option<String>,
    out: mpsc::Sender<Result<pb::SubscribeResponse, Error>>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let failure = match hafen.state.ensure_fresh().await {
            Err(err) => err,
            Ok(()) => {
                let opened = hafen
                    .messaging()
                    .subscribe(pb::SubscribeRequest {
                        after: cursor.clone().unwrap_or_default(),
                    })
                    .await;
                match opened {
                    Err(status) => hafen.state.fail(status).await,
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        let mut ended = None;
                        while let Some(item) = stream.next().await {
                            match item {
                                Ok(event) => {
                                    backoff = Duration::from_millis(200);
                                    if !event.cursor.is_empty() {
                                        cursor = Some(event.cursor.clone());
                                    }
                                    if out.send(Ok(event)).await.is_err() {
                                        return; // nobody listens
                                    }
                                }
                                Err(status) => {
                                    ended = Some(hafen.state.fail(status).await);
                                    break;
                                }
                            }
                        }
                        // A stream that just ends was cut (e.g. a proxy): resume.
                        ended.unwrap_or_else(|| Error::Rpc {
                            code: tonic::Code::Unavailable,
                            reason: "UNAVAILABLE".into(),
                            field: None,
                            message: "the stream ended".into(),
                        })
                    }
                }
            }
        };
        let expired = failure.reason() == Some("SESSION_EXPIRED");
        if !(failure.is_transient() || expired) {
            let _ = out.send(Err(failure)).await;
            return;
        }
        if expired && hafen.state.refresh().await.is_err() {
            let _ = out.send(Err(failure)).await;
            return;
        }
        tracing::debug!(error = %failure, "subscription interrupted; resuming from the last cursor");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
