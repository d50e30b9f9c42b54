//! Time-based one-time passwords (RFC 6238: HMAC-SHA-1, 6 digits, 30-second steps), the
//! second factor an owner confirms tenant deletion with (GR3).

use hmac::{Hmac, KeyInit, Mac};

use crate::error::Result;
use crate::secret::{constant_time_eq, random_bytes};

/// Length of a secret, in bytes (160 bits, as RFC 4226 recommends).
pub const SECRET_LEN: usize = 20;
/// Seconds per step.
pub const STEP_SECS: u64 = 30;
const DIGITS: u32 = 6;

/// A fresh random secret.
pub fn generate_secret() -> Result<[u8; SECRET_LEN]> {
    let mut secret = [0u8; SECRET_LEN];
    random_bytes(&mut secret)?;
    Ok(secret)
}

/// The code for `secret` at Unix time `unix_secs`.
pub fn code_at(secret: &[u8], unix_secs: u64) -> String {
    let counter = unix_secs / STEP_SECS;
    let Ok(mut mac) = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(&counter.to_be_bytes());
    let digest = mac.finalize().into_bytes();
    let offset = usize::from(digest[digest.len() - 1] & 0x0f);
    let binary = (u32::from(digest[offset] & 0x7f) << 24)
        | (u32::from(digest[offset + 1]) << 16)
        | (u32::from(digest[offset + 2]) << 8)
        | u32::from(digest[offset + 3]);
    format!("{:06}", binary % 10u32.pow(DIGITS))
}

/// The time step (`unix_secs / 30`) whose code `code` is, for `secret` around `unix_secs`
/// (one step of clock drift either way); `None` when it is none of them. Callers record the
/// step, so a code is accepted once (see `hafen_store::accounts::use_totp_step`).
pub fn matching_step(secret: &[u8], code: &str, unix_secs: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    [
        unix_secs.saturating_sub(STEP_SECS),
        unix_secs,
        unix_secs + STEP_SECS,
    ]
    .iter()
    .fold(None, |found, &t| {
        let matches = constant_time_eq(code_at(secret, t).as_bytes(), code.as_bytes());
        if matches { Some(t / STEP_SECS) } else { found }
    })
}

/// Whether `code` is valid for `secret` at `unix_secs`, allowing one step of clock drift
/// either way. Compared in constant time.
pub fn verify(secret: &[u8], code: &str, unix_secs: u64) -> bool {
    matching_step(secret, code, unix_secs).is_some()
}

/// Seals a user's TOTP secret for storage, under the TOTP sub-key
/// ([`crate::subkeys::Purpose::TotpSecrets`]) and bound to the user's id.
pub fn seal_secret(key: &crate::DataKey, user_id: &[u8], secret: &[u8]) -> Result<Vec<u8>> {
    key.seal(user_id, secret)
}

/// Opens what [`seal_secret`] sealed for the same user.
pub fn open_secret(
    key: &crate::DataKey,
    user_id: &[u8],
    sealed: &[u8],
) -> Result<zeroize::Zeroizing<Vec<u8>>> {
    key.open(user_id, sealed)
}

/// RFC 4648 base32 without padding, as authenticator apps expect.
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(bytes.len().div_ceil(5) * 8);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &byte in bytes {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// The `otpauth://` URI for a QR code.
pub fn otpauth_uri(issuer: &str, account: &str, secret: &[u8]) -> String {
    let escape = |text: &str| -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    format!(
        "otpauth://totp/{}:{}?secret={}&issuer={}&algorithm=SHA1&digits=6&period=30",
        escape(issuer),
        escape(account),
        base32(secret),
        escape(issuer)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_test_vectors() {
        // RFC 6238 appendix B, SHA-1 secret; the last six of its eight digits.
        let secret = b"12345678901234567890";
        assert_eq!(code_at(secret, 59), "287082");
        assert_eq!(code_at(secret, 1_111_111_109), "081804");
        assert_eq!(code_at(secret, 1_234_567_890), "005924");
        assert_eq!(code_at(secret, 2_000_000_000), "279037");
    }

    #[test]
    fn verification_allows_one_step_of_drift() {
        let secret = b"12345678901234567890";
        assert!(verify(secret, "287082", 59));
        assert!(verify(secret, "287082", 59 + 30));
        assert!(!verify(secret, "287082", 59 + 90));
        assert!(!verify(secret, "28708", 59));
        assert!(!verify(secret, "abcdef", 59));
    }

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
        assert!(otpauth_uri("Hafen", "acme:owner", b"x").contains("acme%3Aowner"));
    }
}
