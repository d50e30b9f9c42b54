//! Authentication of calls to Hafen services.
//!
//! Every call carries `authorization: Bearer <token>`. Today one kind of caller exists: the
//! operator, holding the platform token that each service reads from a file
//! (`--platform-token-file`). The token is compared in constant time against its SHA-256
//! digest, so the service keeps no copy of the token itself in memory.

use std::path::{Path, PathBuf};

use sha2::Digest;
use tonic::Status;
use tonic::metadata::MetadataMap;
use zeroize::Zeroizing;

/// Shortest platform token accepted, in characters (a generated one has 43).
pub const MIN_TOKEN_CHARS: usize = 32;

/// Where the platform token is.
#[derive(clap::Args, Clone, Debug)]
pub struct OperatorArgs {
    /// File holding the operator's platform token (at least 32 characters; surrounding
    /// whitespace ignored). Calls presenting it act as the operator.
    #[arg(long, env = "HAFEN_PLATFORM_TOKEN_FILE")]
    pub platform_token_file: PathBuf,
}

/// Why a platform token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read or written.
    #[error("platform token file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The token is too short to be a secret.
    #[error("platform token file {0}: the token must have at least 32 characters")]
    TooShort(String),
    /// No random token could be generated.
    #[error("generating a platform token: {0}")]
    Generate(#[from] hafen_crypto::Error),
}

/// The digest of the operator's platform token.
#[derive(Clone)]
pub struct PlatformToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for PlatformToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlatformToken(..)")
    }
}

impl PlatformToken {
    /// A token from its text.
    pub fn new(token: &str) -> Result<Self, TokenFileError> {
        let token = token.trim();
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Err(TokenFileError::TooShort("(given)".into()));
        }
        Ok(Self {
            digest: sha2::Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Reads the token from `path`.
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| TokenFileError::Io {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        Self::new(&text).map_err(|err| match err {
            TokenFileError::TooShort(_) => TokenFileError::TooShort(path.display().to_string()),
            other => other,
        })
    }

    /// Reads the token from `path`, first writing a fresh random one (mode 0600) when the file
    /// does not exist. For development set-ups only.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenFileError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if !path.exists() {
            let token = Zeroizing::new(hafen_crypto::secret::random_token()?);
            let io = |source| TokenFileError::Io {
                path: path.display().to_string(),
                source,
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(mut file) => file.write_all(token.as_bytes()).map_err(io)?,
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(err) => return Err(io(err)),
            }
        }
        Self::load(path)
    }

    /// Whether `presented` is the platform token (constant time).
    pub fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = sha2::Sha256::digest(presented.as_bytes()).into();
        hafen_crypto::secret::constant_time_eq(&digest, &self.digest)
    }
}

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// The operator (platform token).
    Operator,
}

/// The bearer token of a call, if any. A malformed `authorization` header is an error.
pub fn bearer(metadata: &MetadataMap) -> Result<Option<&str>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| hafen_platform::status::unauthenticated("malformed authorization header"))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| {
            hafen_platform::status::unauthenticated("authorization must be `Bearer <token>`")
        })?;
    Ok(Some(token.trim()))
}

/// Authenticates calls.
#[derive(Debug, Clone)]
pub struct Authenticator {
    platform: PlatformToken,
}

impl Authenticator {
    /// An authenticator that knows the operator's platform token.
    pub fn new(platform: PlatformToken) -> Self {
        Self { platform }
    }

    /// Who made the call with `metadata`; UNAUTHENTICATED when nobody known.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        match bearer(metadata)? {
            None => Err(hafen_platform::status::unauthenticated(
                "missing bearer token (authorization metadata)",
            )),
            Some(token) if self.platform.matches(token) => Ok(Caller::Operator),
            Some(_) => Err(hafen_platform::status::unauthenticated("unknown token")),
        }
    }

    /// Like [`Authenticator::authenticate`], but only the operator may call.
    pub fn require_operator(&self, metadata: &MetadataMap) -> Result<(), Status> {
        match self.authenticate(metadata)? {
            Caller::Operator => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", value.parse().unwrap());
        metadata
    }

    #[test]
    fn operator_is_recognised_only_by_the_exact_token() {
        let token = "a".repeat(40);
        let auth = Authenticator::new(PlatformToken::new(&token).unwrap());
        assert_eq!(
            auth.authenticate(&with_auth(&format!("Bearer {token}")))
                .unwrap(),
            Caller::Operator
        );
        let wrong = auth
            .authenticate(&with_auth(&format!("Bearer {}", "b".repeat(40))))
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        let missing = auth.authenticate(&MetadataMap::new()).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("missing"));
        let malformed = auth.authenticate(&with_auth(&token)).unwrap_err();
        assert!(malformed.message().contains("Bearer"));
        assert_eq!(
            hafen_platform::status::reason(&wrong).as_deref(),
            Some("UNAUTHENTICATED")
        );
    }

    #[test]
    fn short_tokens_are_refused_and_files_are_created_private() {
        assert!(PlatformToken::new("short").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let token = PlatformToken::load_or_create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(token.matches(&text));
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
