//! The soak / load test: N concurrent streams of mixed requests against the orchestrator for a
//! bounded time. Each stream picks, request after request, one of: a one-shot `Generate` in a
//! random mode (target-only, chain, static, dynamic, adaptive) with greedy or seeded
//! sampling; a multi-turn session (create, two turns, close); a generation cancelled after
//! its first chunk; or a bad input (undecodable image, out-of-range sampling, unknown
//! session) that must be refused with its status. Every speculative output is compared with
//! the target-only output of the same request (run once per request key and cached).
//! Reported: answers by status, latency percentiles, each service's RSS over time, and the
//! lossless mismatches (which must be 0).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use specllava_proto::v1 as pb;
use specllava_proto::v1::generation_client::GenerationClient;
use tokio::sync::OnceCell;
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::driver::{self, ApiChannel, ApiClient, DriverError};
use crate::evalset::EvalItem;
use crate::modes::{Mode, Sampling, Shape};
use crate::stats::percentile;

/// What a soak run does.
#[derive(Debug, Clone)]
pub struct SoakPlan {
    /// Concurrent streams.
    pub streams: usize,
    /// How long new requests are started.
    pub duration: Duration,
    /// Tokens generated per request.
    pub max_new_tokens: u32,
    /// Temperature of the seeded-sampling requests.
    pub temperature: f32,
}

/// A process whose resident memory is sampled.
#[derive(Debug, Clone)]
pub struct Watched {
    /// Service name.
    pub name: String,
    /// Process id.
    pub pid: u32,
}

/// One RSS sample of every watched process.
#[derive(Debug, Clone, Serialize)]
pub struct RssSample {
    /// Seconds since the start.
    pub t_s: f64,
    /// Resident set (kB) per service name; absent when unreadable.
    pub rss_kb: BTreeMap<String, u64>,
}

/// A mismatch between a speculative output and the target-only output of its request.
#[derive(Debug, Clone, Serialize)]
pub struct SoakMismatch {
    /// The request key (item, sampling, turn).
    pub key: String,
    /// The mode that differed.
    pub mode: String,
    /// Target-only tokens.
    pub expected: Vec<u32>,
    /// Speculative tokens.
    pub got: Vec<u32>,
}

/// The outcome of a soak run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SoakReport {
    /// Concurrent streams.
    pub streams: usize,
    /// Seconds requests were started for.
    pub duration_s: f64,
    /// Seconds until the last stream ended.
    pub wall_s: f64,
    /// Calls made (a multi-turn session counts its every call).
    pub calls: usize,
    /// Answers by request kind, then by gRPC status (`Ok`, `InvalidArgument`, ...).
    pub statuses: BTreeMap<String, BTreeMap<String, usize>>,
    /// Answers a request of that kind must not get (a bad input accepted, a good one refused
    /// as invalid, any `Internal` / `Unknown`).
    pub unexpected: usize,
    /// Client-side latency of completed `Generate` calls (one-shot, session turns and
    /// target-only references), ms: p50, p99, max.
    pub latency_ms: [f64; 3],
    /// Generations compared with target-only output.
    pub compared: usize,
    /// Lossless mismatches (must be 0).
    pub mismatches: Vec<SoakMismatch>,
    /// RSS over time.
    pub rss: Vec<RssSample>,
}

/// The resident set of `pid` in kB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// SplitMix64: each stream's request choices, reproducible from its index.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The modes a soak draws from (target-only included: it is a mode users pick too).
pub fn soak_modes() -> Vec<Mode> {
    [
        "target-only",
        "chain:4",
        "static:3,2,6",
        "dynamic:4,2,8",
        "dynamic:4,2,8/no-ahead",
        "adaptive",
    ]
    .iter()
    .map(|m| m.parse().expect("a valid mode"))
    .collect()
}

/// The target-only output of a request (its turns' tokens), computed once; `None` when the
/// reference request failed.
type Reference = Arc<OnceCell<Option<Vec<Vec<u32>>>>>;

/// Shared state of the streams.
struct Shared {
    plan: SoakPlan,
    items: Vec<EvalItem>,
    modes: Vec<Mode>,
    /// Target-only outputs per request key, each computed once.
    reference: Mutex<HashMap<String, Reference>>,
    report: Mutex<SoakReport>,
    latencies_ms: Mutex<Vec<f64>>,
}

impl Shared {
    fn record(&self, kind: &str, code: Code, expected: bool) {
        let mut r = self.report.lock().unwrap();
        r.calls += 1;
        *r.statuses
            .entry(kind.to_owned())
            .or_default()
            .entry(format!("{code:?}"))
            .or_default() += 1;
        if !expected {
            r.unexpected += 1;
        }
    }

    /// Records a good request's answer: `Ok`, or a refusal any request can get under load.
    fn record_good<T>(&self, kind: &str, res: &Result<T, Status>) {
        let code = res.as_ref().map_or_else(Status::code, |_| Code::Ok);
        let ok = matches!(
            code,
            Code::Ok | Code::ResourceExhausted | Code::Unavailable | Code::DeadlineExceeded
        );
        self.record(kind, code, ok);
    }

    fn compare(&self, key: String, mode: Mode, expected: &[Vec<u32>], got: &[Vec<u32>]) {
        let mut r = self.report.lock().unwrap();
        r.compared += 1;
        if expected != got {
            r.mismatches.push(SoakMismatch {
                key,
                mode: mode.to_string(),
                expected: expected.concat(),
                got: got.concat(),
            });
        }
    }
}

fn status(e: DriverError) -> Status {
    match e {
        DriverError::Status(s) => s,
        DriverError::NoSummary(n) => Status::internal(format!("no summary after {n} tokens")),
    }
}

/// The turns of a conversation on `item`: one-shot (one turn) or a session (two turns).
async fn conversation(
    client: &mut ApiClient,
    shared: &Shared,
    item: &EvalItem,
    mode: Mode,
    sampling: Sampling,
    multi_turn: bool,
) -> Result<Vec<Vec<u32>>, Status> {
    let params = sampling.params(shared.plan.max_new_tokens, item.seed);
    let request = |session_id: String, image: Vec<u8>, prompt: &str| pb::GenerateRequest {
        session_id,
        image: image.into(),
        prompt: prompt.to_owned(),
        params: Some(params.clone()),
        speculation: Some(mode.speculation()),
    };
    let timed = |start: Instant| {
        shared
            .latencies_ms
            .lock()
            .unwrap()
            .push(start.elapsed().as_secs_f64() * 1e3);
    };
    if !multi_turn {
        let start = Instant::now();
        let res = driver::send(
            client,
            request(String::new(), item.image.clone(), &item.prompt),
        )
        .await
        .map_err(status);
        shared.record_good("generate", &res);
        timed(start);
        return Ok(vec![res?.tokens]);
    }
    let created = client
        .create_session(pb::CreateSessionRequest {
            image: item.image.clone().into(),
        })
        .await;
    shared.record_good("session", &created);
    let id = created?.into_inner().session_id;
    let mut turns = Vec::new();
    for prompt in [item.prompt.as_str(), "And what else?"] {
        let start = Instant::now();
        let res = driver::send(client, request(id.clone(), Vec::new(), prompt))
            .await
            .map_err(status);
        shared.record_good("session", &res);
        timed(start);
        match res {
            Ok(r) => turns.push(r.tokens),
            Err(e) => {
                let _ = client
                    .close_session(pb::CloseSessionRequest { session_id: id })
                    .await;
                return Err(e);
            }
        }
    }
    let closed = client
        .close_session(pb::CloseSessionRequest { session_id: id })
        .await;
    shared.record_good("session", &closed);
    Ok(turns)
}

/// One generation or session, checked against its target-only twin.
async fn checked(client: &mut ApiClient, shared: &Shared, rng: &mut Rng) {
    let item = &shared.items[rng.below(shared.items.len())];
    let mode = shared.modes[rng.below(shared.modes.len())];
    let sampling = if rng.below(2) == 0 {
        Sampling::Greedy
    } else {
        Sampling::Seeded {
            temperature: shared.plan.temperature,
        }
    };
    let multi_turn = rng.below(3) == 0;
    let Ok(got) = conversation(client, shared, item, mode, sampling, multi_turn).await else {
        return;
    };
    if mode.is_baseline() {
        return;
    }
    let key = format!(
        "{}|{}|{}",
        item.id,
        serde_json::to_string(&sampling).unwrap_or_default(),
        if multi_turn { "session" } else { "one-shot" }
    );
    let cell = Arc::clone(
        shared
            .reference
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default(),
    );
    let expected = cell
        .get_or_init(|| async {
            let mut c = client.clone();
            conversation(
                &mut c,
                shared,
                item,
                Mode::TARGET_ONLY,
                sampling,
                multi_turn,
            )
            .await
            .ok()
        })
        .await;
    match expected {
        Some(e) => shared.compare(key, mode, e, &got),
        // The reference failed (overload): forget it so a later request retries.
        None => {
            shared.reference.lock().unwrap().remove(&key);
        }
    }
}

/// A generation dropped after its first chunk: the server must free its slot and sessions.
async fn cancelled(client: &mut ApiClient, shared: &Shared, rng: &mut Rng) {
    let item = &shared.items[rng.below(shared.items.len())];
    let mode = shared.modes[rng.below(shared.modes.len())];
    let request = pb::GenerateRequest {
        session_id: String::new(),
        image: item.image.clone().into(),
        prompt: item.prompt.clone(),
        params: Some(Sampling::Greedy.params(shared.plan.max_new_tokens * 4, item.seed)),
        speculation: Some(mode.speculation()),
    };
    let res = match client.generate(request).await {
        Ok(r) => {
            let mut stream = r.into_inner();
            stream.next().await.transpose().map(|_| ())
        }
        Err(e) => Err(e),
    };
    shared.record_good("cancel", &res);
}

/// A request that must be refused, with the status it must get.
async fn bad(client: &mut ApiClient, shared: &Shared, rng: &mut Rng) {
    let item = &shared.items[rng.below(shared.items.len())];
    let good = Sampling::Greedy.params(shared.plan.max_new_tokens, 0);
    let mut request = pb::GenerateRequest {
        session_id: String::new(),
        image: item.image.clone().into(),
        prompt: item.prompt.clone(),
        params: Some(good.clone()),
        speculation: Some(Mode::new(Shape::Adaptive).speculation()),
    };
    let (kind, want) = match rng.below(4) {
        0 => {
            request.image = b"\x89PNG\r\n\x1a\nnot really a png".to_vec().into();
            ("bad-image", Code::InvalidArgument)
        }
        1 => {
            request.params = Some(pb::GenerationParams { top_p: 1.5, ..good });
            ("bad-sampling", Code::InvalidArgument)
        }
        2 => {
            request.params = Some(pb::GenerationParams {
                temperature: -1.0,
                ..good
            });
            ("bad-sampling", Code::InvalidArgument)
        }
        _ => {
            request.session_id = format!("no-such-session-{}", rng.next());
            request.image.clear();
            ("unknown-session", Code::NotFound)
        }
    };
    let res = match client.generate(request).await {
        Ok(r) => {
            let mut stream = r.into_inner();
            let mut out = Ok(());
            while let Some(m) = stream.next().await {
                if let Err(e) = m {
                    out = Err(e);
                }
            }
            out
        }
        Err(e) => Err(e),
    };
    let code = res.err().map_or(Code::Ok, |e| e.code());
    shared.record(kind, code, code == want || code == Code::ResourceExhausted);
}

async fn stream(index: usize, mut client: ApiClient, shared: Arc<Shared>) {
    let mut rng = Rng(0x5eed ^ index as u64);
    let deadline = Instant::now() + shared.plan.duration;
    while Instant::now() < deadline {
        match rng.below(10) {
            0 => cancelled(&mut client, &shared, &mut rng).await,
            1 => bad(&mut client, &shared, &mut rng).await,
            _ => checked(&mut client, &shared, &mut rng).await,
        }
    }
}

/// Runs the soak: `plan.streams` streams over `channel`, sampling the RSS of `watched` about
/// every second (and once more at the end).
pub async fn run(
    channel: ApiChannel,
    items: Vec<EvalItem>,
    plan: SoakPlan,
    watched: &[Watched],
) -> SoakReport {
    let start = Instant::now();
    let sample = |t: Instant| RssSample {
        t_s: t.duration_since(start).as_secs_f64(),
        rss_kb: watched
            .iter()
            .filter_map(|w| rss_kb(w.pid).map(|kb| (w.name.clone(), kb)))
            .collect(),
    };
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        items,
        modes: soak_modes(),
        reference: Mutex::default(),
        report: Mutex::new(SoakReport {
            streams: plan.streams,
            duration_s: plan.duration.as_secs_f64(),
            ..SoakReport::default()
        }),
        latencies_ms: Mutex::default(),
    });
    let client = GenerationClient::new(channel);
    let mut tasks: Vec<_> = (0..plan.streams)
        .map(|i| tokio::spawn(stream(i, client.clone(), Arc::clone(&shared))))
        .collect();
    let mut rss = vec![sample(Instant::now())];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while !tasks.iter().all(|t| t.is_finished()) {
        tick.tick().await;
        rss.push(sample(Instant::now()));
    }
    for t in tasks.drain(..) {
        if t.await.is_err() {
            shared.report.lock().unwrap().unexpected += 1;
        }
    }
    let mut report = shared.report.lock().unwrap().clone();
    let lat = shared.latencies_ms.lock().unwrap().clone();
    let p = |q| percentile(&lat, q).unwrap_or(f64::NAN);
    report.latency_ms = [p(50.0), p(99.0), p(100.0)];
    report.wall_s = start.elapsed().as_secs_f64();
    report.rss = rss;
    report
}

/// The report as text: statuses, latency, RSS at start / peak / end, mismatches.
pub fn render(r: &SoakReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "soak: {} streams, {:.0} s of new requests ({:.0} s wall), {} calls",
        r.streams, r.duration_s, r.wall_s, r.calls
    );
    for (kind, codes) in &r.statuses {
        let list: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let _ = writeln!(s, "  {kind:<16} {}", list.join(", "));
    }
    let _ = writeln!(
        s,
        "  latency (completed Generate calls): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        r.latency_ms[0], r.latency_ms[1], r.latency_ms[2]
    );
    let names: Vec<&String> = r
        .rss
        .first()
        .map(|f| f.rss_kb.keys().collect())
        .unwrap_or_default();
    for name in names {
        let series: Vec<u64> = r
            .rss
            .iter()
            .filter_map(|x| x.rss_kb.get(name).copied())
            .collect();
        let mb = |kb: u64| kb as f64 / 1024.0;
        let _ = writeln!(
            s,
            "  RSS {name:<24} start {:.0} MiB, peak {:.0} MiB, end {:.0} MiB ({} samples)",
            mb(*series.first().unwrap_or(&0)),
            mb(series.iter().copied().max().unwrap_or(0)),
            mb(*series.last().unwrap_or(&0)),
            series.len()
        );
    }
    let _ = writeln!(
        s,
        "  lossless: {} speculative outputs compared with target-only, {} mismatches; {} unexpected statuses",
        r.compared,
        r.mismatches.len(),
        r.unexpected
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss() {
        assert!(rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
        assert_eq!(soak_modes().len(), 6);
    }
}
