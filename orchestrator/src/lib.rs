//! Orchestrator: the public Spec-LLaVA gRPC API (`specllava.v1.Generation`).
//!
//! It owns the tokenizer, the chat template and each session's authoritative
//! token history; routes each session to one draft and one target replica;
//! runs the draft -> verify loop and streams accepted tokens.
//!
//! - [`config`]: flags (every flag is also an environment variable).
//! - [`routing`]: replica sets (DNS, refresh) and session pinning.
//! - [`session`]: conversations and their replica state.
//! - [`engine`]: the generation loop, fallback and recovery.
//! - [`text`]: incremental detokenization and stop strings.
//! - [`service`]: the gRPC handlers, validation and limits.
//! - [`error`]: the error type and its mapping to gRPC status.

pub mod config;
pub mod engine;
pub mod error;
pub mod routing;
pub mod service;
pub mod session;
pub mod text;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use specllava_model::{ImageLimits, LlavaTokenizer};
use specllava_proto::v1::generation_server::GenerationServer;
use specllava_service_kit::serve_grpc;
use tonic::server::NamedService;
use tonic::service::Routes;

pub use config::Args;
pub use error::OrchestratorError;

/// Serves the public API until SIGTERM / ctrl-c, then drains in-flight requests.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let tok_path = args.model_dir.join("tokenizer.json");
    let tokenizer = Arc::new(
        LlavaTokenizer::from_file(&tok_path)
            .with_context(|| format!("loading the tokenizer {}", tok_path.display()))?,
    );
    let drafts = Arc::new(routing::ReplicaSet::new(
        "draft",
        args.draft_endpoints.clone(),
    ));
    let targets = Arc::new(routing::ReplicaSet::new(
        "target",
        args.target_endpoints.clone(),
    ));
    let n_draft = drafts.refresh().await;
    let n_target = targets.refresh().await;
    tracing::info!(drafts = n_draft, targets = n_target, "replicas resolved");
    let discovery = routing::spawn_discovery(
        vec![Arc::clone(&drafts), Arc::clone(&targets)],
        Duration::from_secs(args.discovery_interval_secs),
    );
    let engine = Arc::new(engine::Engine::new(
        tokenizer.clone(),
        tokenizer.image_token_id(),
        tokenizer.eos_token_id(),
        drafts,
        targets,
        engine::EngineConfig {
            draft_timeout: Duration::from_millis(args.draft_timeout_ms),
            target_timeout: Duration::from_millis(args.target_timeout_ms),
        },
    ));
    let sessions = Arc::new(session::Registry::new(
        args.max_sessions,
        Duration::from_secs(args.session_ttl_s),
    ));
    {
        // Close idle sessions on their replicas.
        let (sessions, engine) = (Arc::clone(&sessions), Arc::clone(&engine));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                for conv in sessions.expire() {
                    let mut c = conv.lock().await;
                    tracing::info!(session = %c.id, "session expired");
                    engine.close_replicas(&mut c).await;
                }
            }
        });
    }
    let limits = service::ApiLimits {
        image: ImageLimits {
            max_bytes: args.max_image_bytes,
            max_pixels: args.max_image_pixels,
        },
        max_prompt_tokens: args.max_prompt_tokens,
        default_max_new_tokens: args.default_max_new_tokens,
        max_new_tokens_limit: args.max_new_tokens_limit,
    };
    let svc = service::GenerationService::new(
        engine,
        tokenizer,
        sessions,
        args.max_concurrent_requests,
        limits,
    );

    let server = GenerationServer::new(svc)
        .max_decoding_message_size(args.max_image_bytes.saturating_add(1024 * 1024));
    serve_grpc(
        args.listen,
        GenerationServer::<service::GenerationService>::NAME,
        Routes::new(server),
        args.metrics_addr,
    )
    .await?;
    if let Some(task) = discovery {
        task.abort();
    }
    tracing::info!("orchestrator stopped");
    Ok(())
}
