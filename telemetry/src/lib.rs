//! Observability for the Spec-LLaVA services.
//!
//! One crate, three concerns, each in its own module:
//!
//! - [`init`]: `tracing` logs (plain or JSON) plus optional OpenTelemetry OTLP/gRPC span
//!   export configured by the standard `OTEL_*` environment variables, and the W3C
//!   TraceContext propagator installed globally ([`init_telemetry`]).
//! - [`propagation`] and [`layer`]: W3C `traceparent` carried in gRPC metadata. Clients
//!   inject the current span's context ([`inject_context`] or [`TraceContextInterceptor`]);
//!   servers wrap their router in [`GrpcTraceLayer`], which parents every request span on
//!   the caller's context, so one `Generate` is one trace across the three services.
//! - [`metrics`](mod@metrics) and [`metrics_server`]: the `specllava_*` Prometheus metrics, defined in
//!   one place ([`Metrics`], reached through [`metrics()`]), served as text on
//!   `GET /metrics` ([`serve_metrics`]).
//!
//! Typical service start-up:
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! let _guard = specllava_telemetry::init_telemetry("target-service", false)?;
//! let metrics_addr = "0.0.0.0:9090".parse()?;
//! tokio::spawn(specllava_telemetry::serve_metrics(metrics_addr, std::future::pending::<()>()));
//! // tonic::transport::Server::builder().layer(specllava_telemetry::GrpcTraceLayer::default())...
//! # Ok(()) }
//! ```

pub mod error;
pub mod init;
pub mod layer;
pub mod metrics;
pub mod metrics_server;
pub mod propagation;

pub use error::TelemetryError;
pub use init::{TelemetryGuard, init_telemetry};
pub use layer::{GrpcTraceLayer, GrpcTraceService};
pub use metrics::{Metrics, metrics, registry};
pub use metrics_server::{MetricsServer, serve_metrics};
pub use propagation::{
    TraceContextInterceptor, extract_context, extract_context_from_headers, inject_context,
    inject_into_metadata,
};
