//! The crypto crate's error type. Messages never contain key material or secrets.

/// Errors from key handling, hashing and verification.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A key file is missing, unreadable or malformed.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What is wrong with it (never its contents).
        reason: String,
    },

    /// A wrapped key or ciphertext failed authentication: wrong key, wrong owner, or tampered.
    #[error("decryption failed: wrong key or tampered data")]
    Decrypt,

    /// A wrapped key names a master-key version the key file does not hold (retired, or
    /// added after this process read the file).
    #[error("master key version {0} is not in the key file")]
    KeyVersion(u32),

    /// The operating system's random source failed.
    #[error("random source unavailable")]
    Random,

    /// A stored password hash is in no format Hafen accepts.
    #[error("unsupported password hash format")]
    UnsupportedHash,

    /// bcrypt failed (e.g. an invalid cost).
    #[error("password hashing: {0}")]
    Hashing(String),
}

/// Result with the crypto [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
