//! Requests checked against their contract before any handler sees them.
//!
//! Every unary or server-streaming call of a Hafen RPC is decoded once more here, against the
//! descriptors the contracts compile to ([`hafen_proto::FILE_DESCRIPTOR_SET`]), so that bad
//! input is refused the same way in every service, with `INVALID_ARGUMENT` and an `ErrorInfo`
//! naming the field, instead of surfacing as `INTERNAL` from deep below:
//!
//! - a message that is not valid protobuf, or a string field that is not UTF-8
//!   (`MALFORMED_REQUEST`, or `INVALID_FIELD` when the field is known);
//! - a NUL character in any string field, at any depth (`INVALID_FIELD`): PostgreSQL cannot
//!   store one, and no Hafen string has a use for it;
//! - a message larger than the service accepts (`RESOURCE_EXHAUSTED`, `REQUEST_TOO_LARGE`),
//!   refused from the frame header before the body is read;
//! - a call of an internal method ([`InternalMethod`], which may take larger messages) from a
//!   caller whose client certificate names none of the services allowed to make it
//!   (`PERMISSION_DENIED`), before anything of its body is read.
//!
//! The bytes the handler decodes are the very bytes checked. Calls of other services
//! (health, reflection), client streams, compressed messages and non-gRPC content types pass
//! through untouched.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, Value};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use crate::status;

/// Bytes of a gRPC message frame's header: the compression flag and the length.
const FRAME_HEADER: usize = 5;

/// The default largest request message, as tonic's.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

fn pool() -> Option<&'static DescriptorPool> {
    static POOL: OnceLock<Option<DescriptorPool>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(hafen_proto::FILE_DESCRIPTOR_SET).ok())
        .as_ref()
}

/// The request type of the unary or server-streaming method at `path`
/// (`/package.Service/Method`), if it is one of Hafen's.
fn request_type(path: &str) -> Option<MessageDescriptor> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if !service.starts_with("hafen.") {
        return None;
    }
    let method = pool()?
        .get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)?;
    (!method.is_client_streaming()).then(|| method.input())
}

/// An internal method: only the services named may call it, and it may take larger messages.
#[derive(Debug, Clone, Copy)]
pub struct InternalMethod {
    /// The method's name, e.g. `AppendEvents`.
    pub method: &'static str,
    /// Its largest request message.
    pub max_request_bytes: usize,
    /// The services whose client certificates may call it.
    pub callers: &'static [&'static str],
}

/// A service whose requests are checked first (see the module docs).
#[derive(Debug, Clone)]
pub struct Checked<S> {
    inner: S,
    max_request_bytes: usize,
    internal: &'static [InternalMethod],
}

impl<S> Checked<S> {
    /// `inner`, accepting request messages of up to `max_request_bytes`, and larger ones for
    /// the `internal` methods from their callers only.
    pub fn new(inner: S, max_request_bytes: usize, internal: &'static [InternalMethod]) -> Self {
        Self {
            inner,
            max_request_bytes,
            internal,
        }
    }
}

/// The peer certificates of the connection `request` came on, if it presented any.
fn peer_certs(
    request: &http::Request<Body>,
) -> Option<std::sync::Arc<Vec<rustls::pki_types::CertificateDer<'static>>>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
}

impl<S: NamedService> NamedService for Checked<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Checked<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The clone serves the next call; the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let is_grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "application/grpc" || v == "application/grpc+proto");
        let descriptor = is_grpc
            .then(|| request_type(request.uri().path()))
            .flatten();
        let Some(descriptor) = descriptor else {
            return Box::pin(inner.call(request));
        };
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let max = match self.internal.iter().find(|m| m.method == method) {
            Some(internal) => {
                let allowed = peer_certs(&request).is_some_and(|certs| {
                    crate::identity::service_of(&certs, internal.callers).is_some()
                });
                if !allowed {
                    let denied = status::error(
                        tonic::Code::PermissionDenied,
                        "PERMISSION_DENIED",
                        "internal call: this service's certificate may not make it",
                        &[("required", "internal")],
                    );
                    return Box::pin(async move { Ok(denied.into_http()) });
                }
                internal.max_request_bytes
            }
            None => self.max_request_bytes,
        };
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = match read_frame(body, max).await {
                Ok(bytes) => bytes,
                Err(status) => return Ok(status.into_http()),
            };
            if let Err(status) = check(&descriptor, &bytes) {
                return Ok(status.into_http());
            }
            let body = Body::new(http_body_util::Full::new(bytes));
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}

/// The whole body of a unary request, refusing it from the frame header when the message is
/// larger than `max`.
async fn read_frame(mut body: Body, max: usize) -> Result<Bytes, Status> {
    let mut buffer = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| {
            status::invalid_argument_reason(
                "MALFORMED_REQUEST",
                "the request body could not be read",
                &[],
            )
        })?;
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
        }
        if buffer.len() >= FRAME_HEADER {
            let length = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]);
            let length = usize::try_from(length).unwrap_or(usize::MAX);
            if length > max {
                return Err(too_large(max));
            }
            if buffer.len() > FRAME_HEADER.saturating_add(max) {
                return Err(too_large(max));
            }
        }
    }
    Ok(buffer.freeze())
}

fn too_large(max: usize) -> Status {
    status::error(
        tonic::Code::ResourceExhausted,
        "REQUEST_TOO_LARGE",
        "the request message is larger than this service accepts",
        &[("max_bytes", &max.to_string())],
    )
}

/// Checks the one message in `bytes` (a gRPC frame) against `descriptor`.
fn check(descriptor: &MessageDescriptor, bytes: &[u8]) -> Result<(), Status> {
    if bytes.len() < FRAME_HEADER {
        // No message at all: tonic answers that itself.
        return Ok(());
    }
    if bytes[0] != 0 {
        // Compressed: Hafen's servers accept no compression, and tonic says so.
        return Ok(());
    }
    let message = &bytes[FRAME_HEADER..];
    let decoded = DynamicMessage::decode(descriptor.clone(), message)
        .map_err(|_| malformed(descriptor, message))?;
    let mut path = String::new();
    match find_nul(&decoded, &mut path) {
        Some(field) => Err(status::invalid_field(
            &field,
            "must not contain a NUL character",
        )),
        None => Ok(()),
    }
}

/// INVALID_ARGUMENT for a message that does not decode: `INVALID_FIELD` naming a top-level
/// string field that is not UTF-8, otherwise `MALFORMED_REQUEST`.
fn malformed(descriptor: &MessageDescriptor, message: &[u8]) -> Status {
    match non_utf8_field(descriptor, message) {
        Some(field) => status::invalid_field(&field, "must be UTF-8"),
        None => status::invalid_argument_reason(
            "MALFORMED_REQUEST",
            "the request message is not valid protobuf for this method",
            &[],
        ),
    }
}

/// The first top-level string field of `message` whose bytes are not UTF-8, read straight
/// from the wire format (the decoder does not say which field failed).
fn non_utf8_field(descriptor: &MessageDescriptor, mut message: &[u8]) -> Option<String> {
    use prost::encoding::decode_varint;
    while !message.is_empty() {
        let key = decode_varint(&mut message).ok()?;
        let number = u32::try_from(key >> 3).ok()?;
        match key & 7 {
            0 => {
                decode_varint(&mut message).ok()?;
            }
            1 => message = message.get(8..)?,
            5 => message = message.get(4..)?,
            2 => {
                let length = usize::try_from(decode_varint(&mut message).ok()?).ok()?;
                let value = message.get(..length)?;
                message = message.get(length..)?;
                let field = descriptor.get_field(number);
                if let Some(field) = field
                    && field.kind() == prost_reflect::Kind::String
                    && std::str::from_utf8(value).is_err()
                {
                    return Some(field.name().to_owned());
                }
            }
            _ => return None,
        }
    }
    None
}

/// The path (`masking.custom_patterns[2].name`) of the first string field that holds a NUL,
/// in field-number order.
fn find_nul(message: &DynamicMessage, path: &mut String) -> Option<String> {
    for (field, value) in message.fields() {
        let start = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(field.name());
        if let Some(found) = nul_in(value, path) {
            return Some(found);
        }
        path.truncate(start);
    }
    None
}

fn nul_in(value: &Value, path: &mut String) -> Option<String> {
    match value {
        Value::String(text) if text.contains('\0') => Some(path.clone()),
        Value::Message(inner) => find_nul(inner, path),
        Value::List(items) => items.iter().enumerate().find_map(|(index, item)| {
            let start = path.len();
            path.push_str(&format!("[{index}]"));
            let found = nul_in(item, path);
            path.truncate(start);
            found
        }),
        Value::Map(entries) => entries.iter().find_map(|(key, item)| {
            if let MapKey::String(key) = key
                && key.contains('\0')
            {
                return Some(path.clone());
            }
            nul_in(item, path)
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn frame(message: &impl Message) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn descriptor(name: &str) -> MessageDescriptor {
        pool()
            .and_then(|pool| pool.get_message_by_name(name))
            .unwrap_or_else(|| panic!("{name} in the contracts"))
    }

    #[test]
    fn a_nul_anywhere_in_a_string_is_refused_naming_the_field() {
        let login = hafen_proto::auth::v1::LoginRequest {
            tenant_slug: "ab\0cd".into(),
            ..Default::default()
        };
        let err = check(&descriptor("hafen.auth.v1.LoginRequest"), &frame(&login)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status::metadata(&err, "field").as_deref(),
            Some("tenant_slug")
        );
        assert!(
            !err.message().contains("ab"),
            "no input echoed: {}",
            err.message()
        );

        let masking = hafen_proto::tenant::v1::MaskingSettings {
            custom_patterns: vec![
                hafen_proto::tenant::v1::CustomPattern::default(),
                hafen_proto::tenant::v1::CustomPattern {
                    name: "ok".into(),
                    regex: "x\0".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let settings = hafen_proto::tenant::v1::TenantSettings {
            masking: Some(masking),
            ..Default::default()
        };
        let update = hafen_proto::tenant::v1::UpdateTenantSettingsRequest {
            settings: Some(settings),
            ..Default::default()
        };
        let err = check(
            &descriptor("hafen.tenant.v1.UpdateTenantSettingsRequest"),
            &frame(&update),
        )
        .unwrap_err();
        assert_eq!(
            status::metadata(&err, "field").as_deref(),
            Some("settings.masking.custom_patterns[1].regex")
        );

        let fine = hafen_proto::auth::v1::LoginRequest {
            tenant_slug: "acme".into(),
            ..Default::default()
        };
        assert!(check(&descriptor("hafen.auth.v1.LoginRequest"), &frame(&fine)).is_ok());
    }

    #[test]
    fn garbage_and_invalid_utf8_are_invalid_argument_with_error_info() {
        let login = descriptor("hafen.auth.v1.LoginRequest");
        // Field 1 (tenant_slug) as a length-delimited string of invalid UTF-8.
        let bad_utf8 = [0, 0, 0, 0, 4, 0x0a, 2, 0xff, 0xfe];
        let err = check(&login, &bad_utf8).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status::metadata(&err, "field").as_deref(),
            Some("tenant_slug")
        );
        // A truncated length-delimited field.
        let truncated = [0, 0, 0, 0, 3, 0x0a, 9, b'a'];
        let err = check(&login, &truncated).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(status::reason(&err).is_some(), "ErrorInfo present");
    }
}
