//! The operator's platform token.

use std::path::{Path, PathBuf};

use sha2::Digest;
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
