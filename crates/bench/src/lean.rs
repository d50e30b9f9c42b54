//! A lean gRPC client for the send load: one HTTP/2 connection over TLS per sender, driven
//! with `h2` directly, sending a unary call's HEADERS and DATA together as gRPC's C++, Go and
//! Java clients do.
//!
//! Why not the SDK's tonic client: the send load and the service share this machine's two
//! cores, so what the load generator burns is taken from the service, while the baseline's
//! bare PostgreSQL client takes little from PostgreSQL. A tonic unary call passes through four
//! tasks (the caller, tower's buffer, hyper's body pipe, the connection), and hyper gives a new
//! stream's body no send capacity until the connection task has opened the stream, so HEADERS
//! and DATA leave in two writes and the server reads them apart. Here the caller queues HEADERS
//! and the one DATA frame together, and the connection task writes both at once. The server is
//! the same either way: same TLS, same HTTP/2, same gRPC framing, same authentication.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use hafen_proto::messaging::v1 as pb;
use hafen_testkit::TestStack;
use http::{HeaderValue, Request};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

const PATH: &str = "/hafen.messaging.v1.MessagingService/SendMessage";

/// One sender's connection to the messaging service.
pub(crate) struct LeanClient {
    h2: h2::client::SendRequest<Bytes>,
    uri: http::Uri,
}

impl LeanClient {
    /// Connects to the stack's messaging service over TLS (HTTP/2 by ALPN), trusting the
    /// stack's CA.
    pub(crate) async fn connect(stack: &TestStack) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(stack.secrets.ca_pem().as_bytes()) {
            roots.add(cert.expect("CA certificate")).expect("trust CA");
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let addr = stack.messaging.addr();
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let name = ServerName::try_from(hafen_platform::tls::DEV_SERVER_NAME).expect("name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let (h2, connection) = h2::client::handshake(tls).await.expect("HTTP/2 handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Self {
            h2,
            uri: format!("https://{addr}{PATH}").parse().expect("URI"),
        }
    }

    /// One SendMessage with `authorization` as its `authorization` header: the stored
    /// message, or what went wrong (an HTTP/2 error, or the gRPC status and its message).
    pub(crate) async fn send(
        &mut self,
        authorization: &HeaderValue,
        request: &pb::SendMessageRequest,
    ) -> Result<pb::Message, String> {
        let length = u32::try_from(request.encoded_len()).map_err(|e| e.to_string())?;
        let mut frame = BytesMut::with_capacity(5 + request.encoded_len());
        frame.put_u8(0); // not compressed
        frame.put_u32(length);
        request.encode(&mut frame).map_err(|e| e.to_string())?;
        let head = Request::post(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", authorization.clone())
            .body(())
            .map_err(|e| e.to_string())?;
        std::future::poll_fn(|cx| self.h2.poll_ready(cx))
            .await
            .map_err(|e| e.to_string())?;
        let (response, mut body) = self
            .h2
            .send_request(head, false)
            .map_err(|e| e.to_string())?;
        body.send_data(frame.freeze(), true)
            .map_err(|e| e.to_string())?;
        let (head, mut body) = response.await.map_err(|e| e.to_string())?.into_parts();
        if head.status != http::StatusCode::OK {
            return Err(format!("HTTP status {}", head.status));
        }
        let mut message = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            let _ = body.flow_control().release_capacity(chunk.len());
            message.extend_from_slice(&chunk);
        }
        // A failed call is trailers-only: its status is in the response's headers.
        let trailers = match body.trailers().await.map_err(|e| e.to_string())? {
            Some(trailers) => trailers,
            None => head.headers,
        };
        let text = |name: &str| {
            trailers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        match text("grpc-status").as_str() {
            "0" => {}
            status => return Err(format!("grpc-status {status}: {}", text("grpc-message"))),
        }
        match *message {
            [0, a, b, c, d, ref rest @ ..]
                if usize::try_from(u32::from_be_bytes([a, b, c, d])) == Ok(rest.len()) =>
            {
                pb::Message::decode(rest).map_err(|e| e.to_string())
            }
            _ => Err("not one uncompressed gRPC message".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::{group, users};
    use hafen_testkit::with_token;

    /// A send by the lean client is a SendMessage like any other: stored, in sequence, in
    /// the history the tonic client reads; a retry returns the same message; a bad token
    /// and a malformed id come back as their gRPC statuses.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_lean_client_sends_what_the_service_stores() {
        let stack = TestStack::start().await;
        let tenant = stack.create_tenant("bench").await;
        let owner = stack.login_owner(&tenant).await.access_token;
        let sender = users(&stack, &owner, 1).await.remove(0);
        let mut tonic = stack.messaging_client().await;
        let conversation = group(&mut tonic, &owner, vec![sender.user_id.clone()]).await;
        let authorization: HeaderValue = format!("Bearer {}", sender.token).parse().unwrap();
        let mut lean = LeanClient::connect(&stack).await;

        let mut request = pb::SendMessageRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            conversation_id: conversation.clone(),
            body: "first".into(),
        };
        let first = lean.send(&authorization, &request).await.unwrap();
        let retry = lean.send(&authorization, &request).await.unwrap();
        assert_eq!((first.sequence, &first.body), (1, &"first".to_owned()));
        assert_eq!(retry.message_id, first.message_id);
        request.request_id = uuid::Uuid::now_v7().to_string();
        request.body = "second".into();
        let second = lean.send(&authorization, &request).await.unwrap();
        assert_eq!(second.sequence, 2);

        let history = tonic
            .list_messages(with_token(
                &sender.token,
                pb::ListMessagesRequest {
                    conversation_id: conversation.clone(),
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .messages;
        let bodies: Vec<_> = history.iter().map(|m| m.body.as_str()).collect();
        assert_eq!(bodies, ["first", "second"]);

        let wrong: HeaderValue = "Bearer not-a-token".parse().unwrap();
        let error = lean.send(&wrong, &request).await.unwrap_err();
        assert!(error.starts_with("grpc-status 16"), "{error}");
        request.request_id = "not-an-id".into();
        let error = lean.send(&authorization, &request).await.unwrap_err();
        assert!(error.starts_with("grpc-status 3"), "{error}");
    }
}
