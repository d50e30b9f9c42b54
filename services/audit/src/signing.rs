//! The chains' signing keys (BX2). Each chain has an Ed25519 key of its own, created with the
//! chain's first append: its private key (PKCS#8) sealed with AES-256-GCM under the audit
//! service's sub-key of the master key ([`hafen_crypto::Purpose::AuditSigning`]), the chain id
//! bound as associated data, and stored with the public key in `hafen.audit_keys`; a tenant's
//! record gets the public key too. Every append signs the chain's new head with it
//! ([`hafen_events::chain::head_statement`]).
//!
//! Unsealed keys are cached, at most [`CACHED_KEYS`] of them, least recently used first out,
//! with the sealed bytes they came from; every append reads the sealed key again and uses the
//! cached one only while it is still what is stored. Only keys read back from the database
//! are cached, so a key created in a transaction that rolled back is never used again.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use hafen_crypto::DataKey;
use hafen_store::schema::{audit_keys, audit_unsigned_chains, tenants};
use lru::LruCache;
use ring::signature::{Ed25519KeyPair, KeyPair};
use uuid::Uuid;

use crate::error::Error;
use crate::event::Chain;

/// A chain's sealed key as stored, and the key it unseals to.
type Unsealed = (Vec<u8>, Arc<Ed25519KeyPair>);

/// Most unsealed signing keys held in memory.
pub const CACHED_KEYS: usize = 10_000;

/// Signs chain heads with each chain's key.
pub struct Signer {
    seal: DataKey,
    keys: Mutex<LruCache<Uuid, Unsealed>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

fn context(chain: Uuid) -> Vec<u8> {
    [b"hafen audit signing key:".as_slice(), chain.as_bytes()].concat()
}

impl Signer {
    /// Seals and unseals private keys with `seal` (the audit-signing sub-key).
    pub fn new(seal: DataKey) -> Self {
        let capacity = NonZeroUsize::new(CACHED_KEYS).unwrap_or(NonZeroUsize::MIN);
        Self {
            seal,
            keys: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// The public key of `chain` as its sealed private key says, and whether the public key
    /// stored beside it (and, for a tenant, in the tenant record) is that key. Verification
    /// uses this key, never the stored copy: replacing the stored public key does not let
    /// anyone sign, since a sealed private key cannot be made without the sub-key and is bound
    /// to its chain. `None` when the chain has no key.
    pub async fn verified_public_key(
        &self,
        conn: &mut AsyncPgConnection,
        chain: Uuid,
    ) -> Result<Option<(Vec<u8>, bool)>, Error> {
        let stored: Option<(Vec<u8>, Vec<u8>)> = audit_keys::table
            .find(chain)
            .select((audit_keys::public_key, audit_keys::wrapped_private_key))
            .first(conn)
            .await
            .optional()?;
        let Some((public_key, wrapped)) = stored else {
            return Ok(None);
        };
        let Ok(pkcs8) = self.seal.open(&context(chain), &wrapped) else {
            // Not sealed by this service for this chain: nothing it signs can be trusted.
            return Ok(Some((Vec::new(), false)));
        };
        let Ok(key) = Ed25519KeyPair::from_pkcs8(&pkcs8) else {
            return Ok(Some((Vec::new(), false)));
        };
        let derived = key.public_key().as_ref().to_vec();
        let mut consistent = derived == public_key;
        if let Some(tenant) = Chain::from_key(chain).tenant() {
            let recorded: Option<Option<Vec<u8>>> = tenants::table
                .find(tenant)
                .select(tenants::audit_public_key)
                .first(conn)
                .await
                .optional()?;
            consistent &= matches!(recorded, Some(Some(ref key)) if *key == derived);
        }
        Ok(Some((derived, consistent)))
    }

    /// `chain`'s key. A chain gets one with the append of its first event (`first_append`),
    /// or, if it had events before chains were signed, with its next append (it is listed in
    /// `audit_unsigned_chains` until then), inside the caller's transaction; the caller holds
    /// the chain's head lock, so no other append creates one meanwhile. Any other chain
    /// without a key gets none: its key is gone, its history cannot be vouched for, and a new
    /// key would make a rewritten chain look signed.
    pub async fn key(
        &self,
        conn: &mut AsyncPgConnection,
        chain: Uuid,
        first_append: bool,
    ) -> Result<Arc<Ed25519KeyPair>, Error> {
        // Read every time, cached or not: a key removed from the database stops signing.
        let stored: Option<Vec<u8>> = audit_keys::table
            .find(chain)
            .select(audit_keys::wrapped_private_key)
            .first(conn)
            .await
            .optional()?;
        if let Some(wrapped) = stored {
            let cached = self.keys.lock().ok().and_then(|mut keys| {
                keys.get(&chain)
                    .filter(|(sealed, _)| *sealed == wrapped)
                    .map(|(_, key)| key.clone())
            });
            if let Some(key) = cached {
                return Ok(key);
            }
            let pkcs8 = self.seal.open(&context(chain), &wrapped)?;
            let key = Arc::new(
                Ed25519KeyPair::from_pkcs8(&pkcs8)
                    .map_err(|_| Error::Signing("a stored signing key does not parse"))?,
            );
            if let Ok(mut keys) = self.keys.lock() {
                keys.put(chain, (wrapped, key.clone()));
            }
            return Ok(key);
        }
        if let Ok(mut keys) = self.keys.lock() {
            keys.pop(&chain);
        }
        let unsigned_before = diesel::delete(audit_unsigned_chains::table.find(chain))
            .execute(conn)
            .await?
            > 0;
        if !first_append && !unsigned_before {
            return Err(Error::ChainKeyLost);
        }
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| Error::Signing("no signing key could be generated"))?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| Error::Signing("a generated signing key does not parse"))?;
        let public_key = key.public_key().as_ref().to_vec();
        diesel::insert_into(audit_keys::table)
            .values((
                audit_keys::chain.eq(chain),
                audit_keys::public_key.eq(&public_key),
                audit_keys::wrapped_private_key
                    .eq(self.seal.seal(&context(chain), pkcs8.as_ref())?),
            ))
            .execute(conn)
            .await?;
        if let Some(tenant) = Chain::from_key(chain).tenant() {
            diesel::update(tenants::table.find(tenant))
                .set(tenants::audit_public_key.eq(&public_key))
                .execute(conn)
                .await?;
        }
        tracing::info!(chain = %chain, "audit chain signing key created");
        Ok(Arc::new(key))
    }
}

/// Signs `chain`'s head at `sequence` with `hash`, now; returns the time and the signature.
pub fn sign(
    key: &Ed25519KeyPair,
    chain: Uuid,
    sequence: i64,
    hash: &[u8],
) -> (DateTime<Utc>, Vec<u8>) {
    let signed_at = hafen_store::now();
    let statement = hafen_events::chain::head_statement(
        Chain::from_key(chain).tenant(),
        u64::try_from(sequence).unwrap_or_default(),
        hash,
        signed_at,
    );
    (signed_at, key.sign(statement.as_bytes()).as_ref().to_vec())
}
