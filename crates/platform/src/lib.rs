//! What every Hafen service needs to start, shared so that all five behave alike.
//!
//! - [`config`]: the clap arguments every service flattens into its own configuration
//!   (`HAFEN_*` environment variables for every flag).
//! - [`tls`]: rustls server and client TLS, and the development CA generated under
//!   `.dev/certs/` when no certificate is configured.
//! - [`telemetry`]: tracing with JSON or human-readable logs; OTLP export of traces and metrics
//!   when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! - [`cpu`]: low-priority threads for CPU-heavy work (password hashing).
//! - [`shutdown`]: SIGTERM/SIGINT as a future.
//! - [`identity`]: which Hafen service a caller's client certificate names.
//! - [`net`]: the client's address, from the TCP peer or a trusted proxy's header.
//! - [`paging`]: page sizes and opaque page tokens (AIP-158).
//! - [`status`]: gRPC statuses with `google.rpc.ErrorInfo` (domain `hafen`) for error mapping.
//! - [`server`]: the gRPC server builder: health, reflection (v1 and v1alpha), TLS (HTTP/2
//!   and HTTP/1.1) and an ordered drain.
//! - [`web`]: gRPC-Web with CORS for the web apps' origins a service is told.
//! - [`metrics`]: the Prometheus recorder, `/metrics`, and the gRPC server metrics.
//! - [`check`]: every request decoded against its contract before a handler sees it: bad
//!   protobuf, invalid UTF-8, NUL characters and oversized messages refused with
//!   INVALID_ARGUMENT or RESOURCE_EXHAUSTED and the field named.
//!
//! A service's `main` parses its configuration and hands over to [`run`], which binds the
//! listener, serves until a signal arrives, drains, and flushes telemetry.

pub mod check;
pub mod cli;
pub mod config;
mod conn;
pub mod cpu;
pub mod error;
pub mod identity;
pub mod metrics;
pub mod net;
pub mod paging;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

pub use cli::{ServiceCli, ServiceSpec};
pub use config::{LogFormat, ServerArgs, TelemetryArgs, TlsArgs};
pub use error::{Error, Result};
/// The memory allocator of every Hafen binary (`#[global_allocator]` in each `main.rs`):
/// mimalloc's thread-local free lists make the many small, short-lived allocations of a gRPC
/// request (HTTP/2 frames, TLS records, protobuf messages) cheaper than glibc's malloc, whose
/// calls were about 8% of a send's CPU time.
pub use mimalloc::MiMalloc as Allocator;
pub use server::GrpcServer;
pub use shutdown::SharedShutdown;
pub use tls::TlsMaterial;

/// Runs one service process: telemetry, a listener on `listen`, `serve` until SIGTERM/SIGINT,
/// then the drain and the telemetry flush. Returns the process exit code.
pub async fn run<F, Fut, E>(
    binary: &'static str,
    telemetry: &TelemetryArgs,
    listen: SocketAddr,
    serve: F,
) -> ExitCode
where
    F: FnOnce(tokio::net::TcpListener, SharedShutdown) -> Fut,
    Fut: Future<Output = std::result::Result<(), E>>,
    E: std::fmt::Display + From<Error>,
{
    let guard = match telemetry::init(binary, telemetry) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("{binary}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = async {
        let listener = bind(listen).await.map_err(E::from)?;
        serve(listener, shutdown::shared_signal()).await
    }
    .await;
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "{binary} failed");
            ExitCode::FAILURE
        }
    };
    guard.shutdown();
    code
}

/// Binds a TCP listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            context: format!("binding {addr}"),
            source,
        })
}

/// The time a protobuf `Timestamp` names, if it is a valid one.
pub fn datetime(timestamp: &prost_types::Timestamp) -> Option<chrono::DateTime<chrono::Utc>> {
    let nanos = u32::try_from(timestamp.nanos).ok()?;
    chrono::DateTime::from_timestamp(timestamp.seconds, nanos)
}

/// The protobuf form of `time`.
pub fn timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: i32::try_from(time.timestamp_subsec_nanos()).unwrap_or(0),
    }
}
