//! The demo organisation's website (`hafen dev --demo` with `--widget-dir`): a page on an
//! origin of its own, `https://localhost:<demo page port>`, that embeds the demo widget the
//! way a customer's site does — one script tag with its Subresource Integrity hash — under a
//! strict Content-Security-Policy that lets the page load and connect to the Hafen endpoint
//! only, so a widget that reached for anything else would break visibly. `/privacy` is the
//! privacy page the widget links to.
//!
//! The same page reached as `https://127.0.0.1:<port>` is another origin, which the widget
//! does not allow: what a page of a foreign site gets (nothing).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use http_body_util::Full;
use sha2::Digest as _;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a connection may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the page needs to embed the widget.
#[derive(Clone, Debug)]
pub struct Embed {
    /// The webchat service as browsers reach it, `https://host:port`.
    pub endpoint: String,
    /// The demo widget's id.
    pub widget: String,
    /// `sha384-…` of the served `hafen-widget.js`.
    pub integrity: String,
}

impl Embed {
    /// The embed of `widget` served by `endpoint` from the built files in `widget_dir`.
    pub fn new(
        endpoint: String,
        widget: String,
        widget_dir: &std::path::Path,
    ) -> std::io::Result<Self> {
        let script = std::fs::read(widget_dir.join("hafen-widget.js"))?;
        let integrity = format!(
            "sha384-{}",
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha384::digest(&script))
        );
        Ok(Self {
            endpoint,
            widget,
            integrity,
        })
    }
}

/// The demo page's HTML.
fn page(embed: &Embed) -> String {
    let Embed {
        endpoint,
        widget,
        integrity,
    } = embed;
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Demo Organisation</title>
</head>
<body>
<main>
<h1>Demo Organisation</h1>
<p>This is the demo organisation's website. Its chat (bottom right) is Hafen's widget:
nothing is stored in your browser until you open it.</p>
<p><a href="/privacy">Privacy policy</a></p>
</main>
<script src="{endpoint}/widget/hafen-widget.js" data-widget="{widget}" data-endpoint="{endpoint}" integrity="{integrity}" crossorigin="anonymous" defer></script>
</body>
</html>
"#
    )
}

const PRIVACY: &str = r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Privacy policy (demo)</title></head>
<body>
<h1>Privacy policy (demo)</h1>
<p>The demo organisation's chat is run by Hafen. What you enter is stored to answer you, for
30 days after your last visit; you can see, correct, download and delete it in the chat.</p>
<p><a href="/">Back</a></p>
</body>
</html>
"#;

/// The page's policy: scripts, styles and connections to the Hafen endpoint only.
fn policy(endpoint: &str) -> String {
    format!(
        "default-src 'none'; script-src {endpoint}; style-src {endpoint}; \
         connect-src {endpoint}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

fn answer(embed: &Embed, request: &http::Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let body = match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => Some(page(embed)),
        (&Method::GET, "/privacy") => Some(PRIVACY.to_owned()),
        _ => None,
    };
    let mut response = match body {
        Some(body) => Response::new(Full::new(Bytes::from(body))),
        None => {
            let mut response = Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(policy) = HeaderValue::from_str(&policy(&embed.endpoint)) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Serves the demo page on `listener` over TLS (`tls`, with ALPN already set) until the task
/// is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, embed: Embed) {
    let acceptor = TlsAcceptor::from(tls);
    let embed = Arc::new(embed);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (acceptor, embed) = (acceptor.clone(), Arc::clone(&embed));
        tokio::spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |request| {
                let response = answer(&embed, &request);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
        });
    }
}
