//! The OpenAI chat-completions wire types (the subset served), plus the documented
//! extensions: request `top_k`, `ignore_eos`, `return_token_ids`, `speculation` (the mode and
//! shape), `speculation_steps`; response `speculation` (statistics), per-choice `token_ids`
//! and, with `speculation_steps`, each chunk's `speculation_step` (the step's tree).

use serde::{Deserialize, Serialize};

use crate::events::{StepView, TurnSummary};
use crate::stats::TurnStats;

/// `POST /v1/chat/completions` body.
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// The model; must be the served one when given.
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Token budget (legacy name).
    pub max_tokens: Option<u32>,
    /// Token budget.
    pub max_completion_tokens: Option<u32>,
    /// Softmax temperature, default 1; 0 = greedy.
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f32>,
    /// Extension: top-k, 0 = off.
    pub top_k: Option<u32>,
    /// Sampling seed.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Choices; only 1.
    pub n: Option<u32>,
    /// Server-Sent Events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Extension: do not stop at end-of-sequence.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Extension: return the generated token ids with each choice / chunk.
    #[serde(default)]
    pub return_token_ids: bool,
    /// Extension: how to speculate (default: `adaptive`, the budget policy's trees).
    pub speculation: Option<SpeculationRequest>,
    /// Extension: stream each step's tree and accepted path (`speculation_step` in the
    /// chunk carrying the step's tokens; off by default, so the chunks have OpenAI's shape).
    #[serde(default)]
    pub speculation_steps: bool,
    /// Log probabilities (not served).
    #[serde(default)]
    pub logprobs: bool,
    /// Tools (not served).
    pub tools: Option<serde_json::Value>,
    /// Every other field: accepted when it cannot change the output
    /// ([`crate::http::convert::IGNORED_FIELDS`]) or has its no-op value, refused otherwise.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// Extension `speculation`: the gRPC API's `SpeculationConfig` in JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculationRequest {
    /// `adaptive` (default), `dynamic`, `static`, `chain` or `off` (target-only).
    pub mode: Option<String>,
    /// Tree depth D (0 or absent: the policy's).
    #[serde(default)]
    pub depth: u32,
    /// Branching K.
    #[serde(default)]
    pub branching: u32,
    /// Node budget M.
    #[serde(default)]
    pub budget: u32,
    /// Do not pre-draft the next tree while the target verifies.
    #[serde(default)]
    pub disable_draft_ahead: bool,
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// One message.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// Text or parts; may be null for an assistant message.
    pub content: Option<MessageContent>,
}

/// A message's content.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Text and image parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image by URL (`data:` always; `http(s)` when allowed).
    ImageUrl {
        /// The URL.
        image_url: ImageUrl,
    },
}

/// `image_url`: `{"url": ...}` or the URL itself.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    /// `{"url": "...", "detail": ...}`.
    Object {
        /// The URL.
        url: String,
    },
    /// The URL.
    Url(String),
}

impl ImageUrl {
    /// The URL.
    pub fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url } | ImageUrl::Url(url) => url,
        }
    }
}

/// Token counts.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    /// Prompt tokens, each image counted as the model's image tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
}

impl Usage {
    /// The token counts of a finished turn.
    pub fn of(s: &TurnSummary) -> Self {
        Self {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            total_tokens: s.prompt_tokens + s.completion_tokens,
        }
    }
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: &'static str,
    /// The answer.
    pub content: String,
}

/// One choice of a completion.
#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    /// 0.
    pub index: u32,
    /// The answer.
    pub message: AssistantMessage,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
    /// Extension (`return_token_ids`): the generated ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// A non-streamed completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model.
    pub model: String,
    /// One choice.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Usage,
    /// Extension: speculation statistics.
    pub speculation: TurnStats,
}

/// What a chunk adds to the message.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    /// `assistant` in the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    /// 0.
    pub index: u32,
    /// The increment.
    pub delta: Delta,
    /// Set in the last chunk of the choice.
    pub finish_reason: Option<&'static str>,
    /// Extension (`return_token_ids`): the ids this chunk adds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// One Server-Sent Event of a streamed completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    /// Same for every chunk of a completion.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model.
    pub model: String,
    /// One choice (none in the usage chunk).
    pub choices: Vec<ChunkChoice>,
    /// Token counts, in the extra last chunk with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Extension: speculation statistics, in the chunk carrying `finish_reason`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speculation: Option<TurnStats>,
    /// Extension (`speculation_steps`): the step that accepted this chunk's tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speculation_step: Option<StepView>,
}

/// `GET /v1/models` entry.
#[derive(Debug, Clone, Serialize)]
pub struct Model {
    /// The name clients put in `model`.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds (start of the server).
    pub created: u64,
    /// `specllava`.
    pub owned_by: &'static str,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The served model.
    pub data: Vec<Model>,
}
