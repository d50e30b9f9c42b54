//! The visitor service from a browser's side: gRPC-Web over TLS (HTTP/2, and HTTP/1.1 for
//! clients and proxies that speak nothing else) under a widget's own path, with CORS answered
//! per widget from its allowed origins, the preflight included, and the `Origin` checked on
//! every call (CB8).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use bytes::Bytes;
use hafen_proto::webchat::v1 as pb;
use hafen_testkit::web::{self, Answer, frame, frames, http1, send};
use hafen_testkit::{TestStack, with_token};
use prost::Message;

const ORIGIN: &str = "https://shop.example.com";

/// A browser's HTTP/2 connection to the stack's webchat service.
async fn browser(stack: &TestStack) -> h2::client::SendRequest<Bytes> {
    web::h2(stack.webchat.addr(), stack.secrets.ca_pem()).await
}

/// A TLS connection to the stack's webchat service, offering `alpn`.
async fn connect(
    stack: &TestStack,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    web::connect(stack.webchat.addr(), stack.secrets.ca_pem(), alpn).await
}

fn uri(stack: &TestStack, widget: &str, method: &str) -> String {
    format!(
        "https://{}/w/{widget}/hafen.webchat.v1.VisitorService/{method}",
        stack.webchat.addr()
    )
}

/// A CORS preflight for `method` from `origin`.
async fn preflight(
    h2: &mut h2::client::SendRequest<Bytes>,
    stack: &TestStack,
    widget: &str,
    origin: &str,
) -> Answer {
    preflight_for(h2, stack, widget, "StartVisit", origin).await
}

async fn preflight_for(
    h2: &mut h2::client::SendRequest<Bytes>,
    stack: &TestStack,
    widget: &str,
    method: &str,
    origin: &str,
) -> Answer {
    let request = http::Request::options(uri(stack, widget, method))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,authorization",
        )
        .body(())
        .unwrap();
    send(h2, request, None).await
}

/// A gRPC-Web call (binary) of `method` from `origin`: the answer, and its message and
/// `grpc-status` from the body's frames.
async fn call<M: Message>(
    h2: &mut h2::client::SendRequest<Bytes>,
    stack: &TestStack,
    widget: &str,
    method: &str,
    origin: &str,
    message: &M,
) -> (Answer, Option<Bytes>, Option<String>) {
    call_as(h2, stack, widget, method, origin, None, message).await
}

async fn call_as<M: Message>(
    h2: &mut h2::client::SendRequest<Bytes>,
    stack: &TestStack,
    widget: &str,
    method: &str,
    origin: &str,
    token: Option<&str>,
    message: &M,
) -> (Answer, Option<Bytes>, Option<String>) {
    let frame = frame(message);
    let mut request = http::Request::post(uri(stack, widget, method))
        .header("origin", origin)
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1");
    if let Some(token) = token {
        request = request.header("authorization", format!("Visitor {token}"));
    }
    let request = request.body(()).unwrap();
    let answer = send(h2, request, Some(frame)).await;
    let (data, status) = frames(&answer);
    (answer, data, status)
}

fn settings() -> pb::WidgetSettings {
    pb::WidgetSettings {
        name: "Shop".into(),
        allowed_origins: vec![ORIGIN.into()],
        privacy_policy_url: "https://shop.example.com/privacy".into(),
        allow_anonymous_chat: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cb8_a_browser_calls_the_visitor_service_with_grpc_web_and_cors_per_widget() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("shop").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    stack.set_webchat_feature(&owner, true).await;
    let widget = stack
        .widget_client()
        .await
        .create_widget(with_token(
            &owner,
            pb::CreateWidgetRequest {
                settings: Some(settings()),
                enabled: true,
                consent_text: "Consent".into(),
                request_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .widget_id;
    let mut h2 = browser(&stack).await;

    // The preflight is answered for the widget's own origin, exactly, and for no other.
    let allowed = preflight(&mut h2, &stack, &widget, ORIGIN).await;
    assert_eq!(allowed.status, http::StatusCode::NO_CONTENT);
    assert_eq!(allowed.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(allowed.header("access-control-allow-methods"), Some("POST"));
    let headers = allowed.header("access-control-allow-headers").unwrap();
    for needed in ["content-type", "x-grpc-web", "authorization"] {
        assert!(headers.contains(needed), "{headers}");
    }
    assert_eq!(allowed.header("vary"), Some("origin"));
    assert_eq!(allowed.header("access-control-allow-credentials"), None);
    for (widget, origin) in [
        (widget.as_str(), "https://evil.example"),
        (widget.as_str(), "https://shop.example.com.evil.example"),
        (&uuid::Uuid::now_v7().to_string(), ORIGIN),
    ] {
        let refused = preflight(&mut h2, &stack, widget, origin).await;
        assert_eq!(refused.status, http::StatusCode::FORBIDDEN, "{origin}");
        assert_eq!(refused.header("access-control-allow-origin"), None);
    }

    // A call from the widget's origin: translated, handled, answered with CORS headers.
    let (answer, data, status) = call(
        &mut h2,
        &stack,
        &widget,
        "GetWidgetConfig",
        ORIGIN,
        &pb::GetWidgetConfigRequest {
            widget_id: widget.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(answer.status, http::StatusCode::OK);
    assert_eq!(status.as_deref(), Some("0"));
    assert_eq!(answer.header("access-control-allow-origin"), Some(ORIGIN));
    assert!(
        answer
            .header("access-control-expose-headers")
            .unwrap()
            .contains("grpc-status")
    );
    let config = pb::WidgetConfig::decode(data.unwrap()).unwrap();
    assert_eq!(
        config.privacy_policy_url,
        "https://shop.example.com/privacy"
    );

    // StartVisit from the browser starts a visit; from a foreign origin, nothing happens.
    let start = pb::StartVisitRequest {
        widget_id: widget.clone(),
        ..Default::default()
    };
    let (answer, data, status) = call(&mut h2, &stack, &widget, "StartVisit", ORIGIN, &start).await;
    assert_eq!(
        (answer.status, status.as_deref()),
        (http::StatusCode::OK, Some("0"))
    );
    let visit = pb::StartVisitResponse::decode(data.unwrap()).unwrap();
    assert!(!visit.visitor_token.is_empty());
    let (refused, data, _) = call(
        &mut h2,
        &stack,
        &widget,
        "StartVisit",
        "https://evil.example",
        &start,
    )
    .await;
    assert_eq!(refused.status, http::StatusCode::FORBIDDEN);
    assert_eq!(refused.header("access-control-allow-origin"), None);
    assert!(data.is_none());

    // The widget switched off: its path answers no browser, the preflight included.
    stack
        .widget_client()
        .await
        .update_widget(with_token(
            &owner,
            pb::UpdateWidgetRequest {
                widget_id: widget.clone(),
                settings: Some(settings()),
                enabled: false,
            },
        ))
        .await
        .unwrap();
    hafen_testkit::eventually(
        "the widget's path is closed",
        std::time::Duration::from_secs(10),
        || {
            let (mut h2, stack, widget) = (h2.clone(), &stack, widget.clone());
            async move {
                let answer = preflight(&mut h2, stack, &widget, ORIGIN).await;
                (answer.status == http::StatusCode::FORBIDDEN).then_some(())
            }
        },
    )
    .await;
    // The data rights stay the visitor's: from the widget's origin, the browser still gets
    // their data.
    let allowed = preflight_for(&mut h2, &stack, &widget, "GetMyData", ORIGIN).await;
    assert_eq!(allowed.status, http::StatusCode::NO_CONTENT);
    let (answer, data, status) = call_as(
        &mut h2,
        &stack,
        &widget,
        "GetMyData",
        ORIGIN,
        Some(&visit.visitor_token),
        &pb::GetMyDataRequest {},
    )
    .await;
    assert_eq!(
        (answer.status, status.as_deref()),
        (http::StatusCode::OK, Some("0"))
    );
    assert_eq!(
        pb::MyData::decode(data.unwrap()).unwrap().visit_id,
        visit.visit_id
    );
    let refused = preflight_for(
        &mut h2,
        &stack,
        &widget,
        "GetMyData",
        "https://evil.example",
    )
    .await;
    assert_eq!(refused.status, http::StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread")]
async fn cb8_a_browser_on_http1_gets_the_same_grpc_web_and_cors() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("shop").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    stack.set_webchat_feature(&owner, true).await;
    let widget = stack
        .widget_client()
        .await
        .create_widget(with_token(
            &owner,
            pb::CreateWidgetRequest {
                settings: Some(settings()),
                enabled: true,
                consent_text: "Consent".into(),
                request_id: String::new(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .widget_id;
    let path = format!("/w/{widget}/hafen.webchat.v1.VisitorService/GetWidgetConfig");
    let host = stack.webchat.addr();

    let tls = connect(&stack, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let preflight = http1(
        tls,
        &format!(
            "OPTIONS {path} HTTP/1.1\r\nhost: {host}\r\norigin: {ORIGIN}\r\n\
             access-control-request-method: POST\r\n\
             access-control-request-headers: content-type,x-grpc-web\r\n"
        ),
        b"",
    )
    .await;
    assert_eq!(preflight.status, http::StatusCode::NO_CONTENT);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some(ORIGIN)
    );

    let request = frame(&pb::GetWidgetConfigRequest {
        widget_id: widget.clone(),
        ..Default::default()
    });
    let call = |origin: &'static str| {
        let (stack, path, request) = (&stack, path.clone(), request.clone());
        async move {
            let tls = connect(stack, &[b"http/1.1"]).await;
            http1(
                tls,
                &format!(
                    "POST {path} HTTP/1.1\r\nhost: {host}\r\norigin: {origin}\r\n\
                     content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n"
                ),
                &request,
            )
            .await
        }
    };
    let answer = call(ORIGIN).await;
    assert_eq!(answer.status, http::StatusCode::OK);
    assert_eq!(answer.header("access-control-allow-origin"), Some(ORIGIN));
    let (data, status) = frames(&answer);
    assert_eq!(status.as_deref(), Some("0"));
    let config = pb::WidgetConfig::decode(data.unwrap()).unwrap();
    assert_eq!(config.widget_id, widget);

    let refused = call("https://evil.example").await;
    assert_eq!(refused.status, http::StatusCode::FORBIDDEN);
    assert_eq!(refused.header("access-control-allow-origin"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn cb8_the_widget_files_are_served_to_every_site_with_a_strict_policy_of_their_own() {
    use base64::Engine as _;
    use sha2::Digest as _;

    let mut stack = TestStack::start().await;
    let dir = tempfile::tempdir().unwrap();
    let script = b"console.log('widget');".as_slice();
    std::fs::write(dir.path().join("hafen-widget.js"), script).unwrap();
    std::fs::write(dir.path().join("hafen-widget.css"), b"p{margin:0}").unwrap();
    let mut config = stack.secrets.webchat_config(&stack.db);
    config.auth.auth_endpoint = stack.auth.uri();
    config.audit.audit_endpoint = stack.audit.uri();

    // A directory without the built files is a configuration error, said at start.
    let empty = tempfile::tempdir().unwrap();
    let mut broken = config.clone();
    broken.widget_dir = Some(empty.path().to_owned());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = hafen_webchat::serve(broken, listener, std::future::pending())
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("--widget-dir"), "{error}");

    config.widget_dir = Some(dir.path().to_owned());
    stack.webchat.stop().await.unwrap();
    stack.webchat =
        hafen_testkit::TestServer::spawn(|l, s| hafen_webchat::serve(config, l, s)).await;
    let mut h2 = browser(&stack).await;
    let url = |path: &str| format!("https://{}{path}", stack.webchat.addr());
    let get = |path: &str| {
        http::Request::get(url(path))
            .header("origin", "https://any-site.example")
            .body(())
            .unwrap()
    };

    let answer = send(&mut h2, get("/widget/hafen-widget.js"), None).await;
    assert_eq!(answer.status, http::StatusCode::OK);
    assert_eq!(answer.body.as_ref(), script);
    assert_eq!(
        answer.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    let integrity = format!(
        "sha384-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha384::digest(script))
    );
    let etag = format!("\"{integrity}\"");
    assert_eq!(answer.header("etag"), Some(etag.as_str()));
    // Any site may load it with `crossorigin` and check its integrity; caches keep it a day.
    assert_eq!(answer.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        answer.header("cache-control"),
        Some("public, max-age=86400")
    );
    assert!(
        answer
            .header("content-security-policy")
            .unwrap()
            .starts_with("default-src 'none'")
    );
    assert_eq!(answer.header("x-content-type-options"), Some("nosniff"));
    let css = send(&mut h2, get("/widget/hafen-widget.css"), None).await;
    assert_eq!(
        (css.status, css.header("content-type")),
        (http::StatusCode::OK, Some("text/css; charset=utf-8"))
    );

    // Revalidation by the entity tag; HEAD; nothing else is served or accepted.
    let revalidate = http::Request::get(url("/widget/hafen-widget.js"))
        .header("if-none-match", &etag)
        .body(())
        .unwrap();
    let unchanged = send(&mut h2, revalidate, None).await;
    assert_eq!(unchanged.status, http::StatusCode::NOT_MODIFIED);
    assert!(unchanged.body.is_empty());
    let head = http::Request::head(url("/widget/hafen-widget.js"))
        .body(())
        .unwrap();
    let head = send(&mut h2, head, None).await;
    assert_eq!(head.status, http::StatusCode::OK);
    assert_eq!(head.header("content-length"), Some("22"));
    for path in [
        "/widget/manifest.json",
        "/widget/../Cargo.toml",
        "/widget/hafen-widget.js/x",
    ] {
        let missing = send(&mut h2, get(path), None).await;
        assert_eq!(missing.status, http::StatusCode::NOT_FOUND, "{path}");
        assert!(missing.header("content-security-policy").is_some());
    }
    let post = http::Request::post(url("/widget/hafen-widget.js"))
        .body(())
        .unwrap();
    let refused = send(&mut h2, post, None).await;
    assert_eq!(refused.status, http::StatusCode::METHOD_NOT_ALLOWED);

    // The same over HTTP/1.1.
    let tls = connect(&stack, &[b"http/1.1"]).await;
    let answer = http1(
        tls,
        &format!(
            "GET /widget/hafen-widget.js HTTP/1.1\r\nhost: {}\r\n",
            stack.webchat.addr()
        ),
        b"",
    )
    .await;
    assert_eq!(answer.status, http::StatusCode::OK);
    assert_eq!(answer.body.as_ref(), script);
}
