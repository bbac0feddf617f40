//! The HTTP handlers: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::AppState;
use super::convert::translate;
use super::error::ApiError;
use super::images;
use super::stream::{self, Meta, TurnOutput};
use super::types::{ChatCompletionRequest, Model, ModelList};
use crate::engine::Interrupted;
use crate::frontend::spec_settings;
use crate::prompt::text_bytes;
use crate::session::{Conversation, new_session_id};

/// `GET /health`: 200 while a usable target replica is known, else 503.
pub async fn health(State(app): State<Arc<AppState>>) -> Response {
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
    let t = translate(req)?;
    let front = Arc::clone(&app.front);
    // Before anything costly (images, rendering, tokenizing).
    front.prompter.check_bytes(text_bytes(&t.messages))?;
    let params = front.gen_params(t.params)?;
    let spec = spec_settings(None)?;
    let permit = front.admit()?;

    let max_bytes = front.limits.image.max_bytes;
    let mut images = Vec::with_capacity(t.image_urls.len());
    for url in &t.image_urls {
        let bytes = images::load(url, max_bytes, &app.remote_images).await?;
        front.check_image(&bytes)?;
        images.push(bytes);
    }
    let (messages, n_images) = (t.messages, images.len());
    let ids = front
        .prompt(move |p| p.conversation(&messages, n_images))
        .await?;
    let prompt_tokens = ids.len() as u32;

    // Continue the kept conversation sharing the longest prefix (KV reuse), or a new one.
    let (mut conv, shared) = match app.cached.take(&ids, &images, app.image_token_id) {
        Some(r) => (r.conv, r.shared),
        None => (Conversation::new(new_session_id(), Vec::new()), 0),
    };
    conv.truncate_history(shared);
    conv.images = images;
    let meta = Meta {
        id: format!("chatcmpl-{}-{}", conv.id, conv.turns),
        created: unix_now(),
        model: app.model_name.clone(),
        return_token_ids,
        include_usage,
    };
    let (tx, events) = mpsc::channel(32);
    let (fail_tx, failure) = oneshot::channel();
    let span =
        tracing::info_span!("chat_completion", session = %conv.id, prompt_tokens, reused = shared);
    let state = Arc::clone(&app);
    tokio::spawn(
        async move {
            let _permit = permit;
            let res = front
                .run_turn(
                    &mut conv,
                    &ids[shared..],
                    prompt_tokens,
                    &params,
                    &spec,
                    &tx,
                )
                .await;
            match res {
                Ok(()) => {
                    if let Some(mut evicted) = state.cached.put(conv) {
                        front.engine.close_replicas(&mut evicted);
                    }
                }
                Err(Interrupted::Failed(e)) => {
                    let _ = fail_tx.send(e);
                }
                Err(Interrupted::Cancelled) => {}
            }
        }
        .instrument(span),
    );
    let out = TurnOutput { events, failure };
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
