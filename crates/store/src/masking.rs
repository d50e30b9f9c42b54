//! Masking (UL1, UL2): personal data the tenant excludes is replaced before a body is
//! encrypted and stored, so what was masked is never stored anywhere. Payment card numbers
//! (13-19 digits passing the Luhn check) are always masked.

use std::sync::LazyLock;

use crate::settings::Masking;
use regex::Regex;

#[expect(
    clippy::expect_used,
    reason = "constant patterns, checked by the tests"
)]
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").expect("card pattern"));
#[expect(
    clippy::expect_used,
    reason = "constant patterns, checked by the tests"
)]
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
        .expect("email pattern")
});
#[expect(
    clippy::expect_used,
    reason = "constant patterns, checked by the tests"
)]
static IBAN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b").expect("iban pattern"));
#[expect(
    clippy::expect_used,
    reason = "constant patterns, checked by the tests"
)]
static PHONE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\+?\(?\d[\d ()/.-]{5,}\d").expect("phone pattern"));

/// A tenant's masking rules, compiled.
#[derive(Debug, Clone)]
pub struct Masker {
    email: bool,
    phone: bool,
    iban: bool,
    custom: Vec<(Regex, String)>,
}

impl Masker {
    /// Compiles `settings`; a custom pattern that does not compile (it was validated when
    /// saved) is skipped.
    pub fn new(settings: &Masking) -> Self {
        let custom = settings
            .custom_patterns
            .iter()
            .filter_map(|p| {
                let regex = regex::RegexBuilder::new(&p.regex)
                    .size_limit(1 << 20)
                    .build()
                    .ok()?;
                let replacement = if p.replacement.is_empty() {
                    "[masked]".to_owned()
                } else {
                    p.replacement.clone()
                };
                Some((regex, replacement))
            })
            .collect();
        Self {
            email: settings.email,
            phone: settings.phone,
            iban: settings.iban,
            custom,
        }
    }

    /// The body with every rule applied, and whether anything was replaced.
    pub fn apply(&self, body: &str) -> (String, bool) {
        let mut text = replace_if(body, &CARD, "[card]", luhn);
        if self.iban {
            text = replace_if(&text, &IBAN, "[iban]", iban_valid);
        }
        if self.email {
            text = EMAIL.replace_all(&text, "[email]").into_owned();
        }
        if self.phone {
            text = replace_if(&text, &PHONE, "[phone]", |m| {
                m.chars().filter(char::is_ascii_digit).count() >= 7
            });
        }
        for (regex, replacement) in &self.custom {
            text = regex
                .replace_all(&text, regex::NoExpand(replacement))
                .into_owned();
        }
        let masked = text != body;
        (text, masked)
    }
}

fn replace_if(text: &str, regex: &Regex, replacement: &str, keep: impl Fn(&str) -> bool) -> String {
    regex
        .replace_all(text, |caps: &regex::Captures<'_>| {
            let found = &caps[0];
            if keep(found) {
                replacement.to_owned()
            } else {
                found.to_owned()
            }
        })
        .into_owned()
}

/// Whether the digits of `candidate` (13-19 of them) pass the Luhn check.
fn luhn(candidate: &str) -> bool {
    let digits: Vec<u32> = candidate.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Whether `candidate` is an IBAN with a valid check (ISO 13616, mod 97).
fn iban_valid(candidate: &str) -> bool {
    let compact: String = candidate.chars().filter(|c| !c.is_whitespace()).collect();
    if compact.len() < 15 || compact.len() > 34 {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut remainder: u64 = 0;
    for c in tail.chars().chain(head.chars()) {
        let value = match c.to_digit(36) {
            Some(v) => v,
            None => return false,
        };
        let digits = if value >= 10 { 100 } else { 10 };
        remainder = (remainder * digits + u64::from(value)) % 97;
    }
    remainder == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::CustomPattern;

    fn all() -> Masker {
        Masker::new(&Masking {
            email: true,
            phone: true,
            iban: true,
            custom_patterns: vec![CustomPattern {
                name: "customer".into(),
                regex: r"K-\d{6}".into(),
                replacement: "[customer]".into(),
            }],
        })
    }

    #[test]
    fn ul1_card_numbers_are_always_masked_and_only_valid_ones() {
        let none = Masker::new(&Masking::default());
        let (text, masked) = none.apply("pay with 4111 1111 1111 1111 please");
        assert_eq!(text, "pay with [card] please");
        assert!(masked);
        let (text, masked) = none.apply("order 4111 1111 1111 1112 is not a card");
        assert!(!masked, "fails Luhn: {text}");
        assert_eq!(none.apply("4111-1111-1111-1111").0, "[card]");
    }

    #[test]
    fn ul2_configured_rules_replace_personal_data() {
        let masker = all();
        let (text, masked) = masker.apply(
            "mail jane.doe@example.eu, IBAN DE89 3704 0044 0532 0130 00, call +49 30 1234567, ref K-123456",
        );
        assert!(masked);
        assert!(!text.contains("example.eu"), "{text}");
        assert!(!text.contains("3704"), "{text}");
        assert!(!text.contains("1234567"), "{text}");
        assert!(!text.contains("K-123456"), "{text}");
        assert!(text.contains("[email]") && text.contains("[iban]") && text.contains("[phone]"));
        assert!(text.contains("[customer]"));
        let (plain, masked) = masker.apply("see you at 10, room 4");
        assert_eq!(plain, "see you at 10, room 4");
        assert!(!masked);
    }

    #[test]
    fn off_rules_leave_text_alone() {
        let none = Masker::new(&Masking::default());
        let text = "jane.doe@example.eu +49 30 1234567";
        assert_eq!(none.apply(text), (text.to_owned(), false));
    }
}
