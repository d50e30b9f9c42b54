//! Widgets (CB7, UL5): what a tenant embeds in its website, configured by its admins. Each
//! widget's settings are validated whole; its consent texts are versioned (a new text is a new
//! row). Every change is audited in its transaction.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_authn::Principal;
use hafen_events::{Actor, Event};
use hafen_proto::webchat::v1 as pb;
use hafen_store::schema::{
    consent_text_translations, consent_texts, users, widget_routes, widgets,
};
use hafen_store::settings::Settings as TenantSettings;
use hafen_store::{AsyncPgConnection, now};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::Service;
use crate::error::Error;
use crate::origin::{AllowedOrigin, valid_https_url};

/// Most allowed origins, pre-chat fields and agents of a widget.
const MAX_ORIGINS: usize = 20;
const MAX_FIELDS: usize = 20;
const MAX_AGENTS: usize = 50;
/// Longest consent text, in characters.
const MAX_CONSENT_CHARS: usize = 10_000;
/// A visit's lifetime when the widget does not say.
const DEFAULT_LIFETIME_DAYS: i32 = 30;
/// Most translations of a widget's texts, and of a consent text version.
const MAX_TRANSLATIONS: usize = 10;
/// The language of a widget that does not name one.
pub const DEFAULT_LANGUAGE: &str = "en";

fn default_language() -> String {
    DEFAULT_LANGUAGE.to_owned()
}

/// A widget's settings as stored (`widgets.settings`), validated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Settings {
    pub name: String,
    pub allowed_origins: Vec<String>,
    pub privacy_policy_url: String,
    pub pre_chat_fields: Vec<Field>,
    pub welcome_message: String,
    pub offline_message: String,
    pub business_hours: Hours,
    pub allow_anonymous_chat: bool,
    /// The users who answer its chats.
    #[serde(default)]
    pub agents: Vec<Uuid>,
    /// Whether the widget keeps a visit's token for return visits (with consent).
    #[serde(default)]
    pub remember_visitors: bool,
    /// The language of the texts above (ISO 639-1).
    #[serde(default = "default_language")]
    pub language: String,
    /// The texts in other languages.
    #[serde(default)]
    pub translations: Vec<Translation>,
}

/// A widget's texts in another language.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Translation {
    pub language: String,
    pub welcome_message: String,
    pub offline_message: String,
    /// Labels and purposes of pre-chat fields, in the fields' order.
    pub fields: Vec<FieldText>,
}

/// A pre-chat field's texts in a translation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FieldText {
    pub key: String,
    pub label: String,
    pub purpose: String,
}

/// A widget's texts in one language, as a visitor sees them.
pub struct Texts {
    pub welcome_message: String,
    pub offline_message: String,
    pub pre_chat_fields: Vec<pb::PreChatField>,
}

/// A pre-chat field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Field {
    pub key: String,
    pub label: String,
    pub personal: bool,
    pub purpose: String,
    pub required: bool,
}

/// Opening hours.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hours {
    pub time_zone: String,
    pub intervals: Vec<Interval>,
}

/// One opening interval.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Interval {
    pub weekday: i32,
    pub open: String,
    pub close: String,
}

impl Settings {
    /// Whether `origin` (a browser's `Origin` header) may embed the widget.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .filter_map(|entry| AllowedOrigin::parse(entry))
            .any(|entry| entry.allows(origin))
    }

    /// The declared field with `key`.
    pub fn field(&self, key: &str) -> Option<&Field> {
        self.pre_chat_fields.iter().find(|field| field.key == key)
    }

    /// The languages the texts come in, the widget's own first.
    pub fn languages(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.language.as_str())
            .chain(self.translations.iter().map(|t| t.language.as_str()))
    }

    /// The texts in `language`; what a translation leaves out (or all, without one) in the
    /// widget's own language.
    pub fn texts(&self, language: &str) -> Texts {
        let fields = self.pre_chat_fields.iter().map(Field::to_proto);
        let or_own = |translated: &str, own: &str| {
            if translated.is_empty() {
                own
            } else {
                translated
            }
            .to_owned()
        };
        match self.translations.iter().find(|t| t.language == language) {
            Some(t) => Texts {
                welcome_message: or_own(&t.welcome_message, &self.welcome_message),
                offline_message: or_own(&t.offline_message, &self.offline_message),
                pre_chat_fields: fields
                    .map(|mut field| {
                        if let Some(text) = t.fields.iter().find(|f| f.key == field.key) {
                            field.label.clone_from(&text.label);
                            field.purpose.clone_from(&text.purpose);
                        }
                        field
                    })
                    .collect(),
            },
            None => Texts {
                welcome_message: self.welcome_message.clone(),
                offline_message: self.offline_message.clone(),
                pre_chat_fields: fields.collect(),
            },
        }
    }

    pub fn to_proto(&self, lifetime_days: i32) -> pb::WidgetSettings {
        pb::WidgetSettings {
            name: self.name.clone(),
            allowed_origins: self.allowed_origins.clone(),
            privacy_policy_url: self.privacy_policy_url.clone(),
            pre_chat_fields: self.pre_chat_fields.iter().map(Field::to_proto).collect(),
            welcome_message: self.welcome_message.clone(),
            offline_message: self.offline_message.clone(),
            business_hours: Some(self.business_hours.to_proto()),
            visit_lifetime_days: lifetime_days,
            allow_anonymous_chat: self.allow_anonymous_chat,
            agent_user_ids: self.agents.iter().map(Uuid::to_string).collect(),
            remember_visitors: self.remember_visitors,
            language: self.language.clone(),
            translations: self
                .translations
                .iter()
                .map(|t| pb::WidgetTranslation {
                    language: t.language.clone(),
                    welcome_message: t.welcome_message.clone(),
                    offline_message: t.offline_message.clone(),
                    pre_chat_fields: t
                        .fields
                        .iter()
                        .map(|f| pb::PreChatFieldText {
                            key: f.key.clone(),
                            label: f.label.clone(),
                            purpose: f.purpose.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl Field {
    pub fn to_proto(&self) -> pb::PreChatField {
        pb::PreChatField {
            key: self.key.clone(),
            label: self.label.clone(),
            personal: self.personal,
            purpose: self.purpose.clone(),
            required: self.required,
        }
    }
}

impl Hours {
    /// Whether `weekday` (1 = Monday) at `clock` ("HH:MM", local time) is within the hours;
    /// without intervals, always.
    pub fn open_at(&self, weekday: i32, clock: &str) -> bool {
        self.intervals.is_empty()
            || self.intervals.iter().any(|i| {
                // Zero-padded "HH:MM" strings compare like the times they are.
                i.weekday == weekday && i.open.as_str() <= clock && clock < i.close.as_str()
            })
    }

    /// Whether the hours are open now, by PostgreSQL's time zone database (the zone was
    /// checked against it when the widget was saved; none: UTC).
    pub async fn open_now(&self, conn: &mut AsyncPgConnection) -> Result<bool, Error> {
        if self.intervals.is_empty() {
            return Ok(true);
        }
        #[derive(QueryableByName)]
        struct Local {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            weekday: i32,
            #[diesel(sql_type = diesel::sql_types::Text)]
            clock: String,
        }
        let zone = if self.time_zone.is_empty() {
            "UTC"
        } else {
            self.time_zone.as_str()
        };
        let local: Local = diesel::sql_query(
            "SELECT extract(isodow FROM now() AT TIME ZONE $1)::int4 AS weekday, \
                    to_char(now() AT TIME ZONE $1, 'HH24:MI') AS clock",
        )
        .bind::<diesel::sql_types::Text, _>(zone)
        .get_result(conn)
        .await?;
        Ok(self.open_at(local.weekday, &local.clock))
    }

    pub fn to_proto(&self) -> pb::BusinessHours {
        pb::BusinessHours {
            time_zone: self.time_zone.clone(),
            intervals: self
                .intervals
                .iter()
                .map(|i| pb::OpeningInterval {
                    weekday: i.weekday,
                    open: i.open.clone(),
                    close: i.close.clone(),
                })
                .collect(),
        }
    }
}

/// Checks `text` is 1 to `max` characters (`min` 0 allows empty) without control characters
/// other than line breaks.
fn text(field: &str, text: &str, min: usize, max: usize) -> Result<String, Error> {
    let count = text.chars().count();
    if count < min || count > max {
        return Err(Error::invalid(field, format!("{min} to {max} characters")));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\r' && c != '\t')
    {
        return Err(Error::invalid(field, "no control characters"));
    }
    Ok(text.to_owned())
}

/// An ISO 639-1 language code: two lowercase letters.
fn language(field: &str, value: &str) -> Result<String, Error> {
    if value.len() == 2 && value.bytes().all(|b| b.is_ascii_lowercase()) {
        Ok(value.to_owned())
    } else {
        Err(Error::invalid(
            field,
            "an ISO 639-1 language code, two lowercase letters such as de or en",
        ))
    }
}

/// Validates the translations of a widget's texts against its validated `base` texts.
fn translations(
    given: Vec<pb::WidgetTranslation>,
    base: &Settings,
) -> Result<Vec<Translation>, Error> {
    if given.len() > MAX_TRANSLATIONS {
        return Err(Error::invalid("settings.translations", "at most 10"));
    }
    let mut out: Vec<Translation> = Vec::with_capacity(given.len());
    for (i, t) in given.into_iter().enumerate() {
        let at = |name: &str| format!("settings.translations[{i}].{name}");
        let lang = language(&at("language"), &t.language)?;
        if lang == base.language {
            return Err(Error::invalid(
                at("language"),
                "the widget's own language (settings.language)",
            ));
        }
        if out.iter().any(|o| o.language == lang) {
            return Err(Error::invalid(at("language"), "each language once"));
        }
        let welcome = text(&at("welcome_message"), &t.welcome_message, 0, 1000)?;
        let offline = text(&at("offline_message"), &t.offline_message, 0, 1000)?;
        let mut fields: Vec<FieldText> = Vec::with_capacity(base.pre_chat_fields.len());
        for (j, field) in t.pre_chat_fields.iter().enumerate() {
            let at = |name: &str| format!("settings.translations[{i}].pre_chat_fields[{j}].{name}");
            if base.field(&field.key).is_none() {
                return Err(Error::invalid(
                    at("key"),
                    "not one of the widget's pre-chat fields",
                ));
            }
            if fields.iter().any(|f| f.key == field.key) {
                return Err(Error::invalid(at("key"), "each field once"));
            }
            fields.push(FieldText {
                key: field.key.clone(),
                label: text(&at("label"), field.label.trim(), 1, 200)?,
                purpose: text(&at("purpose"), field.purpose.trim(), 1, 500)?,
            });
        }
        fields.sort_by_key(|f| base.pre_chat_fields.iter().position(|b| b.key == f.key));
        out.push(Translation {
            language: lang,
            welcome_message: welcome,
            offline_message: offline,
            fields,
        });
    }
    Ok(out)
}

/// "HH:MM", 24-hour; minutes since midnight.
fn clock(field: &str, value: &str) -> Result<u32, Error> {
    let parsed = value.split_once(':').and_then(|(h, m)| {
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (value.len() == 5 && h < 24 && m < 60).then_some(h * 60 + m)
    });
    parsed.ok_or_else(|| Error::invalid(field, "HH:MM, 24-hour"))
}

/// Validates settings from an admin's request; `max_days` is the tenant's retention period.
/// Returns them with the visit lifetime in days.
pub fn validate(
    settings: Option<pb::WidgetSettings>,
    max_days: i32,
) -> Result<(Settings, i32), Error> {
    let s = settings.ok_or_else(|| Error::invalid("settings", "required"))?;
    let name = text("settings.name", s.name.trim(), 1, 100)?;
    if s.allowed_origins.is_empty() || s.allowed_origins.len() > MAX_ORIGINS {
        return Err(Error::invalid(
            "settings.allowed_origins",
            "1 to 20 origins",
        ));
    }
    for (i, origin) in s.allowed_origins.iter().enumerate() {
        if AllowedOrigin::parse(origin).is_none() {
            return Err(Error::invalid(
                format!("settings.allowed_origins[{i}]"),
                "https://host[:port] or https://*.domain, lowercase, no path",
            ));
        }
    }
    if !valid_https_url(&s.privacy_policy_url) {
        return Err(Error::invalid(
            "settings.privacy_policy_url",
            "required: an https URL of the website's privacy policy",
        ));
    }
    if s.pre_chat_fields.len() > MAX_FIELDS {
        return Err(Error::invalid("settings.pre_chat_fields", "at most 20"));
    }
    let mut fields: Vec<Field> = Vec::with_capacity(s.pre_chat_fields.len());
    for (i, field) in s.pre_chat_fields.iter().enumerate() {
        let at = |name: &str| format!("settings.pre_chat_fields[{i}].{name}");
        let key_ok = (1..=40).contains(&field.key.len())
            && field
                .key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            return Err(Error::invalid(at("key"), "1-40 of a-z, 0-9 and _"));
        }
        if fields.iter().any(|f| f.key == field.key) {
            return Err(Error::invalid(at("key"), "keys must be unique"));
        }
        fields.push(Field {
            key: field.key.clone(),
            label: text(&at("label"), field.label.trim(), 1, 200)?,
            personal: field.personal,
            purpose: text(&at("purpose"), field.purpose.trim(), 1, 500)?,
            required: field.required,
        });
    }
    let hours = s.business_hours.unwrap_or_default();
    let zone_ok = hours.time_zone.is_empty()
        || (hours.time_zone.len() <= 64
            && hours
                .time_zone
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b)));
    if !zone_ok {
        return Err(Error::invalid(
            "settings.business_hours.time_zone",
            "an IANA time zone such as Europe/Berlin",
        ));
    }
    let mut intervals = Vec::with_capacity(hours.intervals.len());
    for (i, interval) in hours.intervals.iter().enumerate() {
        let at = |name: &str| format!("settings.business_hours.intervals[{i}].{name}");
        if !(1..=7).contains(&interval.weekday) {
            return Err(Error::invalid(at("weekday"), "1 (Monday) to 7 (Sunday)"));
        }
        if clock(&at("open"), &interval.open)? >= clock(&at("close"), &interval.close)? {
            return Err(Error::invalid(at("close"), "after open"));
        }
        intervals.push(Interval {
            weekday: interval.weekday,
            open: interval.open.clone(),
            close: interval.close.clone(),
        });
    }
    if s.agent_user_ids.len() > MAX_AGENTS {
        return Err(Error::invalid("settings.agent_user_ids", "at most 50"));
    }
    let mut agents: Vec<Uuid> = Vec::with_capacity(s.agent_user_ids.len());
    for (i, id) in s.agent_user_ids.iter().enumerate() {
        let id = parse_id(&format!("settings.agent_user_ids[{i}]"), id)?;
        if !agents.contains(&id) {
            agents.push(id);
        }
    }
    let lifetime = match s.visit_lifetime_days {
        0 => DEFAULT_LIFETIME_DAYS.min(max_days),
        days if days < 0 => {
            return Err(Error::invalid(
                "settings.visit_lifetime_days",
                "0 (30 days) or a number of days",
            ));
        }
        days if days > max_days => return Err(Error::LifetimeTooLong(max_days)),
        days => days,
    };
    let mut settings = Settings {
        name,
        allowed_origins: s.allowed_origins,
        privacy_policy_url: s.privacy_policy_url,
        pre_chat_fields: fields,
        welcome_message: text("settings.welcome_message", &s.welcome_message, 0, 1000)?,
        offline_message: text("settings.offline_message", &s.offline_message, 0, 1000)?,
        business_hours: Hours {
            time_zone: hours.time_zone,
            intervals,
        },
        allow_anonymous_chat: s.allow_anonymous_chat,
        agents,
        remember_visitors: s.remember_visitors,
        language: match s.language.as_str() {
            "" => default_language(),
            given => language("settings.language", given)?,
        },
        translations: Vec::new(),
    };
    settings.translations = translations(s.translations, &settings)?;
    Ok((settings, lifetime))
}

/// A widget row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = widgets)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct WidgetRow {
    pub id: Uuid,
    pub enabled: bool,
    pub settings: serde_json::Value,
    pub visit_lifetime_days: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The identity secret, sealed under the widget's key ([`identity_context`]).
    pub identity_secret_sealed: Option<Vec<u8>>,
}

/// The associated data of a widget's sealed identity secret.
pub fn identity_context(widget: Uuid) -> Vec<u8> {
    [widget.as_bytes().as_slice(), b"identity secret"].concat()
}

impl WidgetRow {
    /// Its settings; stored ones always parse (they were validated).
    pub fn settings(&self) -> Result<Settings, Error> {
        serde_json::from_value(self.settings.clone())
            .map_err(|_| Error::Bug("stored widget settings do not parse"))
    }
}

/// A consent text row: a version's own text.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = consent_texts)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct ConsentTextRow {
    pub version: i32,
    pub text: String,
    pub text_sha256: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub language: String,
}

/// A consent text version in another language.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = consent_text_translations)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct ConsentTranslationRow {
    pub language: String,
    pub text: String,
    pub text_sha256: Vec<u8>,
}

/// A consent text version in all its languages.
#[derive(Debug, Clone)]
pub struct ConsentVersion {
    pub own: ConsentTextRow,
    pub translations: Vec<ConsentTranslationRow>,
}

impl ConsentVersion {
    pub fn version(&self) -> i32 {
        self.own.version
    }

    /// The text in `language` and its hash, if the version has that language.
    pub fn in_language(&self, language: &str) -> Option<(&str, &[u8])> {
        if self.own.language == language {
            return Some((&self.own.text, &self.own.text_sha256));
        }
        self.translations
            .iter()
            .find(|t| t.language == language)
            .map(|t| (t.text.as_str(), t.text_sha256.as_slice()))
    }

    /// The admins' form: the own text with every translation.
    pub fn to_proto(&self) -> pb::ConsentText {
        pb::ConsentText {
            version: self.own.version,
            text: self.own.text.clone(),
            text_sha256: self.own.text_sha256.clone(),
            create_time: Some(hafen_platform::timestamp(self.own.created_at)),
            language: self.own.language.clone(),
            translations: self
                .translations
                .iter()
                .map(|t| pb::ConsentTranslation {
                    language: t.language.clone(),
                    text: t.text.clone(),
                    text_sha256: t.text_sha256.clone(),
                })
                .collect(),
        }
    }

    /// A visitor's form: the text in `language` alone (the own text if it has none).
    pub fn to_proto_in(&self, language: &str) -> pb::ConsentText {
        let (language, (text, sha)) = match self.in_language(language) {
            Some(found) => (language, found),
            None => (
                self.own.language.as_str(),
                (self.own.text.as_str(), self.own.text_sha256.as_slice()),
            ),
        };
        pb::ConsentText {
            version: self.own.version,
            text: text.to_owned(),
            text_sha256: sha.to_vec(),
            create_time: Some(hafen_platform::timestamp(self.own.created_at)),
            language: language.to_owned(),
            translations: Vec::new(),
        }
    }
}

/// The widget `id` of the tenant in scope.
pub async fn find(conn: &mut AsyncPgConnection, id: Uuid) -> Result<Option<WidgetRow>, Error> {
    Ok(widgets::table
        .find(id)
        .select(WidgetRow::as_select())
        .first(conn)
        .await
        .optional()?)
}

/// The widget's current consent text (its newest version) in all its languages.
pub async fn current_version(
    conn: &mut AsyncPgConnection,
    widget: Uuid,
) -> Result<ConsentVersion, Error> {
    let own = current_text(conn, widget).await?;
    let translations = consent_text_translations::table
        .filter(consent_text_translations::widget_id.eq(widget))
        .filter(consent_text_translations::version.eq(own.version))
        .order(consent_text_translations::language.asc())
        .select(ConsentTranslationRow::as_select())
        .load(conn)
        .await?;
    Ok(ConsentVersion { own, translations })
}

/// The widget's current consent text (its newest version), in its own language.
pub async fn current_text(
    conn: &mut AsyncPgConnection,
    widget: Uuid,
) -> Result<ConsentTextRow, Error> {
    consent_texts::table
        .filter(consent_texts::widget_id.eq(widget))
        .order(consent_texts::version.desc())
        .select(ConsentTextRow::as_select())
        .first(conn)
        .await
        .optional()?
        .ok_or(Error::Bug("a widget without a consent text"))
}

/// A consent text version as given: the text in the widget's language, and translations.
struct NewConsent {
    text: String,
    /// (language, text), validated but for the widget's own language.
    translations: Vec<(String, String)>,
}

impl NewConsent {
    /// Checks the texts; `field` names the text and `translations_field` the translations.
    fn validate(
        field: &str,
        text: &str,
        translations_field: &str,
        translations: Vec<pb::ConsentTranslation>,
    ) -> Result<Self, Error> {
        let text = consent_text(field, text)?;
        if translations.len() > MAX_TRANSLATIONS {
            return Err(Error::invalid(translations_field, "at most 10"));
        }
        let mut out: Vec<(String, String)> = Vec::with_capacity(translations.len());
        for (i, t) in translations.into_iter().enumerate() {
            let lang = language(&format!("{translations_field}[{i}].language"), &t.language)?;
            if out.iter().any(|(l, _)| *l == lang) {
                return Err(Error::invalid(
                    format!("{translations_field}[{i}].language"),
                    "each language once",
                ));
            }
            let text = consent_text(&format!("{translations_field}[{i}].text"), &t.text)?;
            out.push((lang, text));
        }
        Ok(Self {
            text,
            translations: out,
        })
    }

    /// Refuses a translation into the widget's own `language` (that text is the own one).
    fn require_other_than(&self, language: &str, translations_field: &str) -> Result<(), Error> {
        match self.translations.iter().position(|(l, _)| l == language) {
            Some(i) => Err(Error::invalid(
                format!("{translations_field}[{i}].language"),
                "the widget's own language: that text is the version's own",
            )),
            None => Ok(()),
        }
    }
}

fn sha256(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

/// Adds version `version` of `widget`'s consent text, its own text in `language`.
async fn insert_text(
    conn: &mut AsyncPgConnection,
    widget: Uuid,
    version: i32,
    language: &str,
    consent: &NewConsent,
    at: DateTime<Utc>,
) -> Result<ConsentVersion, Error> {
    let own = diesel::insert_into(consent_texts::table)
        .values((
            consent_texts::widget_id.eq(widget),
            consent_texts::version.eq(version),
            consent_texts::text.eq(&consent.text),
            consent_texts::text_sha256.eq(sha256(&consent.text)),
            consent_texts::created_at.eq(at),
            consent_texts::language.eq(language),
        ))
        .returning(ConsentTextRow::as_returning())
        .get_result(conn)
        .await?;
    let rows: Vec<_> = consent
        .translations
        .iter()
        .map(|(lang, text)| {
            (
                consent_text_translations::widget_id.eq(widget),
                consent_text_translations::version.eq(version),
                consent_text_translations::language.eq(lang),
                consent_text_translations::text.eq(text),
                consent_text_translations::text_sha256.eq(sha256(text)),
            )
        })
        .collect();
    let mut translations = if rows.is_empty() {
        Vec::new()
    } else {
        diesel::insert_into(consent_text_translations::table)
            .values(rows)
            .returning(ConsentTranslationRow::as_returning())
            .get_results(conn)
            .await?
    };
    translations.sort_by(|a, b| a.language.cmp(&b.language));
    Ok(ConsentVersion { own, translations })
}

/// The API form of a widget with its current consent text.
fn widget_proto(row: &WidgetRow, text: &ConsentVersion) -> Result<pb::Widget, Error> {
    Ok(pb::Widget {
        widget_id: row.id.to_string(),
        settings: Some(row.settings()?.to_proto(row.visit_lifetime_days)),
        enabled: row.enabled,
        consent_text: Some(text.to_proto()),
        create_time: Some(hafen_platform::timestamp(row.created_at)),
        update_time: Some(hafen_platform::timestamp(row.updated_at)),
        identity_verification: row.identity_secret_sealed.is_some(),
    })
}

/// Refuses a time zone PostgreSQL does not know (the hours are evaluated there).
async fn require_time_zone(conn: &mut AsyncPgConnection, zone: &str) -> Result<(), Error> {
    if zone.is_empty() {
        return Ok(());
    }
    #[derive(QueryableByName)]
    struct Known {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        known: bool,
    }
    let found: Known = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = $1) AS known",
    )
    .bind::<diesel::sql_types::Text, _>(zone)
    .get_result(conn)
    .await?;
    if found.known {
        Ok(())
    } else {
        Err(Error::invalid(
            "settings.business_hours.time_zone",
            "not a known IANA time zone",
        ))
    }
}

/// The agents among `agents` who are active users of the tenant in scope.
pub async fn active_agents(
    conn: &mut AsyncPgConnection,
    agents: &[Uuid],
) -> Result<Vec<Uuid>, Error> {
    if agents.is_empty() {
        return Ok(Vec::new());
    }
    Ok(users::table
        .filter(users::id.eq_any(agents))
        .filter(users::status.eq("active"))
        .select(users::id)
        .load(conn)
        .await?)
}

/// Refuses agents that are not active users of the tenant.
async fn require_agents(conn: &mut AsyncPgConnection, agents: &[Uuid]) -> Result<(), Error> {
    let active = active_agents(conn, agents).await?;
    match agents.iter().position(|agent| !active.contains(agent)) {
        Some(i) => Err(Error::invalid(
            format!("settings.agent_user_ids[{i}]"),
            "not an active user of the organisation",
        )),
        None => Ok(()),
    }
}

fn admin_only(caller: &Principal) -> Result<(), Error> {
    if caller.role.is_admin() {
        Ok(())
    } else {
        Err(Error::PermissionDenied(
            "only admins and the owner configure widgets",
        ))
    }
}

fn consent_text(field: &str, value: &str) -> Result<String, Error> {
    if value.trim().is_empty() {
        return Err(Error::invalid(field, "required"));
    }
    text(field, value, 1, MAX_CONSENT_CHARS)
}

fn widget_event(caller: &Principal, action: &'static str, widget: Uuid) -> Event {
    Event::new(Some(caller.tenant_id), Actor::User(caller.user_id), action).target("widget", widget)
}

impl Service {
    /// The tenant's retention period, the longest a visit may live.
    async fn retention_days(&self, tenant: Uuid) -> Result<i32, Error> {
        let mut conn = self.databases.main_connection().await?;
        let row = hafen_store::control::find(&mut conn, tenant)
            .await?
            .ok_or(Error::Store(hafen_store::Error::UnknownTenant))?;
        let settings = TenantSettings::from_json(&row.settings);
        Ok(i32::try_from(settings.retention_days).unwrap_or(730))
    }

    /// CreateWidget.
    pub async fn create_widget(
        &self,
        caller: &Principal,
        request: pb::CreateWidgetRequest,
    ) -> Result<pb::Widget, Error> {
        admin_only(caller)?;
        let request_id = match request.request_id.as_str() {
            "" => None,
            id => Some(
                Uuid::try_parse(id).map_err(|_| Error::invalid("request_id", "must be a UUID"))?,
            ),
        };
        let max_days = self.retention_days(caller.tenant_id).await?;
        let (settings, lifetime) = validate(request.settings, max_days)?;
        let consent = NewConsent::validate(
            "consent_text",
            &request.consent_text,
            "consent_translations",
            request.consent_translations,
        )?;
        consent.require_other_than(&settings.language, "consent_translations")?;
        let language = settings.language.clone();
        let enabled = request.enabled;
        let stored = serde_json::to_value(&settings)
            .map_err(|_| Error::Bug("widget settings do not serialise"))?;
        let agents = settings.agents.clone();
        let (me, tenant) = (caller.user_id, caller.tenant_id);
        let event_caller = caller.clone();
        // A retry, or agents that are not active users, or an unknown time zone, end here,
        // before a route is written.
        let checked_agents = agents.clone();
        let checked_zone = settings.business_hours.time_zone.clone();
        let existing = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    require_agents(conn, &checked_agents).await?;
                    require_time_zone(conn, &checked_zone).await?;
                    let Some(request_id) = request_id else {
                        return Ok(None);
                    };
                    let found = widgets::table
                        .filter(widgets::create_request_id.eq(request_id))
                        .select(WidgetRow::as_select())
                        .first(conn)
                        .await
                        .optional()?;
                    match found {
                        Some(row) => {
                            let text = current_version(conn, row.id).await?;
                            Ok(Some(widget_proto(&row, &text)?))
                        }
                        None => Ok(None),
                    }
                })
            })
            .await?;
        if let Some(widget) = existing {
            return Ok(widget);
        }
        // The route goes first, in the control plane (the tenant's role has no rights there):
        // a widget is never without its route, and a route whose widget was not created
        // (a failure in between) leads nowhere.
        let id = Uuid::now_v7();
        {
            let mut conn = self.databases.main_connection().await?;
            diesel::insert_into(widget_routes::table)
                .values((
                    widget_routes::widget_id.eq(id),
                    widget_routes::tenant_id.eq(tenant),
                ))
                .execute(&mut conn)
                .await?;
        }
        let widget = self
            .scoped(tenant, move |conn| {
                Box::pin(async move {
                    if let Some(request_id) = request_id
                        && let Some(existing) = widgets::table
                            .filter(widgets::create_request_id.eq(request_id))
                            .select(WidgetRow::as_select())
                            .first(conn)
                            .await
                            .optional()?
                    {
                        let text = current_version(conn, existing.id).await?;
                        return widget_proto(&existing, &text);
                    }
                    require_agents(conn, &agents).await?;
                    let at = now();
                    let row: Option<WidgetRow> = diesel::insert_into(widgets::table)
                        .values((
                            widgets::id.eq(id),
                            widgets::enabled.eq(enabled),
                            widgets::settings.eq(&stored),
                            widgets::visit_lifetime_days.eq(lifetime),
                            widgets::create_request_id.eq(request_id),
                            widgets::created_by.eq(me),
                            widgets::created_at.eq(at),
                            widgets::updated_at.eq(at),
                        ))
                        .on_conflict_do_nothing()
                        .returning(WidgetRow::as_returning())
                        .get_result(conn)
                        .await
                        .optional()?;
                    let Some(row) = row else {
                        // A concurrent call with the same request id made it first.
                        let existing = widgets::table
                            .filter(widgets::create_request_id.eq(request_id))
                            .select(WidgetRow::as_select())
                            .first(conn)
                            .await?;
                        let text = current_version(conn, existing.id).await?;
                        return widget_proto(&existing, &text);
                    };
                    let text = insert_text(conn, id, 1, &language, &consent, at).await?;
                    hafen_events::record(
                        conn,
                        &widget_event(&event_caller, "webchat.widget.created", id)
                            .attribute("enabled", enabled),
                    )
                    .await?;
                    widget_proto(&row, &text)
                })
            })
            .await?;
        self.audited();
        Ok(widget)
    }

    /// UpdateWidget.
    pub async fn update_widget(
        &self,
        caller: &Principal,
        request: pb::UpdateWidgetRequest,
    ) -> Result<pb::Widget, Error> {
        admin_only(caller)?;
        let id = parse_id("widget_id", &request.widget_id)?;
        let max_days = self.retention_days(caller.tenant_id).await?;
        let (settings, lifetime) = validate(request.settings, max_days)?;
        let enabled = request.enabled;
        let stored = serde_json::to_value(&settings)
            .map_err(|_| Error::Bug("widget settings do not serialise"))?;
        let agents = settings.agents.clone();
        let zone = settings.business_hours.time_zone.clone();
        let language = settings.language.clone();
        let event_caller = caller.clone();
        let widget = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    require_agents(conn, &agents).await?;
                    require_time_zone(conn, &zone).await?;
                    let row: WidgetRow = diesel::update(widgets::table.find(id))
                        .set((
                            widgets::enabled.eq(enabled),
                            widgets::settings.eq(&stored),
                            widgets::visit_lifetime_days.eq(lifetime),
                            widgets::updated_at.eq(now()),
                        ))
                        .returning(WidgetRow::as_returning())
                        .get_result(conn)
                        .await
                        .optional()?
                        .ok_or(Error::NotFound("widget"))?;
                    hafen_events::record(
                        conn,
                        &widget_event(&event_caller, "webchat.widget.updated", id)
                            .attribute("enabled", enabled),
                    )
                    .await?;
                    let text = current_version(conn, id).await?;
                    // Visitors who get none of the translations get the widget's language: its
                    // consent text must be there.
                    if text.in_language(&language).is_none() {
                        return Err(Error::invalid(
                            "settings.language",
                            "the current consent text has no version in this language; \
                             publish one with it first",
                        ));
                    }
                    widget_proto(&row, &text)
                })
            })
            .await?;
        self.audited();
        self.widgets.forget(id);
        Ok(widget)
    }

    /// PublishConsentText.
    pub async fn publish_consent_text(
        &self,
        caller: &Principal,
        request: pb::PublishConsentTextRequest,
    ) -> Result<pb::ConsentText, Error> {
        admin_only(caller)?;
        let id = parse_id("widget_id", &request.widget_id)?;
        let consent =
            NewConsent::validate("text", &request.text, "translations", request.translations)?;
        let event_caller = caller.clone();
        let published = self
            .scoped(caller.tenant_id, move |conn| {
                Box::pin(async move {
                    // Locks the widget: two publications get consecutive versions.
                    diesel::update(widgets::table.find(id))
                        .set(widgets::updated_at.eq(now()))
                        .execute(conn)
                        .await?;
                    let widget = find(conn, id).await?.ok_or(Error::NotFound("widget"))?;
                    let language = widget.settings()?.language;
                    consent.require_other_than(&language, "translations")?;
                    let current = current_text(conn, id).await?;
                    let version = current.version + 1;
                    let row = insert_text(conn, id, version, &language, &consent, now()).await?;
                    hafen_events::record(
                        conn,
                        &widget_event(&event_caller, "webchat.consent_text.published", id)
                            .attribute("version", i64::from(version)),
                    )
                    .await?;
                    Ok(row.to_proto())
                })
            })
            .await?;
        self.audited();
        Ok(published)
    }

    /// RotateIdentitySecret: a new secret sealed under the widget's own key (or none).
    pub async fn rotate_identity_secret(
        &self,
        caller: &Principal,
        request: pb::RotateIdentitySecretRequest,
    ) -> Result<pb::RotateIdentitySecretResponse, Error> {
        admin_only(caller)?;
        let id = parse_id("widget_id", &request.widget_id)?;
        let tenant = caller.tenant_id;
        let exists = self
            .scoped(tenant, move |conn| Box::pin(find(conn, id)))
            .await?
            .is_some();
        if !exists {
            return Err(Error::NotFound("widget"));
        }
        let (secret, sealed, action) = if request.disable {
            (
                String::new(),
                None,
                "webchat.widget.identity_secret_removed",
            )
        } else {
            let secret = hafen_crypto::secret::random_token()?;
            let key = self.keys.user_key(tenant, id).await?;
            let sealed = key.seal(&identity_context(id), secret.as_bytes())?;
            (
                secret,
                Some(sealed),
                "webchat.widget.identity_secret_rotated",
            )
        };
        let event = widget_event(caller, action, id);
        self.scoped(tenant, move |conn| {
            Box::pin(async move {
                let changed = diesel::update(widgets::table.find(id))
                    .set((
                        widgets::identity_secret_sealed.eq(sealed),
                        widgets::updated_at.eq(now()),
                    ))
                    .execute(conn)
                    .await?;
                if changed == 0 {
                    return Err(Error::NotFound("widget"));
                }
                // Tokens handed out under the old secret die: each identified visit is
                // resumed with a new signature (and a token derived under the new secret).
                diesel::sql_query(
                    "UPDATE visits SET token_sha256 = \
                         sha256(convert_to('revoked ' || id::text, 'UTF8')) \
                     WHERE widget_id = $1 AND identity_sha256 IS NOT NULL",
                )
                .bind::<diesel::sql_types::Uuid, _>(id)
                .execute(conn)
                .await?;
                hafen_events::record(conn, &event).await?;
                Ok(())
            })
        })
        .await?;
        self.audited();
        self.widgets.forget(id);
        Ok(pb::RotateIdentitySecretResponse { secret })
    }

    /// GetWidget.
    pub async fn get_widget(
        &self,
        caller: &Principal,
        request: pb::GetWidgetRequest,
    ) -> Result<pb::Widget, Error> {
        let id = parse_id("widget_id", &request.widget_id)?;
        admin_only(caller)?;
        self.scoped(caller.tenant_id, move |conn| {
            Box::pin(async move {
                let row = find(conn, id).await?.ok_or(Error::NotFound("widget"))?;
                let text = current_version(conn, id).await?;
                widget_proto(&row, &text)
            })
        })
        .await
    }

    /// ListWidgets: oldest first, after the widget id of the page token; two queries a page.
    pub async fn list_widgets(
        &self,
        caller: &Principal,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<(Vec<pb::Widget>, Option<Uuid>), Error> {
        admin_only(caller)?;
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        self.scoped(caller.tenant_id, move |conn| {
            Box::pin(async move {
                let mut query = widgets::table
                    .order(widgets::id.asc())
                    .select(WidgetRow::as_select())
                    .limit(fetch)
                    .into_boxed();
                if let Some(after) = after {
                    query = query.filter(widgets::id.gt(after));
                }
                let mut rows: Vec<WidgetRow> = query.load(conn).await?;
                let more = rows.len() > limit;
                rows.truncate(limit);
                // Every widget's current text in one query: its newest version.
                let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
                let texts: Vec<(Uuid, ConsentTextRow)> = consent_texts::table
                    .filter(consent_texts::widget_id.eq_any(&ids))
                    .distinct_on(consent_texts::widget_id)
                    .order((consent_texts::widget_id, consent_texts::version.desc()))
                    .select((consent_texts::widget_id, ConsentTextRow::as_select()))
                    .load(conn)
                    .await?;
                let mut texts: std::collections::HashMap<Uuid, ConsentVersion> = texts
                    .into_iter()
                    .map(|(id, own)| {
                        let translations = Vec::new();
                        (id, ConsentVersion { own, translations })
                    })
                    .collect();
                // The current versions' translations (and maybe a few of others, dropped).
                let versions: Vec<i32> = texts.values().map(ConsentVersion::version).collect();
                let translations: Vec<(Uuid, i32, ConsentTranslationRow)> =
                    consent_text_translations::table
                        .filter(consent_text_translations::widget_id.eq_any(&ids))
                        .filter(consent_text_translations::version.eq_any(&versions))
                        .order(consent_text_translations::language.asc())
                        .select((
                            consent_text_translations::widget_id,
                            consent_text_translations::version,
                            ConsentTranslationRow::as_select(),
                        ))
                        .load(conn)
                        .await?;
                for (widget, version, translation) in translations {
                    if let Some(current) = texts.get_mut(&widget)
                        && current.version() == version
                    {
                        current.translations.push(translation);
                    }
                }
                let mut out = Vec::with_capacity(rows.len());
                for row in &rows {
                    let text = texts
                        .get(&row.id)
                        .ok_or(Error::Bug("a widget without a consent text"))?;
                    out.push(widget_proto(row, text)?);
                }
                let next = if more {
                    rows.last().map(|r| r.id)
                } else {
                    None
                };
                Ok((out, next))
            })
        })
        .await
    }
}

/// A UUID field.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, Error> {
    Uuid::try_parse(value).map_err(|_| Error::invalid(field, "must be a UUID"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> pb::WidgetSettings {
        pb::WidgetSettings {
            name: "Shop".into(),
            allowed_origins: vec!["https://shop.example.com".into()],
            privacy_policy_url: "https://shop.example.com/privacy".into(),
            pre_chat_fields: vec![pb::PreChatField {
                key: "email".into(),
                label: "E-mail".into(),
                personal: true,
                purpose: "To answer you by e-mail".into(),
                required: false,
            }],
            ..Default::default()
        }
    }

    fn field_of(result: Result<(Settings, i32), Error>) -> String {
        match result {
            Err(Error::InvalidField { field, .. }) => field,
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn cb7_a_widget_needs_a_privacy_link_and_every_bad_setting_is_named() {
        let (valid, lifetime) = validate(Some(settings()), 730).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(lifetime, 30);
        assert_eq!(valid.pre_chat_fields.len(), 1);

        let mut s = settings();
        s.privacy_policy_url = String::new();
        assert_eq!(
            field_of(validate(Some(s), 730)),
            "settings.privacy_policy_url"
        );
        let mut s = settings();
        s.allowed_origins.push("http://shop.example.com".into());
        assert_eq!(
            field_of(validate(Some(s), 730)),
            "settings.allowed_origins[1]"
        );
        let mut s = settings();
        s.pre_chat_fields[0].key = "E-Mail".into();
        assert_eq!(
            field_of(validate(Some(s), 730)),
            "settings.pre_chat_fields[0].key"
        );
        let mut s = settings();
        s.business_hours = Some(pb::BusinessHours {
            time_zone: "Europe/Berlin".into(),
            intervals: vec![pb::OpeningInterval {
                weekday: 1,
                open: "18:00".into(),
                close: "09:00".into(),
            }],
        });
        assert_eq!(
            field_of(validate(Some(s), 730)),
            "settings.business_hours.intervals[0].close"
        );
        let mut s = settings();
        s.visit_lifetime_days = 90;
        assert!(matches!(
            validate(Some(s), 60),
            Err(Error::LifetimeTooLong(60))
        ));
        assert_eq!(field_of(validate(None, 730)), "settings");
    }

    #[test]
    fn business_hours_are_open_from_open_until_before_close_on_their_weekday() {
        let hours = Hours {
            time_zone: "Europe/Berlin".into(),
            intervals: vec![
                Interval {
                    weekday: 1,
                    open: "09:00".into(),
                    close: "12:30".into(),
                },
                Interval {
                    weekday: 1,
                    open: "13:30".into(),
                    close: "17:00".into(),
                },
            ],
        };
        assert!(!hours.open_at(1, "08:59"));
        assert!(hours.open_at(1, "09:00"));
        assert!(hours.open_at(1, "12:29"));
        assert!(!hours.open_at(1, "12:30"), "closed at close");
        assert!(hours.open_at(1, "16:59"));
        assert!(!hours.open_at(2, "10:00"), "another weekday");
        assert!(
            Hours::default().open_at(7, "03:00"),
            "no hours: always open"
        );
    }
}
