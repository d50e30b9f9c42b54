//! Envelope encryption: master key → tenant key → user keys (BX1).
//!
//! Every key is 256 bits. A key is wrapped by sealing it with AES-256-GCM under the key above
//! it; the associated data names what the key belongs to (e.g. the tenant's id), so a wrapped
//! key copied onto another tenant's row does not unwrap. Sealed data is
//! `version (1 byte) || nonce (12 bytes) || ciphertext and tag`.

use std::collections::BTreeMap;
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

/// The key-encryption keys at the top of the hierarchy, by version, and the secret the
/// purpose keys are derived from. Read from a file, never stored in the database, never
/// logged.
///
/// New keys are wrapped under the current version; a wrapped key is stored with the version
/// that wrapped it (`key_version`), so after a rotation ([`MasterKey::rotated`]) keys wrapped
/// under older versions still unwrap until they are re-wrapped and the old version is retired
/// ([`MasterKey::retired`]). The derivation secret ([`MasterKey::derive`]) never rotates: what
/// was made with a derived key (chat-code hashes under their pepper, say) cannot be made
/// again from what is stored.
///
/// The key file is either one line, the base64 encoding of 32 random bytes (that key is
/// version 1 and the derivation secret; generate one with `head -c 32 /dev/urandom | base64`),
/// or, once rotated, lines of `name = value`: `derive = <base64>`, `current = <version>`, and
/// `<version> = <base64>` for each version still in use. `#` starts a comment.
pub struct MasterKey {
    derive: Zeroizing<[u8; KEY_LEN]>,
    versions: BTreeMap<u32, Zeroizing<[u8; KEY_LEN]>>,
    current: u32,
}

/// A data key (a tenant key or a user key), kept wrapped at rest.
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("versions", &self.versions.keys().collect::<Vec<_>>())
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl Clone for MasterKey {
    fn clone(&self) -> Self {
        Self {
            derive: Zeroizing::new(*self.derive),
            versions: self
                .versions
                .iter()
                .map(|(v, k)| (*v, Zeroizing::new(**k)))
                .collect(),
            current: self.current,
        }
    }
}

fn decode_key(text: &str) -> std::result::Result<[u8; KEY_LEN], &'static str> {
    let bytes = Zeroizing::new(BASE64.decode(text.trim()).map_err(|_| "not base64")?);
    bytes
        .as_slice()
        .try_into()
        .map_err(|_| "must hold exactly 32 bytes")
}

impl MasterKey {
    /// A master key of one version (1) from raw bytes, which are also the derivation secret.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self {
            derive: Zeroizing::new(bytes),
            versions: BTreeMap::from([(1, Zeroizing::new(bytes))]),
            current: 1,
        }
    }

    /// Reads a master key file (see the type's documentation for its two forms).
    pub fn load(path: &Path) -> Result<Self> {
        let error = |reason: &str| Error::KeyFile {
            path: path.display().to_string(),
            reason: reason.to_owned(),
        };
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|err| error(&err.kind().to_string()))?,
        );
        Self::parse(&text).map_err(|reason| error(&reason))
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let only = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect::<Vec<_>>();
        // `name = value` lines name `derive`, `current` or a version; a base64 key never
        // starts so (its `=` is padding at the end).
        let named = |line: &&str| {
            line.split_once('=').is_some_and(|(name, _)| {
                let name = name.trim();
                name == "derive"
                    || name == "current"
                    || (!name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()))
            })
        };
        if only.is_empty() {
            return Err("holds no key".to_owned());
        }
        if !only.iter().any(named) {
            return match only.as_slice() {
                [key] => Ok(Self::from_bytes(decode_key(key)?)),
                _ => Err("must hold exactly 32 bytes".to_owned()),
            };
        }
        let (mut derive, mut versions, mut current) = (None, BTreeMap::new(), None);
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |what: &str| format!("line {}: {what}", number + 1);
            let (name, value) = line
                .split_once('=')
                .map(|(n, v)| (n.trim(), v.trim()))
                .ok_or_else(|| at("expected name = value"))?;
            match name {
                "derive" => derive = Some(decode_key(value).map_err(at)?),
                "current" => {
                    current = Some(value.parse::<u32>().map_err(|_| at("not a version"))?);
                }
                version => {
                    let version = version
                        .parse::<u32>()
                        .ok()
                        .filter(|v| *v > 0)
                        .ok_or_else(|| at("expected derive, current or a version number"))?;
                    let key = decode_key(value).map_err(at)?;
                    if versions.insert(version, Zeroizing::new(key)).is_some() {
                        return Err(at("version given twice"));
                    }
                }
            }
        }
        let current = current.ok_or("names no current version")?;
        if !versions.contains_key(&current) {
            return Err(format!("current version {current} is not in the file"));
        }
        let derive = match derive {
            Some(derive) => derive,
            None => **versions.get(&1).ok_or("names no derivation secret")?,
        };
        Ok(Self {
            derive: Zeroizing::new(derive),
            versions,
            current,
        })
    }

    /// The file's text for this key (see the type's documentation).
    fn to_text(&self) -> Zeroizing<String> {
        let mut text = Zeroizing::new(String::from(
            "# Hafen master key. `derive`: the secret purpose keys are derived from (never\n\
             # rotated); numbered lines: the key-encryption keys by version; `current`: the\n\
             # version new keys are wrapped under.\n",
        ));
        text.push_str(&format!(
            "derive = {}\n",
            BASE64.encode(self.derive.as_slice())
        ));
        text.push_str(&format!("current = {}\n", self.current));
        for (version, key) in &self.versions {
            text.push_str(&format!("{version} = {}\n", BASE64.encode(key.as_slice())));
        }
        text
    }

    /// Writes this key to `path` (mode 0600), replacing what is there at once: the text goes to
    /// a new file beside it, is synced, and is renamed over the old one, so a reader sees the
    /// old file or the new one, never part of either.
    pub fn write(&self, path: &Path) -> Result<()> {
        let error = |err: std::io::Error| Error::KeyFile {
            path: path.display().to_string(),
            reason: err.to_string(),
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let partial = path.with_file_name(format!(
            ".{}.partial",
            name.unwrap_or_else(|| "master.key".to_owned())
        ));
        let _ = std::fs::remove_file(&partial);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)
            .map_err(error)?;
        file.write_all(self.to_text().as_bytes()).map_err(error)?;
        file.sync_all().map_err(error)?;
        std::fs::rename(&partial, path).map_err(error)?;
        if let Some(parent) = path.parent()
            && let Ok(dir) = std::fs::File::open(parent)
        {
            let _ = dir.sync_all();
        }
        Ok(())
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

    /// The version new keys are wrapped under.
    pub fn current_version(&self) -> u32 {
        self.current
    }

    /// Every version this key holds, oldest first.
    pub fn versions(&self) -> Vec<u32> {
        self.versions.keys().copied().collect()
    }

    /// Whether this key holds `version`.
    pub fn has_version(&self, version: u32) -> bool {
        self.versions.contains_key(&version)
    }

    /// This key with a new, random version made current; the older versions stay, so what
    /// they wrapped still unwraps.
    pub fn rotated(&self) -> Result<Self> {
        let mut next = self.clone();
        let version = self.versions.keys().next_back().map_or(1, |v| v + 1);
        next.versions.insert(version, Zeroizing::new(random_key()?));
        next.current = version;
        Ok(next)
    }

    /// This key without `version`, which must not be the current one.
    pub fn retired(&self, version: u32) -> Result<Self> {
        if version == self.current {
            return Err(Error::KeyVersion(version));
        }
        let mut next = self.clone();
        next.versions
            .remove(&version)
            .ok_or(Error::KeyVersion(version))?;
        Ok(next)
    }

    /// Wraps `key` under the current version for the owner named by `context` (e.g.
    /// `b"tenant:" + id`); store [`MasterKey::current_version`] with it.
    pub fn wrap(&self, key: &DataKey, context: &[u8]) -> Result<Vec<u8>> {
        let current = self
            .versions
            .get(&self.current)
            .ok_or(Error::KeyVersion(self.current))?;
        seal(current, context, key.0.as_slice())
    }

    /// Unwraps a key that [`MasterKey::wrap`] wrapped under `version` with the same
    /// `context`. [`Error::KeyVersion`] when this key does not hold `version` (retired, or
    /// newer than this copy of the file).
    pub fn unwrap(&self, version: u32, wrapped: &[u8], context: &[u8]) -> Result<DataKey> {
        let key = self
            .versions
            .get(&version)
            .ok_or(Error::KeyVersion(version))?;
        DataKey::from_plaintext(open(key, context, wrapped)?)
    }

    /// A 256-bit subkey for one purpose (HKDF-SHA-256), e.g. the pepper of chat-code hashes.
    /// Different purposes give independent keys; rotation does not change them.
    pub fn derive(&self, purpose: &str) -> Zeroizing<[u8; KEY_LEN]> {
        let hkdf =
            hkdf::Hkdf::<sha2::Sha256>::new(Some(b"hafen master key v1"), self.derive.as_slice());
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
        let unwrapped = master.unwrap(1, &wrapped, b"tenant:a").unwrap();
        assert_eq!(unwrapped.0.as_slice(), tenant_key.0.as_slice());
        assert!(
            master.unwrap(1, &wrapped, b"tenant:b").is_err(),
            "bound to its owner"
        );
        let other = MasterKey::from_bytes([8; KEY_LEN]);
        assert!(
            other.unwrap(1, &wrapped, b"tenant:a").is_err(),
            "needs the master key"
        );
        let mut tampered = wrapped.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(
            master.unwrap(1, &tampered, b"tenant:a").is_err(),
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
        assert_eq!(*created.derive("x"), *loaded.derive("x"));
        assert_eq!(loaded.versions(), [1]);
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

    #[test]
    fn bx1_a_rotated_master_key_unwraps_old_versions_until_they_are_retired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let first = MasterKey::load_or_create(&path).unwrap();
        let tenant_key = DataKey::generate().unwrap();
        let old = first.wrap(&tenant_key, b"t").unwrap();

        let rotated = first.rotated().unwrap();
        rotated.write(&path).unwrap();
        let loaded = MasterKey::load(&path).unwrap();
        assert_eq!(
            (loaded.versions(), loaded.current_version()),
            (vec![1, 2], 2)
        );
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        // Purpose keys stay what they were: chat-code hashes keep matching.
        assert_eq!(*loaded.derive("pepper"), *first.derive("pepper"));
        assert_eq!(
            loaded.unwrap(1, &old, b"t").unwrap().expose(),
            tenant_key.expose()
        );
        let new = loaded.wrap(&tenant_key, b"t").unwrap();
        assert!(
            loaded.unwrap(1, &new, b"t").is_err(),
            "wrapped under version 2"
        );
        assert!(
            first.unwrap(2, &new, b"t").is_err(),
            "the old file lacks version 2"
        );

        assert!(loaded.retired(2).is_err(), "the current version stays");
        let retired = loaded.retired(1).unwrap();
        retired.write(&path).unwrap();
        let loaded = MasterKey::load(&path).unwrap();
        assert_eq!(loaded.versions(), [2]);
        assert!(matches!(
            loaded.unwrap(1, &old, b"t"),
            Err(Error::KeyVersion(1))
        ));
        assert_eq!(*loaded.derive("pepper"), *first.derive("pepper"));
        assert_eq!(
            loaded.unwrap(2, &new, b"t").unwrap().expose(),
            tenant_key.expose()
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.lines().any(|line| line.starts_with("1 =")),
            "{}",
            text.len()
        );
    }

    #[test]
    fn a_master_key_file_that_is_wrong_says_which_line() {
        let key = BASE64.encode([3u8; KEY_LEN]);
        for (text, reason) in [
            (format!("current = 2\n1 = {key}\n"), "current version 2"),
            (format!("derive = {key}\n1 = {key}\n"), "no current version"),
            (format!("current = 1\n1 = {key}\nx = {key}\n"), "line 3"),
            (format!("current = 1\n1 = {key}\n1 = {key}\n"), "twice"),
            (format!("current = 2\n2 = {key}\n"), "no derivation secret"),
            (format!("current=1\n1={key}\nderive={key}\n"), "OK"),
            ("# nothing\n".to_owned(), "holds no key"),
        ] {
            if reason == "OK" {
                assert!(MasterKey::parse(&text).is_ok(), "without spaces: {text}");
                continue;
            }
            let err = MasterKey::parse(&text).map(|_| ()).unwrap_err();
            assert!(err.contains(reason), "{text}: {err}");
            assert!(!err.contains(&key), "{err}");
        }
    }
}
