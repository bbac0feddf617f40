//! Target service: holds the large LLaVA model, keeps one KV cache per
//! session, verifies token trees of many sessions in batched forward passes
//! and commits the accepted paths.
//!
//! - [`config`]: flags (every flag is also an environment variable).
//! - [`calibration`]: the start-up verify cost measurement reported by `Info`.
//! - [`worker`]: the verify batching the session worker runs.
//! - [`service`]: the `specllava.v1.Target` gRPC handlers.
//! - [`error`]: the error type and its mapping to gRPC status.

pub mod calibration;
pub mod config;
pub mod error;
pub mod service;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use specllava_proto::v1::target_server::TargetServer;
use specllava_server::{Drain, serve_grpc};
use specllava_service_kit::{BatchLimits, load_model};
use speculate::TreeLimits;
use tonic::server::NamedService;
use tonic::service::Routes;

pub use config::Args;
pub use error::TargetError;

/// Loads the model and serves until SIGTERM / ctrl-c, then drains in-flight requests.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // Bad TLS files fail the start-up before the model loads.
    let tls = args.server.tls.load()?;
    let loaded = load_model("target", &args.model_dir, &args.server).await?;
    let (model, max_context) = (Arc::clone(&loaded.model), loaded.max_context);
    let batch = BatchLimits {
        max_jobs: usize::MAX,
        max_cost: args.max_batch_nodes.max(1),
        max_wait: Duration::from_micros(args.max_batch_wait_us),
    };
    let verify_costs = if args.server.calibrate {
        let m = Arc::clone(&model);
        let budget = Duration::from_millis(args.calibration_budget_ms);
        let started = std::time::Instant::now();
        let costs =
            tokio::task::spawn_blocking(move || calibration::measure_verify_costs(&m, budget))
                .await?
                .context("measuring the verify cost")?;
        let summary: Vec<String> = costs
            .iter()
            .map(|c| format!("{}x{}:{:.1}ms", c.batch, c.nodes, c.forward_ns as f64 / 1e6))
            .collect();
        tracing::info!(
            costs = %summary.join(" "),
            ms = started.elapsed().as_millis() as u64,
            "verify cost measured (batch x nodes)"
        );
        costs
    } else {
        Vec::new()
    };
    let backend = worker::TargetBackend::new(Arc::clone(&model), max_context);
    let sessions = loaded.start_sessions(
        "target",
        backend,
        args.session_limits(),
        &args.server,
        batch,
    )?;
    let limits = service::RequestLimits {
        tree: TreeLimits {
            max_nodes: args.max_tree_nodes,
            max_depth: args.max_tree_depth,
            vocab_size: model.config().text.vocab_size,
        },
    };
    let dead = sessions.worker().stopped();
    let svc = service::TargetService::new(sessions, limits, loaded.info, verify_costs);
    tracing::info!(
        vocab = limits.tree.vocab_size,
        max_context,
        "target service ready"
    );
    let server = TargetServer::new(svc).max_decoding_message_size(args.server.max_message_bytes);
    serve_grpc(
        args.listen,
        TargetServer::<service::TargetService>::NAME,
        Routes::new(server),
        args.server.metrics_addr,
        dead,
        tls,
        Drain::on_signal(),
    )
    .await?;
    tracing::info!("target service stopped");
    Ok(())
}
