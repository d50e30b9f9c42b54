//! Requests checked against their contract before any handler sees them.
//!
//! Every unary or server-streaming call of a Hafen RPC is walked once here, in its wire format,
//! against the descriptors the contracts compile to ([`hafen_proto::FILE_DESCRIPTOR_SET`]),
//! whatever content type it claims, so that bad input is refused the same way in every
//! service, with `INVALID_ARGUMENT` and an `ErrorInfo` naming the field, instead of surfacing
//! as `INTERNAL` from deep below:
//!
//! - a message that is not valid protobuf (`MALFORMED_REQUEST`), or a string field, at any
//!   depth, that is not UTF-8 (`INVALID_FIELD`);
//! - a NUL character in any string field, at any depth (`INVALID_FIELD`): PostgreSQL cannot
//!   store one, and no Hafen string has a use for it;
//! - a message larger than the service accepts (`RESOURCE_EXHAUSTED`, `REQUEST_TOO_LARGE`),
//!   refused from the frame header before the body is read;
//! - a call of an internal method ([`InternalMethod`], which may take larger messages) from a
//!   caller whose client certificate names none of the services allowed to make it
//!   (`PERMISSION_DENIED`), before anything of its body is read.
//!
//! The bytes the handler decodes are the very bytes checked; the walk builds nothing, so
//! checking costs no memory beyond the request's own bytes. Calls of other services (health,
//! reflection), client streams and compressed messages pass through untouched.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::BodyExt;
use prost_reflect::{DescriptorPool, MessageDescriptor};
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

/// The kind of the method `method` of Hafen's service `service` (`unary`, `client_stream`,
/// `server_stream` or `bidi_stream`), if there is such a method.
pub(crate) fn method_kind(service: &str, method: &str) -> Option<&'static str> {
    let method = pool()?
        .get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)?;
    Some(
        match (method.is_client_streaming(), method.is_server_streaming()) {
            (false, false) => "unary",
            (true, false) => "client_stream",
            (false, true) => "server_stream",
            (true, true) => "bidi_stream",
        },
    )
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
        // Whatever the content type says: tonic decodes the body as protobuf regardless.
        let Some(descriptor) = request_type(request.uri().path()) else {
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

/// How deep messages may nest, as prost's own decoder allows.
const MAX_DEPTH: u32 = 100;

/// What is wrong with a request message.
enum Problem {
    /// Not valid protobuf for the method.
    Malformed,
    /// The string field at this path is not UTF-8.
    NotUtf8(String),
    /// The string field at this path holds a NUL character.
    Nul(String),
}

/// Checks the one message in `bytes` (a gRPC frame) against `descriptor`, walking the wire
/// format directly: nothing is decoded into memory, so a request costs no more to check than
/// its own bytes.
fn check(descriptor: &MessageDescriptor, bytes: &[u8]) -> Result<(), Status> {
    if bytes.len() < FRAME_HEADER {
        // No message at all: tonic answers that itself.
        return Ok(());
    }
    if bytes[0] != 0 {
        // Compressed: Hafen's servers accept no compression, and tonic says so.
        return Ok(());
    }
    let mut path = String::new();
    match walk(descriptor, &bytes[FRAME_HEADER..], &mut path, 0) {
        Ok(()) => Ok(()),
        Err(Problem::Nul(field)) => Err(status::invalid_field(
            &field,
            "must not contain a NUL character",
        )),
        Err(Problem::NotUtf8(field)) => Err(status::invalid_field(&field, "must be UTF-8")),
        Err(Problem::Malformed) => Err(status::invalid_argument_reason(
            "MALFORMED_REQUEST",
            "the request message is not valid protobuf for this method",
            &[],
        )),
    }
}

/// Walks one encoded `message` of type `descriptor`, whose path is `path`
/// (`masking.custom_patterns[2]`). The fields of a map entry take the map field's path.
fn walk(
    descriptor: &MessageDescriptor,
    mut message: &[u8],
    path: &mut String,
    depth: u32,
) -> Result<(), Problem> {
    use prost::encoding::decode_varint;
    if depth > MAX_DEPTH {
        return Err(Problem::Malformed);
    }
    let map_entry = descriptor.is_map_entry();
    // How many elements each repeated field had so far, for the index in the path.
    let mut seen: Vec<(u32, usize)> = Vec::new();
    while !message.is_empty() {
        let key = decode_varint(&mut message).map_err(|_| Problem::Malformed)?;
        let number = u32::try_from(key >> 3).map_err(|_| Problem::Malformed)?;
        let wire = key & 7;
        if number == 0 {
            return Err(Problem::Malformed);
        }
        let value = match wire {
            0 => {
                decode_varint(&mut message).map_err(|_| Problem::Malformed)?;
                None
            }
            1 => {
                message = message.get(8..).ok_or(Problem::Malformed)?;
                None
            }
            5 => {
                message = message.get(4..).ok_or(Problem::Malformed)?;
                None
            }
            2 => {
                let length = decode_varint(&mut message).map_err(|_| Problem::Malformed)?;
                let length = usize::try_from(length).map_err(|_| Problem::Malformed)?;
                let value = message.get(..length).ok_or(Problem::Malformed)?;
                message = &message[length..];
                Some(value)
            }
            // Groups do not exist in proto3; nothing else is a wire type.
            _ => return Err(Problem::Malformed),
        };
        // Unknown fields are skipped, as the decoder does.
        let Some(field) = descriptor.get_field(number) else {
            continue;
        };
        let start = path.len();
        if !map_entry {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(field.name());
            if field.is_list() {
                let index = match seen.iter_mut().find(|(n, _)| *n == number) {
                    Some((_, count)) => {
                        *count += 1;
                        *count - 1
                    }
                    None => {
                        seen.push((number, 1));
                        0
                    }
                };
                path.push_str(&format!("[{index}]"));
            }
        }
        walk_field(&field, wire, value, path, depth)?;
        path.truncate(start);
    }
    Ok(())
}

/// Checks one field's value against its declared kind: the wire type must fit, strings must
/// be UTF-8 without NUL, and messages are walked in turn.
fn walk_field(
    field: &prost_reflect::FieldDescriptor,
    wire: u64,
    value: Option<&[u8]>,
    path: &mut String,
    depth: u32,
) -> Result<(), Problem> {
    use prost_reflect::Kind;
    // A repeated scalar may come packed, as one length-delimited run.
    let packed = |width: Option<usize>| -> Result<(), Problem> {
        let Some(mut run) = value.filter(|_| field.is_list()) else {
            return Err(Problem::Malformed);
        };
        match width {
            Some(width) if run.len() % width == 0 => Ok(()),
            Some(_) => Err(Problem::Malformed),
            None => {
                while !run.is_empty() {
                    prost::encoding::decode_varint(&mut run).map_err(|_| Problem::Malformed)?;
                }
                Ok(())
            }
        }
    };
    match field.kind() {
        Kind::String => {
            let bytes = value.ok_or(Problem::Malformed)?;
            let text = std::str::from_utf8(bytes).map_err(|_| Problem::NotUtf8(path.clone()))?;
            if text.contains('\0') {
                return Err(Problem::Nul(path.clone()));
            }
            Ok(())
        }
        Kind::Bytes => value.map(|_| ()).ok_or(Problem::Malformed),
        Kind::Message(inner) => {
            let bytes = value.ok_or(Problem::Malformed)?;
            walk(&inner, bytes, path, depth + 1)
        }
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => match wire {
            1 => Ok(()),
            _ => packed(Some(8)),
        },
        Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => match wire {
            5 => Ok(()),
            _ => packed(Some(4)),
        },
        Kind::Int32
        | Kind::Int64
        | Kind::Uint32
        | Kind::Uint64
        | Kind::Sint32
        | Kind::Sint64
        | Kind::Bool
        | Kind::Enum(_) => match wire {
            0 => Ok(()),
            _ => packed(None),
        },
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

    #[test]
    fn the_walk_finds_problems_at_any_depth_and_accepts_what_prost_accepts() {
        let update = descriptor("hafen.tenant.v1.UpdateTenantSettingsRequest");
        let settings = hafen_proto::tenant::v1::TenantSettings {
            masking: Some(hafen_proto::tenant::v1::MaskingSettings {
                custom_patterns: vec![
                    hafen_proto::tenant::v1::CustomPattern {
                        name: "one".into(),
                        regex: "a+".into(),
                        ..Default::default()
                    },
                    hafen_proto::tenant::v1::CustomPattern {
                        name: "two".into(),
                        regex: "PLACEHOLDER".into(),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = hafen_proto::tenant::v1::UpdateTenantSettingsRequest {
            settings: Some(settings),
            ..Default::default()
        };
        let good = frame(&request);
        assert!(check(&update, &good).is_ok(), "a valid message passes");
        // The same message with invalid UTF-8 in the second pattern's regex.
        let at = good
            .windows(11)
            .position(|w| w == b"PLACEHOLDER")
            .unwrap_or_else(|| panic!("placeholder encoded"));
        let mut bad = good.clone();
        bad[at] = 0xff;
        let err = check(&update, &bad).unwrap_err();
        assert_eq!(
            status::metadata(&err, "field").as_deref(),
            Some("settings.masking.custom_patterns[1].regex")
        );
        assert_eq!(status::reason(&err).as_deref(), Some("INVALID_FIELD"));

        // Unknown fields are skipped; a known field with the wrong wire type is malformed.
        let login = descriptor("hafen.auth.v1.LoginRequest");
        let unknown = [0, 0, 0, 0, 3, 0xf8, 0x01, 7];
        assert!(check(&login, &unknown).is_ok());
        let wrong_wire = [0, 0, 0, 0, 2, 0x08, 1];
        let err = check(&login, &wrong_wire).unwrap_err();
        assert_eq!(status::reason(&err).as_deref(), Some("MALFORMED_REQUEST"));
        let zero_tag = [0, 0, 0, 0, 2, 0x00, 1];
        assert!(check(&login, &zero_tag).is_err());

        // Nesting deeper than the decoder allows is refused, not recursed into for ever.
        let mut path = String::new();
        assert!(walk(&login, &[], &mut path, MAX_DEPTH + 1).is_err());
        assert!(walk(&login, &[], &mut path, MAX_DEPTH).is_ok());
    }
}
