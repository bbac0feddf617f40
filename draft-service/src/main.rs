//! `specllava-draft`: the draft service binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = draft_service::Args::parse();
    let json = args.server.log_json;
    specllava_server::run_with_telemetry("specllava-draft", json, draft_service::run(args)).await
}
