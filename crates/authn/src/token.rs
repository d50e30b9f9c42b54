//! Opaque tokens: `<session id, 32 hex digits>.<256-bit secret, base64url>`. Only the SHA-256
//! digest of the secret is ever stored.

use sha2::Digest;
use uuid::Uuid;
use zeroize::Zeroizing;

/// A freshly minted token and the digest to store.
pub struct Minted {
    /// The token, shown to the client once.
    pub token: Zeroizing<String>,
    /// SHA-256 of the secret part.
    pub digest: [u8; 32],
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Minted(..)")
    }
}

/// Mints a token for `session`.
pub fn mint(session: Uuid) -> Result<Minted, hafen_crypto::Error> {
    let secret = Zeroizing::new(hafen_crypto::secret::random_token()?);
    Ok(Minted {
        token: Zeroizing::new(format!("{}.{}", session.simple(), secret.as_str())),
        digest: digest(&secret),
    })
}

/// Splits a presented token into its session id and the digest of its secret; `None` when it
/// cannot be a Hafen token.
pub fn parse(token: &str) -> Option<(Uuid, [u8; 32])> {
    let (session, secret) = token.split_once('.')?;
    if session.len() != 32 || secret.len() != 43 {
        return None;
    }
    let session = Uuid::try_parse(session).ok()?;
    Some((session, digest(secret)))
}

/// SHA-256 of a token secret. Secrets carry 256 random bits, so a fast hash is enough.
pub fn digest(secret: &str) -> [u8; 32] {
    sha2::Sha256::digest(secret.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_parse_back_to_their_session_and_digest() {
        let session = Uuid::now_v7();
        let minted = mint(session).unwrap();
        let (parsed, digest) = parse(&minted.token).unwrap();
        assert_eq!(parsed, session);
        assert_eq!(digest, minted.digest);
        assert!(parse("garbage").is_none());
        assert!(parse(&format!("{}.short", session.simple())).is_none());
    }
}
