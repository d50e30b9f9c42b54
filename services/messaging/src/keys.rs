//! Users' data keys (CB3, BX1): created on first use, wrapped by the tenant key (itself
//! wrapped by the master key) and kept in the control plane, apart from tenant data.
//! Unwrapped keys are cached in memory for the life of the process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_crypto::keys::{tenant_key_context, user_key_context};
use hafen_crypto::{DataKey, MasterKey};
use hafen_store::Databases;
use hafen_store::schema::user_keys;
use uuid::Uuid;

use crate::error::Error;

/// Where keys come from, and the cache of unwrapped ones.
#[derive(Clone)]
pub struct KeyRing {
    inner: Arc<Inner>,
}

struct Inner {
    databases: Databases,
    master: MasterKey,
    tenants: Mutex<HashMap<Uuid, Arc<DataKey>>>,
    users: Mutex<HashMap<(Uuid, Uuid), Arc<DataKey>>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyRing(..)")
    }
}

impl KeyRing {
    /// Keys of the tenants on `databases`, unwrapped with `master`.
    pub fn new(databases: Databases, master: MasterKey) -> Self {
        Self {
            inner: Arc::new(Inner {
                databases,
                master,
                tenants: Mutex::new(HashMap::new()),
                users: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn control(&self) -> Result<hafen_store::PooledConnection, Error> {
        Ok(self.inner.databases.main_connection().await?)
    }

    async fn tenant_key(&self, tenant: Uuid) -> Result<Arc<DataKey>, Error> {
        if let Some(key) = self
            .inner
            .tenants
            .lock()
            .ok()
            .and_then(|k| k.get(&tenant).cloned())
        {
            return Ok(key);
        }
        let wrapped = {
            let mut conn = self.control().await?;
            hafen_store::control::wrapped_key(&mut conn, tenant)
                .await?
                .ok_or(Error::KeyDestroyed)?
        };
        let key = Arc::new(
            self.inner
                .master
                .unwrap(&wrapped, &tenant_key_context(tenant.as_bytes()))?,
        );
        if let Ok(mut keys) = self.inner.tenants.lock() {
            keys.insert(tenant, key.clone());
        }
        Ok(key)
    }

    /// The key of `user` in `tenant`, created (and stored wrapped) on first use.
    pub async fn user_key(&self, tenant: Uuid, user: Uuid) -> Result<Arc<DataKey>, Error> {
        if let Some(key) = self
            .inner
            .users
            .lock()
            .ok()
            .and_then(|k| k.get(&(tenant, user)).cloned())
        {
            return Ok(key);
        }
        let tenant_key = self.tenant_key(tenant).await?;
        let context = user_key_context(user.as_bytes());
        let mut conn = self.control().await?;
        let stored: Option<Vec<u8>> = user_keys::table
            .find((tenant, user))
            .select(user_keys::wrapped_key)
            .first(&mut conn)
            .await
            .optional()?;
        let wrapped = match stored {
            Some(wrapped) => wrapped,
            None => {
                let fresh = DataKey::generate()?;
                let wrapped = tenant_key.wrap(&fresh, &context)?;
                // Two first sends at once: whichever insert wins, both use the stored key.
                diesel::insert_into(user_keys::table)
                    .values((
                        user_keys::tenant_id.eq(tenant),
                        user_keys::user_id.eq(user),
                        user_keys::wrapped_key.eq(&wrapped),
                    ))
                    .on_conflict_do_nothing()
                    .execute(&mut conn)
                    .await?;
                user_keys::table
                    .find((tenant, user))
                    .select(user_keys::wrapped_key)
                    .first(&mut conn)
                    .await?
            }
        };
        let key = Arc::new(tenant_key.unwrap(&wrapped, &context)?);
        if let Ok(mut keys) = self.inner.users.lock() {
            keys.insert((tenant, user), key.clone());
        }
        Ok(key)
    }
}

/// The associated data of a message body: its id and its conversation's, so a ciphertext
/// moved to another row or conversation does not decrypt.
pub fn body_context(message: Uuid, conversation: Uuid) -> Vec<u8> {
    [message.as_bytes().as_slice(), conversation.as_bytes()].concat()
}
