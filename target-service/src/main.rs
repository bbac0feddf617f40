//! `specllava-target`: the target (verifier) service binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = target_service::Args::parse();
    // Logs, OTLP span export (when OTEL_EXPORTER_OTLP_ENDPOINT is set), W3C propagation.
    let telemetry = specllava_telemetry::init_telemetry("specllava-target", args.server.log_json)?;
    let result = target_service::run(args).await;
    // Flush the last spans after the server drained; the flush blocks on the exporter,
    // which runs on this (multi-threaded) runtime.
    tokio::task::block_in_place(|| drop(telemetry));
    result
}
