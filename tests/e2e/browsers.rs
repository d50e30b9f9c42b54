//! The messenger's browser clients: gRPC-Web on the auth and messaging services' own paths,
//! over HTTP/2 and HTTP/1.1, with CORS for the web apps' origins the operator names
//! (`--browser-origins`) and no other; services told no origin answer browsers nothing.

use hafen_proto::auth::v1 as auth_pb;
use hafen_proto::messaging::v1 as msg_pb;
use hafen_testkit::web::{self, Answer, frame, frames, send};
use hafen_testkit::{TestServer, TestStack};
use prost::Message;

const APP: &str = "https://app.example.com";

fn preflight(addr: std::net::SocketAddr, path: &str, origin: &str) -> http::Request<()> {
    http::Request::options(format!("https://{addr}{path}"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-grpc-web",
        )
        .body(())
        .unwrap()
}

fn call(
    addr: std::net::SocketAddr,
    path: &str,
    origin: &str,
    token: Option<&str>,
) -> http::Request<()> {
    let mut request = http::Request::post(format!("https://{addr}{path}"))
        .header("origin", origin)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(()).unwrap()
}

fn assert_allowed(answer: &Answer) {
    assert_eq!(answer.header("access-control-allow-origin"), Some(APP));
    assert_eq!(answer.header("vary"), Some("origin"));
    assert_eq!(answer.header("access-control-allow-credentials"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn dc5_browsers_of_the_named_web_apps_call_auth_and_messaging_with_grpc_web() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("webapp").await;
    let login = stack.login_owner(&tenant).await;
    let browsers = hafen_platform::web::BrowserArgs {
        browser_origins: vec![APP.to_owned()],
    };
    let mut auth = stack.secrets.auth_config(&stack.db);
    auth.audit.audit_endpoint = stack.audit.uri();
    auth.browsers = browsers.clone();
    let auth = TestServer::spawn(|l, s| hafen_auth::serve(auth, l, s)).await;
    let mut messaging = stack.secrets.messaging_config(&stack.db);
    messaging.auth.auth_endpoint = stack.auth.uri();
    messaging.audit.audit_endpoint = stack.audit.uri();
    messaging.browsers = browsers;
    let messaging = TestServer::spawn(|l, s| hafen_messaging::serve(messaging, l, s)).await;
    let ca = stack.secrets.ca_pem();

    // Messaging: the preflight for the app's origin only; the call translated and answered.
    let list = "/hafen.messaging.v1.MessagingService/ListConversations";
    let mut h2 = web::h2(messaging.addr(), ca).await;
    let allowed = send(&mut h2, preflight(messaging.addr(), list, APP), None).await;
    assert_eq!(allowed.status, http::StatusCode::NO_CONTENT);
    assert_allowed(&allowed);
    assert!(
        allowed
            .header("access-control-allow-headers")
            .unwrap()
            .contains("authorization")
    );
    for origin in [
        "https://evil.example",
        "https://app.example.com.evil.example",
    ] {
        let refused = send(&mut h2, preflight(messaging.addr(), list, origin), None).await;
        assert_eq!(refused.status, http::StatusCode::FORBIDDEN, "{origin}");
        assert_eq!(refused.header("access-control-allow-origin"), None);
        let refused = send(
            &mut h2,
            call(messaging.addr(), list, origin, Some(&login.access_token)),
            Some(frame(&msg_pb::ListConversationsRequest::default())),
        )
        .await;
        assert_eq!(refused.status, http::StatusCode::FORBIDDEN, "{origin}");
    }
    let answer = send(
        &mut h2,
        call(messaging.addr(), list, APP, Some(&login.access_token)),
        Some(frame(&msg_pb::ListConversationsRequest::default())),
    )
    .await;
    assert_eq!(answer.status, http::StatusCode::OK);
    assert_allowed(&answer);
    assert!(
        answer
            .header("access-control-expose-headers")
            .unwrap()
            .contains("grpc-status")
    );
    let (data, status) = frames(&answer);
    assert_eq!(status.as_deref(), Some("0"));
    msg_pb::ListConversationsResponse::decode(data.unwrap()).unwrap();
    // Without a token: the error reaches the browser, readable.
    let answer = send(
        &mut h2,
        call(messaging.addr(), list, APP, None),
        Some(frame(&msg_pb::ListConversationsRequest::default())),
    )
    .await;
    assert_allowed(&answer);
    assert_eq!(frames(&answer).1.as_deref(), Some("16"));

    // Auth over HTTP/1.1: a web app refreshes its session.
    let refresh = "/hafen.auth.v1.AuthService/Refresh";
    let tls = web::connect(auth.addr(), ca, &[b"http/1.1"]).await;
    let body = frame(&auth_pb::RefreshRequest {
        refresh_token: login.refresh_token.clone(),
    });
    let answer = web::http1(
        tls,
        &format!(
            "POST {refresh} HTTP/1.1\r\nhost: {}\r\norigin: {APP}\r\n\
             content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n",
            auth.addr()
        ),
        &body,
    )
    .await;
    assert_eq!(answer.status, http::StatusCode::OK);
    assert_allowed(&answer);
    let (data, status) = frames(&answer);
    assert_eq!(status.as_deref(), Some("0"));
    assert!(
        !auth_pb::RefreshResponse::decode(data.unwrap())
            .unwrap()
            .access_token
            .is_empty()
    );

    // A service told no origin (the stack's own messaging) answers browsers no CORS at all.
    let mut plain = web::h2(stack.messaging.addr(), ca).await;
    let answer = send(
        &mut plain,
        preflight(stack.messaging.addr(), list, APP),
        None,
    )
    .await;
    assert_ne!(answer.status, http::StatusCode::NO_CONTENT);
    assert_eq!(answer.header("access-control-allow-origin"), None);
}
