//! Hafen's keys and secrets (CB3, BX1, OC2, OC3).
//!
//! - [`keys`]: envelope encryption. The master key (KEK) comes from a file and never enters
//!   the database; tenant keys are generated here and stored wrapped by it (AES-256-GCM, the
//!   owner's id bound as associated data). Destroying a wrapped key makes everything it
//!   protected unreadable, old backups included.
//! - [`secret`]: random tokens, chat codes from an unambiguous alphabet, keyed hashes
//!   (HMAC-SHA-256) and constant-time comparison.
//! - [`password`]: the password policy, bcrypt hashing and bcrypt/argon2id verification.
//! - [`subkeys`]: keys derived from the master key for one purpose each (session cache MACs,
//!   the chat-code pepper, TOTP secrets, audit signing keys), for services that must not
//!   hold the master key itself.
//! - [`totp`]: RFC 6238 one-time passwords, the owner's second factor.
//!
//! Nothing here logs; secret values never appear in `Debug` output.

pub mod error;
pub mod keys;
pub mod password;
pub mod secret;
pub mod subkeys;
pub mod totp;

pub use error::{Error, Result};
pub use keys::{DataKey, MasterKey};
pub use subkeys::{Purpose, SubKeys};
