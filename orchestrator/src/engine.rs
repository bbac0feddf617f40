//! The generation engine: syncs a conversation onto its replicas, runs the
//! draft -> verify loop, streams accepted tokens and collects statistics.
//!
//! One turn is [`Engine::generate`]: [`Engine::begin`] pins and syncs the replicas,
//! then every step is
//! 1. [`Engine::draft_step`]: the next tree from the draft stream (a root-only tree
//!    without a draft, or when the draft fails: the turn continues target-only);
//! 2. [`Engine::verify_step`]: the target verifies it and the conversation takes the
//!    emitted tokens; a lost target session is re-prefilled and the step retried;
//! 3. [`Engine::record_step`]: statistics and the budget policy learn from the step;
//! 4. [`Engine::emit`]: the tokens' text is streamed, stop strings and finish checked;
//!
//! and [`Engine::end`] streams the summary.
//!
//! Correctness never depends on the draft: every emitted token comes from the
//! target's `Verify`, so losing the draft only costs speed (another draft replica takes
//! over when one is in rotation). A lost target session (NOT_FOUND after eviction) is
//! re-prefilled from the authoritative history; a failed target replica (transport error,
//! UNAVAILABLE, UNKNOWN, a missed deadline: [`is_replica_failure`]) is out of rotation at
//! once and the session fails over: it is re-pinned to another target and re-prefilled
//! there with the history so far, so the client's stream never sees the failure. The
//! client hears UNAVAILABLE only when no target replica is left. Every replica call has a
//! deadline ([`Guarded`]); sessions are closed on replicas in the background.
//! Replicas whose model disagrees with the deployment (vocabulary, special ids, tokenizer)
//! are refused before any session is opened.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use specllava_proto::v1 as pb;
use specllava_service_kit::compat::{TokenizerIdentity, draft_mismatches, target_mismatches};
use specllava_service_kit::convert::{
    draft_params_to_proto, finish_from_proto, nanos, sampling_to_proto, tree_from_proto,
    verify_cost_table, verify_outcome_from_proto,
};
use speculate::{AcceptanceStats, BudgetPolicy, DraftParams, SamplingParams, TreeLimits};
use tokio::sync::{OnceCell, mpsc};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::ahead::{AheadBlock, AheadGate, PipelineGate};
use crate::clients::{Deadlines, Guarded, ReplicaApi, ReplicaKind};
use crate::error::{OrchestratorError, is_replica_failure};
use crate::plan::{PlanConfig, SpecSettings, choose_params};
use crate::routing::{Replica, ReplicaInfo, ReplicaSet};
use crate::session::{Conversation, ReplicaSession};
use crate::setup::{DraftSetup, DraftStream, EarlyStream, FirstTree, SetupDone};
use crate::stats::Stats;
use crate::sync::{PlannedSync, SyncReply, plan_sync};
use crate::text::{Delta, Detokenize, TextStream};

/// Validated sampling and stopping parameters of one generation.
#[derive(Debug, Clone)]
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
            draft_timeout: Duration::from_millis(2_000),
            draft_ahead: true,
            draft_join_wait: Duration::ZERO,
            first_tree_verify_slack: None,
            target_timeout: Duration::from_millis(10_000),
            target_attempts: 3,
            max_recoveries: 3,
            plan: PlanConfig::default(),
        }
    }
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
    /// Whether draft-ahead pays here, measured on the turns the policy shapes.
    ahead_gate: Mutex<AheadGate>,
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
    spec: &'a SpecSettings,
    started: Instant,
    stats: Stats,
    /// EOS ids the target stops at (empty with `ignore_eos`).
    eos: Vec<u32>,
    tree_limits: TreeLimits,
    max_context: u64,
    /// The target's model (what the draft is checked against).
    target_model: pb::ModelInfo,
    /// The draft stream; `None`: target-only (for now, while `draft_setup` runs).
    draft: Option<DraftStream>,
    /// The first tree the draft's set-up drafted (used by the first drafting step when its
    /// root is still the history's last token).
    first_tree: Option<FirstTree>,
    /// The draft session's sync, running in the background while the target decodes.
    draft_setup: Option<DraftSetup>,
    text: TextStream,
    generated: u32,
    first_token_at: Option<Duration>,
    /// Accepted path of the last drafted tree, for the draft's next request.
    last_path: Vec<u32>,
    /// This turn's own acceptance rates (starting from the policy's, learning fast): trees
    /// grow where the draft agrees with the target and shrink where it does not.
    acceptance: Option<AcceptanceStats>,
    /// The policy's last choice (reused for [`CHOICE_STEPS`] steps).
    choice: Option<Choice>,
    /// Draft-ahead arm of the turn's current block of steps (adaptive turns).
    ahead: AheadBlock,
    /// The draft's pre-draft for the outcome of the tree being verified (pipelined
    /// speculation), used as the next tree when the target's outcome is the assumed one.
    pre_draft: Option<PreDraft>,
    /// Whether the turn's pre-drafts hit often enough to keep asking for them.
    pipeline: PipelineGate,
    finish: pb::FinishReason,
    /// Target re-prefills in the current step.
    recoveries: usize,
    /// Draft replicas replaced in this turn.
    draft_failovers: usize,
    /// History length before this turn's answer.
    prompt_len: usize,
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
}

/// A tree the draft pre-drafted while the target verified the previous one, and the
/// outcome of that verification it assumes.
struct PreDraft {
    tree: pb::TokenTree,
    /// The accepted path (node indices of the tree being verified) it assumes.
    path: Vec<u32>,
    /// The tokens it assumes the target emits (the last one is its root).
    emitted: Vec<u32>,
    /// The shape asked for.
    params: DraftParams,
    /// The draft's time on it (overlapped with the verify).
    draft_ns: u64,
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
            ahead_gate: Mutex::new(AheadGate::default()),
            draft_cost_measured: AtomicBool::new(false),
            draft_cost_calibrated: AtomicBool::new(false),
            undrafted_turns: AtomicU64::new(0),
            active_turns: Arc::new(AtomicUsize::new(0)),
            cfg: parts.cfg,
        })
    }

    // ---------------------------------------------------------------------------------
    // Compatibility

    /// The replica's `Info` (fetched once), checked against the orchestrator's tokenizer
    /// and, for a draft, against `target` (or the first compatible target). A replica that
    /// disagrees is refused for good: logged once, counted in
    /// `specllava_replicas_refused_total{kind}`, never pinned again.
    async fn checked_info<'r>(
        &self,
        kind: ReplicaKind,
        r: &'r Replica,
        target: Option<&pb::ModelInfo>,
    ) -> Result<&'r ReplicaInfo, OrchestratorError> {
        let info = r
            .info
            .get_or_try_init(|| async {
                match kind {
                    ReplicaKind::Target => {
                        self.replicas.target_info(r).await.map(ReplicaInfo::Target)
                    }
                    ReplicaKind::Draft => self.replicas.draft_info(r).await.map(ReplicaInfo::Draft),
                }
            })
            .await
            .map_err(|s| replica_err(kind, r, s))?;
        let problems = match (kind, info.model()) {
            (_, None) => vec!["its Info has no model description".to_owned()],
            (ReplicaKind::Target, Some(m)) => target_mismatches(&self.identity, m),
            (ReplicaKind::Draft, Some(m)) => match target.or(self.reference.get()) {
                Some(t) => draft_mismatches(&self.identity, t, m),
                // No target to compare with yet: checked again when one is at hand.
                None => Vec::new(),
            },
        };
        if problems.is_empty() {
            if let (ReplicaKind::Target, Some(m), ReplicaInfo::Target(t)) =
                (kind, info.model(), info)
            {
                let _ = self.reference.set(m.clone());
                self.adopt_verify_costs(r, &t.verify_costs);
            }
            if let ReplicaInfo::Draft(d) = info {
                self.adopt_level_costs(r, &d.level_costs);
            }
            return Ok(info);
        }
        let reason = problems.join("; ");
        if !r.is_refused() {
            r.refuse();
            tracing::error!(%kind, replica = %r.addr, %reason, "replica refused: its model is incompatible with this deployment");
            specllava_telemetry::metrics().record_refused_replica(kind.as_str());
        }
        Err(OrchestratorError::Incompatible {
            kind,
            addr: r.addr.to_string(),
            reason,
        })
    }

    /// Checks every replica of `set` now (targets before drafts, so that drafts have a
    /// target to compare with): at start-up and after discovery adds replicas.
    pub async fn check_replicas(&self, kind: ReplicaKind) -> CheckReport {
        let set = match kind {
            ReplicaKind::Draft => &self.drafts,
            ReplicaKind::Target => &self.targets,
        };
        let mut report = CheckReport::default();
        for r in set.replicas() {
            match self.checked_info(kind, &r, None).await {
                Ok(_) => report.compatible += 1,
                Err(OrchestratorError::Incompatible { addr, reason, .. }) => {
                    report.refused.push(format!("{addr}: {reason}"));
                }
                Err(e) => {
                    tracing::debug!(%kind, replica = %r.addr, error = %e, "replica not checked (unreachable)");
                    report.unreachable += 1;
                }
            }
        }
        report
    }

    /// Probes every replica on probation (failed, backoff over) with an `Info` call under
    /// its deadline, all at once: an answer puts it back in rotation, a failure keeps it
    /// out for a doubled backoff. Run periodically, so that a replica that came back takes
    /// sessions again without a client's request being the test.
    pub async fn probe_replicas(&self) {
        let probes = [
            (ReplicaKind::Target, &self.targets),
            (ReplicaKind::Draft, &self.drafts),
        ]
        .into_iter()
        .flat_map(|(kind, set)| set.replicas().into_iter().map(move |r| (kind, r)))
        .filter(|(_, r)| r.on_probation() && !r.is_gone() && !r.is_refused())
        .map(|(kind, r)| async move {
            // The outcome is recorded by the call itself ([`Guarded`]).
            let answered = match kind {
                ReplicaKind::Target => self.replicas.target_info(&r).await.is_ok(),
                ReplicaKind::Draft => self.replicas.draft_info(&r).await.is_ok(),
            };
            tracing::debug!(%kind, replica = %r.addr, answered, "replica probed");
        });
        futures::future::join_all(probes).await;
    }

    /// Replaces the budget policy's verify-cost prior by the first target replica's
    /// start-up measurement (online updates refine it from then on). Replicas are assumed
    /// to run on the same kind of device.
    fn adopt_verify_costs(&self, r: &Replica, costs: &[pb::VerifyCost]) {
        if costs.is_empty() || self.verify_cost_measured.swap(true, Ordering::SeqCst) {
            return;
        }
        match verify_cost_table(costs) {
            Ok(table) => {
                if let Ok(mut policy) = self.policy.lock() {
                    policy.cost.verify = table;
                }
                tracing::info!(replica = %r.addr, points = costs.len(), "budget policy uses the target's measured verify cost");
            }
            Err(e) => {
                self.verify_cost_measured.store(false, Ordering::SeqCst);
                tracing::warn!(replica = %r.addr, error = %e, "ignoring the target's verify cost report");
            }
        }
    }

    /// Replaces the budget policy's draft-cost prior by the first draft replica's start-up
    /// measurement of its cost per level (online updates refine it from then on).
    fn adopt_level_costs(&self, r: &Replica, costs: &[pb::LevelCost]) {
        if costs.is_empty() || self.draft_cost_calibrated.swap(true, Ordering::SeqCst) {
            return;
        }
        let points: Vec<(usize, f64)> = costs
            .iter()
            .map(|c| (c.rows as usize, c.forward_ns as f64))
            .collect();
        let fitted = self.policy.lock().map(|mut policy| {
            policy
                .cost
                .calibrate_draft(&points)
                .map(|()| (policy.cost.draft_level_ns, policy.cost.draft_node_ns))
        });
        match fitted {
            Ok(Ok((level_ns, node_ns))) => {
                self.draft_cost_measured.store(true, Ordering::Relaxed);
                tracing::info!(replica = %r.addr, points = costs.len(), level_ns, node_ns, "budget policy uses the draft's measured cost per level");
            }
            Ok(Err(e)) => {
                self.draft_cost_calibrated.store(false, Ordering::SeqCst);
                tracing::warn!(replica = %r.addr, error = %e, "ignoring the draft's cost report");
            }
            Err(_) => self.draft_cost_calibrated.store(false, Ordering::SeqCst),
        }
    }

    // ---------------------------------------------------------------------------------
    // Replica sessions

    /// Opens the session on `rs` or brings it up to date with the history; returns the
    /// replica's prefill time.
    async fn sync(
        &self,
        kind: ReplicaKind,
        rs: &mut ReplicaSession,
        conv_id: &str,
        history: &[u32],
        images: &[Vec<u8>],
        features: Option<&[pb::VisionFeatures]>,
    ) -> Result<u64, OrchestratorError> {
        let image_id = self.identity.image_token_id;
        let planned = plan_sync(kind, rs, conv_id, history, images, features, image_id)?;
        let Some(planned) = planned else {
            return Ok(0);
        };
        let reply = planned.run(self.replicas.as_ref()).await;
        self.finish_sync(rs, conv_id, &planned, reply).await
    }

    /// Records a sync's answer in `rs`. A session that already exists where it was to be
    /// opened (a previous incarnation) is closed, so that the next attempt replaces it.
    async fn finish_sync(
        &self,
        rs: &mut ReplicaSession,
        conv_id: &str,
        planned: &PlannedSync,
        reply: Result<SyncReply, Status>,
    ) -> Result<u64, OrchestratorError> {
        match reply {
            Ok(reply) => {
                planned.apply(rs, &reply);
                Ok(reply.forward_ns)
            }
            Err(s) => {
                if planned.opens() && s.code() == Code::AlreadyExists {
                    close_session(
                        self.replicas.as_ref(),
                        planned.kind,
                        &planned.replica,
                        conv_id,
                    )
                    .await;
                    rs.opened = false;
                }
                Err(replica_err(planned.kind, &planned.replica, s))
            }
        }
    }

    /// Closes a session on a replica in the background (best effort, under the call's
    /// deadline): a stuck replica never holds up the caller.
    fn close_in_background(&self, kind: ReplicaKind, r: Arc<Replica>, id: &str) {
        let replicas = Arc::clone(&self.replicas);
        let id = id.to_owned();
        tokio::spawn(async move { close_session(replicas.as_ref(), kind, &r, &id).await });
    }

    /// Closes the conversation's sessions on both replicas, in the background (they
    /// reopen from the history if the conversation continues).
    pub fn close_replicas(&self, conv: &mut Conversation) {
        for (kind, rs) in [
            (ReplicaKind::Target, conv.target.as_mut()),
            (ReplicaKind::Draft, conv.draft.as_mut()),
        ] {
            if let Some(rs) = rs.filter(|rs| rs.opened) {
                rs.opened = false;
                self.close_in_background(kind, Arc::clone(rs.pin.replica()), &conv.id);
            }
        }
    }

    /// Keeps `slot` pinned to a `kind` replica in rotation: when its replica is out
    /// (failed, gone, refused), the session moves to another one, avoiding the one it
    /// leaves (where it is closed in the background). Whether a replica is pinned.
    fn ensure_pinned(
        &self,
        kind: ReplicaKind,
        slot: &mut Option<ReplicaSession>,
        id: &str,
    ) -> bool {
        if slot
            .as_ref()
            .is_some_and(|rs| rs.pin.replica().is_available())
        {
            return true;
        }
        let set = match kind {
            ReplicaKind::Draft => &self.drafts,
            ReplicaKind::Target => &self.targets,
        };
        let left = slot.take();
        let exclude = left.as_ref().map(|rs| rs.pin.replica().addr);
        if let Some(rs) = left.filter(|rs| rs.opened) {
            self.close_in_background(kind, Arc::clone(rs.pin.replica()), id);
        }
        *slot = set.pin(exclude).map(ReplicaSession::new);
        if let (Some(from), Some(to)) = (exclude, slot.as_ref()) {
            tracing::info!(%kind, %from, to = %to.pin.replica().addr, session = id, "session re-pinned");
        }
        slot.is_some()
    }

    /// Pins a compatible target, checks it and syncs it, re-pinning / re-prefilling on
    /// failure; returns the target's `Info`.
    async fn ensure_target(
        &self,
        conv: &mut Conversation,
        stats: &mut Stats,
    ) -> Result<pb::InfoResponse, OrchestratorError> {
        let mut last_err = None;
        // A failed replica is out of rotation, so each one costs one attempt at most: the
        // turn fails over to every target in rotation before it fails.
        let attempts = self.cfg.target_attempts + self.targets.replicas().len();
        for _attempt in 0..attempts {
            if !self.ensure_pinned(ReplicaKind::Target, &mut conv.target, &conv.id) {
                if let Some(e) = &last_err {
                    tracing::warn!(error = %e, "no target replica left");
                }
                return Err(OrchestratorError::NoReplica(ReplicaKind::Target));
            }
            let t = conv.target.as_mut().expect("pinned above");
            let r = Arc::clone(t.pin.replica());
            let synced = match self.checked_info(ReplicaKind::Target, &r, None).await {
                Ok(ReplicaInfo::Target(info)) => self
                    .sync(
                        ReplicaKind::Target,
                        t,
                        &conv.id,
                        &conv.history,
                        &conv.images,
                        features_for(&conv.image_features, &r),
                    )
                    .await
                    .map(|ns| (ns, info.clone())),
                Ok(ReplicaInfo::Draft(_)) => Err(OrchestratorError::Internal(
                    "a target replica answered as a draft".into(),
                )),
                Err(e) => Err(e),
            };
            match synced {
                Ok((ns, info)) => {
                    stats.prefill_ns += ns;
                    return Ok(info);
                }
                Err(e @ OrchestratorError::Incompatible { .. }) => {
                    conv.target = None;
                    last_err = Some(e);
                }
                Err(e) if e.is_replica_code(Code::NotFound) => {
                    t.opened = false;
                    last_err = Some(e);
                }
                Err(e) if e.is_replica_failure() => {
                    // Out of rotation already (every call feeds the replica's health): the
                    // next attempt re-pins. The replica may have gone: see the set as DNS
                    // sees it now.
                    tracing::warn!(error = %e, "target replica failed, re-pinning");
                    self.targets.refresh().await;
                    last_err = Some(e);
                }
                Err(e) if e.is_replica_code(Code::AlreadyExists) => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(OrchestratorError::NoReplica(ReplicaKind::Target)))
    }

    /// Pins and checks a draft and starts syncing the conversation's draft session in the
    /// background (the target decodes meanwhile: the first token never waits for the draft).
    /// With `early`, the set-up then opens the speculate stream and, with `Some` shape,
    /// drafts the turn's first tree.
    async fn start_draft_sync(
        &self,
        conv: &mut Conversation,
        early: Option<Option<DraftParams>>,
    ) -> DraftStart {
        if !self.ensure_pinned(ReplicaKind::Draft, &mut conv.draft, &conv.id) {
            return DraftStart::Unavailable;
        }
        let d = conv.draft.as_mut().expect("pinned above");
        let r = Arc::clone(d.pin.replica());
        if let Err(e) = self.checked_info(ReplicaKind::Draft, &r, None).await {
            self.draft_failed(conv, e).await;
            return DraftStart::Unavailable;
        }
        if !conv.draft.as_ref().is_some_and(|d| d.opened) {
            self.share_vision_features(conv, &r).await;
        }
        let image_id = self.identity.image_token_id;
        let d = conv.draft.as_mut().expect("pinned above");
        match plan_sync(
            ReplicaKind::Draft,
            d,
            &conv.id,
            &conv.history,
            &conv.images,
            features_for(&conv.image_features, &r),
            image_id,
        ) {
            Ok(None) => DraftStart::Ready,
            Ok(Some(planned)) => {
                let root = *conv.history.last().expect("history is never empty");
                let early = early.map(|first_tree| {
                    let req = EarlyStream {
                        session_id: conv.id.clone(),
                        first_tree,
                        timeout: self.cfg.draft_timeout,
                    };
                    (req, root)
                });
                DraftStart::Running(DraftSetup::spawn(
                    Arc::clone(&self.replicas),
                    planned,
                    early,
                ))
            }
            Err(e) => {
                self.draft_failed(conv, e).await;
                DraftStart::Unavailable
            }
        }
    }

    /// Has the conversation's target encode its images once (`Target.EncodeImages`) when the
    /// `draft` computes the same vision features (same vision fingerprint): both sessions
    /// then prefill from the features, and the draft's set-up skips decoding the images and
    /// running its vision tower next to the target's prefill. Without them (no images, towers
    /// that differ, a failed call) the images travel as they are.
    async fn share_vision_features(&self, conv: &mut Conversation, draft: &Replica) {
        if conv.images.is_empty() || conv.image_features.is_some() {
            return;
        }
        let Some(target) = conv.target.as_ref().map(|t| Arc::clone(t.pin.replica())) else {
            return;
        };
        let fingerprint = |r: &Replica| {
            r.info
                .get()
                .and_then(ReplicaInfo::model)
                .map(|m| m.vision_fingerprint.clone())
                .unwrap_or_default()
        };
        let shared = fingerprint(&target);
        if shared.is_empty() || shared != fingerprint(draft) {
            return;
        }
        let req = pb::EncodeImagesRequest {
            images: conv.images.clone(),
        };
        match self.replicas.encode_images(&target, req).await {
            Ok(resp)
                if resp.vision_fingerprint == shared
                    && resp.features.len() == conv.images.len() =>
            {
                tracing::debug!(
                    images = resp.features.len(),
                    encode_us = resp.encode_ns / 1000,
                    "vision features shared"
                );
                conv.image_features = Some((shared, resp.features));
            }
            Ok(_) => tracing::warn!("EncodeImages answered other features; sending images"),
            Err(s) => tracing::debug!(status = %s, "EncodeImages failed; sending images"),
        }
    }

    /// The shape of the tree a turn's draft set-up drafts for the first step: the step's
    /// shape as the policy (or the request) has it now, within the target's limits and, with
    /// [`EngineConfig::first_tree_verify_slack`], cut to the nodes whose verification costs at
    /// most that many times a root-only one (the next tree, pre-drafted while this one is
    /// verified, has the full shape). `None` when the first step would not draft or the
    /// target's limits are not known yet.
    fn first_tree_params(&self, conv: &Conversation, spec: &SpecSettings) -> Option<DraftParams> {
        let info = match conv.target.as_ref()?.pin.replica().info.get()? {
            ReplicaInfo::Target(info) => info,
            ReplicaInfo::Draft(_) => return None,
        };
        let max_context = info.model.as_ref()?.max_context as usize;
        let room = max_context.saturating_sub(conv.history.len() + 1);
        let batch = self.batch_estimate();
        let policy = self.policy.lock().expect("policy lock poisoned").clone();
        let choice = policy.choose(batch);
        let mut p = choose_params(&self.cfg.plan, spec, &choice, 0)?;
        if let Some(slack) = self.cfg.first_tree_verify_slack {
            let verify_limit = slack * policy.cost.verify_ns(1, batch);
            let nodes = (2..=p.budget + 1)
                .take_while(|&n| policy.cost.verify_ns(n, batch) <= verify_limit)
                .last()
                .unwrap_or(1);
            p.budget = p.budget.min(nodes - 1);
        }
        p.budget = p
            .budget
            .min((info.max_tree_nodes as usize).saturating_sub(1));
        p.depth = p
            .depth
            .min(p.budget)
            .min(room.saturating_sub(1))
            .min(info.max_tree_depth as usize);
        (p.depth > 0 && p.budget > 0).then_some(p)
    }

    /// Takes the result of the turn's background draft sync when it is done (or, with
    /// `wait`, waits for it) and, unless `wait`, attaches the draft to the turn.
    async fn join_draft(&self, conv: &mut Conversation, turn: &mut Turn<'_>, wait: bool) {
        let Some(setup) = turn.draft_setup.as_ref() else {
            return;
        };
        if !wait && !setup.is_finished() {
            let budget = self
                .cfg
                .draft_join_wait
                .saturating_sub(turn.started.elapsed());
            if budget.is_zero() {
                // Let the sync task run if it shares this thread (a current-thread runtime).
                tokio::task::yield_now().await;
            } else {
                // Wait (within the budget) for the task to finish; its result is taken below.
                let _ = tokio::time::timeout(budget, async {
                    while !setup.is_finished() {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
                .await;
            }
            if !turn.draft_setup.as_ref().is_some_and(|s| s.is_finished()) {
                return;
            }
        }
        let setup = turn.draft_setup.take().expect("checked above");
        if let Some(early) = self.finish_draft_setup(conv, setup).await
            && !wait
        {
            self.attach_draft(conv, turn, early).await;
        }
    }

    /// Waits for a background draft sync and records its outcome; `None` when it failed,
    /// else the stream and first tree it drafted, if any.
    async fn finish_draft_setup(
        &self,
        conv: &mut Conversation,
        mut setup: DraftSetup,
    ) -> Option<Option<(DraftStream, Option<FirstTree>)>> {
        let done = match tokio::time::timeout(self.cfg.draft_timeout, &mut setup.task).await {
            Ok(joined) => joined.unwrap_or_else(|e| SetupDone {
                reply: Err(Status::internal(format!("draft sync task: {e}"))),
                early: None,
            }),
            Err(_) => {
                setup.task.abort();
                SetupDone {
                    reply: Err(Status::deadline_exceeded("draft session sync timed out")),
                    early: None,
                }
            }
        };
        let id = conv.id.clone();
        let d = conv.draft.as_mut()?;
        match self.finish_sync(d, &id, &setup.planned, done.reply).await {
            Ok(_) => Some(done.early),
            Err(e) => {
                self.draft_failed(conv, e).await;
                None
            }
        }
    }

    /// Checks the synced draft against the turn's target and attaches its speculate stream:
    /// `early`'s (with the first tree it drafted), or one it opens now.
    async fn attach_draft(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        early: Option<(DraftStream, Option<FirstTree>)>,
    ) {
        let Some(d) = conv.draft.as_ref() else {
            return;
        };
        let r = Arc::clone(d.pin.replica());
        if let Err(e) = self
            .checked_info(ReplicaKind::Draft, &r, Some(&turn.target_model))
            .await
        {
            self.draft_failed(conv, e).await;
            return;
        }
        let stream = match early {
            Some((stream, first)) => {
                turn.first_tree = first;
                stream
            }
            None => match DraftStream::open(self.replicas.as_ref(), &r).await {
                Ok(stream) => stream,
                Err(s) => {
                    tracing::warn!(status = %s, "cannot open the speculate stream, continuing target-only");
                    return;
                }
            },
        };
        turn.draft = Some(stream);
        turn.stats.speculative = true;
    }

    /// Forgets a draft that failed (a lost session is reopened next time; a replica that
    /// failed is unpinned and the set refreshed).
    async fn draft_failed(&self, conv: &mut Conversation, e: OrchestratorError) {
        tracing::warn!(error = %e, "draft unavailable, continuing target-only");
        if e.is_replica_code(Code::NotFound) {
            if let Some(d) = conv.draft.as_mut() {
                d.opened = false;
            }
        } else {
            conv.draft = None;
            if e.is_replica_failure() {
                // The replica may have gone: see the set as DNS sees it now.
                self.drafts.refresh().await;
            }
        }
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
        tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<(), Interrupted> {
        let _active = ActiveTurn::new(Arc::clone(&self.active_turns));
        let result = self.run_turn(conv, prompt_tokens, params, spec, tx).await;
        // Shared vision features serve the turn's syncs only (they can be large).
        conv.image_features = None;
        result
    }

    /// [`Engine::generate`]'s turn.
    async fn run_turn(
        &self,
        conv: &mut Conversation,
        prompt_tokens: u32,
        params: &GenParams,
        spec: &SpecSettings,
        tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<(), Interrupted> {
        let mut turn = self.begin(conv, params, spec).await?;
        match self.decode(conv, &mut turn, tx).await {
            Ok(()) => self.end(conv, turn, prompt_tokens, tx).await,
            Err(e) => {
                // Keep knowing what the draft session holds (it is closed with the rest).
                self.join_draft(conv, &mut turn, true).await;
                Err(e)
            }
        }
    }

    /// The turn's steps, until it finishes or fails.
    async fn decode(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<(), Interrupted> {
        let params = turn.params;
        while turn.generated < params.max_new_tokens {
            if tx.is_closed() {
                return Err(Interrupted::Cancelled);
            }
            let kv_len = conv.target.as_ref().expect("ensured").kv_len;
            let room = turn.max_context.saturating_sub(kv_len + 1) as usize;
            if room == 0 {
                turn.finish = pb::FinishReason::Length;
                break;
            }
            let step_started = Instant::now();
            let proposal = match self.redeem_pre_draft(conv, turn, room) {
                Some(p) => p,
                None => self.draft_step(conv, turn, room).await,
            };
            // Pipelined: the draft pre-drafts the next tree while the target verifies.
            let asked = self.ask_pre_draft(conv, turn, &proposal, room).await;
            let verified = self.verify_step(conv, turn, &proposal).await;
            if let Some(params) = asked {
                turn.pre_draft = self.receive_pre_draft(conv, turn, params).await;
            }
            let Some(verified) = verified? else {
                // The target session was recovered: draft and verify again.
                turn.pre_draft = None;
                continue;
            };
            if verified.resp.emitted.is_empty() {
                turn.finish = pb::FinishReason::Length;
                break;
            }
            let (nodes, draft_rtt_ns) = (proposal.tree.tokens.len(), proposal.draft_rtt_ns);
            let draft_ns = draft_rtt_ns - proposal.draft_overhead_ns.unwrap_or(0);
            self.record_step(turn, proposal, &verified);
            let emit_started = Instant::now();
            let flow = self.emit(conv, turn, &verified.resp, tx).await?;
            // Where a step's time goes (`RUST_LOG=orchestrator=debug`), in microseconds.
            tracing::debug!(
                nodes,
                emitted = verified.resp.emitted.len(),
                draft_rtt_us = draft_rtt_ns / 1000,
                draft_us = draft_ns / 1000,
                verify_rtt_us = verified.rtt_ns / 1000,
                target_us = verified.resp.total_ns / 1000,
                forward_us = verified.resp.forward_ns / 1000,
                emit_us = emit_started.elapsed().as_micros() as u64,
                step_us = step_started.elapsed().as_micros() as u64,
                "step timing"
            );
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
            self.start_draft_sync(conv, Some(first)).await
        } else {
            DraftStart::Unavailable
        };
        let info = match self.ensure_target(conv, &mut stats).await {
            Ok(info) => info,
            Err(e) => {
                if let DraftStart::Running(setup) = draft_start {
                    // Keep knowing what the draft session holds.
                    self.finish_draft_setup(conv, setup).await;
                }
                return Err(e.into());
            }
        };
        let model = info.model.clone().unwrap_or_default();
        let eos: Vec<u32> = if params.ignore_eos {
            Vec::new()
        } else if model.eos_token_ids.is_empty() {
            vec![self.identity.eos_token_id]
        } else {
            model.eos_token_ids.clone()
        };
        let tree_limits = TreeLimits {
            max_nodes: info.max_tree_nodes as usize,
            max_depth: info.max_tree_depth as usize,
            vocab_size: model.vocab_size as usize,
        };
        let (ready, draft_setup) = match draft_start {
            DraftStart::Ready => (true, None),
            DraftStart::Running(setup) => (false, Some(setup)),
            DraftStart::Unavailable => (false, None),
        };
        let mut turn = Turn {
            params,
            spec,
            started,
            stats,
            eos,
            tree_limits,
            max_context: model.max_context,
            target_model: model,
            draft: None,
            first_tree: None,
            draft_setup,
            text: TextStream::new(params.stop.clone()),
            generated: 0,
            first_token_at: None,
            last_path: Vec::new(),
            acceptance: spec.mode.map(|_| {
                let mut a = self
                    .policy
                    .lock()
                    .expect("policy lock poisoned")
                    .acceptance
                    .clone();
                a.alpha = TURN_ACCEPTANCE_EMA;
                a
            }),
            choice: None,
            ahead: AheadBlock::default(),
            pre_draft: None,
            pipeline: PipelineGate::default(),
            finish: pb::FinishReason::Unspecified,
            recoveries: 0,
            draft_failovers: 0,
            prompt_len: conv.history.len(),
        };
        if ready {
            self.attach_draft(conv, &mut turn, None).await;
        } else {
            self.join_draft(conv, &mut turn, false).await;
        }
        // Where the time before the first step goes (`RUST_LOG=orchestrator=debug`).
        tracing::debug!(
            prefill_us = turn.stats.prefill_ns / 1000,
            begin_us = started.elapsed().as_micros() as u64,
            draft_attached = turn.draft.is_some(),
            first_tree = turn.first_tree.is_some(),
            "turn begun"
        );
        Ok(turn)
    }

    /// The tree to verify this step: the draft's, or a root-only tree without a draft.
    /// A failed draft step ends speculation for the turn (and closes the draft session:
    /// its state is unknown now) but never the turn.
    async fn draft_step(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        room: usize,
    ) -> Proposal {
        let root = *conv.history.last().expect("history is never empty");
        let root_only = Proposal {
            tree: pb::TokenTree {
                tokens: vec![root],
                parents: vec![-1],
                scores: vec![0.0],
            },
            drafted: false,
            draft_overhead_ns: None,
            draft_rtt_ns: 0,
            params: DraftParams::none(),
            ahead_sample: None,
            pipelined: None,
        };
        if turn.draft.is_none() {
            self.join_draft(conv, turn, false).await;
        }
        if turn.draft.is_none() {
            return root_only;
        }
        if let Some(first) = turn.first_tree.take()
            && let Some(proposal) = self.first_proposal(turn, first, root, room)
        {
            return proposal;
        }
        let p = self.step_params(turn, room);
        if p.depth == 0 || p.budget == 0 {
            // Not drafting this step: no round trip to the draft (it catches up next time).
            return root_only;
        }
        let d = conv
            .draft
            .as_mut()
            .expect("a draft stream implies a draft session");
        // The policy's turns: a clean sample of this step's draft-ahead arm.
        let ahead_sample = self
            .ahead_arm(turn)
            .and_then(|(on, sample)| sample.then_some(on));
        let req = pb::SpeculateRequest {
            session_id: conv.id.clone(),
            new_tokens: conv.history[d.synced..].to_vec(),
            accepted_path: std::mem::take(&mut turn.last_path),
            params: Some(draft_params_to_proto(&p)),
            // Draft-ahead runs as pipelined pre-drafts ([`Engine::ask_pre_draft`]), asked for
            // right after this answer when the turn's guesses hit: none in spare time.
            draft_ahead: false,
            answer_ahead: false,
        };
        let stream = turn.draft.as_mut().expect("checked above");
        let t0 = Instant::now();
        d.synced = conv.history.len();
        // The request and its tree under one deadline: a stuck draft holds up one step.
        let got = tokio::time::timeout(self.cfg.draft_timeout, async {
            match stream.requests.send(req).await {
                Ok(()) => stream.trees.next().await,
                Err(_) => Some(Err(Status::unavailable("draft stream closed"))),
            }
        })
        .await;
        match got {
            Ok(Some(Ok(t)))
                if t.tree
                    .as_ref()
                    .is_some_and(|x| x.tokens.first() == Some(&root)) =>
            {
                let rtt = nanos(t0.elapsed());
                turn.stats.record_draft(&t, rtt);
                self.observe_tree(&t);
                let tree = t.tree.expect("checked above");
                let drafted = tree.tokens.len() > 1;
                Proposal {
                    tree,
                    drafted,
                    draft_overhead_ns: Some(rtt.saturating_sub(t.draft_ns)),
                    draft_rtt_ns: rtt,
                    params: p,
                    ahead_sample,
                    pipelined: None,
                }
            }
            other => {
                let failure = self.draft_failure(other);
                tracing::warn!(failure = ?failure, "draft step failed, continuing target-only");
                self.draft_lost(conv, turn, failure).await;
                root_only
            }
        }
    }

    /// The first tree the draft's set-up drafted, as this step's tree: when it is still for
    /// the history's root (no target-only step came first) and fits the context left and the
    /// target's limits. Drafted while the target prefilled, it costs the step no round trip.
    fn first_proposal(
        &self,
        turn: &mut Turn<'_>,
        first: FirstTree,
        root: u32,
        room: usize,
    ) -> Option<Proposal> {
        let tree = first.answer.tree.as_ref()?;
        let fits = first.root == root
            && first.params.depth < room
            && tree.tokens.len() <= turn.tree_limits.max_nodes
            && first.params.depth <= turn.tree_limits.max_depth;
        tracing::debug!(
            fits,
            nodes = tree.tokens.len(),
            rtt_us = first.rtt_ns / 1000,
            "first tree from the draft's set-up"
        );
        if !fits {
            // The draft drops its rows when the next request reports the history.
            return None;
        }
        // Drafted while the target prefilled: no draft time of the step's own, and a draft
        // time that shared the machine with the prefill is no measure of a step's.
        specllava_telemetry::metrics()
            .drafted_nodes_per_step
            .observe(f64::from(first.answer.drafted_nodes));
        let ahead_sample = self
            .ahead_arm(turn)
            .and_then(|(on, sample)| sample.then_some(on));
        let tree = first.answer.tree?;
        Some(Proposal {
            drafted: tree.tokens.len() > 1,
            tree,
            draft_overhead_ns: None,
            draft_rtt_ns: 0,
            params: first.params,
            ahead_sample,
            pipelined: None,
        })
    }

    /// The metrics and the budget policy learn from a drafted tree.
    fn observe_tree(&self, t: &pb::DraftTree) {
        specllava_telemetry::metrics()
            .drafted_nodes_per_step
            .observe(f64::from(t.drafted_nodes));
        self.draft_cost_measured.store(true, Ordering::Relaxed);
        if let Ok(mut pol) = self.policy.lock() {
            pol.observe_draft(
                t.levels as usize,
                t.drafted_nodes as usize + 1,
                t.draft_ns as f64,
            );
        }
    }

    /// The replica failure behind a draft stream answer that was not a usable tree (`None`
    /// when the replica is fine: a bad tree or a refused request).
    fn draft_failure(
        &self,
        got: Result<Option<Result<pb::DraftTree, Status>>, tokio::time::error::Elapsed>,
    ) -> Option<Status> {
        match got {
            Err(_) => Some(Status::deadline_exceeded(format!(
                "no draft tree within {} ms",
                self.cfg.draft_timeout.as_millis()
            ))),
            Ok(None) => Some(Status::unavailable("the draft stream ended")),
            Ok(Some(Err(s))) => is_replica_failure(&s).then_some(s),
            Ok(Some(Ok(_))) => None,
        }
    }

    /// The step's tree shape: the policy's (or the request's) within the context left and
    /// the target's tree limits.
    fn step_params(&self, turn: &mut Turn<'_>, room: usize) -> DraftParams {
        let mut p = self.choose_params(turn).unwrap_or_else(DraftParams::none);
        p.depth = p
            .depth
            .min(room.saturating_sub(1))
            .min(turn.tree_limits.max_depth);
        p.budget = p.budget.min(turn.tree_limits.max_nodes.saturating_sub(1));
        p
    }

    /// For the policy's turns with draft-ahead on: the draft-ahead arm of this step (blocks
    /// of steps, see [`crate::ahead`]) and whether the step is a clean sample of it. `None`
    /// for other turns (draft-ahead follows the request and the replicas).
    fn ahead_arm(&self, turn: &mut Turn<'_>) -> Option<(bool, bool)> {
        if !(turn.spec.draft_ahead && self.cfg.draft_ahead && turn.spec.is_adaptive()) {
            return None;
        }
        let on = turn.ahead.next_step(|| {
            self.ahead_gate
                .lock()
                .expect("ahead gate lock poisoned")
                .pick()
        });
        Some((on, turn.ahead.is_sample()))
    }

    /// The turn's pre-draft as this step's tree, when the target's last outcome is the one
    /// it assumed (and the tree fits the context left); one that does not match is dropped.
    fn redeem_pre_draft(
        &self,
        conv: &Conversation,
        turn: &mut Turn<'_>,
        room: usize,
    ) -> Option<Proposal> {
        let pre = turn.pre_draft.take()?;
        let d = conv.draft.as_ref()?;
        turn.draft.as_ref()?;
        let emitted = conv.history.get(d.synced..).unwrap_or_default();
        // Shaped for the context left after the previous tree's deepest acceptance (see
        // `ask_pre_draft`); checked again in case the context filled differently.
        let fits = pre.params.depth < room;
        let hit = pre.path == turn.last_path && pre.emitted == emitted;
        turn.pipeline.observe(hit);
        tracing::debug!(hit, fits, hit_rate = turn.pipeline.hit_rate, "pre-draft");
        if !hit || !fits {
            // A miss: the draft reports it in its answer to the step's request.
            return None;
        }
        // A step of the current block; a clean sample of the "on" arm when the block is on.
        let ahead_sample = self
            .ahead_arm(turn)
            .and_then(|(on, sample)| (on && sample).then_some(true));
        Some(Proposal {
            tree: pre.tree,
            drafted: true,
            // No draft round trip: nothing for the policy's draft overhead to learn.
            draft_overhead_ns: None,
            draft_rtt_ns: 0,
            params: pre.params,
            ahead_sample,
            pipelined: Some(pre.draft_ns),
        })
    }

    /// Asks the draft for the tree after the likeliest outcome of `proposal` (pipelined
    /// speculation), reporting the last outcome if the draft has not heard it yet: when the
    /// proposal is drafted and draft-ahead is on for the step (a pre-draft the step uses
    /// keeps the pipeline going). The shape asked for, `None` when nothing was asked.
    async fn ask_pre_draft(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        proposal: &Proposal,
        room: usize,
    ) -> Option<DraftParams> {
        let on = turn.spec.draft_ahead
            && self.cfg.draft_ahead
            && (proposal.pipelined.is_some() || turn.ahead.on || !turn.spec.is_adaptive());
        // After a hit the draft hears the outcome this way; otherwise only while the turn's
        // pre-drafts hit often enough.
        if !proposal.drafted || !on || (proposal.pipelined.is_none() && !turn.pipeline.ask()) {
            return None;
        }
        // The pre-draft is the next step's tree: shaped as that step would be, within the
        // context left after this tree's deepest acceptance (its depth is at most the depth
        // it was drafted for).
        let depth = proposal.params.depth;
        let params = self.step_params(turn, room.saturating_sub(depth + 1));
        if params.depth == 0 || params.budget == 0 {
            return None;
        }
        let (Some(d), Some(stream)) = (conv.draft.as_mut(), turn.draft.as_mut()) else {
            return None;
        };
        let req = pb::SpeculateRequest {
            session_id: conv.id.clone(),
            new_tokens: conv.history[d.synced..].to_vec(),
            accepted_path: std::mem::take(&mut turn.last_path),
            params: Some(draft_params_to_proto(&params)),
            draft_ahead: false,
            answer_ahead: true,
        };
        d.synced = conv.history.len();
        match tokio::time::timeout(self.cfg.draft_timeout, stream.requests.send(req)).await {
            Ok(Ok(())) => Some(params),
            _ => {
                let failure = Status::unavailable("draft stream closed");
                self.draft_lost(conv, turn, Some(failure)).await;
                None
            }
        }
    }

    /// The draft's answer to [`Engine::ask_pre_draft`] (`None` when it pre-drafted nothing;
    /// a failure ends speculation for the turn like a failed draft step).
    async fn receive_pre_draft(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        params: DraftParams,
    ) -> Option<PreDraft> {
        let stream = turn.draft.as_mut()?;
        let got = tokio::time::timeout(self.cfg.draft_timeout, stream.trees.next()).await;
        match got {
            Ok(Some(Ok(t))) => {
                if t.levels > 0
                    && let Ok(mut pol) = self.policy.lock()
                {
                    pol.observe_draft(
                        t.levels as usize,
                        t.drafted_nodes as usize + 1,
                        t.draft_ns as f64,
                    );
                }
                let tree = t.tree?;
                // A usable pre-draft: drafted nodes below the last token it assumes.
                let usable = tree.tokens.len() > 1
                    && tree.tokens.first() == t.assumed_emitted.last()
                    && !t.assumed_path.is_empty();
                usable.then_some(PreDraft {
                    tree,
                    path: t.assumed_path,
                    emitted: t.assumed_emitted,
                    params,
                    draft_ns: t.draft_ns,
                })
            }
            other => {
                let failure = self.draft_failure(other);
                tracing::warn!(failure = ?failure, "pre-draft failed, continuing target-only");
                self.draft_lost(conv, turn, failure).await;
                None
            }
        }
    }

    /// Drops the turn's draft after a failed step: its session (state unknown now) is
    /// closed in the background. When the replica itself failed (`failure`), it is out of
    /// rotation and another draft replica, if one is in rotation, takes over: its session
    /// syncs in the background while the target decodes (at most `max_recoveries` times a
    /// turn).
    async fn draft_lost(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        failure: Option<Status>,
    ) {
        turn.draft = None;
        let Some(d) = conv.draft.as_mut() else {
            return;
        };
        let r = Arc::clone(d.pin.replica());
        if std::mem::take(&mut d.opened) {
            self.close_in_background(ReplicaKind::Draft, Arc::clone(&r), &conv.id);
        }
        let Some(why) = failure else {
            return;
        };
        r.mark_down(ReplicaKind::Draft, &why);
        if turn.draft_failovers >= self.cfg.max_recoveries {
            return;
        }
        turn.draft_failovers += 1;
        match self.start_draft_sync(conv, None).await {
            DraftStart::Ready => self.attach_draft(conv, turn, None).await,
            DraftStart::Running(setup) => turn.draft_setup = Some(setup),
            DraftStart::Unavailable => {}
        }
    }

    /// Whether a speculative turn sets up its draft: always, unless the policy shapes it
    /// and expects no gain from drafting at the current load (once draft costs are
    /// measured); then only every [`PlanConfig::explore_turns`]-th such turn does (how
    /// large the batches of drafting turns are, and so whether drafting pays under load,
    /// is only learnt by drafting).
    fn turn_drafts(&self, spec: &SpecSettings) -> bool {
        if !spec.is_adaptive() || !self.draft_cost_measured.load(Ordering::Relaxed) {
            return true;
        }
        let batch = self.batch_estimate();
        let policy = self.policy.lock().expect("policy lock poisoned").clone();
        if policy.choose(batch).depth > 0 {
            return true;
        }
        let n = self.undrafted_turns.fetch_add(1, Ordering::Relaxed) + 1;
        let explore = u64::from(self.cfg.plan.explore_turns.max(1));
        n.is_multiple_of(explore)
    }

    /// The batch size trees are sized for: the target batches drafted steps joined lately
    /// (all steps' until a step drafted; the turns generating now are rarely all in one
    /// batch), at most the turns generating now (the batches seen lately may belong to a
    /// load that is over).
    fn batch_estimate(&self) -> usize {
        let drafted = f64::from_bits(self.drafted_batch.load(Ordering::Relaxed));
        let seen = if drafted.is_nan() {
            f64::from_bits(self.target_batch.load(Ordering::Relaxed))
        } else {
            drafted
        };
        let seen = seen.round().max(1.0) as usize;
        seen.min(self.active_turns.load(Ordering::Relaxed).max(1))
    }

    /// The step's shape: the request's overrides, the policy's choice for the current
    /// load (asked again every [`CHOICE_STEPS`] steps or when the batch size changes),
    /// the fallback shape.
    fn choose_params(&self, turn: &mut Turn<'_>) -> Option<DraftParams> {
        turn.spec.mode?;
        let step = turn.stats.steps;
        let batch = self.batch_estimate();
        let fresh = turn
            .choice
            .filter(|c| c.batch == batch && step.saturating_sub(c.step) < CHOICE_STEPS);
        let params = match fresh {
            Some(c) => c.params,
            None => {
                // Search a snapshot: other turns need the policy meanwhile.
                let policy = self.policy.lock().expect("policy lock poisoned").clone();
                let params = match turn.acceptance.as_ref() {
                    Some(a) => policy.choose_for(a, batch),
                    None => policy.choose(batch),
                };
                tracing::debug!(
                    ?params,
                    batch,
                    draft_level_ns = policy.cost.draft_level_ns,
                    draft_node_ns = policy.cost.draft_node_ns,
                    draft_overhead_ns = policy.cost.draft_overhead_ns,
                    verify_overhead_ns = policy.cost.verify_overhead_ns,
                    verify_1 = policy.cost.verify_ns(1, batch),
                    verify_5 = policy.cost.verify_ns(5, batch),
                    accept_d1 = turn.acceptance.as_ref().map(|a| a.rate(1, 0)),
                    accept_d3 = turn.acceptance.as_ref().map(|a| a.rate(3, 0)),
                    "budget policy choice"
                );
                turn.choice = Some(Choice {
                    params,
                    step,
                    batch,
                });
                params
            }
        };
        choose_params(&self.cfg.plan, turn.spec, &params, step)
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
                self.ensure_target(conv, &mut turn.stats).await?;
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

    /// Statistics, metrics and the budget policy learn from a verified step.
    fn record_step(&self, turn: &mut Turn<'_>, proposal: Proposal, verified: &Verified) {
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
                let measured = (proposal.draft_rtt_ns + verified.rtt_ns) as f64;
                if let Ok(mut gate) = self.ahead_gate.lock() {
                    gate.observe(ahead, measured, predicted);
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
            turn.last_path = resp.accepted_path.clone();
            if let Ok(tree) = tree_from_proto(proposal.tree, &turn.tree_limits) {
                let outcome = verify_outcome_from_proto(resp);
                if let Some(a) = turn.acceptance.as_mut() {
                    a.observe(&tree, &outcome);
                }
                if let Ok(mut pol) = self.policy.lock() {
                    pol.observe(&tree, &outcome);
                }
            }
        }
        if turn.first_token_at.is_none() {
            turn.first_token_at = Some(turn.started.elapsed());
        }
    }

    /// Streams the text of the emitted tokens (up to a stop string); `Stop` when the turn
    /// is finished (stop string, EOS, length).
    async fn emit(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        resp: &pb::VerifyResponse,
        tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<Flow, Interrupted> {
        let emitted = resp.emitted.clone();
        let delta = self
            .detokenize(&mut turn.text, move |text, tok| text.push(tok, &emitted))
            .await?;
        // Tokens past a stop string are not part of the answer.
        let taken = &resp.emitted[..delta.consumed];
        turn.generated += taken.len() as u32;
        send_chunk(tx, taken.to_vec(), delta.text).await?;
        if delta.stopped {
            turn.finish = pb::FinishReason::StopString;
            let keep = self
                .detokenize(&mut turn.text, |text, tok| Ok(text.tokens_before_stop(tok)))
                .await?;
            if let Some(keep) = keep {
                conv.truncate_history(turn.prompt_len + keep);
            }
            return Ok(Flow::Stop);
        }
        let f = finish_from_proto(resp.finish);
        if f != pb::FinishReason::Unspecified {
            turn.finish = f;
            return Ok(Flow::Stop);
        }
        Ok(Flow::Continue)
    }

    /// Runs `f` on the turn's text stream on a blocking thread (detokenization never runs
    /// on the async executor).
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
        tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<(), Interrupted> {
        if turn.finish == pb::FinishReason::Unspecified {
            turn.finish = pb::FinishReason::Length;
        }
        let tail: Delta = self
            .detokenize(&mut turn.text, |text, tok| text.finish(tok))
            .await?;
        if !tail.text.is_empty() {
            send_chunk(tx, Vec::new(), tail.text).await?;
        }
        drop(turn.draft.take());
        conv.turns += 1;
        let total = turn.started.elapsed();
        let ttft = turn.first_token_at.unwrap_or(total);
        let summary = pb::GenerateSummary {
            finish: turn.finish as i32,
            usage: Some(pb::Usage {
                prompt_tokens,
                completion_tokens: turn.generated,
            }),
            stats: Some(turn.stats.summary(turn.generated, total, ttft)),
            text: turn.text.text().to_owned(),
        };
        let msg = pb::GenerateResponse {
            event: Some(pb::generate_response::Event::Summary(summary)),
        };
        let sent = tx.send(Ok(msg)).await;
        // A draft sync still running (a short turn) is waited for after the answer, so the
        // conversation knows what its draft session holds.
        self.join_draft(conv, &mut turn, true).await;
        sent.map_err(|_| Interrupted::Cancelled)
    }
}

/// Streams one chunk; the client going away cancels the turn.
async fn send_chunk(
    tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    token_ids: Vec<u32>,
    text: String,
) -> Result<(), Interrupted> {
    let chunk = pb::GenerateResponse {
        event: Some(pb::generate_response::Event::Chunk(pb::TokenChunk {
            token_ids,
            text,
        })),
    };
    tx.send(Ok(chunk)).await.map_err(|_| Interrupted::Cancelled)
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

/// The conversation's shared vision features, for a replica whose vision fingerprint they
/// were computed with.
fn features_for<'c>(
    features: &'c Option<(String, Vec<pb::VisionFeatures>)>,
    r: &Replica,
) -> Option<&'c [pb::VisionFeatures]> {
    let (fingerprint, features) = features.as_ref()?;
    let model = r.info.get()?.model()?;
    (&model.vision_fingerprint == fingerprint).then_some(features.as_slice())
}
