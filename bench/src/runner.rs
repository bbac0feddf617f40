//! The schedule: for each sampling setting and concurrency, `repeats` rounds in which every mode
//! makes one pass over the evaluation set, the order rotating from round to round (A B C, B C A,
//! C A B, ...: no mode always runs first, right after a block's start or another's caches);
//! target-only opens the first round, so every later output is checked against its output.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;
use specllava_proto::v1::generation_client::GenerationClient;

use crate::check::{EqualityCheck, RunLabel};
use crate::driver::{ApiChannel, DriverError, RequestResult, generate};
use crate::evalset::EvalItem;
use crate::metrics::{BATCH_SIZE_METRIC, histogram_sum_count, mean_between, scrape};
use crate::modes::{Mode, Sampling};
use crate::report::Run;

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Modes at concurrency 1 (target-only is added first if missing).
    pub modes: Vec<Mode>,
    /// Modes at concurrency > 1 (target-only is added first if missing).
    pub concurrent_modes: Vec<Mode>,
    /// Sampling settings.
    pub samplings: Vec<Sampling>,
    /// Concurrent sessions per pass.
    pub concurrency: Vec<usize>,
    /// Sampling settings measured at concurrency > 1.
    pub concurrent_samplings: Vec<Sampling>,
    /// Rounds per (sampling, concurrency).
    pub repeats: usize,
    /// Tokens per request.
    pub max_new_tokens: u32,
}

fn with_baseline(modes: &[Mode]) -> Vec<Mode> {
    let mut v = vec![Mode::TARGET_ONLY];
    v.extend(modes.iter().copied().filter(|m| !m.is_baseline()));
    v
}

impl Plan {
    /// The (sampling, concurrency, modes) blocks in execution order.
    pub fn blocks(&self) -> Vec<(Sampling, usize, Vec<Mode>)> {
        let mut out = Vec::new();
        for &c in &self.concurrency {
            for &s in &self.samplings {
                if c > 1 && !self.concurrent_samplings.contains(&s) {
                    continue;
                }
                let modes = if c <= 1 {
                    with_baseline(&self.modes)
                } else {
                    with_baseline(&self.concurrent_modes)
                };
                out.push((s, c, modes));
            }
        }
        out
    }

    /// Requests in one pass at concurrency `c` over `n` items (at least `c`, so `c` sessions are
    /// in flight).
    pub fn pass_len(n: usize, c: usize) -> usize {
        n.max(c)
    }

    /// The order of `modes` in round `round`: rotated left by `round`.
    pub fn round_order(modes: &[Mode], round: usize) -> Vec<Mode> {
        let mut order = modes.to_vec();
        if !order.is_empty() {
            let k = round % order.len();
            order.rotate_left(k);
        }
        order
    }

    /// Total requests of the plan, for the progress bar.
    pub fn total_requests(&self, n: usize) -> usize {
        self.blocks()
            .iter()
            .map(|(_, c, modes)| self.repeats * modes.len() * Self::pass_len(n, *c))
            .sum()
    }
}

/// Everything measured.
pub struct Outcome {
    /// Every timed pass.
    pub runs: Vec<Run>,
    /// The losslessness check.
    pub check: EqualityCheck,
}

/// One pass: `max(n, c)` requests (items cycled), `c` in flight.
async fn pass(
    channel: &ApiChannel,
    items: &Arc<Vec<EvalItem>>,
    mode: Mode,
    sampling: Sampling,
    concurrency: usize,
    max_new_tokens: u32,
    progress: &ProgressBar,
) -> Result<(u64, Vec<(usize, RequestResult)>), DriverError> {
    let total = Plan::pass_len(items.len(), concurrency);
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, results, items) = (next.clone(), results.clone(), items.clone());
        let mut client = GenerationClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), DriverError>(());
                }
                let idx = i % items.len();
                let r = generate(&mut client, &items[idx], mode, sampling, max_new_tokens).await?;
                results.lock().expect("results lock").push((idx, r));
                progress.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await.expect("request task panicked")?;
    }
    let wall = start.elapsed().as_nanos() as u64;
    let mut results = std::mem::take(&mut *results.lock().expect("results lock"));
    results.sort_by_key(|r| r.0);
    Ok((wall, results))
}

async fn batch_metric(addr: Option<&str>) -> Option<(f64, f64)> {
    let text = scrape(addr?, "/metrics").await.ok()?;
    histogram_sum_count(&text, BATCH_SIZE_METRIC)
}

/// Runs the plan. Mismatches are recorded (and printed above the progress bar as they happen);
/// the caller decides how to fail. `target_metrics` is the target's Prometheus `host:port`.
pub async fn run(
    channel: ApiChannel,
    items: Vec<EvalItem>,
    plan: &Plan,
    target_metrics: Option<&str>,
    progress: &ProgressBar,
) -> Result<Outcome, DriverError> {
    let items = Arc::new(items);
    let mut check = EqualityCheck::new();
    let mut runs = Vec::new();
    let mut printed = 0;
    // Warm-up (not timed): one request per mode, so lazy initialisation is not measured.
    let all_modes = with_baseline(&[plan.modes.clone(), plan.concurrent_modes.clone()].concat());
    let warm = Arc::new(vec![items[0].clone()]);
    for &m in &all_modes {
        pass(
            &channel,
            &warm,
            m,
            Sampling::Greedy,
            1,
            plan.max_new_tokens,
            &ProgressBar::hidden(),
        )
        .await?;
    }
    for (sampling, concurrency, modes) in plan.blocks() {
        for repeat in 0..plan.repeats {
            for mode in Plan::round_order(&modes, repeat) {
                progress.set_message(format!(
                    "{sampling} x{concurrency} {mode} (round {})",
                    repeat + 1
                ));
                let before = batch_metric(target_metrics).await;
                let (wall_ns, results) = pass(
                    &channel,
                    &items,
                    mode,
                    sampling,
                    concurrency,
                    plan.max_new_tokens,
                    progress,
                )
                .await?;
                let after = batch_metric(target_metrics).await;
                let (mode_s, sampling_s) = (mode.to_string(), sampling.to_string());
                for (idx, r) in &results {
                    let label = RunLabel {
                        mode: &mode_s,
                        sampling: &sampling_s,
                        concurrency,
                        repeat,
                    };
                    let id = &items[*idx].id;
                    if mode.is_baseline() {
                        check.record_reference(id, &r.tokens, label);
                    } else {
                        check.check(id, &r.tokens, label);
                    }
                }
                for m in &check.mismatches()[printed..] {
                    progress.println(format!(
                        "!!! OUTPUT MISMATCH: {} [{}] {} x{} round {}: differs from target-only at token {}",
                        m.item,
                        m.mode,
                        m.sampling,
                        m.concurrency,
                        m.repeat + 1,
                        m.first_difference
                    ));
                }
                runs.push(Run {
                    mode,
                    sampling,
                    concurrency,
                    repeat,
                    wall_ns,
                    results,
                    target_batch_size: mean_between(before, after),
                });
                printed = check.mismatches().len();
            }
        }
    }
    Ok(Outcome { runs, check })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modes::Shape;

    #[test]
    fn blocks_put_target_only_first_and_limit_concurrent_runs() {
        let plan = Plan {
            modes: vec![
                Mode::new(Shape::Chain { len: 2 }),
                Mode::new(Shape::Adaptive),
            ],
            concurrent_modes: vec![Mode::new(Shape::Adaptive), Mode::TARGET_ONLY],
            samplings: vec![Sampling::Greedy, Sampling::Seeded { temperature: 0.7 }],
            concurrency: vec![1, 4],
            concurrent_samplings: vec![Sampling::Greedy],
            repeats: 3,
            max_new_tokens: 8,
        };
        let b = plan.blocks();
        assert_eq!(b.len(), 3);
        assert_eq!(
            b[0].2,
            vec![
                Mode::TARGET_ONLY,
                Mode::new(Shape::Chain { len: 2 }),
                Mode::new(Shape::Adaptive)
            ]
        );
        assert_eq!((b[2].0, b[2].1), (Sampling::Greedy, 4));
        assert_eq!(b[2].2, vec![Mode::TARGET_ONLY, Mode::new(Shape::Adaptive)]);
        // 10 items: 2 blocks x 3 rounds x 3 modes x 10 + 3 rounds x 2 modes x 10.
        assert_eq!(plan.total_requests(10), 180 + 60);
        assert_eq!(Plan::pass_len(3, 16), 16);
        let order = |r| Plan::round_order(&b[0].2, r);
        assert_eq!(order(0)[0], Mode::TARGET_ONLY);
        assert_eq!(order(1)[2], Mode::TARGET_ONLY);
        assert_eq!(order(2)[1], Mode::TARGET_ONLY);
        assert_eq!(order(3), order(0));
    }
}
