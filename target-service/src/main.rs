//! `specllava-target`: the target (verifier) service binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = target_service::Args::parse();
    let json = args.server.log_json;
    specllava_server::run_with_telemetry("specllava-target", json, target_service::run(args)).await
}
