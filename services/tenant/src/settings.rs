//! Tenant settings: their stored form, their defaults (privacy by default, UL5), validation
//! (CB5, CB7, UL2) and partial updates by field mask.

use hafen_proto::tenant::v1 as pb;

use crate::error::Error;

pub use hafen_store::settings::MAX_RETENTION_DAYS;
/// Most custom masking patterns a tenant may define.
pub const MAX_CUSTOM_PATTERNS: usize = 20;
const MAX_REGEX_CHARS: usize = 512;
const MAX_REPLACEMENT_CHARS: usize = 64;
const MAX_URL_CHARS: usize = 2048;
/// Compiled size limit of a custom pattern, so no tenant regex can exhaust memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

pub use hafen_store::settings::{CustomPattern, Features, Masking, Settings};

/// Conversion, updates and validation of [`Settings`].
pub trait SettingsExt: Sized {
    /// The API form.
    fn to_proto(&self) -> pb::TenantSettings;

    /// Applies the fields of `update` named by `paths` (a field mask relative to
    /// `TenantSettings`) and validates the result. Nothing is applied unless all is valid.
    fn apply(&self, update: &pb::TenantSettings, paths: &[String]) -> Result<Settings, Error>;

    /// Checks every rule; the error names the offending field.
    fn validate(&self) -> Result<(), Error>;
}

impl SettingsExt for Settings {
    /// The API form.
    fn to_proto(&self) -> pb::TenantSettings {
        pb::TenantSettings {
            retention_days: i32::try_from(self.retention_days).unwrap_or(i32::MAX),
            masking: Some(pb::MaskingSettings {
                email: self.masking.email,
                phone: self.masking.phone,
                iban: self.masking.iban,
                custom_patterns: self
                    .masking
                    .custom_patterns
                    .iter()
                    .map(|p| pb::CustomPattern {
                        name: p.name.clone(),
                        regex: p.regex.clone(),
                        replacement: p.replacement.clone(),
                    })
                    .collect(),
            }),
            privacy_policy_url: self.privacy_policy_url.clone(),
            features: Some(pb::Features {
                webchat: self.features.webchat,
            }),
        }
    }

    /// Applies the fields of `update` named by `paths` (a field mask relative to
    /// `TenantSettings`) and validates the result. Nothing is applied unless all is valid.
    fn apply(&self, update: &pb::TenantSettings, paths: &[String]) -> Result<Settings, Error> {
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                "name at least one field to change",
            ));
        }
        let mut next = self.clone();
        let masking = update.masking.clone().unwrap_or_default();
        let features = update.features.unwrap_or_default();
        for path in paths {
            match path.as_str() {
                "*" => {
                    next = Settings {
                        retention_days: retention_from_proto(update.retention_days)?,
                        masking: masking_from_proto(&masking),
                        privacy_policy_url: update.privacy_policy_url.clone(),
                        features: Features {
                            webchat: features.webchat,
                        },
                    };
                }
                "retention_days" => {
                    next.retention_days = retention_from_proto(update.retention_days)?
                }
                "masking" => next.masking = masking_from_proto(&masking),
                "masking.email" => next.masking.email = masking.email,
                "masking.phone" => next.masking.phone = masking.phone,
                "masking.iban" => next.masking.iban = masking.iban,
                "masking.custom_patterns" => {
                    next.masking.custom_patterns = masking_from_proto(&masking).custom_patterns;
                }
                "privacy_policy_url" => next.privacy_policy_url = update.privacy_policy_url.clone(),
                "features" | "features.webchat" => next.features.webchat = features.webchat,
                _ => {
                    return Err(Error::invalid(
                        "update_mask",
                        format!("unknown path `{}`", hafen_platform::status::excerpt(path)),
                    ));
                }
            }
        }
        next.validate()?;
        Ok(next)
    }

    /// Checks every rule; the error names the offending field.
    fn validate(&self) -> Result<(), Error> {
        if self.retention_days < 1 {
            return Err(Error::invalid(
                "settings.retention_days",
                "must be at least 1 day",
            ));
        }
        if self.retention_days > MAX_RETENTION_DAYS {
            return Err(Error::RetentionTooLong);
        }
        let patterns = &self.masking.custom_patterns;
        if patterns.len() > MAX_CUSTOM_PATTERNS {
            return Err(Error::invalid(
                "settings.masking.custom_patterns",
                "at most 20 patterns",
            ));
        }
        for (i, pattern) in patterns.iter().enumerate() {
            let field = |name: &str| format!("settings.masking.custom_patterns[{i}].{name}");
            let name_len = pattern.name.chars().count();
            if name_len == 0 || name_len > 64 {
                return Err(Error::invalid(field("name"), "must be 1-64 characters"));
            }
            if patterns[..i].iter().any(|p| p.name == pattern.name) {
                return Err(Error::invalid(field("name"), "names must be unique"));
            }
            if pattern.regex.is_empty() || pattern.regex.chars().count() > MAX_REGEX_CHARS {
                return Err(Error::invalid(field("regex"), "must be 1-512 characters"));
            }
            if let Err(err) = regex::RegexBuilder::new(&pattern.regex)
                .size_limit(REGEX_SIZE_LIMIT)
                .build()
            {
                // The regex crate's message explains the syntax error; it holds only the
                // tenant's own pattern, no message content.
                return Err(Error::invalid(
                    field("regex"),
                    format!("does not compile: {}", first_line(&err.to_string())),
                ));
            }
            if pattern.replacement.chars().count() > MAX_REPLACEMENT_CHARS {
                return Err(Error::invalid(
                    field("replacement"),
                    "at most 64 characters",
                ));
            }
        }
        validate_https_url(&self.privacy_policy_url)
            .map_err(|reason| Error::invalid("settings.privacy_policy_url", reason))?;
        Ok(())
    }
}

fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty())
        .unwrap_or("invalid pattern")
        .to_owned()
}

fn retention_from_proto(days: i32) -> Result<u32, Error> {
    u32::try_from(days)
        .map_err(|_| Error::invalid("settings.retention_days", "must be at least 1 day"))
}

fn masking_from_proto(masking: &pb::MaskingSettings) -> Masking {
    Masking {
        email: masking.email,
        phone: masking.phone,
        iban: masking.iban,
        custom_patterns: masking
            .custom_patterns
            .iter()
            .map(|p| CustomPattern {
                name: p.name.trim().to_owned(),
                regex: p.regex.clone(),
                replacement: p.replacement.clone(),
            })
            .collect(),
    }
}

/// Empty, or an absolute `https://` URL with a host (CB7).
fn validate_https_url(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Ok(());
    }
    if value.len() > MAX_URL_CHARS {
        return Err("must be at most 2048 characters");
    }
    let url = url::Url::parse(value).map_err(|_| "must be an absolute https:// URL")?;
    if url.scheme() != "https" {
        return Err("must use https");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(paths: &[&str]) -> Vec<String> {
        paths.iter().map(|p| (*p).to_owned()).collect()
    }

    fn field(err: &Error) -> String {
        match err {
            Error::InvalidField { field, .. } => field.clone(),
            Error::RetentionTooLong => "settings.retention_days".into(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn ul5_defaults_are_privacy_friendly() {
        let s = Settings::default();
        assert_eq!(s.retention_days, 730);
        assert!(!s.features.webchat);
        assert!(s.validate().is_ok());
        assert_eq!(Settings::from_json(&serde_json::json!({})), s);
    }

    #[test]
    fn cb5_retention_is_bounded() {
        let s = Settings::default();
        let update = |days| pb::TenantSettings {
            retention_days: days,
            ..Default::default()
        };
        assert_eq!(
            s.apply(&update(30), &mask(&["retention_days"]))
                .unwrap()
                .retention_days,
            30
        );
        assert!(matches!(
            s.apply(&update(731), &mask(&["retention_days"])),
            Err(Error::RetentionTooLong)
        ));
        let err = s.apply(&update(0), &mask(&["retention_days"])).unwrap_err();
        assert_eq!(field(&err), "settings.retention_days");
        let err = s
            .apply(&update(-5), &mask(&["retention_days"]))
            .unwrap_err();
        assert_eq!(field(&err), "settings.retention_days");
    }

    #[test]
    fn ul2_custom_patterns_must_compile() {
        let s = Settings::default();
        let update = pb::TenantSettings {
            masking: Some(pb::MaskingSettings {
                custom_patterns: vec![
                    pb::CustomPattern {
                        name: "customer".into(),
                        regex: r"K-\d{6}".into(),
                        replacement: String::new(),
                    },
                    pb::CustomPattern {
                        name: "broken".into(),
                        regex: "(unclosed".into(),
                        replacement: String::new(),
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = s
            .apply(&update, &mask(&["masking.custom_patterns"]))
            .unwrap_err();
        assert_eq!(field(&err), "settings.masking.custom_patterns[1].regex");
    }

    #[test]
    fn cb7_privacy_link_must_be_https() {
        let s = Settings::default();
        let with_url = |url: &str| pb::TenantSettings {
            privacy_policy_url: url.into(),
            ..Default::default()
        };
        let paths = mask(&["privacy_policy_url"]);
        assert!(
            s.apply(&with_url("https://example.eu/privacy"), &paths)
                .is_ok()
        );
        assert!(s.apply(&with_url(""), &paths).is_ok());
        for bad in [
            "http://example.eu/privacy",
            "example.eu",
            "https://",
            "https://u:p@x.eu/",
        ] {
            let err = s.apply(&with_url(bad), &paths).unwrap_err();
            assert_eq!(field(&err), "settings.privacy_policy_url", "{bad}");
        }
    }

    #[test]
    fn field_masks_change_only_what_they_name() {
        let s = Settings::default();
        let update = pb::TenantSettings {
            retention_days: 10,
            masking: Some(pb::MaskingSettings {
                email: true,
                phone: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let next = s.apply(&update, &mask(&["masking.email"])).unwrap();
        assert!(next.masking.email && !next.masking.phone);
        assert_eq!(next.retention_days, 730);
        assert_eq!(field(&s.apply(&update, &[]).unwrap_err()), "update_mask");
        assert_eq!(
            field(&s.apply(&update, &mask(&["nonsense"])).unwrap_err()),
            "update_mask"
        );
        let all = s.apply(&update, &mask(&["*"])).unwrap();
        assert_eq!(all.retention_days, 10);
        assert!(all.masking.phone);
    }
}
