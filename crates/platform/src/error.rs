//! The platform's error type: everything that can stop a service from starting or serving.

/// Errors from configuration, TLS set-up, telemetry and serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is missing or inconsistent.
    #[error("configuration: {0}")]
    Config(String),

    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },

    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),

    /// The gRPC transport failed (bad TLS material, listener error).
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),

    /// Reflection could not be built from the descriptor set.
    #[error("grpc reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),

    /// Telemetry could not be initialised.
    #[error("telemetry: {0}")]
    Telemetry(String),
}

/// Result with the platform [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
