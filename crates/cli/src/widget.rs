//! `hafen admin widget …`: the website chat's widgets of my organisation (admins and the
//! owner), on `hafen.webchat.v1.WidgetService`.

use hafen_sdk::Hafen;
use hafen_sdk::proto::webchat::v1 as pb;
use serde_json::{Value, json};

use crate::chat::user_id;
use crate::client::{ClientArgs, Failure, Outcome, time};

/// `hafen admin widget`.
#[derive(clap::Subcommand, Debug)]
pub enum WidgetCommand {
    /// Create a widget. It serves visitors once it is enabled (--enabled) and the
    /// organisation's webchat feature is on (`hafen admin widget feature on`).
    Create {
        #[command(flatten)]
        settings: SettingsArgs,
        /// The first consent text, shown before any personal field is asked, in the widget's
        /// language (--language).
        #[arg(long, env = "HAFEN_WIDGET_CONSENT_TEXT")]
        consent_text: String,
        /// The first consent text in another language, `LANG=TEXT` such as `de=Wir speichern …`
        /// (repeatable).
        #[arg(
            long = "consent-translation",
            value_name = "LANG=TEXT",
            env = "HAFEN_WIDGET_CONSENT_TRANSLATIONS"
        )]
        consent_translations: Vec<String>,
        /// Serve visitors at once.
        #[arg(long, env = "HAFEN_WIDGET_ENABLED")]
        enabled: bool,
    },
    /// Change a widget: only the settings given change (a repeatable option given replaces
    /// the whole list).
    Update {
        /// The widget's id.
        widget: String,
        #[command(flatten)]
        settings: SettingsArgs,
        /// Serve visitors.
        #[arg(long, conflicts_with = "disable", env = "HAFEN_WIDGET_ENABLE")]
        enable: bool,
        /// Stop serving visitors (their data rights keep working).
        #[arg(long, env = "HAFEN_WIDGET_DISABLE")]
        disable: bool,
    },
    /// Publish a new consent text version; visitors answer it anew before personal fields.
    ConsentText {
        /// The widget's id.
        widget: String,
        /// The text, in the widget's language.
        text: String,
        /// The same text in another language, `LANG=TEXT` (repeatable). A language the
        /// version lacks is not offered to visitors.
        #[arg(
            long = "translation",
            value_name = "LANG=TEXT",
            env = "HAFEN_WIDGET_CONSENT_TRANSLATIONS"
        )]
        translations: Vec<String>,
    },
    /// Set the widget's texts in another language (replacing its translation into it), or
    /// remove that translation. Visitors whose browser asks for the language get it once the
    /// current consent text has it too (`consent-text … --translation LANG=TEXT`); what is
    /// left out shows in the widget's own language.
    Translation {
        /// The widget's id.
        widget: String,
        /// The language, ISO 639-1 (`de`, `en`, …).
        language: String,
        /// The welcome message in it.
        #[arg(
            long,
            conflicts_with = "remove",
            env = "HAFEN_WIDGET_TRANSLATION_WELCOME"
        )]
        welcome: Option<String>,
        /// The offline message in it.
        #[arg(
            long,
            conflicts_with = "remove",
            env = "HAFEN_WIDGET_TRANSLATION_OFFLINE"
        )]
        offline: Option<String>,
        /// A pre-chat field's texts in it, `key|label|purpose` (repeatable).
        #[arg(
            long = "field",
            conflicts_with = "remove",
            env = "HAFEN_WIDGET_TRANSLATION_FIELDS"
        )]
        fields: Vec<String>,
        /// Remove the translation.
        #[arg(long, env = "HAFEN_WIDGET_TRANSLATION_REMOVE")]
        remove: bool,
    },
    /// Make a new identity secret (printed once) for the website's server to sign its
    /// logged-in users' ids with, so a person keeps one visit on every device; the previous
    /// secret stops working. With --disable, signed identities are ignored from now on.
    IdentitySecret {
        /// The widget's id.
        widget: String,
        /// Remove the secret instead.
        #[arg(long, env = "HAFEN_WIDGET_IDENTITY_DISABLE")]
        disable: bool,
    },
    /// List the widgets.
    List,
    /// Show one widget with its settings and current consent text.
    Show {
        /// The widget's id.
        widget: String,
    },
    /// Switch the organisation's webchat feature on or off (off by default; widgets serve
    /// visitors only while it is on).
    Feature {
        /// `on` or `off`.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

/// A widget's settings on the command line; on update, options not given keep their value.
#[derive(clap::Args, Debug)]
pub struct SettingsArgs {
    /// A name for admins.
    #[arg(long, env = "HAFEN_WIDGET_NAME")]
    name: Option<String>,
    /// The language of the widget's texts and consent text, ISO 639-1 (`en` when not given
    /// on create); `translation` adds others.
    #[arg(long, env = "HAFEN_WIDGET_LANGUAGE")]
    language: Option<String>,
    /// An origin the widget may be embedded in, `https://host[:port]` or `https://*.domain`
    /// (repeatable).
    #[arg(long = "origin", env = "HAFEN_WIDGET_ORIGINS", value_delimiter = ',')]
    origins: Vec<String>,
    /// The website's privacy policy (https URL), shown by the widget.
    #[arg(long, env = "HAFEN_WIDGET_PRIVACY_URL")]
    privacy_url: Option<String>,
    /// A pre-chat field, `key|label|purpose` followed by `|personal` and/or `|required`,
    /// e.g. `email|E-mail|To answer by e-mail|personal` (repeatable).
    #[arg(long = "field", env = "HAFEN_WIDGET_FIELDS")]
    fields: Vec<String>,
    /// An agent who answers the widget's chats: username or user id (repeatable).
    #[arg(long = "agent", env = "HAFEN_WIDGET_AGENTS", value_delimiter = ',')]
    agents: Vec<String>,
    /// Shown when the chat opens.
    #[arg(long, env = "HAFEN_WIDGET_WELCOME")]
    welcome: Option<String>,
    /// Shown outside business hours or when no agent is available.
    #[arg(long, env = "HAFEN_WIDGET_OFFLINE")]
    offline: Option<String>,
    /// Whether a visitor who declines consent may still chat, without personal fields.
    #[arg(long, env = "HAFEN_WIDGET_ANONYMOUS")]
    anonymous: Option<bool>,
    /// Return visits: with consent, the widget keeps the visit in the browser's localStorage,
    /// so a visitor coming back within the visit lifetime resumes the chat.
    #[arg(long, env = "HAFEN_WIDGET_REMEMBER_VISITORS")]
    remember_visitors: Option<bool>,
    /// Days a visit lives after its last use (1 to the organisation's retention period).
    #[arg(long, env = "HAFEN_WIDGET_LIFETIME_DAYS")]
    lifetime_days: Option<i32>,
    /// Time zone of the business hours (IANA, e.g. `Europe/Berlin`).
    #[arg(long, env = "HAFEN_WIDGET_TIME_ZONE")]
    time_zone: Option<String>,
    /// Opening hours, `DAYS=HH:MM-HH:MM` with DAYS as `mon`, `mon-fri`, … (repeatable; none
    /// given on create: always open).
    #[arg(long = "open", env = "HAFEN_WIDGET_OPEN")]
    open: Vec<String>,
    /// Remove the opening hours: always open.
    #[arg(long, conflicts_with = "open", env = "HAFEN_WIDGET_ALWAYS_OPEN")]
    always_open: bool,
}

impl SettingsArgs {
    /// `base` with the options given applied.
    async fn apply(
        self,
        hafen: &Hafen,
        mut base: pb::WidgetSettings,
    ) -> Result<pb::WidgetSettings, Failure> {
        if let Some(name) = self.name {
            base.name = name;
        }
        if !self.origins.is_empty() {
            base.allowed_origins = self.origins;
        }
        if let Some(url) = self.privacy_url {
            base.privacy_policy_url = url;
        }
        if let Some(language) = self.language {
            base.language = language;
        }
        if !self.fields.is_empty() {
            base.pre_chat_fields = self
                .fields
                .iter()
                .map(|f| field(f))
                .collect::<Result<_, _>>()?;
            // Translations of fields that are gone go with them.
            let keys: Vec<String> = base.pre_chat_fields.iter().map(|f| f.key.clone()).collect();
            for translation in &mut base.translations {
                translation
                    .pre_chat_fields
                    .retain(|f| keys.contains(&f.key));
            }
        }
        if !self.agents.is_empty() {
            let mut ids = Vec::new();
            for agent in &self.agents {
                ids.push(user_id(hafen, agent).await?);
            }
            base.agent_user_ids = ids;
        }
        if let Some(welcome) = self.welcome {
            base.welcome_message = welcome;
        }
        if let Some(offline) = self.offline {
            base.offline_message = offline;
        }
        if let Some(anonymous) = self.anonymous {
            base.allow_anonymous_chat = anonymous;
        }
        if let Some(remember) = self.remember_visitors {
            base.remember_visitors = remember;
        }
        if let Some(days) = self.lifetime_days {
            base.visit_lifetime_days = days;
        }
        let hours = base.business_hours.get_or_insert_with(Default::default);
        if let Some(zone) = self.time_zone {
            hours.time_zone = zone;
        }
        if self.always_open {
            hours.intervals = Vec::new();
        }
        if !self.open.is_empty() {
            hours.intervals = Vec::new();
            for open in &self.open {
                hours.intervals.extend(opening(open)?);
            }
        }
        Ok(base)
    }
}

/// `key|label|purpose[|personal][|required]`.
fn field(spec: &str) -> Result<pb::PreChatField, Failure> {
    let mut parts = spec.split('|');
    let (Some(key), Some(label), Some(purpose)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Failure::usage(
            "--field: key|label|purpose, then |personal and/or |required",
        ));
    };
    let mut field = pb::PreChatField {
        key: key.trim().to_owned(),
        label: label.trim().to_owned(),
        purpose: purpose.trim().to_owned(),
        ..Default::default()
    };
    for flag in parts {
        match flag.trim() {
            "personal" => field.personal = true,
            "required" => field.required = true,
            _ => return Err(Failure::usage("--field: flags are |personal and |required")),
        }
    }
    Ok(field)
}

/// `key|label|purpose` of a translation.
fn field_text(spec: &str) -> Result<pb::PreChatFieldText, Failure> {
    let mut parts = spec.split('|').map(str::trim);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(key), Some(label), Some(purpose), None) => Ok(pb::PreChatFieldText {
            key: key.to_owned(),
            label: label.to_owned(),
            purpose: purpose.to_owned(),
        }),
        _ => Err(Failure::usage("--field: key|label|purpose")),
    }
}

/// `LANG=TEXT` pairs.
fn consent_translations(
    option: &str,
    specs: Vec<String>,
) -> Result<Vec<pb::ConsentTranslation>, Failure> {
    specs
        .into_iter()
        .map(|spec| match spec.split_once('=') {
            Some((language, text)) => Ok(pb::ConsentTranslation {
                language: language.trim().to_owned(),
                text: text.to_owned(),
                ..Default::default()
            }),
            None => Err(Failure::usage(format!(
                "{option}: LANG=TEXT, e.g. de=Wir …"
            ))),
        })
        .collect()
}

const WEEKDAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// `mon-fri=09:00-17:00` as one interval per day.
fn opening(spec: &str) -> Result<Vec<pb::OpeningInterval>, Failure> {
    let bad = || Failure::usage("--open: DAYS=HH:MM-HH:MM, e.g. mon-fri=09:00-17:00");
    let (days, hours) = spec.split_once('=').ok_or_else(bad)?;
    let (open, close) = hours.split_once('-').ok_or_else(bad)?;
    let day = |name: &str| {
        WEEKDAYS
            .iter()
            .position(|d| d.eq_ignore_ascii_case(name.trim()))
            .ok_or_else(bad)
    };
    let (first, last) = match days.split_once('-') {
        Some((first, last)) => (day(first)?, day(last)?),
        None => (day(days)?, day(days)?),
    };
    if last < first {
        return Err(bad());
    }
    Ok((first..=last)
        .map(|d| pb::OpeningInterval {
            weekday: i32::try_from(d + 1).unwrap_or(1),
            open: open.trim().to_owned(),
            close: close.trim().to_owned(),
        })
        .collect())
}

/// `hafen admin widget …`.
pub async fn run(client: &ClientArgs, command: WidgetCommand) -> Outcome {
    let hafen = client.logged_in().await?;
    match command {
        WidgetCommand::Create {
            settings,
            consent_text,
            consent_translations: translations,
            enabled,
        } => {
            let consent_translations = consent_translations("--consent-translation", translations)?;
            let settings = settings.apply(&hafen, Default::default()).await?;
            let result = hafen
                .widgets()
                .create_widget(pb::CreateWidgetRequest {
                    settings: Some(settings),
                    enabled,
                    consent_text,
                    request_id: uuid::Uuid::new_v4().to_string(),
                    consent_translations,
                })
                .await;
            let widget = hafen.check(result).await?;
            client.print(widget_json(&widget), || {
                format!("Created widget {}.\n{}", widget.widget_id, embed(&widget))
            });
        }
        WidgetCommand::Update {
            widget,
            settings,
            enable,
            disable,
        } => {
            let current = get(&hafen, &widget).await?;
            let settings = settings
                .apply(&hafen, current.settings.unwrap_or_default())
                .await?;
            let result = hafen
                .widgets()
                .update_widget(pb::UpdateWidgetRequest {
                    widget_id: widget,
                    settings: Some(settings),
                    enabled: (current.enabled || enable) && !disable,
                })
                .await;
            let widget = hafen.check(result).await?;
            client.print(widget_json(&widget), || widget_text(&widget));
        }
        WidgetCommand::ConsentText {
            widget,
            text,
            translations,
        } => {
            let translations = consent_translations("--translation", translations)?;
            let result = hafen
                .widgets()
                .publish_consent_text(pb::PublishConsentTextRequest {
                    widget_id: widget,
                    text,
                    translations,
                })
                .await;
            let text = hafen.check(result).await?;
            client.print(consent_text_json(&text), || {
                format!("Published consent text version {}.", text.version)
            });
        }
        WidgetCommand::Translation {
            widget,
            language,
            welcome,
            offline,
            fields,
            remove,
        } => {
            let fields = fields
                .iter()
                .map(|f| field_text(f))
                .collect::<Result<Vec<_>, _>>()?;
            let current = get(&hafen, &widget).await?;
            let mut settings = current.settings.unwrap_or_default();
            settings.translations.retain(|t| t.language != language);
            if !remove {
                settings.translations.push(pb::WidgetTranslation {
                    language,
                    welcome_message: welcome.unwrap_or_default(),
                    offline_message: offline.unwrap_or_default(),
                    pre_chat_fields: fields,
                });
            }
            let result = hafen
                .widgets()
                .update_widget(pb::UpdateWidgetRequest {
                    widget_id: widget,
                    settings: Some(settings),
                    enabled: current.enabled,
                })
                .await;
            let widget = hafen.check(result).await?;
            client.print(widget_json(&widget), || widget_text(&widget));
        }
        WidgetCommand::IdentitySecret { widget, disable } => {
            let result = hafen
                .widgets()
                .rotate_identity_secret(pb::RotateIdentitySecretRequest {
                    widget_id: widget,
                    disable,
                })
                .await;
            let rotated = hafen.check(result).await?;
            client.print(json!({"secret": rotated.secret}), || {
                if disable {
                    "Signed identities are ignored from now on.".to_owned()
                } else {
                    format!(
                        "Identity secret (shown once; keep it on the website's server): {}\n\
                         Sign with the lowercase hex HMAC-SHA256 of the user's id under it.",
                        rotated.secret
                    )
                }
            });
        }
        WidgetCommand::List => {
            let mut widgets = Vec::new();
            let mut page_token = String::new();
            loop {
                let result = hafen
                    .widgets()
                    .list_widgets(pb::ListWidgetsRequest {
                        page_size: 100,
                        page_token: page_token.clone(),
                    })
                    .await;
                let page = hafen.check(result).await?;
                widgets.extend(page.widgets);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            client.print(
                Value::Array(widgets.iter().map(widget_json).collect()),
                || {
                    widgets
                        .iter()
                        .map(|w| {
                            let s = w.settings.clone().unwrap_or_default();
                            format!(
                                "{}  {:<20} {:<8} {}",
                                w.widget_id,
                                s.name,
                                if w.enabled { "enabled" } else { "disabled" },
                                s.allowed_origins.join(" ")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            );
        }
        WidgetCommand::Show { widget } => {
            let widget = get(&hafen, &widget).await?;
            client.print(widget_json(&widget), || widget_text(&widget));
        }
        WidgetCommand::Feature { state } => {
            let on = state == "on";
            hafen.set_webchat_feature(on).await?;
            client.print(json!({"webchat": on}), || {
                format!("The webchat feature is {state}.")
            });
        }
    }
    Ok(())
}

async fn get(hafen: &Hafen, widget: &str) -> Result<pb::Widget, Failure> {
    let result = hafen
        .widgets()
        .get_widget(pb::GetWidgetRequest {
            widget_id: widget.to_owned(),
        })
        .await;
    Ok(hafen.check(result).await?)
}

fn consent_text_json(t: &pb::ConsentText) -> Value {
    json!({
        "version": t.version,
        "language": t.language,
        "text": t.text,
        "text_sha256": hex::encode(&t.text_sha256),
        "create_time": time(t.create_time.as_ref()),
        "translations": t.translations.iter().map(|t| json!({
            "language": t.language,
            "text": t.text,
            "text_sha256": hex::encode(&t.text_sha256),
        })).collect::<Vec<_>>(),
    })
}

fn widget_json(w: &pb::Widget) -> Value {
    let s = w.settings.clone().unwrap_or_default();
    let hours = s.business_hours.unwrap_or_default();
    json!({
        "widget_id": w.widget_id,
        "enabled": w.enabled,
        "name": s.name,
        "allowed_origins": s.allowed_origins,
        "privacy_policy_url": s.privacy_policy_url,
        "pre_chat_fields": s.pre_chat_fields.iter().map(|f| json!({
            "key": f.key, "label": f.label, "personal": f.personal,
            "purpose": f.purpose, "required": f.required,
        })).collect::<Vec<_>>(),
        "welcome_message": s.welcome_message,
        "offline_message": s.offline_message,
        "business_hours": {
            "time_zone": hours.time_zone,
            "intervals": hours.intervals.iter().map(|i| json!({
                "weekday": i.weekday, "open": i.open, "close": i.close,
            })).collect::<Vec<_>>(),
        },
        "visit_lifetime_days": s.visit_lifetime_days,
        "allow_anonymous_chat": s.allow_anonymous_chat,
        "remember_visitors": s.remember_visitors,
        "language": s.language,
        "translations": s.translations.iter().map(|t| json!({
            "language": t.language,
            "welcome_message": t.welcome_message,
            "offline_message": t.offline_message,
            "pre_chat_fields": t.pre_chat_fields.iter().map(|f| json!({
                "key": f.key, "label": f.label, "purpose": f.purpose,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "agent_user_ids": s.agent_user_ids,
        "identity_verification": w.identity_verification,
        "consent_text": w.consent_text.as_ref().map(consent_text_json),
        "create_time": time(w.create_time.as_ref()),
        "update_time": time(w.update_time.as_ref()),
    })
}

fn widget_text(w: &pb::Widget) -> String {
    let s = w.settings.clone().unwrap_or_default();
    let mut out = vec![
        format!(
            "Widget {} ({}), {}",
            w.widget_id,
            s.name,
            if w.enabled { "enabled" } else { "disabled" }
        ),
        format!("Origins: {}", s.allowed_origins.join(" ")),
        format!(
            "Languages: {}",
            std::iter::once(s.language.as_str())
                .chain(s.translations.iter().map(|t| t.language.as_str()))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        format!("Privacy policy: {}", s.privacy_policy_url),
        format!(
            "Agents: {}; anonymous chat {}; visits live {} days{}",
            s.agent_user_ids.len(),
            if s.allow_anonymous_chat {
                "allowed"
            } else {
                "not allowed"
            },
            s.visit_lifetime_days,
            if s.remember_visitors {
                ", remembered in the browser for return visits"
            } else {
                ""
            }
        ),
    ];
    for f in &s.pre_chat_fields {
        out.push(format!(
            "Field {} ({}{}{}): {}",
            f.key,
            f.label,
            if f.personal { ", personal" } else { "" },
            if f.required { ", required" } else { "" },
            f.purpose
        ));
    }
    if let Some(text) = &w.consent_text {
        out.push(format!(
            "Consent text v{} ({}): {}",
            text.version, text.language, text.text
        ));
        for t in &text.translations {
            out.push(format!("  ({}): {}", t.language, t.text));
        }
    }
    out.join("\n")
}

fn embed(w: &pb::Widget) -> String {
    format!(
        "Visitors: `hafen visit start {}` (the widget id is public).",
        w.widget_id
    )
}
