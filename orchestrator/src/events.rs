//! What a turn streams, in domain types: tokens as they are accepted, then one summary. The
//! engine emits these; the gRPC and HTTP front ends only translate them to their wire shapes.

use serde::Serialize;

use crate::error::OrchestratorError;
use crate::stats::TurnStats;

/// One event of a turn's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnEvent {
    /// Newly accepted tokens and their text delta (never splitting a character; may be empty
    /// while one is incomplete, or carry held-back text and no tokens).
    Tokens {
        /// The token ids, in order.
        ids: Vec<u32>,
        /// Their text.
        text: String,
        /// The step that accepted them, when the turn reports its steps
        /// ([`crate::plan::SpecSettings::report_steps`]).
        step: Option<StepView>,
    },
    /// The last event of a turn that completed.
    Finished(TurnSummary),
}

/// What one generation step did: the tree the target verified and the path it accepted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepView {
    /// The step's index in the turn (the first token, picked by the target's prefill, is
    /// step 0 and has no view).
    pub index: u32,
    /// The tree's tokens; node 0 is the root (the last token already in the answer or prompt).
    pub tokens: Vec<u32>,
    /// Each node's parent (-1 for the root).
    pub parents: Vec<i32>,
    /// Each node's text.
    pub texts: Vec<String>,
    /// The accepted path, as node indices from the root.
    pub accepted_path: Vec<u32>,
    /// Whether the draft proposed the tree (false: a target-only step, the root alone).
    pub drafted: bool,
    /// Whether the tree was pre-drafted while the previous one was verified.
    pub pre_drafted: bool,
}

/// Why a turn finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model emitted an end-of-sequence token.
    Eos,
    /// `max_new_tokens` or the context was reached.
    Length,
    /// A stop string was generated (it and what follows are not part of the answer).
    StopString,
}

/// The end of a completed turn.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnSummary {
    /// Why it finished.
    pub finish: Finish,
    /// Prompt tokens of the turn, each image counted as the model's image tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// How speculation went.
    pub stats: TurnStats,
    /// The whole answer (after stop-string truncation).
    pub text: String,
}

/// A turn's events as they come: `Ok` events, then, for a turn that failed, one `Err` (no
/// summary). Dropping the receiver cancels the turn.
pub type EventSender = tokio::sync::mpsc::Sender<Result<TurnEvent, OrchestratorError>>;
