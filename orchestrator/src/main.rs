//! `specllava-orchestrator`: the public API binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = orchestrator::Args::parse();
    // Logs, OTLP span export (when OTEL_EXPORTER_OTLP_ENDPOINT is set), W3C propagation.
    let telemetry = specllava_telemetry::init_telemetry("specllava-orchestrator", args.log_json)?;
    let result = orchestrator::run(args).await;
    // Flush the last spans after the server drained; the flush blocks on the exporter,
    // which runs on this (multi-threaded) runtime.
    tokio::task::block_in_place(|| drop(telemetry));
    result
}
