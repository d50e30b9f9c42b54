//! The messaging domain: what the adapter calls. Its operations are in `conversations.rs`
//! and `messages.rs`; every write appends to the tenant's event log in its transaction,
//! and wakes the live feeds after commit (`feed`).

use std::sync::Arc;

use futures::future::BoxFuture;
use hafen_authn::Principal;
use hafen_store::{AsyncPgConnection, Databases};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::commit::Committer;
use crate::error::Error;
use crate::feed::{FeedItem, Hub};
use crate::keys::Bodies;
use crate::repo;
use crate::settings::TenantRules;

/// The messaging domain service.
#[derive(Clone)]
pub struct Messaging {
    pub(crate) inner: Arc<Inner>,
}

/// What the messaging service is made of.
pub(crate) struct Inner {
    pub databases: Databases,
    pub bodies: Bodies,
    pub rules: TenantRules,
    pub hub: Hub,
    pub committer: Committer,
    /// Largest message body, in bytes of UTF-8.
    pub max_body_bytes: usize,
    /// Delivers the outbox to the audit service.
    pub relay: Option<hafen_events::Relay>,
}

impl std::fmt::Debug for Messaging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messaging").finish_non_exhaustive()
    }
}

impl Messaging {
    /// The service made of `inner`.
    pub(crate) fn new(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Wakes the relay after audit events were committed.
    pub(crate) fn audited(&self) {
        if let Some(relay) = &self.inner.relay {
            relay.wake();
        }
    }

    /// Runs `f` in a transaction in `tenant`'s scope.
    pub(crate) async fn scoped<R, F>(&self, tenant: Uuid, f: F) -> Result<R, Error>
    where
        F: for<'c> FnOnce(&'c mut AsyncPgConnection) -> BoxFuture<'c, Result<R, Error>>,
    {
        repo::scoped(&self.inner.databases, tenant, f).await
    }

    /// Opens `caller`'s live stream after `cursor`: what they may see of the log, replayed
    /// and then live; the stream ends with an error the client resubscribes after.
    pub async fn subscribe(
        &self,
        caller: Principal,
        cursor: Option<i64>,
    ) -> Result<mpsc::Receiver<Result<FeedItem, Error>>, Error> {
        self.inner.hub.subscribe(caller, cursor).await
    }
}
