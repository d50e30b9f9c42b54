//! Messages (CB3, CB4, UL1, UL2): sent masked and encrypted through the tenant's group
//! commit ([`crate::commit`]), edited and deleted (a tombstone stays) in transactions of their
//! own, each change an event of the log; listed by sequence.

use hafen_authn::Principal;
use hafen_store::now;
use uuid::Uuid;

use crate::commit::Send;
use crate::error::Error;
use crate::repo;
use crate::rows::{MessageRow, MessageView, event_kind};
use crate::service::Messaging;

/// A body as stored: sealed, and the masked text that was sealed.
struct Sealed {
    ciphertext: Vec<u8>,
    masked: bool,
    body: String,
}

impl Messaging {
    /// Masks and encrypts `body` for message `id` in `conversation` by `sender`; returns the
    /// masked text too, so a fresh message is answered without decrypting it again.
    async fn seal(
        &self,
        tenant: Uuid,
        sender: Uuid,
        id: Uuid,
        conversation: Uuid,
        body: &str,
    ) -> Result<Sealed, Error> {
        if body.trim().is_empty() {
            return Err(Error::invalid("body", "must not be empty"));
        }
        if body.len() > self.inner.max_body_bytes {
            return Err(Error::BodyTooLarge(self.inner.max_body_bytes));
        }
        let rules = self.inner.rules.get(tenant).await?;
        let (body, masked) = rules.masker.apply(body);
        let ciphertext = self
            .inner
            .bodies
            .seal(tenant, sender, id, conversation, &body)
            .await?;
        Ok(Sealed {
            ciphertext,
            masked,
            body,
        })
    }

    /// Sends a message: masked and encrypted here, then numbered and logged by the tenant's
    /// group commit, and returned only once committed. A retry with the same request id
    /// returns the first; the same request id with another conversation or body is
    /// [`Error::RequestIdConflict`].
    pub async fn send(
        &self,
        caller: &Principal,
        conversation: Uuid,
        request_id: Uuid,
        body: &str,
    ) -> Result<MessageView, Error> {
        let id = Uuid::now_v7();
        let Sealed {
            ciphertext,
            masked,
            body,
        } = self
            .seal(caller.tenant_id, caller.user_id, id, conversation, body)
            .await?;
        let me = caller.user_id;
        let row = self
            .inner
            .committer
            .submit(caller.tenant_id, |reply| Send {
                id,
                sender: me,
                conversation,
                request_id,
                sealed: ciphertext,
                masked,
                body: body.clone(),
                reply,
                queued: std::time::Instant::now(),
            })
            .await?;
        if row.id != id {
            // A retry: the first message's body is the one stored, and it must be this one.
            let first = self.inner.bodies.open_one(caller.tenant_id, row).await?;
            if first.conversation_id != conversation || first.body != body {
                return Err(Error::RequestIdConflict);
            }
            return Ok(first);
        }
        Ok(row.view(body))
    }

    /// Replaces the body of the caller's own message.
    pub async fn edit(
        &self,
        caller: &Principal,
        message: Uuid,
        body: &str,
    ) -> Result<MessageView, Error> {
        let me = caller.user_id;
        let current = self.message_for(caller, message).await?;
        if current.sender_id != me {
            return Err(Error::PermissionDenied("only the sender edits a message"));
        }
        if current.deleted_at.is_some() {
            return Err(Error::InvalidState("the message is deleted"));
        }
        let conversation = current.conversation_id;
        let Sealed {
            ciphertext, masked, ..
        } = self
            .seal(caller.tenant_id, me, message, conversation, body)
            .await?;
        let row = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    // Held evidence is kept as it is: no rewriting either.
                    if repo::under_hold(conn, conversation, me).await? {
                        return Err(Error::LegalHold);
                    }
                    let event = repo::next_event_id(conn).await?;
                    let at = now();
                    let row = repo::replace_body(conn, message, ciphertext, masked, at)
                        .await?
                        .ok_or(Error::InvalidState("the message is deleted"))?;
                    let kind = event_kind::EDITED;
                    repo::insert_event(conn, event, conversation, kind, Some(message), None, at)
                        .await?;
                    Ok(row)
                })
            })
            .await?;
        self.inner.hub.wake(caller.tenant_id);
        self.inner.bodies.open_one(caller.tenant_id, row).await
    }

    /// Deletes a message (CB4): the ciphertext goes, a tombstone stays. Idempotent.
    pub async fn delete(&self, caller: &Principal, message: Uuid) -> Result<MessageView, Error> {
        let current = self.message_for(caller, message).await?;
        if current.sender_id != caller.user_id && !caller.role.is_admin() {
            return Err(Error::PermissionDenied(
                "only the sender or an admin deletes a message",
            ));
        }
        if let Some(at) = current.deleted_at {
            // A retry after the deletion was not yet logged completes it.
            if !current.erased {
                self.log_deletion(caller.tenant_id, message, at).await?;
            }
            return self.inner.bodies.open_one(caller.tenant_id, current).await;
        }
        let conversation = current.conversation_id;
        let sender = current.sender_id;
        let by_admin = (sender != caller.user_id).then(|| {
            hafen_events::Event::new(
                Some(caller.tenant_id),
                hafen_events::Actor::User(caller.user_id),
                "messaging.message.deleted_by_admin",
            )
            .target("message", message)
            .attribute("conversation_id", conversation)
            .attribute("sender_id", sender)
        });
        let audited = by_admin.is_some();
        let row = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    // A legal claim takes precedence over erasure (GDPR Art. 17(3)(e)).
                    if repo::under_hold(conn, conversation, sender).await? {
                        return Err(Error::LegalHold);
                    }
                    if let Some(event) = &by_admin {
                        hafen_events::record(conn, event).await?;
                    }
                    let event = repo::next_event_id(conn).await?;
                    let at = now();
                    let row = repo::tombstone(conn, message).await?;
                    let kind = event_kind::DELETED;
                    repo::insert_event(conn, event, conversation, kind, Some(message), None, at)
                        .await?;
                    Ok(row)
                })
            })
            .await?;
        if audited {
            self.audited();
            tracing::info!(tenant_id = %caller.tenant_id, message_id = %message, actor = %caller.user_id, "message deleted by an admin");
        }
        self.inner.hub.wake(caller.tenant_id);
        self.log_deletion(
            caller.tenant_id,
            message,
            row.deleted_at.unwrap_or_else(now),
        )
        .await?;
        self.inner.bodies.open_one(caller.tenant_id, row).await
    }

    /// Writes a deletion to the deletion log in the key store, so a restore of an older backup
    /// deletes the message again. After the deletion committed (a legal hold may refuse it):
    /// when the key store is unreachable the call fails UNAVAILABLE and its retry logs it.
    async fn log_deletion(
        &self,
        tenant: Uuid,
        message: Uuid,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), Error> {
        let mut conn = self.inner.databases.keystore_connection().await?;
        hafen_store::keystore::log_message_deletion(&mut conn, tenant, message, at).await?;
        Ok(())
    }

    /// A message the caller may see (member of its conversation); NOT_FOUND otherwise.
    async fn message_for(&self, caller: &Principal, message: Uuid) -> Result<MessageRow, Error> {
        let me = caller.user_id;
        self.scoped(caller.tenant_id, move |conn| {
            Box::pin(async move {
                let row = repo::message(conn, message)
                    .await?
                    .ok_or(Error::NotFound("message"))?;
                if !repo::is_member(conn, row.conversation_id, me).await? {
                    return Err(Error::NotFound("message"));
                }
                Ok(row)
            })
        })
        .await
    }

    /// Messages of a conversation by sequence: after `from` going forward, or before it going
    /// backward (0: from the start, or from the end); at most `limit`, and whether there are
    /// more.
    pub async fn list_messages(
        &self,
        caller: &Principal,
        conversation: Uuid,
        forward: bool,
        from: i64,
        limit: usize,
    ) -> Result<(Vec<MessageView>, bool), Error> {
        let me = caller.user_id;
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let (rows, more) = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    if !repo::is_member(conn, conversation, me).await? {
                        return Err(Error::NotFound("conversation"));
                    }
                    let mut rows =
                        repo::messages_page(conn, conversation, forward, from, fetch).await?;
                    let more = rows.len() > limit;
                    rows.truncate(limit);
                    Ok((rows, more))
                })
            })
            .await?;
        Ok((self.inner.bodies.open(caller.tenant_id, rows).await?, more))
    }
}
