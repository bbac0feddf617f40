//! Logging initialisation: one function so it can be swapped for the telemetry
//! crate's (OTLP + W3C propagation) without touching the binaries.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs a global `tracing` subscriber writing to stderr: human-readable, or
/// one JSON object per line with `json`. The filter comes from `RUST_LOG`
/// (default `info`). Calling it twice is harmless (the second call is ignored).
pub fn init_logging(service_name: &str, json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder.try_init()
    };
    if result.is_ok() {
        tracing::info!(service = service_name, "logging initialised");
    }
}
