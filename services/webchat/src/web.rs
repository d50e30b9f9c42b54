//! The visitor service for browsers: gRPC-Web ([`tonic_web`]) under a path of the widget's
//! own, `/w/{widget id}/hafen.webchat.v1.VisitorService/{method}`, so that CORS is answered per
//! widget from its allowed origins — the preflight too, which carries no header values a
//! widget could be told by. A page embeds the widget with `data-endpoint` and `data-widget`;
//! the widget's client takes `{endpoint}/w/{widget}` as its base URL.
//!
//! - A preflight (`OPTIONS`) from an origin the widget allows, while it serves visitors (or
//!   whatever its state, for the data-rights calls, as the contract says), gets `204` with `Access-Control-Allow-Origin` naming that origin (never `*`: nothing is
//!   sent with cookies; the visitor token travels in `authorization`), the method, the headers
//!   a gRPC-Web client sends, and a lifetime; any other gets `403` and no CORS header. Each
//!   preflight counts as an unauthenticated lookup of its client address.
//! - A call with an `Origin` the widget does not allow gets `403` before anything is read; an
//!   allowed one is translated to gRPC and handled like any other call (which checks the
//!   `Origin` again, against the widget of its token or request), and its answer carries the
//!   CORS headers. A call without `Origin` (not a browser) passes on to the same checks.
//!
//! Only the visitor service is served here; widgets are managed with native gRPC.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use hafen_platform::web::{ALLOWED_HEADERS, EXPOSED_HEADERS, PREFLIGHT_MAX_AGE};
use hafen_proto::webchat::v1::visitor_service_server::VisitorServiceServer;
use http::{HeaderValue, Method, StatusCode, header};
use tonic::body::Body;
use tonic::server::NamedService;
use tower_layer::Layer as _;
use uuid::Uuid;

use crate::{Service, VisitorApi};

/// The visitor service as the router sees it: checked against the contract, then handled.
type Visitors = hafen_platform::check::Checked<VisitorServiceServer<VisitorApi>>;

/// The service path the widgets' paths lead to.
const VISITOR_SERVICE: &str = "/hafen.webchat.v1.VisitorService/";

/// The data-rights calls, which the contract keeps working whatever the state of the widget:
/// from its allowed origins, they are served even while it is switched off.
const DATA_RIGHTS: [&str; 4] = ["GetMyData", "CorrectMyData", "ExportMyData", "DeleteMyData"];

/// The visitor service for browsers, routed under `/w/`.
#[derive(Clone)]
pub struct WidgetPaths {
    service: Arc<Service>,
    visitors: tonic_web::GrpcWebService<Visitors>,
}

impl NamedService for WidgetPaths {
    const NAME: &'static str = "w";
}

impl WidgetPaths {
    pub(crate) fn new(service: Arc<Service>) -> Self {
        let visitors = hafen_platform::check::Checked::new(
            VisitorServiceServer::new(VisitorApi::new(Arc::clone(&service))),
            hafen_platform::check::DEFAULT_MAX_REQUEST_BYTES,
            &[],
        );
        Self {
            service,
            visitors: tonic_web::GrpcWebLayer::new().layer(visitors),
        }
    }
}

/// The widget and the service path of `/w/{widget}/hafen.webchat.v1.VisitorService/{method}`.
fn widget_path(path: &str) -> Option<(Uuid, &str)> {
    let rest = path.strip_prefix("/w/")?;
    let slash = rest.find('/')?;
    let widget = Uuid::try_parse(rest.get(..slash)?).ok()?;
    let method = rest.get(slash..)?;
    (method.starts_with(VISITOR_SERVICE) && method.len() > VISITOR_SERVICE.len())
        .then_some((widget, method))
}

/// Whether a page of `origin` may call `method` (a service path) of `widget` now.
async fn allowed(service: &Service, widget: Uuid, method: &str, origin: &str) -> bool {
    let name = method.strip_prefix(VISITOR_SERVICE).unwrap_or_default();
    if DATA_RIGHTS.contains(&name) {
        service.widget_in_any_state(widget, origin).await.is_ok()
    } else {
        service.live_widget(widget, Some(origin)).await.is_ok()
    }
}

fn empty(status: StatusCode) -> http::Response<Body> {
    let mut response = http::Response::new(Body::default());
    *response.status_mut() = status;
    response
}

impl tonic::codegen::Service<http::Request<Body>> for WidgetPaths {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let service = Arc::clone(&self.service);
        let mut visitors = self.visitors.clone();
        Box::pin(async move {
            let Some((widget, method)) = widget_path(request.uri().path()) else {
                return Ok(empty(StatusCode::NOT_FOUND));
            };
            let method = method.to_owned();
            let origin = request
                .headers()
                .get(header::ORIGIN)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            if request.method() == Method::OPTIONS {
                let lookup = tonic::Request::from_http(request.map(|_| ()));
                if service.limits.count_lookup(&lookup).is_err() {
                    return Ok(empty(StatusCode::TOO_MANY_REQUESTS));
                }
                let Some(origin) = origin else {
                    return Ok(empty(StatusCode::FORBIDDEN));
                };
                if !allowed(&service, widget, &method, &origin).await {
                    return Ok(empty(StatusCode::FORBIDDEN));
                }
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
            if let Some(origin) = &origin
                && !allowed(&service, widget, &method, origin).await
            {
                return Ok(empty(StatusCode::FORBIDDEN));
            }
            let Ok(uri) = http::Uri::builder().path_and_query(method).build() else {
                return Ok(empty(StatusCode::NOT_FOUND));
            };
            *request.uri_mut() = uri;
            std::future::poll_fn(|cx| {
                tonic::codegen::Service::<http::Request<Body>>::poll_ready(&mut visitors, cx)
            })
            .await?;
            let mut response = visitors.call(request).await?;
            if let Some(origin) = &origin {
                let headers = response.headers_mut();
                allow(headers, origin);
                headers.insert(
                    header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    HeaderValue::from_static(EXPOSED_HEADERS),
                );
            }
            Ok(response)
        })
    }
}

/// Allows `origin` (and says the answer depends on it, for caches).
fn allow(headers: &mut http::HeaderMap, origin: &str) {
    if let Ok(value) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
    headers.insert(header::VARY, HeaderValue::from_static("origin"));
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    /// Only the visitor service's methods under a widget's id are served.
    #[test]
    fn a_widget_path_names_a_widget_and_a_visitor_method() {
        let widget = Uuid::now_v7();
        let path = format!("/w/{widget}/hafen.webchat.v1.VisitorService/StartVisit");
        assert_eq!(
            super::widget_path(&path),
            Some((widget, "/hafen.webchat.v1.VisitorService/StartVisit"))
        );
        for bad in [
            format!("/w/{widget}/hafen.webchat.v1.WidgetService/ListWidgets"),
            format!("/w/{widget}/hafen.webchat.v1.VisitorService/"),
            "/w/not-a-uuid/hafen.webchat.v1.VisitorService/StartVisit".to_owned(),
            format!("/x/{widget}/hafen.webchat.v1.VisitorService/StartVisit"),
            "/w/".to_owned(),
        ] {
            assert_eq!(super::widget_path(&bad), None, "{bad}");
        }
    }
}
