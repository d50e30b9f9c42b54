//! The key store apart (BX1, GR4): keys and the deletion log live in a database of their own,
//! the master key rotates while the services run and an old version retires; and what remains
//! of a deleted tenant or an erased user in the control plane and the key store (GR3).

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::messaging::v1 as pb;
use hafen_proto::tenant::v1 as tenant_pb;
use hafen_testkit::{OWNER_PASSWORD, TestStack, with_token};
use uuid::Uuid;

use crate::erasure::{messages, send};

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

/// `sql` counted in the main database (control plane), or in the key store.
async fn count(stack: &TestStack, keystore: bool, sql: &str) -> i64 {
    let db = if keystore {
        stack.db.keystore()
    } else {
        &stack.db
    };
    diesel::sql_query(sql)
        .get_result::<Count>(&mut db.connect_admin().await)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
        .n
}

async fn conversation(stack: &TestStack, token: &str, title: &str) -> String {
    stack
        .messaging_client()
        .await
        .create_conversation(with_token(
            token,
            pb::CreateConversationRequest {
                kind: pb::ConversationKind::Group as i32,
                title: title.to_owned(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .conversation_id
}

async fn bodies(stack: &TestStack, token: &str, conversation: &str) -> Vec<String> {
    messages(stack, token, conversation)
        .await
        .into_iter()
        .map(|m| m.body)
        .collect()
}

fn rotate_args(stack: &TestStack) -> hafen_tenant::rotate::RotateArgs {
    hafen_tenant::rotate::RotateArgs {
        databases: stack.db.databases(),
        master_key_file: stack.secrets.master_key_file(),
        new_version_only: false,
        rewrap_only: false,
        retire: None,
        telemetry: <hafen_tenant::RotateCli as clap::Parser>::try_parse_from([
            "rotate",
            "--database-url",
            "postgres://unused",
            "--master-key-file",
            "unused",
        ])
        .unwrap()
        .args
        .telemetry,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bx1_no_key_is_in_the_database_of_the_tenant_data_or_the_control_plane() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("keys-apart").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let chat = conversation(&stack, &owner, "sealed").await;
    send(&stack, &owner, &chat, "sealed under a key kept elsewhere").await;

    // The main database (control plane and tenant schemas: what a backup of it holds) has no
    // table of keys or of deletions, in any schema; the key store has the tenant's keys.
    let tables: Vec<Name> = diesel::sql_query(
        "SELECT table_schema || '.' || table_name AS name FROM information_schema.tables \
         WHERE table_name IN ('tenant_keys', 'user_keys', 'deletion_log') \
            OR table_schema = 'hafen_keys'",
    )
    .load(&mut stack.db.connect_admin().await)
    .await
    .unwrap();
    assert!(
        tables.is_empty(),
        "{:?}",
        tables.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    let tenant_clause = format!("tenant_id = '{}'", tenant.id);
    assert_eq!(
        count(
            &stack,
            true,
            &format!("SELECT count(*) AS n FROM hafen_keys.tenant_keys WHERE {tenant_clause}")
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &stack,
            true,
            &format!("SELECT count(*) AS n FROM hafen_keys.user_keys WHERE {tenant_clause}")
        )
        .await,
        1,
        "the owner's key, made by the first message"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bx1_the_master_key_rotates_while_the_services_run_and_the_old_version_retires() {
    let stack = TestStack::start().await;
    let first = stack.create_tenant("rotates-a").await;
    // The second tenant's key is not read by any service before the rotation: the messaging
    // service, which read the master key file when it started, meets it under a version it
    // lacks and reads the file again.
    let second = stack.create_tenant("rotates-b").await;
    let first_owner = stack.login_owner(&first).await.access_token;
    let chat = conversation(&stack, &first_owner, "before").await;
    send(&stack, &first_owner, &chat, "sealed before the rotation").await;
    let versions = |stack: &TestStack| {
        let master = stack.secrets.master_key();
        (master.current_version(), master.versions())
    };
    assert_eq!(versions(&stack), (1, vec![1]));

    // In steps, as where every service has its own copy of the file.
    let mut args = rotate_args(&stack);
    args.new_version_only = true;
    let report = hafen_tenant::rotate::run(&args).await.unwrap();
    assert_eq!((report.current, report.versions.clone()), (2, vec![1, 2]));
    assert_eq!(report.rewrapped, 0);
    assert_eq!(report.in_use, [(1, 2)]);

    // Retiring re-wraps what is still under the old version first; the current version is
    // never retired.
    let mut args = rotate_args(&stack);
    args.retire = Some(1);
    let report = hafen_tenant::rotate::run(&args).await.unwrap();
    assert_eq!(report.rewrapped, 2);
    assert_eq!(report.in_use, [(2, 2)]);
    assert_eq!(report.retired, Some(1));
    assert_eq!(versions(&stack), (2, vec![2]));
    let mut args = rotate_args(&stack);
    args.retire = Some(2);
    let refused = hafen_tenant::rotate::run(&args).await.unwrap_err();
    assert!(refused.to_string().contains("version 2"), "{refused}");

    // Everything still works, and nothing was restarted.
    assert_eq!(
        bodies(&stack, &first_owner, &chat).await,
        ["sealed before the rotation"]
    );
    let second_owner = stack.login_owner(&second).await.access_token;
    let other = conversation(&stack, &second_owner, "after").await;
    send(&stack, &second_owner, &other, "sealed after the rotation").await;
    assert_eq!(
        bodies(&stack, &second_owner, &other).await,
        ["sealed after the rotation"]
    );
    // Chat codes still log in (their pepper comes from the derivation secret, which stays).
    stack.login_owner(&first).await;
    // A tenant created now gets its key under the current version.
    let third = stack.create_tenant("rotates-c").await;
    let mut keys = stack.db.keystore().connect().await;
    let (version, _) =
        hafen_store::keystore::tenant_key(&mut keys, Uuid::parse_str(&third.id).unwrap())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(version, 2);

    // A second full rotation in one run (a shared file): new version, all re-wrapped.
    let report = hafen_tenant::rotate::run(&rotate_args(&stack))
        .await
        .unwrap();
    assert_eq!((report.current, report.rewrapped), (3, 3));
    assert_eq!(report.in_use, [(3, 3)]);
    assert_eq!(
        bodies(&stack, &first_owner, &chat).await,
        ["sealed before the rotation"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gr3_sessions_chat_codes_and_device_labels_of_a_deleted_tenant_or_erased_user_are_gone() {
    let stack = TestStack::start().await;
    let kept = stack.create_tenant("remains-kept").await;
    let owner = stack.login_owner(&kept).await.access_token;
    let (mara, mara_session) = stack
        .create_logged_in_member(&kept, &owner, "mara", "mara-password-1")
        .await;
    let goner = stack.create_tenant("remains-gone").await;
    let goner_owner = stack.login_owner(&goner).await.access_token;
    // As SQL text: the label is "mara's device".
    let label = "mara''s device";
    let sessions_of = |tenant: &str, user: Option<&str>| {
        format!(
            "SELECT count(*) AS n FROM hafen.sessions WHERE tenant_id = '{tenant}'{}",
            user.map(|u| format!(" AND user_id = '{u}'"))
                .unwrap_or_default()
        )
    };
    assert_eq!(
        count(&stack, false, &sessions_of(&kept.id, Some(&mara.user_id))).await,
        1
    );
    assert_eq!(
        count(
            &stack,
            false,
            &format!("SELECT count(*) AS n FROM hafen.sessions WHERE device_label = '{label}'")
        )
        .await,
        1
    );
    drop(mara_session);

    stack
        .auth_client()
        .await
        .erase_user(with_token(
            &owner,
            auth_pb::EraseUserRequest {
                user_id: mara.user_id.clone(),
            },
        ))
        .await
        .unwrap();
    stack
        .tenant_client()
        .await
        .delete_tenant(with_token(
            &goner_owner,
            tenant_pb::DeleteTenantRequest {
                confirm_slug: "remains-gone".into(),
                password: OWNER_PASSWORD.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap();

    // The control plane: no session (ended ones included), so no device label, of either.
    assert_eq!(
        count(&stack, false, &sessions_of(&kept.id, Some(&mara.user_id))).await,
        0
    );
    assert_eq!(count(&stack, false, &sessions_of(&goner.id, None)).await, 0);
    assert_eq!(
        count(
            &stack,
            false,
            &format!("SELECT count(*) AS n FROM hafen.sessions WHERE device_label = '{label}'")
        )
        .await,
        0
    );
    // Chat codes live in the tenant's schema: the erased user's are deleted, the deleted
    // tenant's schema is gone with its role.
    let kept_schema = format!("t_{}", Uuid::parse_str(&kept.id).unwrap().simple());
    assert_eq!(
        count(
            &stack,
            false,
            &format!(
                "SELECT count(*) AS n FROM {kept_schema}.chat_codes WHERE user_id = '{}'",
                mara.user_id
            )
        )
        .await,
        0
    );
    let goner_schema = format!("t_{}", Uuid::parse_str(&goner.id).unwrap().simple());
    assert_eq!(
        count(
            &stack,
            false,
            &format!(
                "SELECT count(*) AS n FROM pg_namespace WHERE nspname = '{goner_schema}' \
                 UNION ALL SELECT count(*) FROM pg_roles WHERE rolname = '{goner_schema}' \
                 ORDER BY 1 DESC LIMIT 1"
            )
        )
        .await,
        0
    );
    // What remains, as the README lists it: the deleted tenant's id with its DPA record
    // (version and acceptance), no name; ids and times in the deletion log; no key.
    #[derive(QueryableByName)]
    struct Remains {
        #[diesel(sql_type = Text)]
        status: String,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        slug: Option<String>,
        #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
        display_name: Option<String>,
        #[diesel(sql_type = Text)]
        dpa_version: String,
    }
    let row: Remains = diesel::sql_query(format!(
        "SELECT status, slug, display_name, dpa_version FROM hafen.tenants WHERE id = '{}'",
        goner.id
    ))
    .get_result(&mut stack.db.connect_admin().await)
    .await
    .unwrap();
    assert_eq!(
        (
            row.status.as_str(),
            row.slug,
            row.display_name,
            row.dpa_version.as_str()
        ),
        ("deleted", None, None, "2025-01")
    );
    for (tenant, expected) in [(&goner.id, 0), (&kept.id, 1)] {
        assert_eq!(
            count(
                &stack,
                true,
                &format!(
                    "SELECT count(*) AS n FROM hafen_keys.tenant_keys WHERE tenant_id = '{tenant}'"
                )
            )
            .await,
            expected
        );
    }
    assert_eq!(
        count(
            &stack,
            true,
            &format!(
                "SELECT count(*) AS n FROM hafen_keys.deletion_log WHERE \
                 (kind = 'tenant' AND tenant_id = '{}') OR (kind = 'user' AND user_id = '{}')",
                goner.id, mara.user_id
            )
        )
        .await,
        2
    );
}
