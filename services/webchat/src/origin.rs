//! Where a widget may be embedded: its allowed origins, checked exactly (a browser's `Origin`
//! is compared as a whole, never as a substring or a Referer).

/// An allowed origin: `https://host[:port]`, or `https://*.domain[:port]` for the hosts one
/// level or more below `domain` (not `domain` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin {
    wildcard: bool,
    /// The host (for a wildcard, the domain below which hosts match), lowercase.
    host: String,
    port: Option<u16>,
}

impl AllowedOrigin {
    /// Parses an allowed origin as an admin writes it; `None` for anything else (http, a
    /// path, a query, upper case, a wildcard other than a leading `*.`, an IP address).
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("https://")?;
        let (wildcard, rest) = match rest.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let (host, port) = split_port(rest)?;
        if !valid_host(host) {
            return None;
        }
        // A wildcard covers the subdomains of a registrable domain (or of a name below one),
        // never of a public suffix ("*.com", "*.co.uk", "*.github.io": anyone's sites), by
        // the Public Suffix List.
        if wildcard && psl::domain(host.as_bytes()).is_none() {
            return None;
        }
        Some(Self {
            wildcard,
            host: host.to_owned(),
            port,
        })
    }

    /// Whether a browser's `Origin` header value is allowed by this entry.
    pub fn allows(&self, origin: &str) -> bool {
        let Some(rest) = origin.strip_prefix("https://") else {
            return false;
        };
        let Some((host, port)) = split_port(rest) else {
            return false;
        };
        if port != self.port || !valid_host(host) {
            return false;
        }
        if self.wildcard {
            host.strip_suffix(self.host.as_str())
                .and_then(|below| below.strip_suffix('.'))
                .is_some_and(|below| !below.is_empty())
        } else {
            host == self.host
        }
    }
}

/// `host[:port]`, the port 1-65535 in decimal without a leading zero.
fn split_port(text: &str) -> Option<(&str, Option<u16>)> {
    match text.rsplit_once(':') {
        Some((host, port)) => {
            if port.is_empty() || port.starts_with('0') || !port.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            let port: u16 = port.parse().ok()?;
            Some((host, Some(port)))
        }
        None => Some((text, None)),
    }
}

/// A DNS name in lowercase: labels of letters, digits and inner hyphens, at most 253
/// characters; not all digits (no IP addresses).
fn valid_host(host: &str) -> bool {
    if host.is_empty() || host.len() > 253 || host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return false;
    }
    host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    })
}

/// Whether `url` is an https URL with a valid host, as a privacy-policy link must be (CB7).
pub fn valid_https_url(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("https://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    url.len() <= 2000
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
        && split_port(authority).is_some_and(|(host, _)| valid_host(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(entry: &str, origin: &str) -> bool {
        AllowedOrigin::parse(entry).is_some_and(|entry| entry.allows(origin))
    }

    #[test]
    fn cb8_exact_origins_match_only_themselves() {
        assert!(allowed(
            "https://www.example.com",
            "https://www.example.com"
        ));
        assert!(!allowed(
            "https://www.example.com",
            "https://www.example.com.evil.org"
        ));
        assert!(!allowed(
            "https://www.example.com",
            "https://evilwww.example.com"
        ));
        assert!(!allowed(
            "https://www.example.com",
            "http://www.example.com"
        ));
        assert!(!allowed(
            "https://www.example.com",
            "https://www.example.com:8443"
        ));
        assert!(allowed(
            "https://shop.example.com:8443",
            "https://shop.example.com:8443"
        ));
        assert!(!allowed("https://www.example.com", "null"));
    }

    #[test]
    fn cb8_a_wildcard_matches_subdomains_only() {
        assert!(allowed("https://*.example.com", "https://shop.example.com"));
        assert!(allowed("https://*.example.com", "https://a.b.example.com"));
        assert!(allowed("https://*.shop.co.uk", "https://www.shop.co.uk"));
        assert!(allowed(
            "https://*.eu.example.com",
            "https://a.eu.example.com"
        ));
        assert!(!allowed("https://*.example.com", "https://example.com"));
        assert!(!allowed("https://*.example.com", "https://badexample.com"));
        assert!(!allowed(
            "https://*.example.com",
            "https://shop.example.com.evil.org"
        ));
    }

    #[test]
    fn cb8_anything_else_is_refused_as_an_allowed_origin() {
        for bad in [
            "http://www.example.com",
            "https://www.example.com/",
            "https://www.example.com/path",
            "https://WWW.example.com",
            "https://*.com",
            "https://*.co.uk",
            "https://*.github.io",
            "https://www.*.example.com",
            "https://*",
            "https://192.168.0.1",
            "https://example.com:0",
            "https://example.com:99999",
            "https://exa mple.com",
            "",
        ] {
            assert!(AllowedOrigin::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn cb7_privacy_links_are_https_urls() {
        assert!(valid_https_url("https://www.example.com/privacy"));
        assert!(valid_https_url(
            "https://example.com/datenschutz?lang=de#chat"
        ));
        assert!(!valid_https_url("http://example.com/privacy"));
        assert!(!valid_https_url("javascript:alert(1)"));
        assert!(!valid_https_url("https:///privacy"));
        assert!(!valid_https_url("https://example.com/pri vacy"));
    }
}
