//! Keys derived from the master key, one per purpose, for services that need such a key but
//! wrap or unwrap no data key: they get a key file with exactly the sub-keys they use and
//! never the master key (trust model: the master key lives only where data keys are
//! wrapped). A leaked sub-key reveals nothing of the master key or of the other sub-keys
//! (HKDF-SHA-256 with the purpose as info).
//!
//! A key file has one `purpose = base64` line per key (32 bytes each); `#` starts a comment.
//! `hafen-tenant derive-keys` writes one for a service.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::keys::{DataKey, KEY_LEN, MasterKey};

/// What a derived key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Purpose {
    /// MACs of session cache entries in Redis: every service that authenticates users.
    SessionCache,
    /// The pepper of chat-code hashes: the auth service (the tenant service derives it).
    ChatCodePepper,
    /// Sealing users' TOTP secrets: the auth service.
    TotpSecrets,
    /// Wrapping the audit chains' signing keys: the audit service.
    AuditSigning,
    /// Keyed hashes of client addresses, so rate limits never hold an address: the webchat
    /// service.
    AddressHashing,
    /// Keyed hashes of website visitors' signed identities, and the visitor tokens of
    /// identified visits: the webchat service.
    VisitorIdentity,
}

impl Purpose {
    /// Every purpose.
    pub const ALL: [Purpose; 6] = [
        Self::SessionCache,
        Self::ChatCodePepper,
        Self::TotpSecrets,
        Self::AuditSigning,
        Self::AddressHashing,
        Self::VisitorIdentity,
    ];

    /// The name in key files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::SessionCache => "session-cache",
            Self::ChatCodePepper => "chat-code-pepper",
            Self::TotpSecrets => "totp-secrets",
            Self::AuditSigning => "audit-signing",
            Self::AddressHashing => "address-hashing",
            Self::VisitorIdentity => "visitor-identity",
        }
    }

    /// The HKDF info the key is derived with. Changing one changes the key.
    fn label(self) -> &'static str {
        match self {
            Self::SessionCache => "session cache",
            Self::ChatCodePepper => "chat code pepper",
            Self::TotpSecrets => "totp secrets",
            Self::AuditSigning => "audit signing keys",
            Self::AddressHashing => "address hashing",
            Self::VisitorIdentity => "visitor identity",
        }
    }

    /// This purpose's key, derived from `master` (for services that hold the master key).
    pub fn derive(self, master: &MasterKey) -> DataKey {
        DataKey::from_bytes(*master.derive(self.label()))
    }

    /// The purpose named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// The sub-keys each service that holds no master key needs, by the service's short name;
/// `hafen-tenant derive-keys --service <name>` writes them.
pub fn needed_by(service: &str) -> Option<&'static [Purpose]> {
    match service {
        "auth" => Some(&[
            Purpose::SessionCache,
            Purpose::ChatCodePepper,
            Purpose::TotpSecrets,
        ]),
        "audit" => Some(&[Purpose::SessionCache, Purpose::AuditSigning]),
        "retention" => Some(&[Purpose::SessionCache]),
        _ => None,
    }
}

/// The sub-keys a service holds, derived from the master key or read from a key file.
pub struct SubKeys {
    keys: BTreeMap<Purpose, Zeroizing<[u8; KEY_LEN]>>,
}

impl std::fmt::Debug for SubKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubKeys")
            .field("purposes", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl SubKeys {
    /// The keys for `purposes`, derived from `master`.
    pub fn derive(master: &MasterKey, purposes: &[Purpose]) -> Self {
        Self {
            keys: purposes
                .iter()
                .map(|&purpose| (purpose, Zeroizing::new(*purpose.derive(master).expose())))
                .collect(),
        }
    }

    /// Reads a key file (see the module docs). The error names the file and what is wrong,
    /// never a key.
    pub fn load(path: &Path) -> Result<Self> {
        let error = |reason: String| Error::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let text = Zeroizing::new(
            std::fs::read_to_string(path).map_err(|err| error(err.kind().to_string()))?,
        );
        let mut keys = BTreeMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line.split_once('=').ok_or_else(|| {
                error(format!("line {}: expected `purpose = base64`", number + 1))
            })?;
            let purpose = Purpose::parse(name.trim())
                .ok_or_else(|| error(format!("line {}: unknown purpose", number + 1)))?;
            let bytes = Zeroizing::new(
                BASE64
                    .decode(value.trim())
                    .map_err(|_| error(format!("line {}: not base64", number + 1)))?,
            );
            let key: [u8; KEY_LEN] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| error(format!("line {}: a key holds exactly 32 bytes", number + 1)))?;
            keys.insert(purpose, Zeroizing::new(key));
        }
        Ok(Self { keys })
    }

    /// Writes these keys to a new file at `path` (mode 0600), replacing an older one.
    pub fn write(&self, path: &Path) -> Result<()> {
        let error = |err: std::io::Error| Error::KeyFile {
            path: path.display().to_string(),
            reason: err.to_string(),
        };
        let mut text = Zeroizing::new(String::from(
            "# Keys derived from the Hafen master key; keep this file as secret as the master key.\n",
        ));
        for (purpose, key) in &self.keys {
            text.push_str(purpose.name());
            text.push_str(" = ");
            text.push_str(&BASE64.encode(key.as_slice()));
            text.push('\n');
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(error)?;
        }
        // Written beside and renamed, so a reader never sees half a file.
        let staging = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staging)
            .map_err(error)?;
        file.write_all(text.as_bytes()).map_err(error)?;
        file.sync_all().map_err(error)?;
        std::fs::rename(&staging, path).map_err(error)
    }

    /// The key for `purpose`; a named error when this set lacks it.
    pub fn get(&self, purpose: Purpose) -> Result<DataKey> {
        self.keys
            .get(&purpose)
            .map(|key| DataKey::from_bytes(**key))
            .ok_or_else(|| Error::KeyFile {
                path: "key file".to_owned(),
                reason: format!("has no `{}` key", purpose.name()),
            })
    }

    /// The purposes this set holds keys for.
    pub fn purposes(&self) -> Vec<Purpose> {
        self.keys.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_round_trips_holds_only_what_was_asked_and_is_private() {
        let master = MasterKey::from_bytes([3; KEY_LEN]);
        let keys = SubKeys::derive(&master, &[Purpose::SessionCache, Purpose::TotpSecrets]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.keys");
        keys.write(&path).unwrap();
        let loaded = SubKeys::load(&path).unwrap();
        assert_eq!(
            loaded.purposes(),
            vec![Purpose::SessionCache, Purpose::TotpSecrets]
        );
        let sealed = keys
            .get(Purpose::TotpSecrets)
            .unwrap()
            .seal(b"ad", b"secret")
            .unwrap();
        assert_eq!(
            loaded
                .get(Purpose::TotpSecrets)
                .unwrap()
                .open(b"ad", &sealed)
                .unwrap()
                .as_slice(),
            b"secret"
        );
        let missing = loaded.get(Purpose::AuditSigning).unwrap_err().to_string();
        assert!(missing.contains("audit-signing"), "{missing}");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&BASE64.encode([3u8; KEY_LEN])),
            "the master key is not in the file"
        );
    }

    #[test]
    fn sub_keys_are_the_master_keys_derivations_and_differ_by_purpose() {
        let master = MasterKey::from_bytes([5; KEY_LEN]);
        let keys = SubKeys::derive(&master, &Purpose::ALL);
        assert_eq!(
            *master.derive("chat code pepper"),
            *keys.get(Purpose::ChatCodePepper).unwrap().expose()
        );
        let all: std::collections::BTreeSet<[u8; KEY_LEN]> = Purpose::ALL
            .iter()
            .map(|&p| *keys.get(p).unwrap().expose())
            .collect();
        assert_eq!(all.len(), Purpose::ALL.len());
    }

    #[test]
    fn malformed_key_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.keys");
        for (text, expected) in [
            ("nonsense\n", "expected"),
            ("unknown = AAAA\n", "unknown purpose"),
            ("session-cache = !!\n", "not base64"),
            ("session-cache = AAAA\n", "32 bytes"),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = SubKeys::load(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
