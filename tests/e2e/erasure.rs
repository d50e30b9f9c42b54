//! Erasing a user (GDPR Art. 17, BX1, CB9 for users): by an admin or on the user's own
//! request, at once or after a grace period; what remains afterwards, and that a copy of the
//! tenant's data taken before the erasure (a backup) cannot be read with anything the system
//! still has. A restore of such a copy is erased again by the deletion-log replay (GR4).

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Bytea, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use hafen_platform::status;
use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::messaging::v1 as pb;
use hafen_proto::retention::v1 as retention_pb;
use hafen_testkit::{TestServer, TestStack, TestTenant, eventually, with_token};
use tokio_stream::StreamExt;
use uuid::Uuid;

fn reason(status: &tonic::Status) -> String {
    status::reason(status).unwrap_or_default()
}

/// A fresh key ring over the stack's databases: nothing cached, everything the system has.
fn key_ring(stack: &TestStack) -> hafen_store::keyring::KeyRing {
    let databases = hafen_store::Databases::new(&stack.db.databases()).unwrap();
    hafen_store::keyring::KeyRing::new(
        databases,
        stack.secrets.master_key(),
        std::num::NonZeroUsize::new(8).unwrap(),
    )
}

#[derive(QueryableByName)]
struct Sealed {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    conversation_id: Uuid,
    #[diesel(sql_type = Bytea)]
    ciphertext: Vec<u8>,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Account {
    #[diesel(sql_type = Text)]
    username: String,
    #[diesel(sql_type = Text)]
    display_name: String,
    #[diesel(sql_type = Text)]
    password_hash: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Bool)]
    totp: bool,
}

async fn count(stack: &TestStack, sql: &str, tenant: &TestTenant, user: &str) -> i64 {
    let schema = format!("t_{}", Uuid::parse_str(&tenant.id).unwrap().simple());
    // Keys and the deletion log are in the key store, a database of its own.
    let mut conn = if sql.contains("hafen_keys.") {
        stack.db.keystore().connect_admin().await
    } else {
        stack.db.connect_admin().await
    };
    let found: Count = diesel::sql_query(sql.replace("{schema}", &schema))
        .bind::<SqlUuid, _>(Uuid::parse_str(&tenant.id).unwrap())
        .bind::<SqlUuid, _>(Uuid::parse_str(user).unwrap())
        .get_result(&mut conn)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"));
    found.n
}

async fn account(stack: &TestStack, tenant: &TestTenant, user: &str) -> Account {
    let schema = format!("t_{}", Uuid::parse_str(&tenant.id).unwrap().simple());
    let mut conn = stack.db.connect_admin().await;
    diesel::sql_query(format!(
        "SELECT username, display_name, password_hash, status, \
                totp_secret IS NOT NULL OR totp_pending IS NOT NULL AS totp \
         FROM {schema}.users WHERE id = $1"
    ))
    .bind::<SqlUuid, _>(Uuid::parse_str(user).unwrap())
    .get_result(&mut conn)
    .await
    .unwrap()
}

pub(crate) async fn send(
    stack: &TestStack,
    token: &str,
    conversation: &str,
    body: &str,
) -> pb::Message {
    stack
        .messaging_client()
        .await
        .send_message(with_token(
            token,
            pb::SendMessageRequest {
                request_id: Uuid::now_v7().to_string(),
                conversation_id: conversation.to_owned(),
                body: body.to_owned(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

pub(crate) async fn messages(
    stack: &TestStack,
    token: &str,
    conversation: &str,
) -> Vec<pb::Message> {
    stack
        .messaging_client()
        .await
        .list_messages(with_token(
            token,
            pb::ListMessagesRequest {
                conversation_id: conversation.to_owned(),
                page_size: 100,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .messages
}

async fn erase(stack: &TestStack, token: &str, user: &str) -> Result<auth_pb::User, tonic::Status> {
    stack
        .auth_client()
        .await
        .erase_user(with_token(
            token,
            auth_pb::EraseUserRequest {
                user_id: user.to_owned(),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn bx1_an_erased_users_messages_cannot_be_read_from_a_copy_taken_before_the_erasure() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("erasure").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let (mara, mara_session) = stack
        .create_logged_in_member(&tenant, &owner, "mara", "mara password 1")
        .await;
    let (other, other_session) = stack
        .create_logged_in_member(&tenant, &owner, "other", "other password 1")
        .await;
    let conversation = stack
        .messaging_client()
        .await
        .create_conversation(with_token(
            &owner,
            pb::CreateConversationRequest {
                kind: pb::ConversationKind::Group as i32,
                title: "Team".into(),
                member_user_ids: vec![mara.user_id.clone(), other.user_id.clone()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    let bodies = ["first from mara", "second from mara", "third from mara"];
    for body in bodies {
        send(&stack, &mara_session.access_token, &conversation, body).await;
    }
    let kept = send(
        &stack,
        &other_session.access_token,
        &conversation,
        "other's",
    )
    .await;

    // The "backup": mara's sealed messages as the tenant's schema holds them now. With the
    // system's keys they can be read, before the erasure.
    let schema = format!("t_{}", Uuid::parse_str(&tenant.id).unwrap().simple());
    let backup: Vec<Sealed> = {
        let mut conn = stack.db.connect_admin().await;
        diesel::sql_query(format!(
            "SELECT id, conversation_id, ciphertext FROM {schema}.messages \
             WHERE sender_id = $1 ORDER BY sequence"
        ))
        .bind::<SqlUuid, _>(Uuid::parse_str(&mara.user_id).unwrap())
        .load(&mut conn)
        .await
        .unwrap()
    };
    assert_eq!(backup.len(), 3);
    let (tenant_id, mara_id) = (
        Uuid::parse_str(&tenant.id).unwrap(),
        Uuid::parse_str(&mara.user_id).unwrap(),
    );
    let key = key_ring(&stack).user_key(tenant_id, mara_id).await.unwrap();
    for (sealed, body) in backup.iter().zip(bodies) {
        let context = hafen_store::keyring::body_context(sealed.id, sealed.conversation_id);
        assert_eq!(
            key.open(&context, &sealed.ciphertext).unwrap().as_slice(),
            body.as_bytes()
        );
    }
    drop(key);

    // Who may erase whom.
    let admin = stack
        .auth_client()
        .await
        .create_user(with_token(
            &owner,
            auth_pb::CreateUserRequest {
                username: "ada".into(),
                display_name: "Ada".into(),
                role: hafen_proto::common::v1::Role::Admin as i32,
                credential: Some(auth_pb::create_user_request::Credential::Password(
                    "ada password 1".into(),
                )),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let refused = erase(&stack, &other_session.access_token, &mara.user_id)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "a member");
    let refused = erase(&stack, &owner, &tenant.owner_id).await.unwrap_err();
    assert_eq!(reason(&refused), "OWNER_PROTECTED");
    let refused = erase(&stack, &owner, "not-a-uuid").await.unwrap_err();
    assert_eq!(
        status::metadata(&refused, "field").as_deref(),
        Some("user_id")
    );
    let refused = erase(&stack, &owner, &Uuid::now_v7().to_string())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound);

    // A legal hold on the conversation takes precedence: nothing is erased.
    let mut retention = stack.retention_client().await;
    let hold = |on: bool| {
        with_token(
            &owner,
            retention_pb::SetLegalHoldRequest {
                target: Some(
                    retention_pb::set_legal_hold_request::Target::ConversationId(
                        conversation.clone(),
                    ),
                ),
                hold: on,
                reason_code: "case-1".into(),
            },
        )
    };
    retention.set_legal_hold(hold(true)).await.unwrap();
    let refused = erase(&stack, &owner, &mara.user_id).await.unwrap_err();
    assert_eq!(reason(&refused), "LEGAL_HOLD_ACTIVE");
    assert_eq!(
        account(&stack, &tenant, &mara.user_id).await.status,
        "active"
    );
    assert_eq!(
        messages(&stack, &owner, &conversation).await[0].body,
        bodies[0],
        "nothing erased under the hold"
    );
    retention.set_legal_hold(hold(false)).await.unwrap();

    // The owner follows the conversation while mara is erased.
    let mut stream = stack
        .messaging_client()
        .await
        .subscribe(with_token(&owner, pb::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the replay")
            .expect("a stream item")
            .unwrap();
        if matches!(item.event, Some(pb::subscribe_response::Event::CaughtUp(_))) {
            break;
        }
    }

    // The owner erases mara.
    let erased = erase(&stack, &owner, &mara.user_id).await.unwrap();
    assert_eq!(erased.state, auth_pb::UserState::Erased as i32);
    assert_eq!(erased.display_name, "Erased user");
    assert_eq!(erased.username, format!("erased:{}", mara.user_id));
    let again = erase(&stack, &owner, &mara.user_id).await.unwrap();
    assert_eq!(again.state, auth_pb::UserState::Erased as i32, "idempotent");

    // The stream shows her messages gone and her leaving.
    let (mut deleted, mut left_group) = (Vec::new(), false);
    while deleted.len() < 3 || !left_group {
        let item = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the erasure's events")
            .expect("a stream item")
            .unwrap();
        match item.event {
            Some(pb::subscribe_response::Event::MessageDeleted(m)) => {
                assert!(m.sender_erased && m.body.is_empty());
                deleted.push(m.message_id);
            }
            Some(pb::subscribe_response::Event::MembershipChanged(change)) => {
                left_group = change.removed_user_ids == [mara.user_id.clone()];
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut expected: Vec<String> = backup.iter().map(|m| m.id.to_string()).collect();
    expected.sort();
    deleted.sort();
    assert_eq!(deleted, expected);

    // Her messages are tombstones marked erased; the others' stay.
    let shown = messages(&stack, &owner, &conversation).await;
    let (hers, others): (Vec<_>, Vec<_>) =
        shown.iter().partition(|m| m.sender_user_id == mara.user_id);
    assert_eq!(hers.len(), 3);
    assert!(
        hers.iter()
            .all(|m| m.sender_erased && m.body.is_empty() && m.delete_time.is_some()),
        "{hers:?}"
    );
    assert_eq!(others.len(), 1);
    assert_eq!(others[0].body, kept.body);
    assert!(!others[0].sender_erased);

    // Her session, login, chat codes, memberships and key are gone; the erasure is logged.
    let refused = stack
        .messaging_client()
        .await
        .list_conversations(with_token(
            &mara_session.access_token,
            pb::ListConversationsRequest::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let refused = stack
        .login(&tenant.slug, "mara", &mara.password, &mara.chat_code)
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "LOGIN_FAILED");
    let left = [
        (
            "SELECT count(*) AS n FROM hafen_keys.user_keys WHERE tenant_id = $1 AND user_id = $2",
            0,
        ),
        (
            "SELECT count(*) AS n FROM hafen.sessions WHERE tenant_id = $1 AND user_id = $2 \
          AND revoked_at IS NULL",
            0,
        ),
        (
            "SELECT count(*) AS n FROM hafen_keys.deletion_log WHERE tenant_id = $1 AND user_id = $2 \
          AND kind = 'user'",
            1,
        ),
        (
            "SELECT count(*) AS n FROM {schema}.chat_codes WHERE $1 = $1 AND user_id = $2",
            0,
        ),
        (
            "SELECT count(*) AS n FROM {schema}.members WHERE $1 = $1 AND user_id = $2",
            0,
        ),
        (
            "SELECT count(*) AS n FROM {schema}.messages WHERE $1 = $1 AND sender_id = $2 \
          AND (ciphertext IS NOT NULL OR NOT erased)",
            0,
        ),
    ];
    for (sql, expected) in left {
        assert_eq!(
            count(&stack, sql, &tenant, &mara.user_id).await,
            expected,
            "{sql}"
        );
    }
    let row = account(&stack, &tenant, &mara.user_id).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.display_name.as_str(),
            row.password_hash.as_str(),
            row.totp
        ),
        ("erased", "Erased user", "", false)
    );
    assert!(!row.username.contains("mara"));

    // With everything the system still has, the copy taken before cannot be read: the key
    // is gone and is never made again.
    let ring = key_ring(&stack);
    assert!(matches!(
        ring.user_key(tenant_id, mara_id).await,
        Err(hafen_store::Error::KeyDestroyed)
    ));
    assert!(backup.iter().all(|sealed| !sealed.ciphertext.is_empty()));

    // The name is free; the erased account is not listed.
    let listed = stack
        .auth_client()
        .await
        .list_users(with_token(
            &owner,
            auth_pb::ListUsersRequest {
                include_deactivated: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .users;
    assert!(listed.iter().all(|u| u.user_id != mara.user_id));
    stack
        .create_member(&owner, "mara", "new mara password")
        .await;

    // An admin erases members, not admins; the owner erases admins.
    let ada = stack
        .login(&tenant.slug, "ada", "ada password 1", &{
            stack
                .auth_client()
                .await
                .issue_chat_code(with_token(
                    &owner,
                    auth_pb::IssueChatCodeRequest {
                        user_id: admin.user_id.clone(),
                        device_label: "ada".into(),
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .code
        })
        .await
        .unwrap()
        .access_token;
    let second_admin = stack
        .auth_client()
        .await
        .create_user(with_token(
            &owner,
            auth_pb::CreateUserRequest {
                username: "bert".into(),
                display_name: "Bert".into(),
                role: hafen_proto::common::v1::Role::Admin as i32,
                credential: Some(auth_pb::create_user_request::Credential::Password(
                    "bert password 1".into(),
                )),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let refused = erase(&stack, &ada, &second_admin.user_id)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        erase(&stack, &ada, &other.user_id).await.unwrap().state,
        auth_pb::UserState::Erased as i32
    );
    assert_eq!(
        erase(&stack, &owner, &second_admin.user_id)
            .await
            .unwrap()
            .state,
        auth_pb::UserState::Erased as i32
    );

    // A restore of the copy brings mara's rows back; the deletion-log replay erases them
    // again (and her key stays destroyed).
    {
        let mut conn = stack.db.connect_admin().await;
        for sealed in &backup {
            diesel::sql_query(format!(
                "UPDATE {schema}.messages SET ciphertext = $2, deleted_at = NULL, erased = false \
                 WHERE id = $1"
            ))
            .bind::<SqlUuid, _>(sealed.id)
            .bind::<Bytea, _>(&sealed.ciphertext)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        diesel::sql_query(format!(
            "UPDATE {schema}.users SET status = 'active', username = 'mara-restored', \
             display_name = 'Mara' WHERE id = $1"
        ))
        .bind::<SqlUuid, _>(mara_id)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let replayed = retention
        .replay_deletions(
            stack
                .secrets
                .operator(retention_pb::ReplayDeletionsRequest::default()),
        )
        .await
        .unwrap()
        .into_inner();
    assert!(replayed.users_erased >= 1, "{replayed:?}");
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) AS n FROM {schema}.messages WHERE $1 = $1 AND sender_id = $2 \
             AND (ciphertext IS NOT NULL OR NOT erased)",
            &tenant,
            &mara.user_id
        )
        .await,
        0,
        "erased again"
    );
    let row = account(&stack, &tenant, &mara.user_id).await;
    assert_eq!(
        (row.status.as_str(), row.display_name.as_str()),
        ("erased", "Erased user")
    );
    assert!(matches!(
        key_ring(&stack).user_key(tenant_id, mara_id).await,
        Err(hafen_store::Error::KeyDestroyed)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn cb9_a_user_asks_for_their_own_erasure_at_once_or_after_the_grace_period() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("erase-me").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let request = |token: &str| with_token(token, auth_pb::RequestErasureRequest {});

    // Without a grace period (the default): at once.
    let refused = stack
        .auth_client()
        .await
        .request_erasure(request(&owner))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "OWNER_PROTECTED");
    let (nils, session) = stack
        .create_logged_in_member(&tenant, &owner, "nils", "nils password 1")
        .await;
    let erased = stack
        .auth_client()
        .await
        .request_erasure(request(&session.access_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.state, auth_pb::UserState::Erased as i32);
    assert_eq!(
        account(&stack, &tenant, &nils.user_id).await.status,
        "erased"
    );

    // A second auth service over the same databases, whose organisation waits 2 seconds.
    let mut config = stack.secrets.auth_config(&stack.db);
    config.erasure_grace = Duration::from_secs(2);
    let patient = TestServer::spawn(|l, s| hafen_auth::serve(config, l, s)).await;
    let mut patient_auth =
        auth_pb::auth_service_client::AuthServiceClient::new(patient.channel(&stack.secrets).await);

    let (ida, session) = stack
        .create_logged_in_member(&tenant, &owner, "ida", "ida password 1")
        .await;
    let waiting = patient_auth
        .request_erasure(request(&session.access_token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waiting.state, auth_pb::UserState::Deactivated as i32);
    assert!(waiting.erasure_due_time.is_some());
    let refused = stack
        .messaging_client()
        .await
        .list_conversations(with_token(
            &session.access_token,
            pb::ListConversationsRequest::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::Unauthenticated,
        "sessions ended"
    );
    let listed = stack
        .auth_client()
        .await
        .list_users(with_token(
            &owner,
            auth_pb::ListUsersRequest {
                include_deactivated: true,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .users;
    let shown = listed.iter().find(|u| u.user_id == ida.user_id).unwrap();
    assert_eq!(
        shown.erasure_due_time, waiting.erasure_due_time,
        "admins see when"
    );
    eventually(
        "the erasure after the grace period",
        Duration::from_secs(30),
        || {
            let stack = &stack;
            let tenant = &tenant;
            let id = ida.user_id.clone();
            async move { (account(stack, tenant, &id).await.status == "erased").then_some(()) }
        },
    )
    .await;
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) AS n FROM hafen.erasure_requests WHERE tenant_id = $1 AND user_id = $2",
            &tenant,
            &ida.user_id
        )
        .await,
        0
    );

    // Reactivating the account cancels a waiting request.
    let (jo, session) = stack
        .create_logged_in_member(&tenant, &owner, "jonas", "jonas password 1")
        .await;
    let mut long_config = stack.secrets.auth_config(&stack.db);
    long_config.erasure_grace = Duration::from_secs(3600);
    let slow = TestServer::spawn(|l, s| hafen_auth::serve(long_config, l, s)).await;
    auth_pb::auth_service_client::AuthServiceClient::new(slow.channel(&stack.secrets).await)
        .request_erasure(request(&session.access_token))
        .await
        .unwrap();
    let pending = "SELECT count(*) AS n FROM hafen.erasure_requests WHERE tenant_id = $1 \
                   AND user_id = $2";
    assert_eq!(count(&stack, pending, &tenant, &jo.user_id).await, 1);
    let back = stack
        .auth_client()
        .await
        .reactivate_user(with_token(
            &owner,
            auth_pb::ReactivateUserRequest {
                user_id: jo.user_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.state, auth_pb::UserState::Active as i32);
    assert!(back.erasure_due_time.is_none());
    assert_eq!(
        count(&stack, pending, &tenant, &jo.user_id).await,
        0,
        "cancelled"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cb9_a_prolific_users_messages_show_erased_at_once_and_become_tombstones_in_the_background()
{
    use diesel_async::SimpleAsyncConnection as _;
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("prolific").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let (mara, mara_session) = stack
        .create_logged_in_member(&tenant, &owner, "mara", "mara password 1")
        .await;
    let conversation = stack
        .messaging_client()
        .await
        .create_conversation(with_token(
            &owner,
            pb::CreateConversationRequest {
                kind: pb::ConversationKind::Group as i32,
                title: "Busy".into(),
                member_user_ids: vec![mara.user_id.clone()],
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id;
    send(
        &stack,
        &mara_session.access_token,
        &conversation,
        "the first",
    )
    .await;
    // More than an erasure makes tombstones before it answers, written directly (their
    // ciphertext is never opened: it is read only after her key is gone).
    let schema = format!("t_{}", Uuid::parse_str(&tenant.id).unwrap().simple());
    stack
        .db
        .connect_admin()
        .await
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO {schema}.messages (id, conversation_id, sequence, sender_id, ciphertext, \
                 masked, created_at, event_id)
                 SELECT gen_random_uuid(), '{conversation}', 1 + g, '{mara}', \
                        decode(repeat('a5', 64), 'hex'), false, now(), \
                        (SELECT last_id FROM {schema}.event_counter) + g
                 FROM generate_series(1, 1199) g;
             UPDATE {schema}.conversations SET last_sequence = 1200 WHERE id = '{conversation}';
             UPDATE {schema}.event_counter SET last_id = last_id + 1199;
             COMMIT;",
            mara = mara.user_id
        ))
        .await
        .unwrap();

    let erased = erase(&stack, &owner, &mara.user_id).await.unwrap();
    assert_eq!(erased.state, auth_pb::UserState::Erased as i32);
    assert!(erased.erasure_due_time.is_none(), "{erased:?}");
    // At once, whether a tombstone yet or not: no body, and shown as erased.
    let shown = messages(&stack, &owner, &conversation).await;
    assert_eq!(shown.len(), 100);
    assert!(
        shown.iter().all(|m| m.sender_erased && m.body.is_empty()),
        "{shown:?}"
    );
    // The rest become tombstones in the background; then the erasure request goes.
    let left = "SELECT count(*) AS n FROM {schema}.messages WHERE $1 = $1 AND sender_id = $2 \
                AND (ciphertext IS NOT NULL OR NOT erased OR deleted_at IS NULL)";
    eventually(
        "every message of hers a tombstone",
        Duration::from_secs(60),
        || async { (count(&stack, left, &tenant, &mara.user_id).await == 0).then_some(()) },
    )
    .await;
    eventually(
        "her erasure request ended",
        Duration::from_secs(10),
        || async {
            (count(
                &stack,
                "SELECT count(*) AS n FROM hafen.erasure_requests \
                 WHERE tenant_id = $1 AND user_id = $2",
                &tenant,
                &mara.user_id,
            )
            .await
                == 0)
                .then_some(())
        },
    )
    .await;
    let shown = messages(&stack, &owner, &conversation).await;
    assert!(
        shown
            .iter()
            .all(|m| m.sender_erased && m.delete_time.is_some())
    );
}
