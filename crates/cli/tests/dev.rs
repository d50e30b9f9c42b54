//! `hafen dev` as a user runs it: one process, six services on their ports, TLS with the
//! development CA, an orderly exit on SIGTERM (GR1: the single-binary mode).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a failed step must fail the test, with its message"
)]

mod support;

use hafen_sdk::proto::webchat::v1 as webchat_pb;
use support::{DevStack, SERVICES};

#[tokio::test(flavor = "multi_thread")]
async fn gr1_hafen_dev_runs_all_six_services_seeds_the_demo_and_stops_on_sigterm() {
    // Every service SERVING, the control plane migrated, the demo organisation seeded.
    let mut stack = DevStack::start(&[]).await;
    assert!(
        hafen_store::migrate::pending_control_plane(stack.db_url())
            .await
            .unwrap()
            .is_empty(),
        "hafen dev migrated the control plane"
    );

    // The demo organisation (`make run`): its website chat serves a visitor, whose first
    // message reaches one of the two agents.
    let widget = stack.widget().to_owned();
    let visitor = hafen_sdk::Visitor::connect(&stack.config())
        .unwrap()
        .with_origin(&format!("https://localhost:{}", stack.page_port))
        .unwrap();
    let mut calls = visitor.client();
    let shown = calls
        .get_widget_config(webchat_pb::GetWidgetConfigRequest {
            widget_id: widget.clone(),
            ..Default::default()
        })
        .await
        .expect("the demo widget is enabled")
        .into_inner();
    let consent = shown
        .consent_text
        .expect("the demo widget has a consent text");
    visitor.start(&widget).await.unwrap();
    calls
        .give_consent(webchat_pb::GiveConsentRequest {
            version: consent.version,
            granted: true,
            ..Default::default()
        })
        .await
        .unwrap();
    calls
        .send_visitor_message(webchat_pb::SendVisitorMessageRequest {
            request_id: uuid::Uuid::new_v4().to_string(),
            body: "Hello from the demo page".into(),
        })
        .await
        .expect("an agent takes the demo chat");

    // One /metrics for the whole process: the visitor's calls to the webchat service and the
    // logins at the auth service are counted there.
    let metrics = {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", stack.metrics_port))
            .await
            .expect("hafen dev serves /metrics on --metrics-port");
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: dev\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).await.unwrap();
        answer
    };
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for counted in [
        "grpc_server_handled_total{grpc_service=\"hafen.webchat.v1.VisitorService\",grpc_method=\"SendVisitorMessage\",grpc_type=\"unary\",grpc_code=\"OK\"}",
        "grpc_service=\"hafen.auth.v1.AuthService\"",
    ] {
        assert!(metrics.contains(counted), "{counted} in {metrics}");
    }
    let banner = stack.stop().await;
    for (port, service) in stack.ports.iter().zip(SERVICES) {
        assert!(
            banner.contains(&format!(":{port}")) && banner.contains(service),
            "the banner names {service} on {port}: {banner}"
        );
    }
}
