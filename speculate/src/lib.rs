//! Speculative decoding logic: token trees, dynamic expansion, lossless verification, budget policy.
//!
//! Pure logic shared by the draft service, the target service and the orchestrator: no model
//! code, no I/O, no async. The README's Architecture section gives the data flow; each
//! module documents its part (the tree layout in [`tree`], the verification rule in [`verify`]).
//!
//! - [`tree`]: the validated token tree (flat arrays, depth, sibling links, ancestor masks).
//! - [`draft`]: EAGLE-2 / Spec-LLaVA dynamic tree building, static and chain modes.
//! - [`sampling`]: greedy and seeded sampling keyed by (seed, absolute position).
//! - [`verify`]: the lossless verification walk.
//! - [`policy`]: choosing depth, branching and budget from costs and acceptance.

pub mod draft;
pub mod policy;
pub mod sampling;
pub mod tree;
pub mod verify;

pub use draft::{
    BuildError, DraftOutcome, DraftParams, Drafter, PartialTree, TreeBuilder, TreeMode, build_tree,
};
pub use policy::{
    AcceptanceStats, BudgetPolicy, CostError, CostModel, PolicySpace, StepEstimate, VerifyCostTable,
};
pub use sampling::{SamplingError, SamplingParams, argmax, sample_token, uniform};
pub use tree::{Children, TokenTree, TreeError, TreeLimits};
pub use verify::{FinishReason, FirstStep, StopConditions, VerifyOutcome, verify};
