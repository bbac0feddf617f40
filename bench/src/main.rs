//! `specllava-bench`: the benchmark command line.
//!
//! - `run`: measures the cost model in-process, starts the three services (or uses a running
//!   orchestrator), runs every mode interleaved over the evaluation set, checks every output
//!   against target-only output, runs the Hugging Face peer baseline, and writes JSON, the
//!   markdown table and SVG plots. Exits with status 2 if any output differed.
//! - `cost-model`: only the in-process cost-model measurement next to the roofline.
//! - `soak`: N concurrent streams of mixed requests (modes, sampling, sessions, cancellations,
//!   bad inputs) for a bounded time; statuses, latency, RSS and losslessness (`scripts/soak`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use specllava_bench::calibrate::{self, Calibration, CalibrationPlan};
use specllava_bench::driver;
use specllava_bench::evalset::{self, EvalSizes};
use specllava_bench::modes::{Mode, Sampling};
use specllava_bench::pairs::{self, ModelPair, PairKind};
use specllava_bench::plots;
use specllava_bench::report::{self, Meta, ReferenceTokens, Report};
use specllava_bench::runner::{self, Plan};
use specllava_bench::services::{self, ServiceProcess};
use specllava_bench::soak::{self, SoakPlan, Watched};
use specllava_model::Llava;

#[derive(Parser)]
#[command(
    name = "specllava-bench",
    version,
    about = "Spec-LLaVA benchmark harness"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The full benchmark: cost model, every mode over gRPC, peer baseline, report.
    Run(Box<RunArgs>),
    /// Only the in-process cost-model measurement (verify vs nodes and batch, draft per level).
    CostModel(CostArgs),
    /// Writes the function-preserving widening of a checkpoint (the bench's wide target).
    Widen(WidenArgs),
    /// Soak / load test: concurrent mixed requests for a bounded time, checked lossless.
    Soak(Box<SoakArgs>),
}

#[derive(Args)]
struct SoakArgs {
    #[command(flatten)]
    models: ModelArgs,
    #[command(flatten)]
    services: ServiceArgs,
    /// Concurrent request streams.
    #[arg(long, env = "SPECLLAVA_SOAK_STREAMS", default_value_t = 64)]
    streams: usize,
    /// Seconds during which new requests are started (running ones then finish).
    #[arg(long, env = "SPECLLAVA_SOAK_SECONDS", default_value_t = 120)]
    seconds: u64,
    /// Tokens generated per request (cancelled requests ask for 4x).
    #[arg(long, env = "SPECLLAVA_SOAK_MAX_NEW_TOKENS", default_value_t = 16)]
    max_new_tokens: u32,
    /// Temperature of the seeded-sampling requests.
    #[arg(long, env = "SPECLLAVA_SOAK_TEMPERATURE", default_value_t = 0.7)]
    temperature: f32,
    /// Directory with `test/` and `ood/` (see `run`); a few items of each are used.
    #[arg(long, env = "SPECLLAVA_BENCH_EXAMPLES", default_value = "examples")]
    examples: PathBuf,
    /// Output directory: `soak.json` and the service logs.
    #[arg(long, env = "SPECLLAVA_SOAK_OUT", default_value = "bench/results/soak")]
    out_dir: PathBuf,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Target model directory.
    #[arg(
        long,
        env = "SPECLLAVA_BENCH_TARGET_MODEL",
        default_value = "models/target"
    )]
    target_model: PathBuf,
    /// Draft model directory.
    #[arg(
        long,
        env = "SPECLLAVA_BENCH_DRAFT_MODEL",
        default_value = "models/draft"
    )]
    draft_model: PathBuf,
    /// Device for the in-process measurement: `cpu` or `cuda[:N]`.
    #[arg(long, env = "SPECLLAVA_BENCH_DEVICE", default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct WidenArgs {
    /// Checkpoint folder to widen.
    #[arg(long, default_value = "models/target")]
    model: PathBuf,
    /// Widening factor (decoder weights grow by its square).
    #[arg(long, default_value_t = 4)]
    factor: usize,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct CostArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// A short sweep (for smoke runs).
    #[arg(long, env = "SPECLLAVA_BENCH_QUICK")]
    quick: bool,
    /// The memory-bound plan (small trees in detail, batches 1 and 4; for a wide target).
    #[arg(long)]
    memory_bound: bool,
    /// Write the calibration as JSON here.
    #[arg(long, env = "SPECLLAVA_BENCH_COST_JSON")]
    json: Option<PathBuf>,
}

/// Where the services come from: started from `--bin-dir`, or a running orchestrator.
#[derive(Args, Clone)]
struct ServiceArgs {
    /// Use a running orchestrator (`host:port`) instead of starting the services.
    #[arg(long, env = "SPECLLAVA_BENCH_ORCHESTRATOR")]
    orchestrator: Option<String>,
    /// Reach the running --orchestrator over TLS, trusting this CA (PEM).
    #[arg(
        long,
        env = "SPECLLAVA_BENCH_ORCHESTRATOR_TLS_CA",
        requires = "orchestrator"
    )]
    orchestrator_tls_ca: Option<PathBuf>,
    /// Bearer token sent to the running --orchestrator (when it has --api-keys).
    #[arg(
        long,
        env = "SPECLLAVA_BENCH_TOKEN",
        hide_env_values = true,
        requires = "orchestrator"
    )]
    token: Option<String>,
    /// The target's Prometheus endpoint (`host:port`) for batch sizes, with --orchestrator.
    #[arg(long, env = "SPECLLAVA_BENCH_TARGET_METRICS")]
    target_metrics: Option<String>,
    /// Directory of the service binaries.
    #[arg(
        long,
        env = "SPECLLAVA_BENCH_BIN_DIR",
        default_value = "target/release"
    )]
    bin_dir: PathBuf,
    /// Extra argument for the spawned draft and target services (repeatable), e.g.
    /// `--service-arg=--max-batch-wait-us=2000`.
    #[arg(
        long = "service-arg",
        env = "SPECLLAVA_BENCH_SERVICE_ARGS",
        value_delimiter = ' '
    )]
    service_args: Vec<String>,
    /// CPU threads of the spawned draft service (0: every core). The draft shares this
    /// machine with the target, as it would share nothing on its own GPU: one thread of its
    /// own keeps its pre-drafts from preempting the target's threads mid-forward.
    #[arg(long, env = "SPECLLAVA_BENCH_DRAFT_CPU_THREADS", default_value_t = 1)]
    draft_cpu_threads: usize,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    models: ModelArgs,
    /// Widening factor of the wide pair's target (the demo target widened, function-preserving;
    /// built once under --wide-cache); 0 or 1 runs the demo pair alone.
    #[arg(long, env = "SPECLLAVA_BENCH_WIDE_FACTOR", default_value_t = 4)]
    wide_factor: usize,
    /// Where widened targets are built (git-ignored).
    #[arg(
        long,
        env = "SPECLLAVA_BENCH_WIDE_CACHE",
        default_value = "target/wide-models"
    )]
    wide_cache: PathBuf,
    /// Pairs to run (comma list of `demo`, `wide`).
    #[arg(
        long,
        env = "SPECLLAVA_BENCH_PAIRS",
        value_delimiter = ',',
        default_value = "demo,wide"
    )]
    pairs: Vec<String>,
    /// Smoke run (seconds once built): fewer items, tokens, repeats and modes; quick cost model.
    #[arg(long, env = "SPECLLAVA_BENCH_QUICK")]
    quick: bool,
    /// Directory with `test/` (in-domain images + test.jsonl) and `ood/` (photographs).
    #[arg(long, env = "SPECLLAVA_BENCH_EXAMPLES", default_value = "examples")]
    examples: PathBuf,
    /// In-domain images used.
    #[arg(long, env = "SPECLLAVA_BENCH_IN_DOMAIN")]
    in_domain: Option<usize>,
    /// Out-of-domain photographs used.
    #[arg(long, env = "SPECLLAVA_BENCH_OOD")]
    ood: Option<usize>,
    /// Prompts per image.
    #[arg(long, env = "SPECLLAVA_BENCH_PROMPTS")]
    prompts: Option<usize>,
    /// Tokens generated per request (fixed).
    #[arg(long, env = "SPECLLAVA_BENCH_MAX_NEW_TOKENS")]
    max_new_tokens: Option<u32>,
    /// Rounds per (sampling, concurrency); medians are over rounds.
    #[arg(long, env = "SPECLLAVA_BENCH_REPEATS")]
    repeats: Option<usize>,
    /// Modes at concurrency 1 (comma list: target-only, chain:L, static:D,K,M, dynamic:D,K,M,
    /// adaptive; a `/no-ahead` suffix turns draft-ahead off).
    #[arg(long, env = "SPECLLAVA_BENCH_MODES", value_delimiter = ',')]
    modes: Option<Vec<String>>,
    /// Modes at concurrency > 1.
    #[arg(long, env = "SPECLLAVA_BENCH_CONCURRENT_MODES", value_delimiter = ',')]
    concurrent_modes: Option<Vec<String>>,
    /// Concurrent sessions (comma list).
    #[arg(long, env = "SPECLLAVA_BENCH_CONCURRENCY", value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Temperature of the seeded-sampling runs.
    #[arg(long, env = "SPECLLAVA_BENCH_TEMPERATURE", default_value_t = 0.7)]
    temperature: f32,
    #[command(flatten)]
    services: ServiceArgs,
    /// Output directory for JSON, plots and service logs.
    #[arg(long, env = "SPECLLAVA_BENCH_OUT", default_value = "bench/results")]
    out_dir: PathBuf,
    /// Where to write the markdown table.
    #[arg(
        long,
        env = "SPECLLAVA_BENCH_RESULTS_MD",
        default_value = "bench/RESULTS.md"
    )]
    results_md: PathBuf,
    /// Skip the in-process cost-model measurement.
    #[arg(long, env = "SPECLLAVA_BENCH_SKIP_COST_MODEL")]
    skip_cost_model: bool,
    /// Python with pinned torch + transformers for the peer baseline; empty skips it.
    #[arg(long, env = "SPECLLAVA_PYTHON", default_value = "python3")]
    python: String,
    /// Skip the Hugging Face peer baseline.
    #[arg(long, env = "SPECLLAVA_BENCH_NO_HF")]
    no_hf: bool,
    /// Timed repeats per item in the peer baseline.
    #[arg(long, env = "SPECLLAVA_BENCH_HF_REPEATS")]
    hf_repeats: Option<usize>,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{elapsed_precise}}] {{bar:32}} {{pos}}/{{len}} ETA {{eta}} {{msg}}"
        ))
        .expect("valid template"),
    );
    pb.enable_steady_tick(Duration::from_millis(500));
    pb
}

/// Typical committed length of a benchmark session: image features plus a short prompt.
fn typical_prefix(target: &Llava) -> usize {
    target.tile_tokens() + 24
}

/// Which calibration plan a cost-model measurement runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PlanKind {
    Quick,
    Full,
    MemoryBound,
}

fn cost_model(target: &Path, draft: &Path, device: &str, kind: PlanKind) -> Result<Calibration> {
    let dev = specllava_service_kit::parse_device(device)?;
    // The services take the CPU kernel cap from `SPECLLAVA_CPU_KERNEL` (their `--cpu-kernel`);
    // the in-process forwards take it too, so both measure the same kernels.
    if let Ok(cap) = std::env::var("SPECLLAVA_CPU_KERNEL") {
        let kernel_cap = cap.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        specllava_model::CpuSettings {
            threads: 0,
            kernel_cap,
        }
        .apply();
    }
    let target = Llava::load(target, &dev)
        .with_context(|| format!("loading target {}", target.display()))?;
    let draft =
        Llava::load(draft, &dev).with_context(|| format!("loading draft {}", draft.display()))?;
    let rates = calibrate::measure_rates(&dev)?;
    let prefix = typical_prefix(&target);
    let plan = match kind {
        PlanKind::Quick => CalibrationPlan::quick(prefix),
        PlanKind::Full => CalibrationPlan::full(prefix),
        PlanKind::MemoryBound => CalibrationPlan::memory_bound(prefix),
    };
    let pb = bar(0, "cost model");
    let c = calibrate::calibrate(&target, Some(&draft), Some(rates), &plan, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    Ok(c)
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Parses a comma-split mode list. A piece that starts with a digit continues the previous
/// mode's numbers (`dynamic:5,3,16` arrives as `dynamic:5`, `3`, `16`).
fn parse_modes(list: &[String]) -> Result<Vec<Mode>> {
    let mut joined: Vec<String> = Vec::new();
    for piece in list {
        match joined.last_mut() {
            Some(last) if piece.starts_with(|c: char| c.is_ascii_digit()) => {
                last.push(',');
                last.push_str(piece);
            }
            _ => joined.push(piece.clone()),
        }
    }
    joined
        .iter()
        .map(|s| s.parse::<Mode>().map_err(anyhow::Error::msg))
        .collect()
}

/// Default and quick sizes.
struct Sizing {
    eval: EvalSizes,
    max_new_tokens: u32,
    repeats: usize,
    modes: Vec<Mode>,
    concurrent_modes: Vec<Mode>,
    concurrency: Vec<usize>,
    hf_repeats: usize,
}

fn sizing(quick: bool, pair: PairKind) -> Sizing {
    let m = |s: &str| s.parse::<Mode>().expect("built-in mode");
    if quick {
        Sizing {
            eval: EvalSizes {
                in_domain_images: 2,
                ood_images: 1,
                prompts_per_image: 1,
            },
            max_new_tokens: 16,
            repeats: 1,
            modes: vec![m("chain:3"), m("dynamic:4,3,12"), m("adaptive")],
            concurrent_modes: vec![m("adaptive")],
            concurrency: vec![1, 4],
            hf_repeats: 1,
        }
    } else if pair == PairKind::Wide {
        // A forward of the wide target streams its weights (~15 ms on a 25-30 GB/s machine):
        // the same items, rounds and concurrencies as the demo pair, the shapes that matter
        // there, one peer-baseline repeat.
        Sizing {
            modes: vec![
                m("chain:3"),
                m("chain:4"),
                m("chain:6"),
                m("dynamic:5,3,16"),
                m("adaptive"),
                m("adaptive/no-ahead"),
            ],
            concurrent_modes: vec![m("chain:4"), m("adaptive")],
            hf_repeats: 1,
            ..sizing(false, PairKind::Demo)
        }
    } else {
        Sizing {
            eval: EvalSizes {
                in_domain_images: 6,
                ood_images: 3,
                prompts_per_image: 2,
            },
            max_new_tokens: 32,
            repeats: 3,
            modes: vec![
                m("chain:4"),
                m("chain:4/no-ahead"),
                m("chain:6"),
                m("static:3,3,12"),
                m("dynamic:5,3,16"),
                m("dynamic:5,3,16/no-ahead"),
                m("adaptive"),
                m("adaptive/no-ahead"),
            ],
            concurrent_modes: vec![m("chain:4"), m("dynamic:5,3,16"), m("adaptive")],
            concurrency: vec![1, 4, 16],
            hf_repeats: 2,
        }
    }
}

struct Services {
    procs: Vec<ServiceProcess>,
    orchestrator: String,
    /// TLS towards the orchestrator (`None`: plaintext).
    tls: Option<tonic::transport::ClientTlsConfig>,
    /// Bearer token of every request.
    token: Option<String>,
    target_metrics: Option<String>,
}

impl Services {
    /// The channel to the orchestrator (TLS and bearer token as configured).
    fn api_channel(&self) -> Result<driver::ApiChannel> {
        let channel = services::channel_with(&self.orchestrator, self.tls.clone())?;
        let token = driver::BearerToken::new(self.token.as_deref())
            .context("--token is not a valid header value")?;
        Ok(driver::api_channel(channel, token))
    }
}

async fn start_services(
    target: &Path,
    draft: &Path,
    device: &str,
    a: &ServiceArgs,
    logs: &Path,
) -> Result<Services> {
    if let Some(addr) = &a.orchestrator {
        let tls = match &a.orchestrator_tls_ca {
            Some(ca) => Some(specllava_server::tls::client_config(ca, None, None)?),
            None => None,
        };
        return Ok(Services {
            procs: Vec::new(),
            orchestrator: addr.clone(),
            tls,
            token: a.token.clone(),
            target_metrics: a.target_metrics.clone(),
        });
    }
    std::fs::create_dir_all(logs)?;
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let (tp, dp, op, tm) = (
        services::free_port()?,
        services::free_port()?,
        services::free_port()?,
        services::free_port()?,
    );
    let model = |p: &Path| p.display().to_string();
    let mut procs = Vec::new();
    // No encoder cache: the eval set's images come back in every mode and round, so a cache
    // would serve every mode after the first with its towers already run. Every request
    // encodes its images, as unique images would (calls in flight still share a run).
    let no_vision_cache = ("SPECLLAVA_VISION_CACHE_MIB", "0".to_owned());
    let target_env = [
        ("SPECLLAVA_LISTEN", addr(tp)),
        ("SPECLLAVA_MODEL_DIR", model(target)),
        ("SPECLLAVA_DEVICE", device.to_owned()),
        ("SPECLLAVA_METRICS_ADDR", addr(tm)),
        no_vision_cache.clone(),
    ];
    let args = &a.service_args;
    procs.push(services::spawn(
        &a.bin_dir,
        "specllava-target",
        addr(tp),
        args,
        &target_env,
        logs,
    )?);
    let draft_env = [
        ("SPECLLAVA_LISTEN", addr(dp)),
        ("SPECLLAVA_MODEL_DIR", model(draft)),
        ("SPECLLAVA_DEVICE", device.to_owned()),
        ("SPECLLAVA_METRICS_ADDR", "127.0.0.1:0".to_owned()),
        ("SPECLLAVA_CPU_THREADS", a.draft_cpu_threads.to_string()),
        no_vision_cache,
    ];
    procs.push(services::spawn(
        &a.bin_dir,
        "specllava-draft",
        addr(dp),
        args,
        &draft_env,
        logs,
    )?);
    for p in &mut procs {
        services::wait_healthy(p, Duration::from_secs(180)).await?;
    }
    let orch_env = [
        ("SPECLLAVA_LISTEN", addr(op)),
        ("SPECLLAVA_TARGET_ENDPOINTS", addr(tp)),
        ("SPECLLAVA_DRAFT_ENDPOINTS", addr(dp)),
        ("SPECLLAVA_MODEL_DIR", model(target)),
        ("SPECLLAVA_METRICS_ADDR", "127.0.0.1:0".to_owned()),
    ];
    let mut orch = services::spawn(
        &a.bin_dir,
        "specllava-orchestrator",
        addr(op),
        &[],
        &orch_env,
        logs,
    )?;
    services::wait_healthy(&mut orch, Duration::from_secs(120)).await?;
    procs.push(orch);
    Ok(Services {
        procs,
        orchestrator: addr(op),
        tls: None,
        token: None,
        target_metrics: Some(addr(tm)),
    })
}

fn run_hf(
    a: &RunArgs,
    bench_json: &Path,
    hf_json: &Path,
    repeats: usize,
) -> Result<serde_json::Value> {
    let status = std::process::Command::new(&a.python)
        .args(["tools/hf_baseline.py", "--bench-json"])
        .arg(bench_json)
        .arg("--out")
        .arg(hf_json)
        .arg(format!("--repeats={repeats}"))
        .status()
        .with_context(|| format!("running {} tools/hf_baseline.py", a.python))?;
    let text = std::fs::read_to_string(hf_json)
        .with_context(|| format!("reading {}", hf_json.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    if !status.success() {
        eprintln!(
            "!!! the peer baseline reported a problem (exit {status}); see {}",
            hf_json.display()
        );
    }
    Ok(v)
}

/// What one pair's measurement produced.
struct PairOutcome {
    report: Report,
    hf: Option<serde_json::Value>,
}

/// Measures one pair: cost model, services, every mode interleaved, peer baseline; writes
/// `<out>/<pair>/bench.json` (and the peer baseline's JSON and service logs beside it).
async fn run_pair(a: &RunArgs, pair: &ModelPair, command: &str) -> Result<PairOutcome> {
    let started = Instant::now();
    let size = sizing(a.quick, pair.kind);
    let eval = EvalSizes {
        in_domain_images: a.in_domain.unwrap_or(size.eval.in_domain_images),
        ood_images: a.ood.unwrap_or(size.eval.ood_images),
        prompts_per_image: a.prompts.unwrap_or(size.eval.prompts_per_image),
    };
    let items = evalset::load(&a.examples, eval)?;
    let plan = Plan {
        modes: match &a.modes {
            Some(m) => parse_modes(m)?,
            None => size.modes.clone(),
        },
        concurrent_modes: match &a.concurrent_modes {
            Some(m) => parse_modes(m)?,
            None => size.concurrent_modes.clone(),
        },
        samplings: vec![
            Sampling::Greedy,
            Sampling::Seeded {
                temperature: a.temperature,
            },
        ],
        concurrent_samplings: vec![Sampling::Greedy],
        concurrency: a.concurrency.clone().unwrap_or(size.concurrency.clone()),
        repeats: a.repeats.unwrap_or(size.repeats),
        max_new_tokens: a.max_new_tokens.unwrap_or(size.max_new_tokens),
    };
    let out_dir = a.out_dir.join(pair.kind.name());
    std::fs::create_dir_all(&out_dir)?;
    println!(
        "== pair `{}`: target {}, draft {}",
        pair.kind.name(),
        pair.target.display(),
        pair.draft.display()
    );

    let calibration = if a.skip_cost_model {
        None
    } else {
        let kind = match (a.quick, pair.kind) {
            (true, _) => PlanKind::Quick,
            (false, PairKind::Demo) => PlanKind::Full,
            (false, PairKind::Wide) => PlanKind::MemoryBound,
        };
        let c = cost_model(&pair.target, &pair.draft, &a.models.device, kind)?;
        println!("{}", calibrate::render(&c));
        Some(c)
    };

    let ready = Instant::now();
    let svc = start_services(
        &pair.target,
        &pair.draft,
        &a.models.device,
        &a.services,
        &out_dir.join("logs"),
    )
    .await?;
    println!("services ready in {:.1} s", ready.elapsed().as_secs_f64());
    let channel = svc.api_channel()?;
    let total = plan.total_requests(items.len());
    println!(
        "{} requests per pass, {} passes, {total} requests in all",
        items.len(),
        total / items.len().max(1)
    );
    let pb = bar(total as u64, "bench");
    let outcome = runner::run(
        channel,
        items.clone(),
        &plan,
        svc.target_metrics.as_deref(),
        &pb,
    )
    .await?;
    pb.finish_and_clear();
    drop(svc);

    let mut summaries = Vec::new();
    for (sampling, concurrency, modes) in plan.blocks() {
        let cell = |m: Mode| -> Vec<&report::Run> {
            outcome
                .runs
                .iter()
                .filter(|r| r.mode == m && r.sampling == sampling && r.concurrency == concurrency)
                .collect()
        };
        let base = cell(Mode::TARGET_ONLY);
        for m in modes {
            summaries.extend(report::summarise(&cell(m), &base, &items));
        }
    }
    let greedy = Sampling::Greedy.to_string();
    let greedy_tokens = items
        .iter()
        .enumerate()
        .filter_map(|(i, it)| {
            let r = outcome
                .runs
                .iter()
                .find(|r| r.mode.is_baseline() && r.sampling == Sampling::Greedy)?;
            let res = r.results.iter().find(|x| x.0 == i)?;
            Some(ReferenceTokens {
                id: it.id.clone(),
                image: it.image_path.display().to_string(),
                prompt: it.prompt.clone(),
                tokens: outcome.check.reference(&greedy, &it.id)?.to_vec(),
                text: res.1.text.clone(),
            })
        })
        .collect();
    let mut report = Report {
        meta: Meta {
            command: command.to_owned(),
            pair: pair.kind.name().to_owned(),
            description: pair.description.clone(),
            target_model: pair.target.display().to_string(),
            draft_model: pair.draft.display().to_string(),
            max_new_tokens: plan.max_new_tokens,
            repeats: plan.repeats,
            items: items.len(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            wall_s: started.elapsed().as_secs_f64(),
        },
        items,
        summaries,
        greedy_tokens,
        outputs_checked: outcome.check.checked(),
        baseline_reruns_checked: outcome.check.baseline_reruns(),
        mismatches: outcome.check.mismatches().to_vec(),
        calibration,
    };
    let bench_json = out_dir.join("bench.json");
    write_json(&bench_json, &report)?;

    let hf = if a.no_hf || a.python.is_empty() {
        None
    } else {
        let hf_json = out_dir.join("hf_baseline.json");
        match run_hf(
            a,
            &bench_json,
            &hf_json,
            a.hf_repeats.unwrap_or(size.hf_repeats),
        ) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("peer baseline skipped: {e:#}");
                None
            }
        }
    };
    report.meta.wall_s = started.elapsed().as_secs_f64();
    write_json(&bench_json, &report)?;
    Ok(PairOutcome { report, hf })
}

/// Everything a run measured, as `bench/results/bench.json` holds it.
#[derive(serde::Serialize)]
struct RunReport<'a> {
    command: &'a str,
    wall_s: f64,
    pairs: Vec<&'a Report>,
}

async fn run(a: RunArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let all = pairs::pairs(
        &a.models.target_model,
        &a.models.draft_model,
        if a.pairs.iter().any(|p| p == "wide") {
            a.wide_factor
        } else {
            0
        },
        &a.wide_cache,
    )
    .context("preparing the model pairs")?;
    let selected: Vec<&ModelPair> = all
        .iter()
        .filter(|p| a.pairs.iter().any(|n| n == p.kind.name()))
        .collect();
    if selected.is_empty() {
        anyhow::bail!("--pairs selects no pair (demo, wide)");
    }
    std::fs::create_dir_all(&a.out_dir)?;
    let mut outcomes = Vec::new();
    for pair in selected {
        outcomes.push(run_pair(&a, pair, &command).await?);
    }
    let wall_s = started.elapsed().as_secs_f64();
    let reports: Vec<&Report> = outcomes.iter().map(|o| &o.report).collect();
    write_json(
        &a.out_dir.join("bench.json"),
        &RunReport {
            command: &command,
            wall_s,
            pairs: reports.clone(),
        },
    )?;
    plots::draw_all(&reports, &a.out_dir)?;
    // Plot links relative to the markdown file.
    let rel = a
        .results_md
        .parent()
        .and_then(|p| a.out_dir.strip_prefix(p).ok())
        .unwrap_or(&a.out_dir);
    let with_hf: Vec<(&Report, Option<&serde_json::Value>)> = outcomes
        .iter()
        .map(|o| (&o.report, o.hf.as_ref()))
        .collect();
    let md = report::render_markdown(&with_hf, &command, wall_s, rel);
    if let Some(dir) = a.results_md.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.results_md, &md)?;
    println!("{md}");
    println!(
        "wrote {}, {} and plots in {}",
        a.results_md.display(),
        a.out_dir.join("bench.json").display(),
        a.out_dir.display()
    );

    let mut failed = false;
    for r in &reports {
        if r.mismatches.is_empty() {
            continue;
        }
        failed = true;
        eprintln!(
            "\n!!! LOSSLESSNESS VIOLATED on pair `{}`: {} of {} outputs differ from target-only output",
            r.meta.pair,
            r.mismatches.len(),
            r.outputs_checked + r.baseline_reruns_checked,
        );
        for m in r.mismatches.iter().take(10) {
            eprintln!(
                "!!!   {} [{}] {} x{} round {}: first difference at token {}",
                m.item,
                m.mode,
                m.sampling,
                m.concurrency,
                m.repeat + 1,
                m.first_difference
            );
        }
    }
    Ok(if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

async fn soak(a: SoakArgs) -> Result<ExitCode> {
    let sizes = EvalSizes {
        in_domain_images: 3,
        ood_images: 2,
        prompts_per_image: 2,
    };
    let items = evalset::load(&a.examples, sizes)?;
    std::fs::create_dir_all(&a.out_dir)?;
    let svc = start_services(
        &a.models.target_model,
        &a.models.draft_model,
        &a.models.device,
        &a.services,
        &a.out_dir.join("logs"),
    )
    .await?;
    let watched: Vec<Watched> = svc
        .procs
        .iter()
        .map(|p| Watched {
            name: p.name.clone(),
            pid: p.pid(),
        })
        .collect();
    let plan = SoakPlan {
        streams: a.streams,
        duration: Duration::from_secs(a.seconds),
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
    };
    println!(
        "soak: {} streams for {} s over {} items against {}",
        plan.streams,
        a.seconds,
        items.len(),
        svc.orchestrator
    );
    let report = soak::run(svc.api_channel()?, items, plan, &watched).await;
    drop(svc);
    print!("{}", soak::render(&report));
    write_json(&a.out_dir.join("soak.json"), &report)?;
    for m in report.mismatches.iter().take(10) {
        eprintln!("!!! mismatch {} [{}]", m.key, m.mode);
    }
    let failed = !report.mismatches.is_empty() || report.unexpected > 0;
    Ok(if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Widen(a) => specllava_model::widen::widen_checkpoint(&a.model, &a.out, a.factor)
            .map(|()| {
                println!(
                    "wrote {} (the function of {}, decoder widths x{})",
                    a.out.display(),
                    a.model.display(),
                    a.factor
                );
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
        Command::CostModel(a) => cost_model(
            &a.models.target_model,
            &a.models.draft_model,
            &a.models.device,
            match (a.quick, a.memory_bound) {
                (true, _) => PlanKind::Quick,
                (false, true) => PlanKind::MemoryBound,
                (false, false) => PlanKind::Full,
            },
        )
        .and_then(|c| {
            println!("{}", calibrate::render(&c));
            let policy = c.cost_model()?;
            println!(
                "budget-policy cost model: {:.3} ms per draft level + {:.4} ms per row; verify(1 node) {:.2} ms, verify(64) {:.2} ms",
                policy.draft_level_ns / 1e6,
                policy.draft_node_ns / 1e6,
                policy.verify_ns(1, 1) / 1e6,
                policy.verify_ns(64, 1) / 1e6
            );
            if let Some(p) = &a.json {
                write_json(p, &c)?;
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Run(a) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")
            .and_then(|rt| rt.block_on(run(*a))),
        Command::Soak(a) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")
            .and_then(|rt| rt.block_on(soak(*a))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_lists_keep_the_commas_of_tree_shapes() {
        let list: Vec<String> = "target-only,dynamic:5,3,16,chain:4/no-ahead,static:3,3,12"
            .split(',')
            .map(str::to_owned)
            .collect();
        let modes = parse_modes(&list).unwrap();
        let names: Vec<String> = modes.iter().map(ToString::to_string).collect();
        assert_eq!(
            names,
            [
                "target-only",
                "dynamic:5,3,16",
                "chain:4/no-ahead",
                "static:3,3,12"
            ]
        );
    }
}
