//! Aggregation of runs into per-mode figures, the JSON report and the markdown table.

use serde::Serialize;

use crate::calibrate::Calibration;
use crate::check::Mismatch;
use crate::driver::RequestResult;
use crate::evalset::{Domain, EvalItem};
use crate::modes::{Mode, Sampling};
use crate::stats::{median, percentile};

/// The figures the report links to, with their alt texts (`plots::draw_all` draws them).
pub const FIGURES: [(&str, &str); 4] = [
    ("speedup by mode", "speedup_by_mode.svg"),
    ("verify time vs tree nodes", "verify_vs_nodes.svg"),
    ("tokens per step", "accepted_length_hist.svg"),
    ("throughput vs concurrency", "throughput_vs_concurrency.svg"),
];

/// One timed pass of a mode over the evaluation set.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Mode.
    pub mode: Mode,
    /// Sampling setting.
    pub sampling: Sampling,
    /// Concurrent sessions.
    pub concurrency: usize,
    /// Repeat index (runs of one repeat are interleaved A B A B).
    pub repeat: usize,
    /// Wall time of the whole pass, ns.
    pub wall_ns: u64,
    /// (item index, result) of every request.
    pub results: Vec<(usize, RequestResult)>,
    /// Mean sessions per target forward during the pass (from the target's metrics), if known.
    pub target_batch_size: Option<f64>,
}

impl Run {
    /// Generated tokens of the pass.
    pub fn tokens(&self) -> usize {
        self.results.iter().map(|r| r.1.tokens.len()).sum()
    }

    /// Decode rate: tokens after each request's first chunk, over the summed decode times (from
    /// first to last chunk), tokens per second. At concurrency 1 this is pure decoding speed.
    pub fn decode_tok_s(&self) -> f64 {
        self.decode_tok_s_where(|_| true)
    }

    /// The decode rate over the requests whose item index passes `keep`.
    pub fn decode_tok_s_where(&self, keep: impl Fn(usize) -> bool) -> f64 {
        let kept = || self.results.iter().filter(|r| keep(r.0));
        let toks: usize = kept().map(|r| r.1.decode_tokens()).sum();
        let ns: u64 = kept().map(|r| r.1.decode_ns()).sum();
        if ns == 0 {
            0.0
        } else {
            toks as f64 * 1e9 / ns as f64
        }
    }

    /// End-to-end throughput of the pass (prefill included): tokens over wall time.
    pub fn throughput_tok_s(&self) -> f64 {
        if self.wall_ns == 0 {
            0.0
        } else {
            self.tokens() as f64 * 1e9 / self.wall_ns as f64
        }
    }
}

/// Time split of the summed request times, as fractions of total request time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TimeSplit {
    /// Prefill (opening sessions).
    pub prefill: f64,
    /// Drafting.
    pub draft: f64,
    /// Verification forwards.
    pub verify: f64,
    /// Network, queues and orchestration.
    pub network: f64,
    /// The rest (waiting for batch-mates, scheduling, client).
    pub idle: f64,
}

/// The figures of one (sampling, concurrency, mode) cell.
#[derive(Debug, Clone, Serialize)]
pub struct ModeSummary {
    /// Mode.
    pub mode: Mode,
    /// Mode label.
    pub label: String,
    /// Sampling label.
    pub sampling: String,
    /// Concurrent sessions.
    pub concurrency: usize,
    /// Repeats measured.
    pub repeats: usize,
    /// Median over repeats of the decode rate, tokens/s.
    pub decode_tok_s: f64,
    /// Median over repeats of end-to-end throughput, tokens/s.
    pub throughput_tok_s: f64,
    /// Median over repeats of decode_tok_s / target-only decode_tok_s of the same repeat.
    pub speedup: f64,
    /// Median over repeats of the throughput ratio to target-only of the same repeat.
    pub throughput_speedup: f64,
    /// Decode speedup over in-domain items only (median over repeats).
    pub speedup_in_domain: Option<f64>,
    /// Decode speedup over out-of-domain items only (median over repeats).
    pub speedup_ood: Option<f64>,
    /// Draft-ahead hit rate (hits / guesses), all items.
    pub ahead_hit_rate: Option<f64>,
    /// Draft-ahead hit rate, in-domain items.
    pub ahead_hit_rate_in_domain: Option<f64>,
    /// Draft-ahead hit rate, out-of-domain items.
    pub ahead_hit_rate_ood: Option<f64>,
    /// Spare-time drafting the hits saved, as a fraction of the summed drafting time.
    pub ahead_saved_share: Option<f64>,
    /// Mean tokens emitted per verification step (accepted + 1).
    pub mean_accepted_length: f64,
    /// Mean tokens per step, in-domain items only.
    pub mean_accepted_length_in_domain: Option<f64>,
    /// Mean tokens per step, out-of-domain items only.
    pub mean_accepted_length_ood: Option<f64>,
    /// Acceptance rate per depth (index 0 = depth 1), step-weighted.
    pub acceptance_per_depth: Vec<f64>,
    /// Mean draft nodes per step.
    pub drafted_per_step: f64,
    /// Where the time went.
    pub time_split: TimeSplit,
    /// Median client-side time to first token, ms.
    pub ttft_ms: f64,
    /// Median per-token latency, ms.
    pub p50_token_ms: f64,
    /// 99th percentile per-token latency, ms.
    pub p99_token_ms: f64,
    /// Mean sessions per target forward (median over repeats), if known.
    pub target_batch_size: Option<f64>,
    /// Histogram of tokens emitted per step: `histogram[n]` = steps that emitted n tokens.
    pub tokens_per_step_histogram: Vec<u64>,
}

fn ratio_medians(runs: &[&Run], baseline: &[&Run], f: impl Fn(&Run) -> f64) -> f64 {
    let ratios: Vec<f64> = runs
        .iter()
        .filter_map(|r| {
            let b = baseline.iter().find(|b| b.repeat == r.repeat)?;
            let base = f(b);
            (base > 0.0).then(|| f(r) / base)
        })
        .collect();
    median(&ratios).unwrap_or(f64::NAN)
}

/// Summarises the runs of one cell against the target-only runs of the same cell.
pub fn summarise(runs: &[&Run], baseline: &[&Run], items: &[EvalItem]) -> Option<ModeSummary> {
    let first = runs.first()?;
    let results = || runs.iter().flat_map(|r| r.results.iter());
    let steps_of = |r: &RequestResult| {
        if r.stats.steps > 0 {
            r.stats.steps as usize
        } else {
            r.chunks.len()
        }
    };
    let accept_len = |domain: Option<Domain>| {
        let (mut toks, mut steps) = (0usize, 0usize);
        for (i, r) in results() {
            if domain.is_none_or(|d| items[*i].domain == d) {
                toks += r.tokens.len();
                steps += steps_of(r);
            }
        }
        (steps > 0).then(|| toks as f64 / steps as f64)
    };
    let hit_rate = |domain: Option<Domain>| {
        let (mut hits, mut guesses) = (0u64, 0u64);
        for (i, r) in results() {
            if domain.is_none_or(|d| items[*i].domain == d) {
                hits += u64::from(r.stats.ahead_hits);
                guesses += u64::from(r.stats.ahead_hits + r.stats.ahead_misses);
            }
        }
        (guesses > 0).then(|| hits as f64 / guesses as f64)
    };
    let domain_speedup = |d: Domain| {
        let in_d = |i: usize| items.get(i).is_some_and(|it| it.domain == d);
        if !results().any(|(i, _)| in_d(*i)) {
            return None;
        }
        Some(ratio_medians(runs, baseline, |r| {
            r.decode_tok_s_where(in_d)
        }))
        .filter(|x| x.is_finite())
    };
    let saved: u64 = results().map(|(_, r)| r.stats.ahead_saved_ns).sum();
    let drafting: u64 = results()
        .map(|(_, r)| r.stats.draft_ns + r.stats.ahead_saved_ns)
        .sum();
    let total_steps: usize = results().map(|(_, r)| steps_of(r)).sum();
    let max_depth = results()
        .map(|(_, r)| r.stats.acceptance_per_depth.len())
        .max()
        .unwrap_or(0);
    let mut per_depth = vec![0.0; max_depth];
    let mut weight = 0.0;
    for (_, r) in results() {
        let w = r.stats.steps as f64;
        if r.stats.acceptance_per_depth.is_empty() {
            continue;
        }
        weight += w;
        for (d, a) in r.stats.acceptance_per_depth.iter().enumerate() {
            per_depth[d] += w * f64::from(*a);
        }
    }
    if weight > 0.0 {
        per_depth.iter_mut().for_each(|v| *v /= weight);
    }
    let mut split = TimeSplit::default();
    let mut total = 0.0;
    for (_, r) in results() {
        let s = &r.stats;
        let t = r.total_ns as f64;
        total += t;
        split.prefill += s.prefill_ns as f64;
        split.draft += s.draft_ns as f64;
        split.verify += s.verify_ns as f64;
        split.network += s.network_ns as f64;
    }
    if total > 0.0 {
        let known = split.prefill + split.draft + split.verify + split.network;
        split.idle = (total - known).max(0.0);
        for v in [
            &mut split.prefill,
            &mut split.draft,
            &mut split.verify,
            &mut split.network,
            &mut split.idle,
        ] {
            *v /= total;
        }
    }
    let ttfts: Vec<f64> = results()
        .filter_map(|(_, r)| r.ttft_ns())
        .map(|n| n as f64 / 1e6)
        .collect();
    let lat: Vec<f64> = results()
        .flat_map(|(_, r)| r.per_token_latencies_ns())
        .map(|n| n / 1e6)
        .collect();
    let mut hist: Vec<u64> = Vec::new();
    for (_, r) in results() {
        for n in r.tokens_per_step() {
            let n = n as usize;
            if hist.len() <= n {
                hist.resize(n + 1, 0);
            }
            hist[n] += 1;
        }
    }
    let drafted: u64 = results().map(|(_, r)| u64::from(r.stats.drafted)).sum();
    let batch: Vec<f64> = runs.iter().filter_map(|r| r.target_batch_size).collect();
    let tokens: usize = results().map(|(_, r)| r.tokens.len()).sum();
    Some(ModeSummary {
        mode: first.mode,
        label: first.mode.to_string(),
        sampling: first.sampling.to_string(),
        concurrency: first.concurrency,
        repeats: runs.len(),
        decode_tok_s: median(&runs.iter().map(|r| r.decode_tok_s()).collect::<Vec<_>>())
            .unwrap_or(0.0),
        throughput_tok_s: median(
            &runs
                .iter()
                .map(|r| r.throughput_tok_s())
                .collect::<Vec<_>>(),
        )
        .unwrap_or(0.0),
        speedup: ratio_medians(runs, baseline, Run::decode_tok_s),
        throughput_speedup: ratio_medians(runs, baseline, Run::throughput_tok_s),
        speedup_in_domain: domain_speedup(Domain::InDomain),
        speedup_ood: domain_speedup(Domain::OutOfDomain),
        ahead_hit_rate: hit_rate(None),
        ahead_hit_rate_in_domain: hit_rate(Some(Domain::InDomain)),
        ahead_hit_rate_ood: hit_rate(Some(Domain::OutOfDomain)),
        ahead_saved_share: (drafting > 0 && saved > 0).then(|| saved as f64 / drafting as f64),
        mean_accepted_length: if total_steps > 0 {
            tokens as f64 / total_steps as f64
        } else {
            0.0
        },
        mean_accepted_length_in_domain: accept_len(Some(Domain::InDomain)),
        mean_accepted_length_ood: accept_len(Some(Domain::OutOfDomain)),
        acceptance_per_depth: per_depth,
        drafted_per_step: if total_steps > 0 {
            drafted as f64 / total_steps as f64
        } else {
            0.0
        },
        time_split: split,
        ttft_ms: median(&ttfts).unwrap_or(0.0),
        p50_token_ms: percentile(&lat, 50.0).unwrap_or(0.0),
        p99_token_ms: percentile(&lat, 99.0).unwrap_or(0.0),
        target_batch_size: median(&batch),
        tokens_per_step_histogram: hist,
    })
}

/// Greedy target-only tokens of one item, for the peer-baseline comparison.
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceTokens {
    /// Eval item id.
    pub id: String,
    /// Image path.
    pub image: String,
    /// User prompt.
    pub prompt: String,
    /// Generated tokens (target-only, greedy; every mode produced the same).
    pub tokens: Vec<u32>,
    /// Generated text.
    pub text: String,
}

/// Settings of the run, recorded with the results.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    /// Command line that produced the report.
    pub command: String,
    /// The model pair's name (`demo`, `wide`).
    pub pair: String,
    /// What the pair is.
    pub description: String,
    /// Target model directory.
    pub target_model: String,
    /// Draft model directory.
    pub draft_model: String,
    /// Max new tokens per request.
    pub max_new_tokens: u32,
    /// Repeats per cell.
    pub repeats: usize,
    /// Requests in the eval set.
    pub items: usize,
    /// CPU cores of the machine.
    pub cpus: usize,
    /// Wall time of the whole benchmark, s.
    pub wall_s: f64,
}

/// The whole report, as written to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Settings.
    pub meta: Meta,
    /// Eval items.
    pub items: Vec<EvalItem>,
    /// One summary per (sampling, concurrency, mode).
    pub summaries: Vec<ModeSummary>,
    /// Greedy reference tokens per item.
    pub greedy_tokens: Vec<ReferenceTokens>,
    /// Speculative outputs checked against target-only output.
    pub outputs_checked: usize,
    /// Target-only re-runs checked against the first target-only output (determinism).
    pub baseline_reruns_checked: usize,
    /// Outputs that differed (must be empty).
    pub mismatches: Vec<Mismatch>,
    /// Cost-model calibration, if measured.
    pub calibration: Option<Calibration>,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// The markdown tables (one row per cell).
pub fn markdown(report: &Report) -> String {
    use std::fmt::Write;
    let m = &report.meta;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Target `{}`, draft `{}` ({}); {} requests (images x prompts), max_new_tokens {}, {} \
         rounds, the order of modes rotating from round to round, medians; {:.0} s for this \
         pair. Every output was checked against target-only output: {} speculative outputs \
         and {} target-only re-runs checked, {} mismatches.\n",
        m.target_model,
        m.draft_model,
        m.description,
        m.items,
        m.max_new_tokens,
        m.repeats,
        m.wall_s,
        report.outputs_checked,
        report.baseline_reruns_checked,
        report.mismatches.len()
    );
    let _ = writeln!(
        s,
        "| sampling | conc | mode | decode tok/s | speedup (in / ood) | e2e tok/s | e2e speedup | tokens/step (in / ood) | \
         acceptance d1..d4 | ahead hit % (in / ood) | draft / verify / net / prefill / idle % | TTFT ms | p50 / p99 ms/token | target batch |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---|---:|---|---:|---:|---|---|---|---|---:|---|---:|"
    );
    for x in &report.summaries {
        let acc: Vec<String> = x
            .acceptance_per_depth
            .iter()
            .take(4)
            .map(|a| format!("{a:.2}"))
            .collect();
        let t = &x.time_split;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.2}x ({} / {}) | {:.1} | {:.2}x | {:.2} ({} / {}) | {} | {} | {:.0} / {:.0} / {:.0} / {:.0} / {:.0} | {:.1} | {:.2} / {:.2} | {} |",
            x.sampling,
            x.concurrency,
            x.label,
            x.decode_tok_s,
            x.speedup,
            opt(x.speedup_in_domain, 2),
            opt(x.speedup_ood, 2),
            x.throughput_tok_s,
            x.throughput_speedup,
            x.mean_accepted_length,
            opt(x.mean_accepted_length_in_domain, 2),
            opt(x.mean_accepted_length_ood, 2),
            if acc.is_empty() {
                "-".into()
            } else {
                acc.join(" ")
            },
            match x.ahead_hit_rate {
                Some(h) => format!(
                    "{:.0} ({} / {})",
                    100.0 * h,
                    opt(x.ahead_hit_rate_in_domain.map(|v| 100.0 * v), 0),
                    opt(x.ahead_hit_rate_ood.map(|v| 100.0 * v), 0)
                ),
                None => "-".into(),
            },
            100.0 * t.draft,
            100.0 * t.verify,
            100.0 * t.network,
            100.0 * t.prefill,
            100.0 * t.idle,
            x.ttft_ms,
            x.p50_token_ms,
            x.p99_token_ms,
            opt(x.target_batch_size, 1),
        );
    }
    s
}

/// The peer-baseline table from `tools/hf_baseline.py`'s JSON, next to our numbers.
pub fn hf_markdown(hf: &serde_json::Value, report: &Report) -> String {
    use std::fmt::Write;
    let s = &hf["summary"];
    let num = |v: &serde_json::Value| v.as_f64();
    let ours = |label: &str| {
        report
            .summaries
            .iter()
            .find(|x| x.concurrency == 1 && x.sampling == "greedy" && x.label == label)
            .map(|x| x.decode_tok_s)
    };
    let best = report
        .summaries
        .iter()
        .filter(|x| x.concurrency == 1 && x.sampling == "greedy" && !x.mode.is_baseline())
        .max_by(|a, b| a.decode_tok_s.total_cmp(&b.decode_tok_s));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Peer baseline: Hugging Face transformers {} (torch {}, {} threads), same checkpoints, prompts, machine\n",
        s["transformers"].as_str().unwrap_or("?"),
        s["torch"].as_str().unwrap_or("?"),
        s["threads"]
    );
    let _ = writeln!(
        out,
        "| system | decode tok/s | e2e tok/s | greedy tokens equal ours |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (name, key) in [
        ("HF `generate` (greedy)", "generate"),
        (
            "HF assisted generation (`assistant_model` = draft)",
            "assisted",
        ),
    ] {
        let g = &s[key];
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} / {} |",
            opt(num(&g["decode_tok_s"]), 1),
            opt(num(&g["e2e_tok_s"]), 1),
            g["equal_to_ours"],
            g["items"]
        );
    }
    let _ = writeln!(
        out,
        "| ours, target-only | {} | | |",
        opt(ours("target-only"), 1)
    );
    if let Some(b) = best {
        let _ = writeln!(
            out,
            "| ours, best mode ({}) | {:.1} | {:.1} | |",
            b.label, b.decode_tok_s, b.throughput_tok_s
        );
    }
    let _ = writeln!(
        out,
        "\nHF assisted / HF generate decode speedup: {}x.",
        opt(num(&s["assisted_speedup"]), 2)
    );
    out
}

/// The column legend under every results table.
const COLUMNS: &str = "Columns: decode tok/s = tokens after the first chunk over time from first \
     to last chunk (summed over requests); speedup = ratio to target-only in the same round \
     (median of rounds); e2e = all tokens over the wall time of the pass, prefill included; \
     tokens/step = accepted draft tokens + 1; acceptance dN = fraction of steps whose accepted \
     path reached depth N; time split from the orchestrator's per-request statistics; target \
     batch = mean sessions per batched target forward (target metrics).\n";

/// One headline row per pair: the adaptive mode's speedups next to the best fixed shape.
fn headline(pairs: &[(&Report, Option<&serde_json::Value>)]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| pair | target-only decode tok/s | greedy x1 | sampled x1 | e2e greedy x1 | greedy x4 | greedy x16 | best fixed shape, greedy x1 | outputs checked / mismatches |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---|---|");
    for (r, _) in pairs {
        let find = |sampling: &str, conc: usize, label: &str| {
            r.summaries.iter().find(|x| {
                x.sampling.starts_with(sampling) && x.concurrency == conc && x.label == label
            })
        };
        let speed = |sampling: &str, conc: usize| {
            find(sampling, conc, "adaptive").map_or("-".into(), |x| format!("{:.2}x", x.speedup))
        };
        let best_fixed = r
            .summaries
            .iter()
            .filter(|x| {
                x.concurrency == 1
                    && x.sampling == "greedy"
                    && !x.mode.is_baseline()
                    && x.label != "adaptive"
                    && !x.label.starts_with("adaptive/")
            })
            .max_by(|a, b| a.speedup.total_cmp(&b.speedup));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            r.meta.pair,
            find("greedy", 1, "target-only")
                .map_or("-".into(), |x| format!("{:.1}", x.decode_tok_s)),
            speed("greedy", 1),
            speed("sampled", 1),
            find("greedy", 1, "adaptive")
                .map_or("-".into(), |x| format!("{:.2}x", x.throughput_speedup)),
            speed("greedy", 4),
            speed("greedy", 16),
            best_fixed.map_or("-".into(), |x| format!("`{}` {:.2}x", x.label, x.speedup)),
            r.outputs_checked,
            r.mismatches.len()
        );
    }
    s
}

/// The whole RESULTS.md: the headline over every pair, then per pair its table, peer baseline
/// and cost model, then the plots (in `plots_dir`, relative to the markdown file).
pub fn render_markdown(
    pairs: &[(&Report, Option<&serde_json::Value>)],
    command: &str,
    wall_s: f64,
    plots_dir: &std::path::Path,
) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let cpus = pairs.first().map_or(0, |(r, _)| r.meta.cpus);
    let _ = writeln!(md, "# Benchmark results\n");
    let _ = writeln!(
        md,
        "{} model pairs on one machine ({cpus} CPU cores), {wall_s:.0} s in all. Command: `{command}`\n",
        pairs.len()
    );
    if let Some(rates) = pairs
        .iter()
        .find_map(|(r, _)| r.calibration.as_ref().and_then(|c| c.rates))
    {
        let _ = writeln!(
            md,
            "Machine: memory bandwidth {:.1} GB/s, f32 FMA peak {:.1} GFLOP/s (measured by the cost model).\n",
            rates.bandwidth_bytes_per_s / 1e9,
            rates.compute_flops_per_s() / 1e9
        );
    }
    md.push_str("## Headline: `adaptive` decode speedup over target-only, same rounds\n\n");
    md.push_str(&headline(pairs));
    md.push('\n');
    for (report, hf) in pairs {
        let _ = writeln!(md, "## Pair `{}`\n", report.meta.pair);
        md.push_str(&markdown(report));
        md.push('\n');
        if let Some(hf) = hf {
            md.push_str(&hf_markdown(hf, report));
            md.push('\n');
        }
        if let Some(c) = &report.calibration {
            let _ = writeln!(
                md,
                "### Cost model of `{}` (in-process, this machine) vs roofline\n\n```text",
                report.meta.pair
            );
            md.push_str(&crate::calibrate::render(c));
            md.push_str("```\n\n");
        }
    }
    md.push_str(COLUMNS);
    md.push_str("\n## Plots\n\n");
    for (alt, file) in FIGURES {
        let _ = writeln!(md, "![{alt}]({})", plots_dir.join(file).display());
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::ServerStats;
    use crate::modes::Shape;

    fn result(tokens: usize, chunks: Vec<(u64, u32)>, steps: u32) -> RequestResult {
        RequestResult {
            tokens: vec![7; tokens],
            text: String::new(),
            total_ns: chunks.last().map_or(0, |c| c.0),
            chunks,
            stats: ServerStats {
                steps,
                acceptance_per_depth: vec![1.0, 0.5],
                verify_ns: 100,
                ..Default::default()
            },
        }
    }

    fn run(mode: Mode, repeat: usize, r: RequestResult) -> Run {
        Run {
            mode,
            sampling: Sampling::Greedy,
            concurrency: 1,
            repeat,
            wall_ns: r.total_ns,
            results: vec![(0, r)],
            target_batch_size: None,
        }
    }

    #[test]
    fn speedup_is_a_median_of_same_repeat_ratios() {
        let items = vec![EvalItem {
            id: "x".into(),
            domain: Domain::InDomain,
            image_path: "x.png".into(),
            image: vec![],
            prompt: "p".into(),
            seed: 1,
        }];
        // Baseline: 4 tokens one per step, 100 ns apart after the first.
        let base = [
            run(
                Mode::TARGET_ONLY,
                0,
                result(4, vec![(50, 1), (150, 1), (250, 1), (350, 1)], 4),
            ),
            run(
                Mode::TARGET_ONLY,
                1,
                result(4, vec![(50, 1), (250, 1), (450, 1), (650, 1)], 4),
            ),
        ];
        // Chain: same 4 tokens in two steps (1 + 3).
        let chain = [
            run(
                Mode::new(Shape::Chain { len: 3 }),
                0,
                result(4, vec![(50, 1), (150, 3)], 2),
            ),
            run(
                Mode::new(Shape::Chain { len: 3 }),
                1,
                result(4, vec![(50, 1), (250, 3)], 2),
            ),
        ];
        let b: Vec<&Run> = base.iter().collect();
        let c: Vec<&Run> = chain.iter().collect();
        let s = summarise(&c, &b, &items).unwrap();
        assert!((s.speedup - 3.0).abs() < 1e-9, "{}", s.speedup);
        assert_eq!(s.mean_accepted_length, 2.0);
        assert_eq!(s.mean_accepted_length_in_domain, Some(2.0));
        assert_eq!(s.mean_accepted_length_ood, None);
        assert_eq!(s.tokens_per_step_histogram, vec![0, 2, 0, 2]);
        assert_eq!(s.acceptance_per_depth, vec![1.0, 0.5]);
        let base_summary = summarise(&b, &b, &items).unwrap();
        assert_eq!(base_summary.speedup, 1.0);
    }
}
