//! Building the draft tree: EAGLE-2 / Spec-LLaVA dynamic expansion, plus static and chain modes.
//!
//! Dynamic mode (EAGLE-2, arXiv 2406.16858; Spec-LLaVA, arXiv 2509.11961): level 1 expands the
//! root into its top-K draft children; every later level takes the top-K nodes of the previous
//! level by cumulative log-probability and expands each into its top-K children; at the end every
//! drafted node is reranked by cumulative score and the best M are kept. Log-probabilities are
//! `<= 0`, so a node never outranks its parent (ties go to the lower id, and parents come first):
//! the kept set is ancestor-closed.
//!
//! [`TreeBuilder`] is the state machine (one expansion request per level) so a service can batch
//! the levels of many sessions in one forward pass; [`build_tree`] drives it with a [`Drafter`].

use std::cmp::Ordering;

use thiserror::Error;

use crate::tree::TokenTree;

/// Shape of the draft tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeMode {
    /// EAGLE-2: expand the top-`branching` frontier nodes by cumulative score, rerank, keep `budget`.
    Dynamic,
    /// Fixed shape: every node gets `branching` children, level by level, truncated to `budget`
    /// nodes in breadth-first order (draft confidence is not used to shape the tree).
    Static,
    /// A single path of `depth` tokens (branching 1).
    Chain,
}

/// Parameters of one drafting step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftParams {
    /// Tree shape.
    pub mode: TreeMode,
    /// D: number of draft levels (maximum tree depth). 0 drafts nothing.
    pub depth: usize,
    /// K: children per expanded node and (dynamic) frontier nodes expanded per level.
    pub branching: usize,
    /// M: drafted nodes kept, root excluded (the tree has at most `budget + 1` nodes).
    pub budget: usize,
}

impl DraftParams {
    /// EAGLE-2 dynamic tree with depth D, branching K and budget M.
    pub fn dynamic(depth: usize, branching: usize, budget: usize) -> Self {
        Self {
            mode: TreeMode::Dynamic,
            depth,
            branching,
            budget,
        }
    }

    /// Static breadth-first tree with `branching` children per node, truncated to `budget`.
    pub fn static_tree(depth: usize, branching: usize, budget: usize) -> Self {
        Self {
            mode: TreeMode::Static,
            depth,
            branching,
            budget,
        }
    }

    /// A chain of `depth` draft tokens.
    pub fn chain(depth: usize) -> Self {
        Self {
            mode: TreeMode::Chain,
            depth,
            branching: 1,
            budget: depth,
        }
    }

    /// No drafting: the step verifies the root alone (target-only decoding).
    pub fn none() -> Self {
        Self::chain(0)
    }
}

/// The growing tree a [`Drafter`] sees. Ids are stable: node `i` keeps its id as nodes are added,
/// parents come before children, and the root is id 0.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PartialTree {
    /// Token of every node.
    pub tokens: Vec<u32>,
    /// Parent of every node (`-1` for the root).
    pub parents: Vec<i32>,
    /// Cumulative draft log-probability of every node (root 0).
    pub scores: Vec<f32>,
    /// Depth of every node (root 0): the position offset from the root.
    pub depths: Vec<u32>,
}

impl PartialTree {
    fn with_root(token: u32) -> Self {
        Self {
            tokens: vec![token],
            parents: vec![-1],
            scores: vec![0.0],
            depths: vec![0],
        }
    }

    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: the root is always there.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Depth of node `i` (root 0).
    pub fn depth(&self, i: usize) -> usize {
        self.depths[i] as usize
    }

    /// Node ids from the root to `i`, both included.
    pub fn path_to(&self, i: usize) -> Vec<usize> {
        crate::tree::path_to(&self.parents, i, self.depth(i))
    }

    /// Whether `a` is `b` or an ancestor of `b`.
    pub fn is_ancestor(&self, a: usize, b: usize) -> bool {
        let mut node = b as i32;
        while node >= a as i32 {
            if node as usize == a {
                return true;
            }
            node = self.parents[node as usize];
        }
        false
    }

    fn push(&mut self, token: u32, parent: usize, score: f32) -> usize {
        let depth = self.depths[parent] + 1;
        self.tokens.push(token);
        self.parents.push(parent as i32);
        self.scores.push(score);
        self.depths.push(depth);
        self.tokens.len() - 1
    }

    /// Rank order: higher cumulative score first, lower id on ties.
    fn rank(&self, a: usize, b: usize) -> Ordering {
        self.scores[b]
            .total_cmp(&self.scores[a])
            .then_with(|| a.cmp(&b))
    }
}

/// Proposes draft children, one call per tree level.
pub trait Drafter {
    /// Error of the underlying draft model.
    type Error;

    /// For each node in `expand` (ids of nodes of `partial`), return up to `k` children
    /// `(token, log_prob)` sorted by log_prob descending. `partial` holds every node created so
    /// far (root = id 0, parents before children). One call per tree level, so an implementation
    /// can run one batched forward pass per level. Every ancestor of an `expand` node was itself
    /// in an earlier `expand` list.
    fn expand(
        &mut self,
        partial: &PartialTree,
        expand: &[usize],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>, Self::Error>;
}

/// The drafted tree and how it maps back to the drafter's view.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftOutcome {
    /// The kept tree (root plus at most `budget` nodes), in topological order.
    pub tree: TokenTree,
    /// For each node of `tree`, its id in the [`PartialTree`] the drafter saw.
    pub drafted_ids: Vec<usize>,
    /// Number of expansion calls (draft forward passes) made.
    pub levels: usize,
    /// Number of nodes drafted before pruning, root excluded.
    pub drafted_nodes: usize,
}

/// Misuse of the [`TreeBuilder`] protocol.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BuildError {
    /// `add_children` without an outstanding `next_expansion`.
    #[error("add_children called with no expansion pending")]
    NoPendingExpansion,
    /// Children lists do not match the expanded nodes one to one.
    #[error("expected children for {expected} nodes, got {got} lists")]
    WrongCount {
        /// Number of nodes in the pending expansion.
        expected: usize,
        /// Number of lists received.
        got: usize,
    },
}

/// State machine that builds one draft tree, level by level.
///
/// Loop: [`next_expansion`](Self::next_expansion) gives the nodes to expand and `k`; run the draft
/// model (possibly batched with other sessions); hand the results to
/// [`add_children`](Self::add_children); when `next_expansion` returns `None`, call
/// [`finish`](Self::finish). `finish` may also be called early (e.g. on a deadline).
#[derive(Debug, Clone)]
pub struct TreeBuilder {
    params: DraftParams,
    partial: PartialTree,
    /// Nodes created by the last level, in creation order.
    frontier: Vec<usize>,
    pending: Option<Vec<usize>>,
    levels: usize,
    done: bool,
}

impl TreeBuilder {
    /// Starts a tree whose root is `root_token`.
    pub fn new(root_token: u32, params: &DraftParams) -> Self {
        let mut params = *params;
        if params.mode == TreeMode::Chain {
            params.branching = 1;
            params.budget = params.budget.min(params.depth);
        }
        let done = params.depth == 0 || params.branching == 0 || params.budget == 0;
        Self {
            params,
            partial: PartialTree::with_root(root_token),
            frontier: vec![0],
            pending: None,
            levels: 0,
            done,
        }
    }

    /// The nodes created so far.
    pub fn partial(&self) -> &PartialTree {
        &self.partial
    }

    /// The parameters in effect (chain mode forces branching 1 and budget <= depth).
    pub fn params(&self) -> &DraftParams {
        &self.params
    }

    /// Whether no further expansion will be requested.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The nodes to expand next and how many children each may get, or `None` when the tree is
    /// complete. Calling it again before [`add_children`](Self::add_children) returns the same
    /// request.
    pub fn next_expansion(&mut self) -> Option<(Vec<usize>, usize)> {
        if let Some(p) = &self.pending {
            return Some((p.clone(), self.params.branching));
        }
        if self.done || self.levels >= self.params.depth {
            self.done = true;
            return None;
        }
        let k = self.params.branching;
        let drafted = self.partial.len() - 1;
        let expand: Vec<usize> = match self.params.mode {
            TreeMode::Chain => self.frontier.clone(),
            TreeMode::Static => {
                let remaining = self.params.budget.saturating_sub(drafted);
                let n = remaining.div_ceil(k).min(self.frontier.len());
                self.frontier[..n].to_vec()
            }
            TreeMode::Dynamic => {
                let mut f = self.frontier.clone();
                let p = &self.partial;
                if f.len() > k {
                    f.select_nth_unstable_by(k - 1, |&a, &b| p.rank(a, b));
                    f.truncate(k);
                }
                f.sort_unstable_by(|&a, &b| p.rank(a, b));
                // Early stop: when the best frontier node is no better than the M-th best node
                // drafted so far, no descendant can enter the kept set (it would rank after its
                // ancestor), so further levels cannot change the result.
                if let (Some(&best), Some(mth)) = (f.first(), self.mth_best())
                    && p.rank(best, mth) != Ordering::Less
                {
                    f.clear();
                }
                f
            }
        };
        if expand.is_empty() || drafted >= self.budget_cap() {
            self.done = true;
            return None;
        }
        self.pending = Some(expand.clone());
        Some((expand, k))
    }

    /// Adds the drafter's children for the pending expansion: one list per expanded node, each up
    /// to `k` `(token, log_prob)` pairs. Lists are re-sorted by log-prob (stable), duplicate
    /// tokens under one node dropped, NaN log-probs treated as -inf and positive ones as 0.
    pub fn add_children(&mut self, children: Vec<Vec<(u32, f32)>>) -> Result<(), BuildError> {
        let expected = self
            .pending
            .as_ref()
            .ok_or(BuildError::NoPendingExpansion)?
            .len();
        if children.len() != expected {
            return Err(BuildError::WrongCount {
                expected,
                got: children.len(),
            });
        }
        self.apply_children(children);
        Ok(())
    }

    /// Applies children for the pending expansion; extra lists are ignored, missing ones mean
    /// "no children".
    fn apply_children(&mut self, children: Vec<Vec<(u32, f32)>>) {
        let Some(expand) = self.pending.take() else {
            return;
        };
        let k = self.params.branching;
        let cap = self.budget_cap();
        self.frontier.clear();
        let mut list: Vec<(u32, f32)> = Vec::with_capacity(k);
        'outer: for (&node, mut kids) in expand.iter().zip(children) {
            for kid in &mut kids {
                kid.1 = if kid.1.is_nan() {
                    f32::NEG_INFINITY
                } else if kid.1 >= 0.0 {
                    0.0
                } else {
                    kid.1
                };
            }
            kids.sort_by(|a, b| b.1.total_cmp(&a.1));
            list.clear();
            for (token, lp) in kids {
                if list.len() == k {
                    break;
                }
                if list.iter().all(|&(t, _)| t != token) {
                    list.push((token, lp));
                }
            }
            let base = self.partial.scores[node];
            for &(token, lp) in &list {
                if self.partial.len() > cap {
                    break 'outer;
                }
                let id = self.partial.push(token, node, base + lp);
                self.frontier.push(id);
            }
        }
        self.levels += 1;
    }

    /// Most nodes this mode may draft: the budget for static and chain, unbounded for dynamic
    /// (which reranks at the end).
    fn budget_cap(&self) -> usize {
        match self.params.mode {
            TreeMode::Dynamic => usize::MAX,
            TreeMode::Static | TreeMode::Chain => self.params.budget,
        }
    }

    /// The M-th best drafted node (root excluded), if at least M were drafted.
    fn mth_best(&self) -> Option<usize> {
        let m = self.params.budget;
        let n = self.partial.len();
        if m == 0 || n - 1 < m {
            return None;
        }
        let mut ids: Vec<usize> = (1..n).collect();
        let p = &self.partial;
        ids.select_nth_unstable_by(m - 1, |&a, &b| p.rank(a, b));
        Some(ids[m - 1])
    }

    /// Reranks (dynamic mode), keeps the best `budget` nodes and lays them out as a tree.
    pub fn finish(self) -> DraftOutcome {
        let n = self.partial.len();
        let m = self.params.budget;
        let mut kept: Vec<usize> = (1..n).collect();
        if kept.len() > m {
            let p = &self.partial;
            kept.select_nth_unstable_by(m - 1, |&a, &b| p.rank(a, b));
            kept.truncate(m);
        }
        kept.push(0);
        kept.sort_unstable();
        let mut new_id = vec![u32::MAX; n];
        for (i, &old) in kept.iter().enumerate() {
            new_id[old] = i as u32;
        }
        let p = &self.partial;
        let tokens = kept.iter().map(|&o| p.tokens[o]).collect();
        let scores = kept.iter().map(|&o| p.scores[o]).collect();
        let parents = kept
            .iter()
            .map(|&o| match p.parents[o] {
                -1 => -1,
                par => {
                    let id = new_id[par as usize];
                    debug_assert!(id != u32::MAX, "kept set is not ancestor-closed");
                    id as i32
                }
            })
            .collect();
        DraftOutcome {
            tree: TokenTree::from_valid_parts(tokens, parents, scores),
            drafted_ids: kept,
            levels: self.levels,
            drafted_nodes: n - 1,
        }
    }
}

/// Builds a draft tree for `root_token` with `params`, calling `drafter` once per level.
///
/// A drafter that returns fewer lists than nodes leaves the rest childless; extra lists are
/// ignored.
pub fn build_tree<D: Drafter>(
    root_token: u32,
    params: &DraftParams,
    drafter: &mut D,
) -> Result<DraftOutcome, D::Error> {
    let mut builder = TreeBuilder::new(root_token, params);
    while let Some((nodes, k)) = builder.next_expansion() {
        let children = drafter.expand(builder.partial(), &nodes, k)?;
        builder.apply_children(children);
    }
    Ok(builder.finish())
}
