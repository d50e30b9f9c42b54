//! The website chat against real PostgreSQL and Redis over TLS: widgets, anonymous visits,
//! consent records and released fields (CB2, CB7, CB8, UL3, UL5).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use hafen_platform::status;
use hafen_proto::webchat::v1 as pb;
use hafen_testkit::{TestStack, TestTenant, with_token};
use std::time::Duration;

use tonic::Code;

const ORIGIN: &str = "https://shop.example.com";

struct Setup {
    stack: TestStack,
    tenant: TestTenant,
    owner: String,
}

async fn setup() -> Setup {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("shop").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let s = Setup {
        stack,
        tenant,
        owner,
    };
    s.webchat_feature(true).await;
    s
}

fn settings() -> pb::WidgetSettings {
    pb::WidgetSettings {
        name: "Shop".into(),
        allowed_origins: vec![ORIGIN.into(), "https://*.example.org".into()],
        privacy_policy_url: "https://shop.example.com/privacy".into(),
        pre_chat_fields: vec![
            pb::PreChatField {
                key: "email".into(),
                label: "E-mail".into(),
                personal: true,
                purpose: "To answer by e-mail".into(),
                required: false,
            },
            pb::PreChatField {
                key: "topic".into(),
                label: "Topic".into(),
                personal: false,
                purpose: "To route the chat".into(),
                required: true,
            },
        ],
        welcome_message: "Hello!".into(),
        allow_anonymous_chat: true,
        ..Default::default()
    }
}

/// A request from a browser on `origin`.
fn from<T>(origin: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("origin", origin.parse().unwrap());
    request
}

/// A visitor's request from the shop's pages.
fn visitor<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = from(ORIGIN, message);
    request
        .metadata_mut()
        .insert("authorization", format!("Visitor {token}").parse().unwrap());
    request
}

fn reason(status: &tonic::Status) -> String {
    status::reason(status).unwrap_or_default()
}

fn field(status: &tonic::Status) -> String {
    status::metadata(status, "field").unwrap_or_default()
}

impl Setup {
    async fn webchat_feature(&self, on: bool) {
        self.stack.set_webchat_feature(&self.owner, on).await;
    }

    async fn widget(&self, enabled: bool) -> pb::Widget {
        self.stack
            .widget_client()
            .await
            .create_widget(with_token(
                &self.owner,
                pb::CreateWidgetRequest {
                    settings: Some(settings()),
                    enabled,
                    consent_text: "We store what you give us to answer you.".into(),
                    request_id: String::new(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// An enabled widget with `settings` answered by a new member, "agent"; and the agent's
    /// access token.
    async fn widget_with_agent(&self, mut settings: pb::WidgetSettings) -> (pb::Widget, String) {
        let (agent, session) = self
            .stack
            .create_logged_in_member(&self.tenant, &self.owner, "agent", "agent password 1")
            .await;
        settings.agent_user_ids = vec![agent.user_id];
        let widget = self
            .stack
            .widget_client()
            .await
            .create_widget(with_token(
                &self.owner,
                pb::CreateWidgetRequest {
                    settings: Some(settings),
                    enabled: true,
                    consent_text: "Consent".into(),
                    request_id: String::new(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        (widget, session.access_token)
    }

    async fn visit(&self, widget: &pb::Widget) -> pb::StartVisitResponse {
        self.stack
            .visitor_client()
            .await
            .start_visit(from(
                ORIGIN,
                pb::StartVisitRequest {
                    widget_id: widget.widget_id.clone(),
                    visitor_token: String::new(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn consent(&self, token: &str, version: i32, granted: bool) -> pb::ConsentRecord {
        self.stack
            .visitor_client()
            .await
            .give_consent(visitor(
                token,
                pb::GiveConsentRequest {
                    version,
                    granted,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
    }

    async fn submit(
        &self,
        token: &str,
        fields: &[(&str, &str, bool)],
    ) -> Result<pb::SubmitFieldsResponse, tonic::Status> {
        self.stack
            .visitor_client()
            .await
            .submit_fields(visitor(
                token,
                pb::SubmitFieldsRequest {
                    fields: fields
                        .iter()
                        .map(|(key, value, released)| pb::FieldValue {
                            key: (*key).into(),
                            value: (*value).into(),
                            released: *released,
                        })
                        .collect(),
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// The id of the agent's (first) website chat, as ListConversations shows it.
    async fn agent_chat(&self, agent: &str) -> String {
        use hafen_proto::messaging::v1 as msg_pb;
        self.stack
            .messaging_client()
            .await
            .list_conversations(with_token(
                agent,
                msg_pb::ListConversationsRequest::default(),
            ))
            .await
            .unwrap()
            .into_inner()
            .conversations
            .into_iter()
            .find(|c| c.kind == msg_pb::ConversationKind::Webchat as i32)
            .expect("the agent's website chat")
            .conversation_id
    }

    /// The id of the chat of visit `visit`, as the database holds it.
    async fn chat_of(&self, visit: &str) -> String {
        #[derive(QueryableByName)]
        struct Chat {
            #[diesel(sql_type = Text)]
            id: String,
        }
        let schema = format!("t_{}", self.tenant.id.replace('-', ""));
        let chat: Chat = diesel::sql_query(format!(
            "SELECT conversation_id::text AS id FROM {schema}.visits WHERE id = '{visit}'"
        ))
        .get_result(&mut self.stack.db.connect_admin().await)
        .await
        .unwrap();
        chat.id
    }

    /// `statement` in the tenant's schema, as the database holds it.
    async fn count(&self, statement: &str) -> i64 {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let schema = format!("t_{}", self.tenant.id.replace('-', ""));
        // Keys and the deletion log are in the key store, a database of its own.
        let mut conn = if statement.contains("hafen_keys.") {
            self.stack.db.keystore().connect_admin().await
        } else {
            self.stack.db.connect_admin().await
        };
        diesel::sql_query(statement.replace("{schema}", &schema))
            .get_result::<Count>(&mut conn)
            .await
            .unwrap()
            .n
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cb7_the_privacy_link_is_required_and_returned_by_get_widget_config() {
    let s = setup().await;
    let mut widgets = s.stack.widget_client().await;
    let mut missing = settings();
    missing.privacy_policy_url = String::new();
    let refused = widgets
        .create_widget(with_token(
            &s.owner,
            pb::CreateWidgetRequest {
                settings: Some(missing),
                consent_text: "Consent".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(field(&refused), "settings.privacy_policy_url");
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.widgets").await,
        0
    );

    let widget = s.widget(true).await;
    let config = s
        .stack
        .visitor_client()
        .await
        .get_widget_config(from(
            ORIGIN,
            pb::GetWidgetConfigRequest {
                widget_id: widget.widget_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        config.privacy_policy_url,
        "https://shop.example.com/privacy"
    );
    assert_eq!(config.pre_chat_fields.len(), 2);
    let text = config.consent_text.unwrap();
    assert_eq!(text.version, 1);
    assert_eq!(text.text_sha256.len(), 32);
    assert!(!config.remember_visitors);
    assert_eq!(config.visit_lifetime_days, 30);

    // Return visits: the widget is told to keep the visit after consent, and for how long.
    let mut remembering = settings();
    remembering.remember_visitors = true;
    remembering.visit_lifetime_days = 7;
    let updated = widgets
        .update_widget(with_token(
            &s.owner,
            pb::UpdateWidgetRequest {
                widget_id: widget.widget_id.clone(),
                settings: Some(remembering),
                enabled: true,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(updated.settings.unwrap().remember_visitors);
    hafen_testkit::eventually(
        "GetWidgetConfig says the widget remembers visitors for 7 days",
        std::time::Duration::from_secs(10),
        || {
            let (stack, id) = (&s.stack, widget.widget_id.clone());
            async move {
                let config = stack
                    .visitor_client()
                    .await
                    .get_widget_config(from(
                        ORIGIN,
                        pb::GetWidgetConfigRequest {
                            widget_id: id,
                            ..Default::default()
                        },
                    ))
                    .await
                    .ok()?
                    .into_inner();
                (config.remember_visitors && config.visit_lifetime_days == 7).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ul5_a_widget_serves_visitors_only_when_it_and_the_tenant_feature_are_on() {
    let s = setup().await;
    let off = s.widget(false).await;
    let on = s.widget(true).await;
    let mut visitors = s.stack.visitor_client().await;
    let config = |widget: &pb::Widget| {
        from(
            ORIGIN,
            pb::GetWidgetConfigRequest {
                widget_id: widget.widget_id.clone(),
                ..Default::default()
            },
        )
    };
    let refused = visitors.get_widget_config(config(&off)).await.unwrap_err();
    assert_eq!(refused.code(), Code::NotFound);
    assert!(visitors.get_widget_config(config(&on)).await.is_ok());
    s.webchat_feature(false).await;
    // The webchat service sees the switch within the time it keeps a widget (5 s).
    hafen_testkit::eventually(
        "the tenant switched webchat off",
        Duration::from_secs(10),
        || {
            let mut visitors = visitors.clone();
            let request = config(&on);
            async move {
                let refused = visitors.get_widget_config(request).await.err()?;
                (refused.code() == Code::NotFound).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cb2_consent_declined_stores_nothing_personal_and_granted_is_recorded_with_its_event() {
    let s = setup().await;
    let widget = s.widget(true).await;
    let version = widget.consent_text.as_ref().unwrap().version;
    let visit = s.visit(&widget).await;
    let token = &visit.visitor_token;

    // Before any answer, and after declining, personal fields are refused.
    let refused = s.submit(token, &[("email", "jane@example.eu", true)]).await;
    assert_eq!(reason(&refused.unwrap_err()), "CONSENT_REQUIRED");
    let declined = s.consent(token, version, false).await;
    assert!(!declined.granted);
    let refused = s.submit(token, &[("email", "jane@example.eu", true)]).await;
    assert_eq!(reason(&refused.unwrap_err()), "CONSENT_REQUIRED");
    // A field that is not personal may still be given (anonymous chat).
    let stored = s
        .submit(token, &[("topic", "delivery", false)])
        .await
        .unwrap();
    assert_eq!(stored.stored_keys, ["topic"]);
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.visit_fields WHERE personal")
            .await,
        0,
        "nothing personal stored after a decline"
    );

    let granted = s.consent(token, version, true).await;
    assert!(granted.granted);
    assert_eq!(
        granted.text_sha256,
        widget.consent_text.as_ref().unwrap().text_sha256
    );
    assert!(granted.decide_time.is_some());
    let stored = s
        .submit(token, &[("email", "jane@example.eu", true)])
        .await
        .unwrap();
    assert_eq!(stored.stored_keys, ["email", "topic"]);
    // What the database holds: the answer with its version and text hash, the field sealed
    // (the address never in clear), and the audit event in the outbox or already chained.
    assert_eq!(
        s.count(
            "SELECT count(*) AS n FROM {schema}.consent_records \
             WHERE granted AND version = 1 AND length(text_sha256) = 32"
        )
        .await,
        1
    );
    assert_eq!(
        s.count(
            "SELECT count(*) AS n FROM {schema}.visit_fields \
             WHERE key = 'email' AND released_at IS NOT NULL \
               AND position('jane@example.eu'::bytea in sealed) = 0"
        )
        .await,
        1
    );
    // Each answer's event reaches the tenant's audit chain (written to the outbox in the
    // answer's transaction, relayed from there), with ids only.
    hafen_testkit::eventually(
        "both consent events chained",
        Duration::from_secs(10),
        || async {
            let chained = s
                .count(
                    "SELECT count(*) AS n FROM hafen.audit_events \
                 WHERE action IN ('webchat.consent.granted', 'webchat.consent.declined') \
                   AND target_type = 'visit'",
                )
                .await;
            (chained >= 2).then_some(())
        },
    )
    .await;
    assert_eq!(
        s.count(
            "SELECT count(*) AS n FROM hafen.audit_events \
             WHERE action LIKE 'webchat.%' AND attributes::text LIKE '%jane%'"
        )
        .await,
        0
    );

    // Withdrawn: the personal field goes.
    s.consent(token, version, false).await;
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.visit_fields WHERE personal")
            .await,
        0
    );

    // A new consent text makes the old answer not current.
    let published = s
        .stack
        .widget_client()
        .await
        .publish_consent_text(with_token(
            &s.owner,
            pb::PublishConsentTextRequest {
                widget_id: widget.widget_id.clone(),
                text: "A new text.".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.version, 2);
    let stale = s
        .stack
        .visitor_client()
        .await
        .give_consent(visitor(
            token,
            pb::GiveConsentRequest {
                version: 1,
                granted: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    assert_eq!(reason(&stale), "INVALID_STATE");
}

/// German texts for [`settings`].
fn german() -> pb::WidgetTranslation {
    let text = |key: &str, label: &str, purpose: &str| pb::PreChatFieldText {
        key: key.into(),
        label: label.into(),
        purpose: purpose.into(),
    };
    pb::WidgetTranslation {
        language: "de".into(),
        welcome_message: "Hallo!".into(),
        offline_message: String::new(),
        pre_chat_fields: vec![
            text("topic", "Thema", "Um den Chat weiterzuleiten"),
            text("email", "E-Mail", "Um per E-Mail zu antworten"),
        ],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cb2_a_widget_speaks_the_visitors_language_and_each_answer_names_the_text_it_answered() {
    let s = setup().await;
    let mut widgets = s.stack.widget_client().await;
    let mut visitors = s.stack.visitor_client().await;
    let create = |settings: pb::WidgetSettings, translations: Vec<pb::ConsentTranslation>| {
        with_token(
            &s.owner,
            pb::CreateWidgetRequest {
                settings: Some(settings),
                enabled: true,
                consent_text: "We store what you give us to answer you.".into(),
                consent_translations: translations,
                ..Default::default()
            },
        )
    };
    let consent_de = || pb::ConsentTranslation {
        language: "de".into(),
        text: "Wir speichern, was Sie uns geben, um Ihnen zu antworten.".into(),
        ..Default::default()
    };

    // Bad translations are named.
    let refusals = [
        {
            let mut t = german();
            t.language = "en".into();
            ("settings.translations[0].language", vec![t], vec![])
        },
        {
            let mut t = german();
            t.language = "DE".into();
            ("settings.translations[0].language", vec![t], vec![])
        },
        (
            "settings.translations[1].language",
            vec![german(), german()],
            vec![],
        ),
        {
            let mut t = german();
            t.pre_chat_fields[1].key = "phone".into();
            (
                "settings.translations[0].pre_chat_fields[1].key",
                vec![t],
                vec![],
            )
        },
        {
            let mut t = german();
            t.pre_chat_fields[0].label = String::new();
            (
                "settings.translations[0].pre_chat_fields[0].label",
                vec![t],
                vec![],
            )
        },
        (
            "consent_translations[0].language",
            vec![german()],
            vec![pb::ConsentTranslation {
                language: "en".into(),
                ..consent_de()
            }],
        ),
        (
            "consent_translations[1].text",
            vec![german()],
            vec![
                consent_de(),
                pb::ConsentTranslation {
                    language: "fr".into(),
                    text: " ".into(),
                    ..Default::default()
                },
            ],
        ),
    ];
    for (named, translations, consent) in refusals {
        let mut settings = settings();
        settings.translations = translations;
        let refused = widgets
            .create_widget(create(settings, consent))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{named}");
        assert_eq!(field(&refused), named);
    }

    let mut bilingual = settings();
    bilingual.translations = vec![german()];
    let widget = widgets
        .create_widget(create(bilingual, vec![consent_de()]))
        .await
        .unwrap()
        .into_inner();
    let text = widget.consent_text.clone().unwrap();
    assert_eq!(text.language, "en", "the widget's own language by default");
    assert_eq!(widget.settings.as_ref().unwrap().language, "en");
    assert_eq!(
        text.translations
            .iter()
            .map(|t| t.language.as_str())
            .collect::<Vec<_>>(),
        ["de"]
    );

    let config = |languages: &[&str]| {
        from(
            ORIGIN,
            pb::GetWidgetConfigRequest {
                widget_id: widget.widget_id.clone(),
                languages: languages.iter().map(|l| (*l).to_owned()).collect(),
            },
        )
    };
    // The first language the widget has, by its primary tag.
    let de = visitors
        .get_widget_config(config(&["fr-FR", "de-AT", "en"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(de.language, "de");
    assert_eq!(de.welcome_message, "Hallo!");
    let labels: Vec<(&str, &str, &str)> = de
        .pre_chat_fields
        .iter()
        .map(|f| (f.key.as_str(), f.label.as_str(), f.purpose.as_str()))
        .collect();
    assert_eq!(
        labels,
        [
            ("email", "E-Mail", "Um per E-Mail zu antworten"),
            ("topic", "Thema", "Um den Chat weiterzuleiten"),
        ],
        "in the widget's order, with the widget's flags"
    );
    assert!(de.pre_chat_fields[0].personal && de.pre_chat_fields[1].required);
    let de_text = de.consent_text.clone().unwrap();
    assert_eq!(
        (de_text.language.as_str(), de_text.text.as_str()),
        ("de", consent_de().text.as_str())
    );
    assert!(de_text.translations.is_empty(), "visitors get one language");
    for asked in [&[][..], &["fr"][..], &["en-GB", "de"][..]] {
        let en = visitors
            .get_widget_config(config(asked))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(en.language, "en", "{asked:?}");
        assert_eq!(en.welcome_message, "Hello!");
        assert_eq!(en.consent_text.unwrap().text_sha256, text.text_sha256);
    }
    let too_many = vec!["de"; 11];
    let refused = visitors
        .get_widget_config(config(&too_many))
        .await
        .unwrap_err();
    assert_eq!(field(&refused), "languages");

    // The answer keeps the language and the hash of the text shown.
    let visit = s.visit(&widget).await;
    let token = &visit.visitor_token;
    let answer = |language: &str| {
        visitor(
            token,
            pb::GiveConsentRequest {
                version: 1,
                granted: true,
                language: language.into(),
            },
        )
    };
    let refused = visitors.give_consent(answer("fr")).await.unwrap_err();
    assert_eq!(
        (refused.code(), field(&refused).as_str()),
        (Code::InvalidArgument, "language")
    );
    let record = visitors
        .give_consent(answer("de"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.language, "de");
    assert_eq!(record.text_sha256, de_text.text_sha256);
    assert_ne!(record.text_sha256, text.text_sha256);
    let record = visitors
        .give_consent(answer(""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (record.language.as_str(), &record.text_sha256),
        ("en", &text.text_sha256),
        "no language: the version's own"
    );
    let mine = visitors
        .get_my_data(visitor(token, pb::GetMyDataRequest {}))
        .await
        .unwrap()
        .into_inner();
    let languages: Vec<&str> = mine
        .consent_records
        .iter()
        .map(|r| r.language.as_str())
        .collect();
    assert_eq!(languages, ["de", "en"]);

    // A version without German: German is not offered until one has it.
    widgets
        .publish_consent_text(with_token(
            &s.owner,
            pb::PublishConsentTextRequest {
                widget_id: widget.widget_id.clone(),
                text: "Version two.".into(),
                translations: vec![],
            },
        ))
        .await
        .unwrap();
    let now = visitors
        .get_widget_config(config(&["de"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (now.language.as_str(), now.welcome_message.as_str()),
        ("en", "Hello!")
    );
    // Nor can German become the widget's own language, without a consent text in it.
    let mut german_only = widget.settings.clone().unwrap();
    german_only.language = "de".into();
    german_only.translations = vec![];
    let refused = widgets
        .update_widget(with_token(
            &s.owner,
            pb::UpdateWidgetRequest {
                widget_id: widget.widget_id.clone(),
                settings: Some(german_only),
                enabled: true,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&refused), "settings.language");
    let unchanged = widgets
        .get_widget(with_token(
            &s.owner,
            pb::GetWidgetRequest {
                widget_id: widget.widget_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        unchanged.settings.unwrap().language,
        "en",
        "nothing changed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ul3_an_unreleased_or_undeclared_field_is_refused_and_nothing_is_stored() {
    let s = setup().await;
    let widget = s.widget(true).await;
    let visit = s.visit(&widget).await;
    let token = &visit.visitor_token;
    s.consent(token, 1, true).await;

    let refused = s
        .submit(
            token,
            &[("topic", "returns", false), ("email", "a@b.eu", false)],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(field(&refused), "fields[1].released");
    let refused = s
        .submit(token, &[("phone", "+49 30 1234567", true)])
        .await
        .unwrap_err();
    assert_eq!(field(&refused), "fields[0].key");
    for (value, why) in [("", "empty"), ("a\u{7}b", "control character")] {
        let refused = s
            .submit(token, &[("topic", value, false)])
            .await
            .unwrap_err();
        assert_eq!(field(&refused), "fields[0].value", "{why}");
    }
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.visit_fields")
            .await,
        0,
        "all or nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cb8_no_address_user_agent_or_referrer_is_stored_and_a_foreign_origin_is_refused() {
    let s = setup().await;
    let widget = s.widget(true).await;
    let mut visitors = s.stack.visitor_client().await;
    for origin in [
        "https://evil.example.net",
        "https://shop.example.com.evil.net",
        "http://shop.example.com",
        "https://example.org",
    ] {
        let refused = visitors
            .start_visit(from(
                origin,
                pb::StartVisitRequest {
                    widget_id: widget.widget_id.clone(),
                    visitor_token: String::new(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{origin}");
    }
    // A wildcard origin is allowed; the call carries what browsers send.
    let mut request = from(
        "https://help.example.org",
        pb::StartVisitRequest {
            widget_id: widget.widget_id.clone(),
            visitor_token: String::new(),
            ..Default::default()
        },
    );
    for (header, value) in [
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) UniqueAgent/42",
        ),
        ("referer", "https://help.example.org/unique-referrer-page"),
        ("x-forwarded-for", "203.0.113.77"),
    ] {
        request
            .metadata_mut()
            .insert(header, value.parse().unwrap());
    }
    let visit = visitors.start_visit(request).await.unwrap().into_inner();
    // A token from another page's origin is refused too.
    let mut foreign = tonic::Request::new(pb::GiveConsentRequest {
        version: 1,
        granted: true,
        ..Default::default()
    });
    foreign
        .metadata_mut()
        .insert("origin", "https://evil.example.net".parse().unwrap());
    foreign.metadata_mut().insert(
        "authorization",
        format!("Visitor {}", visit.visitor_token).parse().unwrap(),
    );
    let refused = visitors.give_consent(foreign).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);

    // Nothing of it in any table of the database: every text column of every row.
    #[derive(QueryableByName)]
    struct Dump {
        #[diesel(sql_type = Text)]
        dump: String,
    }
    let mut conn = s.stack.db.connect_admin().await;
    let tables: Vec<Dump> = diesel::sql_query(
        "SELECT format('SELECT coalesce(string_agg(t::text, chr(10)), '''') AS dump FROM %I.%I t', \
                table_schema, table_name) AS dump \
         FROM information_schema.tables \
         WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    .load(&mut conn)
    .await
    .unwrap();
    for table in tables {
        let rows: Dump = diesel::sql_query(&table.dump)
            .get_result(&mut conn)
            .await
            .unwrap();
        for needle in ["UniqueAgent", "unique-referrer-page", "203.0.113.77"] {
            assert!(
                !rows.dump.contains(needle),
                "{needle} stored: {}",
                table.dump
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cb8_a_visit_resumes_with_its_token_and_a_token_reaches_nothing_elsewhere() {
    let s = setup().await;
    let widget = s.widget(true).await;
    let first = s.visit(&widget).await;
    let resumed = s
        .stack
        .visitor_client()
        .await
        .start_visit(from(
            ORIGIN,
            pb::StartVisitRequest {
                widget_id: widget.widget_id.clone(),
                visitor_token: first.visitor_token.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(resumed.resumed);
    assert_eq!(resumed.visit_id, first.visit_id);
    assert_eq!(resumed.visitor_token, first.visitor_token);

    // A forged secret for the same visit starts a new visit, never the old one.
    let forged = format!(
        "{}{}",
        &first.visitor_token[..first.visitor_token.len() - 1],
        if first.visitor_token.ends_with('A') {
            'B'
        } else {
            'A'
        }
    );
    let other = s
        .stack
        .visitor_client()
        .await
        .start_visit(from(
            ORIGIN,
            pb::StartVisitRequest {
                widget_id: widget.widget_id.clone(),
                visitor_token: forged.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!other.resumed);
    assert_ne!(other.visit_id, first.visit_id);
    let refused = s
        .stack
        .visitor_client()
        .await
        .give_consent(visitor(
            &forged,
            pb::GiveConsentRequest {
                version: 1,
                granted: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    // Another tenant's widget with this token: nothing.
    let other_tenant = s.stack.create_tenant("other").await;
    let other_owner = s.stack.login_owner(&other_tenant).await.access_token;
    let elsewhere = Setup {
        stack: s.stack,
        tenant: other_tenant,
        owner: other_owner,
    };
    elsewhere.webchat_feature(true).await;
    let foreign_widget = elsewhere.widget(true).await;
    let mut token = first.visitor_token.clone();
    token.replace_range(..32, &foreign_widget.widget_id.replace('-', ""));
    let refused = elsewhere
        .stack
        .visitor_client()
        .await
        .give_consent(visitor(
            &token,
            pb::GiveConsentRequest {
                version: 1,
                granted: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    // An access token is not a visitor token, and a visitor token not an access token.
    let refused = elsewhere
        .stack
        .visitor_client()
        .await
        .give_consent(visitor(
            &elsewhere.owner,
            pb::GiveConsentRequest {
                version: 1,
                granted: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = elsewhere
        .stack
        .widget_client()
        .await
        .list_widgets(with_token(
            &first.visitor_token,
            pb::ListWidgetsRequest::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn webchat_widget_admin_rpcs_name_bad_fields_and_are_for_admins() {
    let s = setup().await;
    let mut widgets = s.stack.widget_client().await;
    let mut bad_origin = settings();
    bad_origin.allowed_origins = vec![ORIGIN.into(), "https://shop.example.com/path".into()];
    let mut long_visit = settings();
    long_visit.visit_lifetime_days = 731;
    for (settings, consent, expected) in [
        (Some(bad_origin), "Consent", "settings.allowed_origins[1]"),
        (Some(settings()), "  ", "consent_text"),
        (None, "Consent", "settings"),
        (Some(long_visit), "Consent", "visit_lifetime_days"),
    ] {
        let refused = widgets
            .create_widget(with_token(
                &s.owner,
                pb::CreateWidgetRequest {
                    settings,
                    consent_text: consent.into(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{expected}");
        assert_eq!(field(&refused), expected);
    }
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.widgets").await,
        0
    );

    // The same request id twice at once: one widget, returned to both.
    let request_id = uuid::Uuid::now_v7().to_string();
    let create = || {
        let mut client = widgets.clone();
        let request = with_token(
            &s.owner,
            pb::CreateWidgetRequest {
                settings: Some(settings()),
                enabled: false,
                consent_text: "Consent".into(),
                request_id: request_id.clone(),
                ..Default::default()
            },
        );
        async move { client.create_widget(request).await.unwrap().into_inner() }
    };
    let (first, second) = tokio::join!(create(), create());
    assert_eq!(first.widget_id, second.widget_id);
    let widget = first;
    let listed = widgets
        .list_widgets(with_token(&s.owner, pb::ListWidgetsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.widgets.len(), 1);
    let mut changed = settings();
    changed.welcome_message = "Moin!".into();
    let updated = widgets
        .update_widget(with_token(
            &s.owner,
            pb::UpdateWidgetRequest {
                widget_id: widget.widget_id.clone(),
                settings: Some(changed),
                enabled: true,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(updated.enabled);
    assert_eq!(updated.settings.unwrap().welcome_message, "Moin!");

    let (_, member) = s
        .stack
        .create_logged_in_member(&s.tenant, &s.owner, "agent", "agent password 1")
        .await;
    let refused = widgets
        .get_widget(with_token(
            &member.access_token,
            pb::GetWidgetRequest {
                widget_id: widget.widget_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread")]
async fn cb9_a_visitor_gets_corrects_exports_and_deletes_their_data() {
    let s = setup().await;
    let widget = s.widget(true).await;
    let visit = s.visit(&widget).await;
    let token = visit.visitor_token.clone();
    s.consent(&token, 1, true).await;
    s.submit(
        &token,
        &[
            ("email", "jane@example.eu", true),
            ("topic", "returns", false),
        ],
    )
    .await
    .unwrap();
    let mut visitors = s.stack.visitor_client().await;

    let mine = visitors
        .get_my_data(visitor(&token, pb::GetMyDataRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.visit_id, visit.visit_id);
    let values: Vec<(&str, &str, bool)> = mine
        .fields
        .iter()
        .map(|f| (f.key.as_str(), f.value.as_str(), f.released))
        .collect();
    assert_eq!(
        values,
        [
            ("email", "jane@example.eu", true),
            ("topic", "returns", false)
        ]
    );
    assert_eq!(mine.consent_records.len(), 1);

    // Correct: only what is stored, by the rules of SubmitFields.
    let refused = visitors
        .correct_my_data(visitor(
            &token,
            pb::CorrectMyDataRequest {
                fields: vec![pb::FieldValue {
                    key: "phone".into(),
                    value: "1".into(),
                    released: true,
                }],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&refused), "fields[0].key");
    let corrected = visitors
        .correct_my_data(visitor(
            &token,
            pb::CorrectMyDataRequest {
                fields: vec![pb::FieldValue {
                    key: "email".into(),
                    value: "jane.doe@example.eu".into(),
                    released: true,
                }],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(corrected.fields[0].value, "jane.doe@example.eu");

    let export = visitors
        .export_my_data(visitor(&token, pb::ExportMyDataRequest {}))
        .await
        .unwrap()
        .into_inner();
    let document: serde_json::Value = serde_json::from_str(&export.json).unwrap();
    assert_eq!(document["visit_id"], visit.visit_id.as_str());
    assert_eq!(document["fields"][0]["value"], "jane.doe@example.eu");
    assert_eq!(document["consent_records"][0]["granted"], true);
    assert_eq!(
        export.file_name,
        format!("hafen-visit-{}.json", visit.visit_id)
    );

    // The organisation switches the website chat off (seen within the time the webchat
    // service keeps a widget): the visitor's rights stay.
    s.webchat_feature(false).await;
    hafen_testkit::eventually("the chat is switched off", Duration::from_secs(10), || {
        let mut visitors = visitors.clone();
        let request = visitor(
            &token,
            pb::SendVisitorMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                body: "still there?".into(),
            },
        );
        async move {
            let refused = visitors.send_visitor_message(request).await.err()?;
            (refused.code() == Code::Unauthenticated).then_some(())
        }
    })
    .await;
    assert!(
        visitors
            .get_my_data(visitor(&token, pb::GetMyDataRequest {}))
            .await
            .is_ok()
    );
    let refused = visitors
        .submit_fields(visitor(
            &token,
            pb::SubmitFieldsRequest {
                fields: vec![pb::FieldValue {
                    key: "topic".into(),
                    value: "more".into(),
                    released: false,
                }],
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "but the chat is over"
    );

    // Delete: the key goes first, and with it every sealed value; the token dies.
    let sealed_before = s
        .count("SELECT count(*) AS n FROM {schema}.visit_fields WHERE length(sealed) > 0")
        .await;
    assert_eq!(sealed_before, 2);
    visitors
        .delete_my_data(visitor(&token, pb::DeleteMyDataRequest {}))
        .await
        .unwrap();
    let keys = s
        .count(&format!(
            "SELECT count(*) AS n FROM hafen_keys.user_keys WHERE user_id = '{}'",
            visit.visit_id
        ))
        .await;
    assert_eq!(
        keys, 0,
        "the visitor's key is destroyed: nothing sealed under it opens"
    );
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM hafen_keys.deletion_log \
             WHERE kind = 'visitor' AND user_id = '{}'",
            visit.visit_id
        ))
        .await,
        1,
        "a restore re-applies the deletion"
    );
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.visit_fields")
            .await,
        0
    );
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.visits").await,
        0
    );
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.consent_records")
            .await,
        1,
        "the consent answer stays, as proof that consent was asked"
    );
    let dead = visitors
        .get_my_data(visitor(&token, pb::GetMyDataRequest {}))
        .await
        .unwrap_err();
    assert_eq!(dead.code(), Code::Unauthenticated);
    hafen_testkit::eventually(
        "the deletion is audited",
        Duration::from_secs(10),
        || async {
            let chained = s
                .count(
                    "SELECT count(*) AS n FROM hafen.audit_events \
                 WHERE action = 'webchat.visitor.data_deleted'",
                )
                .await;
            (chained == 1).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webchat_abuse_limits_are_hit_and_recover() {
    let s = setup().await;
    let widget = s.widget(true).await;
    // A webchat server of its own with small limits in a short window, beside the stack's.
    let mut config = s.stack.secrets.webchat_config(&s.stack.db);
    config.auth.auth_endpoint = s.stack.auth.uri();
    config.audit.audit_endpoint = s.stack.audit.uri();
    config.limits.visits_per_address = 3;
    config.limits.calls_per_visitor = 4;
    config.limits.lookups_per_address = 3;
    config.limits.limit_window = Duration::from_secs(2);
    let server =
        hafen_testkit::TestServer::spawn(|l, sd| hafen_webchat::serve(config, l, sd)).await;
    let mut visitors = pb::visitor_service_client::VisitorServiceClient::new(
        server.channel(&s.stack.secrets).await,
    );
    let start = || {
        from(
            ORIGIN,
            pb::StartVisitRequest {
                widget_id: widget.widget_id.clone(),
                visitor_token: String::new(),
                ..Default::default()
            },
        )
    };

    // Per address: the fourth visit in a window is refused, with the time to wait.
    let mut token = String::new();
    let mut refused = None;
    for _ in 0..8 {
        match visitors.start_visit(start()).await {
            Ok(visit) => token = visit.into_inner().visitor_token,
            Err(err) => {
                refused = Some(err);
                break;
            }
        }
    }
    let refused = refused.expect("a limit is reached");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "RATE_LIMITED");
    hafen_testkit::eventually("visits start again", Duration::from_secs(10), || {
        let mut visitors = visitors.clone();
        let request = start();
        async move { visitors.start_visit(request).await.ok() }
    })
    .await;

    // Per visitor: calls beyond the limit are refused, then allowed again.
    let mut refused = None;
    for _ in 0..10 {
        if let Err(err) = visitors
            .get_my_data(visitor(&token, pb::GetMyDataRequest {}))
            .await
        {
            refused = Some(err);
            break;
        }
    }
    assert_eq!(
        refused.expect("a visitor's limit is reached").code(),
        Code::ResourceExhausted
    );
    hafen_testkit::eventually(
        "the visitor is served again",
        Duration::from_secs(10),
        || {
            let mut visitors = visitors.clone();
            let request = visitor(&token, pb::GetMyDataRequest {});
            async move { visitors.get_my_data(request).await.ok() }
        },
    )
    .await;

    // Per address, unauthenticated lookups: tokens that are not valid, and widget
    // configurations, share a budget; beyond it they are refused before any lookup.
    let forged = format!(
        "{}.{}.{}",
        uuid::Uuid::parse_str(&widget.widget_id).unwrap().simple(),
        uuid::Uuid::now_v7().simple(),
        "x".repeat(43)
    );
    let config = || {
        from(
            ORIGIN,
            pb::GetWidgetConfigRequest {
                widget_id: widget.widget_id.clone(),
                ..Default::default()
            },
        )
    };
    hafen_testkit::eventually("a fresh lookup window", Duration::from_secs(10), || {
        let mut visitors = visitors.clone();
        let request = config();
        async move { visitors.get_widget_config(request).await.ok() }
    })
    .await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        let status = visitors
            .get_my_data(visitor(&forged, pb::GetMyDataRequest {}))
            .await
            .unwrap_err();
        codes.push(status.code());
    }
    assert_eq!(codes[0], Code::Unauthenticated);
    assert!(codes.contains(&Code::ResourceExhausted), "{codes:?}");
    let refused = visitors.get_widget_config(config()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    hafen_testkit::eventually(
        "widget configurations are served again",
        Duration::from_secs(10),
        || {
            let mut visitors = visitors.clone();
            let request = config();
            async move { visitors.get_widget_config(request).await.ok() }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cb5_expired_visits_and_old_consent_answers_are_purged_with_the_visitors_keys() {
    use hafen_proto::retention::v1 as retention_pb;

    let s = setup().await;
    let (widget, _agent) = s.widget_with_agent(settings()).await;
    let old = s.visit(&widget).await;
    let current = s.visit(&widget).await;
    for visit in [&old, &current] {
        s.consent(&visit.visitor_token, 1, true).await;
        s.submit(
            &visit.visitor_token,
            &[
                ("email", "jane@example.eu", true),
                ("topic", "Billing", false),
            ],
        )
        .await
        .unwrap();
    }
    let said = s
        .stack
        .visitor_client()
        .await
        .send_visitor_message(visitor(
            &old.visitor_token,
            pb::SendVisitorMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                body: "Hello from an old visit".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let keys_of = |visit: &pb::StartVisitResponse| {
        format!(
            "SELECT count(*) AS n FROM hafen_keys.user_keys WHERE user_id = '{}'",
            visit.visit_id
        )
    };
    assert_eq!(s.count(&keys_of(&old)).await, 1);
    // One visit past its lifetime, and one consent answer older than the tenant's period.
    let schema = format!("t_{}", s.tenant.id.replace('-', ""));
    let mut admin = s.stack.db.connect_admin().await;
    diesel::sql_query(format!(
        "UPDATE {schema}.visits SET expires_at = now() - interval '1 day' WHERE id = '{}'; ",
        old.visit_id
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    diesel::sql_query(format!(
        "UPDATE {schema}.consent_records SET decided_at = now() - interval '800 days'"
    ))
    .execute(&mut admin)
    .await
    .unwrap();

    let mut retention = s.stack.retention_client().await;
    let run = retention
        .run_purge(with_token(&s.owner, retention_pb::RunPurgeRequest {}))
        .await
        .unwrap()
        .into_inner();
    hafen_testkit::eventually("the purge run ends", Duration::from_secs(20), || {
        let mut retention = retention.clone();
        let owner = s.owner.clone();
        let id = run.purge_run_id.clone();
        async move {
            let runs = retention
                .list_purge_runs(with_token(
                    &owner,
                    retention_pb::ListPurgeRunsRequest::default(),
                ))
                .await
                .ok()?
                .into_inner();
            runs.purge_runs.into_iter().find(|r| {
                r.purge_run_id == id && r.state == retention_pb::PurgeRunState::Succeeded as i32
            })
        }
    })
    .await;

    assert_eq!(
        s.count(&keys_of(&old)).await,
        0,
        "the expired visitor's key is gone"
    );
    assert_eq!(s.count(&keys_of(&current)).await, 1);
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM {{schema}}.visits WHERE id = '{}'",
            old.visit_id
        ))
        .await,
        0
    );
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM {{schema}}.visit_fields WHERE visit_id = '{}'",
            old.visit_id
        ))
        .await,
        0
    );
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.consent_records")
            .await,
        1,
        "the expired visit's old answer goes; the current visit keeps its proof of consent"
    );
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM hafen_keys.deletion_log \
             WHERE kind = 'visitor' AND user_id = '{}'",
            old.visit_id
        ))
        .await,
        1,
        "a restore destroys the key again"
    );
    // The old visitor's message is a tombstone, and its deletion is in the log for the
    // agent's streams.
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM {{schema}}.messages \
             WHERE id = '{}' AND ciphertext IS NULL AND deleted_at IS NOT NULL",
            said.message_id
        ))
        .await,
        1
    );
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM {{schema}}.events \
             WHERE kind = 'message_deleted' AND message_id = '{}'",
            said.message_id
        ))
        .await,
        1
    );
    let dead = s
        .stack
        .visitor_client()
        .await
        .get_my_data(visitor(&old.visitor_token, pb::GetMyDataRequest {}))
        .await
        .unwrap_err();
    assert_eq!(dead.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn webchat_widgets_list_page_by_page_with_their_current_consent_texts() {
    let s = setup().await;
    let first = s.widget(true).await;
    let second = s.widget(false).await;
    let mut widgets = s.stack.widget_client().await;
    widgets
        .publish_consent_text(with_token(
            &s.owner,
            pb::PublishConsentTextRequest {
                widget_id: second.widget_id.clone(),
                text: "Version two.".into(),
                translations: vec![pb::ConsentTranslation {
                    language: "de".into(),
                    text: "Version zwei.".into(),
                    ..Default::default()
                }],
            },
        ))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = widgets
            .list_widgets(with_token(
                &s.owner,
                pb::ListWidgetsRequest {
                    page_size: 1,
                    page_token: token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        for widget in page.widgets {
            let text = widget.consent_text.unwrap();
            let translations: Vec<(String, String)> = text
                .translations
                .into_iter()
                .map(|t| (t.language, t.text))
                .collect();
            seen.push((widget.widget_id, text.version, text.text, translations));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(
        seen,
        [
            (
                first.widget_id,
                1,
                "We store what you give us to answer you.".to_owned(),
                vec![]
            ),
            (
                second.widget_id,
                2,
                "Version two.".to_owned(),
                vec![("de".to_owned(), "Version zwei.".to_owned())]
            ),
        ]
    );
}

async fn next_event(
    stream: &mut tonic::Streaming<hafen_proto::messaging::v1::SubscribeResponse>,
) -> hafen_proto::messaging::v1::SubscribeResponse {
    use tokio_stream::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .expect("open")
        .expect("ok")
}

#[tokio::test(flavor = "multi_thread")]
async fn cb1_a_visitor_without_an_account_chats_with_an_agent_both_ways() {
    use hafen_proto::messaging::v1 as msg_pb;
    use tokio_stream::StreamExt;

    let s = setup().await;
    let (widget, agent_token) = s.widget_with_agent(settings()).await;

    // The agent follows their conversations through MessagingService.
    let mut agent_stream = s
        .stack
        .messaging_client()
        .await
        .subscribe(with_token(
            &agent_token,
            msg_pb::SubscribeRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut agent_stream).await.event,
        Some(msg_pb::subscribe_response::Event::CaughtUp(_))
    ));

    let visit = s.visit(&widget).await;
    let token = visit.visitor_token.clone();
    let mut visitors = s.stack.visitor_client().await;
    let send = |body: &str, request_id: &str| {
        visitor(
            &token,
            pb::SendVisitorMessageRequest {
                request_id: request_id.into(),
                body: body.into(),
            },
        )
    };
    // The widget requires a topic first.
    let early = visitors
        .send_visitor_message(send("Hello?", &uuid::Uuid::now_v7().to_string()))
        .await
        .unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition);
    assert_eq!(reason(&early), "INVALID_STATE");
    s.submit(&token, &[("topic", "returns", false)])
        .await
        .unwrap();
    let request_id = uuid::Uuid::now_v7().to_string();
    let sent = visitors
        .send_visitor_message(send("Hello, my card is 4111 1111 1111 1111", &request_id))
        .await
        .unwrap()
        .into_inner();
    assert!(sent.from_visitor);
    assert!(sent.masked, "card numbers are always masked: {}", sent.body);
    assert!(!sent.body.contains("4111 1111"));
    assert_eq!(sent.sequence, 1);
    // A retry returns the first message.
    let again = visitors
        .send_visitor_message(send("Hello, my card is 4111 1111 1111 1111", &request_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.message_id, sent.message_id);

    // The agent is added to the chat and gets the message, live.
    let mut conversation = None;
    let mut received = None;
    while received.is_none() {
        match next_event(&mut agent_stream).await.event {
            Some(msg_pb::subscribe_response::Event::MembershipChanged(changed)) => {
                let chat = changed.conversation.unwrap();
                assert_eq!(chat.kind, msg_pb::ConversationKind::Webchat as i32);
                conversation = Some(chat.conversation_id);
            }
            Some(msg_pb::subscribe_response::Event::MessageCreated(message)) => {
                received = Some(message);
            }
            _ => {}
        }
    }
    let received = received.unwrap();
    let conversation = conversation.expect("the chat was announced first");
    assert_eq!(received.message_id, sent.message_id);
    assert_eq!(received.body, sent.body);
    assert_eq!(received.sender_user_id, visit.visit_id);

    // The visitor's stream replays, catches up, and gets the agent's answer live.
    let mut visitor_stream = visitors
        .subscribe_visit(visitor(&token, pb::SubscribeVisitRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let mut replayed = Vec::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), visitor_stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match item.event.unwrap() {
            pb::subscribe_visit_response::Event::MessageCreated(m) => replayed.push(m.message_id),
            pb::subscribe_visit_response::Event::CaughtUp(_) => break,
            _ => {}
        }
    }
    assert_eq!(replayed, std::slice::from_ref(&sent.message_id));
    let answer = s
        .stack
        .messaging_client()
        .await
        .send_message(with_token(
            &agent_token,
            msg_pb::SendMessageRequest {
                conversation_id: conversation,
                request_id: uuid::Uuid::now_v7().to_string(),
                body: "Hello! How can I help?".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let live = tokio::time::timeout(Duration::from_secs(10), visitor_stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match live.event.unwrap() {
        pb::subscribe_visit_response::Event::MessageCreated(m) => {
            assert_eq!(m.message_id, answer.message_id);
            assert_eq!(m.body, "Hello! How can I help?");
            assert!(!m.from_visitor);
            assert_eq!(m.sequence, 2);
        }
        other => panic!("the agent's answer, not {other:?}"),
    }

    // At most two streams per visit.
    let _second = visitors
        .subscribe_visit(visitor(&token, pb::SubscribeVisitRequest::default()))
        .await
        .unwrap();
    let third = visitors
        .subscribe_visit(visitor(&token, pb::SubscribeVisitRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);

    // The agent sees what the visitor gave and released, nobody else in the team does.
    s.consent(&token, 1, true).await;
    s.submit(
        &token,
        &[
            ("email", "jane@example.eu", true),
            ("topic", "returns", false),
        ],
    )
    .await
    .unwrap();
    let mut widgets = s.stack.widget_client().await;
    let seen = widgets
        .get_visitor_fields(with_token(
            &agent_token,
            pb::GetVisitorFieldsRequest {
                conversation_id: received.conversation_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.visit_id, visit.visit_id);
    let fields: Vec<(&str, &str, bool)> = seen
        .fields
        .iter()
        .map(|f| (f.key.as_str(), f.value.as_str(), f.released))
        .collect();
    assert_eq!(
        fields,
        [
            ("email", "jane@example.eu", true),
            ("topic", "returns", false)
        ]
    );
    let (_, colleague) = s
        .stack
        .create_logged_in_member(&s.tenant, &s.owner, "colleague", "colleague password 1")
        .await;
    let hidden = widgets
        .get_visitor_fields(with_token(
            &colleague.access_token,
            pb::GetVisitorFieldsRequest {
                conversation_id: received.conversation_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);

    // The visitor edits and deletes their own message; the agent's stream follows.
    let edited = visitors
        .edit_visitor_message(visitor(
            &token,
            pb::EditVisitorMessageRequest {
                message_id: sent.message_id.clone(),
                body: "Hello, sorry, wrong card".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(edited.edit_time.is_some());
    visitors
        .delete_visitor_message(visitor(
            &token,
            pb::DeleteVisitorMessageRequest {
                message_id: sent.message_id.clone(),
            },
        ))
        .await
        .unwrap();
    let mut changes = Vec::new();
    while changes.len() < 2 {
        match next_event(&mut agent_stream).await.event {
            Some(msg_pb::subscribe_response::Event::MessageEdited(m)) => {
                changes.push(format!("edited {}", m.body));
            }
            Some(msg_pb::subscribe_response::Event::MessageDeleted(m)) => {
                changes.push(format!("deleted {}", m.body));
            }
            _ => {}
        }
    }
    assert_eq!(
        changes,
        ["edited Hello, sorry, wrong card", "deleted "],
        "in order, the deletion without a body"
    );
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM hafen_keys.deletion_log \
             WHERE kind = 'message' AND message_id = '{}'",
            sent.message_id
        ))
        .await,
        1,
        "a restore deletes it again"
    );
    let not_theirs = visitors
        .delete_visitor_message(visitor(
            &token,
            pb::DeleteVisitorMessageRequest {
                message_id: answer.message_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        not_theirs.code(),
        Code::NotFound,
        "the agent's message is not theirs"
    );

    // Without an agent, the first message is refused with AGENT_UNAVAILABLE.
    let lonely = s.widget(true).await;
    let other = s.visit(&lonely).await;
    s.submit(&other.visitor_token, &[("topic", "returns", false)])
        .await
        .unwrap();
    let refused = visitors
        .send_visitor_message(visitor(
            &other.visitor_token,
            pb::SendVisitorMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                body: "Anyone?".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "AGENT_UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread")]
async fn cb2_no_chat_without_consent_where_required_and_a_legal_hold_stops_deletion() {
    let s = setup().await;
    let mut strict = settings();
    strict.allow_anonymous_chat = false;
    let (widget, _) = s.widget_with_agent(strict).await;
    let visit = s.visit(&widget).await;
    let token = visit.visitor_token.clone();
    s.submit(&token, &[("topic", "returns", false)])
        .await
        .unwrap();
    let mut visitors = s.stack.visitor_client().await;
    let send = |token: &str| {
        visitor(
            token,
            pb::SendVisitorMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                body: "Hello".into(),
            },
        )
    };
    let refused = visitors
        .send_visitor_message(send(&token))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "CONSENT_REQUIRED");
    s.consent(&token, 1, true).await;
    visitors.send_visitor_message(send(&token)).await.unwrap();
    // Withdrawn: the chat stops too.
    s.consent(&token, 1, false).await;
    let refused = visitors
        .send_visitor_message(send(&token))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "CONSENT_REQUIRED");

    // A legal hold on the chat keeps the visitor's data: deletion is refused, nothing changes.
    let conversation = s
        .count(&format!(
            "SELECT count(*) AS n FROM {{schema}}.visits \
             WHERE id = '{}' AND conversation_id IS NOT NULL",
            visit.visit_id
        ))
        .await;
    assert_eq!(conversation, 1);
    let chat_id = s.chat_of(&visit.visit_id).await;
    // The owner holds the website chat (not a member of it: it is the organisation's chat
    // with a visitor, not a private conversation).
    s.stack
        .retention_client()
        .await
        .set_legal_hold(with_token(
            &s.owner,
            hafen_proto::retention::v1::SetLegalHoldRequest {
                target: Some(
                    hafen_proto::retention::v1::set_legal_hold_request::Target::ConversationId(
                        chat_id.clone(),
                    ),
                ),
                hold: true,
                reason_code: "litigation".into(),
            },
        ))
        .await
        .unwrap();
    let refused = visitors
        .delete_my_data(visitor(&token, pb::DeleteMyDataRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "LEGAL_HOLD_ACTIVE");
    assert!(
        visitors
            .get_my_data(visitor(&token, pb::GetMyDataRequest {}))
            .await
            .is_ok(),
        "the visit goes on, nothing was deleted"
    );
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM hafen_keys.user_keys WHERE user_id = '{}'",
            visit.visit_id
        ))
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bx4_a_visitor_stream_is_woken_by_the_agents_answer_not_by_its_poll() {
    use hafen_proto::messaging::v1 as msg_pb;
    use tokio_stream::StreamExt;

    let s = setup().await;
    let (widget, agent_token) = s.widget_with_agent(settings()).await;
    // A webchat server whose streams would poll only once a minute.
    let mut config = s.stack.secrets.webchat_config(&s.stack.db);
    config.auth.auth_endpoint = s.stack.auth.uri();
    config.audit.audit_endpoint = s.stack.audit.uri();
    config.stream_poll = Duration::from_secs(60);
    let server =
        hafen_testkit::TestServer::spawn(|l, sd| hafen_webchat::serve(config, l, sd)).await;
    let mut visitors = pb::visitor_service_client::VisitorServiceClient::new(
        server.channel(&s.stack.secrets).await,
    );
    let visit = s.visit(&widget).await;
    let token = visit.visitor_token.clone();
    s.submit(&token, &[("topic", "returns", false)])
        .await
        .unwrap();
    let sent = visitors
        .send_visitor_message(visitor(
            &token,
            pb::SendVisitorMessageRequest {
                request_id: uuid::Uuid::now_v7().to_string(),
                body: "Hello".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut stream = visitors
        .subscribe_visit(visitor(&token, pb::SubscribeVisitRequest::default()))
        .await
        .unwrap()
        .into_inner();
    loop {
        let item = stream.next().await.unwrap().unwrap();
        if matches!(
            item.event,
            Some(pb::subscribe_visit_response::Event::CaughtUp(_))
        ) {
            break;
        }
    }
    // The agent finds the chat in their conversations and answers.
    let chat = s.agent_chat(&agent_token).await;
    assert_eq!(sent.sequence, 1);
    s.stack
        .messaging_client()
        .await
        .send_message(with_token(
            &agent_token,
            msg_pb::SendMessageRequest {
                conversation_id: chat,
                request_id: uuid::Uuid::now_v7().to_string(),
                body: "Right here".into(),
            },
        ))
        .await
        .unwrap();
    let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("woken long before the minute's poll")
        .unwrap()
        .unwrap();
    match item.event.unwrap() {
        pb::subscribe_visit_response::Event::MessageCreated(m) => {
            assert_eq!(m.body, "Right here");
        }
        other => panic!("the answer, not {other:?}"),
    }
}

impl Setup {
    /// StartVisit with a signed identity, signed at [`signed_at`].
    async fn start_identified(
        &self,
        widget: &pb::Widget,
        token: &str,
        external_id: &str,
        signature: &str,
    ) -> Result<pb::StartVisitResponse, tonic::Status> {
        self.start_identified_at(widget, token, external_id, signature, signed_at())
            .await
    }

    async fn start_identified_at(
        &self,
        widget: &pb::Widget,
        token: &str,
        external_id: &str,
        signature: &str,
        issued_at: i64,
    ) -> Result<pb::StartVisitResponse, tonic::Status> {
        self.stack
            .visitor_client()
            .await
            .start_visit(from(
                ORIGIN,
                pb::StartVisitRequest {
                    widget_id: widget.widget_id.clone(),
                    visitor_token: token.into(),
                    external_id: external_id.into(),
                    identity_signature: signature.into(),
                    identity_issued_at: issued_at,
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn rotate(&self, widget: &pb::Widget, disable: bool) -> String {
        self.stack
            .widget_client()
            .await
            .rotate_identity_secret(with_token(
                &self.owner,
                pb::RotateIdentitySecretRequest {
                    widget_id: widget.widget_id.clone(),
                    disable,
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .secret
    }
}

/// When this test process's website signs: one time for all its signatures.
fn signed_at() -> i64 {
    static AT: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *AT.get_or_init(|| chrono::Utc::now().timestamp())
}

/// What the website's server computes at [`signed_at`].
fn sign(secret: &str, external_id: &str) -> String {
    sign_at(secret, external_id, signed_at())
}

/// The hex HMAC-SHA256 of `<issued_at>.<external_id>`.
fn sign_at(secret: &str, external_id: &str, issued_at: i64) -> String {
    hafen_crypto::secret::hmac_sha256(
        secret.as_bytes(),
        format!("{issued_at}.{external_id}").as_bytes(),
    )
    .iter()
    .map(|b| format!("{b:02x}"))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cb8_a_signed_identity_resumes_one_visit_on_every_device_and_unsigned_claims_are_ignored() {
    let s = setup().await;
    let (widget, agent) = s.widget_with_agent(settings()).await;

    // Only admins make the secret; it is shown once and stored sealed.
    let denied = s
        .stack
        .widget_client()
        .await
        .rotate_identity_secret(with_token(
            &agent,
            pb::RotateIdentitySecretRequest {
                widget_id: widget.widget_id.clone(),
                disable: false,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let secret = s.rotate(&widget, false).await;
    assert_eq!(secret.len(), 43);
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM {{schema}}.widgets \
             WHERE identity_secret_sealed IS NOT NULL \
               AND position(convert_to('{secret}', 'UTF8') IN identity_secret_sealed) = 0"
        ))
        .await,
        1,
        "sealed, not in clear"
    );
    let shown = s
        .stack
        .widget_client()
        .await
        .get_widget(with_token(
            &s.owner,
            pb::GetWidgetRequest {
                widget_id: widget.widget_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(shown.identity_verification);

    // The laptop and then the phone of customer 42: one visit, one token.
    let signature = sign(&secret, "customer-42");
    let laptop = s
        .start_identified(&widget, "", "customer-42", &signature)
        .await
        .unwrap();
    assert!(laptop.identified && !laptop.resumed);
    s.consent(&laptop.visitor_token, 1, true).await;
    let phone = s
        .start_identified(&widget, "", "customer-42", &signature)
        .await
        .unwrap();
    assert!(phone.identified && phone.resumed);
    assert_eq!(phone.visit_id, laptop.visit_id);
    assert_eq!(phone.visitor_token, laptop.visitor_token);
    assert!(
        phone.consent.is_some_and(|c| c.granted),
        "the phone sees the laptop's consent"
    );
    assert_eq!(
        s.count(
            "SELECT count(*) AS n FROM {schema}.visits \
             WHERE position(convert_to('customer-42', 'UTF8') IN identity_sha256) > 0"
        )
        .await,
        0,
        "the site's id is stored only as a keyed hash"
    );

    // Unsigned, or signed wrongly: ignored, an anonymous visit of its own.
    for signature in ["", &sign("another secret", "customer-42")] {
        let anonymous = s
            .start_identified(&widget, "", "customer-42", signature)
            .await
            .unwrap();
        assert!(!anonymous.identified);
        assert_ne!(anonymous.visit_id, laptop.visit_id);
    }
    // Signed over another time than the one given, more than a day ago, or too far ahead:
    // ignored too. A copied signature is good for a day at most.
    let now = chrono::Utc::now().timestamp();
    for (signed, given) in [
        (now - 60, now),
        (now - 25 * 3600, now - 25 * 3600),
        (now + 3600, now + 3600),
    ] {
        let anonymous = s
            .start_identified_at(
                &widget,
                "",
                "customer-42",
                &sign_at(&secret, "customer-42", signed),
                given,
            )
            .await
            .unwrap();
        assert!(!anonymous.identified, "signed {signed}, given {given}");
        assert_ne!(anonymous.visit_id, laptop.visit_id);
    }
    let recent = s
        .start_identified_at(
            &widget,
            "",
            "customer-42",
            &sign_at(&secret, "customer-42", now - 23 * 3600),
            now - 23 * 3600,
        )
        .await
        .unwrap();
    assert!(recent.identified && recent.visit_id == laptop.visit_id);
    // Malformed: the field is named, nothing stored.
    let visits_before = s.count("SELECT count(*) AS n FROM {schema}.visits").await;
    let bad = s
        .start_identified(&widget, "", "customer-42", "not hex")
        .await
        .unwrap_err();
    assert_eq!(
        (bad.code(), field(&bad).as_str()),
        (Code::InvalidArgument, "identity_signature")
    );
    let bad = s
        .start_identified_at(&widget, "", "customer-42", &signature, 0)
        .await
        .unwrap_err();
    assert_eq!(
        (bad.code(), field(&bad).as_str()),
        (Code::InvalidArgument, "identity_issued_at")
    );
    let long = "x".repeat(201);
    let bad = s
        .start_identified(&widget, "", &long, &sign(&secret, &long))
        .await
        .unwrap_err();
    assert_eq!(
        (bad.code(), field(&bad).as_str()),
        (Code::InvalidArgument, "external_id")
    );
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.visits").await,
        visits_before
    );

    // A visitor who chatted anonymously logs in on the site: that visit becomes theirs, with a
    // new token; the old one is dead.
    let before = s.visit(&widget).await;
    let adopted = s
        .start_identified(
            &widget,
            &before.visitor_token,
            "customer-7",
            &sign(&secret, "customer-7"),
        )
        .await
        .unwrap();
    assert!(adopted.identified && adopted.resumed);
    assert_eq!(adopted.visit_id, before.visit_id);
    assert_ne!(adopted.visitor_token, before.visitor_token);
    let dead = s
        .stack
        .visitor_client()
        .await
        .get_my_data(visitor(&before.visitor_token, pb::GetMyDataRequest {}))
        .await
        .unwrap_err();
    assert_eq!(dead.code(), Code::Unauthenticated);

    // Once that visit expired (its row still there until the purge), the person's next
    // anonymous visit becomes theirs on login.
    let schema = format!("t_{}", s.tenant.id.replace('-', ""));
    diesel::sql_query(format!(
        "UPDATE {schema}.visits SET expires_at = now() - interval '1 day' WHERE id = '{}'",
        adopted.visit_id
    ))
    .execute(&mut s.stack.db.connect_admin().await)
    .await
    .unwrap();
    let later = s.visit(&widget).await;
    let relogin = s
        .start_identified(
            &widget,
            &later.visitor_token,
            "customer-7",
            &sign(&secret, "customer-7"),
        )
        .await
        .unwrap();
    assert!(relogin.identified && relogin.resumed);
    assert_eq!(relogin.visit_id, later.visit_id);

    // A new secret: signatures made with the old one are ignored; disabled: all are.
    let rotated = s.rotate(&widget, false).await;
    assert_ne!(rotated, secret);
    let stale = s
        .start_identified(&widget, "", "customer-42", &signature)
        .await
        .unwrap();
    assert!(!stale.identified);
    let fresh = s
        .start_identified(&widget, "", "customer-42", &sign(&rotated, "customer-42"))
        .await
        .unwrap();
    assert!(fresh.identified);
    assert_eq!(fresh.visit_id, laptop.visit_id, "the person's visit stays");
    assert_ne!(
        fresh.visitor_token, laptop.visitor_token,
        "with a token of the new secret"
    );
    let revoked = s
        .stack
        .visitor_client()
        .await
        .get_my_data(visitor(&laptop.visitor_token, pb::GetMyDataRequest {}))
        .await
        .unwrap_err();
    assert_eq!(
        revoked.code(),
        Code::Unauthenticated,
        "tokens given out under the old secret are dead"
    );
    assert!(s.rotate(&widget, true).await.is_empty());
    let off = s
        .start_identified(&widget, "", "customer-42", &sign(&rotated, "customer-42"))
        .await
        .unwrap();
    assert!(!off.identified);

    // Each change of the secret is audited, never with the secret.
    hafen_testkit::eventually(
        "the secret's changes chained",
        Duration::from_secs(10),
        || async {
            let chained = s
                .count(
                    "SELECT count(*) AS n FROM hafen.audit_events \
                     WHERE action LIKE 'webchat.widget.identity_secret_%'",
                )
                .await;
            (chained >= 3).then_some(())
        },
    )
    .await;
    assert_eq!(
        s.count(&format!(
            "SELECT count(*) AS n FROM hafen.audit_events \
             WHERE attributes::text LIKE '%{}%'",
            &rotated[..20]
        ))
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cb1_outside_business_hours_no_chat_opens_and_the_offline_form_leaves_the_message() {
    use chrono::Datelike;
    use hafen_proto::messaging::v1 as msg_pb;
    let s = setup().await;
    // Open only on a weekday three days from today (UTC): closed now, whatever the hour.
    let closed_today = (chrono::Utc::now().weekday().number_from_monday() + 2) % 7 + 1;
    let mut hours = settings();
    hours.business_hours = Some(pb::BusinessHours {
        time_zone: "Mars/Olympus_Mons".into(),
        intervals: vec![pb::OpeningInterval {
            weekday: i32::try_from(closed_today).unwrap(),
            open: "00:00".into(),
            close: "23:59".into(),
        }],
    });
    let refused = s
        .stack
        .widget_client()
        .await
        .create_widget(with_token(
            &s.owner,
            pb::CreateWidgetRequest {
                settings: Some(hours.clone()),
                enabled: true,
                consent_text: "Consent".into(),
                request_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), field(&refused).as_str()),
        (Code::InvalidArgument, "settings.business_hours.time_zone")
    );
    hours.business_hours.as_mut().unwrap().time_zone = "UTC".into();
    let (widget, agent) = s.widget_with_agent(hours).await;
    let config = s
        .stack
        .visitor_client()
        .await
        .get_widget_config(from(
            ORIGIN,
            pb::GetWidgetConfigRequest {
                widget_id: widget.widget_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!config.online, "closed now");

    let visit = s.visit(&widget).await;
    let token = visit.visitor_token.as_str();
    s.submit(token, &[("topic", "Billing", false)])
        .await
        .unwrap();
    let message = |body: &str| pb::SendVisitorMessageRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        body: body.into(),
    };
    let closed = s
        .stack
        .visitor_client()
        .await
        .send_visitor_message(visitor(token, message("Anyone there?")))
        .await
        .unwrap_err();
    assert_eq!(
        (closed.code(), reason(&closed).as_str()),
        (Code::FailedPrecondition, "AGENT_UNAVAILABLE")
    );
    // The offline form needs consent even though this widget allows anonymous chats.
    let unconsented = s
        .stack
        .visitor_client()
        .await
        .leave_message(visitor(token, message("Please call me back")))
        .await
        .unwrap_err();
    assert_eq!(reason(&unconsented), "CONSENT_REQUIRED");
    assert_eq!(
        s.count("SELECT count(*) AS n FROM {schema}.visits WHERE conversation_id IS NOT NULL")
            .await,
        0,
        "no chat was opened"
    );
    s.consent(token, 1, true).await;
    let left = s
        .stack
        .visitor_client()
        .await
        .leave_message(visitor(token, message("Please call me back")))
        .await
        .unwrap()
        .into_inner();
    assert!(left.from_visitor);

    // The agent finds it when back and answers; the chat goes on outside the hours.
    let chat = s.agent_chat(&agent).await;
    s.stack
        .messaging_client()
        .await
        .send_message(with_token(
            &agent,
            msg_pb::SendMessageRequest {
                conversation_id: chat,
                request_id: uuid::Uuid::now_v7().to_string(),
                body: "Calling you tomorrow".into(),
            },
        ))
        .await
        .unwrap();
    s.stack
        .visitor_client()
        .await
        .send_visitor_message(visitor(token, message("Thanks!")))
        .await
        .unwrap();
    let data = s
        .stack
        .visitor_client()
        .await
        .get_my_data(visitor(token, pb::GetMyDataRequest {}))
        .await
        .unwrap()
        .into_inner();
    let bodies: Vec<&str> = data.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(
        bodies,
        ["Please call me back", "Calling you tomorrow", "Thanks!"]
    );

    // Without opening hours the widget is online.
    let mut always = settings();
    always.agent_user_ids = widget.settings.clone().unwrap().agent_user_ids;
    s.stack
        .widget_client()
        .await
        .update_widget(with_token(
            &s.owner,
            pb::UpdateWidgetRequest {
                widget_id: widget.widget_id.clone(),
                settings: Some(always),
                enabled: true,
            },
        ))
        .await
        .unwrap();
    let config = s
        .stack
        .visitor_client()
        .await
        .get_widget_config(from(
            ORIGIN,
            pb::GetWidgetConfigRequest {
                widget_id: widget.widget_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(config.online);
}

/// Visitors' messages into their chats are checked and stored in batches (the group commit's
/// `store_visitor_messages`), many visits' at once; a message that fails its checks (consent
/// withdrawn) is refused alone, the rest of its batch is stored, and a retry returns the first
/// message.
#[tokio::test(flavor = "multi_thread")]
async fn cb1_visitors_messages_are_committed_in_batches_and_a_refused_one_fails_alone() {
    const VISITS: usize = 12;
    const EACH: usize = 5;
    let s = setup().await;
    // Calls of PL/pgSQL functions are counted on connections opened from now on (the
    // committers open theirs with their first batch).
    let mut admin = s.stack.db.connect_admin().await;
    diesel::sql_query(format!(
        "ALTER DATABASE \"{}\" SET track_functions = 'pl'",
        s.stack.db.name()
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let mut strict = settings();
    strict.allow_anonymous_chat = false;
    let (widget, _) = s.widget_with_agent(strict).await;
    let visitors = s.stack.visitor_client().await;
    let send = |token: String, request_id: uuid::Uuid, body: String| {
        let mut visitors = visitors.clone();
        async move {
            visitors
                .send_visitor_message(visitor(
                    &token,
                    pb::SendVisitorMessageRequest {
                        request_id: request_id.to_string(),
                        body,
                    },
                ))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let mut visits = Vec::new();
    for _ in 0..VISITS {
        let visit = s.visit(&widget).await;
        s.consent(&visit.visitor_token, 1, true).await;
        s.submit(&visit.visitor_token, &[("topic", "returns", false)])
            .await
            .unwrap();
        // The first message opens the chat.
        send(
            visit.visitor_token.clone(),
            uuid::Uuid::now_v7(),
            "first".into(),
        )
        .await
        .unwrap();
        visits.push(visit);
    }
    s.consent(&visits[0].visitor_token, 1, false).await;

    let sends = visits.iter().flat_map(|visit| {
        (0..EACH).map(|i| {
            send(
                visit.visitor_token.clone(),
                uuid::Uuid::now_v7(),
                format!("message {i}"),
            )
        })
    });
    let results = futures::future::join_all(sends).await;
    for (i, result) in results.iter().enumerate() {
        if i < EACH {
            let refused = result.as_ref().expect_err("consent withdrawn");
            assert_eq!(reason(refused), "CONSENT_REQUIRED");
        } else {
            let sent = result.as_ref().expect("stored");
            assert!(sent.from_visitor && sent.body.starts_with("message "));
        }
    }
    let from = |visit: &pb::StartVisitResponse| {
        format!(
            "SELECT count(*) AS n FROM {{schema}}.messages WHERE sender_id = '{}'",
            visit.visit_id
        )
    };
    assert_eq!(
        s.count(&from(&visits[0])).await,
        1,
        "only the first message"
    );
    for visit in &visits[1..] {
        assert_eq!(s.count(&from(visit)).await, 1 + EACH as i64);
    }
    // Sequences in each chat run on without a gap or a repeat.
    assert_eq!(
        s.count(
            "SELECT count(*) AS n FROM (SELECT conversation_id FROM {schema}.messages \
             GROUP BY conversation_id HAVING max(sequence) - min(sequence) + 1 <> count(*) \
             OR count(DISTINCT sequence) <> count(*)) gaps"
        )
        .await,
        0
    );

    // A retry, through the batch, returns the first message and stores nothing.
    let token = visits[1].visitor_token.clone();
    let request_id = uuid::Uuid::now_v7();
    let first = send(token.clone(), request_id, "once".into())
        .await
        .unwrap();
    let again = send(token, request_id, "once".into()).await.unwrap();
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(again.body, "once");
    assert_eq!(s.count(&from(&visits[1])).await, 2 + EACH as i64);

    // The batches went through `store_visitor_messages` (its calls reach the statistics once
    // the committer's connection reports them).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let calls = s
            .count(
                "SELECT coalesce(sum(calls), 0)::bigint AS n FROM pg_stat_user_functions \
                 WHERE funcname = 'store_visitor_messages'",
            )
            .await;
        if calls > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no call of store_visitor_messages"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every replica counts a subject's calls together: each counts at once on its own and syncs
/// with Redis in the background, learning the others' counts with each sync; a visitor whose
/// calls are spread over two replicas gets the limit once (and what one sync lets through),
/// not once per replica.
#[tokio::test(flavor = "multi_thread")]
async fn webchat_limits_are_counted_together_by_every_replica() {
    use hafen_webchat::limits::{LimitArgs, Limits, Subject};
    const LIMIT: u32 = 10;
    let stack = TestStack::start().await;
    let redis = hafen_authn::Redis::connect(&stack.secrets.redis_args())
        .await
        .unwrap();
    let window = Duration::from_secs(3600);
    let args = LimitArgs {
        visits_per_address: 1,
        visits_per_widget: 1,
        calls_per_visitor: LIMIT,
        lookups_per_address: 1,
        limit_window: window,
        trusted_proxies: Vec::new(),
        client_address_header: "x-forwarded-for".into(),
    };
    let key = *hafen_crypto::DataKey::generate().unwrap().expose();
    let (a, b) = (
        Limits::new(
            args.clone(),
            Some(redis.clone()),
            hafen_crypto::DataKey::from_bytes(key),
        ),
        Limits::new(
            args,
            Some(redis.clone()),
            hafen_crypto::DataKey::from_bytes(key),
        ),
    );
    // Not across the turn of a window.
    let window_ms = window.as_millis() as i64;
    let into = chrono::Utc::now().timestamp_millis() % window_ms;
    if window_ms - into < 30_000 {
        tokio::time::sleep(Duration::from_millis((window_ms - into) as u64 + 100)).await;
    }
    let slot = chrono::Utc::now().timestamp_millis() / window_ms;
    let visit = uuid::Uuid::now_v7();
    let counter = redis.key(&format!("webchat:limit:visit:{}:{slot}", visit.simple()));
    let in_redis = |expected: u64| {
        let (redis, counter) = (redis.clone(), counter.clone());
        async move {
            hafen_testkit::eventually("the counts synced", Duration::from_secs(10), || {
                let (redis, counter) = (redis.clone(), counter.clone());
                async move {
                    let n: Option<u64> = redis::cmd("GET")
                        .arg(&counter)
                        .query_async(&mut redis.conn())
                        .await
                        .ok()
                        .flatten();
                    (n == Some(expected)).then_some(())
                }
            })
            .await;
            // The replica has taken in the answer of the sync that wrote it.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    for _ in 0..6 {
        a.count(Subject::Visitor(visit)).unwrap();
    }
    in_redis(6).await;
    // B has not counted yet: it learns A's calls with its first sync.
    b.count(Subject::Visitor(visit)).unwrap();
    in_redis(7).await;
    for _ in 7..LIMIT {
        b.count(Subject::Visitor(visit)).unwrap();
    }
    let wait = b
        .count(Subject::Visitor(visit))
        .expect_err("the eleventh call, on either replica");
    assert!(wait <= window);
    in_redis(u64::from(LIMIT)).await;
    // A learns B's calls with its next sync: the call that syncs is the one it lets through
    // over the limit (at most what a replica gets within one sync), then it refuses too.
    a.count(Subject::Visitor(visit)).unwrap();
    in_redis(u64::from(LIMIT) + 1).await;
    assert!(
        a.count(Subject::Visitor(visit)).is_err(),
        "A has learnt B's calls"
    );
    // The counter goes with its window.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&counter)
        .query_async(&mut redis.conn())
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= window_ms, "{ttl}");
}

/// The next item of a visitor's stream, within 10 s.
async fn next_visit_item(
    stream: &mut tonic::Streaming<pb::SubscribeVisitResponse>,
) -> Result<pb::SubscribeVisitResponse, tonic::Status> {
    use tokio_stream::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an item within 10 s")
        .expect("open")
}

/// A visitor's stream replayed to its CaughtUp: the messages' sequences and the cursors.
async fn replay(stream: &mut tonic::Streaming<pb::SubscribeVisitResponse>) -> Vec<(u64, String)> {
    let mut replayed = Vec::new();
    loop {
        let item = next_visit_item(stream).await.unwrap();
        match item.event.unwrap() {
            pb::subscribe_visit_response::Event::MessageCreated(m) => {
                replayed.push((m.sequence, item.cursor));
            }
            pb::subscribe_visit_response::Event::CaughtUp(_) => return replayed,
            other => panic!("a creation, not {other:?}"),
        }
    }
}

/// Visitors' streams fed by the tenant's watcher while visitors and the agent write at once:
/// each stream gets every message of its own chat exactly once, in order, and nothing of the
/// others; a stream resumed from a cursor gets exactly the rest; deleting the visitor's data
/// ends their stream (BX4).
#[tokio::test(flavor = "multi_thread")]
async fn bx4_visitor_streams_get_every_message_of_their_chat_once_in_order_while_all_write() {
    use hafen_proto::messaging::v1 as msg_pb;
    const VISITS: usize = 4;
    const EACH: usize = 15;
    let s = setup().await;
    let (widget, agent) = s.widget_with_agent(settings()).await;
    let visitors = s.stack.visitor_client().await;
    let mut visits = Vec::new();
    for _ in 0..VISITS {
        let visit = s.visit(&widget).await;
        let token = visit.visitor_token.clone();
        s.submit(&token, &[("topic", "returns", false)])
            .await
            .unwrap();
        visitors
            .clone()
            .send_visitor_message(visitor(
                &token,
                pb::SendVisitorMessageRequest {
                    request_id: uuid::Uuid::now_v7().to_string(),
                    body: "first".into(),
                },
            ))
            .await
            .unwrap();
        let chat = s.chat_of(&visit.visit_id).await;
        let mut stream = visitors
            .clone()
            .subscribe_visit(visitor(&token, pb::SubscribeVisitRequest::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(replay(&mut stream).await.len(), 1);
        visits.push((token, chat, stream));
    }

    // Every visitor and the agent write into every chat at once.
    let messaging = s.stack.messaging_client().await;
    let mut writes = Vec::new();
    for (token, chat, _) in &visits {
        for i in 0..EACH {
            let (mut visitors, token) = (visitors.clone(), token.clone());
            writes.push(tokio::spawn(async move {
                visitors
                    .send_visitor_message(visitor(
                        &token,
                        pb::SendVisitorMessageRequest {
                            request_id: uuid::Uuid::now_v7().to_string(),
                            body: format!("visitor {i}"),
                        },
                    ))
                    .await
                    .map(drop)
            }));
            let (mut messaging, agent, chat) = (messaging.clone(), agent.clone(), chat.clone());
            writes.push(tokio::spawn(async move {
                messaging
                    .send_message(with_token(
                        &agent,
                        msg_pb::SendMessageRequest {
                            conversation_id: chat,
                            request_id: uuid::Uuid::now_v7().to_string(),
                            body: format!("agent {i}"),
                        },
                    ))
                    .await
                    .map(drop)
            }));
        }
    }
    for write in writes {
        write.await.unwrap().unwrap();
    }

    let total = 1 + 2 * EACH as u64;
    let mut cursors = Vec::new();
    for (_, _, stream) in &mut visits {
        let mut seen = Vec::new();
        while seen.len() < 2 * EACH {
            let item = next_visit_item(stream).await.unwrap();
            match item.event.unwrap() {
                pb::subscribe_visit_response::Event::MessageCreated(m) => {
                    seen.push((m.sequence, item.cursor));
                }
                other => panic!("a creation, not {other:?}"),
            }
        }
        let sequences: Vec<u64> = seen.iter().map(|(sequence, _)| *sequence).collect();
        assert_eq!(
            sequences,
            (2..=total).collect::<Vec<_>>(),
            "every message once, in order"
        );
        let numbers: Vec<i64> = seen.iter().map(|(_, c)| c.parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        cursors.push(seen[9].1.clone());
    }

    // Resumed from its tenth live item, a stream gets exactly the rest.
    let (token, _, _) = &visits[0];
    let mut resumed = visitors
        .clone()
        .subscribe_visit(visitor(
            token,
            pb::SubscribeVisitRequest {
                after: cursors[0].clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let rest: Vec<u64> = replay(&mut resumed)
        .await
        .into_iter()
        .map(|(sequence, _)| sequence)
        .collect();
    assert_eq!(rest, (12..=total).collect::<Vec<_>>());
    drop(resumed);

    // Deleting the visitor's data ends their stream.
    let (token, _, stream) = &mut visits[1];
    visitors
        .clone()
        .delete_my_data(visitor(token, pb::DeleteMyDataRequest {}))
        .await
        .unwrap();
    let ended = loop {
        match next_visit_item(stream).await {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unauthenticated);
}
