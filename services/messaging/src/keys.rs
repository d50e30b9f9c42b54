//! Message bodies at rest (CB3, BX1): sealed with AES-256-GCM under the sender's user key
//! (from `hafen_store::keyring`), the message and its conversation bound as associated data.

use uuid::Uuid;

use hafen_store::keyring::{KeyRing, body_context};

use crate::error::Error;
use crate::rows::{MessageRow, MessageView};

/// Seals and opens message bodies.
#[derive(Clone)]
pub struct Bodies {
    keys: KeyRing,
}

impl std::fmt::Debug for Bodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bodies").finish_non_exhaustive()
    }
}

impl Bodies {
    /// Bodies sealed under the users' keys of `keys`.
    pub fn new(keys: KeyRing) -> Self {
        Self { keys }
    }

    /// `body` of message `id` in `conversation` by `sender`, sealed.
    pub async fn seal(
        &self,
        tenant: Uuid,
        sender: Uuid,
        id: Uuid,
        conversation: Uuid,
        body: &str,
    ) -> Result<Vec<u8>, Error> {
        let key = self.keys.user_key(tenant, sender).await?;
        Ok(key.seal(&body_context(id, conversation), body.as_bytes())?)
    }

    /// `rows` as delivered, their bodies opened with their senders' keys.
    pub async fn open(
        &self,
        tenant: Uuid,
        rows: Vec<MessageRow>,
    ) -> Result<Vec<MessageView>, Error> {
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let body = match &row.ciphertext {
                Some(sealed) => match self.keys.user_key(tenant, row.sender_id).await {
                    Ok(key) => {
                        let plain = key.open(&body_context(row.id, row.conversation_id), sealed)?;
                        String::from_utf8(plain.to_vec())
                            .map_err(|_| Error::Bug("a stored body is not UTF-8"))?
                    }
                    // The sender was erased and the message is not a tombstone yet: its body
                    // can never be read again; it shows as erased.
                    Err(hafen_store::Error::KeyDestroyed) => {
                        let mut view = row.view(String::new());
                        view.erased = true;
                        out.push(view);
                        continue;
                    }
                    Err(err) => return Err(err.into()),
                },
                None => String::new(),
            };
            out.push(row.view(body));
        }
        Ok(out)
    }

    /// One row as delivered.
    pub async fn open_one(&self, tenant: Uuid, row: MessageRow) -> Result<MessageView, Error> {
        self.open(tenant, vec![row])
            .await?
            .pop()
            .ok_or(Error::Bug("an opened message went missing"))
    }
}
