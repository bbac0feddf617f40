//! Errors of the telemetry crate.

use std::net::SocketAddr;

/// What can go wrong while setting up telemetry or serving metrics.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` names a transport this build does not ship.
    #[error("unsupported OTLP protocol {protocol:?} in {variable}: only \"grpc\" is supported")]
    UnsupportedProtocol {
        /// The environment variable that was read.
        variable: &'static str,
        /// Its value.
        protocol: String,
    },
    /// The OTLP span exporter could not be built (bad endpoint, headers, ...).
    #[error("building the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global `tracing` subscriber was already installed in this process.
    #[error("a global tracing subscriber is already installed: {0}")]
    SubscriberAlreadySet(#[from] tracing_subscriber::util::TryInitError),
    /// The `RUST_LOG` filter does not parse.
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::FromEnvError),
    /// Flushing or shutting down the tracer provider failed.
    #[error("tracer provider: {0}")]
    Provider(#[from] opentelemetry_sdk::error::OTelSdkError),
    /// The metrics HTTP listener could not be bound.
    #[error("binding the metrics endpoint on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Any other I/O error of the metrics endpoint.
    #[error("metrics endpoint I/O: {0}")]
    Io(#[from] std::io::Error),
}
