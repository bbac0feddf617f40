//! The engine's draft side: a turn's draft session set up in the background (with the shared
//! vision features and the first tree, [`crate::setup`]), attached when ready and dropped
//! when it fails; each step's tree shape (the request's, or the budget policy's for the
//! current load) and the draft round trip that drafts it.

use super::*;

impl Engine {
    /// Pins and checks a draft and starts syncing the conversation's draft session in the
    /// background (the target decodes meanwhile: the first token never waits for the draft).
    /// At a turn's start (`start`, not a failover mid-turn) the set-up then opens the
    /// speculate stream and drafts the turn's first tree (when it has a shape), and a
    /// conversation whose target and draft sessions both open first has the draft prefill from
    /// the target's vision features ([`FeatureSource`]).
    pub(super) async fn start_draft_sync(
        &self,
        conv: &mut Conversation,
        start: Option<TurnStart>,
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
        let opening = |rs: Option<&ReplicaSession>| !rs.is_some_and(|rs| rs.opened);
        let features =
            (start.is_some() && opening(conv.draft.as_ref()) && opening(conv.target.as_ref()))
                .then(|| feature_source(conv, &r, self.cfg.draft_timeout / 2))
                .flatten();
        let image_id = self.identity.image_token_id;
        let d = conv.draft.as_mut().expect("pinned above");
        match plan_sync(
            ReplicaKind::Draft,
            d,
            &conv.id,
            &conv.history,
            &conv.images,
            image_id,
            None,
        ) {
            Ok(None) => DraftStart::Ready,
            Ok(Some(planned)) => {
                let early = start.map(|start| EarlyStream {
                    session_id: conv.id.clone(),
                    first_tree: start.first_tree,
                    timeout: self.cfg.draft_timeout,
                    history_len: conv.history.len(),
                    root: *conv.history.last().expect("history is never empty"),
                });
                DraftStart::Running(DraftSetup::spawn(
                    Arc::clone(&self.replicas),
                    planned,
                    features,
                    early,
                ))
            }
            Err(e) => {
                self.draft_failed(conv, e).await;
                DraftStart::Unavailable
            }
        }
    }

    /// The shape of the tree a turn's draft set-up drafts for the first step: the step's
    /// shape as the policy (or the request) has it now, within the target's limits and, with
    /// [`EngineConfig::first_tree_verify_slack`], cut to the nodes whose verification costs at
    /// most that many times a root-only one (the next tree, pre-drafted while this one is
    /// verified, has the full shape). `None` when the first step would not draft or the
    /// target's limits are not known yet.
    pub(super) fn first_tree_params(
        &self,
        conv: &Conversation,
        spec: &SpecSettings,
    ) -> Option<DraftParams> {
        let info = match conv.target.as_ref()?.pin.replica().info.get()? {
            ReplicaInfo::Target(info) => info,
            ReplicaInfo::Draft(_) => return None,
        };
        let model = info.model.as_ref()?;
        let rows = kv_rows(
            &conv.history,
            conv.history.len(),
            self.identity.image_token_id,
            model.num_image_tokens,
        ) as usize;
        let room = (model.max_context as usize).saturating_sub(rows + 1);
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
    pub(super) async fn join_draft(
        &self,
        conv: &mut Conversation,
        turn: &mut Turn<'_>,
        wait: bool,
    ) {
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
    pub(super) async fn finish_draft_setup(
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
        match self.finish_sync(d, &id, &setup.target, done.reply).await {
            Ok(_) => Some(done.early),
            Err(e) => {
                self.draft_failed(conv, e).await;
                None
            }
        }
    }

    /// Checks the synced draft against the turn's target and attaches its speculate stream:
    /// `early`'s (with the first tree it drafted), or one it opens now.
    pub(super) async fn attach_draft(
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
    pub(super) async fn draft_failed(&self, conv: &mut Conversation, e: OrchestratorError) {
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

    /// The tree to verify this step: the draft's, or a root-only tree without a draft.
    /// A failed draft step ends speculation for the turn (and closes the draft session:
    /// its state is unknown now) but never the turn.
    pub(super) async fn draft_step(
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
            below: None,
        };
        if turn.draft.is_none() {
            self.join_draft(conv, turn, false).await;
        }
        if turn.draft.is_none() {
            return root_only;
        }
        if let Some(first) = turn.first_tree.take()
            && let Some(proposal) = self.first_proposal(turn, first, &conv.history, room)
        {
            return proposal;
        }
        let p = self.step_params(turn, room);
        if p.depth == 0 || p.budget == 0 {
            // Not drafting this step: no round trip to the draft (it catches up next time).
            return root_only;
        }
        // The policy's turns: a clean sample of this step's draft-ahead arm.
        let ahead_sample = self
            .ahead_arm(turn)
            .and_then(|(on, sample)| sample.then_some(on));
        let req = speculate_request(conv, &mut turn.last_path, &p, false);
        let stream = turn.draft.as_mut().expect("checked above");
        let t0 = Instant::now();
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
                // Network and calls only: the wait for the draft worker is other sessions'
                // work (as a verify's queueing, see `record_step`).
                let overhead = rtt.saturating_sub(draft_service_ns(&t));
                let tree = t.tree.expect("checked above");
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

    /// The first tree the draft's set-up drafted, as this step's tree: when the history
    /// has gone on from its root only with tokens it drafted (when target-only steps came
    /// first while the draft set up: then the subtree below them), and it fits the context
    /// left and the target's limits. Drafted while the target prefilled (or decoded), it
    /// costs the step no round trip. A tree of its root alone serves no step: the step asks
    /// the draft.
    pub(super) fn first_proposal(
        &self,
        turn: &mut Turn<'_>,
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
                && sub.tree.tokens.len() <= turn.tree_limits.max_nodes
                && sub.depth <= turn.tree_limits.max_depth
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
        let ahead_sample = self
            .ahead_arm(turn)
            .and_then(|(on, sample)| sample.then_some(on));
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
        })
    }

    /// The metrics and the budget policy learn from a drafted tree.
    pub(super) fn observe_tree(&self, t: &pb::DraftTree) {
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
    pub(super) fn draft_failure(
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
    pub(super) fn step_params(&self, turn: &mut Turn<'_>, room: usize) -> DraftParams {
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
    pub(super) fn ahead_arm(&self, turn: &mut Turn<'_>) -> Option<(bool, bool)> {
        if !(turn.spec.draft_ahead && self.cfg.draft_ahead && turn.spec.is_adaptive()) {
            return None;
        }
        let kind = ahead_kind(turn);
        let on = turn
            .ahead
            .next_step(|| self.ahead_gates.lock().expect("ahead gate lock poisoned")[kind].pick());
        Some((on, turn.ahead.is_sample()))
    }

    /// Drops the turn's draft after a failed step: its session (state unknown now) is
    /// closed in the background. When the replica itself failed (`failure`), it is out of
    /// rotation and another draft replica, if one is in rotation, takes over: its session
    /// syncs in the background while the target decodes (at most `max_recoveries` times a
    /// turn).
    pub(super) async fn draft_lost(
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
    pub(super) fn turn_drafts(&self, spec: &SpecSettings) -> bool {
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
    pub(super) fn batch_estimate(&self) -> usize {
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
    pub(super) fn choose_params(&self, turn: &mut Turn<'_>) -> Option<DraftParams> {
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
}

/// The next request on the turn's speculate stream: the history the draft session has not
/// seen yet (which it now has), the last verified path and the shape wanted; with
/// `answer_ahead`, the pre-draft after the tree being verified instead of the tree for the
/// root. Draft-ahead otherwise runs only as such pipelined pre-drafts, never in the draft's
/// spare time.
pub(super) fn speculate_request(
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

/// The conversation's target as the source of `draft`'s vision features, waited for at most
/// `timeout`, when it has images and the two towers are the same (same vision fingerprint).
fn feature_source(
    conv: &Conversation,
    draft: &Replica,
    timeout: Duration,
) -> Option<FeatureSource> {
    if conv.images.is_empty() {
        return None;
    }
    let target = Arc::clone(conv.target.as_ref()?.pin.replica());
    let fingerprint = |r: &Replica| {
        r.info
            .get()
            .and_then(ReplicaInfo::model)
            .map(|m| m.vision_fingerprint.clone())
            .unwrap_or_default()
    };
    let shared = fingerprint(&target);
    (!shared.is_empty() && shared == fingerprint(draft)).then_some(FeatureSource {
        target,
        fingerprint: shared,
        timeout,
    })
}
