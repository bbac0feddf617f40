//! `specllava-orchestrator`: the public API binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = orchestrator::Args::parse();
    specllava_service_kit::init_logging("specllava-orchestrator", args.log_json);
    orchestrator::run(args).await
}
