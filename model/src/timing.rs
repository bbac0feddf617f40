//! Timing of batched tree forwards on the model's device: what verifying a tree (or
//! drafting one level) costs. The target service measures its verify cost table with it at
//! start-up (for the orchestrator's budget policy); the benchmark uses it for the cost model.

use std::time::Instant;

use crate::{KvCache, Llava, ModelError, TreeBatchItem};

/// Prompt rows on top of the image tokens in the prefix of a start-up calibration's
/// sessions ([`ForwardTimer::for_calibration`]).
pub const CALIBRATION_PROMPT_ROWS: usize = 32;

/// A forward [`ForwardTimer`] times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimedForward {
    /// A bushy 4-ary tree of `nodes` nodes (root included, like the draft's dynamic trees)
    /// on each of the first `batch` sessions, packed into one call: one batched Verify.
    Tree {
        /// Nodes per session.
        nodes: usize,
        /// Sessions.
        batch: usize,
    },
    /// `rows` sibling nodes on the first session: what expanding a frontier of `rows` nodes
    /// costs the draft model.
    Level {
        /// Rows fed.
        rows: usize,
    },
    /// A prefill of `rows` prompt rows (filler text, causal attention) into a fresh cache:
    /// what opening a session costs beyond its images.
    Prefill {
        /// Prompt rows.
        rows: usize,
    },
}

/// How [`sweep`] times its points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPlan {
    /// Timed rounds over all points (each point's median is kept).
    pub rounds: usize,
    /// Untimed runs of a point right before each timed one: a forward timed right after a
    /// much larger one runs with the weights out of cache (one node's verify measured 1.5x
    /// its steady cost after one untimed run, its steady cost after three).
    pub warm_ups: usize,
}

/// Times `points` points round-robin for `plan.rounds` rounds (`run_point(i)` runs point
/// `i` once; each timed run follows `plan.warm_ups` untimed ones) and returns each point's
/// median time, ns; `timed` is called after each timed run. Points compared with each other
/// (batch 4 against batch 1, 16 nodes against one) are measured side by side, so a drift of
/// the machine's speed during the sweep moves them together instead of skewing their ratios
/// (timed point after point, batch 4 read 1.4x to 2.0x batch 1 between runs of the same code).
pub fn sweep(
    points: usize,
    plan: SweepPlan,
    mut run_point: impl FnMut(usize) -> Result<(), ModelError>,
    mut timed: impl FnMut(),
) -> Result<Vec<f64>, ModelError> {
    let mut samples = vec![Vec::with_capacity(plan.rounds.max(1)); points];
    for _ in 0..plan.rounds.max(1) {
        for (i, point) in samples.iter_mut().enumerate() {
            for _ in 0..plan.warm_ups {
                run_point(i)?;
            }
            let start = Instant::now();
            run_point(i)?;
            point.push(start.elapsed().as_nanos() as f64);
            timed();
        }
    }
    Ok(samples.iter_mut().map(|s| median(s)).collect())
}

/// The median of a non-empty sample (sorted in place).
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    let mid = samples.len() / 2;
    if samples.len() % 2 == 1 {
        samples[mid]
    } else {
        (samples[mid - 1] + samples[mid]) / 2.0
    }
}

/// `len` (at least one) filler prompt ids: cycling below the vocabulary, never the image
/// token (a forward's cost depends on lengths, not tokens).
fn filler_ids(model: &Llava, len: usize) -> Vec<u32> {
    let cfg = model.config();
    let span = cfg.vocab_size.saturating_sub(3).max(1);
    (0..len.max(1))
        .map(|i| match 3 + (i * 7919 % span) as u32 {
            t if t == cfg.image_token_id => 3,
            t => t,
        })
        .collect()
}

/// Sessions with a committed filler prefix, ready for timed tree forwards. Trees are
/// forwarded and then discarded, so the prefix stays the same between measurements.
pub struct ForwardTimer<'m> {
    model: &'m Llava,
    sessions: Vec<KvCache>,
}

impl<'m> ForwardTimer<'m> {
    /// Prefills `sessions` KV caches with `prefix_len` filler tokens each (ids cycling below
    /// the vocabulary, never the image token; the cost depends on lengths, not tokens).
    pub fn new(model: &'m Llava, sessions: usize, prefix_len: usize) -> Result<Self, ModelError> {
        let ids = filler_ids(model, prefix_len);
        let sessions = (0..sessions.max(1))
            .map(|_| {
                let mut kv = model.new_kv();
                model.prefill(&mut kv, &ids, &[])?;
                Ok(kv)
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self { model, sessions })
    }

    /// The timer a service's start-up calibration uses: `sessions` sessions whose prefix is
    /// an image prompt (one tile's image tokens and [`CALIBRATION_PROMPT_ROWS`] more rows), and of
    /// `sizes` (rows a timed forward adds) those that fit the model's context after it.
    /// `None` when none fits.
    pub fn for_calibration(
        model: &'m Llava,
        sessions: usize,
        sizes: &[usize],
    ) -> Result<Option<(Self, Vec<usize>)>, ModelError> {
        let prefix_len = model.tile_tokens() + CALIBRATION_PROMPT_ROWS;
        let max_positions = model.config().text.max_position_embeddings;
        let fitting: Vec<usize> = sizes
            .iter()
            .copied()
            .filter(|n| prefix_len + n <= max_positions)
            .collect();
        if fitting.is_empty() {
            return Ok(None);
        }
        Ok(Some((Self::new(model, sessions, prefix_len)?, fitting)))
    }

    /// Times `forwards` round-robin (see [`sweep`]) and returns each one's median time, ns.
    /// `timed` is called after each timed forward.
    pub fn sweep(
        &mut self,
        forwards: &[TimedForward],
        plan: SweepPlan,
        timed: impl FnMut(),
    ) -> Result<Vec<f64>, ModelError> {
        sweep(
            forwards.len(),
            plan,
            |i| self.run_forward(forwards[i]),
            timed,
        )
    }

    /// One untimed forward (for external benchmark drivers such as criterion).
    pub fn run_forward(&mut self, forward: TimedForward) -> Result<(), ModelError> {
        match forward {
            TimedForward::Tree { nodes, batch } => {
                let (tokens, parents) = self.bushy_tree(nodes);
                self.run(&tokens, &parents, batch)
            }
            TimedForward::Level { rows } => {
                let (tokens, parents) = Self::level(rows);
                self.run(&tokens, &parents, 1)
            }
            TimedForward::Prefill { rows } => {
                let ids = filler_ids(self.model, rows);
                let mut kv = self.model.new_kv();
                let logits = self.model.prefill(&mut kv, &ids, &[])?;
                self.model.device().synchronize()?;
                drop(logits);
                Ok(())
            }
        }
    }

    fn bushy_tree(&self, nodes: usize) -> (Vec<u32>, Vec<i32>) {
        let vocab = self.model.config().vocab_size.saturating_sub(3).max(1);
        let tokens: Vec<u32> = (0..nodes.max(1))
            .map(|i| 3 + (i * 31 % vocab) as u32)
            .collect();
        let parents: Vec<i32> = (0..tokens.len())
            .map(|i| if i == 0 { -1 } else { ((i - 1) / 4) as i32 })
            .collect();
        (tokens, parents)
    }

    fn level(rows: usize) -> (Vec<u32>, Vec<i32>) {
        let tokens: Vec<u32> = (0..rows.max(1)).map(|i| 3 + i as u32 % 64).collect();
        let parents = vec![-1; tokens.len()];
        (tokens, parents)
    }

    /// One forward of the tree on the first `batch` sessions, discarded afterwards.
    fn run(&mut self, tokens: &[u32], parents: &[i32], batch: usize) -> Result<(), ModelError> {
        let batch = batch.clamp(1, self.sessions.len());
        let mut items: Vec<TreeBatchItem<'_>> = self.sessions[..batch]
            .iter_mut()
            .map(|kv| TreeBatchItem {
                kv,
                tokens,
                parents,
            })
            .collect();
        let logits = self.model.forward_batch(&mut items)?;
        self.model.device().synchronize()?;
        drop(logits);
        drop(items);
        for kv in &mut self.sessions[..batch] {
            kv.discard_pending();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_times_points_round_robin_after_warm_ups_and_keeps_medians() {
        let mut runs = Vec::new();
        let mut timed = 0;
        let plan = SweepPlan {
            rounds: 3,
            warm_ups: 2,
        };
        let medians = sweep(
            2,
            plan,
            |i| {
                runs.push(i);
                // Point 1's runs take longer than point 0's.
                std::thread::sleep(std::time::Duration::from_micros(200 * (1 + 20 * i as u64)));
                Ok(())
            },
            || timed += 1,
        )
        .unwrap();
        let round = [0, 0, 0, 1, 1, 1];
        assert_eq!(runs, [round, round, round].concat());
        assert_eq!(timed, 6);
        assert!(medians[0] >= 200e3 && medians[1] >= 4_200e3 && medians[1] > medians[0]);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
