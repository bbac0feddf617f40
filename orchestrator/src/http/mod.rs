//! The OpenAI-compatible HTTP API (axum, on its own port): `POST /v1/chat/completions`
//! (streaming or not), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, and the web
//! playground at `/`. The same front door and engine as
//! the gRPC API serve it; this layer only translates.
//!
//! - [`types`]: the OpenAI wire types and our documented extensions.
//! - [`convert`]: request -> chat-template messages, image URLs, generation parameters.
//! - [`images`]: `data:` URLs, remote `http(s)` URLs (refused unless allowed).
//! - [`stream`]: the engine's output -> one completion or Server-Sent Events.
//! - [`routes`]: the handlers.
//! - [`playground`]: the web playground's page (`/`).
//! - [`error`]: errors in OpenAI's JSON shape.

pub mod convert;
pub mod error;
pub mod images;
pub mod playground;
pub mod routes;
pub mod stream;
pub mod types;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use specllava_server::{ApiKeys, Drain};

use crate::config::Args;
use crate::frontend::Frontend;
use crate::routing::ReplicaSet;
use error::ApiError;
use images::RemoteImages;

/// Settings of the HTTP API (from flags).
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The name `/v1/models` lists and `model` must match.
    pub model_name: String,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Remote image URLs.
    pub remote_images: RemoteImages,
    /// Accepted bearer tokens (the gRPC API's); empty: no authentication.
    pub api_keys: Arc<ApiKeys>,
}

impl HttpConfig {
    /// The settings the flags give, accepting `api_keys` (loaded once for both APIs).
    pub fn from_args(args: &Args, api_keys: Arc<ApiKeys>) -> anyhow::Result<Self> {
        Ok(Self {
            model_name: args
                .served_model_name
                .clone()
                .unwrap_or_else(|| default_model_name(&args.model_dir)),
            max_body_bytes: args.http_max_body_bytes,
            remote_images: if args.allow_remote_images {
                RemoteImages::fetched(
                    Duration::from_millis(args.remote_image_timeout_ms),
                    args.remote_image_ca_file.as_deref(),
                )?
            } else {
                RemoteImages::refused()
            },
            api_keys,
        })
    }
}

/// The model directory's name (`models/target` -> `target`).
fn default_model_name(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name()
        .map_or_else(|| "specllava".into(), |n| n.to_string_lossy().into_owned())
}

/// What the handlers share.
pub struct AppState {
    front: Arc<Frontend>,
    targets: Arc<ReplicaSet>,
    model_name: String,
    remote_images: RemoteImages,
    api_keys: Arc<ApiKeys>,
    started: u64,
    /// The process's drain: `/health` turns 503 and new requests are refused once it starts.
    drain: Drain,
}

/// The router of the API over `state`.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{*id}", get(routes::model))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            authenticate,
        ))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            refuse_when_draining,
        ));
    Router::new()
        .route("/health", get(routes::health))
        .route("/", get(playground::index))
        .route("/playground/app.js", get(playground::app))
        .route("/playground/style.css", get(playground::style))
        .merge(api)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// Checks `Authorization: Bearer <key>` when keys are configured, with the gRPC API's
/// check ([`ApiKeys::check`], constant time); any refusal is OpenAI's 401.
async fn authenticate(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let header = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    if let Err(e) = app.api_keys.check(header) {
        tracing::debug!(error = %e, "HTTP request refused");
        return ApiError::Unauthorized.into_response();
    }
    next.run(req).await
}

/// Refuses new requests once the drain started (503 with `Retry-After`: another replica
/// takes them); requests in flight go on.
async fn refuse_when_draining(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    if app.drain.is_draining() {
        return ApiError::Draining.into_response();
    }
    next.run(req).await
}

/// A running HTTP server.
pub struct HttpServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl HttpServer {
    /// Stops accepting, lets in-flight requests finish, and waits.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server failed"),
            Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
        }
    }
}

/// Binds `addr` and serves the API on a task; once `drain` starts, `/health` answers 503
/// and new requests are refused (in-flight ones go on until [`HttpServer::shutdown`]).
pub async fn spawn(
    addr: SocketAddr,
    cfg: HttpConfig,
    front: Arc<Frontend>,
    targets: Arc<ReplicaSet>,
    drain: Drain,
) -> anyhow::Result<HttpServer> {
    let state = Arc::new(AppState {
        front,
        targets,
        model_name: cfg.model_name.clone(),
        remote_images: cfg.remote_images,
        api_keys: cfg.api_keys,
        started: routes::unix_now(),
        drain,
    });
    let app = router(state, cfg.max_body_bytes);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the HTTP API to {addr}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %cfg.model_name, "OpenAI-compatible HTTP API listening");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok(HttpServer { addr, stop, task })
}
