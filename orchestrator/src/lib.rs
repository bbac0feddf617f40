//! Orchestrator: the public Spec-LLaVA APIs: gRPC (`specllava.v1.Generation`) and, when
//! `--http-listen` is set, the OpenAI-compatible HTTP API (`/v1/chat/completions`).
//!
//! It owns the tokenizer, the chat template and each session's authoritative
//! token history; routes each session to one draft and one target replica;
//! runs the draft -> verify loop and streams accepted tokens.
//!
//! - [`config`]: flags (every flag is also an environment variable).
//! - [`routing`]: replica sets (DNS, refresh) and session pinning.
//! - [`health`]: replicas out of rotation after a failure, retried with backoff.
//! - [`clients`]: the replica calls (a small trait, gRPC behind it).
//! - [`session`]: conversations and their replica state.
//! - [`sync`]: the call that brings a replica session up to date with the history.
//! - [`setup`]: a draft session's set-up in the background, with the first tree.
//! - [`engine`]: the generation loop in steps, fallback, recovery and the
//!   compatibility check of replicas.
//! - [`plan`]: the budget policy's prior and each step's tree shape.
//! - [`ahead`]: whether draft-ahead pays here, decided by measurement.
//! - [`stats`]: speculation statistics of a turn.
//! - [`events`]: what a turn streams (tokens, then a summary), in domain types.
//! - [`text`]: incremental detokenization and stop strings.
//! - [`prompt`]: the checkpoint's chat template, tokenization, prompt checks.
//! - [`request`]: a turn request in domain types, and its one validation.
//! - [`frontend`]: what both APIs share: admission, conversation, prompt, starting a turn.
//! - [`service`]: the gRPC handlers (translation only).
//! - [`prefix`]: conversations kept for KV reuse by requests whose prompt extends them.
//! - [`http`]: the OpenAI-compatible HTTP API.
//! - [`error`]: the error type and its mapping to gRPC status.

pub mod ahead;
pub mod clients;
pub mod config;
pub mod engine;
pub mod error;
pub mod events;
pub mod frontend;
pub mod health;
pub mod http;
pub mod plan;
pub mod prefix;
pub mod prompt;
pub mod request;
pub mod routing;
pub mod service;
pub mod session;
pub mod setup;
pub mod stats;
pub mod sync;
pub mod text;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use specllava_prompt::{ChatTemplate, LlavaTokenizer};
use specllava_proto::v1::generation_server::GenerationServer;
use specllava_server::{BearerAuth, Drain, serve_grpc};
use specllava_wire::compat::TokenizerIdentity;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

pub use config::Args;
pub use error::OrchestratorError;
pub use routing::ReplicaKind;

/// Serves the public API until SIGTERM / ctrl-c, then drains: both APIs turn unhealthy and
/// refuse new requests at once, in-flight requests finish, then it returns.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let drain = Drain::on_signal();
    // Credentials first: a bad file is a start-up error before anything loads.
    let server_tls = args.tls.load()?;
    let upstream_tls = args.upstream_tls.client_config()?;
    let api_keys = Arc::new(args.auth.load()?);
    tracing::info!(
        tls = args.tls.enabled(),
        client_certs_required = args.tls.mutual(),
        upstream_tls = upstream_tls.is_some(),
        upstream_client_cert = args.upstream_tls.mutual(),
        api_keys = api_keys.len(),
        "credentials"
    );
    let tok_path = args.model_dir.join("tokenizer.json");
    let tokenizer = {
        let path = tok_path.clone();
        tokio::task::spawn_blocking(move || LlavaTokenizer::from_file(&path))
            .await?
            .with_context(|| format!("loading the tokenizer {}", tok_path.display()))?
    };
    let tokenizer = Arc::new(tokenizer);
    let template = ChatTemplate::from_model_dir(&args.model_dir, tokenizer.special_tokens())
        .context("loading the chat template")?;
    tracing::info!(source = %template.source(), "chat template");
    let identity = TokenizerIdentity::of(&tokenizer);
    let connect_timeout = Duration::from_millis(args.connect_timeout_ms);
    let drafts = Arc::new(
        routing::ReplicaSet::new(ReplicaKind::Draft, args.draft_endpoints.clone())
            .with_connect_timeout(connect_timeout)
            .with_backoff(args.backoff())
            .with_tls(
                upstream_tls.clone(),
                args.upstream_tls.upstream_tls_domain.clone(),
            ),
    );
    let targets = Arc::new(
        routing::ReplicaSet::new(ReplicaKind::Target, args.target_endpoints.clone())
            .with_connect_timeout(connect_timeout)
            .with_backoff(args.backoff())
            .with_tls(
                upstream_tls.clone(),
                args.upstream_tls.upstream_tls_domain.clone(),
            ),
    );
    let n_draft = drafts.refresh().await;
    let n_target = targets.refresh().await;
    tracing::info!(drafts = n_draft, targets = n_target, "replicas resolved");
    let engine = Arc::new(
        engine::Engine::new(engine::EngineParts {
            replicas: Arc::new(clients::GrpcReplicas),
            tokenizer: tokenizer.clone(),
            identity,
            drafts: Arc::clone(&drafts),
            targets: Arc::clone(&targets),
            cfg: args.engine_config(),
        })
        .context("the budget policy's prior (--policy-* flags)")?,
    );
    check_compatibility(&engine).await?;
    let discovery = routing::spawn_discovery(
        vec![Arc::clone(&drafts), Arc::clone(&targets)],
        Duration::from_secs(args.discovery_interval_secs),
    );
    if args.discovery_interval_secs > 0 {
        // Replicas discovery adds are checked as they come (and before first use anyway).
        let engine = Arc::clone(&engine);
        let period = Duration::from_secs(args.discovery_interval_secs);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tick.tick().await;
                for kind in [ReplicaKind::Target, ReplicaKind::Draft] {
                    engine.check_replicas(kind).await;
                }
            }
        });
    }
    {
        // Failed replicas are probed until they answer, so a replica that is up again is
        // back in rotation within a probe period, without a request being the test.
        let engine = Arc::clone(&engine);
        let period = args.replica_probe();
        let probe_timeout = period.max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                engine.probe_replicas(probe_timeout).await;
            }
        });
    }
    let sessions = Arc::new(session::Registry::new(
        args.max_sessions,
        Duration::from_secs(args.session_ttl_s),
    ));
    let cached = Arc::new(prefix::PrefixCache::new(
        args.http_cached_conversations,
        Duration::from_secs(args.session_ttl_s),
    ));
    {
        // Close idle sessions (and cached HTTP conversations) on their replicas.
        let (sessions, cached, engine) = (
            Arc::clone(&sessions),
            Arc::clone(&cached),
            Arc::clone(&engine),
        );
        let period = Duration::from_millis(args.session_sweep_ms.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                for conv in sessions.expire() {
                    let mut c = conv.lock().await;
                    tracing::info!(session = %c.id, "session expired");
                    engine.close_replicas(&mut c);
                }
                for mut c in cached.expire() {
                    tracing::debug!(session = %c.id, "cached conversation expired");
                    engine.close_replicas(&mut c);
                }
            }
        });
    }
    let limits = args.api_limits();
    let prompter = Arc::new(prompt::Prompter::new(tokenizer, template, limits.prompt));
    let front = Arc::new(frontend::Frontend::new(
        engine,
        prompter,
        sessions,
        cached,
        args.max_concurrent_requests,
        limits,
    ));
    let http_server = match args.http_listen {
        Some(addr) => {
            let cfg = http::HttpConfig::from_args(&args, Arc::clone(&api_keys))?;
            let targets = Arc::clone(&targets);
            Some(http::spawn(addr, cfg, Arc::clone(&front), targets, drain.clone()).await?)
        }
        None => None,
    };
    let svc = service::GenerationService::new(front);

    let server = GenerationServer::new(svc).max_decoding_message_size(
        args.images
            .max_image_bytes
            .saturating_add(args.max_prompt_bytes)
            .saturating_add(1024 * 1024),
    );
    // Bearer tokens guard the Generation service; health and reflection stay open (the
    // Kubernetes probes and grpcurl use them).
    let server = InterceptedService::new(server, BearerAuth::new(api_keys));
    serve_grpc(
        args.listen,
        GenerationServer::<service::GenerationService>::NAME,
        Routes::new(server),
        args.metrics_addr,
        std::future::pending(),
        server_tls,
        drain,
    )
    .await?;
    if let Some(task) = discovery {
        task.abort();
    }
    if let Some(server) = http_server {
        server.shutdown().await;
    }
    tracing::info!("orchestrator stopped");
    Ok(())
}

/// Checks every replica at start-up (targets first: drafts are compared with them) and
/// fails when a kind has replicas that answered but none of them is compatible: a
/// mismatched deployment is a start-up error, not garbage output. Unreachable replicas
/// are checked before their first use.
async fn check_compatibility(engine: &engine::Engine) -> anyhow::Result<()> {
    for kind in [ReplicaKind::Target, ReplicaKind::Draft] {
        let report = engine.check_replicas(kind).await;
        tracing::info!(
            %kind,
            compatible = report.compatible,
            refused = report.refused.len(),
            unreachable = report.unreachable,
            "replicas checked"
        );
        if report.compatible == 0 && !report.refused.is_empty() {
            anyhow::bail!(
                "no compatible {kind} replica: {}",
                report.refused.join("; ")
            );
        }
    }
    Ok(())
}
