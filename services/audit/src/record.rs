//! The record of processing activities (GDPR Art. 30, GR7), built from the tenant's live
//! configuration: its control-plane row (name, slug, region, accepted DPA), its settings
//! (retention period, masking rules, features), the operator's [`RecordArgs`], and what the
//! running services report about themselves ([`hafen_store::facts`]: how each secures its
//! links, which deletions and other measures it carries out). A technical measure is stated
//! only when those reports show it in force, never from fixed text. [`build`] is pure, so
//! what the record says about a configuration is tested without a database.
//!
//! The record names no person: the controller appears by its organisation name, never by
//! the user who accepted the DPA.

use chrono::{DateTime, Utc};
use hafen_store::control::TenantRow;
use hafen_store::facts::{BackupRun, ServiceFacts, measure};
use hafen_store::settings::{MAX_RETENTION_DAYS, Settings};
use serde::Serialize;

use crate::RecordArgs;

/// The record. Its top-level fields are the JSON document's top-level keys.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The tenant, as controller.
    pub controller: Controller,
    /// The operator, as processor.
    pub processor: Processor,
    /// Purposes of the processing.
    pub purposes: Vec<String>,
    /// Categories of data subjects.
    pub data_subject_categories: Vec<String>,
    /// Categories of personal data.
    pub data_categories: Vec<DataCategory>,
    /// Recipients.
    pub recipients: Vec<String>,
    /// Retention periods.
    pub retention: Retention,
    /// Transfers to third countries.
    pub third_country_transfers: ThirdCountryTransfers,
    /// Technical and organisational measures in force (Art. 32).
    pub technical_organisational_measures: Measures,
}

/// The controller: the tenant's organisation.
#[derive(Debug, Clone, Serialize)]
pub struct Controller {
    /// Organisation name.
    pub name: String,
    /// The tenant's slug.
    pub slug: String,
    /// The tenant id.
    pub tenant_id: String,
    /// Hosting region.
    pub region: String,
    /// The accepted data-processing agreement.
    pub dpa_version: String,
    /// When it was accepted (RFC 3339).
    pub dpa_accepted_at: String,
    /// The tenant's privacy policy, or empty.
    pub privacy_policy_url: String,
}

/// The processor: the operator of the installation.
#[derive(Debug, Clone, Serialize)]
pub struct Processor {
    /// Name.
    pub name: String,
    /// Contact of the data-protection officer, or empty.
    pub contact: String,
    /// The agreement the processing is governed by.
    pub agreement: String,
}

/// A category of personal data.
#[derive(Debug, Clone, Serialize)]
pub struct DataCategory {
    /// Name of the category.
    pub category: String,
    /// What it holds and how it is protected.
    pub details: String,
}

/// Retention periods.
#[derive(Debug, Clone, Serialize)]
pub struct Retention {
    /// Messages are deleted this many days after they were sent.
    pub messages_days: u32,
    /// The hard maximum any tenant may set.
    pub maximum_days: u32,
    /// How conversation policies relate to the tenant's period.
    pub conversations: String,
    /// Legal holds.
    pub legal_holds: String,
    /// Accounts, sessions and keys.
    pub accounts: String,
    /// Audit events.
    pub audit_events: String,
}

/// Transfers to third countries.
#[derive(Debug, Clone, Serialize)]
pub struct ThirdCountryTransfers {
    /// Whether the software transfers any data to a third country.
    pub transfers: bool,
    /// Where the data is hosted.
    pub hosting_region: String,
    /// The statement.
    pub statement: String,
}

/// Technical and organisational measures.
#[derive(Debug, Clone, Serialize)]
pub struct Measures {
    /// Encryption in transit, as the running services report their links.
    pub transport_encryption: String,
    /// Mutual TLS between the services.
    pub mutual_tls_between_services: bool,
    /// The reports the measures are taken from.
    pub links: Links,
    /// Encryption at rest.
    pub encryption_at_rest: String,
    /// Separation of tenants.
    pub tenant_isolation: String,
    /// Masking of message bodies.
    pub masking: Masking,
    /// Access control.
    pub access_control: String,
    /// Backups.
    pub backups: String,
    /// The audit log.
    pub audit_log: String,
}

/// How the running services' links are secured, as they report it.
#[derive(Debug, Clone, Serialize)]
pub struct Links {
    /// The services that reported (one entry per service, however many instances).
    pub reporting_services: Vec<String>,
    /// Every reported database link is encrypted.
    pub database_encrypted: bool,
    /// The weakest `sslmode` reported for a database link.
    pub weakest_database_sslmode: String,
    /// Every reported Redis link is TLS.
    pub redis_encrypted: bool,
}

/// Masking rules as configured (UL1, UL2).
#[derive(Debug, Clone, Serialize)]
pub struct Masking {
    /// E-mail addresses are masked.
    pub email: bool,
    /// Phone numbers are masked.
    pub phone: bool,
    /// IBANs are masked.
    pub iban: bool,
    /// Payment card numbers are masked (always).
    pub payment_card_numbers: bool,
    /// Names of the tenant's own patterns.
    pub custom_patterns: Vec<String>,
}

/// Builds `tenant`'s record from its configuration. The record states only the
/// configuration, so two records of an unchanged configuration are identical; the time of
/// generation travels beside it.
pub fn build(
    tenant: &TenantRow,
    processor: &RecordArgs,
    facts: &[ServiceFacts],
    backups: Option<&BackupRun>,
) -> Record {
    let settings = Settings::from_json(&tenant.settings);
    let reports = |measure: &str| {
        facts
            .iter()
            .any(|f| f.measures.iter().any(|m| m == measure))
    };
    let (transport_encryption, links, mutual_tls) = transport(facts);
    let webchat = settings.features.webchat;
    let mut purposes = vec![
        "Internal business communication of the controller's organisation: conversations, \
         groups and channels between its users"
            .to_owned(),
        "Authentication of users and their devices (chat codes), session management and remote \
         wipe of lost devices"
            .to_owned(),
        "Security of the service: rate limiting of failed logins and a tamper-evident audit log"
            .to_owned(),
        "Deletion of messages after the retention period and of accounts and tenants on request"
            .to_owned(),
    ];
    let mut subjects = vec![
        "Users of the controller's organisation (employees and other persons it gives an account)"
            .to_owned(),
        "Persons mentioned in message content".to_owned(),
    ];
    if webchat {
        purposes.push("Website chat between the controller's staff and anonymous visitors".into());
        subjects.push("Visitors of the controller's website who use the chat".into());
    }
    let retention_days = settings.retention_days;
    Record {
        controller: Controller {
            name: tenant.display_name.clone().unwrap_or_default(),
            slug: tenant.slug.clone().unwrap_or_default(),
            tenant_id: tenant.id.to_string(),
            region: tenant.region.clone(),
            dpa_version: tenant.dpa_version.clone(),
            dpa_accepted_at: hafen_events::chain::rfc3339(tenant.dpa_accepted_at),
            privacy_policy_url: settings.privacy_policy_url.clone(),
        },
        processor: Processor {
            name: processor.processor_name.clone(),
            contact: processor.processor_contact.clone(),
            agreement: format!(
                "Data-processing agreement version {} (Art. 28 GDPR)",
                tenant.dpa_version
            ),
        },
        purposes,
        data_subject_categories: subjects,
        data_categories: vec![
            DataCategory {
                category: "Account data".into(),
                details: "Username, display name, role, account status, password hash (bcrypt), \
                          optional TOTP secret (encrypted)"
                    .into(),
            },
            DataCategory {
                category: "Device and session data".into(),
                details: "Chat codes per device (stored as keyed hashes), device labels, session \
                          times and their end reasons"
                    .into(),
            },
            DataCategory {
                category: "Message content".into(),
                details: "Message bodies, masked by the rules below before storage and encrypted \
                          at rest"
                    .into(),
            },
            DataCategory {
                category: "Communication metadata".into(),
                details: "Conversations, their members, and when messages were sent, edited or \
                          deleted"
                    .into(),
            },
            DataCategory {
                category: "Audit events".into(),
                details: "Who did what and when, as ids, actions and counts; never message \
                          content, passwords, tokens or chat codes"
                    .into(),
            },
        ],
        recipients: vec![
            format!(
                "The processor ({}), which operates the service on the controller's behalf",
                processor.processor_name
            ),
            "Users of the controller's organisation, within the conversations they are members of"
                .into(),
            "No other recipients: the service discloses no personal data to third parties".into(),
        ],
        retention: Retention {
            messages_days: retention_days,
            maximum_days: MAX_RETENTION_DAYS,
            conversations: format!(
                "Conversations may set a shorter period, never a longer one than \
                 {retention_days} days; no period exceeds {MAX_RETENTION_DAYS} days"
            ),
            legal_holds: "A legal hold on a conversation or user pauses deletion until it is \
                          lifted; setting and lifting it are audited"
                .into(),
            accounts: accounts_retention(
                reports(measure::TENANT_DELETION),
                reports(measure::USER_ERASURE),
            ),
            audit_events: "Kept as a hash chain for accountability; ids and actions only".into(),
        },
        third_country_transfers: ThirdCountryTransfers {
            transfers: false,
            hosting_region: tenant.region.clone(),
            statement: format!(
                "The data is stored and processed in the hosting region {}. The service itself \
                 transfers no personal data to third countries.",
                tenant.region
            ),
        },
        technical_organisational_measures: Measures {
            transport_encryption,
            mutual_tls_between_services: mutual_tls,
            links,
            encryption_at_rest: if reports(measure::ENCRYPTED_MESSAGES) {
                let keys = if reports(measure::KEY_STORE_APART) {
                    "; the wrapped keys and the deletion log are kept in a key store apart from \
                     the tenant data, so no backup of the data holds a key, and erasing a user \
                     or deleting the organisation destroys their keys in every backup"
                } else {
                    ""
                };
                format!(
                    "Message bodies encrypted with AES-256-GCM under per-user keys; user keys \
                     wrapped by the tenant key, tenant keys by a versioned master key that \
                     never enters a database and can be rotated{keys}"
                )
            } else {
                "Not stated: no running messaging service has reported it".into()
            },
            tenant_isolation:
                "Each tenant's data lives in its own PostgreSQL schema, owned by its \
                               own database role; every query runs in the tenant's scope"
                    .into(),
            masking: Masking {
                email: settings.masking.email,
                phone: settings.masking.phone,
                iban: settings.masking.iban,
                payment_card_numbers: true,
                custom_patterns: settings
                    .masking
                    .custom_patterns
                    .iter()
                    .map(|p| p.name.clone())
                    .collect(),
            },
            access_control: "Per-user accounts with roles (owner, admin, member); access tokens \
                             bound to a device's chat code, short-lived and revocable; remote \
                             wipe of devices; back-off after failed logins"
                .into(),
            backups: match backups {
                Some(run) => format!(
                    "{}; every organisation backed up by {} (UTC), encrypted (AES-256-GCM), \
                     without keys, kept {} days",
                    processor.backup_policy,
                    run.finished_at.format("%Y-%m-%d %H:%M"),
                    run.keep_days
                ),
                None => "Not stated: no complete backup of every organisation in the last 48 \
                         hours"
                    .into(),
            },
            audit_log: if reports(measure::SIGNED_AUDIT_CHAIN) {
                "Security-relevant actions and every operator access are recorded in a \
                 per-tenant hash chain (SHA-256) whose every head is signed (Ed25519); it can \
                 be verified, and exported for offline verification with the public key alone"
                    .into()
            } else {
                "Not stated: no running audit service has reported it".into()
            },
        },
    }
}

/// What the reports say about the links: the statement, the details, and whether mutual TLS
/// holds between all reporting services.
fn transport(facts: &[ServiceFacts]) -> (String, Links, bool) {
    let mut services: Vec<String> = facts.iter().map(|f| f.service.clone()).collect();
    services.sort();
    services.dedup();
    let any = !facts.is_empty();
    let services_tls = any && facts.iter().all(|f| f.service_tls);
    let mutual_tls = services_tls && facts.iter().all(|f| f.mutual_tls);
    let database_encrypted = any && facts.iter().all(ServiceFacts::database_encrypted);
    let redis_reports: Vec<bool> = facts.iter().filter_map(|f| f.redis_tls).collect();
    let redis_encrypted = !redis_reports.is_empty() && redis_reports.iter().all(|tls| *tls);
    let weakest = facts
        .iter()
        .map(|f| f.database_sslmode.clone())
        .min_by_key(|mode| match mode.as_str() {
            "verify-full" => 3,
            "verify-ca" => 2,
            "require" => 1,
            _ => 0,
        })
        .unwrap_or_default();
    let mut parts = Vec::new();
    if services_tls {
        parts.push(if mutual_tls {
            "TLS 1.2 or 1.3 for client connections and between the services, which \
             authenticate each other with client certificates naming each service"
                .to_owned()
        } else {
            "TLS 1.2 or 1.3 for client connections and between the services".to_owned()
        });
    }
    if database_encrypted {
        parts.push(format!(
            "TLS to the PostgreSQL databases (sslmode {weakest} or stricter)"
        ));
    }
    if redis_encrypted {
        parts.push("TLS to Redis".to_owned());
    }
    let statement = if parts.is_empty() {
        "Not stated: no running service has reported encrypted links".to_owned()
    } else {
        parts.join("; ")
    };
    (
        statement,
        Links {
            reporting_services: services,
            database_encrypted,
            weakest_database_sslmode: weakest,
            redis_encrypted,
        },
        mutual_tls,
    )
}

/// How long accounts are kept, by the deletions that exist.
fn accounts_retention(tenant_deletion: bool, user_erasure: bool) -> String {
    let mut text = String::from("Until the tenant is deleted");
    if tenant_deletion {
        text.push_str(
            "; deleting the tenant drops its schema and database role and destroys its keys, \
             so its data can no longer be read",
        );
    }
    if user_erasure {
        text.push_str(
            "; erasing a user (by an admin, or on the user's own request) destroys the user's \
             key, so their messages can no longer be read, in backups neither, and deletes or \
             pseudonymises their account, sessions, chat codes and memberships",
        );
    } else {
        text.push_str("; single users can be deactivated, and are deleted with the tenant");
    }
    text
}

impl Record {
    /// The JSON document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The Markdown document, saying it was generated at `now`.
    pub fn to_markdown(&self, now: DateTime<Utc>) -> String {
        let c = &self.controller;
        let p = &self.processor;
        let r = &self.retention;
        let t = &self.third_country_transfers;
        let m = &self.technical_organisational_measures;
        let on = |masked: bool| if masked { "masked" } else { "not masked" };
        let mut out = String::new();
        let mut line = |text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line(format!(
            "# Record of processing activities (Art. 30 GDPR): {}",
            md(&c.name)
        ));
        line(String::new());
        line(format!(
            "Generated {} from the tenant's configuration in force at that time.",
            hafen_events::chain::rfc3339(now)
        ));
        line(String::new());
        line("## Controller".into());
        line(String::new());
        line(format!("- Organisation: {}", md(&c.name)));
        line(format!("- Tenant: {} ({})", md(&c.slug), c.tenant_id));
        line(format!("- Hosting region: {}", md(&c.region)));
        line(format!(
            "- Data-processing agreement: version {}, accepted {}",
            md(&c.dpa_version),
            c.dpa_accepted_at
        ));
        if !c.privacy_policy_url.is_empty() {
            line(format!("- Privacy policy: <{}>", md(&c.privacy_policy_url)));
        }
        line(String::new());
        line("## Processor".into());
        line(String::new());
        line(format!("- Name: {}", md(&p.name)));
        if !p.contact.is_empty() {
            line(format!("- Data-protection contact: {}", md(&p.contact)));
        }
        line(format!("- Agreement: {}", md(&p.agreement)));
        line(String::new());
        section(&mut line, "Purposes of the processing", &self.purposes);
        section(
            &mut line,
            "Categories of data subjects",
            &self.data_subject_categories,
        );
        line("## Categories of personal data".into());
        line(String::new());
        for category in &self.data_categories {
            line(format!("- {}: {}", category.category, category.details));
        }
        line(String::new());
        section(&mut line, "Recipients", &self.recipients);
        line("## Retention".into());
        line(String::new());
        line(format!(
            "- Messages: deleted after {} days (maximum {} days)",
            r.messages_days, r.maximum_days
        ));
        line(format!("- Conversations: {}", r.conversations));
        line(format!("- Legal holds: {}", r.legal_holds));
        line(format!("- Accounts: {}", r.accounts));
        line(format!("- Audit events: {}", r.audit_events));
        line(String::new());
        line("## Transfers to third countries".into());
        line(String::new());
        line(format!(
            "- {}: {}",
            if t.transfers { "Yes" } else { "None" },
            md(&t.statement)
        ));
        line(String::new());
        line("## Technical and organisational measures".into());
        line(String::new());
        line(format!(
            "- Encryption in transit: {}",
            m.transport_encryption
        ));
        line(format!("- Encryption at rest: {}", m.encryption_at_rest));
        line(format!("- Tenant isolation: {}", m.tenant_isolation));
        line("- Masking of message bodies before storage:".into());
        line(format!("  - E-mail addresses: {}", on(m.masking.email)));
        line(format!("  - Phone numbers: {}", on(m.masking.phone)));
        line(format!("  - IBANs: {}", on(m.masking.iban)));
        line(format!(
            "  - Payment card numbers: {} (always)",
            on(m.masking.payment_card_numbers)
        ));
        if m.masking.custom_patterns.is_empty() {
            line("  - Custom patterns: none".into());
        } else {
            let names: Vec<String> = m.masking.custom_patterns.iter().map(|n| md(n)).collect();
            line(format!("  - Custom patterns: {}", names.join(", ")));
        }
        line(format!("- Access control: {}", m.access_control));
        line(format!("- Backups: {}", md(&m.backups)));
        line(format!("- Audit log: {}", m.audit_log));
        out
    }
}

fn section(line: &mut impl FnMut(String), title: &str, items: &[String]) {
    line(format!("## {title}"));
    line(String::new());
    for item in items {
        line(format!("- {}", md(item)));
    }
    line(String::new());
}

/// `text` as inline Markdown: characters with a meaning escaped, line breaks flattened, so
/// a tenant's name or pattern label cannot restructure the document.
fn md(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '#' | '|' | '~' | '!' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use hafen_store::settings::{CustomPattern, Settings};
    use uuid::Uuid;

    use super::*;

    fn tenant(settings: &Settings) -> TenantRow {
        let now = hafen_store::now();
        TenantRow {
            id: Uuid::now_v7(),
            slug: Some("acme".into()),
            display_name: Some("ACME *Corp*".into()),
            status: "active".into(),
            region: "eu-central".into(),
            dpa_version: "2025-01".into(),
            dpa_accepted_at: now,
            dpa_accepted_by: Uuid::now_v7(),
            database_name: "default".into(),
            create_request_id: None,
            settings: settings.to_json(),
            created_at: now,
            updated_at: now,
            deleted_at: None,
            audit_public_key: None,
        }
    }

    /// Reports of all six services, configured alike.
    fn running(mutual_tls: bool, database_sslmode: &str, redis_tls: bool) -> Vec<ServiceFacts> {
        [
            ("auth", measure::REMOTE_WIPE),
            ("messaging", measure::ENCRYPTED_MESSAGES),
            ("tenant", measure::TENANT_DELETION),
            ("retention", measure::RETENTION_PURGE),
            ("audit", measure::SIGNED_AUDIT_CHAIN),
        ]
        .into_iter()
        .map(|(service, measure)| ServiceFacts {
            service: service.into(),
            service_tls: true,
            mutual_tls,
            database_sslmode: database_sslmode.into(),
            redis_tls: Some(redis_tls),
            measures: vec![measure.into()],
        })
        .collect()
    }

    #[test]
    fn gr7_the_record_states_only_measures_the_running_services_report() {
        let row = tenant(&Settings::default());
        let all = build(&row, &args(), &running(true, "verify-full", true), None);
        let m = &all.technical_organisational_measures;
        assert!(
            m.transport_encryption.contains("PostgreSQL"),
            "{}",
            m.transport_encryption
        );
        assert!(m.transport_encryption.contains("Redis"));
        assert!(m.links.database_encrypted && m.links.redis_encrypted);
        assert!(all.retention.accounts.contains("destroys its keys"));
        assert!(
            !all.retention.accounts.contains("erasing a user"),
            "no service erases users: {}",
            all.retention.accounts
        );
        let mut erasing = running(true, "verify-full", true);
        erasing[0].measures.push(measure::USER_ERASURE.into());
        assert!(
            build(&row, &args(), &erasing, None)
                .retention
                .accounts
                .contains("erasing a user"),
            "the auth service erases users"
        );
        assert!(
            !all.technical_organisational_measures
                .encryption_at_rest
                .contains("key store apart"),
            "no tenant service reports a key store apart"
        );
        erasing[2].measures.push(measure::KEY_STORE_APART.into());
        assert!(
            build(&row, &args(), &erasing, None)
                .technical_organisational_measures
                .encryption_at_rest
                .contains("key store apart"),
            "the tenant service keeps keys apart"
        );

        // One service with a plaintext database link: no database TLS is claimed.
        let mut mixed = running(true, "verify-full", true);
        mixed[1].database_sslmode = "disable".into();
        let record = build(&row, &args(), &mixed, None);
        let m = &record.technical_organisational_measures;
        assert!(
            !m.transport_encryption.contains("PostgreSQL"),
            "{}",
            m.transport_encryption
        );
        assert!(!m.links.database_encrypted);
        assert_eq!(m.links.weakest_database_sslmode, "disable");
        assert!(
            !record
                .to_markdown(hafen_store::now())
                .contains("TLS to the PostgreSQL")
        );

        // Nothing reported: nothing claimed.
        let none = build(&row, &args(), &[], None);
        let m = &none.technical_organisational_measures;
        assert!(m.transport_encryption.starts_with("Not stated"));
        assert!(m.encryption_at_rest.starts_with("Not stated"));
        assert!(!m.mutual_tls_between_services);
        assert!(!none.retention.accounts.contains("destroys"));
        assert!(m.backups.starts_with("Not stated"), "{}", m.backups);

        // Backups are stated while a complete run of all organisations is recent.
        let run = BackupRun {
            finished_at: hafen_store::now(),
            tenants: 3,
            failed: 0,
            keep_days: 42,
        };
        let backed_up = build(&row, &args(), &[], Some(&run));
        let m = &backed_up.technical_organisational_measures;
        assert!(m.backups.starts_with("nightly, 6 weeks;"), "{}", m.backups);
        assert!(m.backups.contains("kept 42 days"), "{}", m.backups);
    }

    fn args() -> RecordArgs {
        RecordArgs {
            processor_name: "Operator GmbH".into(),
            processor_contact: "dpo@operator.example".into(),
            backup_policy: "nightly, 6 weeks".into(),
        }
    }

    #[test]
    fn gr7_the_record_states_the_configuration_and_no_person() {
        let mut settings = Settings {
            retention_days: 90,
            ..Default::default()
        };
        settings.masking.email = true;
        settings.masking.custom_patterns.push(CustomPattern {
            name: "customer-number".into(),
            regex: r"K-\d{6}".into(),
            replacement: String::new(),
        });
        let row = tenant(&settings);
        let record = build(
            &row,
            &args(),
            &running(true, "verify-full", true),
            Some(&BackupRun {
                finished_at: hafen_store::now(),
                tenants: 1,
                failed: 0,
                keep_days: 42,
            }),
        );
        let json: serde_json::Value = serde_json::from_str(&record.to_json()).unwrap();
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = vec![
            "controller",
            "processor",
            "purposes",
            "data_subject_categories",
            "data_categories",
            "recipients",
            "retention",
            "third_country_transfers",
            "technical_organisational_measures",
        ];
        expected.sort_unstable();
        let mut keys = keys;
        keys.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(json["retention"]["messages_days"], 90);
        let masking = &json["technical_organisational_measures"]["masking"];
        assert_eq!(masking["email"], true);
        assert_eq!(masking["phone"], false);
        assert_eq!(masking["payment_card_numbers"], true);
        assert_eq!(masking["custom_patterns"][0], "customer-number");
        assert_eq!(
            json["technical_organisational_measures"]["mutual_tls_between_services"],
            true
        );
        assert!(!record.to_json().contains(&row.dpa_accepted_by.to_string()));
        assert!(
            !record.to_json().contains(r"K-\\d{6}"),
            "patterns by name only"
        );

        let markdown = record.to_markdown(hafen_store::now());
        assert!(markdown.contains("ACME \\*Corp\\*"), "{markdown}");
        assert!(markdown.contains("deleted after 90 days"));
        assert!(markdown.contains("E-mail addresses: masked"));
        assert!(markdown.contains("Phone numbers: not masked"));
        assert!(markdown.contains("Custom patterns: customer-number"));
        assert!(markdown.contains("nightly, 6 weeks"));
    }

    #[test]
    fn gr7_webchat_and_plain_tls_show_in_the_record() {
        let settings = Settings {
            features: hafen_store::settings::Features { webchat: true },
            ..Default::default()
        };
        let record = build(
            &tenant(&settings),
            &args(),
            &running(false, "verify-full", true),
            None,
        );
        assert!(record.purposes.iter().any(|p| p.contains("Website chat")));
        assert!(
            !record
                .technical_organisational_measures
                .mutual_tls_between_services
        );
        assert!(
            record
                .to_markdown(hafen_store::now())
                .contains("Custom patterns: none")
        );
        assert_eq!(record.retention.messages_days, MAX_RETENTION_DAYS);
    }
}
