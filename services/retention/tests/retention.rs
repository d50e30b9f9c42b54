//! The retention service against real PostgreSQL and Redis, services over TLS (CB5, GR4, TM6).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use hafen_platform::status;
use hafen_proto::messaging::v1 as msg_pb;
use hafen_proto::retention::v1 as pb;
use hafen_proto::retention::v1::retention_service_client::RetentionServiceClient;
use hafen_proto::tenant::v1 as tenant_pb;
use hafen_testkit::{Channel, OWNER_PASSWORD, TestEnv, TestStack, TestTenant, with_token};
use prost::Message as _;
use tonic::Code;
use uuid::Uuid;

struct Setup {
    stack: TestStack,
    tenant: TestTenant,
    owner: String,
    owner_id: String,
    member: String,
    member_id: String,
}

async fn setup_tenant(stack: TestStack, slug: &str) -> Setup {
    let tenant = stack.create_tenant(slug).await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let (member, session) = stack
        .create_logged_in_member(&tenant, &owner, "colleague", "colleague password")
        .await;
    let owner_id = tenant.owner_id.clone();
    Setup {
        stack,
        tenant,
        owner,
        owner_id,
        member: session.access_token,
        member_id: member.user_id,
    }
}

async fn setup() -> Setup {
    setup_tenant(TestStack::start().await, "keep").await
}

impl Setup {
    async fn retention(&self) -> RetentionServiceClient<Channel> {
        self.stack.retention_client().await
    }

    fn tenant_id(&self) -> Uuid {
        self.tenant.id.parse().unwrap()
    }

    /// The tenant's schema name.
    fn schema(&self) -> String {
        hafen_store::TenantId::from(self.tenant_id()).schema()
    }

    /// A group of the owner and the member.
    async fn group(&self, title: &str) -> String {
        self.stack
            .messaging_client()
            .await
            .create_conversation(with_token(
                &self.owner,
                msg_pb::CreateConversationRequest {
                    kind: msg_pb::ConversationKind::Group as i32,
                    title: title.into(),
                    member_user_ids: vec![self.member_id.clone()],
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .conversation_id
    }

    async fn send(&self, token: &str, conversation: &str, body: &str) -> String {
        self.stack
            .messaging_client()
            .await
            .send_message(with_token(
                token,
                msg_pb::SendMessageRequest {
                    request_id: Uuid::now_v7().to_string(),
                    conversation_id: conversation.into(),
                    body: body.into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .message_id
    }

    /// Makes messages `ids` `days` old.
    async fn age(&self, ids: &[String], days: i64) {
        let list = ids
            .iter()
            .map(|id| format!("'{}'", Uuid::parse_str(id).unwrap()))
            .collect::<Vec<_>>()
            .join(",");
        admin(&self.stack)
            .await
            .batch_execute(&format!(
                "UPDATE {}.messages SET created_at = now() - interval '{days} days' \
                 WHERE id IN ({list})",
                self.schema()
            ))
            .await
            .unwrap();
    }

    async fn history(&self, conversation: &str) -> Vec<String> {
        self.stack
            .messaging_client()
            .await
            .list_messages(with_token(
                &self.owner,
                msg_pb::ListMessagesRequest {
                    conversation_id: conversation.into(),
                    direction: msg_pb::Direction::Forward as i32,
                    page_size: 500,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .messages
            .into_iter()
            .map(|m| m.message_id)
            .collect()
    }

    async fn hold(
        &self,
        target: pb::set_legal_hold_request::Target,
        hold: bool,
        reason: &str,
    ) -> Result<pb::LegalHold, tonic::Status> {
        self.retention()
            .await
            .set_legal_hold(with_token(
                &self.owner,
                pb::SetLegalHoldRequest {
                    target: Some(target),
                    hold,
                    reason_code: reason.into(),
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Starts a purge run as the owner and waits for its end.
    async fn purge(&self) -> pb::PurgeRun {
        let run = self
            .retention()
            .await
            .run_purge(with_token(&self.owner, pb::RunPurgeRequest {}))
            .await
            .unwrap()
            .into_inner();
        self.wait_for_run(&run.purge_run_id).await
    }

    /// Polls ListPurgeRuns until `run` has ended.
    async fn wait_for_run(&self, run: &str) -> pb::PurgeRun {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let runs = self
                .retention()
                .await
                .list_purge_runs(with_token(&self.owner, pb::ListPurgeRunsRequest::default()))
                .await
                .unwrap()
                .into_inner()
                .purge_runs;
            let found = runs.into_iter().find(|r| r.purge_run_id == run).unwrap();
            if found.state != pb::PurgeRunState::Running as i32 {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "purge run never ended"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A superuser connection to this test's database (tenant schemas are out of reach of the
/// application role outside a tenant scope).
async fn admin(stack: &TestStack) -> AsyncPgConnection {
    stack.db.connect_admin().await
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn count(stack: &TestStack, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(&mut admin(stack).await)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
        .n
}

/// [`count`] in the key store.
async fn count_keys(stack: &TestStack, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(&mut stack.db.keystore().connect_admin().await)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
        .n
}

fn reason(status: &tonic::Status) -> String {
    status::reason(status).unwrap_or_default()
}

fn field(status: &tonic::Status) -> String {
    status::metadata(status, "field").unwrap_or_default()
}

/// The attributes of the audit events with `action` in `chain` (the tenant; nil for the
/// platform chain), from the audit log or, not delivered yet, from the outbox. Waits for at
/// least `at_least`.
async fn audit_events(
    stack: &TestStack,
    chain: Uuid,
    action: &str,
    at_least: usize,
) -> Vec<BTreeMap<String, String>> {
    let mut conn = stack.db.connect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        // One statement, so an event moving from the outbox to the log is seen once.
        #[derive(QueryableByName)]
        struct Both {
            #[diesel(sql_type = diesel::sql_types::Array<Text>)]
            delivered: Vec<String>,
            #[diesel(sql_type = diesel::sql_types::Array<diesel::sql_types::Bytea>)]
            pending: Vec<Vec<u8>>,
        }
        let both: Both = diesel::sql_query(
            "SELECT ARRAY(SELECT attributes::text FROM hafen.audit_events \
                          WHERE chain = $1 AND action = $2 ORDER BY sequence) AS delivered, \
                    ARRAY(SELECT event FROM hafen.outbox ORDER BY created_at) AS pending",
        )
        .bind::<diesel::sql_types::Uuid, _>(chain)
        .bind::<Text, _>(action)
        .get_result(&mut conn)
        .await
        .unwrap();
        let mut found: Vec<BTreeMap<String, String>> = both
            .delivered
            .iter()
            .map(|json| {
                let value: serde_json::Value = serde_json::from_str(json).unwrap();
                value
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| {
                        let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                        (k.clone(), text)
                    })
                    .collect()
            })
            .collect();
        let tenant = if chain.is_nil() {
            String::new()
        } else {
            chain.to_string()
        };
        for bytes in &both.pending {
            let event = hafen_proto::audit::v1::AuditEvent::decode(bytes.as_slice()).unwrap();
            if event.action == action && event.tenant_id == tenant {
                found.push(event.attributes.into_iter().collect());
            }
        }
        if found.len() >= at_least {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no audit event {action}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cb5_expired_messages_are_purged_younger_and_held_ones_remain() {
    let s = setup().await;
    let mut retention = s.retention().await;
    let policy = retention
        .set_tenant_policy(with_token(
            &s.owner,
            pb::SetTenantPolicyRequest { retention_days: 30 },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.retention_days, 30);
    assert_eq!(policy.max_retention_days, 730);

    // A: the tenant's 30 days. Old messages of the owner go; the member is held, so theirs stay.
    let plain = s.group("plain").await;
    let mut plain_old = Vec::new();
    for i in 0..3 {
        plain_old.push(s.send(&s.owner, &plain, &format!("old {i}")).await);
    }
    let plain_young = [
        s.send(&s.owner, &plain, "young 1").await,
        s.send(&s.owner, &plain, "young 2").await,
    ];
    let held_user_old = vec![
        s.send(&s.member, &plain, "member old 1").await,
        s.send(&s.member, &plain, "member old 2").await,
    ];
    // An edit: a purged message's log has an `events` row besides its creation event.
    s.stack
        .messaging_client()
        .await
        .edit_message(with_token(
            &s.owner,
            msg_pb::EditMessageRequest {
                message_id: plain_old[0].clone(),
                body: "old 0, edited".into(),
            },
        ))
        .await
        .unwrap();
    s.age(&plain_old, 40).await;
    s.age(&held_user_old, 40).await;

    // B: a conversation with 7 days of its own.
    let short = s.group("short").await;
    let short_expired = vec![
        s.send(&s.owner, &short, "ten days 1").await,
        s.send(&s.owner, &short, "ten days 2").await,
        s.send(&s.owner, &short, "forty days").await,
    ];
    let short_kept = s.send(&s.owner, &short, "three days").await;
    s.age(&short_expired[..2], 10).await;
    s.age(&short_expired[2..], 40).await;
    s.age(std::slice::from_ref(&short_kept), 3).await;
    let conversation_policy = retention
        .set_conversation_policy(with_token(
            &s.owner,
            pb::SetConversationPolicyRequest {
                conversation_id: short.clone(),
                retention_days: 7,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(conversation_policy.retention_days, 7);
    assert_eq!(conversation_policy.effective_retention_days, 7);

    // C: a held conversation.
    let held = s.group("held").await;
    let held_old = vec![
        s.send(&s.owner, &held, "evidence 1").await,
        s.send(&s.owner, &held, "evidence 2").await,
    ];
    s.age(&held_old, 40).await;
    use pb::set_legal_hold_request::Target;
    let hold = s
        .hold(
            Target::ConversationId(held.clone()),
            true,
            "litigation-2025-04",
        )
        .await
        .unwrap();
    assert!(hold.active);
    assert_eq!(hold.reason_code, "litigation-2025-04");
    assert_eq!(hold.set_by_user_id, s.owner_id);
    s.hold(Target::UserId(s.member_id.clone()), true, "tax.audit")
        .await
        .unwrap();

    // D: a conversation nobody has written in for 100 days: age counts, not activity.
    let quiet = s.group("quiet").await;
    let quiet_old = vec![
        s.send(&s.owner, &quiet, "long ago 1").await,
        s.send(&s.owner, &quiet, "long ago 2").await,
    ];
    s.age(&quiet_old, 100).await;
    admin(&s.stack)
        .await
        .batch_execute(&format!(
            "UPDATE {}.conversations SET updated_at = now() - interval '100 days' WHERE id = '{}'",
            s.schema(),
            Uuid::parse_str(&quiet).unwrap()
        ))
        .await
        .unwrap();

    // The policy as GetPolicy reports it.
    let got = retention
        .get_policy(with_token(
            &s.owner,
            pb::GetPolicyRequest {
                conversation_id: short.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            got.retention_days,
            got.tenant_retention_days,
            got.conversation_retention_days
        ),
        (7, 30, 7)
    );
    assert_eq!(got.legal_holds.len(), 1, "the member's hold applies here");
    let tenant_wide = retention
        .get_policy(with_token(&s.owner, pb::GetPolicyRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tenant_wide.legal_holds.len(), 2);
    let as_member = retention
        .get_policy(with_token(&s.member, pb::GetPolicyRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(as_member.retention_days, 30);
    assert!(as_member.legal_holds.is_empty(), "holds are for admins");

    let purged: Vec<String> = plain_old
        .iter()
        .chain(&short_expired)
        .chain(&quiet_old)
        .cloned()
        .collect();
    let id_list = |ids: &[String]| {
        ids.iter()
            .map(|id| format!("'{id}'"))
            .collect::<Vec<_>>()
            .join(",")
    };
    // Every event of the messages: their rows in `events` (edits here) and the creation
    // events the message rows carry.
    let events_of = |ids: &[String]| {
        let (schema, ids) = (s.schema(), id_list(ids));
        format!(
            "SELECT (SELECT count(*) FROM {schema}.events WHERE message_id IN ({ids})) \
                  + (SELECT count(*) FROM {schema}.messages \
                     WHERE event_id IS NOT NULL AND id IN ({ids})) AS n"
        )
    };
    assert_eq!(
        count(&s.stack, &events_of(&purged)).await,
        8 + 1,
        "a creation event per message, and the edit"
    );

    let run = retention
        .run_purge(with_token(&s.owner, pb::RunPurgeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.trigger, pb::PurgeTrigger::Manual as i32);
    assert_eq!(run.triggered_by_user_id, s.owner_id);
    let done = s.wait_for_run(&run.purge_run_id).await;
    assert_eq!(done.state, pb::PurgeRunState::Succeeded as i32);
    assert_eq!(done.messages_deleted, 8, "3 plain + 3 short + 2 quiet");
    assert_eq!(
        done.held_skipped, 4,
        "2 of the held user + 2 in the held conversation"
    );
    assert_eq!(done.conversations_touched, 3);
    assert!(done.end_time.is_some());

    let mut plain_left = s.history(&plain).await;
    plain_left.sort();
    let mut plain_expected: Vec<String> =
        plain_young.iter().chain(&held_user_old).cloned().collect();
    plain_expected.sort();
    assert_eq!(plain_left, plain_expected);
    assert_eq!(s.history(&short).await, vec![short_kept.clone()]);
    assert_eq!(s.history(&held).await, held_old);
    assert!(s.history(&quiet).await.is_empty());
    assert_eq!(
        count(&s.stack, &events_of(&purged)).await,
        0,
        "the purged messages' events went with them"
    );
    let kept: Vec<String> = plain_young
        .iter()
        .chain(&held_user_old)
        .chain(&held_old)
        .chain(std::slice::from_ref(&short_kept))
        .cloned()
        .collect();
    assert_eq!(count(&s.stack, &events_of(&kept)).await, 7);

    // The run is audited with ids and counts only.
    let events = audit_events(&s.stack, s.tenant_id(), "retention.purge.completed", 1).await;
    let attributes = &events[0];
    let expected: BTreeMap<String, String> = [
        ("messages_deleted", "8"),
        ("conversations_touched", "3"),
        ("held_skipped", "4"),
        ("purge_run_id", run.purge_run_id.as_str()),
        ("visits_deleted", "0"),
        ("consent_records_deleted", "0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(attributes, &expected);
    audit_events(&s.stack, s.tenant_id(), "retention.legal_hold.set", 2).await;
    audit_events(&s.stack, s.tenant_id(), "retention.policy.updated", 1).await;
    audit_events(
        &s.stack,
        s.tenant_id(),
        "retention.conversation_policy.updated",
        1,
    )
    .await;

    // A second run finds nothing more to do; the held messages are counted again.
    let again = s.purge().await;
    assert_ne!(again.purge_run_id, run.purge_run_id);
    assert_eq!((again.messages_deleted, again.held_skipped), (0, 4));

    // Lifting the holds lets the next run purge what they kept.
    let lifted = s
        .hold(Target::ConversationId(held.clone()), false, "")
        .await
        .unwrap();
    assert!(!lifted.active);
    assert_eq!(lifted.lifted_by_user_id, s.owner_id);
    s.hold(Target::UserId(s.member_id.clone()), false, "")
        .await
        .unwrap();
    let last = s.purge().await;
    assert_eq!((last.messages_deleted, last.held_skipped), (4, 0));
    assert!(s.history(&held).await.is_empty());

    // Newest first, in pages.
    let page = retention
        .list_purge_runs(with_token(
            &s.owner,
            pb::ListPurgeRunsRequest {
                page_size: 2,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = page
        .purge_runs
        .iter()
        .map(|r| r.purge_run_id.clone())
        .collect();
    assert_eq!(ids, [last.purge_run_id.clone(), again.purge_run_id.clone()]);
    let rest = retention
        .list_purge_runs(with_token(
            &s.owner,
            pb::ListPurgeRunsRequest {
                page_size: 2,
                page_token: page.next_page_token,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = rest
        .purge_runs
        .iter()
        .map(|r| r.purge_run_id.clone())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&run.purge_run_id));
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn run_purge_while_running_returns_the_same_run_and_members_are_denied() {
    let s = setup().await;
    let conversation = s.group("old").await;
    let old = s.send(&s.owner, &conversation, "old").await;
    s.age(&[old], 800).await;
    let mut retention = s.retention().await;

    // Members may read the policy, and nothing else.
    let denied = [
        retention
            .run_purge(with_token(&s.member, pb::RunPurgeRequest {}))
            .await
            .unwrap_err(),
        retention
            .list_purge_runs(with_token(&s.member, pb::ListPurgeRunsRequest::default()))
            .await
            .unwrap_err(),
        retention
            .set_tenant_policy(with_token(
                &s.member,
                pb::SetTenantPolicyRequest { retention_days: 10 },
            ))
            .await
            .unwrap_err(),
        retention
            .set_conversation_policy(with_token(
                &s.member,
                pb::SetConversationPolicyRequest {
                    conversation_id: conversation.clone(),
                    retention_days: 1,
                },
            ))
            .await
            .unwrap_err(),
        retention
            .set_legal_hold(with_token(
                &s.member,
                pb::SetLegalHoldRequest {
                    target: Some(pb::set_legal_hold_request::Target::ConversationId(
                        conversation.clone(),
                    )),
                    hold: true,
                    reason_code: "mine".into(),
                },
            ))
            .await
            .unwrap_err(),
    ];
    for err in &denied {
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert_eq!(reason(err), "PERMISSION_DENIED");
        assert_eq!(status::metadata(err, "required").as_deref(), Some("admin"));
    }
    assert_eq!(
        count(
            &s.stack,
            &format!("SELECT count(*) AS n FROM {}.purge_runs", s.schema())
        )
        .await,
        0,
        "a member starts nothing"
    );

    // An open transaction holding legal_holds keeps the run's first batch waiting.
    let mut blocker = admin(&s.stack).await;
    blocker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {}.legal_holds IN EXCLUSIVE MODE",
            s.schema()
        ))
        .await
        .unwrap();
    let first = retention
        .run_purge(with_token(&s.owner, pb::RunPurgeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.state, pb::PurgeRunState::Running as i32);
    let second = retention
        .run_purge(with_token(&s.owner, pb::RunPurgeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.purge_run_id, first.purge_run_id, "no second run");
    assert_eq!(second.state, pb::PurgeRunState::Running as i32);
    blocker.batch_execute("COMMIT").await.unwrap();
    let done = s.wait_for_run(&first.purge_run_id).await;
    assert_eq!(done.state, pb::PurgeRunState::Succeeded as i32);
    assert_eq!(done.messages_deleted, 1);
    assert_eq!(
        count(
            &s.stack,
            &format!("SELECT count(*) AS n FROM {}.purge_runs", s.schema())
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_heartbeat_stopped_is_taken_over_as_failed() {
    let s = setup().await;
    let dead = Uuid::now_v7();
    admin(&s.stack)
        .await
        .batch_execute(&format!(
            "INSERT INTO {}.purge_runs (id, trigger, state, started_at, heartbeat_at, messages_deleted) \
             VALUES ('{dead}', 'scheduled', 'running', now() - interval '10 minutes', \
                     now() - interval '2 minutes', 17)",
            s.schema()
        ))
        .await
        .unwrap();
    let run = s.purge().await;
    assert_ne!(run.purge_run_id, dead.to_string(), "a new run started");
    let runs = s
        .retention()
        .await
        .list_purge_runs(with_token(&s.owner, pb::ListPurgeRunsRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .purge_runs;
    let old = runs
        .iter()
        .find(|r| r.purge_run_id == dead.to_string())
        .unwrap();
    assert_eq!(old.state, pb::PurgeRunState::Failed as i32);
    assert_eq!(old.messages_deleted, 17, "its counts stay");
    assert!(old.end_time.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_the_field_named_and_nothing_written() {
    let s = setup().await;
    let mut retention = s.retention().await;
    let conversation = s.group("policy").await;
    let tenant_policy = |days| {
        with_token(
            &s.owner,
            pb::SetTenantPolicyRequest {
                retention_days: days,
            },
        )
    };
    for days in [0, -5] {
        let err = retention
            .set_tenant_policy(tenant_policy(days))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(
            (reason(&err), field(&err)),
            ("INVALID_FIELD".into(), "retention_days".into())
        );
    }
    let err = retention
        .set_tenant_policy(tenant_policy(731))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "RETENTION_TOO_LONG");
    assert_eq!(field(&err), "retention_days");
    assert_eq!(status::metadata(&err, "max_days").as_deref(), Some("730"));
    let policy = retention
        .get_policy(with_token(&s.owner, pb::GetPolicyRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.tenant_retention_days, 730, "unchanged");

    // The same setting the tenant service shows.
    retention
        .set_tenant_policy(tenant_policy(30))
        .await
        .unwrap();
    let settings = s
        .stack
        .tenant_client()
        .await
        .get_tenant(with_token(&s.owner, tenant_pb::GetTenantRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .settings
        .unwrap();
    assert_eq!(settings.retention_days, 30);

    let conversation_policy = |id: &str, days| {
        with_token(
            &s.owner,
            pb::SetConversationPolicyRequest {
                conversation_id: id.into(),
                retention_days: days,
            },
        )
    };
    let err = retention
        .set_conversation_policy(conversation_policy(&conversation, 31))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "RETENTION_TOO_LONG");
    assert_eq!(field(&err), "retention_days");
    assert_eq!(status::metadata(&err, "max_days").as_deref(), Some("30"));
    let err = retention
        .set_conversation_policy(conversation_policy(&conversation, -1))
        .await
        .unwrap_err();
    assert_eq!(
        (reason(&err), field(&err)),
        ("INVALID_FIELD".into(), "retention_days".into())
    );
    for bad in ["", "not-a-uuid"] {
        let err = retention
            .set_conversation_policy(conversation_policy(bad, 5))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field(&err)),
            (Code::InvalidArgument, "conversation_id".into())
        );
    }
    let err = retention
        .set_conversation_policy(conversation_policy(&Uuid::now_v7().to_string(), 5))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err)),
        (Code::NotFound, "NOT_FOUND".into())
    );
    // A group of the member's that the owner is not in: invisible, so NOT_FOUND as well.
    let private = s
        .stack
        .messaging_client()
        .await
        .create_conversation(with_token(
            &s.member,
            msg_pb::CreateConversationRequest {
                kind: msg_pb::ConversationKind::Group as i32,
                title: "private".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let err = retention
        .set_conversation_policy(conversation_policy(&private, 5))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = retention
        .get_policy(with_token(
            &s.owner,
            pb::GetPolicyRequest {
                conversation_id: "x".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "conversation_id");
    assert_eq!(
        count(
            &s.stack,
            &format!(
                "SELECT count(*) AS n FROM {}.conversations WHERE retention_days IS NOT NULL",
                s.schema()
            )
        )
        .await,
        0,
        "no conversation policy written"
    );

    // Legal holds.
    use pb::set_legal_hold_request::Target;
    let hold = |target: Option<Target>, hold: bool, reason: &str| {
        with_token(
            &s.owner,
            pb::SetLegalHoldRequest {
                target,
                hold,
                reason_code: reason.into(),
            },
        )
    };
    let target = || Some(Target::ConversationId(conversation.clone()));
    let cases = [
        (hold(None, true, "x"), "target"),
        (hold(target(), true, ""), "reason_code"),
        (hold(target(), true, "Tax Audit"), "reason_code"),
        (hold(target(), true, "steuerprüfung"), "reason_code"),
        (hold(target(), true, &"x".repeat(65)), "reason_code"),
        (
            hold(Some(Target::UserId("nope".into())), true, "x"),
            "user_id",
        ),
        (
            hold(Some(Target::ConversationId(String::new())), true, "x"),
            "conversation_id",
        ),
    ];
    for (request, expected) in cases {
        let err = retention.set_legal_hold(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}");
        assert_eq!(field(&err), expected);
    }
    let err = retention
        .set_legal_hold(hold(
            Some(Target::UserId(Uuid::now_v7().to_string())),
            true,
            "x",
        ))
        .await
        .unwrap_err();
    assert_eq!(
        (
            err.code(),
            status::metadata(&err, "resource_type").as_deref()
        ),
        (Code::NotFound, Some("user"))
    );
    assert_eq!(
        count(
            &s.stack,
            &format!("SELECT count(*) AS n FROM {}.legal_holds", s.schema())
        )
        .await,
        0,
        "no hold written"
    );

    // Holds are idempotent both ways.
    let first = retention
        .set_legal_hold(hold(target(), true, "litigation"))
        .await
        .unwrap()
        .into_inner();
    let again = retention
        .set_legal_hold(hold(target(), true, "other-reason"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, first, "setting an existing hold changes nothing");
    let lifted = retention
        .set_legal_hold(hold(target(), false, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!lifted.active && lifted.lift_time.is_some());
    let lifted_again = retention
        .set_legal_hold(hold(target(), false, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        lifted_again, lifted,
        "lifting a missing hold changes nothing"
    );
    assert_eq!(
        count(
            &s.stack,
            &format!("SELECT count(*) AS n FROM {}.legal_holds", s.schema())
        )
        .await,
        1
    );
    let never = retention
        .set_legal_hold(hold(Some(Target::UserId(s.member_id.clone())), false, ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!never.active && never.set_time.is_none());

    // Paging input.
    let err = retention
        .list_purge_runs(with_token(
            &s.owner,
            pb::ListPurgeRunsRequest {
                page_size: -1,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "page_size");
    let err = retention
        .list_purge_runs(with_token(
            &s.owner,
            pb::ListPurgeRunsRequest {
                page_token: "garbage!".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "page_token");
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_deletions_is_internal() {
    let s = setup().await;
    let mut retention = s.retention().await;
    let err = retention
        .replay_deletions(with_token(&s.owner, pb::ReplayDeletionsRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        status::metadata(&err, "required").as_deref(),
        Some("internal")
    );
    let err = retention
        .replay_deletions(pb::ReplayDeletionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "no token, no certificate"
    );

    // Another Hafen service's certificate is not enough: ReplayDeletions allows the
    // retention service's identity only.
    let channel = s
        .stack
        .retention
        .try_channel(s.stack.secrets.client_tls(Some("tenant")))
        .await
        .unwrap();
    let err = RetentionServiceClient::new(channel)
        .replay_deletions(pb::ReplayDeletionsRequest { dry_run: true })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let channel = s
        .stack
        .retention
        .try_channel(s.stack.secrets.client_tls(Some("retention")))
        .await
        .unwrap();
    let report = RetentionServiceClient::new(channel)
        .replay_deletions(pb::ReplayDeletionsRequest { dry_run: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report, pb::ReplayDeletionsResponse::default());
    // And the operator.
    retention
        .replay_deletions(
            s.stack
                .secrets
                .operator(pb::ReplayDeletionsRequest::default()),
        )
        .await
        .unwrap();
}

/// A PostgreSQL client program (pg_dump, pg_restore, pg_dumpall, psql) of the newest version
/// installed.
fn pg_program(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort_by_key(|dir| {
        dir.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or_default()
    });
    dirs.iter()
        .rev()
        .map(|dir| dir.join("bin").join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

async fn run(program: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new(pg_program(program))
        .args(args)
        .output()
        .await
        .unwrap_or_else(|err| panic!("{program}: {err}"));
    assert!(
        output.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    schema: bool,
    #[diesel(sql_type = Bool)]
    role: bool,
    #[diesel(sql_type = BigInt)]
    keys: i64,
    #[diesel(sql_type = BigInt)]
    user_keys: i64,
    #[diesel(sql_type = BigInt)]
    sessions: i64,
    #[diesel(sql_type = Text)]
    status: String,
}

/// What exists of tenant `id`.
async fn traces(stack: &TestStack, id: Uuid) -> Exists {
    let schema = hafen_store::TenantId::from(id).schema();
    let mut found: Exists = diesel::sql_query(
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1) AS schema, \
                EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS role, \
                0::bigint AS keys, 0::bigint AS user_keys, \
                (SELECT count(*) FROM hafen.sessions WHERE tenant_id = $2) AS sessions, \
                (SELECT status FROM hafen.tenants WHERE id = $2) AS status",
    )
    .bind::<Text, _>(schema)
    .bind::<diesel::sql_types::Uuid, _>(id)
    .get_result(&mut admin(stack).await)
    .await
    .unwrap();
    let tenant = format!("tenant_id = '{id}'");
    found.keys = count_keys(
        stack,
        &format!("SELECT count(*) AS n FROM hafen_keys.tenant_keys WHERE {tenant}"),
    )
    .await;
    found.user_keys = count_keys(
        stack,
        &format!("SELECT count(*) AS n FROM hafen_keys.user_keys WHERE {tenant}"),
    )
    .await;
    found
}

async fn replay(stack: &TestStack, dry_run: bool) -> pb::ReplayDeletionsResponse {
    stack
        .retention_client()
        .await
        .replay_deletions(
            stack
                .secrets
                .operator(pb::ReplayDeletionsRequest { dry_run }),
        )
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread")]
async fn gr4_a_restored_backup_is_deleted_again_by_replay() {
    // One tenant that stays, with a member whose erasure a restore undoes, and one that goes.
    let s = setup().await;
    let stays = s.group("stays").await;
    s.send(&s.member, &stays, "a message, so the member has a key")
        .await;
    let goner = s.stack.create_tenant("goner").await;
    let goner_id: Uuid = goner.id.parse().unwrap();
    let goner_owner = s.stack.login_owner(&goner).await.access_token;
    let conversation = s
        .stack
        .messaging_client()
        .await
        .create_conversation(with_token(
            &goner_owner,
            msg_pb::CreateConversationRequest {
                kind: msg_pb::ConversationKind::Group as i32,
                title: "doomed".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    s.stack
        .messaging_client()
        .await
        .send_message(with_token(
            &goner_owner,
            msg_pb::SendMessageRequest {
                request_id: Uuid::now_v7().to_string(),
                conversation_id: conversation,
                body: "soon gone".into(),
            },
        ))
        .await
        .unwrap();
    let before = traces(&s.stack, goner_id).await;
    assert!(before.schema && before.role);
    assert_eq!((before.keys, before.user_keys), (1, 1));
    assert!(before.sessions >= 1);

    // The backup: the tenant roles (as `pg_dumpall --roles-only` keeps them) and the database.
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("backup.dump");
    let role = hafen_store::TenantId::from(goner_id).schema();
    let roles_sql: String = run(
        "pg_dumpall",
        &["--roles-only", "-d", &TestEnv::get().admin_database_url],
    )
    .await
    .lines()
    .filter(|line| line.contains(&role))
    .map(|line| format!("{line}\n"))
    .collect();
    assert!(roles_sql.contains("CREATE ROLE"), "{roles_sql}");
    let url = s.stack.db.admin_url();
    run(
        "pg_dump",
        &["-Fc", "-f", dump.to_str().unwrap(), "-d", &url],
    )
    .await;

    // The owner deletes the tenant; the erased member of the other tenant is logged too.
    s.stack
        .tenant_client()
        .await
        .delete_tenant(with_token(
            &goner_owner,
            tenant_pb::DeleteTenantRequest {
                confirm_slug: "goner".into(),
                password: OWNER_PASSWORD.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let mut conn = s.stack.db.keystore().connect_admin().await;
    conn.batch_execute(&format!(
        "INSERT INTO hafen_keys.deletion_log (id, kind, tenant_id, user_id) \
         VALUES ('{}', 'user', '{}', '{}'); \
         DELETE FROM hafen_keys.user_keys WHERE tenant_id = '{}' AND user_id = '{}'",
        Uuid::now_v7(),
        s.tenant.id,
        s.member_id,
        s.tenant.id,
        s.member_id
    ))
    .await
    .unwrap();
    let deleted = traces(&s.stack, goner_id).await;
    assert!(!deleted.schema && !deleted.role);
    assert_eq!(deleted.status, "deleted");
    // The deletion log is in the key store, apart from the database backed up.
    assert_eq!(
        count_keys(
            &s.stack,
            "SELECT count(*) AS n FROM hafen_keys.deletion_log"
        )
        .await,
        2
    );
    drop(conn);

    // The restore: roles first, then the database.
    let roles_file = dir.path().join("roles.sql");
    std::fs::write(&roles_file, &roles_sql).unwrap();
    run(
        "psql",
        &[
            "-v",
            "ON_ERROR_STOP=1",
            "-q",
            "-d",
            &TestEnv::get().admin_database_url,
            "-f",
            roles_file.to_str().unwrap(),
        ],
    )
    .await;
    run(
        "pg_restore",
        &[
            "--clean",
            "--if-exists",
            "--single-transaction",
            "-d",
            &url,
            dump.to_str().unwrap(),
        ],
    )
    .await;
    let restored = traces(&s.stack, goner_id).await;
    assert!(
        restored.schema && restored.role,
        "the backup brought it back"
    );
    assert_eq!(restored.status, "active");
    // No key comes back with it: the keys are in the key store, which was not restored.
    assert_eq!((restored.keys, restored.user_keys), (0, 0));
    let member_key = format!(
        "SELECT count(*) AS n FROM hafen_keys.user_keys WHERE tenant_id = '{}' AND user_id = '{}'",
        s.tenant.id, s.member_id
    );
    assert_eq!(count_keys(&s.stack, &member_key).await, 0);

    // A dry run reports and changes nothing.
    let report = replay(&s.stack, true).await;
    assert_eq!(
        (
            report.entries_checked,
            report.tenants_deleted,
            report.users_erased
        ),
        (2, 1, 1)
    );
    let still = traces(&s.stack, goner_id).await;
    assert!(still.schema && still.role && still.status == "active");

    // The replay deletes everything again.
    let report = replay(&s.stack, false).await;
    assert_eq!((report.tenants_deleted, report.users_erased), (1, 1));
    let gone = traces(&s.stack, goner_id).await;
    assert!(!gone.schema, "schema dropped again");
    assert!(!gone.role, "role dropped again");
    assert_eq!((gone.keys, gone.user_keys, gone.sessions), (0, 0, 0));
    assert_eq!(gone.status, "deleted");
    assert_eq!(count_keys(&s.stack, &member_key).await, 0);
    assert_eq!(
        count(
            &s.stack,
            &format!(
                "SELECT count(*) AS n FROM hafen.sessions WHERE tenant_id = '{}' AND user_id = '{}'",
                s.tenant.id, s.member_id
            )
        )
        .await,
        0,
        "the erased user's sessions are gone"
    );
    // The tenant that stays is untouched.
    let kept = traces(&s.stack, s.tenant_id()).await;
    assert!(kept.schema && kept.status == "active" && kept.keys == 1);

    // Again: nothing left to do. The subcommand's code path agrees.
    let report = replay(&s.stack, false).await;
    assert_eq!((report.tenants_deleted, report.users_erased), (0, 0));
    let args = hafen_retention::ReplayArgs {
        databases: s.stack.db.databases(),
        redis: s.stack.secrets.redis_args(),
        dry_run: true,
        telemetry: hafen_platform::TelemetryArgs {
            log_format: hafen_platform::LogFormat::Auto,
            log_filter: "warn".into(),
        },
    };
    let report = hafen_retention::replay_deletions(&args).await.unwrap();
    assert_eq!((report.tenants_deleted, report.users_erased), (0, 0));
    assert!(report.entries_checked >= 2);
    let replayed = audit_events(&s.stack, Uuid::nil(), "retention.deletions.replayed", 4).await;
    assert!(replayed.iter().all(|a| a.contains_key("tenants_deleted")
        && a.contains_key("users_erased")
        && a.contains_key("entries_checked")));
}

#[tokio::test(flavor = "multi_thread")]
async fn cb5_a_purge_works_through_many_batches_past_held_messages() {
    // The test stack purges 100 messages per batch: 300 + 255 rows take several.
    let s = setup().await;
    let plain = s.group("plain").await;
    let short = s.group("short").await;
    let schema = s.schema();
    let (owner, member) = (s.owner_id.clone(), s.member_id.clone());
    // Messages written straight into the table take event ids below zero: the counter never
    // gives those, and no stream reads them.
    admin(&s.stack)
        .await
        .batch_execute(&format!(
            "INSERT INTO {schema}.messages (id, conversation_id, sequence, sender_id, ciphertext, created_at, event_id) \
                 SELECT gen_random_uuid(), '{plain}', g, \
                        (CASE WHEN g % 2 = 0 THEN '{owner}' ELSE '{member}' END)::uuid, '\\x01', \
                        now() - interval '800 days' + g * interval '1 second', -g \
                 FROM generate_series(1, 300) g; \
             INSERT INTO {schema}.messages (id, conversation_id, sequence, sender_id, ciphertext, created_at, event_id) \
                 SELECT gen_random_uuid(), '{short}', g, '{owner}', '\\x01', \
                        now() - CASE WHEN g <= 250 THEN interval '10 days' ELSE interval '3 days' END \
                              + g * interval '1 second', -1000 - g \
                 FROM generate_series(1, 255) g;"
        ))
        .await
        .unwrap();
    let mut retention = s.retention().await;
    retention
        .set_conversation_policy(with_token(
            &s.owner,
            pb::SetConversationPolicyRequest {
                conversation_id: short.clone(),
                retention_days: 7,
            },
        ))
        .await
        .unwrap();
    s.hold(
        pb::set_legal_hold_request::Target::UserId(member.clone()),
        true,
        "litigation",
    )
    .await
    .unwrap();
    let done = s.purge().await;
    assert_eq!(done.state, pb::PurgeRunState::Succeeded as i32);
    assert_eq!(done.messages_deleted, 150 + 250);
    assert_eq!(done.held_skipped, 150);
    assert_eq!(done.conversations_touched, 2);
    let left = |conversation: &str, sender: &str| {
        format!(
            "SELECT count(*) AS n FROM {schema}.messages WHERE conversation_id = '{conversation}' \
             AND sender_id = '{sender}'"
        )
    };
    assert_eq!(count(&s.stack, &left(&plain, &owner)).await, 0);
    assert_eq!(count(&s.stack, &left(&plain, &member)).await, 150);
    assert_eq!(count(&s.stack, &left(&short, &owner)).await, 5);
}

/// Sends number after a conversation's newest message; a purge that removes the newest ones
/// leaves their sequence behind as a floor, so no sequence is ever given twice.
#[tokio::test(flavor = "multi_thread")]
async fn cb5_a_conversation_purged_to_its_last_message_never_reuses_a_sequence() {
    let s = setup().await;
    let quiet = s.group("quiet").await;
    let mut old = Vec::new();
    for i in 0..3 {
        old.push(s.send(&s.owner, &quiet, &format!("long ago {i}")).await);
    }
    s.age(&old, 800).await;
    let done = s.purge().await;
    assert_eq!(done.messages_deleted, 3);
    assert!(s.history(&quiet).await.is_empty());

    let mut messaging = s.stack.messaging_client().await;
    let next = messaging
        .send_message(with_token(
            &s.owner,
            msg_pb::SendMessageRequest {
                request_id: Uuid::now_v7().to_string(),
                conversation_id: quiet.clone(),
                body: "after the purge".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        next.sequence, 4,
        "after the purged messages, not again from 1"
    );
    let listed = messaging
        .list_conversations(with_token(
            &s.owner,
            msg_pb::ListConversationsRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner()
        .conversations;
    let quiet = listed.iter().find(|c| c.conversation_id == quiet).unwrap();
    assert_eq!(quiet.last_sequence, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn cb5_a_message_edited_while_its_batch_runs_is_still_purged() {
    // The batch deletes by the row versions it read; an edit committed under it moves one
    // message to a new version, which the run must still delete.
    let s = setup().await;
    let group = s.group("edited").await;
    let schema = s.schema();
    let owner = s.owner_id.clone();
    admin(&s.stack)
        .await
        .batch_execute(&format!(
            "INSERT INTO {schema}.messages (id, conversation_id, sequence, sender_id, ciphertext, created_at, event_id) \
                 SELECT gen_random_uuid(), '{group}', g, '{owner}', '\\x01', \
                        now() - interval '800 days' + g * interval '1 second', -g \
                 FROM generate_series(1, 50) g"
        ))
        .await
        .unwrap();
    // An edit of the 10th message, not yet committed: the batch waits for it.
    let mut editor = admin(&s.stack).await;
    editor
        .batch_execute(&format!(
            "BEGIN; UPDATE {schema}.messages SET ciphertext = '\\x02', edited_at = now() \
             WHERE conversation_id = '{group}' AND sequence = 10"
        ))
        .await
        .unwrap();
    let run = s
        .retention()
        .await
        .run_purge(with_token(&s.owner, pb::RunPurgeRequest {}))
        .await
        .unwrap()
        .into_inner();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let waiting = format!(
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = '{}' AND wait_event_type = 'Lock'",
        s.stack.db.name()
    );
    while count(&s.stack, &waiting).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the purge never reached the edited message"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    editor.batch_execute("COMMIT").await.unwrap();
    let done = s.wait_for_run(&run.purge_run_id).await;
    assert_eq!(done.state, pb::PurgeRunState::Succeeded as i32);
    assert_eq!(done.messages_deleted, 50);
    assert_eq!(done.held_skipped, 0);
    let left =
        format!("SELECT count(*) AS n FROM {schema}.messages WHERE conversation_id = '{group}'");
    assert_eq!(count(&s.stack, &left).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn gr3_a_legal_hold_stops_tenant_deletion_and_the_rewriting_of_held_messages() {
    use pb::set_legal_hold_request::Target;
    let s = setup().await;
    let conversation = s.group("evidence").await;
    let message = s.send(&s.member, &conversation, "as it was said").await;
    s.hold(Target::UserId(s.member_id.clone()), true, "litigation")
        .await
        .unwrap();

    let edit = s
        .stack
        .messaging_client()
        .await
        .edit_message(with_token(
            &s.member,
            msg_pb::EditMessageRequest {
                message_id: message.clone(),
                body: "as I would rather have said it".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(edit.code(), Code::FailedPrecondition);
    assert_eq!(status::reason(&edit).as_deref(), Some("LEGAL_HOLD_ACTIVE"));

    let mut tenants = s.stack.tenant_client().await;
    let by_owner = tenants
        .delete_tenant(with_token(
            &s.owner,
            tenant_pb::DeleteTenantRequest {
                confirm_slug: s.tenant.slug.clone(),
                password: OWNER_PASSWORD.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status::reason(&by_owner).as_deref(),
        Some("LEGAL_HOLD_ACTIVE"),
        "{by_owner:?}"
    );
    let operator_delete = || {
        s.stack.secrets.operator(tenant_pb::DeleteTenantRequest {
            tenant_id: s.tenant.id.clone(),
            confirm_slug: s.tenant.slug.clone(),
            ..Default::default()
        })
    };
    let by_operator = tenants.delete_tenant(operator_delete()).await.unwrap_err();
    assert_eq!(by_operator.code(), Code::FailedPrecondition);
    assert_eq!(
        status::reason(&by_operator).as_deref(),
        Some("LEGAL_HOLD_ACTIVE")
    );
    // Nothing was deleted: the held message reads as it was said.
    let history = s
        .stack
        .messaging_client()
        .await
        .list_messages(with_token(
            &s.owner,
            msg_pb::ListMessagesRequest {
                conversation_id: conversation.clone(),
                direction: msg_pb::Direction::Forward as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(history[0].body, "as it was said");

    // Lifted, the hold no longer stands in the way.
    s.hold(Target::UserId(s.member_id.clone()), false, "")
        .await
        .unwrap();
    tenants.delete_tenant(operator_delete()).await.unwrap();
}
