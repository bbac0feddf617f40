//! The generation engine: syncs a conversation onto its replicas, runs the
//! draft -> verify loop, streams accepted tokens and collects statistics.
//!
//! Correctness never depends on the draft: every emitted token comes from the
//! target's `Verify` (a root-only tree when there is no draft), so losing the
//! draft only costs speed. Replica failures (NOT_FOUND after eviction,
//! UNAVAILABLE) are recovered by re-prefilling from the authoritative history.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use specllava_proto::v1 as pb;
use specllava_proto::v1::draft_client::DraftClient;
use specllava_proto::v1::target_client::TargetClient;
use specllava_telemetry::TraceContextInterceptor;
use speculate::{
    BudgetPolicy, CostModel, DraftParams, PolicySpace, TokenTree, TreeLimits, TreeMode,
    VerifyCostTable,
};
use tokio::sync::mpsc;
use tonic::{Code, Status};

use crate::error::OrchestratorError;
use crate::routing::{Replica, ReplicaSet};
use crate::session::{Conversation, ReplicaSession, kv_rows};
use crate::text::{Detokenize, TextStream};

/// Validated sampling and stopping parameters of one generation.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Token budget.
    pub max_new_tokens: u32,
    /// Sampling (validated).
    pub sampling: pb::SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Ignore EOS.
    pub ignore_eos: bool,
}

/// Speculation settings of one generation.
#[derive(Debug, Clone, Copy)]
pub struct SpecSettings {
    /// Tree shape, `None` = off (target-only).
    pub mode: Option<TreeMode>,
    /// D override (0 = policy).
    pub depth: usize,
    /// K override (0 = policy).
    pub branching: usize,
    /// M override (0 = policy).
    pub budget: usize,
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// One draft step longer than this falls back to target-only.
    pub draft_timeout: Duration,
    /// Timeout of one target call.
    pub target_timeout: Duration,
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

/// Shared state of all generations.
pub struct Engine {
    tokenizer: Arc<dyn Detokenize + Send + Sync>,
    image_token_id: u32,
    tokenizer_eos: u32,
    drafts: Arc<ReplicaSet>,
    targets: Arc<ReplicaSet>,
    policy: Mutex<BudgetPolicy>,
    /// Whether the policy's verify cost comes from a target replica's measurement yet.
    verify_cost_measured: std::sync::atomic::AtomicBool,
    active: std::sync::atomic::AtomicUsize,
    cfg: EngineConfig,
}

/// Statistics accumulated during a generation.
#[derive(Debug, Default)]
struct Stats {
    steps: u32,
    spec_steps: u32,
    drafted: u32,
    accepted: u32,
    reached: Vec<u32>,
    draft_ns: u64,
    verify_ns: u64,
    network_ns: u64,
    prefill_ns: u64,
    speculative: bool,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn replica_err(service: &'static str, r: &Replica, status: Status) -> OrchestratorError {
    OrchestratorError::Replica {
        service,
        addr: r.addr.to_string(),
        status,
    }
}

/// The CPU-flavoured prior of the costs, used until a target replica reports its measured
/// verify cost (then refined online).
fn default_policy() -> BudgetPolicy {
    let verify = VerifyCostTable::new(
        vec![1, 16, 64, 256],
        vec![1, 8],
        vec![8e6, 10e6, 16e6, 40e6, 20e6, 30e6, 60e6, 200e6],
    )
    .expect("static table is valid");
    BudgetPolicy::new(
        CostModel::new(2e6, 1e5, verify),
        PolicySpace {
            max_depth: 8,
            max_branching: 6,
            max_budget: 48,
        },
    )
}

impl Engine {
    /// An engine over the given replica sets.
    pub fn new(
        tokenizer: Arc<dyn Detokenize + Send + Sync>,
        image_token_id: u32,
        tokenizer_eos: u32,
        drafts: Arc<ReplicaSet>,
        targets: Arc<ReplicaSet>,
        cfg: EngineConfig,
    ) -> Self {
        Self {
            tokenizer,
            image_token_id,
            tokenizer_eos,
            drafts,
            targets,
            policy: Mutex::new(default_policy()),
            verify_cost_measured: std::sync::atomic::AtomicBool::new(false),
            active: std::sync::atomic::AtomicUsize::new(0),
            cfg,
        }
    }

    /// The draft replica set.
    pub fn drafts(&self) -> &Arc<ReplicaSet> {
        &self.drafts
    }

    /// The target replica set.
    pub fn targets(&self) -> &Arc<ReplicaSet> {
        &self.targets
    }

    /// Model information of a target replica (fetched once).
    async fn target_info(&self, r: &Arc<Replica>) -> Result<pb::InfoResponse, OrchestratorError> {
        let info = r
            .info
            .get_or_try_init(|| async {
                let mut c =
                    TargetClient::with_interceptor(r.channel.clone(), TraceContextInterceptor);
                c.info(pb::InfoRequest {}).await.map(|x| x.into_inner())
            })
            .await
            .map_err(|s| replica_err("target", r, s))?;
        self.adopt_verify_costs(r, &info.verify_costs);
        Ok(info.clone())
    }

    /// Replaces the budget policy's static verify-cost prior by the first target replica's
    /// start-up measurement (online updates refine it from then on). Replicas are assumed to
    /// run on the same kind of device.
    fn adopt_verify_costs(&self, r: &Replica, costs: &[pb::VerifyCost]) {
        use std::sync::atomic::Ordering;
        if costs.is_empty() || self.verify_cost_measured.swap(true, Ordering::SeqCst) {
            return;
        }
        let axis = |f: fn(&pb::VerifyCost) -> u32| {
            let mut v: Vec<usize> = costs.iter().map(|c| f(c) as usize).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let (nodes, batches) = (axis(|c| c.nodes), axis(|c| c.batch));
        // Batch-major grid, as VerifyCostTable wants it; a missing point rejects the report.
        let grid: Option<Vec<f64>> = batches
            .iter()
            .flat_map(|&b| nodes.iter().map(move |&n| (b, n)))
            .map(|(b, n)| {
                costs
                    .iter()
                    .find(|c| c.batch as usize == b && c.nodes as usize == n)
                    .map(|c| c.forward_ns as f64)
            })
            .collect();
        let table = grid
            .ok_or_else(|| "not a full nodes x batch grid".to_owned())
            .and_then(|ns| VerifyCostTable::new(nodes, batches, ns).map_err(|e| e.to_string()));
        match table {
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

    /// Opens the session on `rs` or brings it up to date with the history.
    async fn sync(
        &self,
        service: &'static str,
        rs: &mut ReplicaSession,
        conv_id: &str,
        history: &[u32],
        images: &[Vec<u8>],
    ) -> Result<u64, OrchestratorError> {
        let r = Arc::clone(rs.pin.replica());
        let channel = r.channel.clone();
        if !rs.opened {
            let req = pb::OpenSessionRequest {
                session_id: conv_id.to_owned(),
                images: images.to_vec(),
                token_ids: history.to_vec(),
            };
            let resp = match service {
                "draft" => {
                    DraftClient::with_interceptor(channel, TraceContextInterceptor)
                        .open_session(req)
                        .await
                }
                _ => {
                    TargetClient::with_interceptor(channel, TraceContextInterceptor)
                        .open_session(req)
                        .await
                }
            };
            let resp = match resp {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == Code::AlreadyExists => {
                    // A previous incarnation is still there: replace it.
                    self.close_on(service, &r, conv_id).await;
                    rs.opened = false;
                    return Err(replica_err(service, &r, s));
                }
                Err(s) => return Err(replica_err(service, &r, s)),
            };
            rs.opened = true;
            rs.synced = history.len();
            rs.kv_len = resp.kv_len;
            rs.num_image_tokens = resp.num_image_tokens;
            return Ok(resp.prefill_ns);
        }
        if rs.synced == history.len() {
            return Ok(0);
        }
        let keep_h = rs.synced.min(history.len()).max(1) - 1;
        let keep = kv_rows(history, keep_h, self.image_token_id, rs.num_image_tokens);
        let skip_images = history[..keep_h]
            .iter()
            .filter(|&&t| t == self.image_token_id)
            .count();
        let tokens = history[keep_h..].to_vec();
        let n_images = tokens.iter().filter(|&&t| t == self.image_token_id).count();
        let req = pb::AppendRequest {
            session_id: conv_id.to_owned(),
            keep_kv_len: keep,
            token_ids: tokens,
            images: images
                .get(skip_images..skip_images + n_images)
                .ok_or_else(|| {
                    OrchestratorError::Internal(format!(
                        "history holds more image placeholders than the session has images ({})",
                        images.len()
                    ))
                })?
                .to_vec(),
        };
        let resp = match service {
            "draft" => {
                DraftClient::with_interceptor(channel, TraceContextInterceptor)
                    .append(req)
                    .await
            }
            _ => {
                TargetClient::with_interceptor(channel, TraceContextInterceptor)
                    .append(req)
                    .await
            }
        }
        .map_err(|s| replica_err(service, &r, s))?
        .into_inner();
        rs.synced = history.len();
        rs.kv_len = resp.kv_len;
        Ok(resp.forward_ns)
    }

    /// Closes a session on a replica (best effort).
    async fn close_on(&self, service: &'static str, r: &Arc<Replica>, id: &str) {
        let req = pb::CloseSessionRequest {
            session_id: id.to_owned(),
        };
        let res = match service {
            "draft" => DraftClient::with_interceptor(r.channel.clone(), TraceContextInterceptor)
                .close_session(req)
                .await
                .map(|_| ()),
            _ => TargetClient::with_interceptor(r.channel.clone(), TraceContextInterceptor)
                .close_session(req)
                .await
                .map(|_| ()),
        };
        if let Err(s) = res {
            tracing::debug!(service, addr = %r.addr, status = %s, "close failed");
        }
    }

    /// Closes the conversation's sessions on both replicas (they reopen from
    /// the history if the conversation continues).
    pub async fn close_replicas(&self, conv: &mut Conversation) {
        if let Some(t) = conv.target.as_mut().filter(|t| t.opened) {
            t.opened = false;
            let r = Arc::clone(t.pin.replica());
            self.close_on("target", &r, &conv.id).await;
        }
        if let Some(d) = conv.draft.as_mut().filter(|d| d.opened) {
            d.opened = false;
            let r = Arc::clone(d.pin.replica());
            self.close_on("draft", &r, &conv.id).await;
        }
    }

    /// Pins and syncs the target, re-pinning / re-prefilling on failure.
    async fn ensure_target(
        &self,
        conv: &mut Conversation,
        stats: &mut Stats,
    ) -> Result<(), OrchestratorError> {
        let mut last_err = None;
        for _attempt in 0..3 {
            if conv
                .target
                .as_ref()
                .is_none_or(|t| t.pin.replica().is_gone())
            {
                let exclude = conv.target.as_ref().map(|t| t.pin.replica().addr);
                let pin = self
                    .targets
                    .pin(exclude)
                    .ok_or(OrchestratorError::NoReplica("target"))?;
                conv.target = Some(ReplicaSession::new(pin));
            }
            let t = conv.target.as_mut().expect("pinned above");
            match self
                .sync("target", t, &conv.id, &conv.history, &conv.images)
                .await
            {
                Ok(ns) => {
                    stats.prefill_ns += ns;
                    return Ok(());
                }
                Err(e) if e.is_replica_code(Code::NotFound) => {
                    t.opened = false;
                    last_err = Some(e);
                }
                Err(e)
                    if e.is_replica_code(Code::Unavailable)
                        || e.is_replica_code(Code::AlreadyExists) =>
                {
                    tracing::warn!(error = %e, "target replica failed, re-pinning");
                    if e.is_replica_code(Code::Unavailable) {
                        conv.target = None;
                        self.targets.refresh().await;
                    }
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(OrchestratorError::NoReplica("target")))
    }

    /// Pins and syncs the draft; `false` when no draft can be used.
    async fn ensure_draft(&self, conv: &mut Conversation, stats: &mut Stats) -> bool {
        if conv
            .draft
            .as_ref()
            .is_none_or(|d| d.pin.replica().is_gone())
        {
            match self.drafts.pin(None) {
                Some(pin) => conv.draft = Some(ReplicaSession::new(pin)),
                None => return false,
            }
        }
        let d = conv.draft.as_mut().expect("pinned above");
        match self
            .sync("draft", d, &conv.id, &conv.history, &conv.images)
            .await
        {
            Ok(ns) => {
                stats.prefill_ns += ns;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "draft unavailable, continuing target-only");
                if e.is_replica_code(Code::NotFound) {
                    d.opened = false;
                } else {
                    conv.draft = None;
                    if e.is_replica_code(Code::Unavailable) {
                        // The replica may have gone: see the set as DNS sees it now.
                        self.drafts.refresh().await;
                    }
                }
                false
            }
        }
    }

    fn choose_params(&self, spec: &SpecSettings, step: u32) -> Option<DraftParams> {
        let mode = spec.mode?;
        let batch = self
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(1);
        let policy = self
            .policy
            .lock()
            .expect("policy lock poisoned")
            .choose(batch);
        let pick = |o: usize, p: usize, fallback: usize| {
            if o > 0 {
                o
            } else if p > 0 {
                p
            } else {
                fallback
            }
        };
        let p = match mode {
            TreeMode::Chain => DraftParams::chain(pick(spec.depth, policy.depth, 4)),
            TreeMode::Static => DraftParams::static_tree(
                pick(spec.depth, policy.depth, 4),
                pick(spec.branching, policy.branching, 2),
                pick(spec.budget, policy.budget, 16),
            ),
            TreeMode::Dynamic => {
                if spec.depth == 0
                    && spec.branching == 0
                    && spec.budget == 0
                    && policy.depth == 0
                    && step % 4 != 3
                {
                    // The policy prefers no drafting; probe every 4th step to keep learning.
                    return Some(DraftParams::none());
                }
                let d = pick(spec.depth, policy.depth, 4);
                let k = pick(spec.branching, policy.branching.max(2), 4);
                let m = pick(spec.budget, policy.budget.max(d), 16);
                DraftParams::dynamic(d, k, m)
            }
        };
        Some(p)
    }

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
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let res = self
            .generate_inner(conv, prompt_tokens, params, spec, tx)
            .await;
        self.active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        res
    }

    async fn generate_inner(
        &self,
        conv: &mut Conversation,
        prompt_tokens: u32,
        params: &GenParams,
        spec: &SpecSettings,
        tx: &mpsc::Sender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<(), Interrupted> {
        let started = Instant::now();
        let mut stats = Stats::default();
        self.ensure_target(conv, &mut stats).await?;
        let target_replica = Arc::clone(conv.target.as_ref().expect("ensured").pin.replica());
        let info = self.target_info(&target_replica).await?;
        let eos: Vec<u32> = if params.ignore_eos {
            Vec::new()
        } else if info.eos_token_ids.is_empty() {
            vec![self.tokenizer_eos]
        } else {
            info.eos_token_ids.clone()
        };
        let tree_limits = TreeLimits {
            max_nodes: info.max_tree_nodes as usize,
            max_depth: info.max_tree_depth as usize,
            vocab_size: info.vocab_size as usize,
        };

        // The draft stream (None: target-only).
        let mut draft = None;
        if spec.mode.is_some() && self.ensure_draft(conv, &mut stats).await {
            let d = conv.draft.as_ref().expect("ensured");
            let (req_tx, req_rx) = mpsc::channel::<pb::SpeculateRequest>(2);
            let mut client = DraftClient::with_interceptor(
                d.pin.replica().channel.clone(),
                TraceContextInterceptor,
            );
            match client
                .speculate(tokio_stream::wrappers::ReceiverStream::new(req_rx))
                .await
            {
                Ok(resp) => draft = Some((req_tx, resp.into_inner())),
                Err(s) => {
                    tracing::warn!(status = %s, "cannot open the speculate stream, continuing target-only");
                }
            }
        }
        stats.speculative = draft.is_some();

        let mut text = TextStream::new(params.stop.clone());
        let mut generated: u32 = 0;
        let mut first_token_at: Option<Duration> = None;
        let mut last_path: Vec<u32> = Vec::new();
        let mut finish = pb::FinishReason::Unspecified;
        let mut recoveries = 0;
        let prompt_len = conv.history.len();
        while generated < params.max_new_tokens {
            if tx.is_closed() {
                return Err(Interrupted::Cancelled);
            }
            let remaining = params.max_new_tokens - generated;
            let target = conv.target.as_ref().expect("ensured");
            let room = (info.max_context as i64 - target.kv_len as i64 - 1).max(0) as usize;
            if room == 0 {
                finish = pb::FinishReason::Length;
                break;
            }
            let root = *conv.history.last().expect("history is never empty");

            // Draft a tree.
            let mut tree = pb::TokenTree {
                tokens: vec![root],
                parents: vec![-1],
                scores: vec![0.0],
            };
            let mut from_draft = false;
            if let Some((req_tx, stream)) = draft.as_mut() {
                let mut p = self
                    .choose_params(spec, stats.steps)
                    .unwrap_or_else(DraftParams::none);
                p.depth = p
                    .depth
                    .min(room.saturating_sub(1))
                    .min(tree_limits.max_depth);
                p.budget = p.budget.min(tree_limits.max_nodes.saturating_sub(1));
                let d = conv
                    .draft
                    .as_mut()
                    .expect("draft stream implies a draft session");
                let req = pb::SpeculateRequest {
                    session_id: conv.id.clone(),
                    new_tokens: conv.history[d.synced..].to_vec(),
                    accepted_path: std::mem::take(&mut last_path),
                    params: Some(pb::DraftParams {
                        mode: match p.mode {
                            TreeMode::Dynamic => pb::TreeMode::Dynamic,
                            TreeMode::Static => pb::TreeMode::Static,
                            TreeMode::Chain => pb::TreeMode::Chain,
                        } as i32,
                        depth: p.depth as u32,
                        branching: p.branching as u32,
                        budget: p.budget as u32,
                    }),
                };
                let t0 = Instant::now();
                let got = if req_tx.send(req).await.is_ok() {
                    d.synced = conv.history.len();
                    tokio::time::timeout(self.cfg.draft_timeout, stream.message()).await
                } else {
                    Ok(Err(Status::unavailable("draft stream closed")))
                };
                match got {
                    Ok(Ok(Some(t)))
                        if t.tree
                            .as_ref()
                            .is_some_and(|x| x.tokens.first() == Some(&root)) =>
                    {
                        let rtt = ns(t0.elapsed());
                        stats.draft_ns += t.draft_ns;
                        specllava_telemetry::metrics()
                            .drafted_nodes_per_step
                            .observe(f64::from(t.drafted_nodes));
                        stats.network_ns += rtt.saturating_sub(t.draft_ns);
                        if let Ok(mut pol) = self.policy.lock() {
                            pol.observe_draft(
                                t.levels as usize,
                                t.drafted_nodes as usize + 1,
                                t.draft_ns as f64,
                            );
                        }
                        tree = t.tree.expect("checked above");
                        from_draft = tree.tokens.len() > 1;
                    }
                    other => {
                        tracing::warn!(?other, "draft step failed, continuing target-only");
                        draft = None;
                        // The draft's state is unknown now: reopen it next time.
                        if let Some(d) = conv.draft.as_mut() {
                            d.opened = false;
                            let r = Arc::clone(d.pin.replica());
                            self.close_on("draft", &r, &conv.id).await;
                        }
                    }
                }
            }

            // Verify it.
            let target = conv.target.as_mut().expect("ensured");
            let nodes = tree.tokens.len();
            let req = pb::VerifyRequest {
                session_id: conv.id.clone(),
                expected_kv_len: target.kv_len,
                tree: Some(tree.clone()),
                sampling: Some(params.sampling),
                stop: Some(pb::StopConditions {
                    eos_token_ids: eos.clone(),
                    max_new_tokens: remaining,
                }),
            };
            let t0 = Instant::now();
            let mut client = TargetClient::with_interceptor(
                target.pin.replica().channel.clone(),
                TraceContextInterceptor,
            );
            let resp = match tokio::time::timeout(self.cfg.target_timeout, client.verify(req)).await
            {
                Ok(Ok(r)) => r.into_inner(),
                Ok(Err(s))
                    if recoveries < 3 && matches!(s.code(), Code::NotFound | Code::Unavailable) =>
                {
                    // Evicted or replica lost: re-prefill from the history and retry.
                    tracing::warn!(status = %s, "target session lost, re-prefilling");
                    recoveries += 1;
                    target.opened = false;
                    if s.code() == Code::Unavailable {
                        conv.target = None;
                        self.targets.refresh().await;
                    }
                    self.ensure_target(conv, &mut stats).await?;
                    continue;
                }
                Ok(Err(s)) => {
                    let r = Arc::clone(target.pin.replica());
                    return Err(replica_err("target", &r, s).into());
                }
                Err(_) => {
                    let r = Arc::clone(target.pin.replica());
                    return Err(replica_err(
                        "target",
                        &r,
                        Status::deadline_exceeded("verify timed out"),
                    )
                    .into());
                }
            };
            let rtt = ns(t0.elapsed());
            if resp.emitted.is_empty() {
                finish = pb::FinishReason::Length;
                break;
            }
            conv.history.extend_from_slice(&resp.emitted);
            target.kv_len = resp.kv_len;
            target.synced = conv.history.len();
            stats.steps += 1;
            specllava_telemetry::metrics()
                .accepted_tokens_per_step
                .observe(resp.emitted.len() as f64);
            stats.verify_ns += resp.forward_ns;
            stats.network_ns += rtt.saturating_sub(resp.total_ns);
            if let Ok(mut pol) = self.policy.lock() {
                pol.observe_verify(
                    nodes,
                    resp.batch_size.max(1) as usize,
                    resp.forward_ns as f64,
                );
            }
            if from_draft {
                stats.spec_steps += 1;
                stats.drafted += resp.proposed;
                stats.accepted += resp.accepted;
                let a = resp.accepted as usize;
                if stats.reached.len() < a {
                    stats.reached.resize(a, 0);
                }
                for r in &mut stats.reached[..a] {
                    *r += 1;
                }
                last_path = resp.accepted_path.clone();
                if let Ok(t) = TokenTree::new(tree.tokens, tree.parents, tree.scores, &tree_limits)
                {
                    let outcome = speculate::VerifyOutcome {
                        accepted_path: resp.accepted_path.iter().map(|&i| i as usize).collect(),
                        emitted: resp.emitted.clone(),
                        proposed: resp.proposed as usize,
                        accepted: resp.accepted as usize,
                        finish: None,
                    };
                    if let Ok(mut pol) = self.policy.lock() {
                        pol.observe(&t, &outcome);
                    }
                }
            }
            if first_token_at.is_none() {
                first_token_at = Some(started.elapsed());
            }
            let delta = text
                .push(self.tokenizer.as_ref(), &resp.emitted)
                .map_err(|e| Interrupted::Failed(OrchestratorError::Internal(e)))?;
            // Tokens past a stop string are not part of the answer.
            let taken = &resp.emitted[..delta.consumed];
            generated += taken.len() as u32;
            let chunk = pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Chunk(pb::TokenChunk {
                    token_ids: taken.to_vec(),
                    text: delta.text,
                })),
            };

            if tx.send(Ok(chunk)).await.is_err() {
                return Err(Interrupted::Cancelled);
            }
            if delta.stopped {
                finish = pb::FinishReason::StopString;
                if let Some(keep) = text.tokens_before_stop(self.tokenizer.as_ref()) {
                    conv.truncate_history(prompt_len + keep);
                }
                break;
            }
            let f =
                pb::FinishReason::try_from(resp.finish).unwrap_or(pb::FinishReason::Unspecified);
            if f != pb::FinishReason::Unspecified {
                finish = f;
                break;
            }
        }
        if finish == pb::FinishReason::Unspecified {
            finish = pb::FinishReason::Length;
        }
        let tail = text
            .finish(self.tokenizer.as_ref())
            .map_err(|e| Interrupted::Failed(OrchestratorError::Internal(e)))?;
        if !tail.text.is_empty() {
            let chunk = pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Chunk(pb::TokenChunk {
                    token_ids: vec![],
                    text: tail.text,
                })),
            };
            if tx.send(Ok(chunk)).await.is_err() {
                return Err(Interrupted::Cancelled);
            }
        }
        if let Some((req_tx, _)) = draft.take() {
            drop(req_tx);
        }
        conv.turns += 1;
        let total = started.elapsed();
        let ttft = first_token_at.unwrap_or(total);
        let decode_secs = total.saturating_sub(ttft).as_secs_f64();
        let summary = pb::GenerateSummary {
            finish: finish as i32,
            usage: Some(pb::Usage {
                prompt_tokens,
                completion_tokens: generated,
            }),
            stats: Some(pb::SpeculationStats {
                steps: stats.steps,
                drafted: stats.drafted,
                accepted: stats.accepted,
                mean_accepted_length: if stats.steps == 0 {
                    0.0
                } else {
                    generated as f32 / stats.steps as f32
                },
                acceptance_per_depth: stats
                    .reached
                    .iter()
                    .map(|&r| {
                        if stats.spec_steps == 0 {
                            0.0
                        } else {
                            r as f32 / stats.spec_steps as f32
                        }
                    })
                    .collect(),
                draft_ns: stats.draft_ns,
                verify_ns: stats.verify_ns,
                network_ns: stats.network_ns,
                total_ns: ns(total),
                time_to_first_token_ns: ns(ttft),
                prefill_ns: stats.prefill_ns,
                speculative: stats.speculative,
                tokens_per_second: if decode_secs > 0.0 {
                    (generated.saturating_sub(1)) as f32 / decode_secs as f32
                } else {
                    0.0
                },
            }),
            text: text.text().to_owned(),
        };
        let msg = pb::GenerateResponse {
            event: Some(pb::generate_response::Event::Summary(summary)),
        };
        if tx.send(Ok(msg)).await.is_err() {
            return Err(Interrupted::Cancelled);
        }
        Ok(())
    }
}
