//! The session worker both model services run: one OS thread that owns the
//! service's sessions (KV caches) and runs every forward pass; gRPC handlers
//! talk to it through a cheap clonable [`WorkerHandle`] (bounded queue, `oneshot`
//! replies), as TGI's queue actor does.
//!
//! The worker knows sessions, not models: opening, appending to and closing a
//! session, collecting queued jobs into a batch ([`collect_batch`]: distinct
//! sessions, a job and a cost limit, a short wait, jobs whose caller went away
//! skipped) and the TTL sweep are here. What a service does with a batch (the
//! draft's level-by-level drafting, the target's packed verification) is its
//! [`SessionBackend`].
//!
//! A panic while running a batch (or an open / append) is contained: the requests of
//! that batch fail with [`WorkerError::Panicked`] (INTERNAL), the sessions involved are
//! dropped (their KV may be half-written), and the worker goes on serving the others. If
//! the thread dies anyway, [`WorkerHandle::stopped`] resolves so the server can report
//! NOT_SERVING on gRPC health.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{
    Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError, sync_channel,
};
use std::time::{Duration, Instant};

use specllava_model::PrefillImages;
use speculate::{FirstStep, VerifyOutcome};
use tokio::sync::{oneshot, watch};
use tonic::Code;

use crate::sessions::{SessionState, SessionStore, SessionStoreError};
use specllava_wire::convert::nanos;

/// Failures of the worker layer, shared by both model services (each service's
/// error enum wraps it and maps it to a gRPC status with [`WorkerError::code`]).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A malformed open / append request.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The history would exceed the session's context.
    #[error("context full: {0}")]
    ContextFull(String),
    /// The worker's queue is full.
    #[error("{role} overloaded: the model queue is full ({capacity} requests)")]
    QueueFull {
        /// `draft` or `target`.
        role: &'static str,
        /// The queue's capacity.
        capacity: usize,
    },
    /// The worker thread stopped.
    #[error("the model worker stopped")]
    WorkerGone,
    /// The work this request was part of panicked; its session was dropped.
    #[error(
        "internal error: the model worker panicked running this request (its session was \
         dropped; see the service log)"
    )]
    Panicked,
    /// A model computation outside the worker (e.g. the vision tower of EncodeImages) failed.
    #[error("internal error: {0}")]
    Model(String),
}

impl WorkerError {
    /// Short stable label for metrics (`errors_total{type=...}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            WorkerError::InvalidArgument(_) => "invalid_argument",
            WorkerError::ContextFull(_) => "context_full",
            WorkerError::QueueFull { .. } => "queue_full",
            WorkerError::WorkerGone => "worker_gone",
            WorkerError::Panicked => "panicked",
            WorkerError::Model(_) => "model",
        }
    }

    /// The gRPC status code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            WorkerError::InvalidArgument(_) | WorkerError::ContextFull(_) => Code::InvalidArgument,
            WorkerError::QueueFull { .. } => Code::ResourceExhausted,
            WorkerError::WorkerGone => Code::Unavailable,
            WorkerError::Panicked | WorkerError::Model(_) => Code::Internal,
        }
    }
}

/// Why a replica that picks no tokens (a draft) refuses a [`FirstStep`].
pub const FIRST_STEP_REFUSED: &str = "first_step: this replica picks no tokens (a target does)";

/// Result of a prefill (open / append).
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillOutcome {
    /// KV rows of the session after the prefill (the history minus the root; with a
    /// [`FirstStep`], the whole history).
    pub kv_len: u64,
    /// Time of the prefill.
    pub forward_ns: u64,
    /// The token picked after the history, when a [`FirstStep`] asked for it: the outcome
    /// of verifying a root-only tree.
    pub first: Option<VerifyOutcome>,
}

/// Why an append failed, and whether the session survived it.
#[derive(Debug)]
pub struct AppendError<E> {
    /// The failure.
    pub error: E,
    /// The KV may be partially written: the worker drops the session rather than keep a
    /// corrupt one (the caller re-opens it from the history).
    pub drop_session: bool,
}

impl<E> AppendError<E> {
    /// A rejected request; the session is unchanged.
    pub fn rejected(error: impl Into<E>) -> Self {
        Self {
            error: error.into(),
            drop_session: false,
        }
    }

    /// A failure that left the session unusable.
    pub fn corrupted(error: impl Into<E>) -> Self {
        Self {
            error: error.into(),
            drop_session: true,
        }
    }
}

/// A job the worker batches: it names its session and what it costs of the batch budget.
pub trait BatchJob {
    /// The session the job works on (one job per session per batch).
    fn session_id(&self) -> &str;
    /// Units of [`BatchLimits::max_cost`] the job takes (the target: tree nodes).
    fn cost(&self) -> usize {
        1
    }
}

/// What a model service plugs into the worker: its per-session state, its batch job and
/// how it prefills and runs batches.
pub trait SessionBackend: Send + 'static {
    /// Per-session state (its KV cache).
    type Session: SessionState + Send + 'static;
    /// The one kind of batched job (draft: speculate; target: verify).
    type Job: BatchJob + Send + 'static;
    /// The answer to one job.
    type Output: Send + 'static;
    /// The service's error type.
    type Error: From<WorkerError> + From<SessionStoreError> + Send + 'static;

    /// A new session whose KV holds `prefix` (with `images` at its placeholders) and whose
    /// uncomputed root is `root`.
    fn open(
        &mut self,
        prefix: &[u32],
        root: u32,
        images: &PrefillImages,
    ) -> Result<Self::Session, Self::Error>;

    /// KV rows `images` become (each image's tokens, which any-resolution models count by
    /// the image's size).
    fn image_rows(&self, images: &PrefillImages) -> u64;

    /// Truncates `session` to `keep_kv_len` KV rows, then appends `tokens` (not empty; the
    /// last becomes the root).
    fn append(
        &mut self,
        session: &mut Self::Session,
        keep_kv_len: u64,
        tokens: Vec<u32>,
        images: &PrefillImages,
    ) -> Result<(), AppendError<Self::Error>>;

    /// Whether prefills can pick the token after the history ([`FirstStep`]); requests asking
    /// a backend that cannot are refused before any work.
    const PICKS_FIRST_TOKEN: bool = false;

    /// [`SessionBackend::open`] with the root computed too (`tokens` is the whole history)
    /// and the token after it picked; the session's root is that token.
    fn open_and_pick(
        &mut self,
        _tokens: &[u32],
        _images: &PrefillImages,
        _first: &FirstStep,
    ) -> Result<(Self::Session, VerifyOutcome), Self::Error> {
        Err(WorkerError::InvalidArgument(FIRST_STEP_REFUSED.into()).into())
    }

    /// [`SessionBackend::append`] with the last token computed too and the token after it
    /// picked; the session's root is that token.
    fn append_and_pick(
        &mut self,
        _session: &mut Self::Session,
        _keep_kv_len: u64,
        _tokens: Vec<u32>,
        _images: &PrefillImages,
        _first: &FirstStep,
    ) -> Result<VerifyOutcome, AppendError<Self::Error>> {
        Err(AppendError {
            error: WorkerError::InvalidArgument(FIRST_STEP_REFUSED.into()).into(),
            drop_session: false,
        })
    }

    /// KV rows the session holds.
    fn kv_len(session: &Self::Session) -> u64;

    /// Runs one batch (distinct sessions) and answers every job of it.
    fn run_batch(&mut self, sessions: &mut SessionStore<Self::Session>, batch: Vec<Queued<Self>>);

    /// Spare-time work, run while the queue is empty: one bounded unit (the draft: one
    /// batched pre-draft level), so a request arriving meanwhile waits for at most one unit.
    /// Returns whether it did anything (`false`: the worker blocks on the queue).
    fn idle_work(&mut self, _sessions: &mut SessionStore<Self::Session>) -> bool {
        false
    }

    /// Called with the number of jobs that left the queue (batched or skipped because
    /// their caller went away), before the batch runs.
    fn dequeued(&mut self, _jobs: usize) {}
}

/// The reply channel of a request to the worker. Dropped unanswered while its thread unwinds
/// from a panic, it answers [`WorkerError::Panicked`]: the request fails with INTERNAL on
/// its own instead of reading as a stopped worker.
pub struct Reply<T, E: From<WorkerError>> {
    tx: Option<oneshot::Sender<Result<T, E>>>,
}

impl<T, E: From<WorkerError>> Reply<T, E> {
    /// A reply channel and the receiver its answer arrives on.
    pub fn channel() -> (Self, oneshot::Receiver<Result<T, E>>) {
        let (tx, rx) = oneshot::channel();
        (Self { tx: Some(tx) }, rx)
    }

    /// Answers; gives the answer back when the caller went away.
    pub fn send(mut self, result: Result<T, E>) -> Result<(), Result<T, E>> {
        match self.tx.take() {
            Some(tx) => tx.send(result),
            None => Err(result),
        }
    }

    /// Whether the caller went away.
    pub fn is_closed(&self) -> bool {
        self.tx.as_ref().is_none_or(oneshot::Sender::is_closed)
    }
}

impl<T, E: From<WorkerError>> Drop for Reply<T, E> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take()
            && std::thread::panicking()
        {
            let _ = tx.send(Err(WorkerError::Panicked.into()));
        }
    }
}

/// A queued batch job and where its answer goes.
pub struct Queued<B: SessionBackend + ?Sized> {
    /// The job.
    pub job: B::Job,
    /// Its reply channel.
    pub reply: Reply<B::Output, B::Error>,
}

impl<B: SessionBackend + ?Sized> Queued<B> {
    /// Answers the job (a caller that went away is not an error).
    pub fn answer(self, result: Result<B::Output, B::Error>) {
        let _ = self.reply.send(result);
    }
}

/// A request to the worker.
pub enum Command<B: SessionBackend + ?Sized> {
    /// Open a session.
    Open {
        /// Session id.
        id: String,
        /// History (all prefilled but the last).
        tokens: Vec<u32>,
        /// Images (pixels or vision features), one per placeholder.
        images: PrefillImages,
        /// Compute the root too and pick the token after it.
        first: Option<FirstStep>,
        /// Answer.
        reply: Reply<PrefillOutcome, B::Error>,
    },
    /// Truncate a session, then append tokens.
    Append {
        /// Session id.
        id: String,
        /// KV rows to keep.
        keep_kv_len: u64,
        /// Tokens to append (the last becomes the root).
        tokens: Vec<u32>,
        /// Images (pixels or vision features), one per placeholder.
        images: PrefillImages,
        /// Compute the last token too and pick the token after it.
        first: Option<FirstStep>,
        /// Answer.
        reply: Reply<PrefillOutcome, B::Error>,
    },
    /// Close a session.
    Close {
        /// Session id.
        id: String,
        /// Whether it existed.
        reply: Reply<bool, B::Error>,
    },
    /// A batched job.
    Batch(Queued<B>),
}

/// How jobs are grouped into one batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Maximum jobs (sessions) in one batch.
    pub max_jobs: usize,
    /// Maximum summed [`BatchJob::cost`] of one batch (a first job over it still runs alone).
    pub max_cost: usize,
    /// Longest wait for more jobs once one is queued.
    pub max_wait: Duration,
}

/// Settings of a worker.
#[derive(Debug, Clone, Copy)]
pub struct WorkerConfig {
    /// Capacity of the command queue (full answers RESOURCE_EXHAUSTED).
    pub queue_capacity: usize,
    /// Batch forming.
    pub batch: BatchLimits,
    /// How often idle sessions are swept (TTL).
    pub expiry_tick: Duration,
    /// Most history tokens a session may hold: an append past it is refused before any
    /// forward runs (the session unchanged).
    pub max_context: usize,
}

/// Cheap clonable handle to a worker thread.
pub struct WorkerHandle<B: SessionBackend> {
    tx: SyncSender<Command<B>>,
    capacity: usize,
    role: &'static str,
    /// Closed (its sender dropped) when the worker thread ends, however it ends.
    alive: watch::Receiver<()>,
}

impl<B: SessionBackend> Clone for WorkerHandle<B> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            capacity: self.capacity,
            role: self.role,
            alive: self.alive.clone(),
        }
    }
}

impl<B: SessionBackend> WorkerHandle<B> {
    /// Starts the worker thread (`{role}-model`) owning `sessions` and `backend`.
    pub fn spawn(
        role: &'static str,
        backend: B,
        sessions: SessionStore<B::Session>,
        cfg: WorkerConfig,
    ) -> std::io::Result<Self> {
        let capacity = cfg.queue_capacity.max(1);
        let (tx, rx) = sync_channel(capacity);
        let worker = Worker {
            role,
            backend,
            sessions,
            cfg,
            backlog: VecDeque::new(),
        };
        let (alive_tx, alive) = watch::channel(());
        std::thread::Builder::new()
            .name(format!("{role}-model"))
            .spawn(move || {
                // Dropped when this thread ends, even by a panic: `stopped` resolves.
                let _alive = alive_tx;
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| worker.run(rx))) {
                    tracing::error!(
                        panic = panic_message(panic.as_ref()),
                        "{role} model worker died"
                    );
                }
            })?;
        Ok(Self {
            tx,
            capacity,
            role,
            alive,
        })
    }

    /// Resolves once the worker thread has ended (it stopped or died): from then on every
    /// request fails with UNAVAILABLE, so the service is no longer serving.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut alive = self.alive.clone();
        async move { while alive.changed().await.is_ok() {} }
    }

    /// Queues a command built around a fresh reply channel and awaits the answer.
    async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T, B::Error>) -> Command<B>,
    ) -> Result<T, B::Error> {
        let (reply, rx) = Reply::channel();
        match self.tx.try_send(make(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(WorkerError::QueueFull {
                    role: self.role,
                    capacity: self.capacity,
                }
                .into());
            }
            Err(TrySendError::Disconnected(_)) => return Err(WorkerError::WorkerGone.into()),
        }
        rx.await
            .map_err(|_| B::Error::from(WorkerError::WorkerGone))?
    }

    /// Opens a session: prefills all tokens but the last (the root); with `first`, the root
    /// too, and picks the token after it.
    pub async fn open(
        &self,
        id: String,
        tokens: Vec<u32>,
        images: PrefillImages,
        first: Option<FirstStep>,
    ) -> Result<PrefillOutcome, B::Error> {
        self.call(|reply| Command::Open {
            id,
            tokens,
            images,
            first,
            reply,
        })
        .await
    }

    /// Truncates a session to `keep_kv_len` KV rows, then appends `tokens` (all computed
    /// but the last, the new root; with `first`, that one too, and the token after it picked).
    pub async fn append(
        &self,
        id: String,
        keep_kv_len: u64,
        tokens: Vec<u32>,
        images: PrefillImages,
        first: Option<FirstStep>,
    ) -> Result<PrefillOutcome, B::Error> {
        self.call(|reply| Command::Append {
            id,
            keep_kv_len,
            tokens,
            images,
            first,
            reply,
        })
        .await
    }

    /// Closes a session; returns whether it existed.
    pub async fn close(&self, id: String) -> Result<bool, B::Error> {
        self.call(|reply| Command::Close { id, reply }).await
    }

    /// Queues a job for the next batch and awaits its answer.
    pub async fn submit(&self, job: B::Job) -> Result<B::Output, B::Error> {
        self.call(|reply| Command::Batch(Queued { job, reply }))
            .await
    }
}

struct Worker<B: SessionBackend> {
    role: &'static str,
    backend: B,
    sessions: SessionStore<B::Session>,
    cfg: WorkerConfig,
    /// Commands received while collecting a batch that must run after it.
    backlog: VecDeque<Command<B>>,
}

impl<B: SessionBackend> Worker<B> {
    fn run(mut self, rx: Receiver<Command<B>>) {
        tracing::info!("{} model worker started", self.role);
        let tick = self.cfg.expiry_tick.max(Duration::from_millis(1));
        let mut last_expiry = Instant::now();
        loop {
            if last_expiry.elapsed() > tick {
                for id in self.sessions.expire(Instant::now()) {
                    tracing::info!(session = %id, "session expired");
                }
                last_expiry = Instant::now();
            }
            let cmd = match self.backlog.pop_front() {
                Some(c) => c,
                None => match rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        let worked = catch_unwind(AssertUnwindSafe(|| {
                            self.backend.idle_work(&mut self.sessions)
                        }))
                        .unwrap_or_else(|panic| {
                            // Sessions it had taken out are gone with the unwinding.
                            self.contained(panic.as_ref(), "idle work", &[]);
                            true
                        });
                        if worked {
                            continue;
                        }
                        match rx.recv_timeout(tick) {
                            Ok(c) => c,
                            Err(RecvTimeoutError::Timeout) => continue,
                            Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                },
            };
            match cmd {
                Command::Open {
                    id,
                    tokens,
                    images,
                    first,
                    reply,
                } => {
                    let res = catch_unwind(AssertUnwindSafe(|| {
                        self.open(&id, &tokens, &images, first.as_ref())
                    }))
                    .unwrap_or_else(|panic| {
                        self.contained(panic.as_ref(), "open", &[id.as_str()]);
                        Err(WorkerError::Panicked.into())
                    });
                    let _ = reply.send(res);
                }
                Command::Append {
                    id,
                    keep_kv_len,
                    tokens,
                    images,
                    first,
                    reply,
                } => {
                    let res = catch_unwind(AssertUnwindSafe(|| {
                        self.append(&id, keep_kv_len, tokens, &images, first.as_ref())
                    }))
                    .unwrap_or_else(|panic| {
                        self.contained(panic.as_ref(), "append", &[id.as_str()]);
                        Err(WorkerError::Panicked.into())
                    });
                    let _ = reply.send(res);
                }
                Command::Close { id, reply } => {
                    let _ = reply.send(Ok(self.sessions.remove(&id)));
                }
                Command::Batch(first) => {
                    let collected = collect_batch(
                        first,
                        &rx,
                        &mut self.backlog,
                        &self.cfg.batch,
                        self.sessions.len(),
                    );
                    self.backend.dequeued(collected.dequeued);
                    if !collected.batch.is_empty() {
                        let ids: Vec<String> = collected
                            .batch
                            .iter()
                            .map(|q| q.job.session_id().to_owned())
                            .collect();
                        // On a panic the batch's unanswered replies answer `Panicked` as
                        // they are dropped.
                        let ran = catch_unwind(AssertUnwindSafe(|| {
                            self.backend.run_batch(&mut self.sessions, collected.batch)
                        }));
                        if let Err(panic) = ran {
                            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
                            self.contained(panic.as_ref(), "batch", &ids);
                        }
                    }
                }
            }
        }
        tracing::info!("{} model worker stopped", self.role);
    }

    /// After a contained panic in `what`: logs it and drops the sessions involved (their KV
    /// may be half-written; their callers re-open them). Each failed request is counted in
    /// `errors_total{type="panicked"}` where it becomes a status.
    fn contained(&mut self, panic: &(dyn std::any::Any + Send), what: &str, sessions: &[&str]) {
        tracing::error!(
            panic = panic_message(panic),
            sessions = ?sessions,
            "{} model worker: {what} panicked; its requests failed and its sessions were dropped, \
             the worker goes on",
            self.role
        );
        for id in sessions {
            self.sessions.remove(id);
        }
    }

    fn open(
        &mut self,
        id: &str,
        tokens: &[u32],
        images: &PrefillImages,
        first: Option<&FirstStep>,
    ) -> Result<PrefillOutcome, B::Error> {
        if self.sessions.contains(id) {
            return Err(SessionStoreError::AlreadyExists(id.to_owned()).into());
        }
        let (&root, prefix) = tokens
            .split_last()
            .ok_or_else(|| WorkerError::InvalidArgument("no tokens".into()))?;
        let t0 = Instant::now();
        let (session, first) = match first {
            None => (self.backend.open(prefix, root, images)?, None),
            Some(step) => {
                let (session, outcome) = self.backend.open_and_pick(tokens, images, step)?;
                (session, Some(outcome))
            }
        };
        let forward_ns = nanos(t0.elapsed());
        let kv_len = B::kv_len(&session);
        for evicted in self.sessions.insert(id, session)? {
            tracing::info!(session = %evicted, "session evicted (LRU)");
        }
        Ok(PrefillOutcome {
            kv_len,
            forward_ns,
            first,
        })
    }

    fn append(
        &mut self,
        id: &str,
        keep_kv_len: u64,
        tokens: Vec<u32>,
        images: &PrefillImages,
        first: Option<&FirstStep>,
    ) -> Result<PrefillOutcome, B::Error> {
        if tokens.is_empty() {
            return Err(WorkerError::InvalidArgument("no tokens".into()).into());
        }
        let session = self.sessions.get_mut(id)?;
        // The history after the append: the kept rows plus the new tokens' (each image
        // placeholder becomes the image's rows).
        let image_rows = self
            .backend
            .image_rows(images)
            .saturating_sub(images.len() as u64);
        let history = keep_kv_len.saturating_add(tokens.len() as u64 + image_rows);
        if history > self.cfg.max_context as u64 {
            return Err(WorkerError::ContextFull(format!(
                "keep_kv_len {keep_kv_len} + {} tokens ({} images) = {history} rows exceed the \
                 context of {}",
                tokens.len(),
                images.len(),
                self.cfg.max_context
            ))
            .into());
        }
        let t0 = Instant::now();
        let appended = match first {
            None => self
                .backend
                .append(session, keep_kv_len, tokens, images)
                .map(|()| None),
            Some(step) => self
                .backend
                .append_and_pick(session, keep_kv_len, tokens, images, step)
                .map(Some),
        };
        let first = match appended {
            Ok(first) => first,
            Err(e) => {
                if e.drop_session {
                    self.sessions.remove(id);
                }
                return Err(e.error);
            }
        };
        let forward_ns = nanos(t0.elapsed());
        let kv_len = B::kv_len(session);
        for evicted in self.sessions.update(id) {
            tracing::info!(session = %evicted, "session evicted (LRU)");
        }
        Ok(PrefillOutcome {
            kv_len,
            forward_ns,
            first,
        })
    }
}

/// The message of a panic payload (`panic!` with a literal or a formatted string).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(not a string)"
    }
}

/// A batch taken off the queue.
pub struct Collected<B: SessionBackend + ?Sized> {
    /// The jobs to run (distinct sessions, callers still waiting).
    pub batch: Vec<Queued<B>>,
    /// Jobs that left the queue: the batch plus those skipped because their caller went away.
    pub dequeued: usize,
}

/// Drains queued jobs into one batch, starting with `first`: jobs join while the batch
/// has fewer than `max_jobs` jobs, its cost stays within `max_cost`, it has fewer jobs than
/// there are `live_sessions`, and `max_wait` has not passed. A job whose caller went away
/// is dropped, never run. The first command that cannot join (another kind, a second job
/// of a session already in the batch, a job over the cost budget) ends the collection and
/// is put back at the front of `backlog`, so per-session order is kept.
pub fn collect_batch<B: SessionBackend + ?Sized>(
    first: Queued<B>,
    rx: &Receiver<Command<B>>,
    backlog: &mut VecDeque<Command<B>>,
    limits: &BatchLimits,
    live_sessions: usize,
) -> Collected<B> {
    let mut dequeued = 1;
    let mut batch = Vec::new();
    let mut cost = 0;
    if first.reply.is_closed() {
        tracing::debug!(
            session = first.job.session_id(),
            "caller went away, job dropped"
        );
    } else {
        cost = first.job.cost();
        batch.push(first);
    }
    let deadline = Instant::now() + limits.max_wait;
    while batch.len() < limits.max_jobs && cost < limits.max_cost && batch.len() < live_sessions {
        let next = match backlog.pop_front() {
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
            Command::Batch(q) if q.reply.is_closed() => {
                tracing::debug!(
                    session = q.job.session_id(),
                    "caller went away, job dropped"
                );
                dequeued += 1;
            }
            Command::Batch(q)
                if cost + q.job.cost() <= limits.max_cost
                    && !batch
                        .iter()
                        .any(|b| b.job.session_id() == q.job.session_id()) =>
            {
                cost += q.job.cost();
                dequeued += 1;
                batch.push(q);
            }
            other => {
                backlog.push_front(other);
                break;
            }
        }
    }
    Collected { batch, dequeued }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sessions::SessionLimits;
    use speculate::{SamplingParams, StopConditions};
    use std::sync::{Arc, Mutex};

    /// A job of `cost` units on session `id`, answered with its tag.
    struct Job {
        id: &'static str,
        cost: usize,
        tag: u32,
    }

    impl BatchJob for Job {
        fn session_id(&self) -> &str {
            self.id
        }
        fn cost(&self) -> usize {
            self.cost
        }
    }

    struct Fake(u64);
    impl SessionState for Fake {
        fn bytes(&self) -> usize {
            1
        }
    }

    #[derive(Debug, thiserror::Error)]
    enum FakeError {
        #[error(transparent)]
        Worker(#[from] WorkerError),
        #[error(transparent)]
        Session(#[from] SessionStoreError),
    }

    /// Records the tags of every batch it runs. A batch holding [`POISON`] panics, and so do
    /// an open or append of it; with `die` set, the worker's own loop panics.
    #[derive(Default)]
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<u32>>>>,
        dequeued: Arc<Mutex<usize>>,
        die: Arc<std::sync::atomic::AtomicBool>,
    }

    const POISON: u32 = 666;

    impl SessionBackend for Recorder {
        type Session = Fake;
        type Job = Job;
        type Output = u32;
        type Error = FakeError;

        fn image_rows(&self, images: &PrefillImages) -> u64 {
            images.len() as u64
        }
        fn open(&mut self, prefix: &[u32], _: u32, _: &PrefillImages) -> Result<Fake, FakeError> {
            assert!(!prefix.contains(&POISON), "poisoned open");
            Ok(Fake(prefix.len() as u64))
        }
        fn append(
            &mut self,
            s: &mut Fake,
            keep: u64,
            tokens: Vec<u32>,
            _: &PrefillImages,
        ) -> Result<(), AppendError<FakeError>> {
            if keep > s.0 {
                return Err(AppendError::rejected(WorkerError::InvalidArgument(
                    "beyond".into(),
                )));
            }
            s.0 = 0;
            assert!(!tokens.contains(&POISON), "poisoned append");
            s.0 = keep + tokens.len() as u64 - 1;
            Ok(())
        }
        fn kv_len(s: &Fake) -> u64 {
            s.0
        }
        fn run_batch(&mut self, sessions: &mut SessionStore<Fake>, batch: Vec<Queued<Self>>) {
            if batch.iter().any(|q| q.job.tag == POISON) {
                // Half-way through: a session's state is already touched.
                sessions.get_mut(batch[0].job.id).unwrap().0 = 12345;
                panic!("poisoned batch");
            }
            self.batches
                .lock()
                .unwrap()
                .push(batch.iter().map(|q| q.job.tag).collect());
            for q in batch {
                let tag = q.job.tag;
                q.answer(Ok(tag));
            }
        }
        fn dequeued(&mut self, jobs: usize) {
            assert!(
                !self.die.load(std::sync::atomic::Ordering::SeqCst),
                "the worker's own loop panics"
            );
            *self.dequeued.lock().unwrap() += jobs;
        }
    }

    type Rx = oneshot::Receiver<Result<u32, FakeError>>;

    fn job(id: &'static str, cost: usize, tag: u32) -> (Queued<Recorder>, Rx) {
        let (reply, rx) = Reply::channel();
        (
            Queued {
                job: Job { id, cost, tag },
                reply,
            },
            rx,
        )
    }

    fn limits(max_jobs: usize, max_cost: usize, wait_ms: u64) -> BatchLimits {
        BatchLimits {
            max_jobs,
            max_cost,
            max_wait: Duration::from_millis(wait_ms),
        }
    }

    fn tags(c: &Collected<Recorder>) -> Vec<u32> {
        c.batch.iter().map(|q| q.job.tag).collect()
    }

    /// Queues `jobs` on a fresh channel; the receivers are kept alive in the result.
    fn queue(jobs: Vec<(Queued<Recorder>, Rx)>) -> (Receiver<Command<Recorder>>, Vec<Rx>) {
        let (tx, rx) = sync_channel(64);
        let mut keep = Vec::new();
        for (q, r) in jobs {
            tx.send(Command::Batch(q)).unwrap();
            keep.push(r);
        }
        (rx, keep)
    }

    #[test]
    fn nothing_joins_once_the_wait_is_over() {
        // Even jobs already queued: they form the next batch.
        let (rx, _keep) = queue(vec![job("b", 1, 1)]);
        let (first, _r) = job("a", 1, 0);
        let c = collect_batch(first, &rx, &mut VecDeque::new(), &limits(10, 100, 0), 10);
        assert_eq!(tags(&c), vec![0]);
        assert_eq!(rx.try_iter().count(), 1);
    }

    #[test]
    fn batch_stops_at_the_job_limit() {
        let (rx, _keep) = queue(
            (1..5)
                .map(|i| job(["b", "c", "d", "e"][i - 1], 1, i as u32))
                .collect(),
        );
        let (first, _r) = job("a", 1, 0);
        let mut backlog = VecDeque::new();
        let c = collect_batch(first, &rx, &mut backlog, &limits(3, 100, 20), 10);
        assert_eq!(tags(&c), vec![0, 1, 2]);
        assert_eq!(c.dequeued, 3);
        // The rest stays queued for the next batch.
        assert!(backlog.is_empty());
        assert_eq!(rx.try_iter().count(), 2);
    }

    #[test]
    fn batch_stops_at_the_cost_budget_and_keeps_the_job_that_did_not_fit() {
        let (rx, _keep) = queue(vec![job("b", 4, 1), job("c", 4, 2), job("d", 1, 3)]);
        let (first, _r) = job("a", 3, 0);
        let mut backlog = VecDeque::new();
        let c = collect_batch(first, &rx, &mut backlog, &limits(10, 8, 20), 10);
        // 3 + 4 fits, + 4 does not: "c" opens the next batch (d waits behind it, in order).
        assert_eq!(tags(&c), vec![0, 1]);
        assert!(matches!(backlog.front(), Some(Command::Batch(q)) if q.job.tag == 2));
        // A first job over the budget still runs, alone.
        let (big, _r) = job("z", 50, 9);
        let c = collect_batch(big, &rx, &mut backlog, &limits(10, 8, 20), 10);
        assert_eq!(tags(&c), vec![9]);
    }

    #[test]
    fn one_job_per_session_and_no_more_jobs_than_sessions() {
        let (rx, _keep) = queue(vec![job("b", 1, 1), job("a", 1, 2), job("c", 1, 3)]);
        let (first, _r) = job("a", 1, 0);
        let mut backlog = VecDeque::new();
        let c = collect_batch(first, &rx, &mut backlog, &limits(10, 100, 20), 10);
        // The second job of "a" ends the batch and runs next, before "c".
        assert_eq!(tags(&c), vec![0, 1]);
        assert!(matches!(backlog.front(), Some(Command::Batch(q)) if q.job.tag == 2));
        let (rx, _keep) = queue(vec![job("b", 1, 1), job("c", 1, 2)]);
        let (first, _r) = job("a", 1, 0);
        // Only two live sessions: no use waiting for a third job.
        let c = collect_batch(first, &rx, &mut VecDeque::new(), &limits(10, 100, 1000), 2);
        assert_eq!(tags(&c), vec![0, 1]);
    }

    #[test]
    fn waits_up_to_max_wait_for_more_jobs() {
        let (tx, rx) = sync_channel::<Command<Recorder>>(8);
        let (late, _late_rx) = job("b", 1, 1);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            tx.send(Command::Batch(late)).map_err(|_| ()).unwrap();
            tx
        });
        let (first, _r) = job("a", 1, 0);
        let started = Instant::now();
        let c = collect_batch(first, &rx, &mut VecDeque::new(), &limits(10, 100, 2000), 2);
        assert_eq!(tags(&c), vec![0, 1], "a job within the wait joins");
        assert!(started.elapsed() < Duration::from_millis(1500));
        let tx = sender.join().unwrap();
        // Without more jobs the wait ends at the deadline.
        let (first, _r) = job("a", 1, 0);
        let started = Instant::now();
        let c = collect_batch(first, &rx, &mut VecDeque::new(), &limits(10, 100, 20), 10);
        assert_eq!(tags(&c), vec![0]);
        assert!(started.elapsed() >= Duration::from_millis(20));
        drop(tx);
    }

    #[test]
    fn jobs_whose_caller_went_away_are_not_run() {
        let (b, b_rx) = job("b", 1, 1);
        let (c, c_rx) = job("c", 1, 2);
        let (tx, rx) = sync_channel(8);
        tx.send(Command::Batch(b)).map_err(|_| ()).unwrap();
        tx.send(Command::Batch(c)).map_err(|_| ()).unwrap();
        drop(b_rx);
        let (first, first_rx) = job("a", 1, 0);
        drop(first_rx);
        let collected = collect_batch(first, &rx, &mut VecDeque::new(), &limits(10, 100, 20), 10);
        assert_eq!(tags(&collected), vec![2]);
        assert_eq!(collected.dequeued, 3, "dropped jobs still leave the queue");
        drop(c_rx);
    }

    #[tokio::test]
    async fn the_worker_runs_sessions_and_batches() {
        let backend = Recorder::default();
        let batches = Arc::clone(&backend.batches);
        let dequeued = Arc::clone(&backend.dequeued);
        let store = SessionStore::new(SessionLimits {
            max_sessions: 10,
            max_bytes: 100,
            ttl: Duration::from_secs(60),
        });
        let cfg = WorkerConfig {
            queue_capacity: 8,
            batch: limits(10, 100, 50),
            expiry_tick: Duration::from_millis(100),
            max_context: 1000,
        };
        let w = WorkerHandle::spawn("test", backend, store, cfg).unwrap();
        let opened = w
            .open("a".into(), vec![1, 2, 3], PrefillImages::none(), None)
            .await
            .unwrap();
        assert_eq!(opened.kv_len, 2);
        w.open("b".into(), vec![1], PrefillImages::none(), None)
            .await
            .unwrap();
        assert!(matches!(
            w.open("a".into(), vec![1], PrefillImages::none(), None)
                .await,
            Err(FakeError::Session(SessionStoreError::AlreadyExists(_)))
        ));
        assert!(matches!(
            w.append("a".into(), 9, vec![4], PrefillImages::none(), None)
                .await,
            Err(FakeError::Worker(WorkerError::InvalidArgument(_)))
        ));
        // Past the context: refused before the backend runs, the session unchanged.
        assert!(matches!(
            w.append("a".into(), 1, vec![4; 1000], PrefillImages::none(), None)
                .await,
            Err(FakeError::Worker(WorkerError::ContextFull(_)))
        ));
        assert!(matches!(
            w.append("nope".into(), 1, vec![4; 1000], PrefillImages::none(), None)
                .await,
            Err(FakeError::Session(SessionStoreError::NotFound(_)))
        ));
        assert_eq!(
            w.append("a".into(), 1, vec![4, 5], PrefillImages::none(), None)
                .await
                .unwrap()
                .kv_len,
            2
        );
        // A backend that picks no tokens refuses a first step, opening or appending nothing.
        let first = || {
            Some(FirstStep {
                sampling: SamplingParams::greedy(),
                stop: StopConditions {
                    eos_token_ids: vec![],
                    max_new_tokens: 1,
                },
            })
        };
        assert!(matches!(
            w.open("c".into(), vec![1, 2], PrefillImages::none(), first())
                .await,
            Err(FakeError::Worker(WorkerError::InvalidArgument(_)))
        ));
        assert!(matches!(
            w.append("a".into(), 1, vec![6], PrefillImages::none(), first())
                .await,
            Err(FakeError::Worker(WorkerError::InvalidArgument(_)))
        ));
        assert_eq!(
            w.append("a".into(), 2, vec![6], PrefillImages::none(), None)
                .await
                .unwrap()
                .kv_len,
            2,
            "the session as the last append left it"
        );
        let (x, y) = tokio::join!(
            w.submit(Job {
                id: "a",
                cost: 1,
                tag: 7
            }),
            w.submit(Job {
                id: "b",
                cost: 1,
                tag: 8
            })
        );
        assert_eq!((x.unwrap(), y.unwrap()), (7, 8));
        assert_eq!(batches.lock().unwrap().iter().flatten().count(), 2);
        assert_eq!(*dequeued.lock().unwrap(), 2);
        assert!(w.close("a".into()).await.unwrap());
        assert!(!w.close("a".into()).await.unwrap());
    }

    fn worker(backend: Recorder) -> WorkerHandle<Recorder> {
        let store = SessionStore::new(SessionLimits {
            max_sessions: 10,
            max_bytes: 100,
            ttl: Duration::from_secs(60),
        });
        let cfg = WorkerConfig {
            queue_capacity: 8,
            batch: limits(10, 100, 1),
            expiry_tick: Duration::from_millis(100),
            max_context: 1000,
        };
        WorkerHandle::spawn("test", backend, store, cfg).unwrap()
    }

    fn job_of(id: &'static str, tag: u32) -> Job {
        Job { id, cost: 1, tag }
    }

    #[tokio::test]
    async fn a_panic_fails_its_own_requests_and_drops_their_sessions_only() {
        let backend = Recorder::default();
        let die = Arc::clone(&backend.die);
        let w = worker(backend);
        for id in ["a", "b"] {
            w.open(id.into(), vec![1, 2, 3], PrefillImages::none(), None)
                .await
                .unwrap();
        }
        // A poisoned batch: INTERNAL for its request, its session dropped.
        let err = w.submit(job_of("a", POISON)).await.unwrap_err();
        assert!(
            matches!(err, FakeError::Worker(WorkerError::Panicked)),
            "{err:?}"
        );
        assert_eq!(
            FakeError::Worker(WorkerError::Panicked).to_string(),
            WorkerError::Panicked.to_string()
        );
        assert_eq!(WorkerError::Panicked.code(), Code::Internal);
        assert!(!w.close("a".into()).await.unwrap(), "dropped");
        // The other session, and the worker, go on.
        assert_eq!(w.submit(job_of("b", 7)).await.unwrap(), 7);
        // A poisoned append drops its session; a poisoned open leaves none behind.
        assert!(matches!(
            w.append("b".into(), 0, vec![POISON, 1], PrefillImages::none(), None)
                .await,
            Err(FakeError::Worker(WorkerError::Panicked))
        ));
        assert!(!w.close("b".into()).await.unwrap());
        assert!(matches!(
            w.open("c".into(), vec![POISON, 1], PrefillImages::none(), None)
                .await,
            Err(FakeError::Worker(WorkerError::Panicked))
        ));
        w.open("c".into(), vec![1, 2], PrefillImages::none(), None)
            .await
            .unwrap();
        assert_eq!(w.submit(job_of("c", 8)).await.unwrap(), 8);
        // Alive all along.
        assert!(
            tokio::time::timeout(Duration::from_millis(20), w.stopped())
                .await
                .is_err()
        );

        // A panic outside the contained work kills the thread: its request fails INTERNAL,
        // `stopped` resolves, later requests are UNAVAILABLE.
        die.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(
            w.submit(job_of("c", 9)).await,
            Err(FakeError::Worker(WorkerError::Panicked))
        ));
        tokio::time::timeout(Duration::from_secs(10), w.stopped())
            .await
            .expect("the worker's death is seen");
        let gone = w.close("c".into()).await.unwrap_err();
        assert!(matches!(gone, FakeError::Worker(WorkerError::WorkerGone)));
    }
}
