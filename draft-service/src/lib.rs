//! Draft service: holds the small draft LLaVA model, keeps one KV cache per
//! session and streams confidence-scored token trees (EAGLE-2 / Spec-LLaVA
//! dynamic trees, static trees or chains), batching the per-level draft
//! forwards of concurrent sessions.
//!
//! - [`config`]: flags (every flag is also an environment variable).
//! - [`calibration`]: the start-up cost-per-level measurement reported by `Info`.
//! - [`session`]: per-session state and resynchronisation with the history.
//! - [`last_tree`]: the record of the tree a session sent last.
//! - [`run`]: one tree being drafted, level by level.
//! - [`ahead`]: draft-ahead, pre-drafting the likely next tree in spare time.
//! - [`worker`]: the draft batching the session worker runs (level-batched drafting, and
//!   draft-ahead when idle).
//! - [`service`]: the `specllava.v1.Draft` gRPC handlers.
//! - [`error`]: the error type and its mapping to gRPC status.

pub mod ahead;
pub mod calibration;
pub mod config;
pub mod error;
pub mod last_tree;
pub mod run;
pub mod service;
pub mod session;
pub mod topk;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use specllava_proto::v1::draft_server::DraftServer;
use specllava_server::{Drain, serve_grpc};
use specllava_service_kit::{BatchLimits, load_model};
use tonic::server::NamedService;
use tonic::service::Routes;

pub use config::Args;
pub use error::DraftError;

/// Loads the model and serves until SIGTERM / ctrl-c, then drains in-flight requests.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // Bad TLS files fail the start-up before the model loads.
    let tls = args.server.tls.load()?;
    let loaded = load_model("draft", &args.model_dir, &args.server).await?;
    let max_context = loaded.max_context;
    let level_costs = if args.server.calibrate {
        let m = Arc::clone(&loaded.model);
        let costs = tokio::task::spawn_blocking(move || calibration::measure_level_costs(&m))
            .await?
            .context("measuring the cost per draft level")?;
        let summary: Vec<String> = costs
            .iter()
            .map(|c| format!("{}:{:.3}ms", c.rows, c.forward_ns as f64 / 1e6))
            .collect();
        tracing::info!(costs = %summary.join(" "), "cost per draft level measured (rows fed)");
        costs
    } else {
        Vec::new()
    };
    let batch = BatchLimits {
        max_jobs: args.max_batch_sessions.max(1),
        max_cost: usize::MAX,
        max_wait: Duration::from_micros(args.max_batch_wait_us),
    };
    let backend = worker::DraftBackend::new(
        Arc::clone(&loaded.model),
        max_context,
        args.draft_ahead,
        args.max_batch_sessions,
    );
    let sessions =
        loaded.start_sessions("draft", backend, args.session_limits(), &args.server, batch)?;
    let limits = service::RequestLimits {
        max_depth: args.max_depth,
        max_branching: args.max_branching,
        max_budget: args.max_budget,
    };
    let dead = sessions.worker().stopped();
    let svc = service::DraftService::new(sessions, limits, loaded.info, level_costs);
    tracing::info!(max_context, "draft service ready");
    let server = DraftServer::new(svc).max_decoding_message_size(args.server.max_message_bytes);
    serve_grpc(
        args.listen,
        DraftServer::<service::DraftService>::NAME,
        Routes::new(server),
        args.server.metrics_addr,
        dead,
        tls,
        Drain::on_signal(),
    )
    .await?;
    tracing::info!("draft service stopped");
    Ok(())
}
