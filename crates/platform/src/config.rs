//! Command-line and environment configuration shared by every service.
//!
//! Each service flattens [`ServerArgs`] into its own clap struct; every flag can also be set
//! through the `HAFEN_*` environment variable named in its `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// How a service serves gRPC: TLS material and the shutdown drain.
#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    pub tls: TlsArgs,

    /// How long in-flight calls and streams may run after SIGTERM/SIGINT before they are cut off.
    #[arg(
        long,
        env = "HAFEN_DRAIN_TIMEOUT",
        default_value = "30s",
        value_parser = humantime::parse_duration,
    )]
    pub drain_timeout: Duration,

    /// Address to serve `grpc.health.v1` on as well, in plaintext and nothing else: for
    /// probes that speak no TLS (Kubernetes' native gRPC probe). Unset: none.
    #[arg(long, env = "HAFEN_HEALTH_LISTEN")]
    pub health_listen: Option<std::net::SocketAddr>,

    /// Address to serve Prometheus metrics on, as `/metrics` over plain HTTP. Unset: none
    /// (they are still recorded).
    #[arg(long, env = "HAFEN_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// TLS for the service's listener and for its calls to other Hafen services.
///
/// Without `--tls-cert`/`--tls-key`, a development CA and one certificate per service are
/// generated under `--dev-certs-dir` (once; later starts reuse them). Production deployments
/// always configure certificates explicitly.
#[derive(Args, Clone, Debug)]
pub struct TlsArgs {
    /// PEM certificate chain this service presents to clients (and to peers with --mtls).
    #[arg(long, env = "HAFEN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "HAFEN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificate of the CA that signs Hafen's service certificates. Peers are verified
    /// against it; with --mtls, client certificates too.
    #[arg(long, env = "HAFEN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Mutual TLS between services: verify client certificates presented to this service
    /// against --tls-ca (clients without one, such as SDKs, still connect), and present this
    /// service's certificate when calling other services. With `false`, internal calls such
    /// as Introspect can neither be made nor accepted.
    #[arg(long, env = "HAFEN_MTLS", default_value_t = true, action = clap::ArgAction::Set)]
    pub mtls: bool,

    /// Where development certificates are generated when --tls-cert is not given.
    #[arg(long, env = "HAFEN_DEV_CERTS_DIR", default_value = ".dev/certs")]
    pub dev_certs_dir: PathBuf,
}

/// Logging and trace export.
///
/// Traces and metrics are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set
/// (the standard OpenTelemetry variable; `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
/// are honoured too).
#[derive(Args, Clone, Debug)]
pub struct TelemetryArgs {
    /// Log line format. `auto` writes human-readable lines to a terminal and JSON otherwise.
    #[arg(long, env = "HAFEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Which events to log, in tracing's EnvFilter syntax (e.g. `info,hafen_auth=debug`).
    #[arg(long, env = "HAFEN_LOG", default_value = "info")]
    pub log_filter: String,
}

/// Log line format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Pretty when standard error is a terminal, JSON otherwise.
    Auto,
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}
