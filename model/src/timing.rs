//! Timing of batched tree forwards on the model's device: what verifying a tree (or
//! drafting one level) costs. The target service measures its verify cost table with it at
//! start-up (for the orchestrator's budget policy); the benchmark uses it for the cost model.

use std::time::Instant;

use crate::{KvCache, Llava, ModelError, TreeBatchItem};

/// Prompt rows on top of the image tokens in the prefix of a start-up calibration's
/// sessions ([`ForwardTimer::for_calibration`]).
pub const CALIBRATION_PROMPT_ROWS: usize = 32;

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
        let cfg = model.config();
        let span = cfg.vocab_size.saturating_sub(3).max(1);
        let ids: Vec<u32> = (0..prefix_len.max(1))
            .map(|i| match 3 + (i * 7919 % span) as u32 {
                t if t == cfg.image_token_id => 3,
                t => t,
            })
            .collect();
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
    /// an image prompt (the image tokens and [`CALIBRATION_PROMPT_ROWS`] more rows), and of
    /// `sizes` (rows a timed forward adds) those that fit the model's context after it.
    /// `None` when none fits.
    pub fn for_calibration(
        model: &'m Llava,
        sessions: usize,
        sizes: &[usize],
    ) -> Result<Option<(Self, Vec<usize>)>, ModelError> {
        let prefix_len = model.num_image_tokens() + CALIBRATION_PROMPT_ROWS;
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

    /// Median time (ns) of one forward of a bushy 4-ary tree of `nodes` nodes (root
    /// included, like the draft's dynamic trees) on each of the first `batch` sessions,
    /// packed into one call: the cost of one batched Verify. One untimed warm-up, then
    /// `reps` timed runs.
    pub fn time_tree(
        &mut self,
        nodes: usize,
        batch: usize,
        reps: usize,
    ) -> Result<f64, ModelError> {
        let (tokens, parents) = self.bushy_tree(nodes);
        self.time(&tokens, &parents, batch, reps)
    }

    /// Median time (ns) of one forward of `rows` sibling nodes on the first session: what
    /// expanding a frontier of `rows` nodes costs the draft model.
    pub fn time_level(&mut self, rows: usize, reps: usize) -> Result<f64, ModelError> {
        let (tokens, parents) = Self::level(rows);
        self.time(&tokens, &parents, 1, reps)
    }

    /// One untimed forward of the tree [`ForwardTimer::time_tree`] times (for external
    /// benchmark drivers such as criterion).
    pub fn run_tree(&mut self, nodes: usize, batch: usize) -> Result<(), ModelError> {
        let (tokens, parents) = self.bushy_tree(nodes);
        self.run(&tokens, &parents, batch)
    }

    /// One untimed forward of the level [`ForwardTimer::time_level`] times.
    pub fn run_level(&mut self, rows: usize) -> Result<(), ModelError> {
        let (tokens, parents) = Self::level(rows);
        self.run(&tokens, &parents, 1)
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

    fn time(
        &mut self,
        tokens: &[u32],
        parents: &[i32],
        batch: usize,
        reps: usize,
    ) -> Result<f64, ModelError> {
        let mut samples = Vec::with_capacity(reps.max(1));
        for rep in 0..=reps.max(1) {
            let start = Instant::now();
            self.run(tokens, parents, batch)?;
            let ns = start.elapsed().as_nanos() as f64;
            if rep > 0 {
                samples.push(ns);
            }
        }
        samples.sort_by(f64::total_cmp);
        let mid = samples.len() / 2;
        Ok(if samples.len() % 2 == 1 {
            samples[mid]
        } else {
            (samples[mid - 1] + samples[mid]) / 2.0
        })
    }
}
