//! The draft side of one turn, as one type: [`DraftLane`].
//!
//! A lane owns everything a turn keeps about its draft: the session's background set-up, the
//! speculate stream once attached, the first tree the set-up drafted, the pre-draft asked for
//! while the target verifies (and the gates that decide whether to ask), the last accepted
//! path the draft has not heard yet, the turn's own acceptance rates and the policy's last
//! choice of shape. The turn loop sees two calls:
//!
//! - [`DraftLane::propose`]: this step's tree: the pre-draft when the target's last outcome is
//!   the one it assumed, else the first tree, else a draft round trip, else a root-only tree
//!   (no draft, or the draft failed: the turn goes on target-only). When the step's tree is
//!   drafted and draft-ahead is on, the pre-draft after it is asked for at once, so the draft
//!   works while the target verifies.
//! - [`DraftLane::observe`]: the target's outcome (or `None` when the step is retried): the
//!   pre-draft's answer is received, and the draft's next request, the turn's acceptance rates
//!   and the budget policy learn from it.
//!
//! A draft that fails costs the turn only speed: the lane drops it (another draft replica takes
//! over while the target decodes, see [`DraftLane::lost`]).
//!
//! Words used here and in [`crate::ahead`]: a *pre-draft* is a tree drafted for a verification
//! outcome assumed before the target reports it; *draft-ahead* is making pre-drafts (on by
//! default, `disable_draft_ahead` turns it off); the draft service makes them on request
//! (`answer_ahead`, pipelined, the only way this engine asks) or in its spare time
//! (`draft_ahead`, which this engine does not ask for).

use super::*;

mod pipeline;

use pipeline::PreDraft;

/// The draft side of one turn (see the module doc).
pub(super) struct DraftLane<'a> {
    /// The turn's speculation settings.
    spec: &'a SpecSettings,
    /// Which draft-ahead gate the turn's steps feed and follow: 0 greedy, 1 sampled (their
    /// pre-drafts guess right at very different rates).
    gate: usize,
    /// The target's tree limits.
    tree_limits: TreeLimits,
    /// The target's model (what an attached draft is checked against).
    target_model: pb::ModelInfo,
    /// When the turn started (the set-up may be waited for until `draft_join_wait` after).
    started: Instant,
    /// The speculate stream; `None`: target-only (for now, while `setup` runs).
    stream: Option<DraftStream>,
    /// The draft session's sync, running in the background while the target decodes.
    setup: Option<DraftSetup>,
    /// The first tree the set-up drafted (used by the first drafting step, below the tokens
    /// the target emitted since, when they are tokens it drafted).
    first_tree: Option<FirstTree>,
    /// The pre-draft for the outcome of the tree being verified, used as the next tree when
    /// the target's outcome is the assumed one.
    pre_draft: Option<PreDraft>,
    /// Whether the turn's pre-drafts hit often enough to keep asking for them.
    pipeline: PipelineGate,
    /// Draft-ahead arm of the turn's current block of steps (adaptive turns).
    ahead: AheadBlock,
    /// Accepted path of the last drafted tree, for the draft's next request.
    last_path: Vec<u32>,
    /// This turn's own acceptance rates (starting from the policy's, learning fast): trees
    /// grow where the draft agrees with the target and shrink where it does not.
    acceptance: Option<AcceptanceStats>,
    /// The policy's last choice (reused for [`CHOICE_STEPS`] steps).
    choice: Option<Choice>,
    /// Draft replicas replaced in this turn.
    failovers: usize,
}

/// What a lane starts from at a turn's begin.
pub(super) struct LaneStart<'a> {
    /// The turn's speculation settings.
    pub(super) spec: &'a SpecSettings,
    /// Whether the turn samples (not greedy).
    pub(super) sampled: bool,
    /// The target's tree limits.
    pub(super) tree_limits: TreeLimits,
    /// The target's model.
    pub(super) target_model: pb::ModelInfo,
    /// When the turn started.
    pub(super) started: Instant,
}

impl<'a> DraftLane<'a> {
    /// The lane of a turn whose draft starts as `draft` (attached at once when it is in sync
    /// already, else when its set-up is done).
    pub(super) async fn open(
        engine: &Engine,
        conv: &mut Conversation,
        stats: &mut Stats,
        start: LaneStart<'a>,
        draft: DraftStart,
    ) -> Self {
        let acceptance = start.spec.mode.map(|_| {
            let mut a = engine
                .policy
                .lock()
                .expect("policy lock poisoned")
                .acceptance
                .clone();
            a.alpha = TURN_ACCEPTANCE_EMA;
            a
        });
        let mut lane = Self {
            spec: start.spec,
            gate: usize::from(start.sampled),
            tree_limits: start.tree_limits,
            target_model: start.target_model,
            started: start.started,
            stream: None,
            setup: None,
            first_tree: None,
            pre_draft: None,
            pipeline: PipelineGate::default(),
            ahead: AheadBlock::default(),
            last_path: Vec::new(),
            acceptance,
            choice: None,
            failovers: 0,
        };
        match draft {
            DraftStart::Ready => lane.attach(engine, conv, stats, None).await,
            DraftStart::Running(setup) => {
                lane.setup = Some(setup);
                lane.join(engine, conv, stats).await;
            }
            DraftStart::Unavailable => {}
        }
        lane
    }

    /// Whether a draft is attached (the turn speculates now).
    pub(super) fn is_attached(&self) -> bool {
        self.stream.is_some()
    }

    /// Whether the set-up's first tree waits for the first drafting step.
    pub(super) fn has_first_tree(&self) -> bool {
        self.first_tree.is_some()
    }

    /// The tree to verify this step, with `room` rows of context left (see the module doc).
    pub(super) async fn propose(
        &mut self,
        engine: &Engine,
        conv: &mut Conversation,
        stats: &mut Stats,
        room: usize,
    ) -> Proposal {
        let mut proposal = match self.redeem_pre_draft(engine, conv, room) {
            Some(p) => p,
            None => self.draft(engine, conv, stats, room).await,
        };
        proposal.pre_draft_asked = self
            .ask_pre_draft(engine, conv, stats, &proposal, room)
            .await;
        proposal
    }

    /// The target's answer to `proposal` (`None`: the step is retried, its target session
    /// recovered): the pre-draft asked for is received, and the lane and the budget policy
    /// learn from the outcome.
    pub(super) async fn observe(
        &mut self,
        engine: &Engine,
        conv: &mut Conversation,
        stats: &mut Stats,
        proposal: &Proposal,
        outcome: Option<&pb::VerifyResponse>,
    ) {
        if let Some(params) = proposal.pre_draft_asked {
            self.pre_draft = self.receive_pre_draft(engine, conv, stats, params).await;
        }
        let Some(resp) = outcome.filter(|resp| !resp.emitted.is_empty()) else {
            // Retried: the pre-draft assumed an outcome of a tree that is drafted again.
            self.pre_draft = None;
            return;
        };
        if !proposal.drafted {
            return;
        }
        // The draft hears the path in the tree it drafted.
        self.last_path = match &proposal.below {
            Some(below) => below.drafted_path(&resp.accepted_path),
            None => resp.accepted_path.clone(),
        };
        // A subtree's nodes were drafted deeper than they sit in it: acceptance by depth
        // learns from whole trees only.
        if proposal.below.is_some() {
            return;
        }
        let Ok(tree) = tree_from_proto(proposal.tree.clone(), &self.tree_limits) else {
            return;
        };
        let outcome = verify_outcome_from_proto(resp);
        if let Some(a) = self.acceptance.as_mut() {
            a.observe(&tree, &outcome);
        }
        if let Ok(mut pol) = engine.policy.lock() {
            pol.observe(&tree, &outcome);
        }
    }

    /// Drops the speculate stream (the turn drafts no more), so the draft's stream ends at once.
    pub(super) fn end_stream(&mut self) {
        self.stream = None;
    }

    /// Ends the lane: the stream is dropped and a set-up still running (a short turn) is
    /// waited for, so the conversation knows what its draft session holds.
    pub(super) async fn close(mut self, engine: &Engine, conv: &mut Conversation) {
        self.stream = None;
        if let Some(setup) = self.setup.take() {
            engine.finish_draft_setup(conv, setup).await;
        }
    }

    // ---------------------------------------------------------------------------------
    // Attaching the draft

    /// Takes the result of the background set-up when it is done (waiting at most until
    /// [`EngineConfig::draft_join_wait`] after the turn's start) and attaches the draft.
    async fn join(&mut self, engine: &Engine, conv: &mut Conversation, stats: &mut Stats) {
        let Some(setup) = self.setup.as_ref() else {
            return;
        };
        if !setup.is_finished() {
            let budget = engine
                .cfg
                .draft_join_wait
                .saturating_sub(self.started.elapsed());
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
        }
        let Some(setup) = self.setup.take_if(|setup| setup.is_finished()) else {
            return;
        };
        if let Some(early) = engine.finish_draft_setup(conv, setup).await {
            self.attach(engine, conv, stats, early).await;
        }
    }

    /// Checks the synced draft against the turn's target and attaches its speculate stream:
    /// `early`'s (with the first tree it drafted), or one it opens now.
    async fn attach(
        &mut self,
        engine: &Engine,
        conv: &mut Conversation,
        stats: &mut Stats,
        early: Option<(DraftStream, Option<FirstTree>)>,
    ) {
        let Some(d) = conv.draft.as_ref() else {
            return;
        };
        let r = Arc::clone(d.pin.replica());
        if let Err(e) = engine
            .checked_info(ReplicaKind::Draft, &r, Some(&self.target_model))
            .await
        {
            engine.draft_failed(conv, e).await;
            return;
        }
        let stream = match early {
            Some((stream, first)) => {
                self.first_tree = first;
                stream
            }
            None => match DraftStream::open(engine.replicas.as_ref(), &r).await {
                Ok(stream) => stream,
                Err(s) => {
                    tracing::warn!(status = %s, "cannot open the speculate stream, continuing target-only");
                    return;
                }
            },
        };
        self.stream = Some(stream);
        stats.speculative = true;
    }

    /// Drops the draft after a failed step: its session (state unknown now) is closed in the
    /// background. When the replica itself failed (`failure`), it is out of rotation and
    /// another draft replica, if one is in rotation, takes over: its session syncs in the
    /// background while the target decodes (at most `max_recoveries` times a turn).
    async fn lost(
        &mut self,
        engine: &Engine,
        conv: &mut Conversation,
        stats: &mut Stats,
        failure: Option<Status>,
    ) {
        self.stream = None;
        self.pre_draft = None;
        let Some(d) = conv.draft.as_mut() else {
            return;
        };
        let r = Arc::clone(d.pin.replica());
        if std::mem::take(&mut d.opened) {
            engine.close_in_background(ReplicaKind::Draft, Arc::clone(&r), &conv.id);
        }
        let Some(why) = failure else {
            return;
        };
        r.mark_down(ReplicaKind::Draft, &why);
        if self.failovers >= engine.cfg.max_recoveries {
            return;
        }
        self.failovers += 1;
        match engine.start_draft_sync(conv, None).await {
            DraftStart::Ready => self.attach(engine, conv, stats, None).await,
            DraftStart::Running(setup) => self.setup = Some(setup),
            DraftStart::Unavailable => {}
        }
    }

    // ---------------------------------------------------------------------------------
    // Drafting a step's tree

    /// The step's tree from the draft (the set-up's first tree, or a round trip), or a
    /// root-only tree without one. A failed draft step ends speculation for the turn (and
    /// closes the draft session: its state is unknown now) but never the turn.
    async fn draft(
        &mut self,
        engine: &Engine,
        conv: &mut Conversation,
        stats: &mut Stats,
        room: usize,
    ) -> Proposal {
        let root = *conv.history.last().expect("history is never empty");
        if self.stream.is_none() {
            self.join(engine, conv, stats).await;
        }
        if self.stream.is_none() {
            return Proposal::root_only(root);
        }
        if let Some(first) = self.first_tree.take()
            && let Some(proposal) = self.first_proposal(engine, first, &conv.history, room)
        {
            return proposal;
        }
        let p = self.step_params(engine, stats.steps, room);
        if p.depth == 0 || p.budget == 0 {
            // Not drafting this step: no round trip to the draft (it catches up next time).
            return Proposal::root_only(root);
        }
        // The policy's turns: a clean sample of this step's draft-ahead arm.
        let ahead_sample = self.ahead_arm(engine).and_then(ArmStep::sampled_arm);
        let Some(stream) = self.stream.as_mut() else {
            return Proposal::root_only(root);
        };
        let req = speculate_request(conv, &mut self.last_path, &p, false);
        let t0 = Instant::now();
        // The request and its tree under one deadline: a stuck draft holds up one step.
        let got = tokio::time::timeout(engine.cfg.draft_timeout, async {
            match stream.requests.send(req).await {
                Ok(()) => stream.trees.next().await,
                Err(_) => Some(Err(Status::unavailable("draft stream closed"))),
            }
        })
        .await;
        let answer = match got {
            Ok(Some(Ok(mut t))) => match t.tree.take() {
                Some(tree) if tree.tokens.first() == Some(&root) => Ok((t, tree)),
                _ => Err(None),
            },
            other => Err(engine.draft_failure(other)),
        };
        match answer {
            Ok((t, tree)) => {
                let rtt = nanos(t0.elapsed());
                stats.record_draft(&t, rtt);
                engine.observe_tree(&t);
                // Network and calls only: the wait for the draft worker is other sessions'
                // work (as a verify's queueing, see `record_step`).
                let overhead = rtt.saturating_sub(draft_service_ns(&t));
                let drafted = tree.tokens.len() > 1;
                Proposal {
                    tree,
                    drafted,
                    draft_overhead_ns: Some(overhead),
                    draft_rtt_ns: rtt,
                    params: p,
                    ahead_sample,
                    pipelined: None,
                    below: None,
                    pre_draft_asked: None,
                }
            }
            Err(failure) => {
                tracing::warn!(failure = ?failure, "draft step failed, continuing target-only");
                self.lost(engine, conv, stats, failure).await;
                Proposal::root_only(root)
            }
        }
    }

    /// The first tree the draft's set-up drafted, as this step's tree: when the history
    /// has gone on from its root only with tokens it drafted (when target-only steps came
    /// first while the draft set up: then the subtree below them), and it fits the context
    /// left and the target's limits. Drafted while the target prefilled (or decoded), it
    /// costs the step no round trip. A tree of its root alone serves no step: the step asks
    /// the draft.
    fn first_proposal(
        &mut self,
        engine: &Engine,
        first: FirstTree,
        history: &[u32],
        room: usize,
    ) -> Option<Proposal> {
        let emitted = history.get(first.history_len..)?;
        let drafted_for_root =
            first.history_len > 0 && history.get(first.history_len - 1) == Some(&first.root);
        let sub = first.after(emitted).filter(|_| drafted_for_root);
        let fits = sub.as_ref().is_some_and(|sub| {
            sub.tree.tokens.len() > 1
                && sub.depth < room
                && sub.tree.tokens.len() <= self.tree_limits.max_nodes
                && sub.depth <= self.tree_limits.max_depth
        });
        tracing::debug!(
            fits,
            emitted = emitted.len(),
            nodes = sub.as_ref().map_or(0, |s| s.tree.tokens.len()),
            rtt_us = first.rtt_ns / 1000,
            "first tree from the draft's set-up"
        );
        // One that does not serve: the draft drops its rows when the next request reports
        // the history.
        let sub = sub.filter(|_| fits)?;
        // Drafted next to the prefill: no draft time of the step's own, and a draft time
        // that shared the machine with it is no measure of a step's.
        specllava_telemetry::metrics()
            .drafted_nodes_per_step
            .observe(f64::from(first.answer.drafted_nodes));
        let ahead_sample = self.ahead_arm(engine).and_then(ArmStep::sampled_arm);
        let params = DraftParams {
            depth: sub.depth,
            budget: sub.tree.tokens.len() - 1,
            ..first.params
        };
        let below = (!emitted.is_empty()).then_some(Below {
            nodes: sub.nodes,
            path_above: sub.path_above,
        });
        Some(Proposal {
            tree: sub.tree,
            drafted: true,
            draft_overhead_ns: None,
            draft_rtt_ns: 0,
            params,
            ahead_sample,
            pipelined: None,
            below,
            pre_draft_asked: None,
        })
    }

    // ---------------------------------------------------------------------------------
    // The step's shape

    /// The shape of step `step`'s tree: the policy's (or the request's) within the context
    /// left and the target's tree limits.
    fn step_params(&mut self, engine: &Engine, step: u32, room: usize) -> DraftParams {
        let mut p = self
            .choose_params(engine, step)
            .unwrap_or_else(DraftParams::none);
        p.depth = p
            .depth
            .min(room.saturating_sub(1))
            .min(self.tree_limits.max_depth);
        p.budget = p.budget.min(self.tree_limits.max_nodes.saturating_sub(1));
        p
    }

    /// The step's shape: the request's overrides, the policy's choice for the current
    /// load (asked again every [`CHOICE_STEPS`] steps or when the batch size changes),
    /// the fallback shape.
    fn choose_params(&mut self, engine: &Engine, step: u32) -> Option<DraftParams> {
        self.spec.mode?;
        let batch = engine.batch_estimate();
        let fresh = self
            .choice
            .filter(|c| c.batch == batch && step.saturating_sub(c.step) < CHOICE_STEPS);
        let params = match fresh {
            Some(c) => c.params,
            None => {
                // Search a snapshot: other turns need the policy meanwhile.
                let policy = engine.policy.lock().expect("policy lock poisoned").clone();
                let params = match self.acceptance.as_ref() {
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
                    accept_d1 = self.acceptance.as_ref().map(|a| a.rate(1, 0)),
                    accept_d3 = self.acceptance.as_ref().map(|a| a.rate(3, 0)),
                    "budget policy choice"
                );
                self.choice = Some(Choice {
                    params,
                    step,
                    batch,
                });
                params
            }
        };
        choose_params(&engine.cfg.plan, self.spec, &params, step)
    }

    /// For the policy's turns with draft-ahead on: the draft-ahead arm of this step (blocks
    /// of steps, see [`crate::ahead`]) and whether the step is a clean sample of it. `None`
    /// for other turns (draft-ahead follows the request and the replicas).
    fn ahead_arm(&mut self, engine: &Engine) -> Option<ArmStep> {
        if !(self.spec.draft_ahead && engine.cfg.draft_ahead && self.spec.is_adaptive()) {
            return None;
        }
        let gate = self.gate;
        let on = self.ahead.next_step(|| {
            engine.ahead_gates.lock().expect("ahead gate lock poisoned")[gate].pick()
        });
        Some(ArmStep {
            on,
            sample: self.ahead.is_sample(),
        })
    }

    /// Which draft-ahead gate the turn's steps feed (see [`Engine::record_step`]).
    pub(super) fn gate(&self) -> usize {
        self.gate
    }
}

/// A step's draft-ahead arm.
#[derive(Debug, Clone, Copy)]
struct ArmStep {
    /// The arm: `true` pre-drafts.
    on: bool,
    /// Whether the step is a clean sample of it (not the first of a block that switched).
    sample: bool,
}

impl ArmStep {
    /// The arm this step samples, if it is a clean sample.
    fn sampled_arm(self) -> Option<bool> {
        self.sample.then_some(self.on)
    }
}

impl Proposal {
    /// A tree of the root alone: the step decodes one token target-only.
    fn root_only(root: u32) -> Self {
        Proposal {
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
            below: None,
            pre_draft_asked: None,
        }
    }
}

/// The next request on the turn's speculate stream: the history the draft session has not
/// seen yet (which it now has), the last verified path and the shape wanted; with
/// `answer_ahead`, the pre-draft after the tree being verified instead of the tree for the
/// root. Draft-ahead otherwise runs only as such pipelined pre-drafts, never in the draft's
/// spare time.
fn speculate_request(
    conv: &mut Conversation,
    last_path: &mut Vec<u32>,
    params: &DraftParams,
    answer_ahead: bool,
) -> pb::SpeculateRequest {
    let d = conv
        .draft
        .as_mut()
        .expect("a draft stream implies a draft session");
    let new_tokens = conv.history[d.synced..].to_vec();
    d.synced = conv.history.len();
    pb::SpeculateRequest {
        session_id: conv.id.clone(),
        new_tokens,
        accepted_path: std::mem::take(last_path),
        params: Some(draft_params_to_proto(params)),
        draft_ahead: false,
        answer_ahead,
    }
}
