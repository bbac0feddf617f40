//! Pipelined speculation, the [`DraftLane`]'s pre-drafts: while the target verifies a tree,
//! the draft pre-drafts the tree after that verification's likeliest outcome; the next step
//! uses it when the target's outcome is the assumed one (see [`crate::ahead`] for when a turn
//! asks).

use super::*;

/// A tree the draft pre-drafted while the target verified the previous one, and the
/// outcome of that verification it assumes.
pub(super) struct PreDraft {
    /// The tree.
    pub(super) tree: pb::TokenTree,
    /// The accepted path (node indices of the tree being verified) it assumes.
    pub(super) path: Vec<u32>,
    /// The tokens it assumes the target emits (the last one is its root).
    pub(super) emitted: Vec<u32>,
    /// The shape asked for.
    pub(super) params: DraftParams,
    /// The draft's time on it (overlapped with the verify).
    pub(super) draft_ns: u64,
}

impl DraftLane<'_> {
    /// The turn's pre-draft as this step's tree, when the target's last outcome is the one
    /// it assumed (and the tree fits the context left); one that does not match is dropped.
    pub(super) fn redeem_pre_draft(
        &mut self,
        engine: &Engine,
        conv: &Conversation,
        room: usize,
    ) -> Option<Proposal> {
        let pre = self.pre_draft.take()?;
        let d = conv.draft.as_ref()?;
        self.stream.as_ref()?;
        let emitted = conv.history.get(d.synced..).unwrap_or_default();
        // Shaped for the context left after the previous tree's deepest acceptance (see
        // `ask_pre_draft`); checked again in case the context filled differently.
        let fits = pre.params.depth < room;
        let hit = pre.path == self.last_path && pre.emitted == emitted;
        self.pipeline.observe(hit);
        tracing::debug!(hit, fits, hit_rate = self.pipeline.hit_rate, "pre-draft");
        if !hit || !fits {
            // A miss: the draft reports it in its answer to the step's request.
            return None;
        }
        // A step of the current block; a clean sample of the "on" arm when the block is on.
        let ahead_sample = self
            .ahead_arm(engine)
            .and_then(|arm| (arm.on && arm.sample).then_some(true));
        Some(Proposal {
            tree: pre.tree,
            drafted: true,
            // No draft round trip: nothing for the policy's draft overhead to learn.
            draft_overhead_ns: None,
            draft_rtt_ns: 0,
            params: pre.params,
            ahead_sample,
            pipelined: Some(pre.draft_ns),
            below: None,
            pre_draft_asked: None,
        })
    }

    /// Asks the draft for the tree after the likeliest outcome of `proposal` (pipelined
    /// speculation), reporting the last outcome if the draft has not heard it yet: when the
    /// proposal is drafted and draft-ahead is on for the step (a pre-draft the step uses
    /// keeps the pipeline going). The shape asked for, `None` when nothing was asked.
    pub(super) async fn ask_pre_draft(
        &mut self,
        engine: &Engine,
        conv: &mut Conversation,
        stats: &mut Stats,
        proposal: &Proposal,
        room: usize,
    ) -> Option<DraftParams> {
        let on = self.spec.draft_ahead
            && engine.cfg.draft_ahead
            && (proposal.pipelined.is_some() || self.ahead.on || !self.spec.is_adaptive());
        // After a hit the draft hears the outcome this way; otherwise only while the turn's
        // pre-drafts hit often enough.
        // A subtree of a tree the draft drafted earlier is not the tree it would pre-draft
        // after.
        if !proposal.drafted
            || !on
            || proposal.below.is_some()
            || (proposal.pipelined.is_none() && !self.pipeline.ask())
        {
            return None;
        }
        // The pre-draft is the next step's tree: shaped as that step would be, within the
        // context left after this tree's deepest acceptance (its depth is at most the depth
        // it was drafted for).
        let depth = proposal.params.depth;
        let params = self.step_params(engine, stats.steps, room.saturating_sub(depth + 1));
        if params.depth == 0 || params.budget == 0 || conv.draft.is_none() {
            return None;
        }
        let stream = self.stream.as_mut()?;
        let req = speculate_request(conv, &mut self.last_path, &params, true);
        match tokio::time::timeout(engine.cfg.draft_timeout, stream.requests.send(req)).await {
            Ok(Ok(())) => Some(params),
            _ => {
                let failure = Status::unavailable("draft stream closed");
                self.lost(engine, conv, stats, Some(failure)).await;
                None
            }
        }
    }

    /// The draft's answer to [`DraftLane::ask_pre_draft`] (`None` when it pre-drafted
    /// nothing; a failure ends speculation for the turn like a failed draft step).
    pub(super) async fn receive_pre_draft(
        &mut self,
        engine: &Engine,
        conv: &mut Conversation,
        stats: &mut Stats,
        params: DraftParams,
    ) -> Option<PreDraft> {
        let stream = self.stream.as_mut()?;
        let got = tokio::time::timeout(engine.cfg.draft_timeout, stream.trees.next()).await;
        match got {
            Ok(Some(Ok(t))) => {
                if t.levels > 0
                    && let Ok(mut pol) = engine.policy.lock()
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
                let failure = engine.draft_failure(other);
                tracing::warn!(failure = ?failure, "pre-draft failed, continuing target-only");
                self.lost(engine, conv, stats, failure).await;
                None
            }
        }
    }
}
