//! One tree being drafted for one session, level by level: the tree builder, the chain fed at
//! its first level and the pending KV row of every forwarded node. Requests and spare-time
//! pre-drafts ([`crate::ahead`]) both draft through it, so the batched forward of a level
//! serves both alike.

use speculate::{DraftOutcome, DraftParams, TreeBuilder};

use crate::error::DraftError;
use crate::topk::top_k_log_probs;

/// A tree in progress (see the module docs).
#[derive(Debug, Clone)]
pub struct DraftRun {
    builder: TreeBuilder,
    /// Uncomputed history forwarded at the first level; its last token is the root.
    feed: Vec<u32>,
    /// Pending row the feed hangs below (`None`: the committed prefix).
    attach: Option<usize>,
    /// Pending KV row of every partial-tree node that was forwarded.
    rows: Vec<Option<usize>>,
    forwarded: bool,
    levels: u32,
    /// The level being forwarded: nodes expanded and children per node.
    expansion: Option<(Vec<usize>, usize)>,
}

/// One level's model input: tokens and their parents (pending row indices, `-1`: the
/// committed prefix).
pub type LevelInput = (Vec<u32>, Vec<i32>);

impl DraftRun {
    /// A run whose first level forwards `feed` (not empty; its last token is the root) below
    /// the pending row `attach`, or after the committed rows when `None`.
    pub fn new(feed: Vec<u32>, attach: Option<usize>, params: &DraftParams) -> Self {
        let root = *feed.last().expect("the feed ends with the root");
        Self {
            builder: TreeBuilder::new(root, params),
            feed,
            attach,
            rows: Vec::new(),
            forwarded: false,
            levels: 0,
            expansion: None,
        }
    }

    /// The parameters in effect.
    pub fn params(&self) -> &DraftParams {
        self.builder.params()
    }

    /// The chain fed at the first level (ends with the root).
    pub fn feed(&self) -> &[u32] {
        &self.feed
    }

    /// Levels forwarded so far.
    pub fn levels(&self) -> u32 {
        self.levels
    }

    /// Whether the tree is complete (no level left to forward).
    pub fn is_done(&mut self) -> bool {
        self.expansion.is_none() && self.builder.next_expansion().is_none()
    }

    /// The next level's input, its rows starting at pending row `first_row`; `None` when the
    /// tree is complete.
    pub fn next_level(&mut self, first_row: usize) -> Result<Option<LevelInput>, DraftError> {
        let Some((expand, k)) = self.builder.next_expansion() else {
            return Ok(None);
        };
        let input = if !self.forwarded {
            let n = self.feed.len();
            let attach = self.attach.map_or(-1, |r| r as i32);
            let parents = (0..n)
                .map(|i| {
                    if i == 0 {
                        attach
                    } else {
                        (first_row + i - 1) as i32
                    }
                })
                .collect();
            self.rows = vec![Some(first_row + n - 1)];
            (self.feed.clone(), parents)
        } else {
            let partial = self.builder.partial();
            let tokens: Vec<u32> = expand.iter().map(|&e| partial.tokens[e]).collect();
            let parents = expand
                .iter()
                .map(|&e| {
                    let p = partial.parents[e] as usize;
                    self.rows
                        .get(p)
                        .copied()
                        .flatten()
                        .map(|r| r as i32)
                        .ok_or_else(|| {
                            DraftError::BatchFailed(format!(
                                "node {e}: parent {p} was never forwarded"
                            ))
                        })
                })
                .collect::<Result<Vec<i32>, _>>()?;
            if self.rows.len() < partial.len() {
                self.rows.resize(partial.len(), None);
            }
            for (i, &e) in expand.iter().enumerate() {
                self.rows[e] = Some(first_row + i);
            }
            (tokens, parents)
        };
        self.expansion = Some((expand, k));
        Ok(Some(input))
    }

    /// Hands the builder the children read from the level's logits (one row per input token).
    pub fn take_logits(&mut self, rows: &[Vec<f32>]) -> Result<(), DraftError> {
        let (expand, k) = self
            .expansion
            .take()
            .ok_or_else(|| DraftError::BatchFailed("no level in flight".into()))?;
        let children: Vec<Vec<(u32, f32)>> = if !self.forwarded {
            let last = rows
                .last()
                .ok_or_else(|| DraftError::BatchFailed("no logits for the feed".into()))?;
            vec![top_k_log_probs(last, k)]
        } else {
            if rows.len() != expand.len() {
                return Err(DraftError::BatchFailed(format!(
                    "{} logits rows for {} expanded nodes",
                    rows.len(),
                    expand.len()
                )));
            }
            rows.iter().map(|r| top_k_log_probs(r, k)).collect()
        };
        self.forwarded = true;
        self.levels += 1;
        self.builder
            .add_children(children)
            .map_err(|e| DraftError::BatchFailed(format!("tree builder: {e}")))
    }

    /// Forwarded rows in increasing order (what survives a commit that keeps this tree).
    pub fn forwarded_rows(&self) -> Vec<usize> {
        let mut rows: Vec<usize> = self.rows.iter().flatten().copied().collect();
        rows.sort_unstable();
        rows
    }

    /// Renames the pending rows after a commit moved them (`map` gives the new index) and
    /// attaches the feed to the committed prefix.
    pub fn remap_rows(&mut self, map: impl Fn(usize) -> usize) {
        for r in self.rows.iter_mut().flatten() {
            *r = map(*r);
        }
        self.attach = None;
    }

    /// Ranks and prunes the tree; returns it with the pending row of each kept node.
    pub fn finish(self) -> (DraftOutcome, Vec<Option<usize>>) {
        let outcome = self.builder.finish();
        let rows = outcome
            .drafted_ids
            .iter()
            .map(|&id| self.rows.get(id).copied().flatten())
            .collect();
        (outcome, rows)
    }

    /// Whether any level was forwarded (a tree with rows to reuse).
    pub fn forwarded(&self) -> bool {
        self.forwarded
    }
}
