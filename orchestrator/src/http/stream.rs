//! The response side: the engine's `GenerateResponse` stream turned into one
//! `chat.completion` or into Server-Sent Events of `chat.completion.chunk`s ending with
//! `data: [DONE]`. A client that goes away drops the event stream, which cancels the turn
//! (the engine sees its channel closed and frees the replica sessions).

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use specllava_proto::v1 as pb;
use specllava_proto::v1::generate_response::Event as GenEvent;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::error::ApiError;
use super::types::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, Speculation,
    Usage,
};
use crate::error::OrchestratorError;

/// The engine's output of one turn, and how the turn ended (`Err` when it failed).
pub struct TurnOutput {
    /// Chunks then the summary.
    pub events: mpsc::Receiver<Result<pb::GenerateResponse, Status>>,
    /// The failure, once the events end without a summary.
    pub failure: oneshot::Receiver<OrchestratorError>,
}

impl TurnOutput {
    /// The next event; the turn's error when it ended without a summary.
    async fn next(&mut self) -> Result<GenEvent, ApiError> {
        match self.events.recv().await {
            Some(Ok(pb::GenerateResponse { event: Some(e) })) => Ok(e),
            Some(Ok(_)) => Err(internal("an empty event")),
            Some(Err(s)) => Err(internal(s.message())),
            None => Err(match (&mut self.failure).await {
                Ok(e) => e.into(),
                Err(_) => internal("the turn ended without a summary"),
            }),
        }
    }
}

fn internal(what: &str) -> ApiError {
    OrchestratorError::Internal(what.to_owned()).into()
}

/// What every response of one completion repeats.
#[derive(Debug, Clone)]
pub struct Meta {
    /// `chatcmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model.
    pub model: String,
    /// Extension: return token ids.
    pub return_token_ids: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

/// OpenAI's `finish_reason` of a summary.
fn finish_reason(s: &pb::GenerateSummary) -> &'static str {
    match pb::FinishReason::try_from(s.finish) {
        Ok(pb::FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// Collects the whole turn into one `chat.completion`.
pub async fn collect(meta: Meta, mut out: TurnOutput) -> Result<ChatCompletion, ApiError> {
    let mut ids = Vec::new();
    loop {
        match out.next().await? {
            GenEvent::Chunk(c) => ids.extend_from_slice(&c.token_ids),
            GenEvent::Summary(s) => {
                return Ok(ChatCompletion {
                    id: meta.id,
                    object: "chat.completion",
                    created: meta.created,
                    model: meta.model,
                    choices: vec![Choice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: s.text.clone(),
                        },
                        finish_reason: finish_reason(&s),
                        token_ids: meta.return_token_ids.then_some(ids),
                    }],
                    usage: s.usage.as_ref().map(Usage::from).unwrap_or(Usage {
                        prompt_tokens: 0,
                        completion_tokens: 0,
                        total_tokens: 0,
                    }),
                    speculation: Speculation::from(&s.stats.unwrap_or_default()),
                });
            }
        }
    }
}

/// Streams the turn as Server-Sent Events. The first event is awaited before answering, so
/// that a turn failing at once (no target replica...) still gets its HTTP status; a later
/// failure is sent as an `{"error": ...}` event before `[DONE]`.
pub async fn sse(meta: Meta, mut out: TurnOutput) -> Result<Response, ApiError> {
    let first = out.next().await?;
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(32);
    tokio::spawn(forward(meta, first, out, tx));
    Ok(Sse::new(ReceiverStream::new(rx)).into_response())
}

/// Writes the chunks of a turn into the event channel until the summary, an error, or the
/// client leaving (then `out` is dropped, which cancels the turn).
async fn forward(
    meta: Meta,
    first: GenEvent,
    mut out: TurnOutput,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let chunk = |choices: Vec<ChunkChoice>| ChatCompletionChunk {
        id: meta.id.clone(),
        object: "chat.completion.chunk",
        created: meta.created,
        model: meta.model.clone(),
        choices,
        usage: None,
        speculation: None,
    };
    let choice = |delta: Delta, ids: Option<Vec<u32>>| ChunkChoice {
        index: 0,
        delta,
        finish_reason: None,
        token_ids: ids.filter(|_| meta.return_token_ids),
    };
    let role = Delta {
        role: Some("assistant"),
        content: Some(String::new()),
    };
    if !send(&tx, json(&chunk(vec![choice(role, None)]))).await {
        return;
    }
    let mut next: Result<GenEvent, ApiError> = Ok(first);
    loop {
        let event = match next {
            Ok(GenEvent::Chunk(c)) => {
                if c.text.is_empty() && c.token_ids.is_empty() {
                    None
                } else {
                    let delta = Delta {
                        role: None,
                        content: Some(c.text),
                    };
                    Some(json(&chunk(vec![choice(delta, Some(c.token_ids))])))
                }
            }
            Ok(GenEvent::Summary(s)) => {
                let mut last = chunk(vec![ChunkChoice {
                    finish_reason: Some(finish_reason(&s)),
                    ..choice(Delta::default(), None)
                }]);
                last.speculation = Some(Speculation::from(&s.stats.clone().unwrap_or_default()));
                if !send(&tx, json(&last)).await {
                    return;
                }
                if meta.include_usage {
                    let mut usage = chunk(Vec::new());
                    usage.usage = s.usage.as_ref().map(Usage::from);
                    if !send(&tx, json(&usage)).await {
                        return;
                    }
                }
                let _ = send(&tx, Event::default().data("[DONE]")).await;
                return;
            }
            Err(e) => {
                if let ApiError::Orchestrator(o) = &e {
                    o.record();
                }
                let _ = send(&tx, json(&e.body())).await;
                let _ = send(&tx, Event::default().data("[DONE]")).await;
                return;
            }
        };
        if let Some(ev) = event
            && !send(&tx, ev).await
        {
            return;
        }
        next = tokio::select! {
            n = out.next() => n,
            // The client went away: dropping `out` cancels the turn.
            _ = tx.closed() => return,
        };
    }
}

fn json<T: serde::Serialize>(v: &T) -> Event {
    Event::default().data(serde_json::to_string(v).expect("serializable"))
}

/// Sends one event; false when the client went away.
async fn send(tx: &mpsc::Sender<Result<Event, Infallible>>, ev: Event) -> bool {
    tx.send(Ok(ev)).await.is_ok()
}
