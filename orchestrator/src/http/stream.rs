//! The response side: a turn's events turned into one `chat.completion` or into Server-Sent
//! Events of `chat.completion.chunk`s ending with `data: [DONE]`. A client that goes away drops the event stream, which cancels the turn
//! (the engine sees its channel closed and frees the replica sessions).

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::error::ApiError;
use super::types::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, Choice, ChunkChoice, Delta, Usage,
};
use crate::error::OrchestratorError;
use crate::events::{Finish, TurnEvent, TurnSummary};

/// A turn's events (tokens, then the summary or an error).
pub struct TurnOutput {
    /// The front door's event stream.
    pub events: mpsc::Receiver<Result<TurnEvent, OrchestratorError>>,
}

impl TurnOutput {
    /// The next event; the turn's error when it ended without a summary.
    async fn next(&mut self) -> Result<TurnEvent, ApiError> {
        match self.events.recv().await {
            Some(Ok(e)) => Ok(e),
            Some(Err(e)) => Err(e.into()),
            None => {
                Err(OrchestratorError::Internal("the turn ended without a summary".into()).into())
            }
        }
    }
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
fn finish_reason(s: &TurnSummary) -> &'static str {
    match s.finish {
        Finish::Length => "length",
        Finish::Eos | Finish::StopString => "stop",
    }
}

/// Collects the whole turn into one `chat.completion`.
pub async fn collect(meta: Meta, mut out: TurnOutput) -> Result<ChatCompletion, ApiError> {
    let mut ids = Vec::new();
    loop {
        match out.next().await? {
            TurnEvent::Tokens { ids: more, .. } => ids.extend_from_slice(&more),
            TurnEvent::Finished(s) => {
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
                    usage: Usage::of(&s),
                    speculation: s.stats,
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
    first: TurnEvent,
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
        speculation_step: None,
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
    let mut next: Result<TurnEvent, ApiError> = Ok(first);
    loop {
        let event = match next {
            Ok(TurnEvent::Tokens { ids, text, step }) => {
                if text.is_empty() && ids.is_empty() {
                    None
                } else {
                    let delta = Delta {
                        role: None,
                        content: Some(text),
                    };
                    let mut c = chunk(vec![choice(delta, Some(ids))]);
                    c.speculation_step = step;
                    Some(json(&c))
                }
            }
            Ok(TurnEvent::Finished(s)) => {
                let mut last = chunk(vec![ChunkChoice {
                    finish_reason: Some(finish_reason(&s)),
                    ..choice(Delta::default(), None)
                }]);
                last.speculation = Some(s.stats.clone());
                if !send(&tx, json(&last)).await {
                    return;
                }
                if meta.include_usage {
                    let mut usage = chunk(Vec::new());
                    usage.usage = Some(Usage::of(&s));
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
