//! The audit service against real PostgreSQL and Redis, services over TLS (BX2, BX6, GR7,
//! TM2).
//!
//! Other services deliver their own events to the same chains while a test runs, so no test
//! assumes a chain is empty: each appends its own events and finds them by action, or uses a
//! chain of a fresh tenant id that nothing else writes to.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use hafen_platform::status;
use hafen_proto::audit::v1 as pb;
use hafen_proto::audit::v1::audit_service_client::AuditServiceClient;
use hafen_proto::tenant::v1 as tenant_pb;
use hafen_testkit::{Channel, TestStack, TestTenant, with_token};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Code;
use uuid::Uuid;

struct Setup {
    stack: TestStack,
    tenant: TestTenant,
    owner: String,
    /// A client presenting the messaging service's certificate, for AppendEvents.
    internal: AuditServiceClient<Channel>,
}

async fn setup() -> Setup {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("audit").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let channel = stack
        .audit
        .try_channel(stack.secrets.client_tls(Some("messaging")))
        .await
        .unwrap();
    Setup {
        stack,
        tenant,
        owner,
        internal: AuditServiceClient::new(channel),
    }
}

impl Setup {
    async fn client(&self) -> AuditServiceClient<Channel> {
        self.stack.audit_client().await
    }

    async fn append(&mut self, events: Vec<pb::AuditEvent>) -> pb::AppendEventsResponse {
        self.internal
            .append_events(pb::AppendEventsRequest { events })
            .await
            .unwrap()
            .into_inner()
    }

    async fn verify(&self) -> pb::VerifyChainResponse {
        self.client()
            .await
            .verify_chain(with_token(&self.owner, pb::VerifyChainRequest::default()))
            .await
            .unwrap()
            .into_inner()
    }

    /// The owner's listing of one action (or prefix), oldest first.
    async fn list(&self, action: &str) -> Vec<pb::AuditEvent> {
        self.client()
            .await
            .list_events(with_token(
                &self.owner,
                pb::ListEventsRequest {
                    action: action.into(),
                    page_size: 500,
                    oldest_first: true,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .events
    }

    /// A member's access token.
    async fn member(&self) -> String {
        let (_, session) = self
            .stack
            .create_logged_in_member(&self.tenant, &self.owner, "colleague", "colleague password")
            .await;
        session.access_token
    }
}

/// A valid event of `tenant` (empty: the platform chain), as a service would send it.
fn event(tenant: &str, action: &str) -> pb::AuditEvent {
    event_at(tenant, action, chrono::Utc::now())
}

fn event_at(tenant: &str, action: &str, time: chrono::DateTime<chrono::Utc>) -> pb::AuditEvent {
    pb::AuditEvent {
        event_id: Uuid::now_v7().to_string(),
        tenant_id: tenant.into(),
        time: Some(hafen_platform::timestamp(time)),
        actor: Some(pb::Actor {
            kind: pb::ActorKind::Service as i32,
            id: "hafen-test".into(),
        }),
        action: action.into(),
        target_type: "user".into(),
        target_id: Uuid::now_v7().to_string(),
        outcome: pb::Outcome::Success as i32,
        attributes: [("count".to_owned(), "3".to_owned())].into(),
        ..Default::default()
    }
}

fn reason(status: &tonic::Status) -> String {
    status::reason(status).unwrap_or_default()
}

fn field(status: &tonic::Status) -> String {
    status::metadata(status, "field").unwrap_or_default()
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Rows stored in `chain`, and whether it has a head row.
async fn stored(stack: &TestStack, chain: Uuid) -> (i64, bool) {
    let mut conn = stack.db.connect().await;
    let rows = diesel::sql_query("SELECT count(*) AS n FROM hafen.audit_events WHERE chain = $1")
        .bind::<SqlUuid, _>(chain)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n;
    let heads = diesel::sql_query("SELECT count(*) AS n FROM hafen.audit_heads WHERE chain = $1")
        .bind::<SqlUuid, _>(chain)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n;
    (rows, heads == 1)
}

async fn sql(stack: &TestStack, statement: &str, chain: &str, sequence: u64) -> usize {
    let mut conn = stack.db.connect().await;
    diesel::sql_query(statement)
        .bind::<SqlUuid, _>(Uuid::parse_str(chain).unwrap())
        .bind::<BigInt, _>(i64::try_from(sequence).unwrap())
        .execute(&mut conn)
        .await
        .unwrap()
}

/// Collects an export's chunks, checking their framing; returns the document and the last
/// chunk.
async fn collect_export(
    mut stream: tonic::Streaming<pb::ExportAuditLogResponse>,
) -> (Vec<u8>, pb::ExportAuditLogResponse) {
    let mut document = Vec::new();
    let mut last = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(last.is_none(), "nothing follows the last chunk");
        assert_eq!(chunk.offset, document.len() as u64);
        assert!(chunk.data.len() <= 64 * 1024);
        assert!(chunk.data.is_empty() || chunk.data.ends_with(b"\n"));
        document.extend_from_slice(&chunk.data);
        if chunk.last_chunk {
            last = Some(chunk);
        }
    }
    (document, last.expect("a last chunk"))
}

#[tokio::test(flavor = "multi_thread")]
async fn bx2_editing_one_stored_event_breaks_exactly_that_link() {
    let mut s = setup().await;
    let tenant = s.tenant.id.clone();
    let events: Vec<_> = (0..10)
        .map(|_| event(&tenant, "test.probe.appended"))
        .collect();
    assert_eq!(s.append(events.clone()).await.appended, 10);
    let before = s.verify().await;
    assert!(before.intact, "{before:?}");
    assert!(before.events_checked >= 10);
    assert_eq!(before.first_broken_sequence, 0);
    assert_eq!(before.head_hash.len(), 32);

    let stored = s.list("test.probe.appended").await;
    assert_eq!(stored.len(), 10);
    let ids: Vec<_> = stored.iter().map(|e| e.event_id.clone()).collect();
    let sent: Vec<_> = events.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(ids, sent, "chained in the order given");
    let edited = stored[4].sequence;

    let changed = sql(
        &s.stack,
        "UPDATE hafen.audit_events SET action = 'test.probe.forged' \
         WHERE chain = $1 AND sequence = $2",
        &tenant,
        edited,
    )
    .await;
    assert_eq!(changed, 1);
    let broken = s.verify().await;
    assert!(!broken.intact);
    assert_eq!(broken.first_broken_sequence, edited);
    assert!(broken.head_sequence >= before.head_sequence);

    // Undoing the edit mends the chain: only that row's own link depended on the column.
    sql(
        &s.stack,
        "UPDATE hafen.audit_events SET action = 'test.probe.appended' \
         WHERE chain = $1 AND sequence = $2",
        &tenant,
        edited,
    )
    .await;
    assert!(s.verify().await.intact);

    // A deleted row is a gap: the missing sequence number is the broken link.
    let deleted = stored[7].sequence;
    sql(
        &s.stack,
        "DELETE FROM hafen.audit_events WHERE chain = $1 AND sequence = $2",
        &tenant,
        deleted,
    )
    .await;
    let gap = s.verify().await;
    assert!(!gap.intact);
    assert_eq!(gap.first_broken_sequence, deleted);
}

/// The owner's export of the whole chain.
async fn export_all(s: &Setup) -> String {
    let stream = s
        .client()
        .await
        .export_audit_log(with_token(&s.owner, pb::ExportAuditLogRequest::default()))
        .await
        .unwrap()
        .into_inner();
    String::from_utf8(collect_export(stream).await.0).unwrap()
}

/// Rewrites the event at `sequence` of `chain` as someone who can write the audit tables
/// would: the action changed, then every hash from there to the head recomputed and the head
/// row moved, so the plain hash chain is consistent again. Returns the new head hash.
async fn rewrite_and_recompute(stack: &TestStack, chain: Uuid, sequence: i64) -> Vec<u8> {
    let mut conn = stack.db.connect().await;
    let rows = hafen_audit::repo::rows_between(&mut conn, chain, 0, i64::MAX, 100_000)
        .await
        .unwrap();
    let mut prev = hafen_events::chain::GENESIS.to_vec();
    for mut row in rows {
        if row.sequence == sequence {
            row.action = "test.probe.rewritten".into();
        }
        if row.sequence >= sequence {
            let hash = row.chained().unwrap().hash(&prev).to_vec();
            diesel::sql_query(
                "UPDATE hafen.audit_events SET action = $3, prev_hash = $4, hash = $5 \
                 WHERE chain = $1 AND sequence = $2",
            )
            .bind::<SqlUuid, _>(chain)
            .bind::<BigInt, _>(row.sequence)
            .bind::<diesel::sql_types::Text, _>(&row.action)
            .bind::<diesel::sql_types::Bytea, _>(&prev)
            .bind::<diesel::sql_types::Bytea, _>(&hash)
            .execute(&mut conn)
            .await
            .unwrap();
            prev = hash;
        } else {
            prev = row.hash;
        }
    }
    diesel::sql_query("UPDATE hafen.audit_heads SET hash = $2 WHERE chain = $1")
        .bind::<SqlUuid, _>(chain)
        .bind::<diesel::sql_types::Bytea, _>(&prev)
        .execute(&mut conn)
        .await
        .unwrap();
    prev
}

#[tokio::test(flavor = "multi_thread")]
async fn bx2_a_chain_rewritten_and_recomputed_in_sql_is_detected_online_and_offline() {
    let mut s = setup().await;
    let tenant = s.tenant.id.clone();
    let chain = Uuid::parse_str(&tenant).unwrap();
    for _ in 0..2 {
        let batch: Vec<_> = (0..5)
            .map(|_| event(&tenant, "test.probe.signed"))
            .collect();
        assert_eq!(s.append(batch).await.appended, 5);
    }
    let before = s.verify().await;
    assert!(before.intact, "{before:?}");
    assert!(before.head_signed);
    assert!(before.signatures_checked >= 2, "{before:?}");
    assert_eq!(before.public_key.len(), 32);
    // The tenant record carries the same public key: take it from there, not the export.
    let record = s
        .stack
        .tenant_client()
        .await
        .get_tenant(s.stack.secrets.operator(tenant_pb::GetTenantRequest {
            tenant_id: tenant.clone(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(record.audit_public_key, before.public_key);

    let edited = s.list("test.probe.signed").await[2].sequence;
    let genuine = export_all(&s).await;
    let offline = hafen_events::chain::verify_export(&genuine, Some(&before.public_key)).unwrap();
    assert_eq!(offline.broken, None);
    assert!(offline.signatures >= 2);

    let forged_head = rewrite_and_recompute(&s.stack, chain, i64::try_from(edited).unwrap()).await;
    let after = s.verify().await;
    assert!(
        !after.intact,
        "a consistently recomputed chain must not verify: {after:?}"
    );
    assert!(
        after.first_broken_sequence >= edited
            && after.first_broken_sequence <= before.head_sequence,
        "broken at the first signed head after the edit: {after:?}"
    );
    assert_eq!(
        after.head_hash, forged_head,
        "the plain chain itself is consistent"
    );

    // Offline: the export of the rewritten chain fails its signatures against the record's
    // key (its hash links alone would pass).
    let rewritten = export_all(&s).await;
    let offline =
        hafen_events::chain::verify_export(&rewritten, Some(&record.audit_public_key)).unwrap();
    let (at, why) = offline
        .broken
        .expect("the rewritten export must not verify");
    assert!(at >= edited, "{at} {why}");
    assert!(why.contains("signature"), "{why}");

    // Replacing the stored public key (and the record's) with another does not help: the
    // service checks against the key its sealed private key has.
    let mut conn = s.stack.db.connect().await;
    diesel::sql_query("UPDATE hafen.audit_keys SET public_key = $2 WHERE chain = $1")
        .bind::<SqlUuid, _>(chain)
        .bind::<diesel::sql_types::Bytea, _>(vec![7u8; 32])
        .execute(&mut conn)
        .await
        .unwrap();
    let replaced = s.verify().await;
    assert!(!replaced.intact);
    assert_eq!(replaced.first_broken_sequence, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn bx2_an_export_verifies_offline() {
    let mut s = setup().await;
    let tenant = s.tenant.id.clone();
    let events: Vec<_> = (0..5)
        .map(|_| event(&tenant, "test.export.appended"))
        .collect();
    s.append(events).await;
    let before = s.verify().await;
    assert!(before.intact);

    let stream = s
        .client()
        .await
        .export_audit_log(with_token(&s.owner, pb::ExportAuditLogRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let (document, last) = collect_export(stream).await;
    assert_eq!(last.total_size, document.len() as u64);
    assert_eq!(last.sha256, Sha256::digest(&document).to_vec());
    let text = String::from_utf8(document).unwrap();
    assert_eq!(last.events_exported, text.lines().count() as u64);

    let verified = hafen_events::chain::verify_export(&text, None).unwrap();
    assert_eq!(verified.broken, None, "the export verifies offline");
    assert_eq!(
        verified.first_prev_hash.as_deref(),
        Some(hex::encode([0u8; 32]).as_str()),
        "the whole chain, from its first event"
    );
    // The export reaches at least the head verified before it (relays may add events in
    // between); the line at that head carries the head's hash.
    let lines: Vec<hafen_events::chain::ExportLine> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let at_head = lines
        .iter()
        .find(|l| l.sequence == before.head_sequence)
        .expect("the verified head is exported");
    assert_eq!(at_head.hash, hex::encode(&before.head_hash));
    let newest = lines.last().unwrap();
    if newest.sequence == before.head_sequence {
        assert_eq!(verified.last_hash, Some(hex::encode(&before.head_hash)));
    }
    assert!(lines.iter().all(|l| l.tenant_id == tenant));
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.action == "test.export.appended")
            .count(),
        5
    );

    // The export itself is audited, in the tenant's chain, as the owner's action.
    let exported = s.list("audit.log.exported").await;
    assert_eq!(exported.len(), 1);
    let actor = exported[0].actor.clone().unwrap();
    assert_eq!(actor.kind, pb::ActorKind::User as i32);
    assert_eq!(actor.id, s.tenant.owner_id);
    assert!(s.verify().await.intact);

    // A time range exports a contiguous stretch, which verifies on its own.
    let middle = &lines[lines.len() / 2];
    let start = chrono::DateTime::parse_from_rfc3339(&middle.time).unwrap();
    let stream = s
        .client()
        .await
        .export_audit_log(with_token(
            &s.owner,
            pb::ExportAuditLogRequest {
                start_time: Some(hafen_platform::timestamp(start.into())),
                end_time: None,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let (part, _) = collect_export(stream).await;
    let part = String::from_utf8(part).unwrap();
    let verified = hafen_events::chain::verify_export(&part, None).unwrap();
    assert_eq!(verified.broken, None);
    assert!(verified.events >= 1);

    // The operator exports the platform chain only.
    let stream = s
        .client()
        .await
        .export_audit_log(
            s.stack
                .secrets
                .operator(pb::ExportAuditLogRequest::default()),
        )
        .await
        .unwrap()
        .into_inner();
    let (platform, _) = collect_export(stream).await;
    let platform = String::from_utf8(platform).unwrap();
    assert!(
        hafen_events::chain::verify_export(&platform, None)
            .unwrap()
            .broken
            .is_none()
    );
    for line in platform.lines() {
        let line: hafen_events::chain::ExportLine = serde_json::from_str(line).unwrap();
        assert_eq!(line.tenant_id, "", "no tenant event in the platform chain");
    }

    let err = s
        .client()
        .await
        .export_audit_log(with_token(
            &s.owner,
            pb::ExportAuditLogRequest {
                start_time: Some(hafen_platform::timestamp(chrono::Utc::now())),
                end_time: Some(hafen_platform::timestamp(
                    chrono::Utc::now() - chrono::Duration::hours(1),
                )),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(field(&err), "start_time");
}

#[tokio::test(flavor = "multi_thread")]
async fn gr7_the_record_reflects_a_changed_retention_period_and_masking_rule() {
    let s = setup().await;
    let record = |token: String| {
        let s = &s;
        async move {
            s.client()
                .await
                .get_processing_record(with_token(
                    &token,
                    pb::GetProcessingRecordRequest::default(),
                ))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = record(s.owner.clone()).await;
    let json: serde_json::Value = serde_json::from_str(&first.json).unwrap();
    let mut keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "controller",
            "data_categories",
            "data_subject_categories",
            "processor",
            "purposes",
            "recipients",
            "retention",
            "technical_organisational_measures",
            "third_country_transfers",
        ]
    );
    assert_eq!(json["controller"]["name"], "Org audit");
    assert_eq!(json["controller"]["slug"], "audit");
    assert_eq!(json["controller"]["dpa_version"], "2025-01");
    assert_eq!(json["processor"]["name"], "Test Operator");
    assert_eq!(json["retention"]["messages_days"], 730);
    let toms = &json["technical_organisational_measures"];
    assert_eq!(toms["masking"]["email"], false);
    assert_eq!(toms["masking"]["payment_card_numbers"], true);
    assert_eq!(toms["mutual_tls_between_services"], true);
    // No backup has run: the policy is not claimed.
    assert!(
        toms["backups"].as_str().unwrap().starts_with("Not stated"),
        "{toms}"
    );
    assert!(first.markdown.contains("deleted after 730 days"));
    assert!(first.markdown.contains("E-mail addresses: not masked"));
    assert!(first.generate_time.is_some());
    assert!(
        !first.json.contains(&s.tenant.owner_id),
        "no person in the record"
    );

    s.stack
        .tenant_client()
        .await
        .update_tenant_settings(with_token(
            &s.owner,
            tenant_pb::UpdateTenantSettingsRequest {
                tenant_id: String::new(),
                settings: Some(tenant_pb::TenantSettings {
                    retention_days: 90,
                    masking: Some(tenant_pb::MaskingSettings {
                        email: true,
                        custom_patterns: vec![tenant_pb::CustomPattern {
                            name: "customer-number".into(),
                            regex: r"K-\d{6}".into(),
                            replacement: String::new(),
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![
                        "retention_days".into(),
                        "masking.email".into(),
                        "masking.custom_patterns".into(),
                    ],
                }),
            },
        ))
        .await
        .unwrap();

    let second = record(s.owner.clone()).await;
    let json: serde_json::Value = serde_json::from_str(&second.json).unwrap();
    assert_eq!(json["retention"]["messages_days"], 90);
    let masking = &json["technical_organisational_measures"]["masking"];
    assert_eq!(masking["email"], true);
    assert_eq!(masking["phone"], false);
    assert_eq!(
        masking["custom_patterns"],
        serde_json::json!(["customer-number"])
    );
    assert!(
        second.markdown.contains("deleted after 90 days"),
        "{}",
        second.markdown
    );
    assert!(second.markdown.contains("E-mail addresses: masked"));
    assert!(second.markdown.contains("Custom patterns: customer-number"));
    assert!(second.markdown.contains("Org audit"));

    // The operator builds the same record for the tenant; the access is in the tenant's chain.
    let by_operator = s
        .client()
        .await
        .get_processing_record(s.stack.secrets.operator(pb::GetProcessingRecordRequest {
            tenant_id: s.tenant.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_operator.json, second.json);
    let audited = s.list("audit.record.generated").await;
    assert_eq!(audited.len(), 1);
    assert_eq!(
        audited[0].actor.as_ref().unwrap().kind,
        pb::ActorKind::Operator as i32
    );
    assert_eq!(audited[0].target_id, s.tenant.id);

    let err = s
        .client()
        .await
        .get_processing_record(s.stack.secrets.operator(pb::GetProcessingRecordRequest {
            tenant_id: Uuid::now_v7().to_string(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = s
        .client()
        .await
        .get_processing_record(
            s.stack
                .secrets
                .operator(pb::GetProcessingRecordRequest::default()),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field(&err).as_str()),
        (Code::InvalidArgument, "tenant_id")
    );
    let err = s
        .client()
        .await
        .get_processing_record(with_token(
            &s.owner,
            pb::GetProcessingRecordRequest {
                tenant_id: s.tenant.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "tenant_id", "users leave tenant_id empty");
}

#[tokio::test(flavor = "multi_thread")]
async fn bx6_appending_the_same_batch_twice_chains_it_once() {
    let mut s = setup().await;
    let chain = Uuid::now_v7();
    let batch: Vec<_> = (0..3)
        .map(|_| event(&chain.to_string(), "test.retry.delivered"))
        .collect();
    let first = s.append(batch.clone()).await;
    assert_eq!((first.appended, first.duplicates), (3, 0));
    let again = s.append(batch.clone()).await;
    assert_eq!((again.appended, again.duplicates), (0, 3));
    assert_eq!(stored(&s.stack, chain).await, (3, true));

    // Duplicates within a batch, and a batch mixing chains.
    let other = Uuid::now_v7();
    let fresh = event(&chain.to_string(), "test.retry.delivered");
    let elsewhere = event(&other.to_string(), "test.retry.delivered");
    let mixed = s
        .append(vec![
            batch[2].clone(),
            fresh.clone(),
            elsewhere.clone(),
            fresh.clone(),
        ])
        .await;
    assert_eq!((mixed.appended, mixed.duplicates), (2, 2));
    assert_eq!(stored(&s.stack, chain).await, (4, true));
    assert_eq!(stored(&s.stack, other).await, (1, true));

    // Sequences 1..4 without gaps, each linked to the previous hash.
    let mut conn = s.stack.db.connect().await;
    #[derive(QueryableByName)]
    struct Link {
        #[diesel(sql_type = BigInt)]
        sequence: i64,
        #[diesel(sql_type = diesel::sql_types::Bytea)]
        prev_hash: Vec<u8>,
        #[diesel(sql_type = diesel::sql_types::Bytea)]
        hash: Vec<u8>,
    }
    let links = diesel::sql_query(
        "SELECT sequence, prev_hash, hash FROM hafen.audit_events WHERE chain = $1 \
         ORDER BY sequence",
    )
    .bind::<SqlUuid, _>(chain)
    .load::<Link>(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        links.iter().map(|l| l.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(links[0].prev_hash, vec![0; 32]);
    for pair in links.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bx6_a_bad_batch_is_refused_whole_and_names_the_field() {
    let mut s = setup().await;
    let chain = Uuid::now_v7();
    let tenant = chain.to_string();
    let refused = |events: Vec<pb::AuditEvent>| {
        let mut client = s.internal.clone();
        async move {
            client
                .append_events(pb::AppendEventsRequest { events })
                .await
                .unwrap_err()
        }
    };

    let mut batch = vec![
        event(&tenant, "test.bad.sent"),
        event(&tenant, "test.bad.sent"),
        event(&tenant, "test.bad.sent"),
    ];
    batch[1].action = "Test Bad Sent".into();
    let err = refused(batch).await;
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "INVALID_FIELD");
    assert_eq!(field(&err), "events[1].action");

    let too_many = (0..501).map(|_| event(&tenant, "test.bad.sent")).collect();
    assert_eq!(field(&refused(too_many).await), "events");
    assert_eq!(field(&refused(Vec::new()).await), "events");

    let mut bad_key = event(&tenant, "test.bad.sent");
    bad_key.attributes.insert("Not A Key".into(), "1".into());
    let err = refused(vec![event(&tenant, "test.bad.sent"), bad_key]).await;
    assert_eq!(field(&err), "events[1].attributes");

    let mut long_value = event(&tenant, "test.bad.sent");
    long_value.attributes.insert("note".into(), "x".repeat(257));
    assert_eq!(
        field(&refused(vec![long_value]).await),
        "events[0].attributes.note"
    );

    let mut crowded = event(&tenant, "test.bad.sent");
    for i in 0..33 {
        crowded.attributes.insert(format!("k{i}"), i.to_string());
    }
    assert_eq!(field(&refused(vec![crowded]).await), "events[0].attributes");

    let mut no_id = event(&tenant, "test.bad.sent");
    no_id.event_id.clear();
    assert_eq!(field(&refused(vec![no_id]).await), "events[0].event_id");
    let mut no_time = event(&tenant, "test.bad.sent");
    no_time.time = None;
    assert_eq!(field(&refused(vec![no_time]).await), "events[0].time");
    let mut no_outcome = event(&tenant, "test.bad.sent");
    no_outcome.outcome = 0;
    assert_eq!(field(&refused(vec![no_outcome]).await), "events[0].outcome");
    let mut bad_target = event(&tenant, "test.bad.sent");
    bad_target.target_id = "42".into();
    assert_eq!(
        field(&refused(vec![bad_target]).await),
        "events[0].target_id"
    );
    let mut bad_tenant = event(&tenant, "test.bad.sent");
    bad_tenant.tenant_id = "acme".into();
    assert_eq!(
        field(&refused(vec![bad_tenant]).await),
        "events[0].tenant_id"
    );

    assert_eq!(stored(&s.stack, chain).await, (0, false), "nothing stored");
    // The same events, valid, are accepted afterwards.
    let ok = s.append(vec![event(&tenant, "test.bad.sent")]).await;
    assert_eq!(ok.appended, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn bx6_only_hafen_services_may_append() {
    let s = setup().await;
    let events = vec![event(&s.tenant.id, "test.forged.sent")];
    let err = s
        .client()
        .await
        .append_events(pb::AppendEventsRequest {
            events: events.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "no client certificate");
    assert_eq!(reason(&err), "PERMISSION_DENIED");

    // A valid session is no substitute for a service certificate, nor is the platform token.
    let err = s
        .client()
        .await
        .append_events(with_token(
            &s.owner,
            pb::AppendEventsRequest {
                events: events.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = s
        .client()
        .await
        .append_events(s.stack.secrets.operator(pb::AppendEventsRequest { events }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(s.list("test.forged.sent").await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn tm2_list_events_filters_and_pages() {
    let mut s = setup().await;
    let tenant = s.tenant.id.clone();
    let base = chrono::Utc::now() - chrono::Duration::hours(1);
    let at = |minutes: i64| base + chrono::Duration::minutes(minutes);
    let mut events = vec![
        event_at(&tenant, "test.list.alpha", at(0)),
        event_at(&tenant, "test.list.alpha", at(1)),
        event_at(&tenant, "test.list.alpha", at(2)),
        event_at(&tenant, "test.list.beta", at(3)),
        event_at(&tenant, "test.list.beta", at(4)),
        event_at(&tenant, "test.other.gamma", at(5)),
    ];
    for e in &mut events[3..5] {
        e.actor.as_mut().unwrap().id = "hafen-beta".into();
    }
    s.append(events.clone()).await;
    let mut client = s.client().await;
    let list = |request: pb::ListEventsRequest| {
        let token = s.owner.clone();
        let mut client = client.clone();
        async move { client.list_events(with_token(&token, request)).await }
    };

    let newest_first = list(pb::ListEventsRequest {
        action: "test.list.".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .events;
    assert_eq!(newest_first.len(), 5, "the prefix matches both actions");
    assert!(
        newest_first
            .windows(2)
            .all(|w| w[0].sequence > w[1].sequence)
    );
    assert_eq!(newest_first[0].event_id, events[4].event_id);
    let e = &newest_first[0];
    assert_eq!(e.tenant_id, tenant);
    assert_eq!(e.prev_hash.len(), 32);
    assert_eq!(e.hash.len(), 32);
    assert_eq!(e.attributes.get("count").map(String::as_str), Some("3"));
    assert_eq!(e.target_type, "user");

    let exact = list(pb::ListEventsRequest {
        action: "test.list.alpha".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .events;
    assert_eq!(exact.len(), 3);

    let by_actor = list(pb::ListEventsRequest {
        action: "test.".into(),
        actor_id: "hafen-beta".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .events;
    assert_eq!(by_actor.len(), 2);

    let window = list(pb::ListEventsRequest {
        action: "test.".into(),
        start_time: Some(hafen_platform::timestamp(at(1))),
        end_time: Some(hafen_platform::timestamp(at(3))),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .events;
    let ids: Vec<_> = window.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(
        ids,
        [events[2].event_id.clone(), events[1].event_id.clone()],
        "start inclusive, end exclusive"
    );

    // Paging, oldest first, two at a time.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(pb::ListEventsRequest {
            action: "test.".into(),
            page_size: 2,
            page_token: token.clone(),
            oldest_first: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
        assert!(page.events.len() <= 2);
        seen.extend(page.events.iter().map(|e| e.event_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let sent: Vec<_> = events.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(seen, sent);

    // A token from another query, and other bad input.
    let first = list(pb::ListEventsRequest {
        action: "test.".into(),
        page_size: 1,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner();
    let err = list(pb::ListEventsRequest {
        action: "test.list.".into(),
        page_size: 1,
        page_token: first.next_page_token,
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(field(&err), "page_token");
    let err = list(pb::ListEventsRequest {
        start_time: Some(hafen_platform::timestamp(at(3))),
        end_time: Some(hafen_platform::timestamp(at(1))),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(
        (err.code(), field(&err).as_str()),
        (Code::InvalidArgument, "start_time")
    );
    let err = list(pb::ListEventsRequest {
        action: "Test.List".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(field(&err), "action");
    let err = list(pb::ListEventsRequest {
        page_size: -1,
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(field(&err), "page_size");

    // Members may not read the audit log; nobody may without a token.
    let member = s.member().await;
    let denied = client
        .list_events(with_token(&member, pb::ListEventsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = client
        .verify_chain(with_token(&member, pb::VerifyChainRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = client
        .get_processing_record(with_token(
            &member,
            pb::GetProcessingRecordRequest::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = client
        .export_audit_log(with_token(&member, pb::ExportAuditLogRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let anonymous = client
        .list_events(pb::ListEventsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread")]
async fn tm2_operators_see_only_the_platform_chain() {
    let mut s = setup().await;
    let tenant = s.tenant.id.clone();
    s.append(vec![
        event(&tenant, "test.tenant.recorded"),
        event("", "test.platform.recorded"),
    ])
    .await;
    let mut client = s.client().await;
    let operator_list = |action: &str| pb::ListEventsRequest {
        action: action.into(),
        page_size: 500,
        ..Default::default()
    };

    let platform = client
        .list_events(s.stack.secrets.operator(operator_list("test.")))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(platform.len(), 1);
    assert_eq!(platform[0].action, "test.platform.recorded");
    assert_eq!(platform[0].tenant_id, "");
    assert!(s.list("test.platform.recorded").await.is_empty());
    assert_eq!(s.list("test.tenant.recorded").await.len(), 1);

    // The operator's listing is itself in the platform chain.
    let listed = client
        .list_events(
            s.stack
                .secrets
                .operator(operator_list("audit.events.listed")),
        )
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(!listed.is_empty());
    assert_eq!(
        listed[0].actor.as_ref().unwrap().kind,
        pb::ActorKind::Operator as i32
    );

    // Verifying a tenant's chain: hashes and counts, recorded in that tenant's chain.
    let verified = client
        .verify_chain(s.stack.secrets.operator(pb::VerifyChainRequest {
            tenant_id: tenant.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.intact);
    assert!(verified.head_sequence >= 1);
    let audited = s.list("audit.chain.verified").await;
    assert_eq!(audited.len(), 1);
    assert_eq!(
        audited[0].attributes.get("intact").map(String::as_str),
        Some("true")
    );
    let platform = client
        .verify_chain(s.stack.secrets.operator(pb::VerifyChainRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(platform.intact);
    assert!(platform.head_sequence >= 2);

    let err = client
        .verify_chain(s.stack.secrets.operator(pb::VerifyChainRequest {
            tenant_id: Uuid::now_v7().to_string(),
        }))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::NotFound, "NOT_FOUND")
    );
    let err = client
        .verify_chain(s.stack.secrets.operator(pb::VerifyChainRequest {
            tenant_id: "not-a-uuid".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "tenant_id");
    let err = client
        .verify_chain(with_token(
            &s.owner,
            pb::VerifyChainRequest {
                tenant_id: tenant.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field(&err).as_str()),
        (Code::InvalidArgument, "tenant_id"),
        "users leave tenant_id empty"
    );

    // An owner's own verification is not an operator call and leaves no event.
    s.verify().await;
    assert_eq!(s.list("audit.chain.verified").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn bx6_concurrent_batches_chain_without_gaps_or_deadlocks() {
    let s = setup().await;
    let chains = [Uuid::now_v7(), Uuid::now_v7()];
    // Each batch touches both chains, half of them in the opposite order: appends lock the
    // heads in a fixed order, so none waits on another crosswise.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let mut client = s.internal.clone();
            let (a, b) = if i % 2 == 0 {
                (chains[0], chains[1])
            } else {
                (chains[1], chains[0])
            };
            tokio::spawn(async move {
                let events = (0..25)
                    .flat_map(|_| {
                        [
                            event(&a.to_string(), "test.race.sent"),
                            event(&b.to_string(), "test.race.sent"),
                        ]
                    })
                    .collect();
                client
                    .append_events(pb::AppendEventsRequest { events })
                    .await
                    .map(|r| r.into_inner().appended)
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().unwrap(), 50);
    }
    let mut conn = s.stack.db.connect().await;
    for chain in chains {
        assert_eq!(stored(&s.stack, chain).await, (200, true));
        #[derive(QueryableByName)]
        struct Bounds {
            #[diesel(sql_type = BigInt)]
            low: i64,
            #[diesel(sql_type = BigInt)]
            high: i64,
            #[diesel(sql_type = BigInt)]
            head: i64,
        }
        let bounds = diesel::sql_query(
            "SELECT min(e.sequence) AS low, max(e.sequence) AS high, max(h.sequence) AS head \
             FROM hafen.audit_events e JOIN hafen.audit_heads h ON h.chain = e.chain \
             WHERE e.chain = $1",
        )
        .bind::<SqlUuid, _>(chain)
        .get_result::<Bounds>(&mut conn)
        .await
        .unwrap();
        assert_eq!((bounds.low, bounds.high, bounds.head), (1, 200, 200));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bx2_a_long_export_is_chunked_and_still_verifies() {
    let mut s = setup().await;
    let tenant = s.tenant.id.clone();
    for _ in 0..3 {
        let events = (0..400)
            .map(|i| {
                let mut e = event(&tenant, "test.bulk.appended");
                for key in ["first_id", "second_id", "third_id"] {
                    e.attributes.insert(key.into(), format!("{i:0>100}"));
                }
                e
            })
            .collect();
        assert_eq!(s.append(events).await.appended, 400);
    }
    let verified = s.verify().await;
    assert!(verified.intact);
    assert!(verified.events_checked > 1200, "more than one read batch");

    let stream = s
        .client()
        .await
        .export_audit_log(with_token(&s.owner, pb::ExportAuditLogRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let mut chunks = 0;
    let mut document = Vec::new();
    let mut stream = stream;
    let mut last = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.offset, document.len() as u64);
        assert!(chunk.data.len() <= 64 * 1024);
        assert!(chunk.data.is_empty() || chunk.data.ends_with(b"\n"));
        document.extend_from_slice(&chunk.data);
        chunks += 1;
        if chunk.last_chunk {
            last = Some(chunk);
        }
    }
    let last = last.unwrap();
    assert!(chunks > 10, "{chunks} chunks");
    assert_eq!(last.sha256, Sha256::digest(&document).to_vec());
    let text = String::from_utf8(document).unwrap();
    let offline = hafen_events::chain::verify_export(&text, None).unwrap();
    assert_eq!(offline.broken, None);
    assert!(offline.events >= verified.events_checked);
}

#[tokio::test(flavor = "multi_thread")]
async fn bx2_a_chain_whose_key_was_removed_is_never_keyed_anew() {
    let mut s = setup().await;
    let tenant = s.tenant.id.clone();
    let chain = Uuid::parse_str(&tenant).unwrap();
    let batch: Vec<_> = (0..3).map(|_| event(&tenant, "test.probe.rekey")).collect();
    assert_eq!(s.append(batch).await.appended, 3);

    // Whoever can write the database removes the key and the signed heads, hoping the next
    // append signs a history of their making with a fresh key.
    let mut conn = s.stack.db.connect().await;
    for statement in [
        "DELETE FROM hafen.audit_signed_heads WHERE chain = $1",
        "DELETE FROM hafen.audit_keys WHERE chain = $1",
    ] {
        diesel::sql_query(statement)
            .bind::<SqlUuid, _>(chain)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let refused = s
        .internal
        .append_events(pb::AppendEventsRequest {
            events: vec![event(&tenant, "test.probe.rekey")],
        })
        .await
        .expect_err("no new key for a chain with history");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(reason(&refused), "INVALID_STATE");
    assert_eq!(
        s.list("test.probe.rekey").await.len(),
        3,
        "nothing of the batch stored"
    );
    let keys = diesel::sql_query("SELECT count(*) AS n FROM hafen.audit_keys WHERE chain = $1")
        .bind::<SqlUuid, _>(chain)
        .get_result::<Count>(&mut conn)
        .await
        .unwrap()
        .n;
    assert_eq!(keys, 0);

    // A chain's first event still gets its key.
    let other = s.stack.create_tenant("audit-fresh").await;
    let appended = s
        .append(vec![event(&other.id, "test.probe.rekey")])
        .await
        .appended;
    assert_eq!(appended, 1);
}
