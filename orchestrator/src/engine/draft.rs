//! The engine's draft replicas, shared by every turn: a conversation's draft session pinned,
//! checked and set up in the background (with the shared vision features and the first tree,
//! [`crate::setup`]), forgotten when it fails; the first tree's shape, whether a turn drafts
//! at all, the batch size trees are sized for, and what the policy learns from drafted trees.
//! A turn's own use of its draft is its [`super::lane::DraftLane`].

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
            &image_rows_on(model, &conv.images, conv.images.len()),
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

    /// Waits for a background draft sync and records its outcome; `None` when it failed,
    /// else the stream and first tree it drafted, if any.
    pub(super) async fn finish_draft_setup(
        &self,
        conv: &mut Conversation,
        mut setup: DraftSetup,
    ) -> Option<Option<(DraftStream, Option<FirstTree>)>> {
        // The set-up's calls carry the conversation's images: their deadlines grow with them
        // (see `Guarded`), and so does the wait for the whole set-up.
        let images = u32::try_from(conv.images.len() + 1).unwrap_or(u32::MAX);
        let limit = self.cfg.draft_timeout.saturating_mul(images);
        let done = match tokio::time::timeout(limit, &mut setup.task).await {
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
