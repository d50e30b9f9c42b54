//! Tenant settings as the control plane stores them (JSON), with their defaults: privacy by
//! default (UL5), the longest retention allowed (CB5), card numbers always masked (UL1).
//! The tenant service validates and changes them; other services read them.

use serde::{Deserialize, Serialize};

/// Default and hard maximum of the retention period, in days (CB5: at most two years).
pub const MAX_RETENTION_DAYS: u32 = 730;

/// A tenant's settings as stored (JSON in the control plane).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Messages older than this many days are purged.
    pub retention_days: u32,
    /// What is masked out of message bodies before they are stored.
    pub masking: Masking,
    /// The tenant's privacy policy (https), or empty.
    pub privacy_policy_url: String,
    /// Optional features, all off by default.
    pub features: Features,
}

/// Masking rules (card numbers are always masked, whatever these say).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Masking {
    /// Mask e-mail addresses.
    pub email: bool,
    /// Mask phone numbers.
    pub phone: bool,
    /// Mask IBANs.
    pub iban: bool,
    /// Tenant-defined patterns.
    pub custom_patterns: Vec<CustomPattern>,
}

/// A tenant-defined masking rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CustomPattern {
    /// Label.
    pub name: String,
    /// Regular expression (Rust `regex` syntax).
    pub regex: String,
    /// Literal replacement; empty means `[masked]`.
    pub replacement: String,
}

/// Optional features.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Features {
    /// Website chat with anonymous visitors.
    pub webchat: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            retention_days: MAX_RETENTION_DAYS,
            masking: Masking::default(),
            privacy_policy_url: String::new(),
            features: Features::default(),
        }
    }
}

impl Settings {
    /// Reads stored settings; fields missing from older rows take their defaults.
    pub fn from_json(value: &serde_json::Value) -> Self {
        serde_json::from_value(value.clone()).unwrap_or_default()
    }

    /// The stored form.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}
