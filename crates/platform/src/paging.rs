//! AIP-158 paging: page sizes and opaque page tokens.
//!
//! A token is the base64url encoding of the keyset position a page ended at plus the request
//! fields that must not change between pages, so a token from another query is refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tonic::Status;

use crate::status;

/// Page size when the request says 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page; larger requests are coerced to it.
pub const MAX_PAGE_SIZE: usize = 500;

/// The page size a request asks for: 0 means the default; negative is refused.
pub fn page_size(requested: i32) -> Result<usize, Status> {
    match usize::try_from(requested) {
        Err(_) => Err(status::invalid_field("page_size", "must not be negative")),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) => Ok(size.min(MAX_PAGE_SIZE)),
    }
}

/// What a page token records of its request, so a token is refused with other filters or
/// another page size: the requested `page_size` and the request's filter parts.
pub fn filter(page_size: i32, parts: &[&str]) -> String {
    let mut recorded = page_size.to_string();
    for part in parts {
        recorded.push('|');
        recorded.push_str(part);
    }
    recorded
}

/// Encodes the parts of a page token (none may contain a newline).
pub fn encode(parts: &[&str]) -> String {
    URL_SAFE_NO_PAD.encode(parts.join("\n"))
}

/// Decodes a token of exactly `count` parts; `None` for the first page (empty token);
/// INVALID_FIELD on `page_token` when it is not such a token.
pub fn decode(token: &str, count: usize) -> Result<Option<Vec<String>>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || status::invalid_field("page_token", "not a token from a previous page");
    let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let parts: Vec<String> = raw.split('\n').map(str::to_owned).collect();
    if parts.len() != count {
        return Err(bad());
    }
    Ok(Some(parts))
}

/// Refuses a token whose recorded request field differs from this request's.
pub fn same_filter(recorded: &str, current: &str) -> Result<(), Status> {
    if recorded == current {
        Ok(())
    } else {
        Err(status::invalid_field(
            "page_token",
            "the request's filters differ from the request the token came from",
        ))
    }
}

/// A keyset position by time and id, the usual order of Hafen's lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeKey {
    /// The time of the last item of the page.
    pub at: chrono::DateTime<chrono::Utc>,
    /// Its id.
    pub id: uuid::Uuid,
}

impl TimeKey {
    /// The token continuing after this key, for a request whose filters read `filter`.
    pub fn encode(&self, filter: &str) -> String {
        encode(&[
            &self.at.timestamp_micros().to_string(),
            &self.id.to_string(),
            filter,
        ])
    }

    /// The key in `token` (`None` for the first page); refused when it came from a request
    /// with other filters.
    pub fn decode(token: &str, filter: &str) -> Result<Option<Self>, Status> {
        let Some(parts) = decode(token, 3)? else {
            return Ok(None);
        };
        same_filter(&parts[2], filter)?;
        let bad = || status::invalid_field("page_token", "not a token from a previous page");
        let micros: i64 = parts[0].parse().map_err(|_| bad())?;
        Ok(Some(Self {
            at: chrono::DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
            id: uuid::Uuid::try_parse(&parts[1]).map_err(|_| bad())?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_refused() {
        let token = encode(&["a", "b c", "1"]);
        assert_eq!(decode(&token, 3).unwrap().unwrap(), ["a", "b c", "1"]);
        assert!(decode(&token, 2).is_err());
        assert!(decode("!!", 3).is_err());
        assert!(decode("", 3).unwrap().is_none());
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(9999).unwrap(), 500);
        assert!(page_size(-1).is_err());
        assert!(same_filter("1", "0").is_err());
    }

    #[test]
    fn time_keys_round_trip_and_keep_their_filter() {
        let key = TimeKey {
            at: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: uuid::Uuid::now_v7(),
        };
        let token = key.encode("deleted=0");
        assert_eq!(TimeKey::decode(&token, "deleted=0").unwrap(), Some(key));
        assert!(
            TimeKey::decode(&token, "deleted=1").is_err(),
            "filter changed"
        );
        assert!(TimeKey::decode("garbage!", "").is_err());
        assert_eq!(TimeKey::decode("", "").unwrap(), None);
    }
}
