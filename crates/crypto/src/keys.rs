//! Envelope encryption: master key → tenant key → user keys (BX1).
//!
//! Every key is 256 bits. A key is wrapped by sealing it with AES-256-GCM under the key above
//! it; the associated data names what the key belongs to (e.g. the tenant's id), so a wrapped
//! key copied onto another tenant's row does not unwrap. Sealed data is
//! `version (1 byte) || nonce (12 bytes) || ciphertext and tag`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::secret::random_bytes;

/// The associated data that binds a wrapped tenant key to its tenant.
pub fn tenant_key_context(tenant: &[u8]) -> Vec<u8> {
    [b"hafen tenant key:".as_slice(), tenant].concat()
}

/// The associated data that binds a wrapped user key to its user.
pub fn user_key_context(user: &[u8]) -> Vec<u8> {
    [b"hafen user key:".as_slice(), user].concat()
}

/// Length of every key, in bytes.
pub const KEY_LEN: usize = 32;

const FORMAT_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// The key-encryption key at the top of the hierarchy. Read from a file, never stored in the
/// database, never logged.
pub struct MasterKey(Zeroizing<[u8; KEY_LEN]>);

/// A data key (a tenant key or a user key), kept wrapped at rest.
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl Clone for MasterKey {
    fn clone(&self) -> Self {
        Self(Zeroizing::new(*self.0))
    }
}

impl MasterKey {
    /// A master key from raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Reads a master key file: the base64 encoding of 32 random bytes (surrounding
    /// whitespace ignored). Generate one with `head -c 32 /dev/urandom | base64`.
    pub fn load(path: &Path) -> Result<Self> {
        let error = |reason: &str| Error::KeyFile {
            path: path.display().to_string(),
            reason: reason.to_owned(),
        };
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|err| error(&err.kind().to_string()))?,
        );
        let bytes = Zeroizing::new(
            BASE64
                .decode(text.trim())
                .map_err(|_| error("not base64"))?,
        );
        let key: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| error("must hold exactly 32 bytes"))?;
        Ok(Self::from_bytes(key))
    }

    /// Reads the key file at `path`, creating it (mode 0600) with a fresh random key when it
    /// does not exist. For development set-ups only; production keys are provisioned.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if !path.exists() {
            let key = Zeroizing::new(random_key()?);
            let encoded = Zeroizing::new(BASE64.encode(key.as_slice()));
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|err| Error::KeyFile {
                    path: parent.display().to_string(),
                    reason: err.to_string(),
                })?;
            }
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut file| file.write_all(encoded.as_bytes()));
            match written {
                Ok(()) => {}
                // Another process created it first: use theirs.
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => {
                    return Err(Error::KeyFile {
                        path: path.display().to_string(),
                        reason: err.to_string(),
                    });
                }
            }
        }
        Self::load(path)
    }

    /// Wraps `key` for the owner named by `context` (e.g. `b"tenant:" + id`).
    pub fn wrap(&self, key: &DataKey, context: &[u8]) -> Result<Vec<u8>> {
        seal(&self.0, context, key.0.as_slice())
    }

    /// Unwraps a key wrapped by [`MasterKey::wrap`] with the same `context`.
    pub fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<DataKey> {
        DataKey::from_plaintext(open(&self.0, context, wrapped)?)
    }

    /// A 256-bit subkey for one purpose (HKDF-SHA-256), e.g. the pepper of chat-code hashes.
    /// Different purposes give independent keys.
    pub fn derive(&self, purpose: &str) -> Zeroizing<[u8; KEY_LEN]> {
        let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"hafen master key v1"), self.0.as_slice());
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        // A 32-byte output is always within HKDF-SHA-256's limit of 8160 bytes.
        let _ = hkdf.expand(purpose.as_bytes(), out.as_mut_slice());
        out
    }
}

impl DataKey {
    /// A key derived from the master key for one purpose (see [`MasterKey::derive`]).
    pub fn derived(master: &MasterKey, purpose: &str) -> Self {
        Self(master.derive(purpose))
    }

    /// A key from raw bytes (e.g. a derived key read from a key file).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The raw key, for keyed hashes (HMAC) under it. Never log or store what this returns.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self> {
        Ok(Self(Zeroizing::new(random_key()?)))
    }

    fn from_plaintext(plaintext: Zeroizing<Vec<u8>>) -> Result<Self> {
        let key: [u8; KEY_LEN] = plaintext
            .as_slice()
            .try_into()
            .map_err(|_| Error::Decrypt)?;
        Ok(Self(Zeroizing::new(key)))
    }

    /// Wraps `key` (e.g. a user key under this tenant key) for the owner named by `context`.
    pub fn wrap(&self, key: &DataKey, context: &[u8]) -> Result<Vec<u8>> {
        seal(&self.0, context, key.0.as_slice())
    }

    /// Unwraps a key wrapped by [`DataKey::wrap`] with the same `context`.
    pub fn unwrap(&self, wrapped: &[u8], context: &[u8]) -> Result<DataKey> {
        DataKey::from_plaintext(open(&self.0, context, wrapped)?)
    }

    /// Encrypts `plaintext`, binding `associated_data` (e.g. message and conversation ids).
    pub fn seal(&self, associated_data: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        seal(&self.0, associated_data, plaintext)
    }

    /// Decrypts what [`DataKey::seal`] produced with the same associated data.
    pub fn open(&self, associated_data: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        open(&self.0, associated_data, sealed)
    }
}

fn random_key() -> Result<[u8; KEY_LEN]> {
    let mut key = [0u8; KEY_LEN];
    random_bytes(&mut key)?;
    Ok(key)
}

fn seal(key: &[u8; KEY_LEN], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let cipher = Aes256Gcm::new(key.into());
    let mut nonce = [0u8; NONCE_LEN];
    random_bytes(&mut nonce)?;
    let ciphertext = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| Error::Decrypt)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    Ok(out)
}

fn open(key: &[u8; KEY_LEN], aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let (&version, rest) = sealed.split_first().ok_or(Error::Decrypt)?;
    if version != FORMAT_VERSION || rest.len() < NONCE_LEN {
        return Err(Error::Decrypt);
    }
    let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| Error::Decrypt)?;
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| Error::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cb3_wrapped_key_unwraps_only_with_the_same_key_and_context() {
        let master = MasterKey::from_bytes([7; KEY_LEN]);
        let tenant_key = DataKey::generate().unwrap();
        let wrapped = master.wrap(&tenant_key, b"tenant:a").unwrap();
        let unwrapped = master.unwrap(&wrapped, b"tenant:a").unwrap();
        assert_eq!(unwrapped.0.as_slice(), tenant_key.0.as_slice());
        assert!(
            master.unwrap(&wrapped, b"tenant:b").is_err(),
            "bound to its owner"
        );
        let other = MasterKey::from_bytes([8; KEY_LEN]);
        assert!(
            other.unwrap(&wrapped, b"tenant:a").is_err(),
            "needs the master key"
        );
        let mut tampered = wrapped.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(
            master.unwrap(&tampered, b"tenant:a").is_err(),
            "tampering is detected"
        );
        assert!(
            !wrapped
                .windows(KEY_LEN)
                .any(|w| w == tenant_key.0.as_slice())
        );
    }

    #[test]
    fn master_key_file_round_trip_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let created = MasterKey::load_or_create(&path).unwrap();
        let loaded = MasterKey::load(&path).unwrap();
        assert_eq!(created.0.as_slice(), loaded.0.as_slice());
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        std::fs::write(dir.path().join("short"), BASE64.encode([1u8; 16])).unwrap();
        let err = MasterKey::load(&dir.path().join("short")).unwrap_err();
        assert!(err.to_string().contains("exactly 32 bytes"), "{err}");
        assert!(MasterKey::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn derived_keys_differ_by_purpose() {
        let master = MasterKey::from_bytes([1; KEY_LEN]);
        assert_ne!(*master.derive("a"), *master.derive("b"));
        assert_eq!(*master.derive("a"), *master.derive("a"));
    }
}
