//! The chaos soak (issue #29): mixed load on both APIs (gRPC one-shot and two-turn sessions,
//! OpenAI-compatible HTTP, greedy and seeded, cancellations, bad inputs) against two targets
//! and two drafts while faults hit one random replica at a time: kill -9 then restart, SIGSTOP
//! then SIGCONT, SIGTERM (a drain) then restart. A refused request is retried when its refusal
//! is retryable (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED; HTTP 429 / 503).
//!
//! Checked: every completed output equals its undisturbed target-only reference, no
//! non-retryable failure, every retried request finally succeeds, bad inputs get their own
//! refusal, and no session is left on any replica at the end. Reported: requests by outcome,
//! p50 / p99 latency, each process's RSS over time, the faults injected.
//!
//! The test command runs it short (`SPECLLAVA_CHAOS_SECONDS`, 20 s, a fault every 4 s);
//! `scripts/chaos` runs it for 10 minutes with a fault every ~10 s and writes the report to
//! `SPECLLAVA_CHAOS_OUT`.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use specllava_e2e::{
    Cluster, ClusterConfig, Service, fixture_image, free_port, gen_params,
    generate_tokens as generate, http_send, scrape_metrics, speculation,
};
use specllava_proto::v1 as pb;
use specllava_proto::v1::generation_client::GenerationClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

const TARGET: &str = "gqa_default_l-2_sharded";
const DRAFT: &str = "mha_default_l-2_untied";
const PROMPTS: [&str; 2] = ["Describe it.", "Tell me a story."];
/// Tokens per answer.
const TOKENS: u32 = 24;
/// Concurrent clients.
const CLIENTS: usize = 4;
/// Attempts of a request refused retryably.
const ATTEMPTS: usize = 40;

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// SplitMix64: reproducible choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// Sampling of a request: greedy or seeded.
fn params(seeded: bool) -> pb::GenerationParams {
    gen_params(TOKENS, seeded.then_some(7))
}

fn speculative() -> pb::SpeculationConfig {
    speculation(pb::SpeculationMode::Adaptive)
}

fn target_only() -> pb::SpeculationConfig {
    speculation(pb::SpeculationMode::Off)
}

fn turn(
    session: &str,
    prompt: &str,
    seeded: bool,
    spec: pb::SpeculationConfig,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: session.into(),
        image: if session.is_empty() {
            fixture_image("red_square.png")
        } else {
            Default::default()
        },
        prompt: prompt.into(),
        params: Some(params(seeded)),
        speculation: Some(spec),
    }
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded
    )
}

/// A request's failure: retryable, or not (with what was heard).
#[derive(Debug)]
struct Failure {
    retryable: bool,
    what: String,
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure {
            retryable: retryable(s.code()),
            what: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

/// An OpenAI chat completion (not streamed): its text.
fn http_chat(addr: &str, prompt: &str, seeded: bool) -> Result<String, Failure> {
    let mut body = json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": TOKENS, "ignore_eos": true,
        "temperature": if seeded { 0.8 } else { 0.0 },
    });
    if seeded {
        body["seed"] = json!(7);
        body["top_p"] = json!(0.95);
    }
    let mut conn = http_send(
        addr,
        "POST",
        "/v1/chat/completions",
        None,
        &serde_json::to_vec(&body).unwrap(),
    );
    let mut answer = String::new();
    conn.read_to_string(&mut answer).map_err(|e| Failure {
        retryable: true,
        what: format!("reading the answer: {e}"),
    })?;
    let (head, json) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status != 200 {
        return Err(Failure {
            retryable: matches!(status, 429 | 503 | 0),
            what: format!("HTTP {status}: {json}"),
        });
    }
    let v: Value = serde_json::from_str(json).map_err(|e| Failure {
        retryable: false,
        what: format!("bad JSON {e}: {json}"),
    })?;
    Ok(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// One request's answer: gRPC tokens (a session's turns concatenated) or HTTP text.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    Tokens(Vec<u32>),
    Text(String),
}

/// The kinds of checked request.
#[derive(Debug, Clone, Copy)]
enum Kind {
    OneShot,
    Session,
    Http,
}

/// One attempt of a checked request.
async fn attempt(
    kind: Kind,
    client: &mut GenerationClient<Channel>,
    http: &str,
    prompt: &str,
    seeded: bool,
    spec: pb::SpeculationConfig,
) -> Result<Answer, Failure> {
    match kind {
        Kind::OneShot => Ok(Answer::Tokens(
            generate(client, turn("", prompt, seeded, spec)).await?,
        )),
        Kind::Session => {
            let id = client
                .create_session(pb::CreateSessionRequest {
                    image: fixture_image("red_square.png"),
                })
                .await?
                .into_inner()
                .session_id;
            let mut tokens = Vec::new();
            let mut failed = None;
            for p in [prompt, "And what else?"] {
                match generate(client, turn(&id, p, seeded, spec)).await {
                    Ok(t) => tokens.extend(t),
                    Err(s) => {
                        failed = Some(s);
                        break;
                    }
                }
            }
            // Closed whatever happened (a leak would show at the end).
            let _ = client
                .close_session(pb::CloseSessionRequest { session_id: id })
                .await;
            match failed {
                Some(s) => Err(s.into()),
                None => Ok(Answer::Tokens(tokens)),
            }
        }
        Kind::Http => {
            let (http, prompt) = (http.to_owned(), prompt.to_owned());
            tokio::task::spawn_blocking(move || http_chat(&http, &prompt, seeded))
                .await
                .unwrap()
                .map(Answer::Text)
        }
    }
}

/// What the load saw.
#[derive(Debug, Default, Serialize)]
struct Tally {
    /// Requests by outcome.
    outcomes: BTreeMap<String, usize>,
    /// Completed outputs that differ from their reference.
    wrong: Vec<String>,
    /// Failures that are not retryable, or retries that never succeeded.
    failed: Vec<String>,
    /// Bad inputs answered with another status than theirs.
    unexpected: Vec<String>,
    /// Latency of completed checked requests (retries included), ms.
    latencies_ms: Vec<f64>,
}

impl Tally {
    fn count(&mut self, outcome: &str) {
        *self.outcomes.entry(outcome.to_owned()).or_default() += 1;
    }
}

/// The undisturbed answers, target-only, by (kind, prompt, seeded).
type References = BTreeMap<(u8, usize, bool), Answer>;

fn kind_index(kind: Kind) -> u8 {
    match kind {
        Kind::OneShot => 0,
        Kind::Session => 1,
        Kind::Http => 2,
    }
}

/// One client's loop until `stop`.
async fn client_loop(
    index: usize,
    mut client: GenerationClient<Channel>,
    http: String,
    references: Arc<References>,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let mut rng = Rng(0xc4a0_5eed ^ index as u64);
    while !stop.load(Ordering::Relaxed) {
        let pick = rng.below(12);
        if pick == 0 {
            // Cancelled after its first message.
            let req = turn("", PROMPTS[0], false, speculative());
            if let Ok(r) = client.generate(req).await {
                let _ = r.into_inner().message().await;
            }
            tally.lock().unwrap().count("cancelled");
            continue;
        }
        if pick == 1 {
            // A bad input: INVALID_ARGUMENT, chaos or not.
            let mut req = turn("", PROMPTS[0], false, speculative());
            req.params = Some(pb::GenerationParams {
                top_p: 1.5,
                ..params(false)
            });
            let code = generate(&mut client, req)
                .await
                .err()
                .map_or(Code::Ok, |s| s.code());
            let mut t = tally.lock().unwrap();
            t.count("bad input refused");
            if code != Code::InvalidArgument {
                t.unexpected.push(format!("bad input answered {code:?}"));
            }
            continue;
        }
        let kind = [Kind::OneShot, Kind::Session, Kind::Http][rng.below(3)];
        let (p, seeded) = (rng.below(PROMPTS.len()), rng.below(2) == 1);
        let started = Instant::now();
        let mut retries = 0;
        let result = loop {
            match attempt(kind, &mut client, &http, PROMPTS[p], seeded, speculative()).await {
                Err(f) if f.retryable && retries + 1 < ATTEMPTS => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => break other,
            }
        };
        let mut t = tally.lock().unwrap();
        let label = format!("{kind:?}");
        match result {
            Ok(answer) => {
                t.latencies_ms.push(started.elapsed().as_secs_f64() * 1e3);
                t.count(&if retries > 0 {
                    format!("{label} ok after a retry")
                } else {
                    format!("{label} ok")
                });
                if references.get(&(kind_index(kind), p, seeded)) != Some(&answer) {
                    t.wrong
                        .push(format!("{label} prompt {p} seeded {seeded}: {answer:?}"));
                }
            }
            Err(f) => {
                t.count(&format!("{label} failed"));
                t.failed.push(format!(
                    "{label} after {retries} retries (retryable {}): {}",
                    f.retryable, f.what
                ));
            }
        }
    }
}

/// One resident-set sample of every process, kB by name.
fn rss_sample(cluster: &Cluster) -> BTreeMap<String, u64> {
    let mut named: Vec<(String, &Service)> = vec![("orchestrator".into(), &cluster.orchestrator)];
    for (i, t) in cluster.targets().into_iter().enumerate() {
        named.push((format!("target-{i}"), t));
    }
    for (i, d) in cluster.drafts().into_iter().enumerate() {
        named.push((format!("draft-{i}"), d));
    }
    named
        .into_iter()
        .filter_map(|(name, svc)| {
            let status = std::fs::read_to_string(format!("/proc/{}/status", svc.process.pid()));
            let kb = status.ok()?.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })?;
            Some((name, kb))
        })
        .collect()
}

/// The sessions a replica holds now (`specllava_active_sessions`).
async fn active_sessions(svc: &Service) -> Option<u64> {
    let text = scrape_metrics(svc).await;
    text.lines()
        .find(|l| l.starts_with("specllava_active_sessions "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|v| v as u64)
}

#[derive(Debug, Serialize)]
struct Report {
    seconds: f64,
    fault_every_s: f64,
    faults: Vec<String>,
    outcomes: BTreeMap<String, usize>,
    wrong: Vec<String>,
    failed: Vec<String>,
    unexpected: Vec<String>,
    latency_ms_p50_p99_max: [f64; 3],
    leaked_sessions: BTreeMap<String, u64>,
    rss_kb: Vec<(f64, BTreeMap<String, u64>)>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_loses_nothing_and_changes_no_output() {
    let duration = env_secs("SPECLLAVA_CHAOS_SECONDS", 20);
    let fault_every = env_secs("SPECLLAVA_CHAOS_FAULT_EVERY", 4);
    let http = format!("127.0.0.1:{}", free_port());
    let mut cfg = ClusterConfig::new(DRAFT, TARGET).replicas(2, 2);
    cfg.metrics = true;
    // No kept HTTP conversations: every session a request opens is closed after it, so a
    // session left on a replica at the end is a leak.
    cfg.orchestrator_args = [
        "--http-listen",
        &http,
        "--http-cached-conversations",
        "0",
        "--target-timeout-ms",
        "4000",
        "--draft-timeout-ms",
        "1000",
    ]
    .map(String::from)
    .to_vec();
    let mut cluster = Cluster::start(cfg).await;
    let client = cluster.client().await;

    // Undisturbed references, target-only.
    let mut references = References::new();
    for kind in [Kind::OneShot, Kind::Session, Kind::Http] {
        for (p, prompt) in PROMPTS.iter().enumerate() {
            for seeded in [false, true] {
                let answer = attempt(
                    kind,
                    &mut client.clone(),
                    &http,
                    prompt,
                    seeded,
                    target_only(),
                )
                .await
                .unwrap_or_else(|f| panic!("reference {kind:?}: {}", f.what));
                references.insert((kind_index(kind), p, seeded), answer);
            }
        }
    }
    let references = Arc::new(references);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let load: Vec<_> = (0..CLIENTS)
        .map(|i| {
            tokio::spawn(client_loop(
                i,
                client.clone(),
                http.clone(),
                Arc::clone(&references),
                Arc::clone(&stop),
                Arc::clone(&tally),
            ))
        })
        .collect();

    // Faults, one replica at a time.
    let started = Instant::now();
    let mut rng = Rng(0xfa17);
    let mut faults = Vec::new();
    let mut rss = vec![(0.0, rss_sample(&cluster))];
    while started.elapsed() < duration {
        let wait = fault_every.mul_f64(0.5 + rng.below(100) as f64 / 100.0);
        let until = Instant::now() + wait;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            rss.push((started.elapsed().as_secs_f64(), rss_sample(&cluster)));
        }
        if started.elapsed() >= duration {
            break;
        }
        let which = rng.below(4);
        let hold = Duration::from_millis(1000 + 100 * rng.below(11) as u64);
        let (name, svc) = match which {
            0 => ("target-0", &mut cluster.target),
            1 => ("target-1", &mut cluster.more_targets[0]),
            2 => ("draft-0", cluster.draft.as_mut().unwrap()),
            _ => ("draft-1", &mut cluster.more_drafts[0]),
        };
        let fault = match rng.below(3) {
            0 => {
                svc.process.kill();
                tokio::time::sleep(hold).await;
                svc.start_again().await;
                "kill -9, restart"
            }
            1 => {
                svc.process.pause();
                tokio::time::sleep(hold).await;
                svc.process.resume();
                "SIGSTOP, SIGCONT"
            }
            _ => {
                svc.process.begin_terminate();
                let exited =
                    tokio::task::block_in_place(|| svc.process.wait_exit(Duration::from_secs(30)));
                assert!(
                    exited.is_some_and(|st| st.success()),
                    "{name} did not drain: {exited:?}"
                );
                svc.start_again().await;
                "SIGTERM (drain), restart"
            }
        };
        faults.push(format!(
            "{:.1} s: {name} {fault} (held {} ms)",
            started.elapsed().as_secs_f64(),
            hold.as_millis()
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }

    // No session left on any replica (closes run in the background: wait a little).
    let mut leaked = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        leaked.clear();
        let replicas = cluster
            .targets()
            .into_iter()
            .map(|s| ("target", s))
            .chain(cluster.drafts().into_iter().map(|s| ("draft", s)))
            .enumerate();
        for (i, (kind, svc)) in replicas {
            let n = active_sessions(svc).await.unwrap_or(u64::MAX);
            if n > 0 {
                leaked.insert(format!("{kind} {i} ({})", svc.addr), n);
            }
        }
        if leaked.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    t.latencies_ms.sort_by(f64::total_cmp);
    let lat = [
        percentile(&t.latencies_ms, 50.0),
        percentile(&t.latencies_ms, 99.0),
        t.latencies_ms.last().copied().unwrap_or(f64::NAN),
    ];
    let report = Report {
        seconds: started.elapsed().as_secs_f64(),
        fault_every_s: fault_every.as_secs_f64(),
        faults,
        outcomes: t.outcomes,
        wrong: t.wrong,
        failed: t.failed,
        unexpected: t.unexpected,
        latency_ms_p50_p99_max: lat,
        leaked_sessions: leaked,
        rss_kb: rss,
    };
    println!(
        "chaos soak: {:.0} s, {} faults",
        report.seconds,
        report.faults.len()
    );
    for f in &report.faults {
        println!("  fault {f}");
    }
    for (outcome, n) in &report.outcomes {
        println!("  {outcome:<28} {n}");
    }
    println!(
        "  latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; wrong {}, failed {}, unexpected {}, leaked {:?}",
        lat[0],
        lat[1],
        lat[2],
        report.wrong.len(),
        report.failed.len(),
        report.unexpected.len(),
        report.leaked_sessions
    );
    if let Some((_, last)) = report.rss_kb.last() {
        println!("  RSS at the end (kB): {last:?}");
    }
    if let Ok(out) = std::env::var("SPECLLAVA_CHAOS_OUT") {
        let path = std::path::Path::new(&out);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
        println!("  report: {out}");
    }
    assert!(
        report.wrong.is_empty(),
        "outputs differ: {:?}",
        report.wrong
    );
    assert!(
        report.failed.is_empty(),
        "requests failed: {:?}",
        report.failed
    );
    assert!(report.unexpected.is_empty(), "{:?}", report.unexpected);
    assert!(
        report.leaked_sessions.is_empty(),
        "sessions left: {:?}",
        report.leaked_sessions
    );
    let completed: usize = report
        .outcomes
        .iter()
        .filter(|(k, _)| k.contains(" ok"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        completed >= 10,
        "too little load to show anything: {completed}"
    );
}
