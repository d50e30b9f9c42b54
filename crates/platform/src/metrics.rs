//! Prometheus metrics (DESIGN "Operation"): every Hafen process records through the `metrics`
//! facade into one Prometheus recorder, and serves it as `/metrics` over plain HTTP on a port
//! of its own (`--metrics-listen`).
//!
//! Labels carry names the code chooses (services, methods, status codes, database names),
//! never a user, a tenant or anything from a request's content: a caller cannot make new
//! series appear.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Bucket bounds of the `_seconds` histograms: 0.5 ms to 30 s.
const SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0,
];

/// Bucket bounds of the batch-size histograms.
const SIZE_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// How often histograms are folded (the recorder's upkeep).
const UPKEEP: Duration = Duration::from_secs(5);

/// The process's recorder, installed on first use; `None` if another recorder was installed
/// first (the process then records into that one).
pub fn handle() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_batch_size".into()), &SIZE_BUCKETS)
                })
                .and_then(PrometheusBuilder::install_recorder);
            match built {
                Ok(handle) => {
                    describe();
                    let upkeep = handle.clone();
                    let _ = std::thread::Builder::new()
                        .name("hafen-metrics".into())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(UPKEEP);
                                upkeep.run_upkeep();
                            }
                        });
                    Some(handle)
                }
                Err(err) => {
                    tracing::warn!(error = %err, "metrics recorder not installed");
                    None
                }
            }
        })
        .clone()
}

/// Describes the metrics every service may record, with their units.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "grpc_server_started_total",
        "RPCs started on the server, by service, method and type."
    );
    describe_counter!(
        "grpc_server_handled_total",
        "RPCs completed on the server, by service, method, type and status code."
    );
    describe_histogram!(
        "grpc_server_handling_seconds",
        Unit::Seconds,
        "Time from an RPC's start to its last response byte (a stream's whole life)."
    );
    describe_gauge!(
        "hafen_db_pool_connections",
        "Connections of a pool, by service, database, pool and state (in_use, idle)."
    );
    describe_gauge!(
        "hafen_db_pool_max_connections",
        "Most connections a pool opens."
    );
    describe_gauge!(
        "hafen_db_pool_waiting",
        "Requests waiting for a connection of a pool."
    );
    describe_histogram!(
        "hafen_db_pool_wait_seconds",
        Unit::Seconds,
        "Time a request waited for a tenant or control-plane connection."
    );
    describe_histogram!(
        "hafen_commit_batch_size",
        "Writes committed together in one group-commit batch."
    );
    describe_histogram!(
        "hafen_commit_seconds",
        Unit::Seconds,
        "Duration of one group-commit batch, from its start to PostgreSQL's answer."
    );
    describe_gauge!(
        "hafen_open_streams",
        "Open streams of signed-in users, whose sessions are watched for revocation."
    );
    describe_gauge!(
        "hafen_outbox_backlog",
        "Audit events waiting in a database's outbox (counted up to 100000)."
    );
    describe_gauge!(
        "hafen_outbox_relay_lag_seconds",
        Unit::Seconds,
        "Age of the oldest audit event of the last batch relayed from a database's outbox."
    );
    describe_counter!(
        "hafen_outbox_relayed_total",
        "Audit events relayed from the outboxes to the audit service."
    );
    describe_histogram!(
        "hafen_fanout_lag_seconds",
        Unit::Seconds,
        "Time from a message's commit to its announcement reaching this process over Redis."
    );
    describe_counter!(
        "hafen_purge_deleted_total",
        "Rows the retention purge deleted or emptied, by kind."
    );
    describe_counter!("hafen_purge_runs_total", "Completed purge runs.");
    describe_gauge!(
        "hafen_purge_last_run_timestamp_seconds",
        Unit::Seconds,
        "When the last purge run ended (Unix time)."
    );
}

/// Serves `/metrics` of this process on `listener` (plain HTTP/1.1) until the task is
/// dropped or aborted. Any other path is 404.
pub async fn serve(listener: tokio::net::TcpListener) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let Some(handle) = handle() else {
        return;
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::debug!(error = %err, "metrics connection not accepted");
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<_>| {
                let handle = handle.clone();
                async move {
                    let response = if request.uri().path() == "/metrics" {
                        http::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(handle.render())))
                    } else {
                        http::Response::builder()
                            .status(http::StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::new()))
                    };
                    response.map_err(|err| std::io::Error::other(err.to_string()))
                }
            });
            let served = tokio::time::timeout(
                Duration::from_secs(30),
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            )
            .await;
            if let Ok(Err(err)) = served {
                tracing::debug!(error = %err, "metrics connection ended");
            }
        });
    }
}

/// Records `grpc_server_started_total`, `grpc_server_handled_total` and
/// `grpc_server_handling_seconds` for every call of the services it wraps (the go-grpc
/// middleware's names and labels, which dashboards expect). A call to a path that names no
/// method of `services` counts as service and method `unknown`.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    services: std::sync::Arc<Vec<&'static str>>,
}

impl GrpcMetricsLayer {
    /// Counts calls of the gRPC services named `services` (and health and reflection).
    pub fn new(services: &[&'static str]) -> Self {
        Self {
            services: std::sync::Arc::new(services.to_vec()),
        }
    }
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            services: self.services.clone(),
        }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    services: std::sync::Arc<Vec<&'static str>>,
}

/// The labels of one call: service, method and type, as Prometheus sees them.
#[derive(Clone)]
struct CallLabels {
    service: String,
    method: String,
    kind: &'static str,
}

impl CallLabels {
    fn of(path: &str, services: &[&'static str]) -> Self {
        let unknown = || Self {
            service: "unknown".into(),
            method: "unknown".into(),
            kind: "unknown",
        };
        // Browsers reach the website chat's visitor service under a widget's path
        // (`/w/<widget>/<service>/<method>`): counted as that method, the widget left out.
        let path = path
            .strip_prefix("/w/")
            .and_then(|rest| rest.find('/').map(|at| &rest[at..]))
            .unwrap_or(path);
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return unknown();
        };
        let kind = match (service, method) {
            ("grpc.health.v1.Health", "Check") => Some("unary"),
            ("grpc.health.v1.Health", "Watch") => Some("server_stream"),
            (
                "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
                "ServerReflectionInfo",
            ) => Some("bidi_stream"),
            _ if services.contains(&service) => crate::check::method_kind(service, method),
            _ => None,
        };
        match kind {
            Some(kind) => Self {
                service: service.to_owned(),
                method: method.to_owned(),
                kind,
            },
            None => unknown(),
        }
    }

    fn handled(&self, code: &'static str, since: std::time::Instant) {
        metrics::counter!(
            "grpc_server_handled_total",
            "grpc_service" => self.service.clone(),
            "grpc_method" => self.method.clone(),
            "grpc_type" => self.kind,
            "grpc_code" => code,
        )
        .increment(1);
        metrics::histogram!(
            "grpc_server_handling_seconds",
            "grpc_service" => self.service.clone(),
            "grpc_method" => self.method.clone(),
            "grpc_type" => self.kind,
        )
        .record(since.elapsed().as_secs_f64());
    }
}

/// The name Prometheus' gRPC metrics give a status code (`grpc-status` header value).
fn code_name(value: &[u8]) -> &'static str {
    let code = std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map_or(tonic::Code::Unknown, tonic::Code::from);
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Canceled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    }
}

impl<S, ReqBody, ResBody> tonic::codegen::Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: tonic::codegen::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: hyper::body::Body<Data = hyper::body::Bytes> + Send + Unpin + 'static,
    ResBody::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let labels = CallLabels::of(request.uri().path(), &self.services);
        metrics::counter!(
            "grpc_server_started_total",
            "grpc_service" => labels.service.clone(),
            "grpc_method" => labels.method.clone(),
            "grpc_type" => labels.kind,
        )
        .increment(1);
        let since = std::time::Instant::now();
        let span =
            crate::telemetry::server_span(&labels.service, &labels.method, request.headers());
        let called = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(tracing::Instrument::instrument(
            async move {
                // A call dropped before its answer (the client went away, or its deadline
                // passed) is counted by the guard.
                let mut pending = MeteredBody {
                    inner: (),
                    call: Some((labels, since)),
                    code: None,
                    grpc_web: false,
                };
                let response = called.await?;
                // A trailers-only answer (an error before any message) has its status here.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .map(|v| code_name(v.as_bytes()));
                // gRPC-Web carries the trailers in the body, as a frame of their own.
                let grpc_web = response
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc-web"));
                let call = pending.call.take();
                Ok(response.map(|inner| {
                    tonic::body::Body::new(MeteredBody {
                        inner,
                        call,
                        code,
                        grpc_web,
                    })
                }))
            },
            span,
        ))
    }
}

/// A response body that records the call as handled once its status is known: from the
/// trailers, from the headers of a trailers-only answer, or `Canceled` when the body is
/// dropped before its end (the client went away).
pub struct MeteredBody<B> {
    inner: B,
    call: Option<(CallLabels, std::time::Instant)>,
    code: Option<&'static str>,
    /// The answer is gRPC-Web: its status comes in a trailer frame of the body.
    grpc_web: bool,
}

impl<B> MeteredBody<B> {
    fn finish(&mut self, code: &'static str) {
        if let Some((labels, since)) = self.call.take() {
            labels.handled(code, since);
        }
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        let code = self.code.unwrap_or("Canceled");
        self.finish(code);
    }
}

/// The status in a gRPC-Web trailer frame (flag byte 0x80, length, then `name: value` lines),
/// if `data` is one.
fn grpc_web_status(data: &[u8]) -> Option<&'static str> {
    if data.first() != Some(&0x80) {
        return None;
    }
    let text = std::str::from_utf8(data.get(5..)?).ok()?;
    text.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("grpc-status")
            .then(|| code_name(value.trim().as_bytes()))
    })
}

impl<B> hyper::body::Body for MeteredBody<B>
where
    B: hyper::body::Body<Data = hyper::body::Bytes> + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if self.grpc_web
                    && let Some(code) = frame.data_ref().and_then(|data| grpc_web_status(data))
                {
                    self.finish(code);
                }
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers
                        .get("grpc-status")
                        .map_or("Unknown", |v| code_name(v.as_bytes()));
                    self.finish(code);
                }
            }
            std::task::Poll::Ready(Some(Err(_))) => self.finish("Unknown"),
            std::task::Poll::Ready(None) => {
                let code = self.code.unwrap_or("Unknown");
                self.finish(code);
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::{CallLabels, grpc_web_status};

    /// A gRPC-Web answer's status is read from its trailer frame.
    #[test]
    fn dc5_a_grpc_web_trailer_frame_gives_the_status() {
        let frame = |text: &str| {
            let mut frame = vec![0x80];
            frame.extend(u32::try_from(text.len()).unwrap().to_be_bytes());
            frame.extend(text.as_bytes());
            frame
        };
        assert_eq!(grpc_web_status(&frame("grpc-status:0\r\n")), Some("OK"));
        assert_eq!(
            grpc_web_status(&frame("grpc-message:no\r\nGrpc-Status: 5\r\n")),
            Some("NotFound")
        );
        assert_eq!(grpc_web_status(&frame("grpc-message:x\r\n")), None);
        // A message frame (flag 0) is no trailer frame, whatever it holds.
        let mut message = frame("grpc-status:0\r\n");
        message[0] = 0;
        assert_eq!(grpc_web_status(&message), None);
    }

    /// Only methods the server has become label values: a made-up path cannot add series,
    /// and a widget's path counts as the visitor service's method.
    #[test]
    fn dc5_call_labels_name_known_methods_only() {
        let services = [
            "hafen.messaging.v1.MessagingService",
            "hafen.webchat.v1.VisitorService",
        ];
        let labels = CallLabels::of(
            "/hafen.messaging.v1.MessagingService/SendMessage",
            &services,
        );
        assert_eq!(
            (labels.service.as_str(), labels.method.as_str(), labels.kind),
            (
                "hafen.messaging.v1.MessagingService",
                "SendMessage",
                "unary"
            )
        );
        let stream = CallLabels::of("/hafen.messaging.v1.MessagingService/Subscribe", &services);
        assert_eq!(stream.kind, "server_stream");
        let widget = CallLabels::of(
            "/w/6f1c1d52-3c43-4c8c-9a59-2f4f3e5b2a10/hafen.webchat.v1.VisitorService/StartVisit",
            &services,
        );
        assert_eq!(widget.method, "StartVisit");
        for made_up in [
            "/hafen.messaging.v1.MessagingService/NoSuchMethod",
            "/hafen.auth.v1.AuthService/Login",
            "/x/y/z",
            "/",
            "",
        ] {
            let labels = CallLabels::of(made_up, &services);
            assert_eq!(
                (labels.service.as_str(), labels.method.as_str()),
                ("unknown", "unknown"),
                "{made_up}"
            );
        }
    }
}
