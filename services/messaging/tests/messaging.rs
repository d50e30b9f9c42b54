//! The messaging service against real PostgreSQL and Redis, services over TLS (OC5, OC7,
//! CB3, CB4, UL1, UL2, BX4, BX5).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::collections::HashSet;
use std::time::Duration;

use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use futures::StreamExt;
use hafen_platform::status;
use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::messaging::v1 as pb;
use hafen_proto::messaging::v1::messaging_service_client::MessagingServiceClient;
use hafen_testkit::{Channel, OWNER_PASSWORD, TestStack, TestTenant, eventually, with_token};
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

async fn setup_on(stack: TestStack) -> Setup {
    let tenant = stack.create_tenant("chat").await;
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
    setup_on(TestStack::start().await).await
}

impl Setup {
    async fn client(&self) -> MessagingServiceClient<Channel> {
        self.stack.messaging_client().await
    }

    async fn group(&self, title: &str) -> String {
        self.group_of(title, vec![self.member_id.clone()]).await
    }

    /// A group of the owner alone.
    async fn owners_only(&self) -> String {
        self.group_of("owners only", Vec::new()).await
    }

    /// A group of the owner and `members`.
    async fn group_of(&self, title: &str, members: Vec<String>) -> String {
        self.client()
            .await
            .create_conversation(with_token(
                &self.owner,
                pb::CreateConversationRequest {
                    kind: pb::ConversationKind::Group as i32,
                    title: title.into(),
                    member_user_ids: members,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .conversation_id
    }

    async fn send(
        &self,
        token: &str,
        conversation: &str,
        body: &str,
    ) -> Result<pb::Message, tonic::Status> {
        self.client()
            .await
            .send_message(with_token(
                token,
                pb::SendMessageRequest {
                    request_id: Uuid::now_v7().to_string(),
                    conversation_id: conversation.into(),
                    body: body.into(),
                },
            ))
            .await
            .map(tonic::Response::into_inner)
    }

    async fn history(&self, token: &str, conversation: &str) -> Vec<pb::Message> {
        self.client()
            .await
            .list_messages(with_token(
                token,
                pb::ListMessagesRequest {
                    conversation_id: conversation.into(),
                    direction: pb::Direction::Forward as i32,
                    page_size: 500,
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .messages
    }

    /// The conversations `token`'s user sees (first page).
    async fn conversations(&self, token: &str) -> Vec<pb::Conversation> {
        self.client()
            .await
            .list_conversations(with_token(token, pb::ListConversationsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .conversations
    }

    /// The raw ciphertext column of every message row of the tenant.
    async fn raw_ciphertexts(&self) -> Vec<Option<Vec<u8>>> {
        #[derive(QueryableByName)]
        struct Raw {
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bytea>)]
            ciphertext: Option<Vec<u8>>,
        }
        let tenant: Uuid = self.tenant.id.parse().unwrap();
        let pool = hafen_store::pool::build_pool(&self.stack.db.args()).unwrap();
        hafen_store::with_tenant(&pool, &hafen_store::TenantId::from(tenant), |conn| {
            Box::pin(async move {
                let rows: Vec<Raw> = diesel::sql_query("SELECT ciphertext FROM messages")
                    .load(conn)
                    .await?;
                Ok::<_, hafen_store::Error>(rows.into_iter().map(|r| r.ciphertext).collect())
            })
        })
        .await
        .unwrap()
    }

    /// Runs `sql` in the tenant's scope, in a transaction of its own.
    async fn raw(&self, sql: &'static str) -> Result<(), hafen_store::Error> {
        let tenant: Uuid = self.tenant.id.parse().unwrap();
        let pool = hafen_store::pool::build_pool(&self.stack.db.args()).unwrap();
        hafen_store::with_tenant(&pool, &hafen_store::TenantId::from(tenant), |conn| {
            Box::pin(async move {
                diesel_async::SimpleAsyncConnection::batch_execute(conn, sql).await?;
                Ok(())
            })
        })
        .await
    }
}

fn reason(status: &tonic::Status) -> String {
    status::reason(status).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn oc7_a_second_device_sees_the_whole_history() {
    let s = setup().await;
    let conversation = s.group("project").await;
    for i in 0..5 {
        s.send(&s.owner, &conversation, &format!("note {i}"))
            .await
            .unwrap();
    }
    s.send(&s.member, &conversation, "reply").await.unwrap();

    // The owner on a brand-new device: a second chat code, a second session.
    let code = s
        .stack
        .auth_client()
        .await
        .issue_chat_code(with_token(
            &s.owner,
            auth_pb::IssueChatCodeRequest {
                user_id: s.owner_id.clone(),
                device_label: "new laptop".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .code;
    let second = s
        .stack
        .login(&s.tenant.slug, "owner", OWNER_PASSWORD, &code)
        .await
        .unwrap()
        .access_token;
    let history = s.history(&second, &conversation).await;
    let bodies: Vec<_> = history.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(
        bodies,
        ["note 0", "note 1", "note 2", "note 3", "note 4", "reply"]
    );
    let sequences: Vec<_> = history.iter().map(|m| m.sequence).collect();
    assert_eq!(
        sequences,
        [1, 2, 3, 4, 5, 6],
        "numbered per conversation, in order"
    );

    // Backwards, in pages.
    let page = s
        .client()
        .await
        .list_messages(with_token(
            &second,
            pb::ListMessagesRequest {
                conversation_id: conversation.clone(),
                direction: pb::Direction::Backward as i32,
                page_size: 4,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let sequences: Vec<_> = page.messages.iter().map(|m| m.sequence).collect();
    assert_eq!(sequences, [6, 5, 4, 3]);
    let rest = s
        .client()
        .await
        .list_messages(with_token(
            &second,
            pb::ListMessagesRequest {
                conversation_id: conversation.clone(),
                direction: pb::Direction::Backward as i32,
                page_size: 4,
                page_token: page.next_page_token,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let sequences: Vec<_> = rest.messages.iter().map(|m| m.sequence).collect();
    assert_eq!(sequences, [2, 1]);
    assert!(rest.next_page_token.is_empty());
}

/// Sends do not write the conversation's row, yet the conversation reports its newest
/// message's sequence and time: clients count unread messages and sort their lists by them.
#[tokio::test(flavor = "multi_thread")]
async fn oc7_a_conversation_reports_its_newest_sequence_and_activity() {
    let s = setup().await;
    let conversation = s.group("project").await;
    let listed = || async {
        s.conversations(&s.member)
            .await
            .into_iter()
            .find(|c| c.conversation_id == conversation)
            .unwrap()
    };
    let created = listed().await;
    assert_eq!(created.last_sequence, 0);

    let mut last = None;
    for i in 0..3 {
        last = Some(
            s.send(&s.owner, &conversation, &format!("note {i}"))
                .await
                .unwrap(),
        );
    }
    let last = last.unwrap();
    let now = listed().await;
    assert_eq!(now.last_sequence, 3);
    assert_eq!(
        now.update_time, last.create_time,
        "the newest message's time"
    );
    let seconds = |c: &pb::Conversation| c.update_time.map(|t| (t.seconds, t.nanos));
    assert!(seconds(&now) > seconds(&created));
}

#[tokio::test(flavor = "multi_thread")]
async fn cb3_the_database_never_holds_a_body_in_clear() {
    let s = setup().await;
    let conversation = s.group("secrets").await;
    let body = "the quarterly numbers are confidential";
    s.send(&s.owner, &conversation, body).await.unwrap();
    let rows = s.raw_ciphertexts().await;
    assert_eq!(rows.len(), 1);
    let sealed = rows[0].clone().unwrap();
    assert!(
        !sealed.windows(12).any(|w| w == &body.as_bytes()[..12]),
        "no plaintext at rest"
    );
    assert!(
        sealed.len() >= body.len() + 16 + 12,
        "nonce and tag around the ciphertext"
    );
    assert_eq!(
        s.history(&s.member, &conversation).await[0].body,
        body,
        "members read it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oc7_conversations_and_users_that_messages_refer_to_are_never_deleted() {
    // Messages and events carry no per-row foreign-key check (the sending statement proves
    // membership); their references stay sound because the rows they name stay.
    let s = setup().await;
    let conversation = s.group("kept").await;
    s.send(&s.member, &conversation, "still here")
        .await
        .unwrap();
    for forbidden in [
        "DELETE FROM conversations",
        "DELETE FROM users WHERE username = 'colleague'",
        "UPDATE users SET id = gen_random_uuid() WHERE username = 'colleague'",
        "UPDATE conversations SET id = gen_random_uuid()",
        "TRUNCATE conversations CASCADE",
        "TRUNCATE users CASCADE",
    ] {
        let refused = s.raw(forbidden).await.expect_err(forbidden).to_string();
        assert!(refused.contains("never deleted"), "{forbidden}: {refused}");
    }
    s.raw("UPDATE conversations SET title = 'renamed'")
        .await
        .expect("other changes go through");
    let history = s.history(&s.owner, &conversation).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].body, "still here");
}

#[tokio::test(flavor = "multi_thread")]
async fn ul2_masked_personal_data_never_reaches_the_database() {
    let s = setup().await;
    s.stack
        .tenant_client()
        .await
        .update_tenant_settings(with_token(
            &s.owner,
            hafen_proto::tenant::v1::UpdateTenantSettingsRequest {
                settings: Some(hafen_proto::tenant::v1::TenantSettings {
                    masking: Some(hafen_proto::tenant::v1::MaskingSettings {
                        email: true,
                        iban: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["masking.email".into(), "masking.iban".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let conversation = s.group("billing").await;
    let sent = s
        .send(
            &s.member,
            &conversation,
            "write to jane.doe@example.eu, IBAN DE89 3704 0044 0532 0130 00, card 4111 1111 1111 1111",
        )
        .await
        .unwrap();
    assert!(sent.masked);
    for original in ["jane.doe@example.eu", "DE89 3704", "4111 1111"] {
        assert!(
            !sent.body.contains(original),
            "{original} masked: {}",
            sent.body
        );
    }
    assert!(
        sent.body.contains("[email]")
            && sent.body.contains("[iban]")
            && sent.body.contains("[card]")
    );
    let stored = s.history(&s.owner, &conversation).await;
    assert_eq!(
        stored[0].body, sent.body,
        "what is stored is the masked body"
    );

    // Cards are masked (UL1) even where the tenant configured nothing.
    let plain = setup().await;
    let other = plain.group("cards").await;
    let sent = plain
        .send(&plain.owner, &other, "4111-1111-1111-1111")
        .await
        .unwrap();
    assert_eq!(sent.body, "[card]");
}

#[tokio::test(flavor = "multi_thread")]
async fn cb4_deleting_removes_the_ciphertext_and_tells_subscribers() {
    let s = setup().await;
    let conversation = s.group("deletions").await;
    let mut stream = s
        .client()
        .await
        .subscribe(with_token(&s.member, pb::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let first = next_event(&mut stream).await;
    assert!(matches!(first, pb::subscribe_response::Event::CaughtUp(_)));

    let message = s
        .send(&s.owner, &conversation, "regrettable")
        .await
        .unwrap();
    let other = s.send(&s.owner, &conversation, "fine").await.unwrap();
    let deleted = s
        .client()
        .await
        .delete_message(with_token(
            &s.owner,
            pb::DeleteMessageRequest {
                message_id: message.message_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.body.is_empty() && deleted.delete_time.is_some());
    let rows = s.raw_ciphertexts().await;
    assert_eq!(
        rows.iter().filter(|c| c.is_none()).count(),
        1,
        "the ciphertext is gone"
    );

    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        kinds.push(next_event(&mut stream).await);
    }
    assert!(
        matches!(&kinds[0], pb::subscribe_response::Event::MessageCreated(m) if m.message_id == message.message_id)
    );
    assert!(
        matches!(&kinds[1], pb::subscribe_response::Event::MessageCreated(m) if m.message_id == other.message_id)
    );
    assert!(
        matches!(&kinds[2], pb::subscribe_response::Event::MessageDeleted(m) if m.message_id == message.message_id && m.body.is_empty())
    );

    // The tombstone keeps its place; the member (not sender, not admin) cannot delete.
    let history = s.history(&s.member, &conversation).await;
    assert_eq!(history.len(), 2);
    assert!(history[0].delete_time.is_some() && history[0].body.is_empty());
    let err = s
        .client()
        .await
        .delete_message(with_token(
            &s.member,
            pb::DeleteMessageRequest {
                message_id: other.message_id,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread")]
async fn held_messages_cannot_be_deleted_and_admin_deletes_are_audited() {
    let s = setup().await;
    let conversation = s.group("held").await;
    let message = s.send(&s.member, &conversation, "evidence").await.unwrap();
    let tenant: Uuid = s.tenant.id.parse().unwrap();
    let owner_id: Uuid = s.owner_id.parse().unwrap();
    let conversation_id: Uuid = conversation.parse().unwrap();
    let pool = hafen_store::pool::build_pool(&s.stack.db.args()).unwrap();
    let hold = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            hafen_store::with_tenant(&pool, &hafen_store::TenantId::from(tenant), |conn| {
                Box::pin(async move {
                    diesel::sql_query(sql)
                        .bind::<diesel::sql_types::Uuid, _>(conversation_id)
                        .bind::<diesel::sql_types::Uuid, _>(owner_id)
                        .execute(conn)
                        .await?;
                    Ok::<_, hafen_store::Error>(())
                })
            })
            .await
            .unwrap();
        }
    };
    hold(
        "INSERT INTO legal_holds (id, conversation_id, reason_code, set_by, set_at) \
         VALUES (gen_random_uuid(), $1, 'litigation', $2, now())",
    )
    .await;
    let delete = || async {
        s.client()
            .await
            .delete_message(with_token(
                &s.owner,
                pb::DeleteMessageRequest {
                    message_id: message.message_id.clone(),
                },
            ))
            .await
    };
    let err = delete().await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "LEGAL_HOLD_ACTIVE");
    assert!(
        s.raw_ciphertexts().await.iter().all(Option::is_some),
        "held data stays"
    );

    hold("UPDATE legal_holds SET lifted_at = now(), lifted_by = $2 WHERE conversation_id = $1")
        .await;
    delete().await.unwrap();
    // The owner deleted someone else's message: that is audited, with ids only.
    let mut conn = s.stack.db.connect().await;
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found: Count = diesel::sql_query(
            "SELECT (SELECT count(*) FROM hafen.outbox WHERE tenant_id = $1 AND \
                     position(convert_to('messaging.message.deleted_by_admin', 'UTF8') IN event) > 0) \
                  + (SELECT count(*) FROM hafen.audit_events WHERE chain = $1 \
                     AND action = 'messaging.message.deleted_by_admin' AND target_id = $2) AS n",
        )
        .bind::<diesel::sql_types::Uuid, _>(tenant)
        .bind::<diesel::sql_types::Text, _>(&message.message_id)
        .get_result(&mut conn)
        .await
        .unwrap();
        if found.n >= 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no audit event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn next_event(
    stream: &mut tonic::Streaming<pb::SubscribeResponse>,
) -> pb::subscribe_response::Event {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event in time")
        .expect("the stream stays open")
        .expect("no error")
        .event
        .expect("an event")
}

#[tokio::test(flavor = "multi_thread")]
async fn bx4_a_resumed_subscriber_gets_every_message_exactly_once_in_order() {
    let s = setup().await;
    let conversation = s.group("busy").await;
    let mut stream = s
        .client()
        .await
        .subscribe(with_token(&s.member, pb::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut stream).await,
        pb::subscribe_response::Event::CaughtUp(_)
    ));

    // 1,000 messages from 8 concurrent senders.
    let mut senders = Vec::new();
    for worker in 0..8 {
        let mut client = s.client().await;
        let (token, conversation) = (s.owner.clone(), conversation.clone());
        senders.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..125 {
                let sent = client
                    .send_message(with_token(
                        &token,
                        pb::SendMessageRequest {
                            request_id: Uuid::now_v7().to_string(),
                            conversation_id: conversation.clone(),
                            body: format!("{worker}-{i}"),
                        },
                    ))
                    .await
                    .unwrap()
                    .into_inner();
                ids.push(sent.message_id);
            }
            ids
        }));
    }

    let mut received: Vec<(u64, String)> = Vec::new();
    let mut cursor = String::new();
    // Read part of the flow, then drop the stream (a disconnect) and resume from the cursor.
    while received.len() < 300 {
        let response = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(pb::subscribe_response::Event::MessageCreated(m)) = response.event {
            received.push((m.sequence, m.message_id));
            cursor = response.cursor;
        }
    }
    drop(stream);
    // Away while the senders go on: wait until a good part of the flow was stored after the
    // cursor, so the resumed stream has to replay it.
    let missed = received.iter().map(|(seq, _)| *seq).max().unwrap_or(0) + 100;
    eventually(
        "messages are stored while the subscriber is away",
        Duration::from_secs(20),
        || async {
            let newest = s
                .client()
                .await
                .list_messages(with_token(
                    &s.member,
                    pb::ListMessagesRequest {
                        conversation_id: conversation.clone(),
                        direction: pb::Direction::Backward as i32,
                        page_size: 1,
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner()
                .messages
                .iter()
                .map(|m| m.sequence)
                .max()
                .unwrap_or(0);
            (newest >= missed.min(1000)).then_some(())
        },
    )
    .await;
    let mut resumed = s
        .client()
        .await
        .subscribe(with_token(
            &s.member,
            pb::SubscribeRequest { after: cursor },
        ))
        .await
        .unwrap()
        .into_inner();

    let mut sent: HashSet<String> = HashSet::new();
    for sender in senders {
        sent.extend(sender.await.unwrap());
    }
    assert_eq!(sent.len(), 1000);
    while received.len() < 1000 {
        let response = tokio::time::timeout(Duration::from_secs(20), resumed.next())
            .await
            .expect("the rest arrives")
            .unwrap()
            .unwrap();
        if let Some(pb::subscribe_response::Event::MessageCreated(m)) = response.event {
            received.push((m.sequence, m.message_id));
        }
    }
    let ids: HashSet<String> = received.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(ids.len(), 1000, "no duplicate");
    assert_eq!(ids, sent, "no gap");
    let sequences: Vec<u64> = received.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(sequences, (1..=1000).collect::<Vec<u64>>(), "in order");
}

#[tokio::test(flavor = "multi_thread")]
async fn sends_are_idempotent_and_non_members_see_nothing() {
    let s = setup().await;
    let conversation = s.group("retries").await;
    let request = pb::SendMessageRequest {
        request_id: Uuid::now_v7().to_string(),
        conversation_id: conversation.clone(),
        body: "once".into(),
    };
    let mut client = s.client().await;
    let first = client
        .send_message(with_token(&s.owner, request.clone()))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .send_message(with_token(&s.owner, request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, again, "a retry returns the same message");
    assert_eq!(
        s.history(&s.owner, &conversation).await.len(),
        1,
        "never a duplicate"
    );

    // A third user of the tenant, not a member.
    let private = s.owners_only().await;
    let secret = s.send(&s.owner, &private, "not for members").await.unwrap();
    let err = s.send(&s.member, &private, "let me in").await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::NotFound, "NOT_FOUND")
    );
    let err = client
        .list_messages(with_token(
            &s.member,
            pb::ListMessagesRequest {
                conversation_id: private.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "no existence oracle");
    let err = client
        .delete_message(with_token(
            &s.member,
            pb::DeleteMessageRequest {
                message_id: secret.message_id,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let listed = s.conversations(&s.member).await;
    assert!(listed.iter().all(|c| c.conversation_id != private));
}

/// Sends that arrive together are committed together: retries of one request, a reuse of
/// its request id for another conversation and sends by a non-member each get their own
/// answer, and the others in their batch are stored all the same.
#[tokio::test(flavor = "multi_thread")]
async fn sends_committed_together_each_get_their_own_answer() {
    let s = setup().await;
    let (first, second) = (s.group("first").await, s.group("second").await);
    let private = s.owners_only().await;
    let client = s.client().await;
    let send = |token: &str, conversation: &str, request_id: &str, body: &str| {
        let mut client = client.clone();
        let request = with_token(
            token,
            pb::SendMessageRequest {
                request_id: request_id.into(),
                conversation_id: conversation.into(),
                body: body.into(),
            },
        );
        async move {
            client
                .send_message(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let mut stored = 0;
    for _round in 0..3 {
        let reused = Uuid::now_v7().to_string();
        let retries =
            futures::future::join_all((0..10).map(|_| send(&s.owner, &first, &reused, "retried")));
        let elsewhere = send(
            &s.owner,
            &second,
            &reused,
            "same request id, other conversation",
        );
        let outsider = futures::future::join_all((0..5).map(|_| {
            send(
                &s.member,
                &private,
                &Uuid::now_v7().to_string(),
                "let me in",
            )
        }));
        let plain = futures::future::join_all(
            (0..10).map(|_| send(&s.member, &first, &Uuid::now_v7().to_string(), "plain")),
        );
        let (retries, elsewhere, outsider, plain) =
            tokio::join!(retries, elsewhere, outsider, plain);

        // Whichever came first owns the request id; the others are retries of it or conflicts.
        let conflict = |err: &tonic::Status| {
            (err.code(), reason(err).as_str()) == (Code::AlreadyExists, "REQUEST_ID_CONFLICT")
        };
        match &elsewhere {
            Ok(_) => assert!(retries.iter().all(|r| r.as_ref().is_err_and(conflict))),
            Err(err) => {
                assert!(conflict(err), "{err:?}");
                let ids: HashSet<String> = retries
                    .iter()
                    .map(|r| r.as_ref().unwrap().message_id.clone())
                    .collect();
                assert_eq!(ids.len(), 1, "every retry returns the one message");
                stored += 1;
            }
        }
        for err in outsider {
            assert_eq!(
                err.unwrap_err().code(),
                Code::NotFound,
                "a non-member's send fails alone"
            );
        }
        let ids: HashSet<String> = plain.into_iter().map(|m| m.unwrap().message_id).collect();
        assert_eq!(ids.len(), 10);
        stored += 10;
    }
    let history = s.history(&s.owner, &first).await;
    assert_eq!(history.len(), stored);
    let sequences: Vec<u64> = history.iter().map(|m| m.sequence).collect();
    assert_eq!(
        sequences,
        (1..=stored as u64).collect::<Vec<_>>(),
        "no gap, no repeat"
    );
    assert!(s.history(&s.owner, &private).await.is_empty());
}

/// A committer stores a batch without looking up its conversations' newest sequences and its
/// senders' membership when it stored to them before and no other writer has committed since.
/// A message from another replica, and a sender leaving, are writes in between: the next
/// sends see them.
#[tokio::test(flavor = "multi_thread")]
async fn oc7_sends_after_another_writer_see_its_sequences_and_membership() {
    let s = setup().await;
    let mut config = s.stack.secrets.messaging_config(&s.stack.db);
    config.auth.auth_endpoint = s.stack.auth.uri();
    let replica =
        hafen_testkit::TestServer::spawn(|l, sd| hafen_messaging::serve(config, l, sd)).await;
    let replica_client = MessagingServiceClient::new(replica.channel(&s.stack.secrets).await);
    let (conversation, other) = (s.group("two replicas").await, s.group("other").await);
    let on_replica = |conversation: &str| {
        let mut client = replica_client.clone();
        let request = with_token(
            &s.owner,
            pb::SendMessageRequest {
                request_id: Uuid::now_v7().to_string(),
                conversation_id: conversation.to_owned(),
                body: "from the replica".into(),
            },
        );
        async move { client.send_message(request).await }
    };

    for body in ["one", "two"] {
        s.send(&s.member, &conversation, body).await.unwrap();
    }
    on_replica(&conversation).await.unwrap();
    let four = s.send(&s.member, &conversation, "four").await.unwrap();
    assert_eq!(four.sequence, 4, "after the replica's message");
    s.send(&s.member, &conversation, "five").await.unwrap();

    // What the committer knew of `other` is gone once another writer came between, even when
    // its next batch goes to another conversation.
    s.send(&s.member, &other, "one").await.unwrap();
    on_replica(&other).await.unwrap();
    s.send(&s.owner, &conversation, "six").await.unwrap();
    let three = s.send(&s.member, &other, "three").await.unwrap();
    assert_eq!(three.sequence, 3, "after the replica's message");

    let left = s
        .client()
        .await
        .remove_member(with_token(
            &s.member,
            pb::RemoveMemberRequest {
                conversation_id: conversation.clone(),
                user_id: s.member_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(left.removed);
    let err = s.send(&s.member, &conversation, "seven").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "no send after leaving");

    let sequences: Vec<u64> = s
        .history(&s.owner, &conversation)
        .await
        .iter()
        .map(|m| m.sequence)
        .collect();
    assert_eq!(sequences, vec![1, 2, 3, 4, 5, 6], "no gap, no repeat");
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_keep_delivering_by_polling_when_redis_stops() {
    let mut redis = hafen_testkit::PrivateRedis::start();
    let redis_args = redis.args("hafen:");
    let stack = TestStack::start_with_redis(Some(redis_args.clone())).await;
    let s = setup_on(stack).await;
    // A second replica of the messaging service: the subscriber is there, the sender is not,
    // so only Redis (or polling) can tell the replica about new messages.
    let mut config = s.stack.secrets.messaging_config(&s.stack.db);
    config.auth.auth_endpoint = s.stack.auth.uri();
    config.redis = redis_args;
    let replica =
        hafen_testkit::TestServer::spawn(|l, sd| hafen_messaging::serve(config, l, sd)).await;
    let mut on_replica = MessagingServiceClient::new(replica.channel(&s.stack.secrets).await);

    let conversation = s.group("resilient").await;
    let mut stream = on_replica
        .subscribe(with_token(&s.member, pb::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut stream).await,
        pb::subscribe_response::Event::CaughtUp(_)
    ));
    s.send(&s.owner, &conversation, "before").await.unwrap();
    assert!(
        matches!(next_event(&mut stream).await, pb::subscribe_response::Event::MessageCreated(m) if m.body == "before")
    );

    redis.stop();
    let sent = s
        .send(&s.owner, &conversation, "after")
        .await
        .expect("sends succeed without Redis");
    match next_event(&mut stream).await {
        pb::subscribe_response::Event::MessageCreated(m) => {
            assert_eq!(m.message_id, sent.message_id)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn live_events_reach_other_replicas_through_sharded_channels() {
    let redis = hafen_testkit::PrivateRedis::start();
    let redis_args = redis.args("hafen:");
    let stack = TestStack::start_with_redis(Some(redis_args.clone())).await;
    let s = setup_on(stack).await;
    // A replica that would take a minute to notice anything by polling.
    let mut config = s.stack.secrets.messaging_config(&s.stack.db);
    config.auth.auth_endpoint = s.stack.auth.uri();
    config.redis = redis_args;
    config.stream_poll = Duration::from_secs(60);
    let replica =
        hafen_testkit::TestServer::spawn(|l, sd| hafen_messaging::serve(config, l, sd)).await;
    let mut on_replica = MessagingServiceClient::new(replica.channel(&s.stack.secrets).await);

    let conversation = s.group("sharded").await;
    let mut stream = on_replica
        .subscribe(with_token(&s.member, pb::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut stream).await,
        pb::subscribe_response::Event::CaughtUp(_)
    ));
    // The replica subscribes to its tenant's sharded channel, and to nothing else.
    let client = redis.args("hafen:").client().unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let tenant: Uuid = s.tenant.id.parse().unwrap();
    let channel = format!("hafen:events:{{{}}}", tenant.simple());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(&channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        if counts.iter().any(|(_, n)| *n == 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no shard subscription: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let patterns: i64 = redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(patterns, 0, "no pattern subscriptions");

    for body in ["one", "two", "three"] {
        let sent = s.send(&s.owner, &conversation, body).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("delivered through Redis, long before the replica polls")
            .unwrap()
            .unwrap()
            .event
            .unwrap();
        match event {
            pb::subscribe_response::Event::MessageCreated(m) => {
                assert_eq!(m.message_id, sent.message_id)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_end_unavailable_when_the_server_shuts_down() {
    let s = setup().await;
    let mut config = s.stack.secrets.messaging_config(&s.stack.db);
    config.auth.auth_endpoint = s.stack.auth.uri();
    config.server.drain_timeout = Duration::from_secs(30);
    let mut replica =
        hafen_testkit::TestServer::spawn(|l, sd| hafen_messaging::serve(config, l, sd)).await;
    let mut on_replica = MessagingServiceClient::new(replica.channel(&s.stack.secrets).await);
    let mut stream = on_replica
        .subscribe(with_token(&s.member, pb::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut stream).await,
        pb::subscribe_response::Event::CaughtUp(_)
    ));
    replica.begin_shutdown();
    // Well before the 30 s drain timeout would cut the connection.
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream ends promptly")
        .expect("a final status")
        .expect_err("an error status");
    assert_eq!(ended.code(), Code::Unavailable);
    assert_eq!(reason(&ended), "UNAVAILABLE");
    replica.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn oc5_a_wiped_session_s_stream_ends_with_device_wiped() {
    let s = setup().await;
    let mut stream = s
        .client()
        .await
        .subscribe(with_token(&s.member, pb::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        next_event(&mut stream).await,
        pb::subscribe_response::Event::CaughtUp(_)
    ));
    let codes = s
        .stack
        .auth_client()
        .await
        .list_chat_codes(with_token(
            &s.owner,
            auth_pb::ListChatCodesRequest {
                user_id: s.member_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .chat_codes;
    s.stack
        .auth_client()
        .await
        .revoke_chat_code(with_token(
            &s.owner,
            auth_pb::RevokeChatCodeRequest {
                chat_code_id: codes[0].chat_code_id.clone(),
            },
        ))
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(1), stream.next())
        .await
        .expect("within 1 s")
        .expect("a final status")
        .expect_err("an error status");
    assert_eq!(ended.code(), Code::Unauthenticated);
    assert_eq!(reason(&ended), "DEVICE_WIPED");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_status_and_writes_nothing() {
    let s = setup().await;
    let conversation = s.group("strict").await;
    let mut client = s.client().await;
    let send = |conversation: &str, body: String, request: &str| pb::SendMessageRequest {
        request_id: request.into(),
        conversation_id: conversation.into(),
        body,
    };
    let fresh = || Uuid::now_v7().to_string();
    let cases = [
        (
            send(&conversation, String::new(), &fresh()),
            Code::InvalidArgument,
            "INVALID_FIELD",
        ),
        (
            send(&conversation, "   ".into(), &fresh()),
            Code::InvalidArgument,
            "INVALID_FIELD",
        ),
        (
            send(&conversation, "x".repeat(16 * 1024 + 1), &fresh()),
            Code::InvalidArgument,
            "BODY_TOO_LARGE",
        ),
        (
            send(&conversation, "hi".into(), ""),
            Code::InvalidArgument,
            "INVALID_FIELD",
        ),
        (
            send(&conversation, "hi".into(), "nope"),
            Code::InvalidArgument,
            "INVALID_FIELD",
        ),
        (
            send("not-a-uuid", "hi".into(), &fresh()),
            Code::InvalidArgument,
            "INVALID_FIELD",
        ),
        (
            send(&Uuid::now_v7().to_string(), "hi".into(), &fresh()),
            Code::NotFound,
            "NOT_FOUND",
        ),
    ];
    for (request, code, expected) in cases {
        let err = client
            .send_message(with_token(&s.owner, request))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (code, expected),
            "{err:?}"
        );
    }
    assert!(
        s.history(&s.owner, &conversation).await.is_empty(),
        "nothing written"
    );
    let err = client
        .create_conversation(with_token(
            &s.member,
            pb::CreateConversationRequest {
                kind: pb::ConversationKind::Direct as i32,
                member_user_ids: vec![s.member_id.clone()],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        status::metadata(&err, "field").as_deref(),
        Some("member_user_ids")
    );
    let err = client
        .subscribe(with_token(
            &s.owner,
            pb::SubscribeRequest { after: "-3".into() },
        ))
        .await
        .unwrap_err();
    assert_eq!(status::metadata(&err, "field").as_deref(), Some("after"));
    let err = client
        .send_message(send(&conversation, "hi".into(), &fresh()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no token");
}

#[tokio::test(flavor = "multi_thread")]
async fn bx5_message_bodies_never_reach_the_logs() {
    let logs = hafen_testkit::LogCapture::install();
    let s = setup().await;
    let conversation = s.group("quiet").await;
    let body = "a very private sentence about nothing";
    let sent = s.send(&s.owner, &conversation, body).await.unwrap();
    s.client()
        .await
        .edit_message(with_token(
            &s.owner,
            pb::EditMessageRequest {
                message_id: sent.message_id.clone(),
                body: "an edited private sentence".into(),
            },
        ))
        .await
        .unwrap();
    s.history(&s.member, &conversation).await;
    let logged = logs.contents();
    assert!(logged.contains(&s.tenant.id), "the capture works");
    assert!(
        !logged.contains("private sentence"),
        "no body in any log line"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_conversations_are_unique_per_pair_and_members_can_leave_groups() {
    let s = setup().await;
    let mut client = s.client().await;
    let direct = |token: &str, other: &str| {
        with_token(
            token,
            pb::CreateConversationRequest {
                kind: pb::ConversationKind::Direct as i32,
                member_user_ids: vec![other.to_owned()],
                ..Default::default()
            },
        )
    };
    let a = client
        .create_conversation(direct(&s.owner, &s.member_id))
        .await
        .unwrap()
        .into_inner();
    let b = client
        .create_conversation(direct(&s.member, &s.owner_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        a.conversation_id, b.conversation_id,
        "one direct conversation per pair"
    );

    let group = s.group("leavers").await;
    let left = client
        .remove_member(with_token(
            &s.member,
            pb::RemoveMemberRequest {
                conversation_id: group.clone(),
                user_id: s.member_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(left.removed);
    let err = s.send(&s.member, &group, "still here?").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "no access after leaving");
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_a_request_id_reused_for_another_message_is_request_id_conflict() {
    let s = &setup().await;
    let conversation = s.group("idempotent").await;
    let other = s.group("elsewhere").await;
    let send = |conversation: &str, body: &str, request_id: &str| {
        let request = pb::SendMessageRequest {
            request_id: request_id.into(),
            conversation_id: conversation.into(),
            body: body.into(),
        };
        let token = s.owner.clone();
        async move {
            s.client()
                .await
                .send_message(with_token(&token, request))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let request_id = Uuid::now_v7().to_string();
    let first = send(&conversation, "the first", &request_id).await.unwrap();
    let retried = send(&conversation, "the first", &request_id).await.unwrap();
    assert_eq!(
        retried.message_id, first.message_id,
        "a retry returns the first"
    );
    for (to, body) in [(&conversation, "another body"), (&other, "the first")] {
        let err = send(to, body, &request_id).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        assert_eq!(
            hafen_platform::status::reason(&err).as_deref(),
            Some("REQUEST_ID_CONFLICT")
        );
    }
    assert_eq!(
        s.history(&s.owner, &conversation).await.len(),
        1,
        "nothing more stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_list_messages_start_sequence_is_inclusive() {
    let s = &setup().await;
    let conversation = s.group("numbers").await;
    for i in 1..=6 {
        s.send(&s.owner, &conversation, &format!("m{i}"))
            .await
            .unwrap();
    }
    let page = |direction: pb::Direction, start: u64| {
        let request = pb::ListMessagesRequest {
            conversation_id: conversation.clone(),
            direction: direction as i32,
            start_sequence: start,
            page_size: 2,
            ..Default::default()
        };
        let token = s.owner.clone();
        async move {
            let page = s
                .client()
                .await
                .list_messages(with_token(&token, request))
                .await
                .unwrap()
                .into_inner();
            (
                page.messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
                page.next_page_token,
            )
        }
    };
    assert_eq!(page(pb::Direction::Forward, 4).await.0, [4, 5]);
    assert_eq!(page(pb::Direction::Backward, 4).await.0, [4, 3]);
    assert_eq!(page(pb::Direction::Forward, 0).await.0, [1, 2]);
    assert_eq!(page(pb::Direction::Backward, 0).await.0, [6, 5]);
    assert_eq!(page(pb::Direction::Forward, 6).await.0, [6]);
    // A page token continues after the last message returned, with nothing repeated.
    let (_, token) = page(pb::Direction::Forward, 3).await;
    let next = s
        .client()
        .await
        .list_messages(with_token(
            &s.owner,
            pb::ListMessagesRequest {
                conversation_id: conversation.clone(),
                direction: pb::Direction::Forward as i32,
                page_size: 2,
                page_token: token,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let sequences: Vec<_> = next.messages.iter().map(|m| m.sequence).collect();
    assert_eq!(sequences, [5, 6]);
}

#[tokio::test(flavor = "multi_thread")]
async fn ul2_settings_changes_take_effect_for_the_next_message_in_every_replica() {
    let s = setup().await;
    // A second replica, with a slow poll: only the announcement can tell it in time.
    let mut config = s.stack.secrets.messaging_config(&s.stack.db);
    config.auth.auth_endpoint = s.stack.auth.uri();
    config.stream_poll = Duration::from_secs(60);
    let replica =
        hafen_testkit::TestServer::spawn(|l, sd| hafen_messaging::serve(config, l, sd)).await;
    let mut on_replica = MessagingServiceClient::new(replica.channel(&s.stack.secrets).await);
    let conversation = s.group("settings").await;
    let send = |body: &str| pb::SendMessageRequest {
        request_id: Uuid::now_v7().to_string(),
        conversation_id: conversation.clone(),
        body: body.into(),
    };
    let webchat = || pb::CreateConversationRequest {
        kind: pb::ConversationKind::Webchat as i32,
        title: "visitor".into(),
        ..Default::default()
    };
    // Both replicas have the settings cached: e-mail addresses unmasked, webchat off.
    for client in [&mut s.client().await, &mut on_replica] {
        let sent = client
            .send_message(with_token(&s.owner, send("mail jane@example.eu")))
            .await
            .unwrap()
            .into_inner();
        assert!(!sent.masked);
        let err = client
            .create_conversation(with_token(&s.owner, webchat()))
            .await
            .unwrap_err();
        assert_eq!(
            hafen_platform::status::reason(&err).as_deref(),
            Some("FEATURE_DISABLED")
        );
    }
    s.stack
        .tenant_client()
        .await
        .update_tenant_settings(with_token(
            &s.owner,
            hafen_proto::tenant::v1::UpdateTenantSettingsRequest {
                settings: Some(hafen_proto::tenant::v1::TenantSettings {
                    masking: Some(hafen_proto::tenant::v1::MaskingSettings {
                        email: true,
                        ..Default::default()
                    }),
                    features: Some(hafen_proto::tenant::v1::Features { webchat: true }),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["masking.email".into(), "features.webchat".into()],
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    // The very next message, on either replica, is masked; webchat is on.
    for client in [&mut on_replica, &mut s.client().await] {
        let sent = client
            .send_message(with_token(&s.owner, send("mail jane@example.eu")))
            .await
            .unwrap()
            .into_inner();
        assert!(sent.masked, "{}", sent.body);
        assert!(!sent.body.contains("jane@example.eu"));
        client
            .create_conversation(with_token(&s.owner, webchat()))
            .await
            .expect("webchat is on at once");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_postgresql_down_during_sends_is_unavailable_and_sends_resume() {
    let postgres = hafen_testkit::PrivatePostgres::start();
    let s = setup_on(TestStack::start_on(&postgres.env(), None).await).await;
    let conversation = s.group("outage").await;
    s.send(&s.owner, &conversation, "before").await.unwrap();

    postgres.stop();
    for attempt in 0..5 {
        let err = s
            .send(&s.owner, &conversation, "during")
            .await
            .expect_err("no send is stored while the database is down");
        assert_eq!(
            err.code(),
            tonic::Code::Unavailable,
            "attempt {attempt}: {err:?}"
        );
        assert_eq!(
            hafen_platform::status::reason(&err).as_deref(),
            Some("UNAVAILABLE")
        );
    }

    postgres.resume();
    let back = tokio::time::Instant::now();
    loop {
        match s.send(&s.owner, &conversation, "after").await {
            Ok(_) => break,
            Err(err) => {
                assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
                assert!(
                    back.elapsed() < Duration::from_secs(5),
                    "sends succeed within 5 s of the restart"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let bodies: Vec<String> = s
        .history(&s.owner, &conversation)
        .await
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(bodies, ["before", "after"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_a_tenants_commit_queue_is_bounded_and_drains() {
    use diesel_async::SimpleAsyncConnection;
    let s = setup().await;
    let conversation = s.group("queue").await;
    // A replica whose committers queue at most 2 sends.
    let mut config = s.stack.secrets.messaging_config(&s.stack.db);
    config.auth.auth_endpoint = s.stack.auth.uri();
    config.max_queued_sends = 2;
    let replica =
        hafen_testkit::TestServer::spawn(|l, sd| hafen_messaging::serve(config, l, sd)).await;
    let channel = replica.channel(&s.stack.secrets).await;
    // The database stalls: nothing can be stored while this transaction holds the table.
    let schema = hafen_store::TenantId::from(Uuid::parse_str(&s.tenant.id).unwrap()).schema();
    let mut blocker = s.stack.db.connect_admin().await;
    blocker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {schema}.messages IN ACCESS EXCLUSIVE MODE"
        ))
        .await
        .unwrap();
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..30 {
        let mut client = MessagingServiceClient::new(channel.clone());
        let request = with_token(
            &s.owner,
            pb::SendMessageRequest {
                request_id: Uuid::now_v7().to_string(),
                conversation_id: conversation.clone(),
                body: format!("queued {i}"),
            },
        );
        sends.spawn(async move { client.send_message(request).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // While nothing can be stored, the first send to finish is one the full queue refused.
    let refused = tokio::time::timeout(Duration::from_secs(10), sends.join_next())
        .await
        .expect("a send is refused while the queue is full");
    blocker.batch_execute("COMMIT").await.unwrap();
    let mut answers: Vec<_> = refused.into_iter().collect();
    while let Some(answer) = sends.join_next().await {
        answers.push(answer);
    }
    let (mut stored, mut overloaded) = (0, 0);
    for answer in answers {
        match answer.unwrap() {
            Ok(_) => stored += 1,
            Err(err) => {
                assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
                assert_eq!(
                    hafen_platform::status::reason(&err).as_deref(),
                    Some("OVERLOADED")
                );
                overloaded += 1;
            }
        }
    }
    assert!(overloaded > 0, "the queue stopped growing");
    assert!(
        stored > 0,
        "what was queued is stored once the database answers"
    );
    assert_eq!(s.history(&s.owner, &conversation).await.len(), stored);
}

#[tokio::test(flavor = "multi_thread")]
async fn bx4_caught_up_on_a_fresh_stream_carries_a_cursor_to_resume_from() {
    let s = setup().await;
    let conversation = s.group("fresh").await;
    s.send(&s.owner, &conversation, "old news").await.unwrap();
    let mut stream = s
        .client()
        .await
        .subscribe(with_token(&s.member, pb::SubscribeRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let caught_up = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        caught_up.event,
        Some(pb::subscribe_response::Event::CaughtUp(_))
    ));
    assert!(!caught_up.cursor.is_empty(), "a cursor to resume from");
    drop(stream);
    // Resumed from it: what was sent since, and nothing from before.
    s.send(&s.owner, &conversation, "since").await.unwrap();
    let mut resumed = s
        .client()
        .await
        .subscribe(with_token(
            &s.member,
            pb::SubscribeRequest {
                after: caught_up.cursor,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut resumed).await {
        pb::subscribe_response::Event::MessageCreated(m) => assert_eq!(m.body, "since"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_smaller_deviations_titles_visibility_and_page_tokens() {
    let s = setup().await;
    // A direct conversation has no title.
    let err = s
        .client()
        .await
        .create_conversation(with_token(
            &s.owner,
            pb::CreateConversationRequest {
                kind: pb::ConversationKind::Direct as i32,
                title: "a title".into(),
                member_user_ids: vec![s.member_id.clone()],
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        hafen_platform::status::metadata(&err, "field").as_deref(),
        Some("title")
    );
    // Removing from a group one may not see: NOT_FOUND, as every other call answers.
    let private = s.owners_only().await;
    let err = s
        .client()
        .await
        .remove_member(with_token(
            &s.member,
            pb::RemoveMemberRequest {
                conversation_id: private.clone(),
                user_id: s.owner_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    // A page token belongs to its page size.
    for title in ["one", "two", "three"] {
        s.group(title).await;
    }
    let list = |page_size: i32, page_token: String| {
        let request = with_token(
            &s.owner,
            pb::ListConversationsRequest {
                page_size,
                page_token,
            },
        );
        async {
            s.client()
                .await
                .list_conversations(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let first = list(1, String::new()).await.unwrap();
    assert!(!first.next_page_token.is_empty());
    assert!(list(1, first.next_page_token.clone()).await.is_ok());
    let err = list(2, first.next_page_token).await.unwrap_err();
    assert_eq!(
        hafen_platform::status::metadata(&err, "field").as_deref(),
        Some("page_token")
    );
}
