//! Traces (DC5, BX5): every RPC is a span, the calls between services carry W3C trace
//! context, and the spans go out over OTLP. A SendMessage whose token the messaging service
//! must ask the auth service about is one trace across both; no span carries content or a
//! secret.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hafen_proto::messaging::v1 as msg;
use hafen_testkit::{TestStack, with_token};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// An OTLP/gRPC collector that keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.0.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                kept.extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn dc5_bx5_a_send_is_one_trace_across_messaging_and_auth_with_ids_only() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // This process's tracing goes to the collector (every service of the stack runs in it).
    let telemetry = hafen_platform::telemetry::init_with_otlp_endpoint(
        "hafen-e2e",
        &hafen_platform::TelemetryArgs {
            log_format: hafen_platform::config::LogFormat::Json,
            log_filter: "info".into(),
        },
        &format!("http://{addr}"),
    )
    .unwrap();

    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("traced").await;
    let login = stack.login_owner(&tenant).await;
    let owner = login.access_token.clone();
    let mut messaging = stack.messaging_client().await;
    let conversation = stack.create_channel(&owner, "traced").await;
    // A fresh login of the owner, cached nowhere but in Redis, and not there either: the
    // messaging service must introspect its token at the auth service.
    let fresh = stack.login_owner(&tenant).await;
    let mut redis = stack.secrets.redis().connect().await;
    for key in stack.secrets.redis().keys().await {
        if key.contains("session:") {
            let _: () = redis::cmd("DEL")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    }
    let body = format!("traced body {}", uuid::Uuid::new_v4().simple());
    let request_id = uuid::Uuid::now_v7().to_string();
    messaging
        .send_message(with_token(
            &fresh.access_token,
            msg::SendMessageRequest {
                request_id: request_id.clone(),
                conversation_id: conversation.clone(),
                body: body.clone(),
            },
        ))
        .await
        .unwrap();
    drop(stack);
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = collector.0.lock().unwrap().clone();
        if spans
            .iter()
            .any(|s| s.name == "hafen.messaging.v1.MessagingService/SendMessage")
        {
            break spans;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no SendMessage span exported"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let send = spans
        .iter()
        .find(|s| {
            s.name == "hafen.messaging.v1.MessagingService/SendMessage"
                && s.kind == SpanKind::Server as i32
        })
        .unwrap();
    let trace: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == send.trace_id)
        .collect();
    let named = |name: &str, kind: SpanKind| {
        trace
            .iter()
            .find(|s| s.name == name && s.kind == kind as i32)
            .unwrap_or_else(|| {
                let names: Vec<_> = trace.iter().map(|s| (&s.name, s.kind)).collect();
                panic!("no {name} ({kind:?}) in the trace: {names:?}")
            })
    };
    let call = named("hafen.auth.v1.AuthService/Introspect", SpanKind::Client);
    let introspect = named("hafen.auth.v1.AuthService/Introspect", SpanKind::Server);
    assert_eq!(
        introspect.parent_span_id, call.span_id,
        "the auth service continues the messaging service's trace"
    );
    // The ids, and only ids, are on the spans.
    let with_ids = trace
        .iter()
        .find(|s| attribute(s, "conversation_id").is_some())
        .expect("a span of the send names its conversation");
    assert_eq!(
        attribute(with_ids, "conversation_id").unwrap(),
        conversation
    );
    assert_eq!(attribute(with_ids, "request_id").unwrap(), request_id);
    let with_tenant = trace
        .iter()
        .find(|s| attribute(s, "tenant_id").is_some())
        .expect("a span of the send names its tenant");
    assert_eq!(attribute(with_tenant, "tenant_id").unwrap(), tenant.id);
    for span in &spans {
        for kv in &span.attributes {
            let value = format!("{:?}", kv.value);
            for secret in [
                body.as_str(),
                fresh.access_token.as_str(),
                login.access_token.as_str(),
                hafen_testkit::OWNER_PASSWORD,
                tenant.owner_code.as_str(),
            ] {
                assert!(
                    !value.contains(secret),
                    "{} carries a secret in {}",
                    span.name,
                    kv.key
                );
            }
        }
    }
}
