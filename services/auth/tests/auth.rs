//! The auth service against real PostgreSQL and Redis, over TLS (OC1, OC2, OC3, OC5, GR3,
//! GR6, BX5).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

use std::time::{Duration, Instant};

use hafen_platform::status;
use hafen_proto::auth::v1 as pb;
use hafen_proto::tenant::v1 as tenant_pb;
use hafen_testkit::{OWNER_PASSWORD, TestStack, TestTenant, eventually, with_token};
use tonic::Code;

fn reason(status: &tonic::Status) -> String {
    status::reason(status).unwrap_or_default()
}

fn field(status: &tonic::Status) -> String {
    status::metadata(status, "field").unwrap_or_default()
}

async fn get_own_tenant(
    stack: &TestStack,
    token: &str,
) -> Result<tenant_pb::Tenant, tonic::Status> {
    stack
        .tenant_client()
        .await
        .get_tenant(with_token(token, tenant_pb::GetTenantRequest::default()))
        .await
        .map(tonic::Response::into_inner)
}

async fn setup() -> (TestStack, TestTenant, String) {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("acme").await;
    let owner = stack.login_owner(&tenant).await;
    (stack, tenant, owner.access_token)
}

#[tokio::test(flavor = "multi_thread")]
async fn oc2_login_needs_username_password_and_this_users_chat_code() {
    let (stack, tenant, owner) = setup().await;
    let anna_code = stack
        .create_member(&owner, "member-a", "member a password")
        .await
        .chat_code;
    stack
        .create_member(&owner, "member-b", "member b password")
        .await;

    let ok = stack
        .login("acme", "member-a", "member a password", &anna_code)
        .await
        .unwrap();
    assert_eq!(ok.tenant_id, tenant.id);
    assert!(!ok.access_token.is_empty() && !ok.refresh_token.is_empty());
    // Case, spaces and hyphens in the typed code do not matter.
    let typed = format!("{}-{}", &anna_code[..5], &anna_code[5..]).to_lowercase();
    stack
        .login("acme", "MEMBER-A", "member a password", &typed)
        .await
        .expect("usernames ignore case; codes ignore case and hyphens");

    let failures = [
        ("member-a", "member a password", "".to_owned()),
        ("member-a", "member a password", "ABCDEFGHJK".to_owned()),
        ("member-a", "member a password", tenant.owner_code.clone()),
        ("member-a", "wrong password!!", anna_code.clone()),
        ("nobody", "member a password", anna_code.clone()),
    ];
    for (username, password, code) in failures {
        let err = stack
            .login("acme", username, password, &code)
            .await
            .unwrap_err();
        if code.is_empty() {
            assert_eq!(
                (err.code(), field(&err).as_str()),
                (Code::InvalidArgument, "chat_code")
            );
            continue;
        }
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert_eq!(
            reason(&err),
            "LOGIN_FAILED",
            "one reason for every wrong factor"
        );
        assert!(!err.message().contains("code") || err.message().contains("chat code"));
    }
    let err = stack
        .login(
            "no-such-tenant",
            "member-a",
            "member a password",
            &anna_code,
        )
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "LOGIN_FAILED");
}

#[tokio::test(flavor = "multi_thread")]
async fn oc3_imported_argon2id_hash_is_accepted_and_rehashed_to_bcrypt() {
    use argon2::PasswordHasher;
    let (stack, _tenant, owner) = setup().await;
    let imported = argon2::Argon2::default()
        .hash_password(b"imported password")
        .unwrap()
        .to_string();
    let mut auth = stack.auth_client().await;
    let user = auth
        .create_user(with_token(
            &owner,
            pb::CreateUserRequest {
                username: "imported".into(),
                display_name: "Imported".into(),
                role: hafen_proto::common::v1::Role::Member as i32,
                credential: Some(pb::create_user_request::Credential::PasswordHash(imported)),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let code = auth
        .issue_chat_code(with_token(
            &owner,
            pb::IssueChatCodeRequest {
                user_id: user.user_id.clone(),
                device_label: "laptop".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .code;

    let stored = || async {
        let tenant_id: uuid::Uuid = user_tenant(&stack, &owner).await;
        let user_id: uuid::Uuid = user.user_id.parse().unwrap();
        let pool = hafen_store::pool::build_pool(&stack.db.args()).unwrap();
        hafen_store::with_tenant(
            &pool,
            &hafen_store::TenantId::from(tenant_id),
            move |conn| {
                Box::pin(async move {
                    use diesel::prelude::*;
                    use diesel_async::RunQueryDsl;
                    use hafen_store::schema::users;
                    let hash: String = users::table
                        .find(user_id)
                        .select(users::password_hash)
                        .first(conn)
                        .await?;
                    Ok::<_, hafen_store::Error>(hash)
                })
            },
        )
        .await
        .unwrap()
    };
    assert!(stored().await.starts_with("$argon2id$"));
    stack
        .login("acme", "imported", "imported password", &code)
        .await
        .expect("argon2id hashes are accepted");
    assert!(
        stored().await.starts_with("$2b$"),
        "re-hashed to bcrypt on login"
    );
    stack
        .login("acme", "imported", "imported password", &code)
        .await
        .expect("the new bcrypt hash verifies");

    let err = auth
        .create_user(with_token(
            &owner,
            pb::CreateUserRequest {
                username: "bad-hash".into(),
                display_name: "Bad".into(),
                role: hafen_proto::common::v1::Role::Member as i32,
                credential: Some(pb::create_user_request::Credential::PasswordHash(
                    "$1$md5$nope".into(),
                )),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "password_hash");
}

async fn user_tenant(stack: &TestStack, token: &str) -> uuid::Uuid {
    get_own_tenant(stack, token)
        .await
        .unwrap()
        .tenant_id
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn oc5_revoking_a_chat_code_wipes_the_device_everywhere() {
    let (stack, _tenant, owner) = setup().await;
    let code = stack
        .create_member(&owner, "traveller", "traveller password")
        .await
        .chat_code;
    let device = stack
        .login("acme", "traveller", "traveller password", &code)
        .await
        .unwrap();
    // The session works on another service (the tenant service resolves it via Introspect).
    get_own_tenant(&stack, &device.access_token).await.unwrap();

    // A stream on another service waits on the same revocation watch as this one: an
    // authenticator set up as every other service sets it up (Redis, then Introspect).
    let other_service = {
        let redis = hafen_authn::Redis::new(&stack.secrets.redis_args()).unwrap();
        let revocations = hafen_authn::Revocations::new(hafen_authn::MAX_ACCESS_TTL);
        revocations.listen(redis.clone());
        revocations
    };
    // An announcement made before the subscription would be missed.
    eventually(
        "the revocation channel is followed",
        Duration::from_secs(10),
        || std::future::ready(other_service.following_since()),
    )
    .await;
    let session: uuid::Uuid = device.session_id.parse().unwrap();
    let stream_end = tokio::spawn({
        let watch = other_service.clone();
        async move { watch.wait(session).await }
    });

    let revoked_at = Instant::now();
    let code_row = stack
        .auth_client()
        .await
        .revoke_chat_code(with_token(
            &owner,
            pb::RevokeChatCodeRequest {
                chat_code_id: device.chat_code_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code_row.state, pb::ChatCodeState::Revoked as i32);

    let ended = tokio::time::timeout(Duration::from_secs(1), stream_end)
        .await
        .expect("the open stream learns of the wipe within 1 s")
        .unwrap();
    assert_eq!(ended, hafen_authn::RevokeReason::DeviceWiped);

    let err = get_own_tenant(&stack, &device.access_token)
        .await
        .unwrap_err();
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "DEVICE_WIPED", "the device is told to wipe");
    let err = stack
        .auth_client()
        .await
        .list_users(with_token(
            &device.access_token,
            pb::ListUsersRequest::default(),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "DEVICE_WIPED", "on the auth service too");
    let err = stack
        .auth_client()
        .await
        .refresh(pb::RefreshRequest {
            refresh_token: device.refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        reason(&err),
        "DEVICE_WIPED",
        "and the refresh token is dead"
    );

    // The device confirms the wipe; admins see WIPED.
    let confirmed = stack
        .auth_client()
        .await
        .confirm_wipe(with_token(&device.access_token, pb::ConfirmWipeRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(confirmed.wipe_confirm_time.is_some());
    let codes = stack
        .auth_client()
        .await
        .list_chat_codes(with_token(&owner, pb::ListChatCodesRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .chat_codes;
    let wiped = codes
        .iter()
        .find(|c| c.chat_code_id == device.chat_code_id)
        .unwrap();
    assert_eq!(wiped.state, pb::ChatCodeState::Wiped as i32);
    assert!(wiped.wipe_confirm_time.is_some());

    // The code never logs in again.
    let err = stack
        .login("acme", "traveller", "traveller password", &code)
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "LOGIN_FAILED");

    // Only a wiped session may confirm a wipe.
    let err = stack
        .auth_client()
        .await
        .confirm_wipe(with_token(&owner, pb::ConfirmWipeRequest {}))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "INVALID_STATE")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_tokens_rotate_and_reuse_revokes_the_session() {
    let (stack, tenant, _) = setup().await;
    let session = stack.login_owner(&tenant).await;
    let mut auth = stack.auth_client().await;
    let first = auth
        .refresh(pb::RefreshRequest {
            refresh_token: session.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(first.refresh_token, session.refresh_token, "rotated");
    assert_ne!(first.access_token, session.access_token);
    get_own_tenant(&stack, &first.access_token)
        .await
        .expect("new access token works");
    let err = get_own_tenant(&stack, &session.access_token)
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "the replaced access token stops working"
    );

    // The first refresh token again: reuse. The whole session ends.
    let err = auth
        .refresh(pb::RefreshRequest {
            refresh_token: session.refresh_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "REFRESH_TOKEN_REUSED");
    let err = get_own_tenant(&stack, &first.access_token)
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SESSION_REVOKED");
    let err = auth
        .refresh(pb::RefreshRequest {
            refresh_token: first.refresh_token,
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SESSION_REVOKED");

    let err = auth
        .refresh(pb::RefreshRequest {
            refresh_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unauthenticated, "UNAUTHENTICATED")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn gr6_deactivation_ends_sessions_and_blocks_login_until_reactivated() {
    let (stack, _tenant, owner) = setup().await;
    let leaver = stack
        .create_member(&owner, "leaver", "leaver password 1")
        .await;
    let (user_id, code) = (leaver.user_id, leaver.chat_code);
    let session = stack
        .login("acme", "leaver", "leaver password 1", &code)
        .await
        .unwrap();
    get_own_tenant(&stack, &session.access_token).await.unwrap();
    let mut auth = stack.auth_client().await;
    let deactivated = auth
        .deactivate_user(with_token(
            &owner,
            pb::DeactivateUserRequest {
                user_id: user_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deactivated.state, pb::UserState::Deactivated as i32);
    let err = get_own_tenant(&stack, &session.access_token)
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "SESSION_REVOKED");
    let err = stack
        .login("acme", "leaver", "leaver password 1", &code)
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "LOGIN_FAILED");

    // The owner is protected; members may not deactivate anyone.
    let owner_id = stack
        .auth_client()
        .await
        .list_users(with_token(&owner, pb::ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .users
        .into_iter()
        .find(|u| u.username == "owner")
        .unwrap()
        .user_id;
    let err = auth
        .deactivate_user(with_token(
            &owner,
            pb::DeactivateUserRequest { user_id: owner_id },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "OWNER_PROTECTED");

    auth.reactivate_user(with_token(&owner, pb::ReactivateUserRequest { user_id }))
        .await
        .unwrap();
    stack
        .login("acme", "leaver", "leaver password 1", &code)
        .await
        .expect("reactivated users log in again");
}

#[tokio::test(flavor = "multi_thread")]
async fn brute_force_is_slowed_down_and_recovers() {
    let (stack, _tenant, owner) = setup().await;
    let code = stack
        .create_member(&owner, "target", "target password")
        .await
        .chat_code;
    for _ in 0..5 {
        let err = stack
            .login("acme", "target", "guess guess!", &code)
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "LOGIN_FAILED");
    }
    // The sixth failure starts the back-off: even the right password waits now.
    let _ = stack.login("acme", "target", "guess guess!", &code).await;
    let err = stack
        .login("acme", "target", "target password", &code)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "RATE_LIMITED");
    let retry_after: u64 = status::metadata(&err, "retry_after_seconds")
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);

    // Refused attempts count nothing, so trying again until the back-off ends is harmless.
    eventually(
        "after the back-off the right password works",
        Duration::from_secs(retry_after + 10),
        || async {
            match stack
                .login("acme", "target", "target password", &code)
                .await
            {
                Ok(session) => Some(session),
                Err(err) if reason(&err) == "RATE_LIMITED" => None,
                Err(err) => panic!("after the back-off the right password works: {err:?}"),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn change_password_ends_other_sessions_and_needs_the_old_one() {
    let (stack, _tenant, owner) = setup().await;
    let code = stack
        .create_member(&owner, "changer", "first password")
        .await
        .chat_code;
    let one = stack
        .login("acme", "changer", "first password", &code)
        .await
        .unwrap();
    let two = stack
        .login("acme", "changer", "first password", &code)
        .await
        .unwrap();
    let mut auth = stack.auth_client().await;
    let err = auth
        .change_password(with_token(
            &one.access_token,
            pb::ChangePasswordRequest {
                old_password: "not the password".into(),
                new_password: "second password".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFIRMATION_FAILED");
    let changed = auth
        .change_password(with_token(
            &one.access_token,
            pb::ChangePasswordRequest {
                old_password: "first password".into(),
                new_password: "second password".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.sessions_revoked, 1);
    get_own_tenant(&stack, &one.access_token)
        .await
        .expect("the calling session stays");
    let err = get_own_tenant(&stack, &two.access_token).await.unwrap_err();
    assert_eq!(reason(&err), "SESSION_REVOKED");
    stack
        .login("acme", "changer", "second password", &code)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn gr3_the_owner_deletes_the_tenant_with_password_and_totp() {
    let (stack, tenant, owner) = setup().await;
    let mut auth = stack.auth_client().await;
    let enrolled = auth
        .enroll_totp(with_token(
            &owner,
            pb::EnrollTotpRequest {
                password: OWNER_PASSWORD.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(enrolled.otpauth_uri.starts_with("otpauth://totp/"));
    let secret = base32_decode(&enrolled.secret_base32);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let err = auth
        .confirm_totp(with_token(
            &owner,
            pb::ConfirmTotpRequest {
                code: "000000".into(),
            },
        ))
        .await;
    if let Err(err) = err {
        assert_eq!(reason(&err), "CONFIRMATION_FAILED");
    }
    let confirmed = auth
        .confirm_totp(with_token(
            &owner,
            pb::ConfirmTotpRequest {
                code: hafen_crypto::totp::code_at(&secret, now()),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(confirmed.user.unwrap().totp_enrolled);

    let delete = |password: &str, totp: String| tenant_pb::DeleteTenantRequest {
        tenant_id: String::new(),
        confirm_slug: tenant.slug.clone(),
        password: password.into(),
        totp_code: totp,
    };
    let mut tenants = stack.tenant_client().await;
    let err = tenants
        .delete_tenant(with_token(&owner, delete(OWNER_PASSWORD, String::new())))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "TOTP_REQUIRED");
    let err = tenants
        .delete_tenant(with_token(
            &owner,
            delete(
                "wrong password!",
                hafen_crypto::totp::code_at(&secret, now()),
            ),
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "CONFIRMATION_FAILED");
    let err = tenants
        .delete_tenant(with_token(&owner, delete(OWNER_PASSWORD, "123456".into())))
        .await;
    if let Err(err) = err {
        assert_eq!(reason(&err), "CONFIRMATION_FAILED");
    }
    // A member may not delete the organisation.
    let code = stack
        .create_member(&owner, "plain", "plain password")
        .await
        .chat_code;
    let plain = stack
        .login("acme", "plain", "plain password", &code)
        .await
        .unwrap();
    let err = tenants
        .delete_tenant(with_token(
            &plain.access_token,
            delete("plain password", String::new()),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The code that confirmed the enrollment is used up; the next step's code is current
    // too (one step of clock drift is allowed) and has not been used.
    tenants
        .delete_tenant(with_token(
            &owner,
            delete(
                OWNER_PASSWORD,
                hafen_crypto::totp::code_at(&secret, now() + 30),
            ),
        ))
        .await
        .expect("password and a current TOTP code delete the tenant");
    let err = get_own_tenant(&stack, &owner).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unauthenticated,
        "the tenant's sessions are gone"
    );
}

fn base32_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = Vec::new();
    let (mut buffer, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let value = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        buffer = (buffer << 5) | value;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn introspect_is_for_hafen_services_only() {
    let (stack, tenant, _) = setup().await;
    let session = stack.login_owner(&tenant).await;
    let err = stack
        .auth_client()
        .await
        .introspect(pb::IntrospectRequest {
            access_token: session.access_token.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "no client certificate: refused"
    );

    let channel = stack
        .auth
        .try_channel(stack.secrets.client_tls(Some("messaging")))
        .await
        .unwrap();
    let active = hafen_proto::auth::v1::auth_service_client::AuthServiceClient::new(channel)
        .introspect(pb::IntrospectRequest {
            access_token: session.access_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(active.active);
    assert_eq!(active.tenant_id, tenant.id);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_status_and_writes_nothing() {
    let (stack, _tenant, owner) = setup().await;
    let mut auth = stack.auth_client().await;
    let login = |slug: &str, user: &str, pass: String, code: &str| pb::LoginRequest {
        tenant_slug: slug.into(),
        username: user.into(),
        password: pass,
        chat_code: code.into(),
        device_label: String::new(),
    };
    let cases = [
        (
            login("", "u", "p".into(), "c"),
            "INVALID_FIELD",
            "tenant_slug",
        ),
        (
            login("acme", "", "p".into(), "c"),
            "INVALID_FIELD",
            "username",
        ),
        (
            login("acme", "u", String::new(), "c"),
            "INVALID_FIELD",
            "password",
        ),
        (
            login("acme", "u", "x".repeat(73), "ABCDEFGHJK"),
            "PASSWORD_TOO_LONG",
            "password",
        ),
        (
            login("acme", &"u".repeat(65), "p".into(), "c"),
            "INVALID_FIELD",
            "username",
        ),
    ];
    for (request, expected_reason, expected_field) in cases {
        let err = auth.login(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            (reason(&err).as_str(), field(&err).as_str()),
            (expected_reason, expected_field)
        );
    }

    let users_before = auth
        .list_users(with_token(&owner, pb::ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .users
        .len();
    let create = |username: &str, password: String, role: i32| pb::CreateUserRequest {
        username: username.into(),
        display_name: "Somebody".into(),
        role,
        credential: Some(pb::create_user_request::Credential::Password(password)),
        ..Default::default()
    };
    let member_role = hafen_proto::common::v1::Role::Member as i32;
    let cases = [
        (
            create("ok-name", "x".repeat(73), member_role),
            "PASSWORD_TOO_LONG",
            "password",
        ),
        (
            create("ok-name", "short".into(), member_role),
            "PASSWORD_TOO_WEAK",
            "password",
        ),
        (
            create("a b", "long enough pass".into(), member_role),
            "INVALID_FIELD",
            "username",
        ),
        (
            create("ok-name", "long enough pass".into(), 0),
            "INVALID_FIELD",
            "role",
        ),
        (
            create(
                "ok-name",
                "long enough pass".into(),
                hafen_proto::common::v1::Role::Owner as i32,
            ),
            "INVALID_FIELD",
            "role",
        ),
        (
            create("owner", "long enough pass".into(), member_role),
            "ALREADY_EXISTS",
            "username",
        ),
    ];
    for (request, expected_reason, expected_field) in cases {
        let err = auth
            .create_user(with_token(&owner, request))
            .await
            .unwrap_err();
        assert_eq!(
            (reason(&err).as_str(), field(&err).as_str()),
            (expected_reason, expected_field),
            "{err:?}"
        );
    }
    for (id, expected) in [("", "user_id"), ("42", "user_id")] {
        let err = auth
            .issue_chat_code(with_token(
                &owner,
                pb::IssueChatCodeRequest {
                    user_id: id.into(),
                    device_label: "x".into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(
            (err.code(), field(&err).as_str()),
            (Code::InvalidArgument, expected)
        );
    }
    let err = auth
        .revoke_chat_code(with_token(
            &owner,
            pb::RevokeChatCodeRequest {
                chat_code_id: uuid::Uuid::now_v7().to_string(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = auth
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no token");
    let users_after = auth
        .list_users(with_token(&owner, pb::ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .users
        .len();
    assert_eq!(users_before, users_after, "nothing was written");
}

#[tokio::test(flavor = "multi_thread")]
async fn bx5_tokens_passwords_and_chat_codes_never_reach_the_logs() {
    let logs = hafen_testkit::LogCapture::install();
    let (stack, tenant, owner) = setup().await;
    let code = stack
        .create_member(&owner, "quiet", "quiet password")
        .await
        .chat_code;
    let session = stack
        .login("acme", "quiet", "quiet password", &code)
        .await
        .unwrap();
    let _ = stack
        .login("acme", "quiet", "wrong wrong wrong", &code)
        .await;
    let refreshed = stack
        .auth_client()
        .await
        .refresh(pb::RefreshRequest {
            refresh_token: session.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    get_own_tenant(&stack, &refreshed.access_token)
        .await
        .unwrap();
    let logged = logs.contents();
    assert!(
        logged.contains(&session.session_id),
        "ids are logged: the capture works"
    );
    for secret in [
        OWNER_PASSWORD,
        "quiet password",
        "wrong wrong wrong",
        code.as_str(),
        tenant.owner_code.as_str(),
        owner.as_str(),
        session.access_token.as_str(),
        session.refresh_token.as_str(),
        refreshed.access_token.as_str(),
        refreshed.refresh_token.as_str(),
    ] {
        assert!(!logged.contains(secret), "a secret reached the logs");
        // Not even the secret half of a token.
        if let Some((_, half)) = secret.split_once('.') {
            assert!(!logged.contains(half), "a token secret reached the logs");
        }
    }
}

/// An auth service beside `stack`'s, on the same database and Redis, that believes the
/// `x-forwarded-for` of calls from loopback (as if behind a proxy), so tests can play
/// clients at different addresses.
async fn behind_a_proxy(stack: &TestStack) -> hafen_testkit::TestServer {
    let mut config = stack.secrets.auth_config(&stack.db);
    config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    hafen_testkit::TestServer::spawn(|l, s| hafen_auth::serve(config, l, s)).await
}

/// Logs in through `server` as a client at `address`.
async fn login_from(
    server: &hafen_testkit::TestServer,
    stack: &TestStack,
    address: &str,
    username: &str,
    password: &str,
    code: &str,
) -> Result<pb::LoginResponse, tonic::Status> {
    let mut request = tonic::Request::new(pb::LoginRequest {
        tenant_slug: "acme".into(),
        username: username.into(),
        password: password.into(),
        chat_code: code.into(),
        device_label: String::new(),
    });
    request
        .metadata_mut()
        .insert("x-forwarded-for", address.parse().unwrap());
    pb::auth_service_client::AuthServiceClient::new(server.channel(&stack.secrets).await)
        .login(request)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread")]
async fn oc2_guessing_passwords_slows_the_guesser_but_never_locks_the_user_out() {
    let (stack, _tenant, owner) = setup().await;
    let code = stack
        .create_member(&owner, "target", "target password")
        .await
        .chat_code;
    let proxied = behind_a_proxy(&stack).await;
    let no_device = "ABCDEFGHJK";

    // One guesser: its address backs off after the free attempts.
    for attempt in 0..8 {
        let err = login_from(
            &proxied,
            &stack,
            "10.0.0.1",
            "target",
            "guess guess!",
            no_device,
        )
        .await
        .unwrap_err();
        let expected = if attempt < 5 {
            "LOGIN_FAILED"
        } else {
            "RATE_LIMITED"
        };
        assert_eq!(reason(&err), expected, "attempt {attempt}");
    }
    // Guessers spread over many addresses: the username backs off for them too…
    let spread = login_from(
        &proxied,
        &stack,
        "10.0.9.9",
        "target",
        "guess guess!",
        no_device,
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&spread), "RATE_LIMITED");
    // …but not for the user on their own device, whose chat code the account knows.
    login_from(
        &proxied,
        &stack,
        "10.0.0.2",
        "target",
        "target password",
        &code,
    )
    .await
    .expect("the real user logs in while the username backs off");
}

#[tokio::test(flavor = "multi_thread")]
async fn oc2_parallel_guesses_reach_bcrypt_no_more_often_than_allowed() {
    let (stack, _tenant, owner) = setup().await;
    stack
        .create_member(&owner, "parallel", "parallel password")
        .await;
    let proxied = behind_a_proxy(&stack).await;
    let mut guesses = tokio::task::JoinSet::new();
    for i in 0..50 {
        let channel = proxied.channel(&stack.secrets).await;
        guesses.spawn(async move {
            let mut request = tonic::Request::new(pb::LoginRequest {
                tenant_slug: "acme".into(),
                username: "parallel".into(),
                password: "guess guess!".into(),
                chat_code: "ABCDEFGHJK".into(),
                device_label: String::new(),
            });
            request
                .metadata_mut()
                .insert("x-forwarded-for", format!("10.1.0.{i}").parse().unwrap());
            pb::auth_service_client::AuthServiceClient::new(channel)
                .login(request)
                .await
                .unwrap_err()
        });
    }
    let mut checked = 0;
    let mut limited = 0;
    while let Some(answer) = guesses.join_next().await {
        match reason(&answer.unwrap()).as_str() {
            "LOGIN_FAILED" => checked += 1,
            "RATE_LIMITED" => limited += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        checked <= 5,
        "{checked} guesses reached bcrypt; 5 are allowed"
    );
    assert_eq!(checked + limited, 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn oc2_attempts_are_counted_in_redis_so_every_replica_backs_off_together() {
    use hafen_authn::limits::{LimitPolicy, Limiter};
    let namespace = hafen_testkit::TestRedis::new();
    let replica = || {
        let redis = hafen_authn::Redis::new(&namespace.args()).expect("a Redis handle");
        Limiter::new(Some(redis), LimitPolicy::default())
    };
    let (first, second) = (replica(), replica());
    for attempt in 0..5 {
        let limiter = if attempt % 2 == 0 { &first } else { &second };
        assert!(
            limiter.acquire("guesser").await.is_ok(),
            "attempt {attempt}"
        );
    }
    // The free attempts were spent on both together: each of them now backs off.
    for limiter in [&first, &second] {
        let wait = limiter.acquire("guesser").await.unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(limiter.backing_off("guesser").await.is_some());
    }
    let keys = namespace.keys().await;
    assert!(
        keys.iter()
            .any(|key| key.ends_with("limit:{guesser}:count")),
        "counted in Redis, not in each process: {keys:?}"
    );
    first.succeeded("guesser").await;
    assert!(second.acquire("guesser").await.is_ok(), "cleared for both");
}

#[tokio::test(flavor = "multi_thread")]
async fn oc2_with_redis_down_the_limiter_still_limits() {
    let mut redis = hafen_testkit::PrivateRedis::start();
    let stack = TestStack::start_with_redis(Some(redis.args("hafen:"))).await;
    let tenant = stack.create_tenant("acme").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let code = stack
        .create_member(&owner, "target", "target password")
        .await
        .chat_code;
    redis.stop();
    let mut answers = Vec::new();
    for _ in 0..7 {
        let err = stack
            .login("acme", "target", "guess guess!", &code)
            .await
            .unwrap_err();
        answers.push(reason(&err));
    }
    assert_eq!(&answers[..5], ["LOGIN_FAILED"; 5]);
    assert_eq!(answers[6], "RATE_LIMITED", "never fails open: {answers:?}");
    let _ = tenant;
}

#[tokio::test(flavor = "multi_thread")]
async fn gr3_owner_confirmations_are_rate_limited_and_a_totp_code_confirms_once() {
    let (stack, tenant, owner) = setup().await;
    let mut tenants = stack.tenant_client().await;
    let delete = |password: &str, totp: &str| tenant_pb::DeleteTenantRequest {
        tenant_id: String::new(),
        confirm_slug: tenant.slug.clone(),
        password: password.into(),
        totp_code: totp.into(),
    };
    // Without TOTP enrolled, a TOTP code is an error, not silently ignored; so is a code that
    // cannot be one.
    for totp in ["123456", &"9".repeat(10_000)] {
        let err = tenants
            .delete_tenant(with_token(&owner, delete(OWNER_PASSWORD, totp)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(field(&err), "totp_code");
    }
    // Wrong passwords: counted like logins, then RATE_LIMITED.
    let mut answers = Vec::new();
    for _ in 0..6 {
        let err = tenants
            .delete_tenant(with_token(&owner, delete("wrong password!", "")))
            .await
            .unwrap_err();
        answers.push(reason(&err));
    }
    assert_eq!(&answers[..5], ["CONFIRMATION_FAILED"; 5]);
    assert_eq!(answers[5], "RATE_LIMITED", "{answers:?}");

    // A second tenant, whose owner enrolls TOTP: the enrolling code cannot confirm again.
    let other = stack.create_tenant("replay").await;
    let owner = stack.login_owner(&other).await.access_token;
    let mut auth = stack.auth_client().await;
    let enrolled = auth
        .enroll_totp(with_token(
            &owner,
            pb::EnrollTotpRequest {
                password: OWNER_PASSWORD.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let secret = base32_decode(&enrolled.secret_base32);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let code = hafen_crypto::totp::code_at(&secret, now);
    auth.confirm_totp(with_token(
        &owner,
        pb::ConfirmTotpRequest { code: code.clone() },
    ))
    .await
    .unwrap();
    let replayed = tenants
        .delete_tenant(with_token(
            &owner,
            tenant_pb::DeleteTenantRequest {
                confirm_slug: other.slug.clone(),
                password: OWNER_PASSWORD.into(),
                totp_code: code,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&replayed),
        "CONFIRMATION_FAILED",
        "a code confirms once"
    );
    assert!(
        get_own_tenant(&stack, &owner).await.is_ok(),
        "nothing deleted"
    );

    // A deletion refused for another reason does not use up the code it came with.
    let next = hafen_crypto::totp::code_at(&secret, now + 30);
    let with = |slug: &str| tenant_pb::DeleteTenantRequest {
        confirm_slug: slug.into(),
        password: OWNER_PASSWORD.into(),
        totp_code: next.clone(),
        ..Default::default()
    };
    let wrong_slug = tenants
        .delete_tenant(with_token(&owner, with("not-the-slug")))
        .await
        .unwrap_err();
    assert_eq!(field(&wrong_slug), "confirm_slug");
    tenants
        .delete_tenant(with_token(&owner, with(&other.slug)))
        .await
        .expect("the code was not used by the refused attempt");
}

#[tokio::test(flavor = "multi_thread")]
async fn oc2_only_the_owner_manages_the_owners_devices_and_the_operator_recovers_a_lost_owner() {
    let (stack, tenant, owner) = setup().await;
    let mut auth = stack.auth_client().await;
    let admin = auth
        .create_user(with_token(
            &owner,
            pb::CreateUserRequest {
                username: "deputy".into(),
                display_name: "Deputy".into(),
                role: hafen_proto::common::v1::Role::Admin as i32,
                credential: Some(pb::create_user_request::Credential::Password(
                    "deputy password".into(),
                )),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let code = auth
        .issue_chat_code(with_token(
            &owner,
            pb::IssueChatCodeRequest {
                user_id: admin.user_id.clone(),
                device_label: "desk".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .code;
    let deputy = stack
        .login("acme", "deputy", "deputy password", &code)
        .await
        .unwrap()
        .access_token;

    // An admin can neither add a device to the owner nor wipe one of the owner's.
    let issue = auth
        .issue_chat_code(with_token(
            &deputy,
            pb::IssueChatCodeRequest {
                user_id: tenant.owner_id.clone(),
                device_label: "planted".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&issue), "OWNER_PROTECTED");
    let revoke = auth
        .revoke_chat_code(with_token(
            &deputy,
            pb::RevokeChatCodeRequest {
                chat_code_id: tenant.owner_code_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(reason(&revoke), "OWNER_PROTECTED");
    stack
        .login("acme", "owner", OWNER_PASSWORD, &tenant.owner_code)
        .await
        .expect("the owner's device still logs in");

    // The owner lost every device: the operator recovers them with one new code, which
    // alone logs nobody in; the owner's old devices are wiped.
    let mut tenants = stack.tenant_client().await;
    let not_admins = tenants
        .recover_owner(with_token(
            &deputy,
            tenant_pb::RecoverOwnerRequest {
                tenant_id: tenant.id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(not_admins.code(), Code::PermissionDenied);
    let recovered = tenants
        .recover_owner(stack.secrets.operator(tenant_pb::RecoverOwnerRequest {
            tenant_id: tenant.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let wiped = get_own_tenant(&stack, &owner).await.unwrap_err();
    assert_eq!(reason(&wiped), "DEVICE_WIPED");
    let old = stack
        .login("acme", "owner", OWNER_PASSWORD, &tenant.owner_code)
        .await
        .unwrap_err();
    assert_eq!(reason(&old), "LOGIN_FAILED");
    let wrong_password = stack
        .login(
            "acme",
            "owner",
            "not the password",
            &recovered.owner_chat_code,
        )
        .await
        .unwrap_err();
    assert_eq!(reason(&wrong_password), "LOGIN_FAILED");
    let back = stack
        .login("acme", "owner", OWNER_PASSWORD, &recovered.owner_chat_code)
        .await
        .expect("the owner logs in with the new code");
    assert!(get_own_tenant(&stack, &back.access_token).await.is_ok());
    assert!(
        get_own_tenant(&stack, &deputy).await.is_ok(),
        "others unaffected"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn oc3_imported_hashes_beyond_the_cost_limits_are_refused() {
    let (stack, _tenant, owner) = setup().await;
    let mut auth = stack.auth_client().await;
    let salt_and_hash = "c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
    let bcrypt_tail = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0";
    for (hash, accepted) in [
        (format!("$2b$12${bcrypt_tail}"), true),
        (format!("$2b$15${bcrypt_tail}"), false),
        (format!("$2b$31${bcrypt_tail}"), false),
        (format!("$2b$03${bcrypt_tail}"), false),
        (
            format!("$argon2id$v=19$m=65536,t=3,p=4${salt_and_hash}"),
            true,
        ),
        (
            format!("$argon2id$v=19$m=1048576,t=3,p=1${salt_and_hash}"),
            false,
        ),
        (
            format!("$argon2id$v=19$m=19456,t=100,p=1${salt_and_hash}"),
            false,
        ),
        (
            format!("$argon2id$v=19$m=19456,t=2,p=8${salt_and_hash}"),
            false,
        ),
    ] {
        let created = auth
            .create_user(with_token(
                &owner,
                pb::CreateUserRequest {
                    username: format!("imported{}", uuid::Uuid::now_v7().simple()),
                    display_name: "Imported".into(),
                    role: hafen_proto::common::v1::Role::Member as i32,
                    credential: Some(pb::create_user_request::Credential::PasswordHash(
                        hash.clone(),
                    )),
                    ..Default::default()
                },
            ))
            .await;
        match (created, accepted) {
            (Ok(_), true) => {}
            (Err(err), false) => {
                assert_eq!(err.code(), Code::InvalidArgument, "{hash}");
                assert_eq!(field(&err), "password_hash");
            }
            (other, _) => panic!("{hash}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_refresh_passwords_and_echoes_do_what_the_protos_say() {
    let (stack, tenant, owner) = setup().await;
    let mut auth = stack.auth_client().await;

    // After Refresh the previous access token stops working at once, the new one works.
    let session = stack.login_owner(&tenant).await;
    let refreshed = auth
        .refresh(pb::RefreshRequest {
            refresh_token: session.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let old = get_own_tenant(&stack, &session.access_token)
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated);
    assert!(
        get_own_tenant(&stack, &refreshed.access_token)
            .await
            .is_ok()
    );

    // A refused password says which rule, with its parameter.
    let create = |password: &str| {
        with_token(
            &owner,
            pb::CreateUserRequest {
                username: format!("u{}", uuid::Uuid::now_v7().simple()),
                display_name: "New".into(),
                role: hafen_proto::common::v1::Role::Member as i32,
                credential: Some(pb::create_user_request::Credential::Password(
                    password.into(),
                )),
                ..Default::default()
            },
        )
    };
    let meta = |err: &tonic::Status, key: &str| status::metadata(err, key).unwrap_or_default();
    let short = auth.create_user(create("short")).await.unwrap_err();
    assert_eq!(reason(&short), "PASSWORD_TOO_WEAK");
    assert_eq!(
        (meta(&short, "rule"), meta(&short, "min_length")),
        ("min_length".into(), "10".into())
    );
    let common = auth.create_user(create("Password123")).await.unwrap_err();
    assert_eq!(meta(&common, "rule"), "common_password");
    let long = auth.create_user(create(&"x".repeat(73))).await.unwrap_err();
    assert_eq!(reason(&long), "PASSWORD_TOO_LONG");
    assert_eq!(meta(&long, "max_bytes"), "72");

    // An error never echoes more than a short excerpt of the input.
    let huge = "p".repeat(1_000_000);
    let err = auth
        .update_user(with_token(
            &owner,
            pb::UpdateUserRequest {
                user: Some(pb::User {
                    user_id: tenant.owner_id.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![huge.clone()],
                }),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(field(&err), "update_mask");
    assert!(err.message().len() < 300, "{} bytes", err.message().len());
}
