//! Logging and OpenTelemetry export.
//!
//! Logs go to standard error as JSON or human-readable lines. When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans and metrics are also exported over OTLP/gRPC.
//! Every RPC is a span ([`crate::metrics::GrpcMetricsLayer`] opens it), a child of the
//! caller's when the call carries W3C trace context (`traceparent`), and the calls one service
//! makes to another carry it ([`inject`]).
//! Only ids ever go into log fields and span attributes: never message bodies, passwords,
//! tokens or chat codes (BX5), at any level. Dependencies that log the values they handle
//! below INFO ([`VALUE_LOGGERS`]) are capped at INFO whatever the filter asks for.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, TelemetryArgs};
use crate::error::{Error, Result};

/// Keeps the exporters alive; [`TelemetryGuard::shutdown`] flushes what is buffered.
#[must_use = "dropping the guard without shutdown() may lose buffered spans"]
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl TelemetryGuard {
    /// Flushes and stops the exporters; the last step of an orderly shutdown.
    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer
            && let Err(err) = tracer.shutdown()
        {
            tracing::warn!(error = %err, "flushing traces failed");
        }
        if let Some(meter) = self.meter
            && let Err(err) = meter.shutdown()
        {
            tracing::warn!(error = %err, "flushing metrics failed");
        }
    }
}

/// Targets that log the values they handle at DEBUG or TRACE: `tokio_postgres` logs every
/// statement's bind parameters (password hashes, sealed bodies, token digests). Their events
/// below INFO are dropped even when `--log-filter` asks for them.
pub const VALUE_LOGGERS: &[&str] = &["tokio_postgres", "postgres_protocol"];

/// A global filter that drops [`VALUE_LOGGERS`]' events below INFO.
pub fn without_logged_values() -> FilterFn<impl Fn(&tracing::Metadata<'_>) -> bool + Clone> {
    tracing_subscriber::filter::filter_fn(|meta: &tracing::Metadata<'_>| {
        *meta.level() <= tracing::Level::INFO
            || !VALUE_LOGGERS
                .iter()
                .any(|target| meta.target().starts_with(target))
    })
}

/// Installs the global tracing subscriber for a process named `service` (e.g. `hafen-auth`).
///
/// Call once, from `main`, inside the Tokio runtime (the OTLP exporter needs it).
pub fn init(service: &'static str, args: &TelemetryArgs) -> Result<TelemetryGuard> {
    init_exporting(service, args, otlp_configured().then_some(None))
}

/// [`init`], exporting spans (only) to the OTLP/gRPC collector at `endpoint` whatever the
/// environment says: for tests that receive the spans themselves.
pub fn init_with_otlp_endpoint(
    service: &'static str,
    args: &TelemetryArgs,
    endpoint: &str,
) -> Result<TelemetryGuard> {
    init_exporting(service, args, Some(Some(endpoint)))
}

/// `otlp`: `None` exports nothing; `Some(None)` spans and metrics to where the environment
/// says; `Some(Some(endpoint))` spans to `endpoint`.
fn init_exporting(
    service: &'static str,
    args: &TelemetryArgs,
    otlp: Option<Option<&str>>,
) -> Result<TelemetryGuard> {
    use opentelemetry_otlp::WithExportConfig as _;
    install_crypto_provider();
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|err| Error::Config(format!("--log-filter: {err}")))?;
    let json = match args.log_format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt_json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
    });
    let fmt_pretty = (!json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));

    let mut guard = TelemetryGuard::default();
    let otel = if let Some(endpoint) = otlp {
        let resource = resource(service);
        let spans = match endpoint {
            Some(endpoint) => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build(),
            None => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build(),
        }
        .map_err(|err| Error::Telemetry(err.to_string()))?;
        let tracer_provider = SdkTracerProvider::builder()
            .with_batch_exporter(spans)
            .with_resource(resource.clone())
            .build();
        if endpoint.is_none() {
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(|err| Error::Telemetry(err.to_string()))?;
            let meter_provider = SdkMeterProvider::builder()
                .with_periodic_exporter(metrics)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_meter_provider(meter_provider.clone());
            guard.meter = Some(meter_provider);
        }
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let layer = tracing_opentelemetry::layer().with_tracer(tracer_provider.tracer(service));
        guard.tracer = Some(tracer_provider);
        Some(layer)
    } else {
        None
    };

    tracing_subscriber::registry()
        .with(filter)
        .with(without_logged_values())
        .with(fmt_json)
        .with(fmt_pretty)
        .with(otel)
        .try_init()
        .map_err(|err| Error::Telemetry(err.to_string()))?;
    if guard.tracer.is_some() {
        tracing::info!("exporting traces and metrics over OTLP");
    }
    Ok(guard)
}

fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

fn resource(service: &'static str) -> Resource {
    let builder = Resource::builder();
    // OTEL_SERVICE_NAME, when set, names the service; otherwise the binary's name does.
    if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder.build()
    } else {
        builder.with_service_name(service).build()
    }
}

/// The span of an RPC this server serves (none for health checks and reflection), a child of
/// the caller's span when `headers` carry W3C trace context. Its fields are ids only; the
/// handler records the tenant, user, conversation and request ids it learns
/// ([`record_ids`]).
pub fn server_span(service: &str, method: &str, headers: &http::HeaderMap) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    // Probes and reflection would only bury the traces that matter.
    if service.starts_with("grpc.") {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "rpc",
        otel.name = %format!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        tenant_id = tracing::field::Empty,
        user_id = tracing::field::Empty,
        conversation_id = tracing::field::Empty,
        request_id = tracing::field::Empty,
    );
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    });
    let _ = span.set_parent(parent);
    span
}

/// The span of a call this service makes to another one (`service`/`method`), in the current
/// span; [`inject`] its context into the request.
pub fn client_span(service: &str, method: &str) -> tracing::Span {
    tracing::info_span!(
        "rpc.call",
        otel.name = %format!("{service}/{method}"),
        otel.kind = "client",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    )
}

/// Puts the trace context of `span` into `request` (`traceparent`), so the service called
/// continues the trace.
pub fn inject<T>(span: &tracing::Span, request: &mut tonic::Request<T>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
    });
}

/// Records ids on the current RPC span: `("tenant_id", id)` and the like. Values are ids the
/// code has parsed, never content.
pub fn record_ids(ids: &[(&'static str, &dyn std::fmt::Display)]) {
    let span = tracing::Span::current();
    for (field, value) in ids {
        span.record(*field, tracing::field::display(value));
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Makes ring rustls's process-wide crypto provider, so no dependency can select another.
pub fn install_crypto_provider() {
    // Fails only when a provider is already installed, which is what we want either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
