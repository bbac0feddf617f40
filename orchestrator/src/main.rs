//! `specllava-orchestrator`: the public API binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = orchestrator::Args::parse();
    let json = args.log_json;
    specllava_server::run_with_telemetry("specllava-orchestrator", json, orchestrator::run(args))
        .await
}
