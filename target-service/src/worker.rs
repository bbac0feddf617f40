//! The target service's batching: the [`SessionBackend`] its session worker runs.
//!
//! Verify requests of different sessions are batched by the generic worker
//! ([`specllava_service_kit::worker`]) up to `max_batch_nodes` tree nodes, waiting at most
//! `max_batch_wait` for more; this backend runs ONE [`Llava::forward_batch`] for all of
//! them, verifies each tree against its logits and commits the accepted paths.

use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use specllava_model::{KvCache, Llava, PrefillImages, TreeBatchItem};
use specllava_service_kit::worker::{
    AppendError, BatchJob, Queued, SessionBackend, WorkerError, WorkerHandle,
};
use specllava_service_kit::{SessionState, SessionStore, prefilled_kv};
use specllava_wire::convert::nanos;
use speculate::{
    FinishReason, FirstStep, SamplingParams, StopConditions, TokenTree, VerifyOutcome,
};

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

/// The target's session worker.
pub type TargetWorker = WorkerHandle<TargetBackend>;

/// The target model and the context sessions are held to: the target side of the
/// session worker.
pub struct TargetBackend {
    model: Arc<Llava>,
    /// Maximum KV rows + tree depth of a session.
    max_context: usize,
}

impl TargetBackend {
    /// Verifies with `model`, keeping every session within `max_context` positions.
    pub fn new(model: Arc<Llava>, max_context: usize) -> Self {
        Self { model, max_context }
    }
}

/// Result of one verified tree.
#[derive(Debug, Clone)]
pub struct VerifyResult {
    /// The verification outcome (emitted tokens, accepted path...).
    pub outcome: VerifyOutcome,
    /// KV rows after the commit.
    pub kv_len: u64,
    /// Time of the batched forward.
    pub forward_ns: u64,
    /// Sessions in the batch.
    pub batch_size: u32,
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

impl BatchJob for VerifyJob {
    fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Tree nodes: the batch budget is `max_batch_nodes`.
    fn cost(&self) -> usize {
        self.tree.len()
    }
}

/// Verifies a tree (batched with other sessions' requests) and commits the accepted path;
/// keeps the queue-depth gauge and the latency histogram.
pub async fn verify(worker: &TargetWorker, job: VerifyJob) -> Result<VerifyResult, TargetError> {
    let received = Instant::now();
    let metrics = specllava_telemetry::metrics();
    // Counted before it is queued, so the worker's decrement never comes first.
    metrics.verify_queue_depth.inc();
    let result = worker.submit(job).await;
    if let Err(TargetError::Worker(WorkerError::QueueFull { .. } | WorkerError::WorkerGone)) =
        &result
    {
        metrics.verify_queue_depth.dec();
    }
    metrics
        .verify_latency_seconds
        .observe(received.elapsed().as_secs_f64());
    result
}

impl SessionBackend for TargetBackend {
    type Session = TargetSession;
    type Job = VerifyJob;
    type Output = VerifyResult;
    type Error = TargetError;

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
    ) -> Result<TargetSession, TargetError> {
        Ok(TargetSession {
            kv: prefilled_kv(&self.model, prefix, images)?,
            root,
        })
    }

    fn append(
        &mut self,
        session: &mut TargetSession,
        keep_kv_len: u64,
        tokens: Vec<u32>,
        images: &PrefillImages,
    ) -> Result<(), AppendError<TargetError>> {
        let (&root, prefix) = tokens.split_last().expect("tokens is not empty");
        self.truncate(session, keep_kv_len)?;
        if !prefix.is_empty() {
            self.model
                .prefill_images(&mut session.kv, prefix, images)
                .map_err(AppendError::corrupted)?;
        }
        session.root = root;
        Ok(())
    }

    const PICKS_FIRST_TOKEN: bool = true;

    fn open_and_pick(
        &mut self,
        tokens: &[u32],
        images: &PrefillImages,
        first: &FirstStep,
    ) -> Result<(TargetSession, VerifyOutcome), TargetError> {
        let mut kv = self.model.new_kv();
        let (outcome, root) = self.prefill_and_pick(&mut kv, tokens, images, first)?;
        Ok((TargetSession { kv, root }, outcome))
    }

    fn append_and_pick(
        &mut self,
        session: &mut TargetSession,
        keep_kv_len: u64,
        tokens: Vec<u32>,
        images: &PrefillImages,
        first: &FirstStep,
    ) -> Result<VerifyOutcome, AppendError<TargetError>> {
        self.truncate(session, keep_kv_len)?;
        let (outcome, root) = self
            .prefill_and_pick(&mut session.kv, &tokens, images, first)
            .map_err(AppendError::corrupted)?;
        session.root = root;
        Ok(outcome)
    }

    fn kv_len(session: &TargetSession) -> u64 {
        session.kv.committed_len() as u64
    }

    fn run_batch(&mut self, sessions: &mut SessionStore<TargetSession>, batch: Vec<Queued<Self>>) {
        self.verify_batch(sessions, batch);
    }

    fn dequeued(&mut self, jobs: usize) {
        // These requests leave the queue now.
        specllava_telemetry::metrics()
            .verify_queue_depth
            .dec_by(jobs as i64);
    }
}

impl TargetBackend {
    /// Drops a session's pending rows and its committed rows past `keep_kv_len` (an append's
    /// first part); refused, the session unchanged, past its KV length.
    fn truncate(
        &self,
        session: &mut TargetSession,
        keep_kv_len: u64,
    ) -> Result<(), AppendError<TargetError>> {
        let committed = session.kv.committed_len() as u64;
        if keep_kv_len > committed {
            return Err(AppendError::rejected(TargetError::InvalidArgument(
                format!("keep_kv_len {keep_kv_len} is beyond the session's kv_len {committed}"),
            )));
        }
        session.kv.discard_pending();
        session
            .kv
            .rollback(keep_kv_len as usize)
            .map_err(AppendError::rejected)
    }

    /// Prefills `tokens` (the last one, the root, included) into `kv` and picks the token
    /// after the root from its logits, as verifying a root-only tree would: the outcome and
    /// the new root.
    fn prefill_and_pick(
        &self,
        kv: &mut KvCache,
        tokens: &[u32],
        images: &PrefillImages,
        first: &FirstStep,
    ) -> Result<(VerifyOutcome, u32), TargetError> {
        let &root = tokens.last().expect("tokens is not empty");
        let logits = self.model.prefill_images(kv, tokens, images)?;
        let flat = logits
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| TargetError::BatchFailed(e.to_string()))?;
        let vocab = flat.len();
        // The root sits at the last committed row.
        let root_position = kv.committed_len() as u64 - 1;
        let outcome = speculate::verify(
            &TokenTree::root(root),
            &flat,
            vocab,
            &first.sampling,
            root_position,
            &first.stop,
        );
        // A root-only verify emits one token unless its budget is none (the wire's 0 reads
        // as no limit, so only a caller's bug gets here).
        let &next = outcome.emitted.last().ok_or_else(|| {
            TargetError::InvalidArgument("first_step: a budget of no tokens".into())
        })?;
        Ok((outcome, next))
    }

    /// Checks a job against its session (taken out of the store when it is to be verified).
    fn check(
        &self,
        sessions: &mut SessionStore<TargetSession>,
        job: &VerifyJob,
    ) -> Result<Checked, TargetError> {
        let session = sessions.take(&job.session_id)?;
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
        } else if actual as usize >= self.max_context {
            // Not even the root fits: the generation is over, normally.
            sessions.put_back(&job.session_id, session);
            return Ok(Checked::ContextFull { kv_len: actual });
        } else if actual as usize + job.tree.max_depth() + 1 > self.max_context {
            Some(TargetError::ContextFull(format!(
                "kv_len {actual} + tree depth {} exceeds the context of {} positions",
                job.tree.max_depth() + 1,
                self.max_context
            )))
        } else {
            None
        };
        match err {
            Some(e) => {
                sessions.put_back(&job.session_id, session);
                Err(e)
            }
            None => Ok(Checked::Ready(session)),
        }
    }

    /// Runs one packed forward for every valid job and answers each.
    fn verify_batch(&self, sessions: &mut SessionStore<TargetSession>, batch: Vec<Queued<Self>>) {
        let mut ready = Vec::with_capacity(batch.len());
        for q in batch {
            match self.check(sessions, &q.job) {
                Ok(Checked::Ready(session)) => ready.push((q, session)),
                Ok(Checked::ContextFull { kv_len }) => {
                    let outcome = VerifyOutcome {
                        accepted_path: Vec::new(),
                        emitted: Vec::new(),
                        proposed: q.job.tree.len() - 1,
                        accepted: 0,
                        finish: Some(FinishReason::Length),
                    };
                    q.answer(Ok(VerifyResult {
                        outcome,
                        kv_len,
                        forward_ns: 0,
                        batch_size: 0,
                    }));
                }
                Err(e) => q.answer(Err(e)),
            }
        }
        if ready.is_empty() {
            return;
        }
        let batch_size = ready.len() as u32;
        let batch_nodes = ready.iter().map(|(q, _)| q.job.tree.len()).sum::<usize>() as u32;
        let metrics = specllava_telemetry::metrics();
        metrics.verify_batch_size.observe(f64::from(batch_size));
        metrics.verify_batch_nodes.observe(f64::from(batch_nodes));
        // One span per request in its own trace (the forward is shared, so they overlap),
        // plus the batch span of this thread.
        let job_spans: Vec<tracing::Span> = ready
            .iter()
            .map(|(q, _)| {
                tracing::info_span!(
                    parent: &q.job.span,
                    "target.verify",
                    session = %q.job.session_id,
                    nodes = q.job.tree.len(),
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
                .map(|(q, s)| TreeBatchItem {
                    kv: &mut s.kv,
                    tokens: q.job.tree.tokens(),
                    parents: q.job.tree.parents(),
                })
                .collect();
            self.model.forward_batch(&mut items)
        };
        let forward_ns = nanos(t0.elapsed());
        match result {
            Ok(logits) => {
                for ((q, mut session), logits) in ready.into_iter().zip(logits) {
                    let res = finish_one(&q.job, &mut session, &logits).map(|(outcome, kv_len)| {
                        VerifyResult {
                            outcome,
                            kv_len,
                            forward_ns,
                            batch_size,
                        }
                    });
                    if res.is_err() {
                        session.kv.discard_pending();
                    }
                    sessions.put_back(&q.job.session_id, session);
                    q.answer(res);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "batched verify forward failed");
                let msg = e.to_string();
                for (q, mut session) in ready {
                    session.kv.discard_pending();
                    sessions.put_back(&q.job.session_id, session);
                    q.answer(Err(TargetError::BatchFailed(msg.clone())));
                }
            }
        }
        // The per-request spans end once every request was answered.
        drop(job_spans);
    }
}

/// What a verify job's check found.
enum Checked {
    /// The session (taken out of the store), to verify the tree on.
    Ready(TargetSession),
    /// The session's context is full: nothing can be emitted, the answer is an empty step
    /// with finish reason `length` (a client decoding "until done" ends normally).
    ContextFull {
        /// The session's KV rows.
        kv_len: u64,
    },
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
    specllava_service_kit::fault::panic_on_injected_token(&job.tree.tokens()[1..]);
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
