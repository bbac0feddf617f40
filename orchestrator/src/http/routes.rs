//! The HTTP handlers: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::convert::{translate, turn_request};
use super::error::ApiError;
use super::images;
use super::stream::{self, Meta, TurnOutput};
use super::types::{ChatCompletionRequest, Model, ModelList};
use crate::request::check_image_count;

/// `GET /health`: 200 while a usable target replica is known and the server is not
/// draining, else 503.
pub async fn health(State(app): State<Arc<AppState>>) -> Response {
    if app.drain.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let targets = app.targets.replicas();
    if targets.iter().any(|r| !r.is_gone() && !r.is_refused()) {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no target replica").into_response()
    }
}

/// `GET /v1/models`: the served target.
pub async fn models(State(app): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![Model {
            id: app.model_name.clone(),
            object: "model",
            created: app.started,
            owned_by: "specllava",
        }],
    })
}

/// `GET /v1/models/{id}`: the served target, or OpenAI's 404 for another id.
pub async fn model(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Model>, ApiError> {
    if id != app.model_name {
        return Err(ApiError::ModelNotFound(id, app.model_name.clone()));
    }
    Ok(Json(Model {
        id,
        object: "model",
        created: app.started,
        owned_by: "specllava",
    }))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(app): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    specllava_telemetry::metrics().record_request("ChatCompletions");
    let body = body.map_err(ApiError::from_body)?;
    let req: ChatCompletionRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad("body", format!("invalid request body: {e}")))?;
    if let Some(m) = req.model.as_ref().filter(|m| **m != app.model_name) {
        return Err(ApiError::ModelNotFound(m.clone(), app.model_name.clone()));
    }
    let (stream, include_usage, return_token_ids) = (
        req.stream,
        req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        req.return_token_ids,
    );
    let mut t = translate(req)?;
    let urls = std::mem::take(&mut t.image_urls);
    check_image_count(urls.len(), &app.front.limits.image)?;
    // Checked and admitted before any image is fetched; each image is at most the image byte
    // limit (a `data:` URL decoded, or a remote image fetched), its header checked as added.
    let front = &app.front;
    let mut turn = front.admit(turn_request(t))?;
    for url in &urls {
        let bytes = images::load(url, front.limits.image.max_bytes, &app.remote_images).await?;
        front.add_image(&mut turn, bytes.into())?;
    }
    let started = front.start(turn).await?;
    let meta = Meta {
        id: format!(
            "chatcmpl-{}-{}",
            started.conversation_id, started.turn_index
        ),
        created: unix_now(),
        model: app.model_name.clone(),
        return_token_ids,
        include_usage,
    };
    let out = TurnOutput {
        events: started.events,
    };
    if stream {
        stream::sse(meta, out).await
    } else {
        Ok(Json(stream::collect(meta, out).await?).into_response())
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
