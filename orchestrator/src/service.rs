//! The public `specllava.v1.Generation` gRPC service: validation, limits,
//! sessions, and the streaming Generate handler.

use std::pin::Pin;
use std::sync::Arc;

use specllava_model::{ChatTurn, ImageLimits, LlavaTokenizer, chat, decode_image};
use specllava_proto::v1 as pb;
use specllava_proto::v1::generation_server::Generation;
use specllava_service_kit::convert::{sampling_from_parts, speculation_mode_from_proto};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::engine::{Engine, GenParams, Interrupted};
use crate::error::OrchestratorError;
use crate::plan::SpecSettings;
use crate::session::{Conversation, Registry, new_session_id};

/// Request limits of the public API.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Image decoding limits.
    pub image: ImageLimits,
    /// Maximum prompt tokens per turn.
    pub max_prompt_tokens: usize,
    /// max_new_tokens when the request leaves it 0.
    pub default_max_new_tokens: u32,
    /// Largest accepted max_new_tokens.
    pub max_new_tokens_limit: u32,
}

/// The Generation service.
pub struct GenerationService {
    engine: Arc<Engine>,
    tokenizer: Arc<LlavaTokenizer>,
    sessions: Arc<Registry>,
    requests: Arc<Semaphore>,
    limits: ApiLimits,
}

impl GenerationService {
    /// A service over `engine`.
    pub fn new(
        engine: Arc<Engine>,
        tokenizer: Arc<LlavaTokenizer>,
        sessions: Arc<Registry>,
        max_concurrent_requests: usize,
        limits: ApiLimits,
    ) -> Self {
        Self {
            engine,
            tokenizer,
            sessions,
            requests: Arc::new(Semaphore::new(max_concurrent_requests)),
            limits,
        }
    }

    /// Decodes an image under the limits, off the async runtime.
    async fn check_image(&self, bytes: &[u8]) -> Result<(), OrchestratorError> {
        if bytes.len() > self.limits.image.max_bytes {
            return Err(OrchestratorError::InvalidArgument(format!(
                "image of {} bytes exceeds the limit of {} bytes",
                bytes.len(),
                self.limits.image.max_bytes
            )));
        }
        let limits = self.limits.image;
        let bytes = bytes.to_vec();
        tokio::task::spawn_blocking(move || decode_image(&bytes, &limits).map(|_| ()))
            .await
            .map_err(|e| OrchestratorError::Internal(e.to_string()))?
            .map_err(|e| OrchestratorError::InvalidArgument(e.to_string()))
    }

    fn gen_params(&self, p: Option<pb::GenerationParams>) -> Result<GenParams, OrchestratorError> {
        let p = p.unwrap_or_default();
        let sampling = sampling_from_parts(p.temperature, p.top_k, p.top_p, p.seed)
            .map_err(|e| OrchestratorError::InvalidArgument(e.to_string()))?;
        if p.max_new_tokens > self.limits.max_new_tokens_limit {
            return Err(OrchestratorError::InvalidArgument(format!(
                "max_new_tokens {} exceeds the limit of {}",
                p.max_new_tokens, self.limits.max_new_tokens_limit
            )));
        }
        Ok(GenParams {
            max_new_tokens: if p.max_new_tokens == 0 {
                self.limits.default_max_new_tokens
            } else {
                p.max_new_tokens
            },
            sampling,
            stop: p.stop,
            ignore_eos: p.ignore_eos,
        })
    }
}

/// What the tokenizer needs of a conversation to tokenize its next prompt.
struct PromptContext {
    first_turn: bool,
    images: usize,
    last_token: Option<u32>,
}

/// This turn's prompt ids (first turn: the whole template). Runs on a blocking thread.
fn prompt_ids(
    tokenizer: &LlavaTokenizer,
    ctx: &PromptContext,
    prompt: &str,
    max_prompt_tokens: usize,
) -> Result<Vec<u32>, OrchestratorError> {
    let internal = |e: specllava_model::ModelError| OrchestratorError::Internal(e.to_string());
    let ids = if ctx.first_turn {
        let turn = ChatTurn {
            user: prompt.to_owned(),
            assistant: None,
        };
        let text = chat::render_llava15(std::slice::from_ref(&turn), ctx.images > 0);
        tokenizer.encode(&text, true).map_err(internal)?
    } else {
        let mut ids = Vec::new();
        if ctx.last_token != Some(tokenizer.eos_token_id()) {
            ids.push(tokenizer.eos_token_id());
        }
        ids.extend(
            tokenizer
                .encode_continuation(&chat::render_continuation(prompt))
                .map_err(internal)?,
        );
        ids
    };
    let image_id = tokenizer.image_token_id();
    let placeholders = ids.iter().filter(|&&t| t == image_id).count();
    let expected = if ctx.first_turn { ctx.images } else { 0 };
    if placeholders != expected {
        // `<image>` typed in the prompt would desynchronise images and placeholders.
        return Err(OrchestratorError::InvalidArgument(
            "the prompt must not contain the <image> placeholder".into(),
        ));
    }
    if ids.len() > max_prompt_tokens {
        return Err(OrchestratorError::InvalidArgument(format!(
            "prompt of {} tokens exceeds the limit of {}",
            ids.len(),
            max_prompt_tokens
        )));
    }
    Ok(ids)
}

fn spec_settings(s: Option<pb::SpeculationConfig>) -> SpecSettings {
    let s = s.unwrap_or_default();
    SpecSettings {
        mode: speculation_mode_from_proto(s.mode),
        depth: s.depth as usize,
        branching: s.branching as usize,
        budget: s.budget as usize,
        draft_ahead: !s.disable_draft_ahead,
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Generation for GenerationService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        specllava_telemetry::metrics().record_request("Generate");
        let r = request.into_inner();
        if r.prompt.trim().is_empty() {
            return Err(
                OrchestratorError::InvalidArgument("prompt must not be empty".into()).into(),
            );
        }
        let params = self.gen_params(r.params)?;
        let spec = spec_settings(r.speculation);
        let permit =
            self.requests.clone().try_acquire_owned().map_err(|_| {
                OrchestratorError::Overloaded("too many concurrent requests".into())
            })?;
        let (conv, one_shot) = if r.session_id.is_empty() {
            if !r.image.is_empty() {
                self.check_image(&r.image).await?;
            }
            let images = if r.image.is_empty() {
                vec![]
            } else {
                vec![r.image]
            };
            let c = Conversation::new(new_session_id(), images);
            (Arc::new(tokio::sync::Mutex::new(c)), true)
        } else {
            if !r.image.is_empty() {
                return Err(OrchestratorError::InvalidArgument(
                    "a session request must not carry an image (the session has one)".into(),
                )
                .into());
            }
            (self.sessions.get(&r.session_id)?, false)
        };
        let mut guard = conv
            .clone()
            .try_lock_owned()
            .map_err(|_| OrchestratorError::SessionBusy(r.session_id.clone()))?;
        let ctx = PromptContext {
            first_turn: guard.history.is_empty(),
            images: guard.images.len(),
            last_token: guard.history.last().copied(),
        };
        let (tokenizer, max_prompt_tokens) =
            (Arc::clone(&self.tokenizer), self.limits.max_prompt_tokens);
        let text = r.prompt;
        // Tokenization never runs on the async executor.
        let prompt = tokio::task::spawn_blocking(move || {
            prompt_ids(&tokenizer, &ctx, &text, max_prompt_tokens)
        })
        .await
        .map_err(|e| OrchestratorError::Internal(e.to_string()))??;
        let prompt_tokens = prompt.len() as u32;
        let engine = Arc::clone(&self.engine);
        let (tx, rx) = mpsc::channel(32);
        // One span per turn, child of the request span; the draft and target calls made
        // inside it carry its trace context, so the turn is one trace across the services.
        let span = tracing::info_span!("generate", session = %guard.id, one_shot, prompt_tokens);
        tokio::spawn(async move {
            let _permit = permit;
            let conv = &mut *guard;
            let before = conv.history.len();
            conv.history.extend_from_slice(&prompt);
            let res = engine
                .generate(conv, prompt_tokens, &params, &spec, &tx)
                .await;
            match res {
                Ok(()) => {}
                Err(Interrupted::Cancelled) => {
                    tracing::info!(session = %conv.id, "client cancelled, closing the session on the replicas");
                    engine.close_replicas(conv).await;
                }
                Err(Interrupted::Failed(e)) => {
                    tracing::warn!(session = %conv.id, error = %e, error_type = e.error_type(), "generation failed");
                    if conv.turns == 0 && before == 0 {
                        conv.history.clear();
                    }
                    engine.close_replicas(conv).await;
                    let _ = tx.send(Err(e.into())).await;
                }
            }
            if one_shot {
                engine.close_replicas(conv).await;
            }
        }
        .instrument(span),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        specllava_telemetry::metrics().record_request("CreateSession");
        let r = request.into_inner();
        if !r.image.is_empty() {
            self.check_image(&r.image).await?;
        }
        let id = new_session_id();
        let images = if r.image.is_empty() {
            vec![]
        } else {
            vec![r.image]
        };
        self.sessions
            .insert(Conversation::new(id.clone(), images))?;
        tracing::info!(session = %id, "session created");
        Ok(Response::new(pb::CreateSessionResponse { session_id: id }))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        specllava_telemetry::metrics().record_request("CloseSession");
        let id = request.into_inner().session_id;
        let Some(conv) = self.sessions.remove(&id) else {
            return Ok(Response::new(pb::CloseSessionResponse { existed: false }));
        };
        let engine = Arc::clone(&self.engine);
        // Waits for a running turn of this session to end, then frees the replicas.
        tokio::spawn(
            async move {
                let mut c = conv.lock().await;
                engine.close_replicas(&mut c).await;
            }
            .instrument(tracing::Span::current()),
        );
        tracing::info!(session = %id, "session closed");
        Ok(Response::new(pb::CloseSessionResponse { existed: true }))
    }
}
