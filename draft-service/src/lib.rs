//! Draft service: holds the small draft LLaVA model, keeps one KV cache per
//! session and streams confidence-scored token trees (EAGLE-2 / Spec-LLaVA
//! dynamic trees, static trees or chains), batching the per-level draft
//! forwards of concurrent sessions.
//!
//! - [`config`]: flags (every flag is also an environment variable).
//! - [`session`]: per-session state and resynchronisation with the history.
//! - [`worker`]: the model worker thread (session store + level-batched drafting).
//! - [`service`]: the `specllava.v1.Draft` gRPC handlers.
//! - [`error`]: the error type and its mapping to gRPC status.

pub mod config;
pub mod error;
pub mod service;
pub mod session;
pub mod topk;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use specllava_model::{ImageLimits, Llava};
use specllava_proto::v1::draft_server::DraftServer;
use specllava_service_kit::{MetricsEndpoint, parse_device, reflection_services, shutdown_signal};

pub use config::Args;
pub use error::DraftError;

/// Loads the model and serves until SIGTERM / ctrl-c, then drains in-flight requests.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let device = parse_device(&args.device)?;
    let dir = args.model_dir.clone();
    tracing::info!(model_dir = %dir.display(), device = %args.device, "loading draft model");
    let model = tokio::task::spawn_blocking(move || Llava::load(&dir, &device))
        .await?
        .with_context(|| format!("loading the draft model from {}", args.model_dir.display()))?;
    let model = Arc::new(model);
    let max_context = if args.max_context == 0 {
        model.config().text.max_position_embeddings
    } else {
        args.max_context
    };
    let batch = worker::BatchConfig {
        max_batch_wait: Duration::from_micros(args.max_batch_wait_us),
        max_batch_sessions: args.max_batch_sessions.max(1),
        queue_capacity: args.queue_capacity.max(1),
        max_context,
    };
    let worker = worker::WorkerHandle::spawn(Arc::clone(&model), args.session_limits(), batch)?;
    let limits = service::RequestLimits {
        image: ImageLimits {
            max_bytes: args.max_image_bytes,
            max_pixels: args.max_image_pixels,
        },
        max_depth: args.max_depth,
        max_branching: args.max_branching,
        max_budget: args.max_budget,
        max_context,
    };
    let svc = service::DraftService::new(Arc::clone(&model), worker, limits);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<DraftServer<service::DraftService>>()
        .await;
    let (reflection_v1, reflection_v1alpha) = reflection_services()?;
    tracing::info!(listen = %args.listen, max_context, "draft service listening");
    let metrics = MetricsEndpoint::start_if(args.metrics_addr).await?;
    tonic::transport::Server::builder()
        .layer(specllava_telemetry::GrpcTraceLayer)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(DraftServer::new(svc).max_decoding_message_size(64 * 1024 * 1024))
        .serve_with_shutdown(args.listen, shutdown_signal())
        .await?;
    if let Some(m) = metrics {
        m.stop().await;
    }
    tracing::info!("draft service stopped");
    Ok(())
}
