//! How feeds and subscriptions read the log and what they show with it.

use std::collections::HashMap;

use hafen_store::{AsyncPgConnection, Databases};
use uuid::Uuid;

use super::Delivery;
use crate::error::Error;
use crate::keys::Bodies;
use crate::repo;
use crate::rows::{ConversationView, MessageView};

/// Reads the log for feeds and subscriptions.
#[derive(Clone)]
pub(crate) struct Reader {
    pub(super) databases: Databases,
    pub(super) bodies: Bodies,
}

impl Reader {
    /// The tenant's newest event id (where a subscription with an empty cursor starts).
    pub(super) async fn head(&self, tenant: Uuid) -> Result<i64, Error> {
        repo::scoped(&self.databases, tenant, |conn| Box::pin(repo::head(conn))).await
    }

    /// The conversations `user` is a member of.
    pub(super) async fn memberships(&self, tenant: Uuid, user: Uuid) -> Result<Vec<Uuid>, Error> {
        repo::scoped(&self.databases, tenant, move |conn| {
            Box::pin(repo::memberships(conn, user))
        })
        .await
    }

    /// A conversation as `user` sees it (for membership events).
    pub(super) async fn conversation_view(
        &self,
        tenant: Uuid,
        conversation: Uuid,
        user: Uuid,
    ) -> Result<Option<ConversationView>, Error> {
        repo::scoped(&self.databases, tenant, move |conn| {
            Box::pin(async move {
                match repo::conversation(conn, conversation).await? {
                    Some(row) => Ok(Some(repo::conversation_view(conn, row, user).await?)),
                    None => Ok(None),
                }
            })
        })
        .await
    }

    /// Up to `limit` events after `after` (of `member`'s conversations, or all), with their
    /// messages opened, on a pooled connection.
    pub(super) async fn events_after(
        &self,
        tenant: Uuid,
        after: i64,
        member: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Delivery>, Error> {
        let conn = repo::connection(&self.databases, tenant).await?;
        self.events_after_on(&conn, tenant, after, member, limit)
            .await
    }

    /// [`Reader::events_after`] on `conn`, in one round trip ([`repo::events_after`]).
    pub(super) async fn events_after_on(
        &self,
        conn: &AsyncPgConnection,
        tenant: Uuid,
        after: i64,
        member: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<Delivery>, Error> {
        let (events, rows) = repo::events_after(conn, tenant, after, member, limit).await?;
        let mut messages: HashMap<Uuid, MessageView> = self
            .bodies
            .open(tenant, rows)
            .await?
            .into_iter()
            .map(|view| (view.id, view))
            .collect();
        Ok(events
            .into_iter()
            .map(|event| {
                let message = event.message_id.and_then(|id| messages.remove(&id));
                Delivery { event, message }
            })
            .collect())
    }
}
