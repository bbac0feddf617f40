//! The draft model worker: one OS thread owning the draft model's sessions.
//!
//! Speculate requests queued together are drafted together: the worker
//! advances every session's [`TreeBuilder`] level by level and runs ONE
//! [`Llava::forward_batch`] per level for all of them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use specllava_model::{Llava, TreeBatchItem};
use specllava_service_kit::{SessionLimits, SessionStore, SessionStoreError};
use speculate::{DraftParams, TokenTree, TreeBuilder};
use tokio::sync::oneshot;

use crate::error::DraftError;
use crate::session::{DraftSession, LastTree, plan_sync};
use crate::topk::top_k_log_probs;

/// Batching settings of the worker.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Longest wait for more sessions' requests once one is queued.
    pub max_batch_wait: Duration,
    /// Maximum sessions drafted together.
    pub max_batch_sessions: usize,
    /// Capacity of the command queue.
    pub queue_capacity: usize,
    /// Maximum KV rows (+ tree) of a session.
    pub max_context: usize,
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
    /// History tokens fed in the first forward.
    pub fed_tokens: u32,
    /// Time from dequeue to reply.
    pub draft_ns: u64,
    /// Mean sessions per batched forward.
    pub mean_batch_size: f32,
}

/// Result of a prefill (open / append).
#[derive(Debug, Clone, Copy)]
pub struct PrefillOutcome {
    /// KV rows of the history minus the root.
    pub kv_len: u64,
    /// Time of the forward.
    pub forward_ns: u64,
}

type Reply<T> = oneshot::Sender<Result<T, DraftError>>;

enum Command {
    Open {
        id: String,
        tokens: Vec<u32>,
        images: Vec<Tensor>,
        reply: Reply<PrefillOutcome>,
    },
    Append {
        id: String,
        keep_kv_len: u64,
        tokens: Vec<u32>,
        images: Vec<Tensor>,
        reply: Reply<PrefillOutcome>,
    },
    Close {
        id: String,
        reply: Reply<bool>,
    },
    Speculate {
        job: SpeculateJob,
        reply: Reply<Drafted>,
    },
}

/// Cheap clonable handle to the worker.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: SyncSender<Command>,
    capacity: usize,
}

impl WorkerHandle {
    /// Starts the worker thread owning `model`'s sessions.
    pub fn spawn(
        model: Arc<Llava>,
        limits: SessionLimits,
        batch: BatchConfig,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(batch.queue_capacity);
        let worker = Worker {
            model,
            sessions: SessionStore::new(limits).with_metrics(),
            batch,
            backlog: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name("draft-model".into())
            .spawn(move || worker.run(rx))?;
        Ok(Self {
            tx,
            capacity: batch.queue_capacity,
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, DraftError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(make(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(DraftError::QueueFull(self.capacity)),
            Err(TrySendError::Disconnected(_)) => return Err(DraftError::WorkerGone),
        }
        rx.await.map_err(|_| DraftError::WorkerGone)?
    }

    /// Opens a session: prefills all tokens but the last (the root).
    pub async fn open(
        &self,
        id: String,
        tokens: Vec<u32>,
        images: Vec<Tensor>,
    ) -> Result<PrefillOutcome, DraftError> {
        self.call(|reply| Command::Open {
            id,
            tokens,
            images,
            reply,
        })
        .await
    }

    /// Truncates the session's history to `keep_kv_len` rows, then appends `tokens`
    /// (all computed but the last, the new root).
    pub async fn append(
        &self,
        id: String,
        keep_kv_len: u64,
        tokens: Vec<u32>,
        images: Vec<Tensor>,
    ) -> Result<PrefillOutcome, DraftError> {
        self.call(|reply| Command::Append {
            id,
            keep_kv_len,
            tokens,
            images,
            reply,
        })
        .await
    }

    /// Closes a session; returns whether it existed.
    pub async fn close(&self, id: String) -> Result<bool, DraftError> {
        self.call(|reply| Command::Close { id, reply }).await
    }

    /// Syncs the session with the new history and drafts the next tree.
    pub async fn speculate(&self, job: SpeculateJob) -> Result<Drafted, DraftError> {
        self.call(|reply| Command::Speculate { job, reply }).await
    }
}

struct Worker {
    model: Arc<Llava>,
    sessions: SessionStore<DraftSession>,
    batch: BatchConfig,
    backlog: VecDeque<Command>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
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
    batch_sum: usize,
    started: Instant,
    reply: Reply<Drafted>,
    /// Covers this job in the worker, from dequeue to reply (child of the request span).
    span: tracing::Span,
    /// This level's request: nodes expanded and the first logits row to read.
    expansion: Option<(Vec<usize>, usize, usize)>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        tracing::info!("draft model worker started");
        let mut last_expiry = Instant::now();
        loop {
            if last_expiry.elapsed() > Duration::from_secs(1) {
                for id in self.sessions.expire(Instant::now()) {
                    tracing::info!(session = %id, "session expired");
                }
                last_expiry = Instant::now();
            }
            let cmd = match self.backlog.pop_front() {
                Some(c) => c,
                None => match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            match cmd {
                Command::Open {
                    id,
                    tokens,
                    images,
                    reply,
                } => {
                    let _ = reply.send(self.open(&id, &tokens, &images));
                }
                Command::Append {
                    id,
                    keep_kv_len,
                    tokens,
                    images,
                    reply,
                } => {
                    let _ = reply.send(self.append(&id, keep_kv_len, tokens, &images));
                }
                Command::Close { id, reply } => {
                    let _ = reply.send(Ok(self.sessions.remove(&id)));
                }
                Command::Speculate { job, reply } => {
                    let batch = self.collect_batch((job, reply), &rx);
                    self.draft_batch(batch);
                }
            }
        }
        tracing::info!("draft model worker stopped");
    }

    fn open(
        &mut self,
        id: &str,
        tokens: &[u32],
        images: &[Tensor],
    ) -> Result<PrefillOutcome, DraftError> {
        if self.sessions.contains(id) {
            return Err(SessionStoreError::AlreadyExists(id.to_owned()).into());
        }
        let (&root, prefix) = tokens
            .split_last()
            .ok_or_else(|| DraftError::InvalidArgument("no tokens".into()))?;
        let mut kv = self.model.new_kv();
        let t0 = Instant::now();
        if !prefix.is_empty() {
            self.model.prefill(&mut kv, prefix, images)?;
        }
        let kv_len = kv.committed_len() as u64;
        for evicted in self.sessions.insert(
            id,
            DraftSession {
                kv,
                feed: vec![root],
                last: None,
            },
        )? {
            tracing::info!(session = %evicted, "session evicted (LRU)");
        }
        Ok(PrefillOutcome {
            kv_len,
            forward_ns: ns(t0.elapsed()),
        })
    }

    fn append(
        &mut self,
        id: &str,
        keep: u64,
        tokens: Vec<u32>,
        images: &[Tensor],
    ) -> Result<PrefillOutcome, DraftError> {
        if tokens.is_empty() {
            return Err(DraftError::InvalidArgument("no tokens".into()));
        }
        let model = Arc::clone(&self.model);
        let s = self.sessions.get_mut(id)?;
        let committed = s.kv.committed_len() as u64;
        // Rows the history (minus the root) would have if the feed were computed.
        let virtual_len = committed + s.feed.len() as u64 - 1;
        if keep > virtual_len {
            return Err(DraftError::InvalidArgument(format!(
                "keep_kv_len {keep} is beyond the session's kv_len {virtual_len}"
            )));
        }
        s.kv.discard_pending();
        s.last = None;
        let mut feed = if keep <= committed {
            s.kv.rollback(keep as usize)?;
            Vec::new()
        } else {
            s.feed[..(keep - committed) as usize].to_vec()
        };
        feed.extend(tokens);
        let (&root, prefix) = feed.split_last().expect("tokens is not empty");
        let t0 = Instant::now();
        if !prefix.is_empty()
            && let Err(e) = model.prefill(&mut s.kv, prefix, images)
        {
            self.sessions.remove(id);
            return Err(e.into());
        }
        s.feed = vec![root];
        let kv_len = s.kv.committed_len() as u64;
        for evicted in self.sessions.update(id) {
            tracing::info!(session = %evicted, "session evicted (LRU)");
        }
        Ok(PrefillOutcome {
            kv_len,
            forward_ns: ns(t0.elapsed()),
        })
    }

    fn collect_batch(
        &mut self,
        first: (SpeculateJob, Reply<Drafted>),
        rx: &Receiver<Command>,
    ) -> Vec<(SpeculateJob, Reply<Drafted>)> {
        let mut batch = vec![first];
        let deadline = Instant::now() + self.batch.max_batch_wait;
        while batch.len() < self.batch.max_batch_sessions && batch.len() < self.sessions.len() {
            let next = match self.backlog.pop_front() {
                Some(c) => c,
                None => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match rx.recv_timeout(deadline - now) {
                        Ok(c) => c,
                        Err(_) => break,
                    }
                }
            };
            match next {
                Command::Speculate { job, reply }
                    if !batch.iter().any(|(j, _)| j.session_id == job.session_id) =>
                {
                    batch.push((job, reply));
                }
                other => {
                    self.backlog.push_front(other);
                    break;
                }
            }
        }
        batch
    }

    /// Syncs a session with the new history and prepares its tree builder.
    fn start_job(
        &mut self,
        job: SpeculateJob,
        reply: Reply<Drafted>,
        started: Instant,
    ) -> Option<Job> {
        let vocab = self.model.config().text.vocab_size;
        if let Some(bad) = job.new_tokens.iter().find(|&&t| t as usize >= vocab) {
            let _ = reply.send(Err(DraftError::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary"
            ))));
            return None;
        }
        let mut session = match self.sessions.take(&job.session_id) {
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
            .batch
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
            batch_sum: 0,
            started,
            reply,
            span,
            expansion: None,
        })
    }

    fn draft_batch(&mut self, batch: Vec<(SpeculateJob, Reply<Drafted>)>) {
        let started = Instant::now();
        let mut jobs: Vec<Job> = Vec::with_capacity(batch.len());
        for (job, reply) in batch {
            if let Some(j) = self.start_job(job, reply, started) {
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
                        self.sessions.put_back(&job.id, job.session);
                        let _ = job.reply.send(Err(DraftError::BatchFailed(msg.clone())));
                    }
                }
            }
        }
        for job in done {
            self.finish_job(job);
        }
    }

    /// Runs one batched forward for this level of every active job and hands
    /// each builder its children.
    fn forward_level(&mut self, active: &mut [Job]) -> Result<(), DraftError> {
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
        let batch_size = active.len();
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
            job.batch_sum += batch_size;
            job.builder
                .add_children(children)
                .map_err(|e| DraftError::BatchFailed(format!("tree builder: {e}")))?;
        }
        Ok(())
    }

    fn finish_job(&mut self, mut job: Job) {
        let outcome = job.builder.finish();
        let rows: Vec<Option<usize>> = outcome
            .drafted_ids
            .iter()
            .map(|&id| job.rows.get(id).copied().flatten())
            .collect();
        let fed_tokens = if job.forwarded { job.fed as u32 } else { 0 };
        job.session.last = job.forwarded.then(|| LastTree {
            tokens: outcome.tree.tokens().to_vec(),
            parents: outcome.tree.parents().to_vec(),
            rows,
            fed: job.fed,
        });
        for evicted in self.sessions.put_back(&job.id, job.session) {
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
            fed_tokens,
            draft_ns: ns(draft_time),
            mean_batch_size: if job.levels == 0 {
                0.0
            } else {
                job.batch_sum as f32 / job.levels as f32
            },
            tree: outcome.tree,
        };
        let _ = job.reply.send(Ok(drafted));
    }
}
