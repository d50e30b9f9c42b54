//! gRPC-Web for the messenger's browser clients, on a service's own paths (auth, messaging):
//! [`tonic_web`] translates, and CORS is answered for the web apps' origins an operator names
//! (`--browser-origins`) and no other.
//!
//! - A preflight (`OPTIONS`) from a named origin gets `204` with `Access-Control-Allow-Origin`
//!   naming it (never `*`, and no credentials: tokens travel in `authorization`), `POST`, the
//!   headers a gRPC-Web client sends and a lifetime; any other gets `403`.
//! - A call with an `Origin` not named gets `403` before anything of it is read; a named one is
//!   translated and handled, and its answer carries the CORS headers. A call without `Origin`
//!   (not a browser) is served as before, gRPC-Web or not.
//!
//! With no origin named, nothing changes: the layer passes every call through untouched.
//! (The webchat service answers CORS per widget instead, under the widget's own path.)

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderValue, Method, StatusCode, header};
use tower_layer::Layer;

/// The request headers a gRPC-Web client sends.
pub const ALLOWED_HEADERS: &str = "authorization, content-type, x-grpc-web, x-user-agent, \
     grpc-timeout, connect-protocol-version, connect-timeout-ms";

/// The response headers a gRPC-Web client reads.
pub const EXPOSED_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin";

/// How long a browser may keep a preflight's answer, in seconds.
pub const PREFLIGHT_MAX_AGE: &str = "600";

/// Which web apps may call a service from a browser.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct BrowserArgs {
    /// Origins of the web apps that may call this service from a browser with gRPC-Web,
    /// comma-separated, each exactly `https://host[:port]`. None by default: browsers get no
    /// CORS answer, and other clients are not affected either way.
    #[arg(long, env = "HAFEN_BROWSER_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub browser_origins: Vec<String>,
}

/// An origin as browsers send it: `https://`, a lowercase host, an optional port, nothing else.
fn parse_origin(text: &str) -> Result<String, String> {
    let refused = || format!("not an origin like https://app.example.com[:8443]: {text:.40}");
    let rest = text.strip_prefix("https://").ok_or_else(refused)?;
    let (host, port) = match rest.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => (host, Some(port)),
        _ => (rest, None),
    };
    let host_ok = !host.is_empty()
        && host.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'[' | b']')
        });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if host_ok && port_ok {
        Ok(text.to_owned())
    } else {
        Err(refused())
    }
}

/// Adds gRPC-Web with CORS for `origins` to a server's services.
#[derive(Clone, Debug, Default)]
pub struct BrowserLayer {
    origins: Option<Arc<[String]>>,
}

impl BrowserLayer {
    /// gRPC-Web for `origins`; none: the layer does nothing.
    pub fn new(origins: &[String]) -> Self {
        Self {
            origins: (!origins.is_empty()).then(|| origins.into()),
        }
    }
}

impl<S: Clone> Layer<S> for BrowserLayer {
    type Service = Browsers<S>;

    fn layer(&self, inner: S) -> Browsers<S> {
        Browsers {
            web: tonic_web::GrpcWebLayer::new().layer(inner.clone()),
            inner,
            origins: self.origins.clone(),
        }
    }
}

/// A service with gRPC-Web and CORS for the configured origins.
#[derive(Clone, Debug)]
pub struct Browsers<S> {
    inner: S,
    web: tonic_web::GrpcWebService<S>,
    origins: Option<Arc<[String]>>,
}

fn empty(status: StatusCode) -> http::Response<Body> {
    let mut response = http::Response::new(Body::default());
    *response.status_mut() = status;
    response
}

/// Allows `origin` (and says the answer depends on it, for caches).
fn allow(headers: &mut http::HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.insert(header::VARY, HeaderValue::from_static("origin"));
}

impl<S> Service<http::Request<Body>> for Browsers<S>
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
        let inner = std::mem::replace(&mut self.inner, clone);
        let Some(origins) = self.origins.clone() else {
            let mut inner = inner;
            return Box::pin(inner.call(request));
        };
        let mut web = self.web.clone();
        Box::pin(async move {
            let origin = request.headers().get(header::ORIGIN).cloned();
            let Some(origin) = origin else {
                std::future::poll_fn(|cx| Service::<http::Request<Body>>::poll_ready(&mut web, cx))
                    .await?;
                return web.call(request).await;
            };
            let named = origin
                .to_str()
                .is_ok_and(|origin| origins.iter().any(|o| o == origin));
            if !named {
                return Ok(empty(StatusCode::FORBIDDEN));
            }
            if request.method() == Method::OPTIONS {
                let mut response = empty(StatusCode::NO_CONTENT);
                let headers = response.headers_mut();
                allow(headers, &origin);
                headers.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("POST"),
                );
                headers.insert(
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static(ALLOWED_HEADERS),
                );
                headers.insert(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static(PREFLIGHT_MAX_AGE),
                );
                return Ok(response);
            }
            std::future::poll_fn(|cx| Service::<http::Request<Body>>::poll_ready(&mut web, cx))
                .await?;
            let mut response = web.call(request).await?;
            let headers = response.headers_mut();
            allow(headers, &origin);
            headers.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSED_HEADERS),
            );
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn browser_origins_are_exact_https_origins() {
        for good in [
            "https://app.example.com",
            "https://app.example.com:8443",
            "https://localhost:8443",
            "https://127.0.0.1",
        ] {
            assert_eq!(super::parse_origin(good).as_deref(), Ok(good), "{good}");
        }
        for bad in [
            "http://app.example.com",
            "https://app.example.com/",
            "https://App.example.com",
            "https://*.example.com",
            "https://app.example.com:0",
            "https://app.example.com:99999",
            "https://",
            "app.example.com",
        ] {
            assert!(super::parse_origin(bad).is_err(), "{bad}");
        }
    }
}
