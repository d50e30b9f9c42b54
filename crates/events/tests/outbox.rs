//! The outbox against real PostgreSQL and the real audit service over mutual TLS (BX6, BX5).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::time::Duration;

use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use hafen_proto::audit::v1 as audit_pb;
use hafen_proto::auth::v1 as auth_pb;
use hafen_store::schema::{audit_events, outbox};
use hafen_testkit::{TestStack, TestTenant, with_token};
use uuid::Uuid;

/// Events of `tenant` still waiting in the outbox.
async fn waiting(stack: &TestStack, tenant: Uuid) -> i64 {
    let mut conn = stack.db.connect().await;
    outbox::table
        .filter(outbox::tenant_id.eq(tenant))
        .count()
        .get_result(&mut conn)
        .await
        .unwrap()
}

/// The tenant's chain as stored: (sequence, event id, action), in order.
async fn chain(stack: &TestStack, tenant: Uuid) -> Vec<(i64, Uuid, String)> {
    let mut conn = stack.db.connect().await;
    audit_events::table
        .filter(audit_events::chain.eq(tenant))
        .order(audit_events::sequence)
        .select((
            audit_events::sequence,
            audit_events::event_id,
            audit_events::action,
        ))
        .load(&mut conn)
        .await
        .unwrap()
}

/// Waits until the tenant's outbox is empty (delivered), at most 20 s.
async fn delivered(stack: &TestStack, tenant: Uuid) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while waiting(stack, tenant).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn create_users(stack: &TestStack, owner: &str, count: usize) {
    let mut auth = stack.auth_client().await;
    for n in 0..count {
        auth.create_user(with_token(
            owner,
            auth_pb::CreateUserRequest {
                username: format!("user{n}"),
                display_name: format!("User {n}"),
                role: hafen_proto::common::v1::Role::Member as i32,
                credential: Some(auth_pb::create_user_request::Credential::Password(
                    "a long enough password".into(),
                )),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    }
}

fn tenant_id(tenant: &TestTenant) -> Uuid {
    tenant.id.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn bx6_events_wait_in_the_outbox_while_audit_is_down_and_arrive_once() {
    let mut stack = TestStack::start().await;
    let tenant = stack.create_tenant("outbox").await;
    let id = tenant_id(&tenant);
    let owner = stack.login_owner(&tenant).await.access_token;
    delivered(&stack, id).await;
    let before = chain(&stack, id).await;
    let actions: Vec<&str> = before.iter().map(|(_, _, a)| a.as_str()).collect();
    assert_eq!(actions, ["tenant.created", "auth.login.succeeded"]);

    // The audit service goes away; changes go on, and their events wait.
    stack.stop_audit().await;
    create_users(&stack, &owner, 25).await;
    let failed = stack
        .login(&tenant.slug, "owner", "wrong password!", &tenant.owner_code)
        .await;
    assert!(failed.is_err());
    // Not a wait for something to happen but for nothing to: the relay (every 200 ms) gets
    // a few rounds in which it must deliver nothing while the audit service is away.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        waiting(&stack, id).await,
        26,
        "nothing delivered, nothing lost"
    );
    assert_eq!(chain(&stack, id).await.len(), 2);

    // Keep one queued row, to deliver it a second time later (as after a relay crash
    // between the append and the delete).
    let mut conn = stack.db.connect().await;
    let (copy_id, copy_event): (Uuid, Vec<u8>) = outbox::table
        .filter(outbox::tenant_id.eq(id))
        .order(outbox::created_at)
        .select((outbox::id, outbox::event))
        .first(&mut conn)
        .await
        .unwrap();

    stack.start_audit().await;
    delivered(&stack, id).await;
    let after = chain(&stack, id).await;
    assert_eq!(after.len(), 2 + 26);
    let created = after
        .iter()
        .filter(|(_, _, a)| a == "auth.user.created")
        .count();
    assert_eq!(created, 25);
    assert!(after.iter().any(|(_, _, a)| a == "auth.login.failed"));
    let sequences: Vec<i64> = after.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(
        sequences,
        (1..=28).collect::<Vec<i64>>(),
        "no gap, no duplicate"
    );

    // Delivered again: the audit service recognises the event id; the chain stays as it was.
    diesel::insert_into(outbox::table)
        .values((
            outbox::id.eq(copy_id),
            outbox::tenant_id.eq(Some(id)),
            outbox::event.eq(copy_event),
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    delivered(&stack, id).await;
    assert_eq!(chain(&stack, id).await, after);

    let verified = stack
        .audit_client()
        .await
        .verify_chain(with_token(&owner, audit_pb::VerifyChainRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(verified.intact);
    assert_eq!(verified.head_sequence, 28);
}

#[tokio::test(flavor = "multi_thread")]
async fn bx6_an_event_commits_and_rolls_back_with_its_change() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("atomic").await;
    let id = tenant_id(&tenant);
    let owner = stack.login_owner(&tenant).await.access_token;
    create_users(&stack, &owner, 1).await;
    delivered(&stack, id).await;
    let before = chain(&stack, id).await;
    // The same username again: the insert fails, so its event must not exist either.
    let mut auth = stack.auth_client().await;
    let err = auth
        .create_user(with_token(
            &owner,
            auth_pb::CreateUserRequest {
                username: "user0".into(),
                display_name: "Again".into(),
                role: hafen_proto::common::v1::Role::Member as i32,
                credential: Some(auth_pb::create_user_request::Credential::Password(
                    "a long enough password".into(),
                )),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    // Not a wait for something to happen but for nothing to: had the failed insert left an
    // event, the relay (every 200 ms) would have delivered it to the chain by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(waiting(&stack, id).await, 0);
    assert_eq!(chain(&stack, id).await, before);
}

#[tokio::test(flavor = "multi_thread")]
async fn bx5_audit_events_carry_no_secrets_or_content() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("secretless").await;
    let id = tenant_id(&tenant);
    let owner = stack.login_owner(&tenant).await.access_token;
    create_users(&stack, &owner, 1).await;
    let mut auth = stack.auth_client().await;
    let users = auth
        .list_users(with_token(&owner, auth_pb::ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .users;
    let member = users.iter().find(|u| u.username == "user0").unwrap();
    let code = auth
        .issue_chat_code(with_token(
            &owner,
            auth_pb::IssueChatCodeRequest {
                user_id: member.user_id.clone(),
                device_label: "phone".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let _ = stack
        .login(&tenant.slug, "user0", "not the password!", &code.code)
        .await;
    stack
        .login(&tenant.slug, "user0", "a long enough password", &code.code)
        .await
        .unwrap();
    delivered(&stack, id).await;

    let mut conn = stack.db.connect().await;
    let stored: Vec<(String, String, serde_json::Value)> = audit_events::table
        .filter(audit_events::chain.eq(id))
        .select((
            audit_events::action,
            audit_events::actor_id,
            audit_events::attributes,
        ))
        .load(&mut conn)
        .await
        .unwrap();
    let text = format!("{stored:?}");
    for secret in [
        hafen_testkit::OWNER_PASSWORD,
        "a long enough password",
        "not the password!",
        tenant.owner_code.as_str(),
        code.code.as_str(),
        "user0",
        "User 0",
        "phone",
    ] {
        assert!(!text.contains(secret), "an audit event holds {secret:?}");
    }
    let actions: Vec<&str> = stored.iter().map(|(a, _, _)| a.as_str()).collect();
    for expected in [
        "tenant.created",
        "auth.login.succeeded",
        "auth.user.created",
        "auth.chat_code.issued",
        "auth.login.failed",
    ] {
        assert!(
            actions.contains(&expected),
            "{expected} missing in {actions:?}"
        );
    }
}
