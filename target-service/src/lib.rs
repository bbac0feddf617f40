//! Target service: holds the large LLaVA model, keeps one KV cache per
//! session, verifies token trees of many sessions in batched forward passes
//! and commits the accepted paths.
//!
//! - [`config`]: flags (every flag is also an environment variable).
//! - [`worker`]: the model worker thread (session store + batching verifier).
//! - [`service`]: the `specllava.v1.Target` gRPC handlers.
//! - [`error`]: the error type and its mapping to gRPC status.

pub mod config;
pub mod error;
pub mod service;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use specllava_model::{ImageLimits, Llava};
use specllava_proto::v1::target_server::TargetServer;
use specllava_service_kit::{MetricsEndpoint, parse_device, reflection_services, shutdown_signal};
use speculate::TreeLimits;

pub use config::Args;
pub use error::TargetError;

/// Loads the model and serves until SIGTERM / ctrl-c, then drains in-flight requests.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let dir = args.model_dir.clone();
    tracing::info!(model_dir = %dir.display(), device = %args.device, "loading target model");
    let model = tokio::task::spawn_blocking(move || Llava::load(&dir, &device))
        .await?
        .with_context(|| format!("loading the target model from {}", args.model_dir.display()))?;
    let model = Arc::new(model);
    let max_context = if args.max_context == 0 {
        model.config().text.max_position_embeddings
    } else {
        args.max_context
    };
    let batch = worker::BatchConfig {
        max_batch_nodes: args.max_batch_nodes.max(1),
        max_batch_wait: Duration::from_micros(args.max_batch_wait_us),
        queue_capacity: args.queue_capacity.max(1),
        max_context,
    };
    let worker = worker::WorkerHandle::spawn(Arc::clone(&model), args.session_limits(), batch)?;
    let limits = service::RequestLimits {
        tree: TreeLimits {
            max_nodes: args.max_tree_nodes,
            max_depth: args.max_tree_depth,
            vocab_size: model.config().text.vocab_size,
        },
        image: ImageLimits {
            max_bytes: args.max_image_bytes,
            max_pixels: args.max_image_pixels,
        },
        max_context,
    };
    let svc = service::TargetService::new(Arc::clone(&model), worker, limits);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<TargetServer<service::TargetService>>()
        .await;
    let (reflection_v1, reflection_v1alpha) = reflection_services()?;
    tracing::info!(listen = %args.listen, vocab = limits.tree.vocab_size, max_context, "target service listening");
    let metrics = MetricsEndpoint::start_if(args.metrics_addr).await?;
    tonic::transport::Server::builder()
        .layer(specllava_telemetry::GrpcTraceLayer)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(TargetServer::new(svc).max_decoding_message_size(64 * 1024 * 1024))
        .serve_with_shutdown(args.listen, shutdown_signal())
        .await?;
    if let Some(m) = metrics {
        m.stop().await;
    }
    tracing::info!("target service stopped");
    Ok(())
}
