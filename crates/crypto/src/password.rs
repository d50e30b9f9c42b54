//! Passwords (OC3): the policy for new passwords, bcrypt hashing, and verification of bcrypt
//! and argon2id hashes (imported argon2id hashes are re-hashed to bcrypt on the next login).
//!
//! Hashing is deliberately slow: call these functions off the async workers — the services
//! use `hafen_platform::cpu::CpuPool`, whose low-priority threads keep other calls fast.

use argon2::{PasswordHash, PasswordVerifier};

use crate::error::{Error, Result};

/// bcrypt's input limit. Longer passwords are refused rather than silently truncated.
pub const MAX_PASSWORD_BYTES: usize = 72;

/// The default minimum length of new passwords, in characters.
pub const DEFAULT_MIN_PASSWORD_CHARS: usize = 10;

/// The default bcrypt cost of new hashes.
pub const DEFAULT_BCRYPT_COST: u32 = 12;

/// Why a new password is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyViolation {
    /// Shorter than the minimum.
    #[error("password must have at least {0} characters")]
    TooShort(usize),
    /// Longer than bcrypt can hash without truncating.
    #[error("password must be at most 72 bytes")]
    TooLong,
    /// On the list of the most common passwords.
    #[error("password is too common")]
    TooCommon,
}

/// The most common passwords of at least the default minimum length (from public breach
/// statistics), compared case-insensitively.
const COMMON_PASSWORDS: &[&str] = &[
    "1234567890",
    "12345678910",
    "0987654321",
    "1q2w3e4r5t",
    "1qaz2wsx3edc",
    "qwertyuiop",
    "asdfghjkl1",
    "password12",
    "password123",
    "password1234",
    "passwort123",
    "passwort1234",
    "iloveyou12",
    "qwerty1234",
    "qwerty12345",
    "qwertz1234",
    "qwertz12345",
    "1111111111",
    "0000000000",
    "abcdefghij",
    "abc1234567",
    "letmein123",
    "welcome123",
    "willkommen",
    "willkommen1",
    "sommer2024",
    "sommer2025",
    "sommer2026",
    "winter2024",
    "winter2025",
    "winter2026",
    "hallo12345",
    "hallo123456",
    "changeme123",
    "administrator",
    "admin12345",
    "passw0rd123",
    "trustno1234",
    "football123",
    "baseball123",
    "superman123",
    "princess123",
    "dragon12345",
    "sunshine123",
    "master12345",
    "starwars123",
];

/// Checks a new password against the policy: at least `min_chars` characters, at most
/// [`MAX_PASSWORD_BYTES`] bytes, not a common password.
pub fn check_policy(password: &str, min_chars: usize) -> Result<(), PolicyViolation> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(PolicyViolation::TooLong);
    }
    if password.chars().count() < min_chars {
        return Err(PolicyViolation::TooShort(min_chars));
    }
    let lowered = password.to_lowercase();
    if COMMON_PASSWORDS.contains(&lowered.as_str()) {
        return Err(PolicyViolation::TooCommon);
    }
    Ok(())
}

/// Hashes `password` with bcrypt at `cost`. Refuses (never truncates) passwords over 72 bytes.
pub fn hash(password: &str, cost: u32) -> Result<String> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::Hashing("password over 72 bytes".into()));
    }
    bcrypt::non_truncating_hash(password, cost).map_err(|err| Error::Hashing(err.to_string()))
}

/// The scheme of a stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// bcrypt modular crypt format (`$2a$`, `$2b$`, `$2y$`), with its cost.
    Bcrypt(u32),
    /// argon2id in PHC string format.
    Argon2id,
}

/// The bcrypt costs Hafen accepts: higher ones make one login stall a core for seconds.
pub const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=14;

/// The largest argon2id memory cost accepted, in KiB (64 MiB).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 64 * 1024;

/// The largest argon2id time cost (iterations) accepted.
pub const MAX_ARGON2_ITERATIONS: u32 = 10;

/// The largest argon2id parallelism accepted.
pub const MAX_ARGON2_LANES: u32 = 4;

/// Recognises a stored or imported hash; `None` for anything Hafen does not accept, which
/// includes hashes whose parameters are beyond [`BCRYPT_COSTS`] or the argon2id limits: one
/// login must not stall the service or exhaust its memory.
pub fn scheme(stored: &str) -> Option<Scheme> {
    if let Some(rest) = ["$2a$", "$2b$", "$2y$"]
        .iter()
        .find_map(|prefix| stored.strip_prefix(prefix))
    {
        let cost = rest.get(..2)?.parse::<u32>().ok()?;
        return (stored.len() == 60
            && rest.as_bytes().get(2) == Some(&b'$')
            && BCRYPT_COSTS.contains(&cost))
        .then_some(Scheme::Bcrypt(cost));
    }
    if stored.starts_with("$argon2id$") {
        let parsed = PasswordHash::new(stored).ok()?;
        let params = argon2::Params::try_from(&parsed).ok()?;
        let bounded = params.m_cost() <= MAX_ARGON2_MEMORY_KIB
            && params.t_cost() <= MAX_ARGON2_ITERATIONS
            && params.p_cost() <= MAX_ARGON2_LANES;
        return bounded.then_some(Scheme::Argon2id);
    }
    None
}

/// Outcome of checking a password against a stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The password matches.
    pub matches: bool,
    /// The hash is not bcrypt at `cost`: store a fresh hash after a successful login.
    pub needs_rehash: bool,
}

/// Verifies `password` against a stored bcrypt or argon2id hash.
pub fn verify(password: &str, stored: &str, cost: u32) -> Result<Verified> {
    match scheme(stored).ok_or(Error::UnsupportedHash)? {
        Scheme::Bcrypt(stored_cost) => {
            if password.len() > MAX_PASSWORD_BYTES {
                return Ok(Verified {
                    matches: false,
                    needs_rehash: false,
                });
            }
            let matches = bcrypt::non_truncating_verify(password, stored)
                .map_err(|err| Error::Hashing(err.to_string()))?;
            Ok(Verified {
                matches,
                needs_rehash: stored_cost != cost,
            })
        }
        Scheme::Argon2id => {
            let parsed = PasswordHash::new(stored).map_err(|_| Error::UnsupportedHash)?;
            let matches = argon2::Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok();
            Ok(Verified {
                matches,
                needs_rehash: true,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oc3_policy_refuses_short_long_and_common_passwords() {
        assert_eq!(
            check_policy("short", 10),
            Err(PolicyViolation::TooShort(10))
        );
        assert_eq!(
            check_policy(&"x".repeat(73), 10),
            Err(PolicyViolation::TooLong),
            "73 bytes is refused, never truncated"
        );
        assert_eq!(check_policy(&"x".repeat(72), 10), Ok(()));
        assert_eq!(
            check_policy("Password123", 10),
            Err(PolicyViolation::TooCommon)
        );
        assert_eq!(check_policy("correct horse battery", 10), Ok(()));
        // Characters, not bytes, count towards the minimum.
        assert_eq!(check_policy("ääääääääää", 10), Ok(()));
    }

    #[test]
    fn oc3_bcrypt_round_trip_and_rehash_on_cost_change() {
        let stored = hash("correct horse battery", 4).unwrap();
        assert_eq!(scheme(&stored), Some(Scheme::Bcrypt(4)));
        let ok = verify("correct horse battery", &stored, 4).unwrap();
        assert!(ok.matches && !ok.needs_rehash);
        assert!(!verify("wrong horse battery", &stored, 4).unwrap().matches);
        assert!(
            verify("correct horse battery", &stored, 5)
                .unwrap()
                .needs_rehash
        );
        assert!(hash(&"x".repeat(73), 4).is_err());
    }

    #[test]
    fn oc3_argon2id_hashes_verify_and_ask_for_rehash() {
        use argon2::PasswordHasher;
        let stored = argon2::Argon2::default()
            .hash_password(b"imported password")
            .unwrap()
            .to_string();
        assert_eq!(scheme(&stored), Some(Scheme::Argon2id));
        let ok = verify("imported password", &stored, 4).unwrap();
        assert!(ok.matches && ok.needs_rehash);
        assert!(!verify("another password", &stored, 4).unwrap().matches);
    }

    #[test]
    fn unknown_hash_formats_are_refused() {
        assert_eq!(scheme("plaintext"), None);
        assert_eq!(scheme("$1$md5crypt$abc"), None);
        assert_eq!(
            scheme("$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaA"),
            None
        );
        assert!(matches!(
            verify("x", "plaintext", 4),
            Err(Error::UnsupportedHash)
        ));
    }
}
