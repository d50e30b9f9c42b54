//! The built widget, served at a fixed path: `/widget/hafen-widget.js` and
//! `/widget/hafen-widget.css` (built by `scripts/widget.sh build` from `web/widget/`), read
//! once at start from `--widget-dir`.
//!
//! - Pages of any site load them (`<script … crossorigin="anonymous" integrity="…">`):
//!   `Access-Control-Allow-Origin: *` lets the browser check the integrity of a cross-origin
//!   script, and no credentials are ever involved; `Cross-Origin-Resource-Policy:
//!   cross-origin` lets isolated pages embed them.
//! - They stay cached for a day (`max-age`) and are revalidated by their `ETag` (their SHA-384),
//!   so an upgrade reaches every visitor within a day while a page's `integrity` pins what it
//!   runs.
//! - Every answer of this path carries a strict `Content-Security-Policy` of its own (nothing
//!   may load, nothing may frame it), `nosniff` and `no-referrer`: opened directly, a file is
//!   inert.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::Bytes;
use futures::future::BoxFuture;
use http::{HeaderValue, Method, StatusCode, header};
use sha2::Digest as _;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::Error;

/// The files served, and their content types.
const FILES: [(&str, &str); 2] = [
    ("hafen-widget.js", "text/javascript; charset=utf-8"),
    ("hafen-widget.css", "text/css; charset=utf-8"),
];

/// How long browsers keep a file before asking whether it changed, in seconds.
const MAX_AGE: &str = "public, max-age=86400";

/// The policy of every answer here: a file opened directly loads and runs nothing.
const OWN_POLICY: &str = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'none'";

struct File {
    bytes: Bytes,
    content_type: &'static str,
    /// `"sha384-<base64>"`, quoted: the integrity a page names, and the entity tag.
    etag: HeaderValue,
}

/// The widget's files under `/widget/`; none when no directory was configured.
#[derive(Clone, Default)]
pub struct WidgetFiles {
    files: Arc<HashMap<&'static str, File>>,
}

impl NamedService for WidgetFiles {
    const NAME: &'static str = "widget";
}

impl WidgetFiles {
    /// Reads the built widget from `dir`: both files must be there.
    pub(crate) fn load(dir: &Path) -> Result<Self, Error> {
        let mut files = HashMap::new();
        for (name, content_type) in FILES {
            let path = dir.join(name);
            let bytes = std::fs::read(&path).map_err(|err| {
                Error::Config(format!(
                    "--widget-dir: cannot read {name} ({err}); build it with `scripts/widget.sh build`"
                ))
            })?;
            let digest = sha2::Sha384::digest(&bytes);
            let integrity = base64::engine::general_purpose::STANDARD.encode(digest);
            let etag = HeaderValue::from_str(&format!("\"sha384-{integrity}\""))
                .map_err(|err| Error::Config(format!("--widget-dir: {err}")))?;
            files.insert(
                name,
                File {
                    bytes: Bytes::from(bytes),
                    content_type,
                    etag,
                },
            );
        }
        Ok(Self {
            files: Arc::new(files),
        })
    }

    fn answer(&self, request: &http::Request<Body>) -> http::Response<Body> {
        let name = request.uri().path().strip_prefix("/widget/");
        let file = name.and_then(|name| self.files.get(name));
        let mut response = match (request.method(), file) {
            (_, None) => status(StatusCode::NOT_FOUND),
            (&Method::GET | &Method::HEAD, Some(file)) => {
                let unchanged = request
                    .headers()
                    .get(header::IF_NONE_MATCH)
                    .is_some_and(|tags| {
                        tags.as_bytes()
                            .split(|b| *b == b',')
                            .any(|tag| tag.trim_ascii() == file.etag.as_bytes())
                    });
                let mut response = if unchanged {
                    status(StatusCode::NOT_MODIFIED)
                } else if request.method() == Method::HEAD {
                    status(StatusCode::OK)
                } else {
                    http::Response::new(Body::new(http_body_util::Full::new(file.bytes.clone())))
                };
                let headers = response.headers_mut();
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(file.content_type),
                );
                if !unchanged {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(file.bytes.len()));
                }
                headers.insert(header::ETAG, file.etag.clone());
                headers.insert(header::CACHE_CONTROL, HeaderValue::from_static(MAX_AGE));
                headers.insert(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    HeaderValue::from_static("*"),
                );
                headers.insert(
                    "cross-origin-resource-policy",
                    HeaderValue::from_static("cross-origin"),
                );
                response
            }
            (_, Some(_)) => {
                let mut response = status(StatusCode::METHOD_NOT_ALLOWED);
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                response
            }
        };
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(OWN_POLICY),
        );
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        response
    }
}

fn status(status: StatusCode) -> http::Response<Body> {
    let mut response = http::Response::new(Body::default());
    *response.status_mut() = status;
    response
}

impl tonic::codegen::Service<http::Request<Body>> for WidgetFiles {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let response = self.answer(&request);
        Box::pin(async move { Ok(response) })
    }
}
