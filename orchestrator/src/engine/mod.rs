//! The generation engine: syncs a conversation onto its replicas, runs the
//! draft -> verify loop, streams accepted tokens and collects statistics.
//!
//! One turn is [`Engine::generate`]: [`Engine::begin`] pins and syncs the replicas (the
//! target's prefill picking the turn's first token, streamed first), then every step is
//! 1. propose: the turn's [`lane::DraftLane`] proposes the step's tree (a pre-draft, the
//!    set-up's first tree, a draft round trip; a root-only tree without a draft, or when
//!    the draft fails: the turn continues target-only);
//! 2. verify: [`Engine::verify_step`]: the target verifies it and the conversation takes the
//!    emitted tokens; a lost target session is re-prefilled and the step retried;
//! 3. learn: the lane observes the outcome (the pre-draft's answer, the draft's next request,
//!    acceptance rates), and [`Engine::record_step`] has statistics and the budget policy
//!    learn from the step;
//! 4. emit: [`Engine::emit`]: the tokens' text is streamed, stop strings and finish checked;
//!
//! and [`Engine::end`] streams the summary.
//!
//! Correctness never depends on the draft: every emitted token comes from the target (its
//! prefill's first step or a `Verify`), so losing the draft only costs speed (another draft
//! replica takes over when one is in rotation). A lost target session (NOT_FOUND after
//! eviction) is re-prefilled from the authoritative history; a failed target replica
//! (transport error, UNAVAILABLE, UNKNOWN, a missed deadline: [`is_replica_failure`]) is
//! out of rotation at once and the session fails over: it is re-pinned to another target
//! and re-prefilled there with the history so far, so the client's stream never sees the
//! failure. The client hears UNAVAILABLE only when no target replica is left. Every replica
//! call has a deadline ([`Guarded`]); sessions are closed on replicas in the background.
//! Replicas whose model disagrees with the deployment (vocabulary, special ids, tokenizer)
//! are refused before any session is opened.
//!
//! The turn loop is here; its parts live in the submodules: `replicas` (compatibility,
//! target sessions, failover), `draft` (draft replicas and sessions, shared by all turns)
//! and `lane` (the draft side of one turn, [`lane::DraftLane`], with its pre-drafts in
//! `lane::pipeline`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use specllava_proto::v1 as pb;
use specllava_wire::compat::{TokenizerIdentity, draft_mismatches, target_mismatches};
use specllava_wire::convert::{
    draft_params_to_proto, finish_from_proto, nanos, sampling_to_proto, tree_from_proto,
    verify_cost_table, verify_outcome_from_proto,
};
use speculate::{AcceptanceStats, BudgetPolicy, DraftParams, SamplingParams, TreeLimits};
use tokio::sync::OnceCell;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::ahead::{AheadBlock, AheadGate, PipelineGate};
use crate::clients::{Deadlines, Guarded, ReplicaApi};
use crate::error::{OrchestratorError, is_replica_failure};
use crate::events::{EventSender, Finish, StepView, TurnEvent, TurnSummary};
use crate::plan::{PlanConfig, SpecSettings, choose_params};
use crate::routing::{Replica, ReplicaInfo, ReplicaKind, ReplicaSet};
use crate::session::{Conversation, ReplicaSession, image_rows_on, kv_rows};
use crate::setup::{DraftSetup, DraftStream, EarlyStream, FeatureSource, FirstTree, SetupDone};
use crate::stats::{Stats, draft_service_ns};
use crate::sync::{SyncReply, SyncTarget, plan_sync};
use crate::text::{Delta, Detokenize, TextStream};

mod draft;
mod lane;
mod replicas;

use lane::{DraftLane, LaneStart};

/// Validated sampling and stopping parameters of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    /// Token budget.
    pub max_new_tokens: u32,
    /// Sampling (validated).
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Ignore EOS.
    pub ignore_eos: bool,
}

/// Engine settings (operating decisions, all from flags).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Deadline of every draft call and of one draft step (a step longer than this falls
    /// back to target-only; the draft replica is out of rotation).
    pub draft_timeout: Duration,
    /// Whether drafts are asked to pre-draft while the target verifies (draft-ahead).
    pub draft_ahead: bool,
    /// How long after a turn starts its steps may wait for the draft session's background
    /// set-up before going on target-only (zero: the first token never waits for the draft).
    pub draft_join_wait: Duration,
    /// How much longer than a root-only tree's the verification of a turn's first tree (drafted
    /// while the target prefills) may take, as a factor: the tree is cut to the nodes whose
    /// verification fits. `None`: the step's shape as it is.
    pub first_tree_verify_slack: Option<f64>,
    /// Deadline of every target call (a target missing it fails over).
    pub target_timeout: Duration,
    /// Attempts to sync a target replica (after an eviction, a stale session, a refused
    /// replica) before a turn fails; on top of these, each target replica that fails is
    /// replaced by another one in rotation.
    pub target_attempts: usize,
    /// Target re-prefills (a lost session, a failover to another replica) per step, and
    /// draft replacements per turn, before giving up.
    pub max_recoveries: usize,
    /// The budget policy's prior, search space, probing and fallback shape.
    pub plan: PlanConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            draft_timeout: Self::DEFAULT_DRAFT_TIMEOUT,
            draft_ahead: Self::DEFAULT_DRAFT_AHEAD,
            draft_join_wait: Self::DEFAULT_DRAFT_JOIN_WAIT,
            first_tree_verify_slack: None,
            target_timeout: Self::DEFAULT_TARGET_TIMEOUT,
            target_attempts: Self::DEFAULT_TARGET_ATTEMPTS,
            max_recoveries: Self::DEFAULT_MAX_RECOVERIES,
            plan: PlanConfig::default(),
        }
    }
}

/// The defaults, written once: [`EngineConfig::default`] and the orchestrator's flags use
/// them.
impl EngineConfig {
    /// Deadline of a draft call: 2 s.
    pub const DEFAULT_DRAFT_TIMEOUT: Duration = Duration::from_millis(2_000);
    /// Draft-ahead on.
    pub const DEFAULT_DRAFT_AHEAD: bool = true;
    /// The first token never waits for the draft's set-up.
    pub const DEFAULT_DRAFT_JOIN_WAIT: Duration = Duration::ZERO;
    /// Deadline of a target call: 10 s.
    pub const DEFAULT_TARGET_TIMEOUT: Duration = Duration::from_millis(10_000);
    /// Attempts to sync a target replica.
    pub const DEFAULT_TARGET_ATTEMPTS: usize = 3;
    /// Recoveries per step / turn.
    pub const DEFAULT_MAX_RECOVERIES: usize = 3;
}

/// What an engine is built from.
pub struct EngineParts {
    /// The replica calls (gRPC, or a fake in tests).
    pub replicas: Arc<dyn ReplicaApi>,
    /// Detokenizer of the streamed text.
    pub tokenizer: Arc<dyn Detokenize + Send + Sync>,
    /// The orchestrator's tokenizer: what every replica must agree with.
    pub identity: TokenizerIdentity,
    /// Draft replicas.
    pub drafts: Arc<ReplicaSet>,
    /// Target replicas.
    pub targets: Arc<ReplicaSet>,
    /// Settings.
    pub cfg: EngineConfig,
}

/// Why a generation stopped early.
#[derive(Debug)]
pub enum Interrupted {
    /// The client went away.
    Cancelled,
    /// A failure (already reported to the client when possible).
    Failed(OrchestratorError),
}

impl From<OrchestratorError> for Interrupted {
    fn from(e: OrchestratorError) -> Self {
        Interrupted::Failed(e)
    }
}

/// Replicas of one kind checked by [`Engine::check_replicas`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Replicas whose model agrees with the deployment.
    pub compatible: usize,
    /// Replicas refused, with why.
    pub refused: Vec<String>,
    /// Replicas that did not answer `Info` (checked again before first use).
    pub unreachable: usize,
}

/// Shared state of all generations.
pub struct Engine {
    replicas: Arc<dyn ReplicaApi>,
    tokenizer: Arc<dyn Detokenize + Send + Sync>,
    identity: TokenizerIdentity,
    drafts: Arc<ReplicaSet>,
    targets: Arc<ReplicaSet>,
    /// The model of the first compatible target: what drafts are checked against when no
    /// conversation's target is at hand (start-up, discovery).
    reference: OnceCell<pb::ModelInfo>,
    policy: Mutex<BudgetPolicy>,
    /// Whether the policy's verify cost comes from a target replica's measurement yet.
    verify_cost_measured: AtomicBool,
    /// EMA of the target batch sizes verify answers report (f64 bits): what the policy
    /// sizes trees for.
    target_batch: AtomicU64,
    /// EMA of the target batch sizes of drafted steps (f64 bits; NaN until one): sessions
    /// that draft reach the target at different times, so their batches are smaller than
    /// those of sessions that only decode.
    drafted_batch: AtomicU64,
    /// Whether draft-ahead pays here, measured on the turns the policy shapes: one gate for
    /// greedy turns and one for sampled ones, whose pre-drafts guess right at very different
    /// rates.
    ahead_gates: Mutex<[AheadGate; 2]>,
    /// Whether the policy's draft cost has been measured on a draft yet (its start-up
    /// calibration or a drafted step).
    draft_cost_measured: AtomicBool,
    /// Whether the policy's draft cost comes from a draft replica's start-up measurement.
    draft_cost_calibrated: AtomicBool,
    /// Adaptive turns that would have gone without a draft (see
    /// [`PlanConfig::explore_turns`]).
    undrafted_turns: AtomicU64,
    /// Turns generating now.
    active_turns: Arc<AtomicUsize>,
    cfg: EngineConfig,
}

/// EMA rate of [`Engine`]'s target batch size.
const BATCH_EMA: f64 = 0.1;

/// EMA rate of a turn's own acceptance rates (the policy's shared ones learn at 0.02): a
/// few steps tell how well the draft does on this image and prompt.
const TURN_ACCEPTANCE_EMA: f64 = 0.2;

/// Most tokens a step's detokenization may decode on the async executor (see
/// `TextStream::push_work`; a decode takes well under a microsecond per token, so this is tens
/// of microseconds at most); more (a deep tree accepted whole, or a long run of tokens that
/// do not complete a character) goes to a blocking thread.
const INLINE_DETOKENIZE_WORK: usize = 256;

/// Steps a turn keeps the policy's choice before asking again (choosing searches every
/// shape: ~0.1 ms, a tenth of a step on a CPU), unless the batch size changed.
const CHOICE_STEPS: u32 = 4;

/// The policy's last choice for a turn.
#[derive(Debug, Clone, Copy)]
struct Choice {
    params: DraftParams,
    step: u32,
    batch: usize,
}

/// One turn in progress: what its steps share.
struct Turn<'a> {
    params: &'a GenParams,
    started: Instant,
    stats: Stats,
    /// EOS ids the target stops at (empty with `ignore_eos`).
    eos: Vec<u32>,
    max_context: u64,
    /// The draft side of the turn.
    lane: DraftLane<'a>,
    /// The turn's first token, picked by the target's prefill (streamed before the first
    /// step), as a root-only verify's answer.
    first_token: Option<pb::VerifyResponse>,
    text: TextStream,
    generated: u32,
    first_token_at: Option<Duration>,
    /// Why the turn finished, once it has.
    finish: Option<Finish>,
    /// Target re-prefills in the current step.
    recoveries: usize,
    /// Whether each step's [`StepView`] is streamed with its tokens.
    report_steps: bool,
    /// History length before this turn's answer.
    prompt_len: usize,
}

/// A draft set-up at a turn's start (not a failover mid-turn).
struct TurnStart {
    /// The first tree's shape (`None`: the first step drafts its own).
    first_tree: Option<DraftParams>,
}

/// How a turn's draft starts.
enum DraftStart {
    /// The draft session is in sync already.
    Ready,
    /// Its sync runs in the background.
    Running(DraftSetup),
    /// No draft for this turn.
    Unavailable,
}

/// Counts a turn as generating while it lives.
struct ActiveTurn(Arc<AtomicUsize>);

impl ActiveTurn {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for ActiveTurn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The tree a step verifies.
struct Proposal {
    tree: pb::TokenTree,
    /// Whether the draft proposed it (not a root-only tree).
    drafted: bool,
    /// The draft round trip minus the draft's own time, when the draft was asked.
    draft_overhead_ns: Option<u64>,
    /// The draft round trip, when the draft was asked.
    draft_rtt_ns: u64,
    /// The shape asked for.
    params: DraftParams,
    /// `Some(ahead)`: the step is a clean sample of that draft-ahead arm.
    ahead_sample: Option<bool>,
    /// A pre-draft made while the previous tree was verified (no draft round trip): the
    /// draft's time on it.
    pipelined: Option<u64>,
    /// A subtree of the first tree (the target emitted some of its tokens first): where
    /// its nodes sit in the tree the draft drafted.
    below: Option<Below>,
    /// The shape of the pre-draft asked for while this tree is verified, if one was.
    pre_draft_asked: Option<DraftParams>,
}

/// Where a subtree's nodes sit in the tree the draft drafted (see [`crate::setup::Subtree`]).
struct Below {
    nodes: Vec<u32>,
    path_above: Vec<u32>,
}

impl Below {
    /// A path of the subtree as the path of the drafted tree (empty if it is not one).
    fn drafted_path(&self, path: &[u32]) -> Vec<u32> {
        let mapped = path.iter().map(|&i| self.nodes.get(i as usize).copied());
        self.path_above
            .iter()
            .copied()
            .map(Some)
            .chain(mapped)
            .collect::<Option<Vec<u32>>>()
            .unwrap_or_default()
    }
}

/// Where a step's time went, logged at debug level (`RUST_LOG=orchestrator=debug`).
struct StepTrace {
    nodes: usize,
    /// -1: not a sample of the draft-ahead gate; 0 / 1: a sample of its arm off / on.
    ahead_arm: i8,
    /// The tree was a pre-draft.
    ahead_hit: bool,
    /// A pre-draft was asked for while the tree was verified.
    ahead_asked: bool,
    draft_rtt_ns: u64,
    /// The draft service's time on the request (its wait for the worker included).
    draft_ns: u64,
}

impl StepTrace {
    fn of(proposal: &Proposal) -> Self {
        Self {
            nodes: proposal.tree.tokens.len(),
            ahead_arm: proposal.ahead_sample.map_or(-1, i8::from),
            ahead_hit: proposal.pipelined.is_some(),
            ahead_asked: proposal.pre_draft_asked.is_some(),
            draft_rtt_ns: proposal.draft_rtt_ns,
            draft_ns: proposal.draft_rtt_ns - proposal.draft_overhead_ns.unwrap_or(0),
        }
    }

    /// Logs the step, in microseconds.
    fn log(&self, verified: &Verified, step_started: Instant, emit_started: Instant) {
        tracing::debug!(
            nodes = self.nodes,
            emitted = verified.resp.emitted.len(),
            ahead_arm = self.ahead_arm,
            ahead_hit = self.ahead_hit,
            ahead_asked = self.ahead_asked,
            draft_rtt_us = self.draft_rtt_ns / 1000,
            draft_us = self.draft_ns / 1000,
            verify_rtt_us = verified.rtt_ns / 1000,
            target_us = verified.resp.total_ns / 1000,
            forward_us = verified.resp.forward_ns / 1000,
            emit_us = emit_started.elapsed().as_micros() as u64,
            step_us = step_started.elapsed().as_micros() as u64,
            "step timing"
        );
    }
}

/// What the target answered for a proposal.
struct Verified {
    resp: pb::VerifyResponse,
    rtt_ns: u64,
}

/// Whether the turn goes on after a step.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

fn replica_err(kind: ReplicaKind, r: &Replica, status: Status) -> OrchestratorError {
    OrchestratorError::Replica {
        kind,
        addr: r.addr.to_string(),
        status,
    }
}

impl Engine {
    /// An engine over the given replica sets; fails when the policy prior is malformed.
    pub fn new(parts: EngineParts) -> Result<Self, speculate::CostError> {
        let deadlines = Deadlines {
            draft: parts.cfg.draft_timeout,
            target: parts.cfg.target_timeout,
        };
        Ok(Self {
            policy: Mutex::new(parts.cfg.plan.policy()?),
            replicas: Arc::new(Guarded::new(parts.replicas, deadlines)),
            tokenizer: parts.tokenizer,
            identity: parts.identity,
            drafts: parts.drafts,
            targets: parts.targets,
            reference: OnceCell::new(),
            verify_cost_measured: AtomicBool::new(false),
            target_batch: AtomicU64::new(1.0f64.to_bits()),
            drafted_batch: AtomicU64::new(f64::NAN.to_bits()),
            ahead_gates: Mutex::new(Default::default()),
            draft_cost_measured: AtomicBool::new(false),
            draft_cost_calibrated: AtomicBool::new(false),
            undrafted_turns: AtomicU64::new(0),
            active_turns: Arc::new(AtomicUsize::new(0)),
            cfg: parts.cfg,
        })
    }

    // ---------------------------------------------------------------------------------
    // The generation loop

    /// Generates one turn: `conv.history` already ends with the turn's prompt.
    /// Streams chunks and the final summary into `tx`.
    pub async fn generate(
        &self,
        conv: &mut Conversation,
        prompt_tokens: u32,
        params: &GenParams,
        spec: &SpecSettings,
        tx: &EventSender,
    ) -> Result<(), Interrupted> {
        let _active = ActiveTurn::new(Arc::clone(&self.active_turns));
        let mut turn = self.begin(conv, params, spec).await?;
        match self.decode(conv, &mut turn, tx).await {
            Ok(()) => self.end(conv, turn, prompt_tokens, tx).await,
            Err(e) => {
                // Keep knowing what the draft session holds (it is closed with the rest).
                turn.lane.close(self, conv).await;
                Err(e)
            }
        }
    }

    /// The turn's steps, until it finishes or fails.
    async fn decode(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        tx: &EventSender,
    ) -> Result<(), Interrupted> {
        let params = turn.params;
        if let Some(first) = turn.first_token.take() {
            // A step of the prefill's: no verify call, no forward of its own.
            turn.stats.record_verify(&first, 0, false);
            turn.first_token_at = Some(turn.started.elapsed());
            if self.emit(conv, turn, &first, None, tx).await? == Flow::Stop {
                return Ok(());
            }
        }
        while turn.generated < params.max_new_tokens {
            if tx.is_closed() {
                return Err(Interrupted::Cancelled);
            }
            let kv_len = conv.target.as_ref().expect("ensured").kv_len;
            let room = turn.max_context.saturating_sub(kv_len + 1) as usize;
            if room == 0 {
                turn.finish = Some(Finish::Length);
                break;
            }
            let step_started = Instant::now();
            // Propose (the draft pre-drafts the next tree while the target verifies).
            let proposal = turn.lane.propose(self, conv, &mut turn.stats, room).await;
            // Verify.
            let verified = self.verify_step(conv, turn, &proposal).await;
            // Learn (the draft's side; the rest in `record_step`).
            let outcome = match &verified {
                Ok(Some(v)) => Some(&v.resp),
                _ => None,
            };
            turn.lane
                .observe(self, conv, &mut turn.stats, &proposal, outcome)
                .await;
            let Some(verified) = verified? else {
                // The target session was recovered: draft and verify again.
                continue;
            };
            if verified.resp.emitted.is_empty() {
                turn.finish = Some(Finish::Length);
                break;
            }
            let trace = StepTrace::of(&proposal);
            let view = turn
                .report_steps
                .then(|| self.step_view(turn.stats.steps, &proposal, &verified.resp));
            // The step's wall time so far: its tree, the verify and the pre-draft's answer.
            let step_ns = nanos(step_started.elapsed());
            self.record_step(turn, proposal, &verified, step_ns);
            // Emit.
            let emit_started = Instant::now();
            let flow = self.emit(conv, turn, &verified.resp, view, tx).await?;
            trace.log(&verified, step_started, emit_started);
            if flow == Flow::Stop {
                break;
            }
        }
        Ok(())
    }

    /// Starts the draft session's sync in the background (when speculating), pins and
    /// syncs the target, and attaches the draft if it is ready already.
    async fn begin<'a>(
        &self,
        conv: &mut Conversation,
        params: &'a GenParams,
        spec: &'a SpecSettings,
    ) -> Result<Turn<'a>, Interrupted> {
        let started = Instant::now();
        let mut stats = Stats::default();
        // The draft session syncs while the target's does (and while the target decodes,
        // if it takes longer).
        let draft_start = if spec.mode.is_some() && self.turn_drafts(spec) {
            // The target pinned first: its limits shape the first tree.
            self.ensure_pinned(ReplicaKind::Target, &mut conv.target, &conv.id);
            let first = self.first_tree_params(conv, spec);
            self.start_draft_sync(conv, Some(TurnStart { first_tree: first }))
                .await
        } else {
            DraftStart::Unavailable
        };
        // The target's prefill picks the first token: no verify call stands before it.
        let synced = self
            .ensure_target(conv, &mut stats, Some(params), None)
            .await;
        let (info, first_step) = match synced {
            Ok(synced) => synced,
            Err(e) => {
                if let DraftStart::Running(setup) = draft_start {
                    // Keep knowing what the draft session holds.
                    self.finish_draft_setup(conv, setup).await;
                }
                return Err(e.into());
            }
        };
        let model = info.model.clone().unwrap_or_default();
        let eos = self.eos_ids(params, &model);
        // The prompt: the history before the first token joins it.
        let prompt_len = conv.history.len();
        let first_token = first_step.map(|first| {
            let target = conv.target.as_mut().expect("ensured");
            conv.history.push(first.token);
            target.synced = conv.history.len();
            pb::VerifyResponse {
                emitted: vec![first.token],
                accepted_path: vec![0],
                kv_len: target.kv_len,
                finish: first.finish,
                batch_size: 1,
                ..Default::default()
            }
        });
        let tree_limits = TreeLimits {
            max_nodes: info.max_tree_nodes as usize,
            max_depth: info.max_tree_depth as usize,
            vocab_size: model.vocab_size as usize,
        };
        let max_context = model.max_context;
        let start = LaneStart {
            spec,
            sampled: !params.sampling.is_greedy(),
            tree_limits,
            target_model: model,
            started,
        };
        let lane = DraftLane::open(self, conv, &mut stats, start, draft_start).await;
        // Where the time before the first step goes (`RUST_LOG=orchestrator=debug`).
        tracing::debug!(
            prefill_us = stats.prefill_ns / 1000,
            begin_us = started.elapsed().as_micros() as u64,
            draft_attached = lane.is_attached(),
            first_tree = lane.has_first_tree(),
            "turn begun"
        );
        Ok(Turn {
            params,
            started,
            stats,
            eos,
            max_context,
            lane,
            first_token,
            text: TextStream::new(params.stop.clone()),
            generated: 0,
            first_token_at: None,
            finish: None,
            recoveries: 0,
            report_steps: spec.report_steps,
            prompt_len,
        })
    }

    /// The EOS ids a generation with `params` stops at on `model` (none with `ignore_eos`).
    fn eos_ids(&self, params: &GenParams, model: &pb::ModelInfo) -> Vec<u32> {
        if params.ignore_eos {
            Vec::new()
        } else if model.eos_token_ids.is_empty() {
            vec![self.identity.eos_token_id]
        } else {
            model.eos_token_ids.clone()
        }
    }

    /// Verifies the proposal on the target and appends the emitted tokens to the
    /// history. `Ok(None)`: the target session was lost (evicted, replica gone) and has
    /// been re-prefilled from the history; the step must be retried.
    async fn verify_step(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        proposal: &Proposal,
    ) -> Result<Option<Verified>, Interrupted> {
        let target = conv.target.as_mut().expect("ensured");
        let req = pb::VerifyRequest {
            session_id: conv.id.clone(),
            expected_kv_len: target.kv_len,
            tree: Some(proposal.tree.clone()),
            sampling: Some(sampling_to_proto(&turn.params.sampling)),
            stop: Some(pb::StopConditions {
                eos_token_ids: turn.eos.clone(),
                max_new_tokens: turn.params.max_new_tokens - turn.generated,
            }),
        };
        let r = Arc::clone(target.pin.replica());
        let t0 = Instant::now();
        let resp = match self.replicas.verify(&r, req).await {
            Ok(resp) => resp,
            Err(s) => {
                let failed = is_replica_failure(&s);
                if !(failed || s.code() == Code::NotFound)
                    || turn.recoveries >= self.cfg.max_recoveries
                {
                    return Err(replica_err(ReplicaKind::Target, &r, s).into());
                }
                turn.recoveries += 1;
                if failed {
                    // The replica is out of rotation (its call said so): fail over to
                    // another one, re-prefilled with the history so far.
                    tracing::warn!(replica = %r.addr, status = %s, "target replica failed mid-turn, failing over");
                    self.targets.refresh().await;
                } else {
                    // Evicted: re-prefill from the history.
                    tracing::warn!(status = %s, "target session lost, re-prefilling");
                    target.opened = false;
                }
                let failed_replica = failed.then_some(r.addr);
                self.ensure_target(conv, &mut turn.stats, None, failed_replica)
                    .await?;
                return Ok(None);
            }
        };
        turn.recoveries = 0;
        let rtt_ns = nanos(t0.elapsed());
        if !resp.emitted.is_empty() {
            conv.history.extend_from_slice(&resp.emitted);
            target.kv_len = resp.kv_len;
            target.synced = conv.history.len();
        }
        Ok(Some(Verified { resp, rtt_ns }))
    }

    /// Statistics, metrics and the budget policy learn from a verified step that took
    /// `step_ns` of wall time (its tree, the verify and the wait for a pre-draft's answer).
    fn record_step(
        &self,
        turn: &mut Turn<'_>,
        proposal: Proposal,
        verified: &Verified,
        step_ns: u64,
    ) {
        let resp = &verified.resp;
        turn.stats
            .record_verify(resp, verified.rtt_ns, proposal.drafted);
        if let Some(ns) = proposal.pipelined {
            turn.stats.ahead_hits += 1;
            turn.stats.ahead_saved_ns += ns;
            turn.stats.pipelined_steps += 1;
        }
        specllava_telemetry::metrics()
            .accepted_tokens_per_step
            .observe(resp.emitted.len() as f64);
        let nodes = proposal.tree.tokens.len();
        let batch = resp.batch_size.max(1);
        if let Ok(mut pol) = self.policy.lock() {
            if let Some(ahead) = proposal.ahead_sample {
                let predicted = pol.cost.step_ns(&proposal.params, batch as usize);
                // The whole step: a pre-draft that outlasts the verify delays the next one.
                let measured = step_ns as f64;
                // A sample of the block's arm, not of what the step did: after a miss the
                // draft's rollback falls on the next step, which may ask for no pre-draft.
                if let Ok(mut gates) = self.ahead_gates.lock() {
                    gates[turn.lane.gate()].observe(ahead, measured, predicted);
                }
            }
            pol.observe_verify(nodes, batch as usize, resp.forward_ns as f64);
            // The round trip minus the target's own time (queueing for batch-mates is not
            // a per-step cost the tree size can amortise: it is other sessions' work).
            pol.observe_overhead(
                verified.rtt_ns.saturating_sub(resp.total_ns) as f64,
                proposal.draft_overhead_ns.map(|ns| ns as f64),
            );
        }
        let seen = f64::from_bits(self.target_batch.load(Ordering::Relaxed));
        let ema = seen + BATCH_EMA * (f64::from(batch) - seen);
        self.target_batch.store(ema.to_bits(), Ordering::Relaxed);
        if proposal.drafted {
            let seen = f64::from_bits(self.drafted_batch.load(Ordering::Relaxed));
            let ema = if seen.is_nan() {
                f64::from(batch)
            } else {
                seen + BATCH_EMA * (f64::from(batch) - seen)
            };
            self.drafted_batch.store(ema.to_bits(), Ordering::Relaxed);
        }
        if turn.first_token_at.is_none() {
            turn.first_token_at = Some(turn.started.elapsed());
        }
    }

    /// What a verified step did, for a turn that reports its steps (each node's text decoded
    /// on its own: a few microseconds a node).
    fn step_view(&self, index: u32, proposal: &Proposal, resp: &pb::VerifyResponse) -> StepView {
        let tree = &proposal.tree;
        let texts = tree
            .tokens
            .iter()
            .map(|&t| self.tokenizer.decode(&[t]).unwrap_or_default())
            .collect();
        StepView {
            index,
            tokens: tree.tokens.clone(),
            parents: tree.parents.clone(),
            texts,
            accepted_path: resp.accepted_path.clone(),
            drafted: proposal.drafted,
            pre_drafted: proposal.pipelined.is_some(),
        }
    }

    /// Streams the text of the emitted tokens (up to a stop string); `Stop` when the turn
    /// is finished (stop string, EOS, length).
    async fn emit(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        resp: &pb::VerifyResponse,
        step: Option<StepView>,
        tx: &EventSender,
    ) -> Result<Flow, Interrupted> {
        let delta = if turn.text.push_work(resp.emitted.len()) <= INLINE_DETOKENIZE_WORK {
            // A few tokens decode in microseconds: a hand-off to a blocking thread (tens of
            // microseconds, more on a busy machine) would cost more than the work. A panic in
            // the tokenizer fails the turn, as on the blocking pool.
            let tok = self.tokenizer.as_ref();
            let text = &mut turn.text;
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                text.push(tok, &resp.emitted)
            }))
            .unwrap_or_else(|_| Err("detokenization panicked".to_owned()))
            .map_err(|e| Interrupted::Failed(OrchestratorError::Internal(e)))?
        } else {
            let emitted = resp.emitted.clone();
            self.detokenize(&mut turn.text, move |text, tok| text.push(tok, &emitted))
                .await?
        };
        // Tokens past a stop string are not part of the answer.
        let taken = &resp.emitted[..delta.consumed];
        turn.generated += taken.len() as u32;
        send_tokens(tx, taken.to_vec(), delta.text, step).await?;
        if delta.stopped {
            turn.finish = Some(Finish::StopString);
            let keep = self
                .detokenize(&mut turn.text, |text, tok| Ok(text.tokens_before_stop(tok)))
                .await?;
            if let Some(keep) = keep {
                conv.truncate_history(turn.prompt_len + keep);
            }
            return Ok(Flow::Stop);
        }
        let finish = match finish_from_proto(resp.finish) {
            pb::FinishReason::Eos => Some(Finish::Eos),
            pb::FinishReason::Length => Some(Finish::Length),
            pb::FinishReason::StopString => Some(Finish::StopString),
            pb::FinishReason::Unspecified => None,
        };
        if finish.is_some() {
            turn.finish = finish;
            return Ok(Flow::Stop);
        }
        Ok(Flow::Continue)
    }

    /// Runs `f` on the turn's text stream on a blocking thread (detokenization work that
    /// grows with the answer never runs on the async executor).
    async fn detokenize<T: Send + 'static>(
        &self,
        text: &mut TextStream,
        f: impl FnOnce(&mut TextStream, &dyn Detokenize) -> Result<T, String> + Send + 'static,
    ) -> Result<T, Interrupted> {
        let tok = Arc::clone(&self.tokenizer);
        let mut owned = std::mem::take(text);
        let (owned, res) = tokio::task::spawn_blocking(move || {
            let res = f(&mut owned, tok.as_ref());
            (owned, res)
        })
        .await
        .map_err(|e| Interrupted::Failed(OrchestratorError::Internal(e.to_string())))?;
        *text = owned;
        res.map_err(|e| Interrupted::Failed(OrchestratorError::Internal(e)))
    }

    /// Streams the held-back text and the summary.
    async fn end(
        &self,
        conv: &mut Conversation,
        mut turn: Turn<'_>,
        prompt_tokens: u32,
        tx: &EventSender,
    ) -> Result<(), Interrupted> {
        let tail: Delta = self
            .detokenize(&mut turn.text, |text, tok| text.finish(tok))
            .await?;
        if !tail.text.is_empty() {
            send_tokens(tx, Vec::new(), tail.text, None).await?;
        }
        // The draft's stream ends before the summary waits on a slow client.
        turn.lane.end_stream();
        conv.turns += 1;
        let total = turn.started.elapsed();
        let ttft = turn.first_token_at.unwrap_or(total);
        let summary = TurnSummary {
            finish: turn.finish.unwrap_or(Finish::Length),
            prompt_tokens,
            completion_tokens: turn.generated,
            stats: turn.stats.summary(turn.generated, total, ttft),
            text: turn.text.text().to_owned(),
        };
        let sent = tx.send(Ok(TurnEvent::Finished(summary))).await;
        // A draft sync still running (a short turn) is waited for after the answer, so the
        // conversation knows what its draft session holds.
        turn.lane.close(self, conv).await;
        sent.map_err(|_| Interrupted::Cancelled)
    }
}

/// Streams accepted tokens; the client going away cancels the turn.
async fn send_tokens(
    tx: &EventSender,
    ids: Vec<u32>,
    text: String,
    step: Option<StepView>,
) -> Result<(), Interrupted> {
    tx.send(Ok(TurnEvent::Tokens { ids, text, step }))
        .await
        .map_err(|_| Interrupted::Cancelled)
}

/// Closes `id` on a replica (best effort: a failure is only logged).
async fn close_session(replicas: &dyn ReplicaApi, kind: ReplicaKind, r: &Replica, id: &str) {
    let req = pb::CloseSessionRequest {
        session_id: id.to_owned(),
    };
    if let Err(s) = replicas.close_session(kind, r, req).await {
        tracing::debug!(%kind, addr = %r.addr, status = %s, "close failed");
    }
}
