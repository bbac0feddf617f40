//! The generation loop's steps against in-process fake draft and target replicas (no
//! processes, no models): speculative output equals target-only output, and the
//! recovery paths (evicted target session, lost, cut-off or stuck target replica, failing draft,
//! incompatible draft) keep it so.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use orchestrator::ReplicaKind;
use orchestrator::clients::{ReplicaApi, TreeStream};
use orchestrator::engine::{Engine, EngineConfig, EngineParts, GenParams, Interrupted};
use orchestrator::health::Backoff;
use orchestrator::plan::SpecSettings;
use orchestrator::routing::{Replica, ReplicaSet};
use orchestrator::service::event_to_proto;
use orchestrator::session::Conversation;
use orchestrator::text::Detokenize;
use specllava_proto::v1 as pb;
use specllava_wire::compat::TokenizerIdentity;
use speculate::{SamplingParams, TreeMode};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

const VOCAB: u32 = 50;
const IMAGE: u32 = 49;
const EOS: u32 = 2;

/// The fake target's next token after `t` (its "model").
fn target_next(t: u32) -> u32 {
    (t * 7 + 3) % 43 + 5
}

/// The fake draft's guess: right except after multiples of 3.
fn draft_next(t: u32) -> u32 {
    if t.is_multiple_of(3) {
        (target_next(t) + 1) % 43 + 5
    } else {
        target_next(t)
    }
}

fn model_info(vocab_size: u32) -> pb::ModelInfo {
    pb::ModelInfo {
        vocab_size,
        image_token_id: IMAGE,
        num_image_tokens: 1,
        eos_token_ids: vec![EOS],
        bos_token_id: None,
        max_context: 10_000,
        tokenizer_fingerprint: String::new(),
        vision_fingerprint: String::new(),
        any_resolution: None,
    }
}

/// Failures to inject, keyed by replica address.
#[derive(Default)]
struct Faults {
    /// Verify answers this code once.
    verify_once: HashMap<SocketAddr, Code>,
    /// Every call to these targets hangs (a stuck process).
    stuck: Vec<SocketAddr>,
    /// The draft stream fails at this step.
    draft_fails_at: Option<usize>,
    /// Vocabulary size the draft reports.
    draft_vocab: Option<u32>,
    /// Target sessions take this long to open (a slow prefill).
    target_open_delay: Option<std::time::Duration>,
    /// Draft sessions take this long to open.
    draft_open_delay: Option<std::time::Duration>,
    /// Every verify takes this long.
    verify_delay: Option<std::time::Duration>,
}

/// A fake target prefill's first step: the token after `history`'s last, appended (the
/// session's new root).
fn pick_first(history: &mut Vec<u32>, ask: Option<pb::FirstStepRequest>) -> Option<pb::FirstStep> {
    let stop = ask?.stop.unwrap_or_default();
    let token = target_next(*history.last().unwrap());
    history.push(token);
    let finish = if stop.eos_token_ids.contains(&token) {
        pb::FinishReason::Eos
    } else if stop.max_new_tokens == 1 {
        pb::FinishReason::Length
    } else {
        pb::FinishReason::Unspecified
    };
    Some(pb::FirstStep {
        token,
        finish: finish as i32,
    })
}

/// In-process draft and target replicas: sessions are token histories.
#[derive(Default)]
struct Fake {
    targets: Mutex<HashMap<(SocketAddr, String), Vec<u32>>>,
    drafts: Arc<Mutex<HashMap<String, Vec<u32>>>>,
    faults: Mutex<Faults>,
    calls: Arc<Mutex<Vec<String>>>,
    /// The accepted paths the draft heard (those not empty).
    draft_paths: Arc<Mutex<Vec<Vec<u32>>>>,
}

impl Fake {
    fn log(&self, call: impl Into<String>) {
        self.calls.lock().unwrap().push(call.into());
    }

    /// Never answers when `r` is stuck.
    async fn hang_if_stuck(&self, r: &Replica) {
        if self.faults.lock().unwrap().stuck.contains(&r.addr) {
            std::future::pending::<()>().await;
        }
    }

    /// The calls so far, once background calls (session closes) have run.
    async fn calls_settled(&self) -> Vec<String> {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        self.calls.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl ReplicaApi for Fake {
    async fn open_session(
        &self,
        kind: ReplicaKind,
        r: &Replica,
        req: pb::OpenSessionRequest,
    ) -> Result<pb::OpenSessionResponse, Status> {
        self.hang_if_stuck(r).await;
        let delay = {
            let f = self.faults.lock().unwrap();
            match kind {
                ReplicaKind::Target => f.target_open_delay,
                ReplicaKind::Draft => f.draft_open_delay,
            }
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        self.log(format!("open {kind} {}", r.addr));
        let mut history = req.token_ids;
        let kv_len = history.len() as u64 - 1 + u64::from(req.first_step.is_some());
        let first_step = match kind {
            ReplicaKind::Target => {
                let first = pick_first(&mut history, req.first_step);
                self.targets
                    .lock()
                    .unwrap()
                    .insert((r.addr, req.session_id), history);
                first
            }
            ReplicaKind::Draft => {
                assert!(req.first_step.is_none(), "a draft picks no tokens");
                self.drafts.lock().unwrap().insert(req.session_id, history);
                None
            }
        };
        Ok(pb::OpenSessionResponse {
            kv_len,
            num_image_tokens: 1,
            prefill_ns: 1,
            first_step,
            image_rows: Vec::new(),
        })
    }

    async fn append(
        &self,
        kind: ReplicaKind,
        r: &Replica,
        req: pb::AppendRequest,
    ) -> Result<pb::AppendResponse, Status> {
        self.log(format!("append {kind}"));
        let keep = req.keep_kv_len as usize;
        let update = |h: &mut Vec<u32>| {
            h.truncate(keep);
            h.extend(&req.token_ids);
        };
        let (kv_len, first_step) = match kind {
            ReplicaKind::Target => {
                let mut t = self.targets.lock().unwrap();
                let h = t
                    .get_mut(&(r.addr, req.session_id.clone()))
                    .ok_or_else(|| Status::not_found("no session"))?;
                update(h);
                let first = pick_first(h, req.first_step);
                (h.len() as u64 - 1, first)
            }
            ReplicaKind::Draft => {
                assert!(req.first_step.is_none(), "a draft picks no tokens");
                let mut d = self.drafts.lock().unwrap();
                let h = d
                    .get_mut(&req.session_id)
                    .ok_or_else(|| Status::not_found("no session"))?;
                update(h);
                (h.len() as u64 - 1, None)
            }
        };
        Ok(pb::AppendResponse {
            kv_len,
            forward_ns: 1,
            first_step,
            image_rows: Vec::new(),
        })
    }

    async fn close_session(
        &self,
        kind: ReplicaKind,
        r: &Replica,
        req: pb::CloseSessionRequest,
    ) -> Result<pb::CloseSessionResponse, Status> {
        self.hang_if_stuck(r).await;
        self.log(format!("close {kind}"));
        let existed = match kind {
            ReplicaKind::Target => self
                .targets
                .lock()
                .unwrap()
                .remove(&(r.addr, req.session_id))
                .is_some(),
            ReplicaKind::Draft => self
                .drafts
                .lock()
                .unwrap()
                .remove(&req.session_id)
                .is_some(),
        };
        Ok(pb::CloseSessionResponse { existed })
    }

    async fn verify(
        &self,
        r: &Replica,
        req: pb::VerifyRequest,
    ) -> Result<pb::VerifyResponse, Status> {
        self.hang_if_stuck(r).await;
        let delay = self.faults.lock().unwrap().verify_delay;
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        if let Some(code) = self.faults.lock().unwrap().verify_once.remove(&r.addr) {
            self.log(format!("verify fails {code:?}"));
            // The session is gone (evicted, or the replica restarted).
            self.targets
                .lock()
                .unwrap()
                .remove(&(r.addr, req.session_id.clone()));
            return Err(Status::new(code, "injected"));
        }
        let mut sessions = self.targets.lock().unwrap();
        let history = sessions
            .get_mut(&(r.addr, req.session_id))
            .ok_or_else(|| Status::not_found("no session"))?;
        assert_eq!(
            req.expected_kv_len,
            history.len() as u64 - 1,
            "stale kv_len"
        );
        let tree = req.tree.unwrap();
        assert_eq!(tree.tokens[0], *history.last().unwrap(), "root");
        self.calls
            .lock()
            .unwrap()
            .push(format!("verify {} nodes", tree.tokens.len()));
        let max = req.stop.unwrap().max_new_tokens as usize;
        // Greedy verification: descend while the target's token is a child.
        let (mut node, mut emitted, mut path) = (0usize, Vec::new(), vec![0u32]);
        loop {
            let x = target_next(tree.tokens[node]);
            emitted.push(x);
            let child = (0..tree.tokens.len())
                .find(|&c| tree.parents[c] == node as i32 && tree.tokens[c] == x);
            match child {
                Some(c) if emitted.len() < max => {
                    path.push(c as u32);
                    node = c;
                }
                _ => break,
            }
        }
        path.truncate(emitted.len());
        history.extend(&emitted);
        let finish = if emitted.len() >= max {
            pb::FinishReason::Length
        } else {
            pb::FinishReason::Unspecified
        };
        Ok(pb::VerifyResponse {
            accepted: emitted.len() as u32 - 1,
            proposed: tree.tokens.len() as u32 - 1,
            kv_len: history.len() as u64 - 1,
            finish: finish as i32,
            forward_ns: 10,
            total_ns: 12,
            batch_size: 1,
            emitted,
            accepted_path: path,
        })
    }

    async fn target_info(&self, _: &Replica) -> Result<pb::InfoResponse, Status> {
        Ok(pb::InfoResponse {
            model: Some(model_info(VOCAB)),
            max_tree_nodes: 64,
            max_tree_depth: 16,
            verify_costs: Vec::new(),
        })
    }

    async fn draft_info(&self, _: &Replica) -> Result<pb::DraftInfoResponse, Status> {
        let vocab = self.faults.lock().unwrap().draft_vocab.unwrap_or(VOCAB);
        Ok(pb::DraftInfoResponse {
            model: Some(model_info(vocab)),
            max_depth: 16,
            max_branching: 16,
            max_budget: 255,
            level_costs: Vec::new(),
        })
    }

    async fn speculate(
        &self,
        _: &Replica,
        requests: mpsc::Receiver<pb::SpeculateRequest>,
    ) -> Result<TreeStream, Status> {
        let drafts = Arc::clone(&self.drafts);
        let calls = Arc::clone(&self.calls);
        let paths = Arc::clone(&self.draft_paths);
        let fails_at = self.faults.lock().unwrap().draft_fails_at;
        let mut step = 0;
        let trees = ReceiverStream::new(requests).map(move |req| {
            step += 1;
            if fails_at == Some(step) {
                return Err(Status::internal("injected draft failure"));
            }
            let mut d = drafts.lock().unwrap();
            let history = d
                .get_mut(&req.session_id)
                .ok_or_else(|| Status::not_found("no draft session"))?;
            history.extend(&req.new_tokens);
            if !req.accepted_path.is_empty() {
                paths.lock().unwrap().push(req.accepted_path.clone());
            }
            let depth = req.params.unwrap_or_default().depth as usize;
            let mut tokens = vec![*history.last().unwrap()];
            for i in 0..depth {
                tokens.push(draft_next(tokens[i]));
            }
            let n = tokens.len();
            calls.lock().unwrap().push(format!("draft tree {n} nodes"));
            Ok(pb::DraftTree {
                tree: Some(pb::TokenTree {
                    tokens,
                    parents: (0..n as i32).map(|i| i - 1).collect(),
                    scores: vec![0.0; n],
                }),
                levels: depth as u32,
                drafted_nodes: depth as u32,
                draft_ns: 5,
                ..Default::default()
            })
        });
        Ok(Box::pin(trees))
    }
}

struct Chars;

impl Detokenize for Chars {
    fn decode(&self, ids: &[u32]) -> Result<String, String> {
        Ok(ids
            .iter()
            .map(|&i| char::from(b'a' + (i % 26) as u8))
            .collect())
    }
}

fn set(kind: ReplicaKind, addrs: &[&str]) -> Arc<ReplicaSet> {
    // A failed replica stays out of rotation for the whole test.
    let backoff = Backoff {
        base: std::time::Duration::from_secs(60),
        max: std::time::Duration::from_secs(60),
    };
    let set =
        ReplicaSet::new(kind, addrs.iter().map(|a| a.to_string()).collect()).with_backoff(backoff);
    set.apply_resolved(addrs.iter().map(|a| a.parse().unwrap()).collect(), true);
    Arc::new(set)
}

fn engine(fake: Arc<Fake>, targets: &[&str]) -> Engine {
    Engine::new(EngineParts {
        targets: set(ReplicaKind::Target, targets),
        ..parts(fake)
    })
    .unwrap()
}

/// The generated tokens and the summary of one turn.
async fn run(
    engine: &Engine,
    mode: Option<TreeMode>,
) -> Result<(Vec<u32>, pb::GenerateSummary), Interrupted> {
    run_after(engine, vec![1, 10, 11, 12], mode).await
}

/// [`run`] after the prompt `history`.
async fn run_after(
    engine: &Engine,
    history: Vec<u32>,
    mode: Option<TreeMode>,
) -> Result<(Vec<u32>, pb::GenerateSummary), Interrupted> {
    run_for(engine, history, mode, 24).await
}

/// [`run_after`] with a budget of `max_new_tokens`.
async fn run_for(
    engine: &Engine,
    history: Vec<u32>,
    mode: Option<TreeMode>,
    max_new_tokens: u32,
) -> Result<(Vec<u32>, pb::GenerateSummary), Interrupted> {
    let (tokens, summary, kept) =
        run_with(engine, history, mode, max_new_tokens, Vec::new()).await?;
    assert_eq!(kept, tokens, "the history holds the answer");
    Ok((tokens, summary))
}

/// [`run_for`] with stop strings: also the tokens the history kept after the prompt.
async fn run_with(
    engine: &Engine,
    history: Vec<u32>,
    mode: Option<TreeMode>,
    max_new_tokens: u32,
    stop: Vec<String>,
) -> Result<(Vec<u32>, pb::GenerateSummary, Vec<u32>), Interrupted> {
    let mut conv = Conversation::new("s1".into(), Vec::new());
    let prompt_len = history.len();
    conv.history = history;
    let params = GenParams {
        max_new_tokens,
        sampling: SamplingParams::greedy(),
        stop,
        ignore_eos: true,
    };
    let spec = SpecSettings {
        mode,
        depth: 4,
        branching: 0,
        budget: 0,
        draft_ahead: true,
        report_steps: false,
    };
    let (tx, mut rx) = mpsc::channel(256);
    engine
        .generate(&mut conv, prompt_len as u32, &params, &spec, &tx)
        .await?;
    drop(tx);
    let (mut tokens, mut summary) = (Vec::new(), None);
    while let Some(msg) = rx.recv().await {
        // Through the gRPC API's translation, which the assertions read.
        match event_to_proto(msg.unwrap()).event.unwrap() {
            pb::generate_response::Event::Chunk(c) => tokens.extend(c.token_ids),
            pb::generate_response::Event::Summary(s) => summary = Some(s),
        }
    }
    let kept = conv.history[prompt_len..].to_vec();
    Ok((tokens, summary.expect("a summary"), kept))
}

/// Makes the target at `addr` fail its next verify with `code` (dropping the session).
fn fail_verify_once(fake: &Fake, addr: &str, code: Code) {
    let addr: SocketAddr = addr.parse().unwrap();
    fake.faults.lock().unwrap().verify_once.insert(addr, code);
}

/// What target-only decoding emits.
fn expected() -> Vec<u32> {
    expected_after(12)
}

/// What target-only decoding emits after `root`.
fn expected_after(root: u32) -> Vec<u32> {
    let mut t = root;
    (0..24)
        .map(|_| {
            t = target_next(t);
            t
        })
        .collect()
}

#[tokio::test]
async fn speculative_output_equals_target_only_output() {
    let fake = Arc::new(Fake::default());
    let e = engine(Arc::clone(&fake), &["127.0.0.1:7000"]);
    let (plain, s0) = run(&e, None).await.ok().unwrap();
    assert_eq!(plain, expected());
    assert!(!s0.stats.unwrap().speculative);
    let (spec, s1) = run(&e, Some(TreeMode::Chain)).await.ok().unwrap();
    assert_eq!(spec, plain);
    let stats = s1.stats.unwrap();
    assert!(stats.speculative);
    assert!(stats.accepted > 0, "the draft is mostly right: {stats:?}");
    assert!(stats.steps < 24, "fewer steps than tokens: {stats:?}");
    assert_eq!(s1.finish, pb::FinishReason::Length as i32);
    assert_eq!(s1.usage.unwrap().completion_tokens, 24);
}

#[tokio::test]
async fn an_evicted_target_session_is_re_prefilled_and_the_output_is_unchanged() {
    let fake = Arc::new(Fake::default());
    fail_verify_once(&fake, "127.0.0.1:7000", Code::NotFound);
    let e = engine(Arc::clone(&fake), &["127.0.0.1:7000"]);
    let (tokens, summary) = run(&e, Some(TreeMode::Chain)).await.ok().unwrap();
    assert_eq!(tokens, expected());
    assert!(summary.stats.unwrap().speculative);
    let calls = fake.calls.lock().unwrap().clone();
    let opens = calls
        .iter()
        .filter(|c| c.starts_with("open target"))
        .count();
    assert_eq!(opens, 2, "re-opened once: {calls:?}");
}

#[tokio::test]
async fn a_lost_target_replica_is_replaced_and_the_output_is_unchanged() {
    let fake = Arc::new(Fake::default());
    fail_verify_once(&fake, "127.0.0.1:7000", Code::Unavailable);
    let e = engine(Arc::clone(&fake), &["127.0.0.1:7000", "127.0.0.1:7001"]);
    let (tokens, _) = run(&e, Some(TreeMode::Chain)).await.ok().unwrap();
    assert_eq!(tokens, expected());
}

#[tokio::test]
async fn a_target_cut_off_mid_verify_fails_over_and_the_output_is_unchanged() {
    // UNKNOWN: the answer cut off by a dying peer; the replica is out of rotation at once.
    let fake = Arc::new(Fake::default());
    fail_verify_once(&fake, "127.0.0.1:7000", Code::Unknown);
    let e = engine(Arc::clone(&fake), &["127.0.0.1:7000", "127.0.0.1:7001"]);
    let (tokens, _) = run(&e, Some(TreeMode::Chain)).await.ok().unwrap();
    assert_eq!(tokens, expected());
    let calls = fake.calls_settled().await;
    assert!(
        calls.iter().any(|c| c == "open target 127.0.0.1:7001"),
        "failed over: {calls:?}"
    );
    // New conversations avoid the failed replica (out of rotation for its backoff).
    fake.calls.lock().unwrap().clear();
    run(&e, None).await.ok().unwrap();
    let calls = fake.calls_settled().await;
    assert!(
        calls.iter().all(|c| !c.contains("7000")),
        "the failed replica is out of rotation: {calls:?}"
    );
}

/// One target out of rotation for a long backoff, and the engine over it.
fn one_failed_target(fake: &Arc<Fake>) -> (Engine, Arc<Replica>) {
    let backoff = Backoff {
        base: std::time::Duration::from_secs(60),
        max: std::time::Duration::from_secs(60),
    };
    let targets = ReplicaSet::new(ReplicaKind::Target, vec![]).with_backoff(backoff);
    targets.apply_resolved(vec!["127.0.0.1:7000".parse().unwrap()], true);
    let targets = Arc::new(targets);
    let e = Engine::new(EngineParts {
        targets: Arc::clone(&targets),
        ..parts(Arc::clone(fake))
    })
    .unwrap();
    let r = targets.replicas().remove(0);
    r.mark_down(ReplicaKind::Target, &Status::unavailable("down"));
    assert!(!r.is_available() && !r.on_probation());
    (e, r)
}

#[tokio::test]
async fn a_failed_replica_is_probed_back_into_rotation_before_its_backoff_ends() {
    let fake = Arc::new(Fake::default());
    let (e, r) = one_failed_target(&fake);
    e.probe_replicas(std::time::Duration::from_secs(1)).await;
    assert!(r.is_available() && !r.is_failing(), "answered its probe");
    assert_eq!(run(&e, None).await.ok().unwrap().0, expected());
}

#[tokio::test]
async fn with_every_target_out_of_rotation_a_turn_tries_the_likeliest_one() {
    let fake = Arc::new(Fake::default());
    let (e, r) = one_failed_target(&fake);
    // No probe yet: the turn itself tries the replica (up again), which answers.
    assert_eq!(run(&e, None).await.ok().unwrap().0, expected());
    assert!(r.is_available() && !r.is_failing());
}

fn short_deadlines(fake: Arc<Fake>, targets: &[&str]) -> Engine {
    Engine::new(EngineParts {
        targets: set(ReplicaKind::Target, targets),
        cfg: EngineConfig {
            target_timeout: std::time::Duration::from_millis(100),
            draft_timeout: std::time::Duration::from_millis(100),
            ..EngineConfig::default()
        },
        ..parts(fake)
    })
    .unwrap()
}

#[tokio::test]
async fn a_stuck_target_misses_its_deadline_and_another_takes_the_session() {
    let fake = Arc::new(Fake::default());
    let e = short_deadlines(Arc::clone(&fake), &["127.0.0.1:7000", "127.0.0.1:7001"]);
    let stuck: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    fake.faults.lock().unwrap().stuck.push(stuck);
    let (tokens, _) = run(&e, Some(TreeMode::Chain)).await.ok().unwrap();
    assert_eq!(tokens, expected());
}

#[tokio::test]
async fn the_turn_fails_over_to_the_last_target_in_rotation() {
    // More failed replicas than --target-attempts: every one is tried once, then the
    // healthy one serves the turn.
    let targets = [
        "127.0.0.1:7000",
        "127.0.0.1:7001",
        "127.0.0.1:7002",
        "127.0.0.1:7003",
        "127.0.0.1:7004",
    ];
    let fake = Arc::new(Fake::default());
    let e = short_deadlines(Arc::clone(&fake), &targets);
    for a in &targets[..4] {
        fake.faults.lock().unwrap().stuck.push(a.parse().unwrap());
    }
    let (tokens, _) = run(&e, Some(TreeMode::Chain)).await.ok().unwrap();
    assert_eq!(tokens, expected());
}

#[tokio::test]
async fn with_every_target_stuck_the_turn_fails_unavailable_within_the_deadline() {
    let fake = Arc::new(Fake::default());
    let e = short_deadlines(Arc::clone(&fake), &["127.0.0.1:7000", "127.0.0.1:7001"]);
    for a in ["127.0.0.1:7000", "127.0.0.1:7001"] {
        fake.faults.lock().unwrap().stuck.push(a.parse().unwrap());
    }
    let t0 = std::time::Instant::now();
    match run(&e, None).await {
        Err(Interrupted::Failed(err)) => {
            let status = Status::from(err);
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
        other => panic!("expected a failure, got {:?}", other.map(|(t, _)| t)),
    }
    // Each replica is tried once (then out of rotation); closes never hold the turn up.
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
}

#[tokio::test]
async fn too_many_recoveries_fail_the_turn() {
    let fake = Arc::new(Fake::default());
    let e = Engine::new(EngineParts {
        cfg: EngineConfig {
            max_recoveries: 0,
            ..EngineConfig::default()
        },
        ..parts(Arc::clone(&fake))
    })
    .unwrap();
    fail_verify_once(&fake, "127.0.0.1:7000", Code::NotFound);
    match run(&e, None).await {
        Err(Interrupted::Failed(err)) => assert!(err.to_string().contains("injected"), "{err}"),
        other => panic!("expected a failure, got {:?}", other.map(|(t, _)| t)),
    }
}

fn parts(fake: Arc<Fake>) -> EngineParts {
    EngineParts {
        replicas: fake,
        tokenizer: Arc::new(Chars),
        identity: TokenizerIdentity {
            vocab_size: VOCAB,
            bos_token_id: None,
            eos_token_id: EOS,
            image_token_id: IMAGE,
            fingerprint: String::new(),
        },
        drafts: set(ReplicaKind::Draft, &["127.0.0.1:7100"]),
        targets: set(ReplicaKind::Target, &["127.0.0.1:7000"]),
        cfg: EngineConfig::default(),
    }
}

#[tokio::test]
async fn a_failing_draft_falls_back_to_target_only_mid_turn() {
    let fake = Arc::new(Fake::default());
    fake.faults.lock().unwrap().draft_fails_at = Some(3);
    let e = engine(Arc::clone(&fake), &["127.0.0.1:7000"]);
    let (tokens, summary) = run(&e, Some(TreeMode::Chain)).await.ok().unwrap();
    assert_eq!(tokens, expected());
    let stats = summary.stats.unwrap();
    assert!(stats.speculative && stats.drafted > 0, "{stats:?}");
    assert!(
        stats.drafted < 4 * stats.steps,
        "target-only after the failure: {stats:?}"
    );
    let calls = fake.calls_settled().await;
    assert!(
        calls.iter().any(|c| c == "close draft"),
        "the draft session is closed: {calls:?}"
    );
}

#[tokio::test]
async fn an_incompatible_draft_is_refused_and_never_used() {
    let fake = Arc::new(Fake::default());
    fake.faults.lock().unwrap().draft_vocab = Some(VOCAB + 16);
    let e = engine(Arc::clone(&fake), &["127.0.0.1:7000"]);
    let report = e.check_replicas(ReplicaKind::Target).await;
    assert_eq!(report.compatible, 1);
    let report = e.check_replicas(ReplicaKind::Draft).await;
    assert_eq!(report.compatible, 0);
    assert_eq!(report.refused.len(), 1);
    assert!(
        report.refused[0].contains("vocabulary mismatch: draft=66, target=50"),
        "{report:?}"
    );
    let (tokens, summary) = run(&e, Some(TreeMode::Chain)).await.ok().unwrap();
    assert_eq!(tokens, expected());
    assert!(!summary.stats.unwrap().speculative);
    let calls = fake.calls.lock().unwrap().clone();
    assert!(!calls.iter().any(|c| c.contains("draft")), "{calls:?}");
}

#[tokio::test]
async fn the_first_tree_is_drafted_while_the_target_prefills() {
    let fake = Arc::new(Fake::default());
    fake.faults.lock().unwrap().target_open_delay = Some(std::time::Duration::from_millis(50));
    let parts = parts(Arc::clone(&fake));
    // The step's shape as it is (the default).
    assert_eq!(parts.cfg.first_tree_verify_slack, None);
    let e = Engine::new(parts).unwrap();
    // The target's limits are known (as after start-up's check).
    e.check_replicas(ReplicaKind::Target).await;
    // After 10 the draft guesses what the target emits (35, 38, 16, 34).
    let (tokens, summary) = run_after(&e, vec![1, 10], Some(TreeMode::Chain))
        .await
        .ok()
        .unwrap();
    assert_eq!(tokens, expected_after(10));
    assert!(summary.stats.unwrap().speculative);
    let calls = fake.calls.lock().unwrap().clone();
    let at = |call: &str| calls.iter().position(|c| c.starts_with(call));
    let (first_tree, target_open) = (at("draft tree 5"), at("open target"));
    assert!(
        first_tree.is_some() && first_tree < target_open,
        "the first tree is drafted during the target's prefill: {calls:?}"
    );
    // The prefill picked the first token (35); the first step verifies the tree below it.
    assert_eq!(
        calls
            .iter()
            .find(|c| c.starts_with("verify"))
            .map(String::as_str),
        Some("verify 4 nodes"),
        "the first step verifies it: {calls:?}"
    );
    // It is the first step's tree: no second request for the same root came first.
    let first_verify = at("verify").unwrap();
    let trees_before = calls[..first_verify]
        .iter()
        .filter(|c| c.starts_with("draft tree"))
        .count();
    assert_eq!(trees_before, 1, "{calls:?}");
}

/// The target's prefill picks a turn's first token: no verify call comes before it, and a
/// budget of one token needs none at all, speculative or not.
#[tokio::test]
async fn the_prefill_picks_the_first_token() {
    for mode in [None, Some(TreeMode::Chain)] {
        let fake = Arc::new(Fake::default());
        let e = engine(Arc::clone(&fake), &["127.0.0.1:7000"]);
        let (tokens, summary) = run_for(&e, vec![1, 10, 11, 12], mode, 1)
            .await
            .ok()
            .unwrap();
        assert_eq!(tokens, expected()[..1]);
        let summary_stats = summary.stats.unwrap();
        assert_eq!(summary_stats.steps, 1, "the prefill's step");
        assert_eq!(summary.finish, pb::FinishReason::Length as i32);
        let calls = fake.calls_settled().await;
        assert!(!calls.iter().any(|c| c.starts_with("verify")), "{calls:?}");
        // Longer answers: the first token still needs no verify (24 tokens in fewer calls).
        fake.calls.lock().unwrap().clear();
        let (tokens, _) = run_for(&e, vec![1, 10, 11, 12], None, 24)
            .await
            .ok()
            .unwrap();
        assert_eq!(tokens, expected());
        let verifies = fake
            .calls_settled()
            .await
            .iter()
            .filter(|c| c.starts_with("verify"))
            .count();
        assert_eq!(verifies, 23, "mode {mode:?}");
    }
}

/// A stop string in the first token (or the second) leaves the history at the prompt (or
/// the prompt and the first token): the conversation never holds text past the stop.
#[tokio::test]
async fn a_stop_string_at_the_first_tokens_cuts_the_history_there() {
    // After 12 the target emits 6 ('g'), then 7 ('h').
    for mode in [None, Some(TreeMode::Chain)] {
        for (stop, want) in [("g", vec![]), ("h", vec![6])] {
            let fake = Arc::new(Fake::default());
            let e = engine(Arc::clone(&fake), &["127.0.0.1:7000"]);
            let (_, summary, kept) =
                run_with(&e, vec![1, 10, 11, 12], mode, 24, vec![stop.to_owned()])
                    .await
                    .ok()
                    .unwrap();
            assert_eq!(kept, want, "stop {stop:?}, mode {mode:?}");
            assert_eq!(summary.finish, pb::FinishReason::StopString as i32);
        }
    }
}

#[tokio::test]
async fn a_first_tree_too_costly_to_verify_is_not_drafted() {
    let fake = Arc::new(Fake::default());
    fake.faults.lock().unwrap().target_open_delay = Some(std::time::Duration::from_millis(50));
    let mut parts = parts(Arc::clone(&fake));
    // No tree verifies as fast as a root-only one under the policy's prior.
    parts.cfg.first_tree_verify_slack = Some(1.0);
    let e = Engine::new(parts).unwrap();
    e.check_replicas(ReplicaKind::Target).await;
    let (tokens, summary) = run(&e, Some(TreeMode::Chain)).await.ok().unwrap();
    assert_eq!(tokens, expected());
    assert!(summary.stats.unwrap().speculative);
    let calls = fake.calls.lock().unwrap().clone();
    let target_open = calls
        .iter()
        .position(|c| c.starts_with("open target"))
        .unwrap();
    assert!(
        !calls[..target_open]
            .iter()
            .any(|c| c.starts_with("draft tree")),
        "nothing drafted during the prefill: {calls:?}"
    );
}

/// A first tree drafted while target-only steps ran (the draft set up late) still serves:
/// the subtree below the tokens the target emitted meanwhile is verified without a draft
/// round trip, and the draft hears the accepted path as a path of the tree it drafted.
#[tokio::test(start_paused = true)]
async fn a_late_first_tree_serves_below_the_tokens_emitted_meanwhile() {
    let fake = Arc::new(Fake::default());
    let e = engine(Arc::clone(&fake), &["127.0.0.1:7000"]);
    // The target's limits, which shape the first tree, are known from the turn before.
    run(&e, None).await.ok().unwrap();
    {
        let mut f = fake.faults.lock().unwrap();
        f.draft_open_delay = Some(std::time::Duration::from_micros(1500));
        f.verify_delay = Some(std::time::Duration::from_millis(1));
    }
    fake.calls.lock().unwrap().clear();
    // After 10 the draft guesses what the target emits: 35, 38, 16, 34.
    let (tokens, _) = run_after(&e, vec![1, 10], Some(TreeMode::Chain))
        .await
        .ok()
        .unwrap();
    assert_eq!(tokens, expected_after(10));
    assert_eq!(tokens[..4], [35, 38, 16, 34]);
    let calls = fake.calls_settled().await;
    let third = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.starts_with("verify"))
        .nth(2)
        .map(|(i, _)| i)
        .unwrap();
    let steps: Vec<&str> = calls[..=third]
        .iter()
        .filter(|c| c.starts_with("verify") || c.starts_with("draft tree"))
        .map(String::as_str)
        .collect();
    // The prefill's first token (35) and two target-only steps while the draft opened (and
    // drafted its first tree), then the first tree below 35, 38, 16: no draft round trip of
    // its own.
    steps
        .iter()
        .filter(|c| c.starts_with("draft tree"))
        .for_each(|c| assert_eq!(*c, "draft tree 5 nodes"));
    let verifies: Vec<&str> = steps
        .iter()
        .copied()
        .filter(|c| c.starts_with("verify"))
        .collect();
    assert_eq!(
        verifies,
        ["verify 1 nodes", "verify 1 nodes", "verify 2 nodes"]
    );
    assert_eq!(steps.len(), 4, "one tree drafted: {steps:?}");
    // The subtree's path 16 -> 34, heard as the first tree's root -> 35 -> 38 -> 16 -> ...
    let paths = fake.draft_paths.lock().unwrap().clone();
    assert_eq!(paths.first(), Some(&vec![0, 1, 2, 3, 4]), "{paths:?}");
}
