//! `specllava-target`: the target (verifier) service binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = target_service::Args::parse();
    specllava_service_kit::init_logging("specllava-target", args.log_json);
    target_service::run(args).await
}
