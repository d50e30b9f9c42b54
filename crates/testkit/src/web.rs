//! A browser's side of HTTP, for tests of what browsers call: TLS with the development CA
//! offering the ALPN protocols a browser does, requests over HTTP/2 (`h2`) or HTTP/1.1 with the
//! whole answer read, and gRPC-Web's framing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failed step must fail the test"
)]

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A TLS connection to `addr`, whose certificate `ca_pem` signs for the development name,
/// offering `alpn` (a browser offers `h2` and `http/1.1`).
pub async fn connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(hafen_platform::tls::DEV_SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

/// A browser's HTTP/2 connection to `addr` (it offers HTTP/1.1 too, and must get HTTP/2).
pub async fn h2(addr: std::net::SocketAddr, ca_pem: &str) -> h2::client::SendRequest<Bytes> {
    let tls = connect(addr, ca_pem, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (h2, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    h2
}

/// An answer: its status, headers, and its body's bytes.
pub struct Answer {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// A header's value, if it is text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends `request` with `body` on an HTTP/2 connection; the whole answer.
pub async fn send(
    h2: &mut h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
    body: Option<Bytes>,
) -> Answer {
    std::future::poll_fn(|cx| h2.poll_ready(cx)).await.unwrap();
    let (response, mut stream) = h2.send_request(request, body.is_none()).unwrap();
    if let Some(body) = body {
        // A server may answer (a refusal, say) and close the stream before reading the body, as
        // it would for a browser; then the answer, read next, is what counts.
        let _ = stream.send_data(body, true);
    }
    let (head, mut body) = response.await.unwrap().into_parts();
    let mut bytes = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    Answer {
        status: head.status,
        headers: head.headers,
        body: bytes.freeze(),
    }
}

/// A message as the one gRPC-Web frame of a request body.
pub fn frame<M: Message>(message: &M) -> Bytes {
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(u32::try_from(message.encoded_len()).unwrap());
    message.encode(&mut frame).unwrap();
    frame.freeze()
}

/// The message and the `grpc-status` of a gRPC-Web answer: from its trailer frame, or its
/// headers for an answer without a message.
pub fn frames(answer: &Answer) -> (Option<Bytes>, Option<String>) {
    let (mut data, mut status) = (None, answer.header("grpc-status").map(str::to_owned));
    let mut body = answer.body.clone();
    while body.remaining() >= 5 {
        let flag = body.get_u8();
        let length = body.get_u32() as usize;
        let payload = body.split_to(length);
        if flag & 0x80 == 0 {
            data = Some(payload);
        } else {
            let trailers = String::from_utf8_lossy(&payload).to_string();
            status = trailers
                .lines()
                .find_map(|line| line.strip_prefix("grpc-status:"))
                .map(|s| s.trim().to_owned());
        }
    }
    (data, status)
}

/// An HTTP/1.1 request over `tls` (the connection closes after it) and its answer, the
/// chunked body decoded.
pub async fn http1(mut tls: TlsStream<TcpStream>, head: &str, body: &[u8]) -> Answer {
    let mut request = format!(
        "{head}content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    tls.write_all(&request).await.unwrap();
    let mut raw = Vec::new();
    // A peer closing without close_notify is an error rustls reports after the data.
    let _ = tls.read_to_end(&mut raw).await;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 "), "{status_line}");
    let status = http::StatusCode::from_bytes(&status_line.as_bytes()[9..12]).unwrap();
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        headers.append(
            http::HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
            http::HeaderValue::from_str(value.trim()).unwrap(),
        );
    }
    let mut rest = &raw[split + 4..];
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v == "chunked")
    {
        let mut body = BytesMut::new();
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..end]).unwrap().trim(), 16)
                .unwrap();
            rest = &rest[end + 2..];
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body.freeze()
    } else {
        Bytes::copy_from_slice(rest)
    };
    Answer {
        status,
        headers,
        body,
    }
}
