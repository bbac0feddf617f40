//! The draft service's batching: the [`SessionBackend`] its session worker runs.
//!
//! Speculate requests queued together are drafted together: the backend
//! advances every session's [`TreeBuilder`] level by level and runs ONE
//! [`Llava::forward_batch`] per level for all of them. Sessions, the queue and
//! batch collection are the generic worker's ([`specllava_service_kit::worker`]).

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use specllava_model::{Llava, TreeBatchItem};
use specllava_service_kit::convert::nanos;
use specllava_service_kit::worker::{
    AppendError, BatchJob, Queued, Reply, SessionBackend, WorkerHandle,
};
use specllava_service_kit::{SessionStore, prefilled_kv};
use speculate::{DraftParams, TokenTree, TreeBuilder};

use crate::error::DraftError;
use crate::session::{DraftSession, LastTree, plan_sync};
use crate::topk::top_k_log_probs;

/// The draft's session worker.
pub type DraftWorker = WorkerHandle<DraftBackend>;

/// The draft model and what bounds its trees: the draft side of the session worker.
pub struct DraftBackend {
    model: Arc<Llava>,
    /// Maximum KV rows (+ tree) of a session.
    max_context: usize,
}

impl DraftBackend {
    /// Drafts with `model`, keeping every session within `max_context` positions.
    pub fn new(model: Arc<Llava>, max_context: usize) -> Self {
        Self { model, max_context }
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
    /// The caller's span: the worker's `draft.tree` span for this job is its child, so
    /// drafting shows up in the request's trace.
    pub span: tracing::Span,
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
}

impl BatchJob for SpeculateJob {
    fn session_id(&self) -> &str {
        &self.session_id
    }
}

/// One session being drafted.
struct Job {
    id: String,
    session: DraftSession,
    builder: TreeBuilder,
    /// Pending KV row of every partial-tree node that was forwarded.
    rows: Vec<Option<usize>>,
    fed: usize,
    forwarded: bool,
    levels: u32,
    started: Instant,
    reply: Reply<Drafted, DraftError>,
    /// Covers this job in the worker, from dequeue to reply (child of the request span).
    span: tracing::Span,
    /// This level's request: nodes expanded and the first logits row to read.
    expansion: Option<(Vec<usize>, usize, usize)>,
}

impl SessionBackend for DraftBackend {
    type Session = DraftSession;
    type Job = SpeculateJob;
    type Output = Drafted;
    type Error = DraftError;

    fn open(
        &mut self,
        prefix: &[u32],
        root: u32,
        images: &[Tensor],
    ) -> Result<DraftSession, DraftError> {
        Ok(DraftSession {
            kv: prefilled_kv(&self.model, prefix, images)?,
            feed: vec![root],
            last: None,
        })
    }

    fn append(
        &mut self,
        s: &mut DraftSession,
        keep: u64,
        tokens: Vec<u32>,
        images: &[Tensor],
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
                .prefill(&mut s.kv, prefix, images)
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
}

impl DraftBackend {
    /// Syncs a session with the new history and prepares its tree builder.
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
        let plan = plan_sync(
            &session.feed,
            session.last.as_ref(),
            &job.new_tokens,
            &job.accepted_path,
        );
        session.last = None;
        if plan.commit_rows.is_empty() {
            session.kv.discard_pending();
        } else if let Err(e) = session.kv.commit(&plan.commit_rows) {
            // Should not happen; drop the session rather than keep a corrupt one.
            let _ = reply.send(Err(e.into()));
            return None;
        }
        session.feed = plan.feed;
        let root = *session.feed.last().expect("feed is never empty");
        let mut params = job.params;
        let room = self
            .max_context
            .saturating_sub(session.kv.committed_len() + session.feed.len());
        params.depth = params.depth.min(room);
        let builder = TreeBuilder::new(root, &params);
        let fed = session.feed.len();
        let span = tracing::info_span!(
            parent: &job.span,
            "draft.tree",
            depth = params.depth,
            branching = params.branching,
            budget = params.budget,
            fed,
            levels = tracing::field::Empty,
            drafted_nodes = tracing::field::Empty,
        );
        Some(Job {
            id: job.session_id,
            session,
            builder,
            rows: Vec::new(),
            fed,
            forwarded: false,
            levels: 0,
            started,
            reply,
            span,
            expansion: None,
        })
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
        let mut done: Vec<Job> = Vec::with_capacity(jobs.len());
        while !jobs.is_empty() {
            // Ask every builder for its next level; finished ones leave the batch.
            let mut active = Vec::with_capacity(jobs.len());
            for mut job in jobs.drain(..) {
                match job.builder.next_expansion() {
                    Some((expand, k)) => {
                        let first_row = job.session.kv.pending_len();
                        job.expansion = Some((expand, k, first_row));
                        active.push(job);
                    }
                    None => done.push(job),
                }
            }
            if active.is_empty() {
                break;
            }
            match self.forward_level(&mut active) {
                Ok(()) => jobs = active,
                Err(e) => {
                    tracing::error!(error = %e, "batched draft forward failed");
                    let msg = e.to_string();
                    for mut job in active {
                        job.session.kv.discard_pending();
                        sessions.put_back(&job.id, job.session);
                        let _ = job.reply.send(Err(DraftError::BatchFailed(msg.clone())));
                    }
                }
            }
        }
        for job in done {
            finish_job(sessions, job);
        }
    }

    /// Runs one batched forward for this level of every active job and hands
    /// each builder its children.
    fn forward_level(&self, active: &mut [Job]) -> Result<(), DraftError> {
        let mut inputs: Vec<(Vec<u32>, Vec<i32>)> = Vec::with_capacity(active.len());
        for job in active.iter_mut() {
            let (expand, _, first_row) = job.expansion.as_ref().expect("set above");
            let partial = job.builder.partial();
            if !job.forwarded {
                // First level: feed the uncomputed history chain; its last row is the root.
                let tokens = job.session.feed.clone();
                let parents: Vec<i32> = (0..tokens.len() as i32).map(|i| i - 1).collect();
                job.rows = vec![Some(first_row + tokens.len() - 1)];
                inputs.push((tokens, parents));
            } else {
                let tokens: Vec<u32> = expand.iter().map(|&e| partial.tokens[e]).collect();
                let parents = expand
                    .iter()
                    .map(|&e| {
                        let p = partial.parents[e] as usize;
                        job.rows
                            .get(p)
                            .copied()
                            .flatten()
                            .map(|r| r as i32)
                            .ok_or_else(|| {
                                DraftError::BatchFailed(format!(
                                    "node {e}: parent {p} was never forwarded"
                                ))
                            })
                    })
                    .collect::<Result<Vec<i32>, _>>()?;
                if job.rows.len() < partial.len() {
                    job.rows.resize(partial.len(), None);
                }
                for (i, &e) in expand.iter().enumerate() {
                    job.rows[e] = Some(first_row + i);
                }
                inputs.push((tokens, parents));
            }
        }
        let logits = {
            let mut items: Vec<TreeBatchItem<'_>> = active
                .iter_mut()
                .zip(&inputs)
                .map(|(job, (tokens, parents))| TreeBatchItem {
                    kv: &mut job.session.kv,
                    tokens,
                    parents,
                })
                .collect();
            self.model.forward_batch(&mut items)?
        };
        for (job, logits) in active.iter_mut().zip(logits) {
            let (expand, k, _) = job.expansion.take().expect("set above");
            let rows = logits
                .to_vec2::<f32>()
                .map_err(|e| DraftError::BatchFailed(e.to_string()))?;
            let children: Vec<Vec<(u32, f32)>> = if !job.forwarded {
                vec![top_k_log_probs(
                    rows.last().expect("feed is never empty"),
                    k,
                )]
            } else {
                debug_assert_eq!(rows.len(), expand.len());
                rows.iter().map(|r| top_k_log_probs(r, k)).collect()
            };
            job.forwarded = true;
            job.levels += 1;
            job.builder
                .add_children(children)
                .map_err(|e| DraftError::BatchFailed(format!("tree builder: {e}")))?;
        }
        Ok(())
    }
}

/// Answers a job with its tree and puts its session back with the tree's rows pending.
fn finish_job(sessions: &mut SessionStore<DraftSession>, mut job: Job) {
    let outcome = job.builder.finish();
    let rows: Vec<Option<usize>> = outcome
        .drafted_ids
        .iter()
        .map(|&id| job.rows.get(id).copied().flatten())
        .collect();
    job.session.last = job.forwarded.then(|| LastTree {
        tokens: outcome.tree.tokens().to_vec(),
        parents: outcome.tree.parents().to_vec(),
        rows,
        fed: job.fed,
    });
    for evicted in sessions.put_back(&job.id, job.session) {
        tracing::info!(session = %evicted, "session evicted (LRU)");
    }
    let draft_time = job.started.elapsed();
    specllava_telemetry::metrics()
        .draft_latency_seconds
        .observe(draft_time.as_secs_f64());
    job.span.record("levels", job.levels);
    job.span.record("drafted_nodes", outcome.drafted_nodes);
    let drafted = Drafted {
        levels: job.levels,
        drafted_nodes: outcome.drafted_nodes as u32,
        draft_ns: nanos(draft_time),
        tree: outcome.tree,
    };
    let _ = job.reply.send(Ok(drafted));
}
