//! The model worker: one OS thread that owns the model's sessions (KV caches)
//! and runs every forward pass. gRPC handlers talk to it through a
//! [`WorkerHandle`] (bounded queue, `oneshot` replies).
//!
//! Verify requests of different sessions are batched: the worker drains the
//! queue up to `max_batch_nodes` tree nodes, waiting at most `max_batch_wait`
//! for more, and runs ONE [`Llava::forward_batch`] for all of them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use specllava_model::{KvCache, Llava, TreeBatchItem};
use specllava_service_kit::{SessionLimits, SessionState, SessionStore};
use speculate::{FinishReason, SamplingParams, StopConditions, TokenTree, VerifyOutcome};
use tokio::sync::oneshot;

use crate::error::TargetError;

/// One session on the target: its KV (history minus the root) and the root.
pub struct TargetSession {
    kv: KvCache,
    root: u32,
}

impl SessionState for TargetSession {
    fn bytes(&self) -> usize {
        self.kv.bytes()
    }
}

/// Batching settings of the worker.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Maximum tree nodes of all requests in one forward.
    pub max_batch_nodes: usize,
    /// Longest wait for more requests once one is queued.
    pub max_batch_wait: Duration,
    /// Capacity of the command queue.
    pub queue_capacity: usize,
    /// Maximum KV rows + tree depth of a session.
    pub max_context: usize,
}

/// Result of opening a session or appending to it.
#[derive(Debug, Clone, Copy)]
pub struct PrefillOutcome {
    /// KV rows after the prefill.
    pub kv_len: u64,
    /// Time of the forward pass.
    pub forward_ns: u64,
}

/// Result of one verified tree.
#[derive(Debug, Clone)]
pub struct VerifyResult {
    /// The verification outcome (emitted tokens, accepted path...).
    pub outcome: VerifyOutcome,
    /// KV rows after the commit.
    pub kv_len: u64,
    /// Time waiting in the queue.
    pub queue_ns: u64,
    /// Time of the batched forward.
    pub forward_ns: u64,
    /// Sessions in the batch.
    pub batch_size: u32,
    /// Tree nodes in the batch.
    pub batch_nodes: u32,
}

/// A verify request, validated by the handler (tree limits, sampling).
pub struct VerifyJob {
    /// The session.
    pub session_id: String,
    /// The caller's view of the session's KV length.
    pub expected_kv_len: u64,
    /// The tree (node 0 = the session's root).
    pub tree: TokenTree,
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Stop conditions.
    pub stop: StopConditions,
    /// The caller's span: the worker's `target.verify` span for this job is its child, so
    /// the batched forward shows up in the request's trace.
    pub span: tracing::Span,
}

type Reply<T> = oneshot::Sender<Result<T, TargetError>>;

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
    Verify {
        job: Box<VerifyJob>,
        received: Instant,
        reply: Reply<VerifyResult>,
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
            .name("target-model".into())
            .spawn(move || worker.run(rx))?;
        Ok(Self {
            tx,
            capacity: batch.queue_capacity,
        })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, TargetError> {
        let (reply, rx) = oneshot::channel();
        match self.tx.try_send(make(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(TargetError::QueueFull(self.capacity)),
            Err(TrySendError::Disconnected(_)) => return Err(TargetError::WorkerGone),
        }
        rx.await.map_err(|_| TargetError::WorkerGone)?
    }

    /// Opens a session: prefills all tokens but the last (the root).
    pub async fn open(
        &self,
        id: String,
        tokens: Vec<u32>,
        images: Vec<Tensor>,
    ) -> Result<PrefillOutcome, TargetError> {
        self.call(|reply| Command::Open {
            id,
            tokens,
            images,
            reply,
        })
        .await
    }

    /// Truncates a session's KV to `keep_kv_len` rows, then appends all tokens but the last.
    pub async fn append(
        &self,
        id: String,
        keep_kv_len: u64,
        tokens: Vec<u32>,
        images: Vec<Tensor>,
    ) -> Result<PrefillOutcome, TargetError> {
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
    pub async fn close(&self, id: String) -> Result<bool, TargetError> {
        self.call(|reply| Command::Close { id, reply }).await
    }

    /// Verifies a tree (batched with other sessions' requests) and commits the accepted path.
    pub async fn verify(&self, job: VerifyJob) -> Result<VerifyResult, TargetError> {
        let received = Instant::now();
        let depth = &specllava_telemetry::metrics().verify_queue_depth;
        let (reply, rx) = oneshot::channel();
        // Counted before it is queued, so the worker's decrement never comes first.
        depth.inc();
        let command = Command::Verify {
            job: Box::new(job),
            received,
            reply,
        };
        match self.tx.try_send(command) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                depth.dec();
                return Err(TargetError::QueueFull(self.capacity));
            }
            Err(TrySendError::Disconnected(_)) => {
                depth.dec();
                return Err(TargetError::WorkerGone);
            }
        }
        let result = rx.await.unwrap_or(Err(TargetError::WorkerGone));
        specllava_telemetry::metrics()
            .verify_latency_seconds
            .observe(received.elapsed().as_secs_f64());
        result
    }
}

struct Worker {
    model: Arc<Llava>,
    sessions: SessionStore<TargetSession>,
    batch: BatchConfig,
    /// Commands received while collecting a batch that must run after it.
    backlog: VecDeque<Command>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        tracing::info!("target model worker started");
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
                    let _ = reply.send(self.append(&id, keep_kv_len, &tokens, &images));
                }
                Command::Close { id, reply } => {
                    let _ = reply.send(Ok(self.sessions.remove(&id)));
                }
                Command::Verify {
                    job,
                    received,
                    reply,
                } => {
                    let batch = self.collect_batch((job, received, reply), &rx);
                    self.run_batch(batch);
                }
            }
        }
        tracing::info!("target model worker stopped");
    }

    fn open(
        &mut self,
        id: &str,
        tokens: &[u32],
        images: &[Tensor],
    ) -> Result<PrefillOutcome, TargetError> {
        if self.sessions.contains(id) {
            return Err(
                specllava_service_kit::SessionStoreError::AlreadyExists(id.to_owned()).into(),
            );
        }
        let mut kv = self.model.new_kv();
        let (&root, prefix) = tokens
            .split_last()
            .ok_or_else(|| TargetError::InvalidArgument("no tokens".into()))?;
        let t0 = Instant::now();
        if !prefix.is_empty() {
            self.model.prefill(&mut kv, prefix, images)?;
        }
        let forward_ns = ns(t0.elapsed());
        let kv_len = kv.committed_len() as u64;
        for evicted in self.sessions.insert(id, TargetSession { kv, root })? {
            tracing::info!(session = %evicted, "session evicted (LRU)");
        }
        Ok(PrefillOutcome { kv_len, forward_ns })
    }

    fn append(
        &mut self,
        id: &str,
        keep_kv_len: u64,
        tokens: &[u32],
        images: &[Tensor],
    ) -> Result<PrefillOutcome, TargetError> {
        let (&root, prefix) = tokens
            .split_last()
            .ok_or_else(|| TargetError::InvalidArgument("no tokens".into()))?;
        let model = Arc::clone(&self.model);
        let session = self.sessions.get_mut(id)?;
        let committed = session.kv.committed_len() as u64;
        if keep_kv_len > committed {
            return Err(TargetError::InvalidArgument(format!(
                "keep_kv_len {keep_kv_len} is beyond the session's kv_len {committed}"
            )));
        }
        session.kv.discard_pending();
        session.kv.rollback(keep_kv_len as usize)?;
        let t0 = Instant::now();
        if !prefix.is_empty()
            && let Err(e) = model.prefill(&mut session.kv, prefix, images)
        {
            // The KV may be partially written: drop the session rather than keep a corrupt one.
            self.sessions.remove(id);
            return Err(e.into());
        }
        session.root = root;
        let kv_len = session.kv.committed_len() as u64;
        for evicted in self.sessions.update(id) {
            tracing::info!(session = %evicted, "session evicted (LRU)");
        }
        Ok(PrefillOutcome {
            kv_len,
            forward_ns: ns(t0.elapsed()),
        })
    }

    /// Drains queued verify requests into one batch (distinct sessions, node budget, max wait).
    fn collect_batch(
        &mut self,
        first: (Box<VerifyJob>, Instant, Reply<VerifyResult>),
        rx: &Receiver<Command>,
    ) -> Vec<(Box<VerifyJob>, Instant, Reply<VerifyResult>)> {
        let mut nodes = first.0.tree.len();
        let mut batch = vec![first];
        let deadline = Instant::now() + self.batch.max_batch_wait;
        while nodes < self.batch.max_batch_nodes && batch.len() < self.sessions.len() {
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
                Command::Verify {
                    job,
                    received,
                    reply,
                } if nodes + job.tree.len() <= self.batch.max_batch_nodes
                    && !batch.iter().any(|(j, _, _)| j.session_id == job.session_id) =>
                {
                    nodes += job.tree.len();
                    batch.push((job, received, reply));
                }
                other => {
                    // Runs after this batch, keeping per-session order.
                    self.backlog.push_front(other);
                    break;
                }
            }
        }
        batch
    }

    /// Checks a job against its session (taken out of the store on success).
    fn check(&mut self, job: &VerifyJob) -> Result<TargetSession, TargetError> {
        let session = self.sessions.take(&job.session_id)?;
        let actual = session.kv.committed_len() as u64;
        let err = if actual != job.expected_kv_len {
            Some(TargetError::StaleKv {
                session: job.session_id.clone(),
                expected: job.expected_kv_len,
                actual,
            })
        } else if job.tree.token(0) != session.root {
            Some(TargetError::RootMismatch {
                session: job.session_id.clone(),
                expected: session.root,
                got: job.tree.token(0),
            })
        } else if actual as usize + job.tree.max_depth() + 1 > self.batch.max_context {
            Some(TargetError::ContextFull(format!(
                "kv_len {actual} + tree depth {} exceeds the context of {} positions",
                job.tree.max_depth() + 1,
                self.batch.max_context
            )))
        } else {
            None
        };
        match err {
            Some(e) => {
                self.sessions.put_back(&job.session_id, session);
                Err(e)
            }
            None => Ok(session),
        }
    }

    fn run_batch(&mut self, batch: Vec<(Box<VerifyJob>, Instant, Reply<VerifyResult>)>) {
        let started = Instant::now();
        // These requests leave the queue now.
        specllava_telemetry::metrics()
            .verify_queue_depth
            .dec_by(batch.len() as i64);
        let mut ready = Vec::with_capacity(batch.len());
        for (job, received, reply) in batch {
            match self.check(&job) {
                Ok(session) => ready.push((job, received, reply, session)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        if ready.is_empty() {
            return;
        }
        let batch_size = ready.len() as u32;
        let batch_nodes = ready.iter().map(|(j, ..)| j.tree.len()).sum::<usize>() as u32;
        let metrics = specllava_telemetry::metrics();
        metrics.verify_batch_size.observe(f64::from(batch_size));
        metrics.verify_batch_nodes.observe(f64::from(batch_nodes));
        // One span per request in its own trace (the forward is shared, so they overlap),
        // plus the batch span of this thread.
        let job_spans: Vec<tracing::Span> = ready
            .iter()
            .map(|(job, ..)| {
                tracing::info_span!(
                    parent: &job.span,
                    "target.verify",
                    session = %job.session_id,
                    nodes = job.tree.len(),
                    batch_size,
                    batch_nodes,
                )
            })
            .collect();
        let span = tracing::debug_span!("verify_batch", batch_size, batch_nodes);
        let _enter = span.enter();
        let t0 = Instant::now();
        let result = {
            let mut items: Vec<TreeBatchItem<'_>> = ready
                .iter_mut()
                .map(|(job, _, _, s)| TreeBatchItem {
                    kv: &mut s.kv,
                    tokens: job.tree.tokens(),
                    parents: job.tree.parents(),
                })
                .collect();
            self.model.forward_batch(&mut items)
        };
        let forward_ns = ns(t0.elapsed());
        match result {
            Ok(logits) => {
                for ((job, received, reply, mut session), logits) in ready.into_iter().zip(logits) {
                    let res = finish_one(&job, &mut session, &logits).map(|(outcome, kv_len)| {
                        VerifyResult {
                            outcome,
                            kv_len,
                            queue_ns: ns(started.saturating_duration_since(received)),
                            forward_ns,
                            batch_size,
                            batch_nodes,
                        }
                    });
                    if res.is_err() {
                        session.kv.discard_pending();
                    }
                    self.sessions.put_back(&job.session_id, session);
                    let _ = reply.send(res);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "batched verify forward failed");
                let msg = e.to_string();
                for (job, _, reply, mut session) in ready {
                    session.kv.discard_pending();
                    self.sessions.put_back(&job.session_id, session);
                    let _ = reply.send(Err(TargetError::BatchFailed(msg.clone())));
                }
            }
        }
        // The per-request spans end once every request was answered.
        drop(job_spans);
    }
}

/// Verifies one session's tree against its logits and commits the accepted path.
fn finish_one(
    job: &VerifyJob,
    session: &mut TargetSession,
    logits: &Tensor,
) -> Result<(VerifyOutcome, u64), TargetError> {
    let (n, vocab) = logits
        .dims2()
        .map_err(|e| TargetError::BatchFailed(e.to_string()))?;
    debug_assert_eq!(n, job.tree.len());
    let flat = logits
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| TargetError::BatchFailed(e.to_string()))?;
    let root_position = session.kv.committed_len() as u64;
    let outcome = speculate::verify(
        &job.tree,
        &flat,
        vocab,
        &job.sampling,
        root_position,
        &job.stop,
    );
    session.kv.commit(&outcome.accepted_path)?;
    if let Some(&last) = outcome.emitted.last() {
        session.root = last;
    }
    Ok((outcome, session.kv.committed_len() as u64))
}

/// Maps the speculate finish reason to the wire enum.
pub fn finish_to_proto(f: Option<FinishReason>) -> specllava_proto::v1::FinishReason {
    use specllava_proto::v1::FinishReason as P;
    match f {
        None => P::Unspecified,
        Some(FinishReason::Eos) => P::Eos,
        Some(FinishReason::Length) => P::Length,
    }
}
