//! The draft service's batching: the [`SessionBackend`] its session worker runs.
//!
//! Speculate requests queued together are drafted together: the backend advances every
//! session's [`DraftRun`] level by level and runs ONE [`Llava::forward_batch`] per level for
//! all of them. When the queue is empty, the worker's spare time goes to draft-ahead
//! ([`crate::ahead`]): the sessions just answered pre-draft their likely next tree, one
//! batched level per idle slot, so a waiting request is never held up by more than one
//! level. A request may instead ask for that pre-draft outright (`answer_ahead`, pipelined
//! speculation): its job drafts (or redeems) the tree for its root, treats it as sent and
//! runs the pre-draft after it as part of the job, then answers with the pre-draft and the
//! outcome it assumes. Sessions, the queue and batch collection are the generic worker's
//! ([`specllava_service_kit::worker`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use specllava_model::{KvCache, Llava, PrefillImages, TreeBatchItem};
use specllava_service_kit::worker::{AppendError, BatchJob, Queued, Reply, SessionBackend};
use specllava_service_kit::{SessionStore, prefilled_kv};
use specllava_wire::convert::nanos;
use speculate::{DraftParams, TokenTree};

use crate::ahead::{Ahead, Redeemed, Stage};
use crate::error::DraftError;
use crate::last_tree::LastTree;
use crate::run::{DraftRun, LevelInput};
use crate::session::{DraftSession, plan_sync};
use crate::topk::top_k_log_probs;

/// The draft model and what bounds its trees: the draft side of the session worker.
pub struct DraftBackend {
    model: Arc<Llava>,
    /// Maximum KV rows (+ tree) of a session.
    max_context: usize,
    /// Whether this replica pre-drafts for requests that ask for it.
    draft_ahead: bool,
    /// Most sessions pre-drafted in one batched level.
    max_ahead_sessions: usize,
    /// Sessions whose pre-draft wants spare time, oldest first.
    ahead_queue: VecDeque<String>,
}

impl DraftBackend {
    /// Drafts with `model`, keeping every session within `max_context` positions. With
    /// `draft_ahead`, spare time pre-drafts up to `max_ahead_sessions` sessions per level.
    pub fn new(
        model: Arc<Llava>,
        max_context: usize,
        draft_ahead: bool,
        max_ahead_sessions: usize,
    ) -> Self {
        Self {
            model,
            max_context,
            draft_ahead,
            max_ahead_sessions: max_ahead_sessions.max(1),
            ahead_queue: VecDeque::new(),
        }
    }
}

/// A request for the next tree of a session.
#[derive(Debug, Clone)]
pub struct SpeculateJob {
    /// The session.
    pub session_id: String,
    /// History tokens added since the previous request.
    pub new_tokens: Vec<u32>,
    /// Accepted path of the previous tree (target node indices).
    pub accepted_path: Vec<u32>,
    /// Tree shape.
    pub params: DraftParams,
    /// Pre-draft the likely next tree after answering (if the replica allows it).
    pub draft_ahead: bool,
    /// Answer with the pre-draft after the tree for the root instead of that tree (the
    /// caller verifies that tree meanwhile; see the module docs).
    pub answer_ahead: bool,
    /// The caller's span: the worker's `draft.tree` span for this job is its child, so
    /// drafting shows up in the request's trace.
    pub span: tracing::Span,
}

/// What became of the pre-draft a request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AheadOutcome {
    /// No guess was complete (off, nothing to guess, or the request came first).
    #[default]
    None,
    /// The guess was right: the pre-drafted work was used.
    Hit,
    /// The guess was wrong: the pre-drafted rows were dropped.
    Miss,
}

/// A drafted tree.
#[derive(Debug, Clone)]
pub struct Drafted {
    /// The tree (node 0 = root).
    pub tree: TokenTree,
    /// Draft forwards run.
    pub levels: u32,
    /// Nodes drafted before pruning.
    pub drafted_nodes: u32,
    /// Time from dequeue to reply.
    pub draft_ns: u64,
    /// What became of the pre-draft this request found.
    pub ahead: AheadOutcome,
    /// Spare-time drafting this tree holds (a hit's pre-drafted levels).
    pub ahead_ns: u64,
    /// For `answer_ahead`: the verification outcome of the sent tree this pre-draft
    /// assumes, `(accepted path, emitted tokens)`; `None` when nothing was pre-drafted (the
    /// tree answered is then the root alone, not a pre-draft).
    pub assumed: Option<(Vec<u32>, Vec<u32>)>,
}

impl BatchJob for SpeculateJob {
    fn session_id(&self) -> &str {
        &self.session_id
    }
}

/// What a job is drafting.
enum Phase {
    /// The tree for the request's root.
    Tree(DraftRun),
    /// (`answer_ahead`) The pre-draft after the tree sent for the root.
    Ahead(Ahead),
    /// (`answer_ahead`) Nothing to pre-draft after the sent tree.
    Nothing,
}

/// One session being drafted for a request.
struct Job {
    id: String,
    session: DraftSession,
    phase: Phase,
    /// Forwards run for this job.
    levels: u32,
    /// Pending row where the level being forwarded starts.
    level_row: usize,
    draft_ahead: bool,
    answer_ahead: bool,
    /// Whether this replica pre-drafts (`answer_ahead` on a replica with draft-ahead off
    /// answers that it pre-drafted nothing).
    may_pre_draft: bool,
    ahead: AheadOutcome,
    ahead_ns: u64,
    started: Instant,
    reply: Reply<Drafted, DraftError>,
    /// Covers this job in the worker, from dequeue to reply (child of the request span).
    span: tracing::Span,
}

impl SessionBackend for DraftBackend {
    type Session = DraftSession;
    type Job = SpeculateJob;
    type Output = Drafted;
    type Error = DraftError;

    fn image_rows(&self, images: &PrefillImages) -> u64 {
        // Prefill validates the images; one row each for what it would refuse.
        self.model
            .image_rows(images)
            .map_or(images.len() as u64, |rows| {
                rows.iter().sum::<usize>() as u64
            })
    }

    fn open(
        &mut self,
        prefix: &[u32],
        root: u32,
        images: &PrefillImages,
    ) -> Result<DraftSession, DraftError> {
        Ok(DraftSession {
            kv: prefilled_kv(&self.model, prefix, images)?,
            feed: vec![root],
            last: None,
            ahead: None,
        })
    }

    fn append(
        &mut self,
        s: &mut DraftSession,
        keep: u64,
        tokens: Vec<u32>,
        images: &PrefillImages,
    ) -> Result<(), AppendError<DraftError>> {
        let committed = s.kv.committed_len() as u64;
        // Rows the history (minus the root) would have if the feed were computed.
        let virtual_len = committed + s.feed.len() as u64 - 1;
        if keep > virtual_len {
            return Err(AppendError::rejected(DraftError::InvalidArgument(format!(
                "keep_kv_len {keep} is beyond the session's kv_len {virtual_len}"
            ))));
        }
        s.kv.discard_pending();
        s.last = None;
        s.ahead = None;
        let mut feed = if keep <= committed {
            s.kv.rollback(keep as usize)
                .map_err(AppendError::rejected)?;
            Vec::new()
        } else {
            s.feed[..(keep - committed) as usize].to_vec()
        };
        feed.extend(tokens);
        let (&root, prefix) = feed.split_last().expect("tokens is not empty");
        if !prefix.is_empty() {
            self.model
                .prefill_images(&mut s.kv, prefix, images)
                .map_err(AppendError::corrupted)?;
        }
        s.feed = vec![root];
        Ok(())
    }

    fn kv_len(s: &DraftSession) -> u64 {
        s.kv.committed_len() as u64
    }

    fn run_batch(&mut self, sessions: &mut SessionStore<DraftSession>, batch: Vec<Queued<Self>>) {
        self.draft_batch(sessions, batch);
    }

    fn idle_work(&mut self, sessions: &mut SessionStore<DraftSession>) -> bool {
        self.pre_draft_level(sessions)
    }
}

impl DraftBackend {
    /// Syncs a session with the new history (using its pre-draft on a hit) and prepares the
    /// run that drafts its tree.
    fn start_job(
        &self,
        sessions: &mut SessionStore<DraftSession>,
        queued: Queued<Self>,
        started: Instant,
    ) -> Option<Job> {
        let Queued { job, reply } = queued;
        let vocab = self.model.config().text.vocab_size;
        if let Some(bad) = job.new_tokens.iter().find(|&&t| t as usize >= vocab) {
            let _ = reply.send(Err(DraftError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary"
            ))));
            return None;
        }
        let mut session = match sessions.take(&job.session_id) {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return None;
            }
        };
        if job.answer_ahead && job.new_tokens.is_empty() {
            // The tree for the root was the last answer: go on with its pre-draft (started in
            // spare time, or now).
            let phase = match (session.ahead.take(), session.last.as_ref()) {
                _ if !self.draft_ahead => Phase::Nothing,
                (Some(a), _) => Phase::Ahead(a),
                (None, Some(last)) => {
                    Ahead::start(last, job.params).map_or(Phase::Nothing, Phase::Ahead)
                }
                (None, None) => Phase::Nothing,
            };
            return Some(self.job(job, reply, session, phase, AheadOutcome::None, 0, started));
        }
        // A caller answered with the pre-draft verifies it already, whatever shape it has.
        let shape = (!job.answer_ahead).then_some(&job.params);
        let ahead = session.ahead.take();
        // No new tokens (a retry of the same step): nothing to redeem, the rows go.
        let redeemed = ahead
            .filter(|_| !job.new_tokens.is_empty())
            .map(|a| a.redeem(&job.new_tokens, &job.accepted_path, shape));
        let (ahead, ahead_ns, pre_drafted) = match self.sync_session(&mut session, &job, redeemed) {
            Ok(x) => x,
            Err(e) => {
                // Should not happen; drop the session rather than keep a corrupt one.
                let _ = reply.send(Err(e));
                return None;
            }
        };
        let run = match pre_drafted {
            Some(run) => run,
            None => {
                let mut params = job.params;
                let room = self
                    .max_context
                    .saturating_sub(session.kv.committed_len() + session.feed.len());
                params.depth = params.depth.min(room);
                DraftRun::new(session.feed.clone(), None, &params)
            }
        };
        Some(self.job(
            job,
            reply,
            session,
            Phase::Tree(run),
            ahead,
            ahead_ns,
            started,
        ))
    }

    /// A job drafting `phase` for `session`.
    #[allow(clippy::too_many_arguments)]
    fn job(
        &self,
        job: SpeculateJob,
        reply: Reply<Drafted, DraftError>,
        session: DraftSession,
        phase: Phase,
        ahead: AheadOutcome,
        ahead_ns: u64,
        started: Instant,
    ) -> Job {
        let p = job.params;
        let span = tracing::info_span!(
            parent: &job.span,
            "draft.tree",
            depth = p.depth,
            branching = p.branching,
            budget = p.budget,
            answer_ahead = job.answer_ahead,
            ahead = ?ahead,
            levels = tracing::field::Empty,
            drafted_nodes = tracing::field::Empty,
        );
        Job {
            id: job.session_id,
            session,
            phase,
            levels: 0,
            level_row: 0,
            draft_ahead: job.draft_ahead,
            answer_ahead: job.answer_ahead,
            may_pre_draft: self.draft_ahead,
            ahead,
            ahead_ns,
            started,
            reply,
            span,
        }
    }

    /// Brings the session's KV in line with the history the request reports: on a
    /// draft-ahead hit, commits the guessed path and hands back the pre-drafted run (its rows
    /// kept and renumbered); otherwise commits what the last tree's rows can give
    /// ([`plan_sync`]) and drops the rest.
    fn sync_session(
        &self,
        session: &mut DraftSession,
        job: &SpeculateJob,
        redeemed: Option<Redeemed>,
    ) -> Result<(AheadOutcome, u64, Option<DraftRun>), DraftError> {
        let outcome = match &redeemed {
            Some(Redeemed::Hit { .. }) => "hit",
            Some(Redeemed::Miss) => "miss",
            Some(Redeemed::Late) => "late",
            None => "",
        };
        if let Some(Redeemed::Hit {
            commit_rows,
            run,
            root,
            spent_ns,
        }) = redeemed
        {
            let keep = run.as_ref().map(|r| r.forwarded_rows()).unwrap_or_default();
            session.kv.commit_keeping(&commit_rows, &keep)?;
            session.last = None;
            session.feed = vec![root];
            let saved = if run.is_some() { spent_ns } else { 0 };
            specllava_telemetry::metrics().record_draft_ahead(outcome, saved as f64 * 1e-9);
            let run = run.map(|mut r| {
                r.remap_rows(|row| keep.binary_search(&row).expect("a kept row"));
                *r
            });
            return Ok((AheadOutcome::Hit, saved, run));
        }
        if !outcome.is_empty() {
            specllava_telemetry::metrics().record_draft_ahead(outcome, 0.0);
        }
        let plan = plan_sync(
            &session.feed,
            session.last.as_ref(),
            &job.new_tokens,
            &job.accepted_path,
        );
        session.last = None;
        if plan.commit_rows.is_empty() {
            session.kv.discard_pending();
        } else {
            session.kv.commit(&plan.commit_rows)?;
        }
        session.feed = plan.feed;
        let ahead = if outcome == "miss" {
            AheadOutcome::Miss
        } else {
            AheadOutcome::None
        };
        Ok((ahead, 0, None))
    }

    /// Drafts the trees of a batch of sessions, one batched forward per level.
    fn draft_batch(&mut self, sessions: &mut SessionStore<DraftSession>, batch: Vec<Queued<Self>>) {
        let started = Instant::now();
        let mut jobs: Vec<Job> = Vec::with_capacity(batch.len());
        for queued in batch {
            if let Some(j) = self.start_job(sessions, queued, started) {
                jobs.push(j);
            }
        }
        while !jobs.is_empty() {
            // Ask every run for its next level; finished ones leave the batch and are
            // answered at once (a shallow tree does not wait for a deep one, nor a request
            // for a pre-draft).
            let mut active = Vec::with_capacity(jobs.len());
            let mut inputs = Vec::with_capacity(jobs.len());
            for mut job in jobs.drain(..) {
                match job.next_level(self.max_context) {
                    Ok(Some(input)) => {
                        inputs.push(input);
                        active.push(job);
                    }
                    Ok(None) => self.finish_job(sessions, job),
                    Err(e) => fail_job(sessions, job, e.to_string()),
                }
            }
            if active.is_empty() {
                break;
            }
            let kvs = active.iter_mut().map(|j| &mut j.session.kv);
            match self.forward(kvs, &inputs) {
                Ok(logits) => {
                    for (mut job, rows) in active.into_iter().zip(logits) {
                        match job.take_logits(&rows, self.max_context) {
                            Ok(()) => jobs.push(job),
                            Err(e) => fail_job(sessions, job, e.to_string()),
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "batched draft forward failed");
                    let msg = e.to_string();
                    for job in active {
                        fail_job(sessions, job, msg.clone());
                    }
                }
            }
        }
    }

    /// One batched forward of `inputs[i]` over `kvs[i]`; the logits rows of each item.
    fn forward<'a>(
        &self,
        kvs: impl Iterator<Item = &'a mut KvCache>,
        inputs: &[LevelInput],
    ) -> Result<Vec<Vec<Vec<f32>>>, DraftError> {
        let mut items: Vec<TreeBatchItem<'_>> = kvs
            .zip(inputs)
            .map(|(kv, (tokens, parents))| TreeBatchItem {
                kv,
                tokens,
                parents,
            })
            .collect();
        self.model
            .forward_batch(&mut items)?
            .into_iter()
            .map(|l| {
                l.to_vec2::<f32>()
                    .map_err(|e| DraftError::BatchFailed(e.to_string()))
            })
            .collect()
    }

    /// Answers a job with its tree, puts its session back with the tree's rows pending and,
    /// when asked, starts pre-drafting the next tree.
    fn finish_job(&mut self, sessions: &mut SessionStore<DraftSession>, mut job: Job) {
        let (tree, drafted_nodes, assumed) = match std::mem::replace(&mut job.phase, Phase::Nothing)
        {
            Phase::Tree(run) => {
                let params = *run.params();
                let (tree, drafted) = sent_tree(&mut job.session, run);
                if self.draft_ahead && job.draft_ahead {
                    self.start_ahead(&job.id, &mut job.session, params);
                }
                (tree, drafted, None)
            }
            Phase::Ahead(a) => {
                let Stage::Tree(run) = &a.stage else {
                    unreachable!("a finished pre-draft is at its tree")
                };
                let (outcome, _) = (**run).clone().finish();
                let assumed = Some((a.guess.path.clone(), a.guess.emitted.clone()));
                // Kept for the next request to redeem.
                job.session.ahead = Some(a);
                (outcome.tree, outcome.drafted_nodes, assumed)
            }
            Phase::Nothing => {
                let root = *job
                    .session
                    .feed
                    .last()
                    .expect("the feed ends with the root");
                (TokenTree::root(root), 0, None)
            }
        };
        let levels = job.levels;
        for evicted in sessions.put_back(&job.id, job.session) {
            tracing::info!(session = %evicted, "session evicted (LRU)");
        }
        let draft_time = job.started.elapsed();
        specllava_telemetry::metrics()
            .draft_latency_seconds
            .observe(draft_time.as_secs_f64());
        job.span.record("levels", levels);
        job.span.record("drafted_nodes", drafted_nodes);
        let drafted = Drafted {
            levels,
            drafted_nodes: drafted_nodes as u32,
            draft_ns: nanos(draft_time),
            tree,
            ahead: job.ahead,
            ahead_ns: job.ahead_ns,
            assumed,
        };
        let _ = job.reply.send(Ok(drafted));
    }

    /// Starts pre-drafting in spare time after the tree `session` just sent (shaped
    /// `params`).
    fn start_ahead(&mut self, id: &str, session: &mut DraftSession, params: DraftParams) {
        session.ahead = session
            .last
            .as_ref()
            .and_then(|last| Ahead::start(last, params));
        if session.ahead.is_some() && !self.ahead_queue.iter().any(|q| q == id) {
            self.ahead_queue.push_back(id.to_owned());
        }
    }

    /// Spare time: advances the pre-drafts of up to `max_ahead_sessions` queued sessions by
    /// one batched level (a leaf probe or a tree level). Returns whether it did any work.
    fn pre_draft_level(&mut self, sessions: &mut SessionStore<DraftSession>) -> bool {
        if self.ahead_queue.is_empty() {
            return false;
        }
        let started = Instant::now();
        let mut picked: Vec<(String, DraftSession, usize)> = Vec::new();
        let mut inputs: Vec<LevelInput> = Vec::new();
        while picked.len() < self.max_ahead_sessions {
            let Some(id) = self.ahead_queue.pop_front() else {
                break;
            };
            let Ok(mut s) = sessions.take(&id) else {
                continue; // closed or evicted meanwhile
            };
            let first_row = s.kv.pending_len();
            let input = match s.ahead.as_mut() {
                Some(a) => ahead_level(a, first_row),
                None => Ok(None),
            };
            match input {
                Ok(Some(input)) if s.kv.used_len() + input.0.len() < self.max_context => {
                    inputs.push(input);
                    picked.push((id, s, first_row));
                }
                Ok(None) => {
                    // Complete: it waits for the next request as it is.
                    sessions.put_back(&id, s);
                }
                _ => {
                    // No room left, or a broken run: drop it.
                    s.ahead = None;
                    sessions.put_back(&id, s);
                }
            }
        }
        if picked.is_empty() {
            return !self.ahead_queue.is_empty();
        }
        let kvs = picked.iter_mut().map(|(_, s, _)| &mut s.kv);
        let logits = self.forward(kvs, &inputs);
        let share = nanos(started.elapsed()) / picked.len() as u64;
        let room = |s: &DraftSession| self.max_context.saturating_sub(s.kv.used_len() + 1);
        for (i, (id, mut s, first_row)) in picked.into_iter().enumerate() {
            let committed = s.kv.committed_len();
            let advanced = match (&logits, s.ahead.as_mut()) {
                (Ok(logits), Some(a)) => {
                    a.spent_ns += share;
                    ahead_logits(a, &logits[i], first_row, committed, self.max_context)
                }
                _ => false,
            };
            if !advanced {
                s.ahead = None;
            } else if s.ahead.as_mut().is_some_and(|a| a.wants_work()) && room(&s) > 0 {
                self.ahead_queue.push_back(id.clone());
            }
            sessions.put_back(&id, s);
        }
        if let Err(e) = logits {
            tracing::warn!(error = %e, "pre-draft forward failed; pre-drafts dropped");
        }
        true
    }
}

impl Job {
    /// The next level's input; `None` when the job is complete. An `answer_ahead` job whose
    /// tree is complete treats it as sent and goes on with the pre-draft after it.
    fn next_level(&mut self, max_context: usize) -> Result<Option<LevelInput>, DraftError> {
        self.level_row = self.session.kv.pending_len();
        if let Phase::Tree(run) = &mut self.phase {
            let input = run.next_level(self.level_row)?;
            if input.is_some() || !self.answer_ahead {
                return Ok(input);
            }
            let Phase::Tree(run) = std::mem::replace(&mut self.phase, Phase::Nothing) else {
                unreachable!("matched above")
            };
            let params = *run.params();
            sent_tree(&mut self.session, run);
            if let Some(last) = self.session.last.as_ref().filter(|_| self.may_pre_draft) {
                self.phase = Ahead::start(last, params).map_or(Phase::Nothing, Phase::Ahead);
            }
        }
        let Phase::Ahead(a) = &mut self.phase else {
            return Ok(None);
        };
        let Ok(input) = ahead_level(a, self.level_row) else {
            // A broken pre-draft only costs the pre-draft (the sent tree stays).
            self.phase = Phase::Nothing;
            return Ok(None);
        };
        if let Some((tokens, _)) = &input
            && self.session.kv.used_len() + tokens.len() >= max_context
        {
            // No room for the pre-draft: nothing to answer with.
            self.phase = Phase::Nothing;
            return Ok(None);
        }
        Ok(input)
    }

    /// Takes the logits of the level [`Job::next_level`] gave.
    fn take_logits(&mut self, rows: &[Vec<f32>], max_context: usize) -> Result<(), DraftError> {
        self.levels += 1;
        let committed = self.session.kv.committed_len();
        match &mut self.phase {
            Phase::Tree(run) => run.take_logits(rows),
            Phase::Ahead(a) => {
                if !ahead_logits(a, rows, self.level_row, committed, max_context) {
                    self.phase = Phase::Nothing;
                }
                Ok(())
            }
            Phase::Nothing => Ok(()),
        }
    }
}

/// Finishes the tree `run` drafted for `session`'s root and records it as the session's last
/// tree sent (its rows pending); returns the tree and the nodes drafted before pruning.
fn sent_tree(session: &mut DraftSession, run: DraftRun) -> (TokenTree, usize) {
    let forwarded = run.forwarded();
    let fed = run.feed().len();
    let (outcome, rows) = run.finish();
    session.last = forwarded.then(|| LastTree {
        tokens: outcome.tree.tokens().to_vec(),
        parents: outcome.tree.parents().to_vec(),
        scores: outcome.tree.scores().to_vec(),
        rows,
        fed,
    });
    (outcome.tree, outcome.drafted_nodes)
}

/// The next level of a pre-draft, its rows starting at pending row `first_row`: the leaf
/// probe, then the tree's levels; `None` when complete.
fn ahead_level(a: &mut Ahead, first_row: usize) -> Result<Option<LevelInput>, DraftError> {
    match &mut a.stage {
        Stage::Leaf { token, parent_row } => Ok(Some((vec![*token], vec![*parent_row as i32]))),
        Stage::Tree(run) => run.next_level(first_row),
    }
}

/// Advances a pre-draft with the logits of its level (which started at pending row
/// `first_row`, over `committed` rows); false when it cannot go on.
fn ahead_logits(
    a: &mut Ahead,
    rows: &[Vec<f32>],
    first_row: usize,
    committed: usize,
    max_context: usize,
) -> bool {
    match &mut a.stage {
        Stage::Leaf { .. } => {
            let next = top_k_log_probs(rows.last().map_or(&[], |r| r), 1);
            match next.first() {
                Some(&(next, _)) => {
                    let max_depth =
                        max_context.saturating_sub(committed + a.guess.commit_rows.len() + 2);
                    a.leaf_forwarded(first_row, next, max_depth);
                    true
                }
                None => false,
            }
        }
        Stage::Tree(run) => run.take_logits(rows).is_ok(),
    }
}

/// Answers a job with an error and puts its session back with nothing pending.
fn fail_job(sessions: &mut SessionStore<DraftSession>, mut job: Job, msg: String) {
    job.session.kv.discard_pending();
    job.session.last = None;
    job.session.ahead = None;
    sessions.put_back(&job.id, job.session);
    let _ = job.reply.send(Err(DraftError::BatchFailed(msg)));
}
