//! Process-wide telemetry set-up: `tracing` logs, optional OTLP span export, W3C propagation.
//!
//! Configuration follows the OpenTelemetry SDK environment specification, so a Kubernetes
//! manifest configures every service the same way:
//!
//! | variable | effect |
//! | --- | --- |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT` | export spans over OTLP/gRPC to this collector; unset = no export |
//! | `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` | must be `grpc` (the only transport built in) |
//! | `OTEL_EXPORTER_OTLP_(TRACES_)TIMEOUT`, `..._HEADERS`, `..._COMPRESSION` | read by the exporter |
//! | `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` | resource attributes; the service name defaults to the binary's name |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | sampler (default `parentbased_always_on`) |
//! | `OTEL_BSP_*` | batch span processor queue and delay |
//! | `OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none` | no export |
//! | `RUST_LOG` | log and span filter (default `info`) |
//!
//! Even without an exporter a tracer provider is installed, so trace context arriving in
//! gRPC metadata is continued and forwarded: a service without a collector does not break
//! the trace of the services around it.

use std::env;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::TelemetryError;

/// Keeps the tracer provider alive; dropping it flushes pending spans and shuts export down.
///
/// Drop it (or call [`TelemetryGuard::shutdown`]) at the end of `main`, after the gRPC
/// server has drained. Flushing blocks the calling thread while the OTLP/gRPC exporter,
/// which runs on Tokio, sends the last batch: do it from a multi-threaded runtime or
/// outside the runtime, never from a `current_thread` runtime's only thread.
#[must_use = "dropping the guard shuts down span export"]
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP (an endpoint was configured).
    pub fn is_exporting(&self) -> bool {
        self.exporting
    }

    /// Exports every finished span now.
    pub fn force_flush(&self) -> Result<(), TelemetryError> {
        match &self.provider {
            Some(provider) => Ok(provider.force_flush()?),
            None => Ok(()),
        }
    }

    /// Flushes and shuts down the tracer provider; later spans are dropped.
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        match self.provider.take() {
            Some(provider) => Ok(provider.shutdown()?),
            None => Ok(()),
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            // The subscriber may already be gone: stderr is the one place left to tell.
            eprintln!("specllava-telemetry: shutting down the tracer provider: {err}");
        }
    }
}

/// Where and how spans are exported, read from the `OTEL_*` environment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExportConfig {
    /// The collector endpoint, when export is on.
    endpoint: Option<String>,
}

impl ExportConfig {
    fn from_env() -> Result<Self, TelemetryError> {
        Self::from_lookup(|name| env::var(name).ok())
    }

    /// Reads the configuration through `lookup` (the environment, or a map in tests).
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, TelemetryError> {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
        let endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .filter(|_| !disabled);
        if endpoint.is_some() {
            for variable in [
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ] {
                if let Some(protocol) = var(variable) {
                    if protocol.trim() != "grpc" {
                        return Err(TelemetryError::UnsupportedProtocol { variable, protocol });
                    }
                    // The traces-specific variable wins over the generic one.
                    break;
                }
            }
        }
        Ok(Self { endpoint })
    }
}

/// The OpenTelemetry resource: `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` when set,
/// else `service_name`.
fn resource(service_name: &str) -> Resource {
    let detected = Resource::builder().build();
    let named_by_env = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named_by_env {
        builder.build()
    } else {
        builder.with_service_name(service_name.to_owned()).build()
    }
}

/// Installs the global `tracing` subscriber, the W3C TraceContext propagator and the tracer
/// provider (exporting over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
///
/// `json_logs` switches the log lines on stderr to one JSON object per line. Must be called
/// once per process, inside a Tokio runtime (the gRPC exporter's channel lives on it).
pub fn init_telemetry(service_name: &str, json_logs: bool) -> anyhow::Result<TelemetryGuard> {
    Ok(try_init_telemetry(service_name, json_logs)?)
}

/// [`init_telemetry`] with the crate's own error type.
pub fn try_init_telemetry(
    service_name: &str,
    json_logs: bool,
) -> Result<TelemetryGuard, TelemetryError> {
    let config = ExportConfig::from_env()?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let mut builder = SdkTracerProvider::builder().with_resource(resource(service_name));
    if config.endpoint.is_some() {
        // The builder reads the endpoint, timeout, headers and compression from the same
        // OTEL_EXPORTER_OTLP_* variables.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let tracer = provider.tracer("specllava");

    let filter = EnvFilter::builder()
        .with_default_directive(tracing::Level::INFO.into())
        .from_env()?;
    let fmt = if json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .try_init()?;

    if let Some(endpoint) = &config.endpoint {
        tracing::info!(service_name, endpoint, "exporting spans over OTLP/gRPC");
    }
    Ok(TelemetryGuard {
        exporting: config.endpoint.is_some(),
        provider: Some(provider),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<ExportConfig, TelemetryError> {
        ExportConfig::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn no_endpoint_means_no_export() {
        assert_eq!(config(&[]).unwrap().endpoint, None);
        assert_eq!(
            config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])
                .unwrap()
                .endpoint,
            None
        );
    }

    #[test]
    fn traces_endpoint_wins_over_generic() {
        let cfg = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
        ])
        .unwrap();
        assert_eq!(cfg.endpoint.as_deref(), Some("http://b:4317"));
    }

    #[test]
    fn disabled_sdk_or_none_exporter_turns_export_off() {
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let cfg = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"), off]).unwrap();
            assert_eq!(cfg.endpoint, None, "{off:?}");
        }
    }

    #[test]
    fn only_grpc_protocol_is_accepted() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317");
        assert!(config(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).is_ok());
        let err =
            config(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).unwrap_err();
        assert!(matches!(
            err,
            TelemetryError::UnsupportedProtocol {
                variable: "OTEL_EXPORTER_OTLP_PROTOCOL",
                ..
            }
        ));
        // The traces-specific variable overrides the generic one.
        assert!(
            config(&[
                endpoint,
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
            ])
            .is_ok()
        );
        // Without an endpoint the protocol is irrelevant.
        assert!(config(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).is_ok());
    }

    #[test]
    fn explicit_service_name_is_the_fallback() {
        // The test environment sets neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES.
        if env::var_os("OTEL_SERVICE_NAME").is_none()
            && env::var_os("OTEL_RESOURCE_ATTRIBUTES").is_none()
        {
            let res = resource("draft-service");
            let name = res.get(&opentelemetry::Key::from_static_str("service.name"));
            assert_eq!(
                name.map(|v| v.to_string()).as_deref(),
                Some("draft-service")
            );
        }
    }
}
