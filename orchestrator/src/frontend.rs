//! What both public APIs (gRPC and OpenAI-compatible HTTP) share: admission under the
//! concurrency limit, validation of sampling parameters and images, prompts, and running one
//! turn on the engine. The APIs only translate their requests into these calls.

use std::sync::Arc;

use specllava_prompt::{ImageLimits, PromptError, check_image_header};
use specllava_proto::v1 as pb;
use specllava_wire::convert::{sampling_from_parts, speculation_mode_from_proto};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

use crate::engine::{Engine, GenParams, Interrupted};
use crate::error::OrchestratorError;
use crate::plan::SpecSettings;
use crate::prompt::Prompter;
use crate::session::{Conversation, Registry};

/// Request limits of the public APIs.
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
    /// Most stop strings a request may carry.
    pub max_stop_strings: usize,
    /// Longest stop string, in bytes.
    pub max_stop_bytes: usize,
}

impl ApiLimits {
    /// Validated generation parameters (the server default for `max_new_tokens` 0); stop
    /// strings are capped in number and length (both APIs go through here).
    pub fn gen_params(&self, p: pb::GenerationParams) -> Result<GenParams, OrchestratorError> {
        self.check_stop(&p.stop)?;
        let sampling = sampling_from_parts(p.temperature, p.top_k, p.top_p, p.seed)
            .map_err(|e| OrchestratorError::InvalidArgument(e.to_string()))?;
        if p.max_new_tokens > self.max_new_tokens_limit {
            return Err(OrchestratorError::InvalidArgument(format!(
                "max_new_tokens {} exceeds the limit of {}",
                p.max_new_tokens, self.max_new_tokens_limit
            )));
        }
        Ok(GenParams {
            max_new_tokens: if p.max_new_tokens == 0 {
                self.default_max_new_tokens
            } else {
                p.max_new_tokens
            },
            sampling,
            stop: p.stop,
            ignore_eos: p.ignore_eos,
        })
    }

    /// Refuses more than `max_stop_strings` stop strings or one longer than `max_stop_bytes`
    /// (checked before any text is matched against them; empty ones are ignored later).
    pub fn check_stop(&self, stop: &[String]) -> Result<(), OrchestratorError> {
        if stop.len() > self.max_stop_strings {
            return Err(OrchestratorError::InvalidArgument(format!(
                "{} stop strings: at most {} are accepted",
                stop.len(),
                self.max_stop_strings
            )));
        }
        if let Some((i, s)) = stop
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() > self.max_stop_bytes)
        {
            return Err(OrchestratorError::InvalidArgument(format!(
                "stop string {i} is {} bytes long: at most {} are accepted",
                s.len(),
                self.max_stop_bytes
            )));
        }
        Ok(())
    }
}

/// The shared front door of the public APIs.
pub struct Frontend {
    /// The generation engine.
    pub engine: Arc<Engine>,
    /// Chat template and tokenizer.
    pub prompter: Arc<Prompter>,
    /// Multi-turn sessions of the gRPC API.
    pub sessions: Arc<Registry>,
    requests: Arc<Semaphore>,
    /// The limits.
    pub limits: ApiLimits,
}

impl Frontend {
    /// A front door admitting `max_concurrent_requests` generations at a time.
    pub fn new(
        engine: Arc<Engine>,
        prompter: Arc<Prompter>,
        sessions: Arc<Registry>,
        max_concurrent_requests: usize,
        limits: ApiLimits,
    ) -> Self {
        Self {
            engine,
            prompter,
            sessions,
            requests: Arc::new(Semaphore::new(max_concurrent_requests)),
            limits,
        }
    }

    /// A slot for one generation; RESOURCE_EXHAUSTED (never a queue) when all are taken.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, OrchestratorError> {
        Arc::clone(&self.requests)
            .try_acquire_owned()
            .map_err(|_| OrchestratorError::Overloaded("too many concurrent requests".into()))
    }

    /// Checks an image's header under the limits (format, size, dimensions): oversized or
    /// unreadable images are refused here, before any pixel is decoded; the replicas decode
    /// it (once each).
    pub fn check_image(&self, bytes: &[u8]) -> Result<(), OrchestratorError> {
        check_image_header(bytes, &self.limits.image)
            .map(|_| ())
            .map_err(|e| match e {
                PromptError::ImageTooLarge(m) => OrchestratorError::TooLarge(m),
                e => OrchestratorError::InvalidArgument(e.to_string()),
            })
    }

    /// Validated generation parameters (see [`ApiLimits::gen_params`]).
    pub fn gen_params(&self, p: pb::GenerationParams) -> Result<GenParams, OrchestratorError> {
        self.limits.gen_params(p)
    }

    /// Runs `f` with the prompter on a blocking thread (tokenization never runs on the async
    /// executor).
    pub async fn prompt<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Prompter) -> Result<T, OrchestratorError> + Send + 'static,
    ) -> Result<T, OrchestratorError> {
        let prompter = Arc::clone(&self.prompter);
        tokio::task::spawn_blocking(move || f(&prompter))
            .await
            .map_err(|e| OrchestratorError::Internal(e.to_string()))?
    }

    /// Generates one turn of `conv` after `prompt` (appended to its history), streaming into
    /// `tx`. When the client went away or the turn failed, the conversation's replica sessions
    /// are closed (a later turn re-prefills from the history); a failed turn leaves the
    /// conversation as it was before it (neither its prompt nor a partial answer stays in
    /// the history), so retrying it answers as an undisturbed turn would.
    pub async fn run_turn(
        &self,
        conv: &mut Conversation,
        prompt: &[u32],
        prompt_tokens: u32,
        params: &GenParams,
        spec: &SpecSettings,
        tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
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

/// The speculation settings of a request (defaults: dynamic tree, sized by the policy); an
/// unknown `speculation.mode` is refused.
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ApiLimits {
        ApiLimits {
            image: ImageLimits::default(),
            max_prompt_tokens: 16,
            default_max_new_tokens: 8,
            max_new_tokens_limit: 64,
            max_stop_strings: 2,
            max_stop_bytes: 4,
        }
    }

    fn params(stop: &[&str]) -> pb::GenerationParams {
        pb::GenerationParams {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

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

    #[test]
    fn stop_strings_are_capped_in_number_and_length() {
        let l = limits();
        assert!(l.gen_params(params(&["ab", "abcd"])).is_ok());
        assert!(
            l.gen_params(params(&["", "x"])).is_ok(),
            "empty ones are ignored later"
        );
        for bad in [&["a", "b", "c"][..], &["abcde"], &["a", "ééé"]] {
            let err = l.gen_params(params(bad)).unwrap_err();
            assert!(
                matches!(&err, OrchestratorError::InvalidArgument(m) if m.contains("at most")),
                "{bad:?}: {err}"
            );
        }
    }
}
