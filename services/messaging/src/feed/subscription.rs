//! One subscriber's stream: the log after its cursor replayed from the database, then its
//! feed, as what the subscriber may see of it: changes in the conversations they are a member
//! of, and membership changes that involve them.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hafen_authn::Principal;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{BATCH, Delivery, Reader, Registration};
use crate::error::Error;
use crate::rows::{ConversationView, EventRow, Membership, MessageView, event_kind};

/// One item of a subscriber's stream, and the cursor to resume after it.
#[derive(Debug)]
pub struct FeedItem {
    pub cursor: i64,
    pub change: Change,
}

/// What happened, as the subscriber sees it.
#[derive(Debug)]
pub enum Change {
    MessageCreated(MessageView),
    MessageEdited(MessageView),
    MessageDeleted(MessageView),
    MembershipChanged {
        /// The conversation as the subscriber sees it now (none if it is gone).
        conversation: Option<ConversationView>,
        added: Vec<Uuid>,
        removed: Vec<Uuid>,
        actor: Option<Uuid>,
        at: DateTime<Utc>,
    },
    /// The replay reached the present; what follows is live.
    CaughtUp,
}

/// One subscriber's state.
pub(super) struct Subscription {
    reader: Reader,
    caller: Principal,
    mine: HashSet<Uuid>,
    last: i64,
    out: mpsc::Sender<Result<FeedItem, Error>>,
}

/// Why a subscription stops.
enum Stop {
    /// The subscriber went away.
    Gone,
    /// It ends with this error for the subscriber.
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(err: Error) -> Self {
        Stop::Failed(err)
    }
}

/// Runs `subscription` on `live` until the subscriber goes away, it fails, or `closing`.
pub(super) async fn run(
    mut subscription: Subscription,
    live: broadcast::Receiver<Arc<Delivery>>,
    registration: Registration,
    closing: CancellationToken,
) {
    let _registration = registration;
    let ended = tokio::select! {
        ended = subscription.follow(live) => ended,
        () = closing.cancelled() => Err(Stop::Failed(Error::ShuttingDown)),
    };
    if let Err(Stop::Failed(err)) = ended {
        let _ = subscription.out.send(Err(err)).await;
    }
}

impl Subscription {
    /// `caller`'s subscription after `last`, `mine` being their conversations.
    pub(super) fn new(
        reader: Reader,
        caller: Principal,
        mine: HashSet<Uuid>,
        last: i64,
        out: mpsc::Sender<Result<FeedItem, Error>>,
    ) -> Self {
        Self {
            reader,
            caller,
            mine,
            last,
            out,
        }
    }

    async fn follow(&mut self, mut live: broadcast::Receiver<Arc<Delivery>>) -> Result<(), Stop> {
        self.replay().await?;
        self.emit(self.last, Change::CaughtUp).await?;
        loop {
            match live.recv().await {
                Ok(delivery) => {
                    if delivery.event.id <= self.last {
                        continue;
                    }
                    self.deliver(&delivery.event, delivery.message.as_ref())
                        .await?;
                    self.last = delivery.event.id;
                }
                // Too far behind the feed: catch up from the database instead.
                Err(broadcast::error::RecvError::Lagged(_)) => self.replay().await?,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Stop::Failed(Error::StreamClosed));
                }
            }
        }
    }

    async fn replay(&mut self) -> Result<(), Stop> {
        loop {
            let deliveries = self
                .reader
                .events_after(
                    self.caller.tenant_id,
                    self.last,
                    Some(self.caller.user_id),
                    BATCH,
                )
                .await?;
            let Some(last) = deliveries.last().map(|d| d.event.id) else {
                return Ok(());
            };
            for delivery in &deliveries {
                self.deliver(&delivery.event, delivery.message.as_ref())
                    .await?;
            }
            self.last = last;
        }
    }

    async fn deliver(
        &mut self,
        event: &EventRow,
        message: Option<&MessageView>,
    ) -> Result<(), Stop> {
        let me = self.caller.user_id;
        if event.kind == event_kind::MEMBERSHIP {
            let detail: Membership = event
                .detail
                .clone()
                .and_then(|d| serde_json::from_value(d).ok())
                .unwrap_or_default();
            let involves_me = detail.added.contains(&me) || detail.removed.contains(&me);
            if !self.mine.contains(&event.conversation_id) && !involves_me {
                return Ok(());
            }
            if detail.added.contains(&me) {
                self.mine.insert(event.conversation_id);
            }
            let conversation = self
                .reader
                .conversation_view(self.caller.tenant_id, event.conversation_id, me)
                .await?;
            if detail.removed.contains(&me) {
                self.mine.remove(&event.conversation_id);
            }
            let change = Change::MembershipChanged {
                conversation,
                added: detail.added,
                removed: detail.removed,
                actor: detail.actor,
                at: event.created_at,
            };
            return self.emit(event.id, change).await;
        }
        if !self.mine.contains(&event.conversation_id) {
            return Ok(());
        }
        let Some(message) = message else {
            return Ok(()); // purged by retention since
        };
        let message = message.clone();
        let change = match event.kind.as_str() {
            event_kind::CREATED => Change::MessageCreated(message),
            event_kind::EDITED => Change::MessageEdited(message),
            _ => Change::MessageDeleted(message),
        };
        self.emit(event.id, change).await
    }

    async fn emit(&mut self, cursor: i64, change: Change) -> Result<(), Stop> {
        self.out
            .send(Ok(FeedItem { cursor, change }))
            .await
            .map_err(|_| Stop::Gone)
    }
}
