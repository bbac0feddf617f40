//! `specllava-draft`: the draft service binary.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = draft_service::Args::parse();
    specllava_service_kit::init_logging("specllava-draft", args.log_json);
    draft_service::run(args).await
}
