//! Random secrets, chat codes and keyed hashes.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// Characters of chat codes: digits and capitals without the look-alikes 0/O and 1/I/L.
pub const CHAT_CODE_ALPHABET: &[u8; 31] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";

/// Length of a chat code: 10 characters of 31 ≈ 49.5 bits.
pub const CHAT_CODE_LEN: usize = 10;

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|_| Error::Random)
}

/// A 256-bit random token, URL-safe base64 without padding (43 characters).
pub fn random_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    random_bytes(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// 32 bytes as a token: URL-safe base64 without padding (43 characters), the shape of
/// [`random_token`].
pub fn token_of(bytes: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A fresh chat code: [`CHAT_CODE_LEN`] characters from [`CHAT_CODE_ALPHABET`], uniformly
/// distributed (rejection sampling, no modulo bias).
pub fn chat_code() -> Result<String> {
    let alphabet_len = CHAT_CODE_ALPHABET.len();
    // The largest multiple of the alphabet size that fits in a byte: bytes above it are drawn
    // again so that every character is equally likely.
    let limit = 256 - (256 % alphabet_len);
    let mut code = String::with_capacity(CHAT_CODE_LEN);
    let mut pool = [0u8; 32];
    while code.len() < CHAT_CODE_LEN {
        random_bytes(&mut pool)?;
        for &byte in &pool {
            if usize::from(byte) < limit && code.len() < CHAT_CODE_LEN {
                code.push(char::from(
                    CHAT_CODE_ALPHABET[usize::from(byte) % alphabet_len],
                ));
            }
        }
    }
    Ok(code)
}

/// Normalises a chat code as typed by a person: ignores spaces and hyphens, upper-cases.
/// Returns `None` when it cannot be a chat code.
pub fn normalize_chat_code(typed: &str) -> Option<String> {
    let code: String = typed
        .chars()
        .filter(|c| !matches!(c, ' ' | '-'))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    (code.len() == CHAT_CODE_LEN && code.bytes().all(|b| CHAT_CODE_ALPHABET.contains(&b)))
        .then_some(code)
}

/// HMAC-SHA-256 of `parts` (length-prefixed, so boundaries cannot shift) under `key`.
pub fn keyed_hash(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let Ok(mut mac) = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key) else {
        // HMAC accepts keys of any length; this branch cannot be taken.
        return [0; 32];
    };
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Plain HMAC-SHA-256 of `message` under `key`, as other systems compute it (e.g. PHP's
/// `hash_hmac('sha256', $message, $key)`); [`keyed_hash`] is for Hafen's own hashes.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let Ok(mut mac) = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key) else {
        // HMAC accepts keys of any length; this branch cannot be taken.
        return [0; 32];
    };
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oc2_chat_codes_use_the_unambiguous_alphabet() {
        for _ in 0..200 {
            let code = chat_code().unwrap();
            assert_eq!(code.len(), CHAT_CODE_LEN);
            assert!(
                code.bytes().all(|b| CHAT_CODE_ALPHABET.contains(&b)),
                "{code}"
            );
            assert!(!code.contains(['0', 'O', '1', 'I', 'L']), "{code}");
            assert_eq!(normalize_chat_code(&code).as_deref(), Some(code.as_str()));
        }
        assert_ne!(chat_code().unwrap(), chat_code().unwrap());
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn typed_chat_codes_are_normalised() {
        assert_eq!(
            normalize_chat_code("abcd-efgh 23").as_deref(),
            Some("ABCDEFGH23")
        );
        assert_eq!(normalize_chat_code("ABCDEFGH2"), None, "too short");
        assert_eq!(
            normalize_chat_code("ABCDEFGH20"),
            None,
            "0 is not in the alphabet"
        );
    }

    #[test]
    fn keyed_hash_depends_on_key_and_boundaries() {
        let a = keyed_hash(b"k1", &[b"ab", b"c"]);
        assert_ne!(a, keyed_hash(b"k2", &[b"ab", b"c"]));
        assert_ne!(a, keyed_hash(b"k1", &[b"a", b"bc"]));
        assert!(constant_time_eq(&a, &keyed_hash(b"k1", &[b"ab", b"c"])));
        assert_eq!(random_token().unwrap().len(), 43);
    }
}
