//! Failover over real processes (issue #16): target and draft replicas killed (SIGKILL) or
//! stuck (SIGSTOP) mid-stream, a dead target among new requests, and a turn that fails
//! while the only target is down. A stream that can complete does, with exactly the
//! undisturbed (target-only) output, greedy and seeded; the client hears UNAVAILABLE only
//! when no target is left, within the deadlines; a failed turn leaves its session as it
//! was. Durations are only bounded from above, generously.

use std::time::{Duration, Instant};

use specllava_e2e::{
    Cluster, ClusterConfig, Service, draft_holds, fixture_image, gen_params as params,
    scrape_metrics, target_holds,
};
use specllava_proto::v1 as pb;
use tonic::{Code, Status};

/// Target checkpoint; also the draft (a self-draft: long accepted paths, few steps).
const TARGET: &str = "gqa_default_l-2_sharded";
/// Tokens of a mid-stream test's answer: the failure lands well before its end.
const LONG: u32 = 320;
const PROMPT: &str = "Tell me a long story.";

/// A cluster of `targets` and `drafts` replicas, with short deadlines; a failed replica
/// stays out of rotation for `backoff_ms`.
fn config(targets: usize, drafts: usize, backoff_ms: u64) -> ClusterConfig {
    // Steps wait for a (replacement) draft's set-up, so that a short turn on a loaded machine
    // still speculates on the draft that takes over.
    let mut cfg = ClusterConfig::new(TARGET, TARGET)
        .replicas(targets, drafts)
        .wait_for_draft();
    cfg.orchestrator_args
        .extend(["--target-timeout-ms", "4000", "--draft-timeout-ms", "2000"].map(String::from));
    cfg.env = vec![(
        "SPECLLAVA_REPLICA_BACKOFF_MS".into(),
        backoff_ms.to_string(),
    )];
    cfg
}

fn speculative() -> pb::SpeculationConfig {
    pb::SpeculationConfig {
        mode: pb::SpeculationMode::Dynamic as i32,
        depth: 4,
        branching: 2,
        budget: 8,
        disable_draft_ahead: false,
    }
}

fn target_only() -> pb::SpeculationConfig {
    pb::SpeculationConfig {
        mode: pb::SpeculationMode::Off as i32,
        ..Default::default()
    }
}

/// A turn of `session`.
fn turn(
    session: &str,
    prompt: &str,
    params: &pb::GenerationParams,
    spec: pb::SpeculationConfig,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: session.into(),
        image: Default::default(),
        prompt: prompt.into(),
        params: Some(params.clone()),
        speculation: Some(spec),
    }
}

async fn open_session(cluster: &Cluster) -> String {
    let req = pb::CreateSessionRequest {
        image: fixture_image("photo.jpg"),
    };
    cluster
        .client()
        .await
        .create_session(req)
        .await
        .unwrap()
        .into_inner()
        .session_id
}

async fn close_session(cluster: &Cluster, session: String) {
    let req = pb::CloseSessionRequest {
        session_id: session,
    };
    cluster.client().await.close_session(req).await.unwrap();
}

/// Starts a generation.
async fn start(
    cluster: &Cluster,
    req: pb::GenerateRequest,
) -> tonic::Streaming<pb::GenerateResponse> {
    cluster
        .client()
        .await
        .generate(req)
        .await
        .expect("the request is accepted")
        .into_inner()
}

/// Reads the stream into `tokens` up to its first chunk (or its end).
async fn first_chunk(stream: &mut tonic::Streaming<pb::GenerateResponse>, tokens: &mut Vec<u32>) {
    while let Some(msg) = stream.message().await.expect("a first chunk") {
        if let Some(pb::generate_response::Event::Chunk(c)) = msg.event {
            tokens.extend(c.token_ids);
            return;
        }
    }
}

/// Reads the stream to its end (within `limit`): all its tokens, or its error.
async fn finish(
    mut stream: tonic::Streaming<pb::GenerateResponse>,
    mut tokens: Vec<u32>,
    limit: Duration,
) -> Result<Vec<u32>, Status> {
    let read = async {
        let mut summary = false;
        while let Some(msg) = stream.message().await? {
            match msg.event {
                Some(pb::generate_response::Event::Chunk(c)) => tokens.extend(c.token_ids),
                Some(pb::generate_response::Event::Summary(_)) => summary = true,
                None => {}
            }
        }
        assert!(summary, "a completed stream ends with its summary");
        Ok(tokens)
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or_else(|_| panic!("the stream did not end within {limit:?}"))
}

/// A whole turn's tokens (or its error).
async fn generate(cluster: &Cluster, req: pb::GenerateRequest) -> Result<Vec<u32>, Status> {
    let stream = start(cluster, req).await;
    finish(stream, Vec::new(), Duration::from_secs(120)).await
}

/// The undisturbed answers to `prompts`, turn after turn of one session, target-only.
async fn undisturbed(
    cluster: &Cluster,
    prompts: &[&str],
    params: &pb::GenerationParams,
) -> Vec<Vec<u32>> {
    let session = open_session(cluster).await;
    let mut answers = Vec::new();
    for p in prompts {
        let req = turn(&session, p, params, target_only());
        answers.push(generate(cluster, req).await.expect("undisturbed turn"));
    }
    close_session(cluster, session).await;
    answers
}

/// The live replica (index among `replicas`, skipping `down`) holding `session`, waiting
/// up to 20 s for one (a draft session syncs in the background).
async fn wait_holder(replicas: &[&Service], down: &[usize], session: &str, target: bool) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(i) = holder(replicas, down, session, target).await {
            return i;
        }
        assert!(Instant::now() < deadline, "no replica holds {session}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The live replica (index among `replicas`, skipping `down`) holding `session`.
async fn holder(
    replicas: &[&Service],
    down: &[usize],
    session: &str,
    target: bool,
) -> Option<usize> {
    for (i, svc) in replicas.iter().enumerate() {
        if down.contains(&i) {
            continue;
        }
        let holds = if target {
            target_holds(svc, session).await
        } else {
            draft_holds(svc, session).await
        };
        if holds {
            return Some(i);
        }
    }
    None
}

fn target_mut(cluster: &mut Cluster, i: usize) -> &mut Service {
    match i {
        0 => &mut cluster.target,
        i => &mut cluster.more_targets[i - 1],
    }
}

fn draft_mut(cluster: &mut Cluster, i: usize) -> &mut Service {
    match i {
        0 => cluster.draft.as_mut().expect("a draft"),
        i => &mut cluster.more_drafts[i - 1],
    }
}

/// Kill or pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
}

impl Fault {
    fn apply(self, svc: &mut Service) {
        match self {
            Fault::Kill => svc.process.kill(),
            Fault::Pause => svc.process.pause(),
        }
    }
}

/// The replica serving a speculative stream fails (`fault`) after its first chunk, once
/// greedy and once seeded: each stream completes with the undisturbed output, and another
/// replica holds the session afterwards (the failure landed mid-stream).
async fn fail_mid_stream(target: bool, fault: Fault) {
    // Three replicas of the failing kind: one for each run, one left at the end.
    let (targets, drafts) = if target { (3, 2) } else { (2, 3) };
    let mut cluster = Cluster::start(config(targets, drafts, 60_000)).await;
    let mut down = Vec::new();
    for seed in [None, Some(11u64)] {
        let p = params(LONG, seed);
        let base = undisturbed(&cluster, &[PROMPT], &p).await.remove(0);
        let session = open_session(&cluster).await;
        let t0 = Instant::now();
        let mut stream = start(&cluster, turn(&session, PROMPT, &p, speculative())).await;
        let mut tokens = Vec::new();
        first_chunk(&mut stream, &mut tokens).await;
        let replicas = if target {
            cluster.targets()
        } else {
            cluster.drafts()
        };
        let serving = wait_holder(&replicas, &down, &session, target).await;
        let svc = if target {
            target_mut(&mut cluster, serving)
        } else {
            draft_mut(&mut cluster, serving)
        };
        fault.apply(svc);
        down.push(serving);
        let tokens = finish(stream, tokens, Duration::from_secs(60))
            .await
            .unwrap_or_else(|s| panic!("{fault:?} of a replica reached the client: {s:?}"));
        assert_eq!(
            tokens, base,
            "{fault:?} of the serving replica (seed {seed:?}) changed the output"
        );
        // Well within the deadlines plus a re-prefill; generous for a loaded machine.
        assert!(t0.elapsed() < Duration::from_secs(45), "{:?}", t0.elapsed());
        let replicas = if target {
            cluster.targets()
        } else {
            cluster.drafts()
        };
        let now = holder(&replicas, &down, &session, target).await;
        assert!(
            now.is_some_and(|i| i != serving),
            "the session moved to another replica mid-stream (seed {seed:?})"
        );
        close_session(&cluster, session).await;
    }
}

/// Field report 1: kill -9 of the target serving a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_killed_mid_stream_fails_over_losslessly() {
    fail_mid_stream(true, Fault::Kill).await;
}

/// Field report 3: the target serving a stream stops (SIGSTOP) and never wakes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_stuck_mid_stream_fails_over_within_its_deadline() {
    fail_mid_stream(true, Fault::Pause).await;
}

/// Draft replicas: lost mid-stream, another one takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_killed_mid_stream_is_replaced_losslessly() {
    fail_mid_stream(false, Fault::Kill).await;
}

/// Field report 3: a stuck draft costs one draft deadline, not the time it is stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_stuck_mid_stream_is_replaced_within_its_deadline() {
    fail_mid_stream(false, Fault::Pause).await;
}

/// Field report 2: one of two targets is dead; every new request is served by the other,
/// and the dead one is out of rotation after its first failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_requests_avoid_a_dead_target() {
    let mut cfg = config(2, 1, 60_000);
    cfg.metrics = true;
    let mut cluster = Cluster::start(cfg).await;
    // Fresh sessions go to the replica with the fewest sessions, then the lowest address:
    // with none pinned yet, the dead replica is the first choice.
    let lowest = (0..2)
        .min_by_key(|&i| {
            cluster.targets()[i]
                .addr
                .parse::<std::net::SocketAddr>()
                .unwrap()
        })
        .unwrap();
    target_mut(&mut cluster, lowest).process.kill();
    let p = params(24, None);
    let mut answers = Vec::new();
    for i in 0..6 {
        let session = open_session(&cluster).await;
        let mode = if i % 2 == 0 {
            speculative()
        } else {
            target_only()
        };
        let tokens = generate(&cluster, turn(&session, PROMPT, &p, mode))
            .await
            .unwrap_or_else(|s| panic!("request {i} failed with a healthy target left: {s:?}"));
        answers.push(tokens);
        close_session(&cluster, session).await;
    }
    assert!(
        answers.iter().all(|a| *a == answers[1]),
        "every request answers as target-only decoding does: {answers:?}"
    );
    let metrics = scrape_metrics(&cluster.orchestrator).await;
    let downs: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("specllava_errors_total{type=\"replica_down\""))
        .collect();
    let total: f64 = downs
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        total, 1.0,
        "tried once, then out of rotation for its backoff: {downs:?}"
    );
}

/// A turn fails because the only target is down (`fault`); once the target is back (the
/// client retrying until it is served), the failed turn retried and the next one answer
/// exactly as an undisturbed session does, greedy and seeded.
async fn fail_a_turn(fault: Fault) {
    let mut cluster = Cluster::start(config(1, 1, 200)).await;
    let prompts = ["What is in the picture?", "Tell me more.", "And then?"];
    for seed in [None, Some(5u64)] {
        let p = params(40, seed);
        let base = undisturbed(&cluster, &prompts, &p).await;
        let session = open_session(&cluster).await;
        let first = generate(&cluster, turn(&session, prompts[0], &p, speculative()))
            .await
            .unwrap();
        assert_eq!(first, base[0]);

        fault.apply(&mut cluster.target);
        let t0 = Instant::now();
        let failed = generate(&cluster, turn(&session, prompts[1], &p, speculative())).await;
        let waited = t0.elapsed();
        match fault {
            Fault::Kill => cluster.target.restart().await,
            Fault::Pause => cluster.target.process.resume(),
        }
        let status = failed.expect_err("no target is left");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        // The target deadline is 4 s: the client hears of a stuck target then, not when it
        // wakes up.
        assert!(
            waited < Duration::from_secs(30),
            "answered after {waited:?}"
        );

        // Back in rotation after its backoff (the first requests may still be refused).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = pb::GenerateRequest {
                image: fixture_image("red_square.png"),
                ..turn("", "Hi", &params(1, None), target_only())
            };
            match generate(&cluster, probe).await {
                Ok(_) => break,
                Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => panic!("the target did not come back: {s:?}"),
            }
        }

        for (i, prompt) in prompts.iter().enumerate().skip(1) {
            let tokens = generate(&cluster, turn(&session, prompt, &p, speculative()))
                .await
                .unwrap_or_else(|s| panic!("turn {i} after the target came back: {s:?}"));
            assert_eq!(
                tokens, base[i],
                "turn {i} (seed {seed:?}) differs from the undisturbed session"
            );
        }
        close_session(&cluster, session).await;
    }
}

/// Field report 4: a turn sent while the only target was dead (killed, then restarted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_failed_while_the_target_was_dead_leaves_the_session_as_it_was() {
    fail_a_turn(Fault::Kill).await;
}

/// Field report 3's client side, and 4: a turn on a stuck target (SIGSTOP) fails with
/// UNAVAILABLE at its deadline, not when the target wakes up; the session is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_failed_on_a_stuck_target_is_answered_at_its_deadline() {
    fail_a_turn(Fault::Pause).await;
}
