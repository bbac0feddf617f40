//! The front door both public APIs (gRPC and OpenAI-compatible HTTP) share: a request
//! translated into a [`TurnRequest`] is validated ([`crate::request::validate`]), admitted
//! under the concurrency limit, given its conversation and prompt, and run on the engine;
//! [`Frontend::start_turn`] returns its stream of [`TurnEvent`]s. The APIs only translate
//! requests in and events out.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use bytes::Bytes;

use specllava_prompt::Message;
use specllava_proto::v1 as pb;
use specllava_wire::convert::speculation_mode_from_proto;
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::Instrument;

use crate::engine::{Engine, GenParams, Interrupted};
use crate::error::OrchestratorError;
use crate::events::{EventSender, TurnEvent};
use crate::plan::SpecSettings;
use crate::prefix::PrefixCache;
use crate::prompt::Prompter;
use crate::request::{
    ApiLimits, ConversationSource, TurnInput, TurnRequest, ValidTurn, check_image,
    check_image_count, validate,
};
use crate::session::{Conversation, Registry, image_rows_on, kv_rows, new_session_id};

/// The shared front door of the public APIs.
pub struct Frontend {
    /// The generation engine.
    pub engine: Arc<Engine>,
    /// Chat template and tokenizer.
    pub prompter: Arc<Prompter>,
    /// Multi-turn sessions of the gRPC API.
    pub sessions: Arc<Registry>,
    /// Conversations kept for KV reuse by requests that extend them (the HTTP API).
    pub kept: Arc<PrefixCache>,
    requests: Arc<Semaphore>,
    /// The limits.
    pub limits: ApiLimits,
}

/// A validated turn holding its slot under the concurrency limit.
pub struct Admitted {
    turn: ValidTurn,
    permit: OwnedSemaphorePermit,
}

/// A started turn.
pub struct TurnStream {
    /// The conversation's id (a session's, or the kept conversation's).
    pub conversation_id: String,
    /// How many turns the conversation had before this one.
    pub turn_index: usize,
    /// The turn's events: tokens, then the summary, or an error. Dropping it cancels the
    /// turn.
    pub events: mpsc::Receiver<Result<TurnEvent, OrchestratorError>>,
}

/// The conversation a turn runs on: its own, or a session's, locked for the turn.
enum Held {
    Own(Conversation),
    Session(OwnedMutexGuard<Conversation>),
}

impl Deref for Held {
    type Target = Conversation;
    fn deref(&self) -> &Conversation {
        match self {
            Held::Own(c) => c,
            Held::Session(g) => g,
        }
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Conversation {
        match self {
            Held::Own(c) => c,
            Held::Session(g) => g,
        }
    }
}

impl Frontend {
    /// A front door admitting `max_concurrent_requests` generations at a time.
    pub fn new(
        engine: Arc<Engine>,
        prompter: Arc<Prompter>,
        sessions: Arc<Registry>,
        kept: Arc<PrefixCache>,
        max_concurrent_requests: usize,
        limits: ApiLimits,
    ) -> Self {
        Self {
            engine,
            prompter,
            sessions,
            kept,
            requests: Arc::new(Semaphore::new(max_concurrent_requests)),
            limits,
        }
    }

    /// Validates and admits one turn: every check of [`validate`], then a slot under the
    /// concurrency limit (RESOURCE_EXHAUSTED, never a queue, when all are taken). A front end
    /// whose images need fetching admits first and adds them with [`Frontend::add_image`], so
    /// no fetch runs for a request that was going to be refused or over the limit.
    pub fn admit(&self, r: TurnRequest) -> Result<Admitted, OrchestratorError> {
        let turn = validate(r, &self.limits)?;
        let permit = Arc::clone(&self.requests)
            .try_acquire_owned()
            .map_err(|_| OrchestratorError::Overloaded("too many concurrent requests".into()))?;
        Ok(Admitted { turn, permit })
    }

    /// Adds an image to an admitted turn, its header checked under the limits.
    pub fn add_image(&self, turn: &mut Admitted, bytes: Bytes) -> Result<(), OrchestratorError> {
        check_image_count(turn.turn.images.len() + 1, &self.limits.image)?;
        check_image(&bytes, &self.limits.image)?;
        turn.turn.images.push(bytes);
        Ok(())
    }

    /// Validates, admits and starts one turn ([`Frontend::admit`], [`Frontend::start`]).
    pub async fn start_turn(
        self: &Arc<Self>,
        r: TurnRequest,
    ) -> Result<TurnStream, OrchestratorError> {
        let admitted = self.admit(r)?;
        self.start(admitted).await
    }

    /// Starts an admitted turn; its events stream from the returned [`TurnStream`]. The
    /// refusals left (a busy or unknown session, a prompt the template or the tokenizer
    /// refuses) come back here, before the turn starts.
    pub async fn start(
        self: &Arc<Self>,
        admitted: Admitted,
    ) -> Result<TurnStream, OrchestratorError> {
        let Admitted {
            turn:
                ValidTurn {
                    source,
                    input,
                    images,
                    params,
                    spec,
                },
            permit,
        } = admitted;
        let (mut conv, prompt, shared) = match &source {
            ConversationSource::OneShot => {
                let prompt = self.tokenize(input, images.len(), None).await?;
                self.check_context(&[], &prompt, &images)?;
                (
                    Held::Own(Conversation::new(new_session_id(), images)),
                    prompt,
                    0,
                )
            }
            ConversationSource::Session(id) => {
                let guard = self
                    .sessions
                    .get(id)?
                    .try_lock_owned()
                    .map_err(|_| OrchestratorError::SessionBusy(id.clone()))?;
                let follows = guard.history.last().copied();
                let prompt = self.tokenize(input, guard.images.len(), follows).await?;
                // The session's history and the follow-up must fit.
                self.check_context(&guard.history, &prompt, &guard.images)?;
                (Held::Session(guard), prompt, 0)
            }
            ConversationSource::SharedPrefix => {
                let prompt = self.tokenize(input, images.len(), None).await?;
                // The whole conversation must fit; checked before a kept one is taken out of
                // the cache (a refusal leaves it there, its replica sessions open).
                self.check_context(&[], &prompt, &images)?;
                let image_id = self.prompter.image_token_id();
                // Continue the kept conversation sharing the longest prefix, or a new one.
                let (mut conv, shared) = match self.kept.take(&prompt, &images, image_id) {
                    Some(r) => (r.conv, r.shared),
                    None => (Conversation::new(new_session_id(), Vec::new()), 0),
                };
                conv.truncate_history(shared);
                conv.images = images;
                (Held::Own(conv), prompt, shared)
            }
        };
        // The prompt's images: the conversation's last ones, one per placeholder in it.
        let image_id = self.prompter.image_token_id();
        let in_prompt = prompt.iter().filter(|&&t| t == image_id).count();
        let first_image = conv.images.len().saturating_sub(in_prompt);
        let prompt_tokens =
            self.prompt_tokens(&prompt, &conv.images[first_image..], conv.images.len());
        let (tx, events) = mpsc::channel(32);
        let stream = TurnStream {
            conversation_id: conv.id.clone(),
            turn_index: conv.turns,
            events,
        };
        // One span per turn, child of the request's; the draft and target calls made inside
        // it carry its trace context, so the turn is one trace across the services.
        let span = tracing::info_span!("generate", session = %conv.id, ?source, prompt_tokens, reused = shared);
        let front = Arc::clone(self);
        tokio::spawn(
            async move {
                let _permit = permit;
                let res = front
                    .run_turn(
                        &mut conv,
                        &prompt[shared..],
                        prompt_tokens,
                        &params,
                        &spec,
                        &tx,
                    )
                    .await;
                let completed = res.is_ok();
                if let Err(Interrupted::Failed(e)) = res {
                    let _ = tx.send(Err(e)).await;
                }
                match (source, conv) {
                    (ConversationSource::OneShot, Held::Own(mut c)) => {
                        front.engine.close_replicas(&mut c)
                    }
                    (ConversationSource::SharedPrefix, Held::Own(c)) if completed => {
                        if let Some(mut evicted) = front.kept.put(c) {
                            front.engine.close_replicas(&mut evicted);
                        }
                    }
                    _ => {}
                }
            }
            .instrument(span),
        );
        Ok(stream)
    }

    /// The prompt's tokens as usage reports them: each image counted as the image tokens it
    /// becomes on the target (what it takes of the context, as OpenAI, vLLM and TGI count
    /// it; any-resolution models by the image's size); one token each until a target's model
    /// is known. `images` are the prompt's, in order, of a conversation of
    /// `conversation_images`.
    fn prompt_tokens(&self, prompt: &[u32], images: &[Bytes], conversation_images: usize) -> u32 {
        let rows = match self.engine.target_model() {
            Some(model) => kv_rows(
                prompt,
                prompt.len(),
                self.prompter.image_token_id(),
                &image_rows_on(model, images, conversation_images),
            ),
            None => prompt.len() as u64,
        };
        u32::try_from(rows).unwrap_or(u32::MAX)
    }

    /// Refuses a turn whose history and new prompt leave no position of the targets' context
    /// for an answer, each image counted as the image tokens it becomes on the target
    /// (before any image is decoded or any replica called; `images` are the conversation's,
    /// in order). Unchecked until a target's model is known.
    fn check_context(
        &self,
        history: &[u32],
        prompt: &[u32],
        images: &[Bytes],
    ) -> Result<(), OrchestratorError> {
        let Some(model) = self.engine.target_model() else {
            return Ok(());
        };
        let image_id = self.prompter.image_token_id();
        let image_rows = image_rows_on(model, images, images.len());
        for (i, &rows) in image_rows.iter().enumerate() {
            self.limits
                .image
                .check_image_tokens(i, rows as usize)
                .map_err(|e| OrchestratorError::InvalidArgument(e.to_string()))?;
        }
        let in_history = history.iter().filter(|&&t| t == image_id).count();
        let rows = kv_rows(history, history.len(), image_id, &image_rows)
            + kv_rows(
                prompt,
                prompt.len(),
                image_id,
                image_rows.get(in_history..).unwrap_or_default(),
            );
        if rows < model.max_context {
            return Ok(());
        }
        Err(OrchestratorError::InvalidArgument(format!(
            "the conversation takes {rows} positions (its {} images {image_rows:?} of them); \
             the model's context holds {}, and one is needed for the answer: shorten it or send \
             fewer images",
            image_rows.len(),
            model.max_context
        )))
    }

    /// The prompt ids of `input` ([`prompt_ids`]) on a blocking thread (tokenization never
    /// runs on the async executor).
    async fn tokenize(
        &self,
        input: TurnInput,
        images: usize,
        follows: Option<u32>,
    ) -> Result<Vec<u32>, OrchestratorError> {
        let prompter = Arc::clone(&self.prompter);
        tokio::task::spawn_blocking(move || prompt_ids(&prompter, input, images, follows))
            .await
            .map_err(|e| OrchestratorError::Internal(e.to_string()))?
    }

    /// Generates one turn of `conv` after `prompt` (appended to its history), streaming into
    /// `tx`. When the client went away or the turn failed, the conversation's replica sessions
    /// are closed (a later turn re-prefills from the history); a failed turn leaves the
    /// conversation as it was before it (neither its prompt nor a partial answer stays in
    /// the history), so retrying it answers as an undisturbed turn would.
    async fn run_turn(
        &self,
        conv: &mut Conversation,
        prompt: &[u32],
        prompt_tokens: u32,
        params: &GenParams,
        spec: &SpecSettings,
        tx: &EventSender,
    ) -> Result<(), Interrupted> {
        let before = conv.history.len();
        conv.history.extend_from_slice(prompt);
        let res = self
            .engine
            .generate(conv, prompt_tokens, params, spec, tx)
            .await;
        match &res {
            Ok(()) => {}
            Err(Interrupted::Cancelled) => {
                tracing::info!(session = %conv.id, "client cancelled, closing the session on the replicas");
                self.engine.close_replicas(conv);
            }
            Err(Interrupted::Failed(e)) => {
                tracing::warn!(session = %conv.id, error = %e, error_type = e.error_type(), "generation failed");
                conv.truncate_history(before);
                self.engine.close_replicas(conv);
            }
        }
        res
    }
}

/// The prompt ids of a turn's `input` with `images` images: a whole conversation, or, when
/// the conversation follows a history (`follows`: its last token), a follow-up user message.
pub fn prompt_ids(
    prompter: &Prompter,
    input: TurnInput,
    images: usize,
    follows: Option<u32>,
) -> Result<Vec<u32>, OrchestratorError> {
    match (input, follows) {
        (TurnInput::UserText(text), Some(last_token)) => prompter.follow_up(last_token, &text),
        (TurnInput::UserText(text), None) => {
            prompter.conversation(&[Message::user(&text, images > 0)], images)
        }
        (TurnInput::Messages(m), _) => prompter.conversation(&m, images),
    }
}

/// The gRPC request's speculation settings (unset: adaptive); an unknown `speculation.mode`
/// is refused.
pub fn spec_settings(s: Option<pb::SpeculationConfig>) -> Result<SpecSettings, OrchestratorError> {
    let s = s.unwrap_or_default();
    if s.mode == pb::SpeculationMode::Adaptive as i32
        && (s.depth != 0 || s.branching != 0 || s.budget != 0)
    {
        return Err(OrchestratorError::InvalidArgument(
            "speculation.depth, branching and budget must be 0 with mode \
             SPECULATION_MODE_ADAPTIVE (the budget policy picks them); use \
             SPECULATION_MODE_DYNAMIC to fix a shape"
                .into(),
        ));
    }
    Ok(SpecSettings {
        mode: speculation_mode_from_proto(s.mode)
            .map_err(|e| OrchestratorError::InvalidArgument(e.to_string()))?,
        depth: s.depth as usize,
        branching: s.branching as usize,
        budget: s.budget as usize,
        draft_ahead: !s.disable_draft_ahead,
        report_steps: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_is_an_explicit_mode_that_refuses_shape_overrides() {
        let cfg = |mode: pb::SpeculationMode, depth| pb::SpeculationConfig {
            mode: mode as i32,
            depth,
            ..Default::default()
        };
        let adaptive = spec_settings(Some(cfg(pb::SpeculationMode::Adaptive, 0))).unwrap();
        assert!(adaptive.is_adaptive());
        // The zero-shape dynamic mode is the same thing (the wire default).
        assert_eq!(
            spec_settings(Some(cfg(pb::SpeculationMode::Dynamic, 0))).unwrap(),
            adaptive
        );
        assert!(spec_settings(None).unwrap().is_adaptive());
        let err = spec_settings(Some(cfg(pb::SpeculationMode::Adaptive, 3))).unwrap_err();
        assert!(
            err.to_string().contains("SPECULATION_MODE_ADAPTIVE"),
            "{err}"
        );
        assert!(
            !spec_settings(Some(cfg(pb::SpeculationMode::Dynamic, 3)))
                .unwrap()
                .is_adaptive()
        );
    }
}
