//! Every RPC does what its contract says on hostile input (issue: defects found by a client
//! written from the protos): whatever a client sends, a string field that PostgreSQL cannot
//! hold, a message that is not protobuf, the answer is INVALID_ARGUMENT with an ErrorInfo
//! naming the field, never INTERNAL.

use std::str::FromStr;

use hafen_testkit::{TestServer, TestStack, with_token};
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, Value};
use tonic::codegen::http::uri::PathAndQuery;
use tonic_prost::ProstCodec;

/// Every path (`settings.masking.custom_patterns[0].regex`) to a string field of `message`,
/// through nested and repeated messages, up to `depth` levels.
fn string_paths(message: &MessageDescriptor, depth: usize) -> Vec<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for field in message.fields() {
        if field.is_map() {
            continue;
        }
        let step = (field.name().to_owned(), field.is_list());
        match field.kind() {
            Kind::String => out.push(vec![step]),
            Kind::Message(inner) if depth > 0 && !inner.full_name().starts_with("google.") => {
                for mut rest in string_paths(&inner, depth - 1) {
                    rest.insert(0, step.clone());
                    out.push(rest);
                }
            }
            _ => {}
        }
    }
    out
}

/// A message of `descriptor` with only the string at `path` set, to `text`.
fn with_string(
    descriptor: &MessageDescriptor,
    path: &[(String, bool)],
    text: &str,
) -> DynamicMessage {
    let mut message = DynamicMessage::new(descriptor.clone());
    let ((name, list), rest) = path.split_first().expect("a non-empty path");
    let field = descriptor.get_field_by_name(name).expect("the field");
    let value = match field.kind() {
        Kind::Message(inner) => Value::Message(with_string(&inner, rest, text)),
        _ => Value::String(text.to_owned()),
    };
    let value = if *list {
        Value::List(vec![value])
    } else {
        value
    };
    message.set_field(&field, value);
    message
}

fn field_name(path: &[(String, bool)]) -> String {
    path.iter()
        .map(|(name, list)| {
            if *list {
                format!("{name}[0]")
            } else {
                name.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn server<'a>(stack: &'a TestStack, service: &str) -> Option<&'a TestServer> {
    Some(match service {
        "hafen.auth.v1.AuthService" => &stack.auth,
        "hafen.messaging.v1.MessagingService" => &stack.messaging,
        "hafen.tenant.v1.TenantService" => &stack.tenant,
        "hafen.retention.v1.RetentionService" => &stack.retention,
        "hafen.audit.v1.AuditService" => &stack.audit,
        _ => return None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_a_nul_in_any_string_field_of_any_rpc_is_invalid_argument_naming_it() {
    let stack = TestStack::start().await;
    let tenant = stack.create_tenant("nul-bytes").await;
    let owner = stack.login_owner(&tenant).await.access_token;
    let pool = DescriptorPool::decode(hafen_proto::FILE_DESCRIPTOR_SET).unwrap();
    let mut calls = 0;
    for service in pool.services() {
        let Some(server) = server(&stack, service.full_name()) else {
            continue;
        };
        // With a service's certificate too, so internal methods (AppendEvents) get past
        // their callers' check to the contract check.
        let channel = server
            .try_channel(stack.secrets.client_tls(Some("messaging")))
            .await
            .unwrap();
        for method in service.methods().filter(|m| !m.is_client_streaming()) {
            let path = format!("/{}/{}", service.full_name(), method.name());
            for field in string_paths(&method.input(), 4) {
                let message = with_string(&method.input(), &field, "ab\0cd");
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready().await.unwrap();
                let answer = grpc
                    .unary(
                        with_token(&owner, message),
                        PathAndQuery::from_str(&path).unwrap(),
                        ProstCodec::<DynamicMessage, ()>::default(),
                    )
                    .await;
                let status = answer.expect_err("a NUL is never accepted");
                let expected = field_name(&field);
                assert_eq!(
                    (
                        status.code(),
                        hafen_platform::status::metadata(&status, "field")
                    ),
                    (tonic::Code::InvalidArgument, Some(expected.clone())),
                    "{path} {expected}: {status:?}"
                );
                calls += 1;
            }
        }
    }
    assert!(calls > 50, "every string field of every RPC: {calls} calls");
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_garbage_protobuf_and_invalid_utf8_are_invalid_argument_with_error_info() {
    let stack = TestStack::start().await;
    let channel = stack.auth.channel(&stack.secrets).await;
    let login = PathAndQuery::from_static("/hafen.auth.v1.AuthService/Login");
    for (body, field) in [
        // tenant_slug (field 1) holding bytes that are not UTF-8.
        (vec![0x0a, 2, 0xff, 0xfe], Some("tenant_slug")),
        // A length-delimited field cut short.
        (vec![0x0a, 9, b'a'], None),
        // Not protobuf at all.
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(), None),
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(Raw(body)),
                login.clone(),
                ProstCodec::<Raw, ()>::default(),
            )
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let reason = hafen_platform::status::reason(&status);
        match field {
            Some(field) => {
                assert_eq!(reason.as_deref(), Some("INVALID_FIELD"));
                assert_eq!(
                    hafen_platform::status::metadata(&status, "field").as_deref(),
                    Some(field)
                );
            }
            None => assert_eq!(reason.as_deref(), Some("MALFORMED_REQUEST")),
        }
    }
    // Another content type changes nothing: tonic decodes the body as protobuf all the same,
    // so it is checked all the same.
    for content_type in ["application/grpc+json", "text/plain"] {
        let mut grpc = tonic::client::Grpc::new(ContentType(channel.clone(), content_type));
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(Raw(b"\x0a\x02a\x00".to_vec())),
                login.clone(),
                ProstCodec::<Raw, ()>::default(),
            )
            .await
            .expect_err("refused");
        assert_eq!(
            (
                status.code(),
                hafen_platform::status::metadata(&status, "field")
            ),
            (tonic::Code::InvalidArgument, Some("tenant_slug".to_owned())),
            "{content_type}: {status:?}"
        );
    }
}

/// A channel that sends every request with the given content type.
#[derive(Clone, Debug)]
struct ContentType(tonic::transport::Channel, &'static str);

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for ContentType {
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(
        &mut self,
        mut request: tonic::codegen::http::Request<tonic::body::Body>,
    ) -> Self::Future {
        request.headers_mut().insert(
            tonic::codegen::http::header::CONTENT_TYPE,
            tonic::codegen::http::HeaderValue::from_static(self.1),
        );
        self.0.call(request)
    }
}

/// A message whose encoding is the given bytes, as they are.
#[derive(Clone, Debug, Default, PartialEq)]
struct Raw(Vec<u8>);

impl prost::Message for Raw {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn contract_large_messages_are_refused_unread_and_internal_ones_only_from_their_callers() {
    let stack = TestStack::start().await;
    let big = Raw(vec![0xff; 5 * 1024 * 1024]);
    let call = |tls, path: &'static str| {
        let big = big.clone();
        let server = &stack.audit;
        async move {
            let channel = server.try_channel(tls).await.unwrap();
            let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
            grpc.ready().await.unwrap();
            grpc.unary(
                tonic::Request::new(big),
                PathAndQuery::from_static(path),
                ProstCodec::<Raw, ()>::default(),
            )
            .await
            .expect_err("refused")
        }
    };
    // A public method: over the 4 MiB limit, refused from the frame header.
    let public = call(
        stack.secrets.client_tls(None),
        "/hafen.audit.v1.AuditService/ListEvents",
    )
    .await;
    assert_eq!(public.code(), tonic::Code::ResourceExhausted, "{public:?}");
    assert_eq!(
        hafen_platform::status::reason(&public).as_deref(),
        Some("REQUEST_TOO_LARGE")
    );
    // AppendEvents takes 24 MiB, but only from the services that emit events: anyone else
    // is refused before the body is read.
    for identity in [None, Some("audit"), Some("redis")] {
        let denied = call(
            stack.secrets.client_tls(identity),
            "/hafen.audit.v1.AuditService/AppendEvents",
        )
        .await;
        assert_eq!(
            denied.code(),
            tonic::Code::PermissionDenied,
            "{identity:?}: {denied:?}"
        );
    }
    let read = call(
        stack.secrets.client_tls(Some("messaging")),
        "/hafen.audit.v1.AuditService/AppendEvents",
    )
    .await;
    assert_eq!(
        hafen_platform::status::reason(&read).as_deref(),
        Some("MALFORMED_REQUEST"),
        "an emitter's large message is read (and this one is no protobuf): {read:?}"
    );
}
