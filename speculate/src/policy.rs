//! Budget policy: pick (D, K, M) for the next step to maximise expected emitted tokens per second.
//!
//! Costs come from a [`CostModel`]: draft time per level and per drafted row, and verify time as a
//! function of (tree nodes, batch size) from a calibration table with piecewise-linear
//! interpolation; the target service measures that table at start-up (reported by `Info`), draft
//! costs start from a prior, and both are refined online (EMA).
//!
//! Acceptance comes from [`AcceptanceStats`]: for every depth `d` and sibling rank `j`, an EMA of
//! the probability that the target's token at a depth-`d - 1` node on the accepted path is that
//! node's `j`-th best draft child. Under that model the expected number of accepted tokens of a
//! tree is the sum over its nodes of the product of these rates along the node's path, and the
//! best M-node dynamic tree is found best-first (values fall along paths), at most K expanded
//! nodes per level as in EAGLE-2.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use thiserror::Error;

use crate::draft::{DraftParams, TreeMode};
use crate::tree::TokenTree;
use crate::verify::VerifyOutcome;

/// Invalid calibration data.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum CostError {
    /// No calibration point on an axis.
    #[error("verify cost table needs at least one {0} value")]
    EmptyAxis(&'static str),
    /// Axis values not strictly increasing.
    #[error("verify cost table {0} values must be strictly increasing")]
    Unsorted(&'static str),
    /// Wrong number of measurements.
    #[error("verify cost table needs {expected} measurements (batches x nodes), got {got}")]
    WrongSize {
        /// `batches.len() * nodes.len()`.
        expected: usize,
        /// Values given.
        got: usize,
    },
    /// A negative or non-finite cost.
    #[error("cost must be finite and >= 0, got {0}")]
    BadCost(f64),
}

/// Verify time in ns as a function of (nodes per session, batch size): a calibration grid with
/// bilinear interpolation, linear extrapolation past the last points (never below 0).
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyCostTable {
    nodes: Vec<f64>,
    batches: Vec<f64>,
    /// Row-major `[batch][nodes]`.
    ns: Vec<f64>,
}

/// Interpolation position on one axis: lower index and weight of the upper point.
fn locate(axis: &[f64], x: f64) -> (usize, f64) {
    if axis.len() == 1 {
        return (0, 0.0);
    }
    let hi = axis.partition_point(|&a| a < x).clamp(1, axis.len() - 1);
    let lo = hi - 1;
    (lo, (x - axis[lo]) / (axis[hi] - axis[lo]))
}

impl VerifyCostTable {
    /// A table from measurements: `ns[b * nodes.len() + n]` is the verify time for a batch of
    /// `batches[b]` sessions each verifying `nodes[n]` nodes. Axes strictly increasing.
    pub fn new(nodes: Vec<usize>, batches: Vec<usize>, ns: Vec<f64>) -> Result<Self, CostError> {
        for (name, axis) in [("nodes", &nodes), ("batch", &batches)] {
            if axis.is_empty() {
                return Err(CostError::EmptyAxis(name));
            }
            if axis.windows(2).any(|w| w[0] >= w[1]) {
                return Err(CostError::Unsorted(name));
            }
        }
        let expected = nodes.len() * batches.len();
        if ns.len() != expected {
            return Err(CostError::WrongSize {
                expected,
                got: ns.len(),
            });
        }
        if let Some(&bad) = ns.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Err(CostError::BadCost(bad));
        }
        Ok(Self {
            nodes: nodes.into_iter().map(|n| n as f64).collect(),
            batches: batches.into_iter().map(|b| b as f64).collect(),
            ns,
        })
    }

    /// The same cost whatever the tree and batch.
    pub fn constant(ns: f64) -> Result<Self, CostError> {
        Self::new(vec![1], vec![1], vec![ns])
    }

    /// Bilinear corners `(index, weight)` for (nodes, batch); weights clamped to the grid when
    /// `clamp` (used for updates), extrapolating otherwise.
    fn corners(&self, nodes: usize, batch: usize, clamp: bool) -> [(usize, f64); 4] {
        let (n0, mut tn) = locate(&self.nodes, nodes as f64);
        let (b0, mut tb) = locate(&self.batches, batch as f64);
        if clamp {
            tn = tn.clamp(0.0, 1.0);
            tb = tb.clamp(0.0, 1.0);
        }
        let w = self.nodes.len();
        let n1 = (n0 + 1).min(w - 1);
        let b1 = (b0 + 1).min(self.batches.len() - 1);
        [
            (b0 * w + n0, (1.0 - tb) * (1.0 - tn)),
            (b0 * w + n1, (1.0 - tb) * tn),
            (b1 * w + n0, tb * (1.0 - tn)),
            (b1 * w + n1, tb * tn),
        ]
    }

    /// Estimated verify time in ns.
    pub fn estimate(&self, nodes: usize, batch: usize) -> f64 {
        let v: f64 = self
            .corners(nodes, batch, false)
            .iter()
            .map(|&(i, w)| w * self.ns[i])
            .sum();
        v.max(0.0)
    }

    /// Moves the grid points around (nodes, batch) toward a measurement, by `alpha` of the error.
    pub fn observe(&mut self, nodes: usize, batch: usize, ns: f64, alpha: f64) {
        if !ns.is_finite() || ns < 0.0 {
            return;
        }
        let corners = self.corners(nodes, batch, true);
        let pred: f64 = corners.iter().map(|&(i, w)| w * self.ns[i]).sum();
        let err = ns - pred;
        for (i, w) in corners {
            self.ns[i] = (self.ns[i] + alpha * w * err).max(0.0);
        }
    }
}

/// Online draft measurements a start-up calibration of the draft cost counts as.
pub const CALIBRATION_WEIGHT: u64 = 16;

/// Measured costs of one speculative step.
#[derive(Debug, Clone, PartialEq)]
pub struct CostModel {
    /// Fixed draft cost per level (one batched draft forward), ns.
    pub draft_level_ns: f64,
    /// Draft cost per expanded row (node fed to the draft model), ns.
    pub draft_node_ns: f64,
    /// Verify cost table.
    pub verify: VerifyCostTable,
    /// Per-step time around the verify call (network and RPC), ns.
    pub verify_overhead_ns: f64,
    /// Per-step time around drafting when a tree is drafted (round trip), ns.
    pub draft_overhead_ns: f64,
    /// EMA rate of online updates (0..=1).
    pub alpha: f64,
    /// Draft measurements seen: the first one rescales the prior, the next ones move it
    /// faster (rate `1 / n` while that exceeds `alpha`), so a prior far off is forgotten
    /// within a few steps.
    draft_observations: u64,
    /// Overhead measurements seen (same warm start).
    overhead_observations: u64,
}

impl CostModel {
    /// A cost model with online update rate 0.03 (a cost measured under load is noisy) and
    /// no per-step overhead yet (learnt online).
    pub fn new(draft_level_ns: f64, draft_node_ns: f64, verify: VerifyCostTable) -> Self {
        Self {
            draft_level_ns,
            draft_node_ns,
            verify,
            verify_overhead_ns: 0.0,
            draft_overhead_ns: 0.0,
            alpha: 0.03,
            draft_observations: 0,
            overhead_observations: 0,
        }
    }

    /// Sets the draft cost from a start-up measurement of one level's time by rows fed
    /// (`(rows, ns)` points): the least-squares line `level + rows * node`, both parts kept
    /// non-negative. Later measurements refine it as if it had been learnt from
    /// [`CALIBRATION_WEIGHT`] of them (a slow first request does not undo it).
    pub fn calibrate_draft(&mut self, points: &[(usize, f64)]) -> Result<(), CostError> {
        if let Some(&(_, bad)) = points.iter().find(|(_, ns)| !ns.is_finite() || *ns < 0.0) {
            return Err(CostError::BadCost(bad));
        }
        if points.is_empty() {
            return Err(CostError::EmptyAxis("rows"));
        }
        let n = points.len() as f64;
        let mean_r = points.iter().map(|&(r, _)| r as f64).sum::<f64>() / n;
        let mean_t = points.iter().map(|&(_, t)| t).sum::<f64>() / n;
        let var: f64 = points
            .iter()
            .map(|&(r, _)| (r as f64 - mean_r).powi(2))
            .sum();
        if var == 0.0 {
            return Err(CostError::EmptyAxis("second distinct rows"));
        }
        let cov: f64 = points
            .iter()
            .map(|&(r, t)| (r as f64 - mean_r) * (t - mean_t))
            .sum();
        let (mut level, mut node) = (mean_t - cov / var * mean_r, cov / var);
        if node < 0.0 {
            (level, node) = (mean_t, 0.0);
        } else if level < 0.0 {
            // Through the origin.
            let rr: f64 = points.iter().map(|&(r, _)| (r * r) as f64).sum();
            let rt: f64 = points.iter().map(|&(r, t)| r as f64 * t).sum();
            (level, node) = (0.0, rt / rr);
        }
        self.draft_level_ns = level;
        self.draft_node_ns = node;
        self.draft_observations = CALIBRATION_WEIGHT;
        Ok(())
    }

    /// Update rate of the `n`-th measurement (1-based): a mean at first, then `alpha`.
    fn rate(&self, n: u64) -> f64 {
        (1.0 / n.max(1) as f64).max(self.alpha)
    }

    /// Draft time of `levels` forward passes over `rows` rows in all.
    pub fn draft_ns(&self, levels: usize, rows: usize) -> f64 {
        levels as f64 * self.draft_level_ns + rows as f64 * self.draft_node_ns
    }

    /// Verify time for `batch` sessions of `nodes` nodes each.
    pub fn verify_ns(&self, nodes: usize, batch: usize) -> f64 {
        self.verify.estimate(nodes, batch)
    }

    /// Estimated time of one step (draft then verify, with their round trips) for `batch`
    /// sessions drafting with `params`.
    pub fn step_ns(&self, params: &DraftParams, batch: usize) -> f64 {
        let shape = Shape::of(params);
        let draft = if shape.levels > 0 {
            self.draft_overhead_ns + self.draft_ns(shape.levels, shape.rows * batch)
        } else {
            0.0
        };
        draft + self.verify_overhead_ns + self.verify_ns(shape.nodes, batch)
    }

    /// Online update of the per-step overheads from one step: the verify round trip minus
    /// its forward, and (`None` without a draft) the draft round trip minus its drafting.
    pub fn observe_overhead(&mut self, verify_ns: f64, draft_ns: Option<f64>) {
        let ema = |v: &mut f64, x: f64, a: f64| {
            if x.is_finite() && x >= 0.0 {
                *v += a * (x - *v);
            }
        };
        self.overhead_observations += 1;
        let a = self.rate(self.overhead_observations);
        ema(&mut self.verify_overhead_ns, verify_ns, a);
        if let Some(d) = draft_ns {
            ema(&mut self.draft_overhead_ns, d, a);
        }
    }

    /// Online update from a measured draft: normalised LMS on (per level, per row).
    pub fn observe_draft(&mut self, levels: usize, rows: usize, ns: f64) {
        let (l, r) = (levels as f64, rows as f64);
        let norm = l * l + r * r;
        if norm == 0.0 || !ns.is_finite() || ns < 0.0 {
            return;
        }
        self.draft_observations += 1;
        let predicted = self.draft_ns(levels, rows);
        if self.draft_observations == 1 && predicted > 0.0 {
            // The first measurement sets the prior's scale (its level/row split stays).
            let scale = ns / predicted;
            self.draft_level_ns *= scale;
            self.draft_node_ns *= scale;
            return;
        }
        let a = self.rate(self.draft_observations);
        let err = ns - predicted;
        self.draft_level_ns = (self.draft_level_ns + a * err * l / norm).max(0.0);
        self.draft_node_ns = (self.draft_node_ns + a * err * r / norm).max(0.0);
    }

    /// Online update from a measured verify of `batch` sessions of `nodes` nodes each.
    pub fn observe_verify(&mut self, nodes: usize, batch: usize, ns: f64) {
        self.verify.observe(nodes, batch, ns, self.alpha);
    }
}

/// Work of one session's draft step: forward passes, rows fed, verified nodes (root included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    levels: usize,
    rows: usize,
    nodes: usize,
}

impl Shape {
    fn of(p: &DraftParams) -> Self {
        let k = p.branching;
        if p.depth == 0 || p.budget == 0 || k == 0 {
            return Self {
                levels: 0,
                rows: 0,
                nodes: 1,
            };
        }
        match p.mode {
            TreeMode::Chain => {
                let d = p.depth.min(p.budget);
                Self {
                    levels: d,
                    rows: d,
                    nodes: d + 1,
                }
            }
            TreeMode::Dynamic => {
                let capacity = k.saturating_add((p.depth - 1).saturating_mul(k * k));
                Self {
                    levels: p.depth,
                    rows: 1 + (p.depth - 1) * k,
                    nodes: p.budget.min(capacity) + 1,
                }
            }
            TreeMode::Static => {
                let (mut levels, mut rows, mut drafted, mut frontier) = (0, 0, 0, 1);
                while levels < p.depth && drafted < p.budget && frontier > 0 {
                    let expand = frontier.min((p.budget - drafted).div_ceil(k));
                    let new = (expand * k).min(p.budget - drafted);
                    levels += 1;
                    rows += expand;
                    drafted += new;
                    frontier = new;
                }
                Self {
                    levels,
                    rows,
                    nodes: drafted + 1,
                }
            }
        }
    }
}

/// Per-depth, per-rank acceptance rates (EMA), learnt from verification outcomes.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptanceStats {
    max_depth: usize,
    max_rank: usize,
    /// `rates[(d - 1) * max_rank + j]`: P(target token = j-th best child | at depth d - 1 node).
    rates: Vec<f64>,
    /// Whether a rate has been observed; one that has not is its depth's parent's (see
    /// [`AcceptanceStats::rate`]).
    seen: Vec<bool>,
    /// EMA rate (0..=1).
    pub alpha: f64,
    observations: u64,
}

impl AcceptanceStats {
    /// Stats for depths `1..=max_depth` and ranks `0..max_rank`, starting from a prior of 0.55 for
    /// the best child, each next rank a third of the previous; EMA rate 0.02.
    pub fn new(max_depth: usize, max_rank: usize) -> Self {
        let prior: Vec<f64> = (0..max_rank)
            .map(|j| 0.55 * (1.0f64 / 3.0).powi(j as i32))
            .collect();
        Self::with_prior(max_depth, &prior)
    }

    /// Stats starting from `prior[j]` for rank `j` at every depth.
    pub fn with_prior(max_depth: usize, prior: &[f64]) -> Self {
        let max_rank = prior.len();
        let rates: Vec<f64> = (0..max_depth)
            .flat_map(|_| prior.iter().map(|p| p.clamp(0.0, 1.0)))
            .collect();
        Self {
            max_depth,
            max_rank,
            seen: vec![false; rates.len()],
            rates,
            alpha: 0.02,
            observations: 0,
        }
    }

    /// Deepest tracked depth.
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// Number of tracked ranks.
    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// Number of node visits observed.
    pub fn observations(&self) -> u64 {
        self.observations
    }

    /// P(the target's token is the `rank`-th best draft child) at a node of depth `depth - 1`;
    /// 0 outside the tracked range. A depth never observed at this rank takes the rate of
    /// the depth above it (the prior only where nothing above was observed either): trees
    /// the policy has not grown that deep yet are judged by what it has seen, not held back
    /// by a prior that only drafting that deep would correct.
    pub fn rate(&self, depth: usize, rank: usize) -> f64 {
        if depth == 0 || depth > self.max_depth || rank >= self.max_rank {
            return 0.0;
        }
        let i = (depth - 1) * self.max_rank + rank;
        if !self.seen[i] && depth > 1 {
            return self.rate(depth - 1, rank);
        }
        self.rates[i]
    }

    /// Expected accepted tokens per depth for a chain of `depth` best children.
    pub fn chain_acceptance(&self, depth: usize) -> f64 {
        let mut v = 1.0;
        (1..=depth)
            .map(|d| {
                v *= self.rate(d, 0);
                v
            })
            .sum()
    }

    /// Learns from one verified tree: at every node the walk visited, the target's token was
    /// (or was not) the j-th best child (children ranked by draft score, ties by index).
    pub fn observe(&mut self, tree: &TokenTree, outcome: &VerifyOutcome) {
        let mut kids: Vec<usize> = Vec::new();
        for (&node, &token) in outcome.accepted_path.iter().zip(&outcome.emitted) {
            let depth = tree.depth(node) + 1;
            if depth > self.max_depth {
                break;
            }
            kids.clear();
            kids.extend(tree.children(node));
            if kids.is_empty() {
                continue;
            }
            let s = tree.scores();
            kids.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then_with(|| a.cmp(&b)));
            let hit = kids.iter().position(|&c| tree.token(c) == token);
            let row = (depth - 1) * self.max_rank;
            for j in 0..kids.len().min(self.max_rank) {
                let target = if hit == Some(j) { 1.0 } else { 0.0 };
                // A first observation moves the rate the cell had (inherited) until now.
                let before = self.rate(depth, j);
                self.seen[row + j] = true;
                let r = &mut self.rates[row + j];
                *r = before + self.alpha * (target - before);
            }
            self.observations += 1;
        }
    }

    /// Expected accepted tokens of the best dynamic trees of depth `depth`, branching `k`, for
    /// every budget: element `m` is the value of the best `m`-node tree (element 0 is 0). Shorter
    /// than `max_budget + 1` when the tree cannot hold that many nodes.
    pub fn dynamic_curve(&self, depth: usize, k: usize, max_budget: usize) -> Vec<f64> {
        let mut curve = vec![0.0];
        if depth == 0 || k == 0 {
            return curve;
        }
        // (value, depth, tie-break counter); max-heap by value then earlier push.
        let mut heap: BinaryHeap<Cand> = BinaryHeap::new();
        let mut pushed = 0u64;
        let mut expanded = vec![0usize; depth + 1];
        for j in 0..k {
            heap.push(Cand(self.rate(1, j), 1, pushed));
            pushed += 1;
        }
        let mut total = 0.0;
        while curve.len() <= max_budget {
            let Some(Cand(v, d, _)) = heap.pop() else {
                break;
            };
            total += v;
            curve.push(total);
            if d < depth && expanded[d] < k {
                expanded[d] += 1;
                for j in 0..k {
                    heap.push(Cand(v * self.rate(d + 1, j), d + 1, pushed));
                    pushed += 1;
                }
            }
        }
        curve
    }

    /// Expected accepted tokens (excluding the final target token) of a tree drafted with `p`.
    pub fn expected_accepted(&self, p: &DraftParams) -> f64 {
        let k = p.branching;
        if p.depth == 0 || p.budget == 0 || k == 0 {
            return 0.0;
        }
        match p.mode {
            TreeMode::Chain => self.chain_acceptance(p.depth.min(p.budget)),
            TreeMode::Dynamic => {
                let curve = self.dynamic_curve(p.depth, k, p.budget);
                curve[curve.len() - 1]
            }
            TreeMode::Static => {
                // Breadth-first: each level's nodes in order, children by rank, cut at budget.
                let (mut total, mut left) = (0.0, p.budget);
                let mut level = vec![1.0f64];
                for d in 1..=p.depth {
                    let mut next = Vec::new();
                    'fill: for &v in &level {
                        for j in 0..k {
                            if left == 0 {
                                break 'fill;
                            }
                            let c = v * self.rate(d, j);
                            total += c;
                            next.push(c);
                            left -= 1;
                        }
                    }
                    level = next;
                }
                total
            }
        }
    }
}

/// Best-first candidate: (path value, depth, push counter).
#[derive(Debug, Clone, Copy)]
struct Cand(f64, usize, u64);

impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then_with(|| o.2.cmp(&self.2))
    }
}

/// The (D, K, M) search space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicySpace {
    /// Largest depth D considered.
    pub max_depth: usize,
    /// Largest branching K considered.
    pub max_branching: usize,
    /// Largest budget M considered (drafted nodes kept, root excluded).
    pub max_budget: usize,
}

impl PolicySpace {
    /// Depth up to 8, branching up to 6, up to 48 drafted nodes (the orchestrator's flag
    /// defaults too).
    pub const DEFAULT: PolicySpace = PolicySpace {
        max_depth: 8,
        max_branching: 6,
        max_budget: 48,
    };
}

impl Default for PolicySpace {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Predicted performance of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEstimate {
    /// Expected tokens emitted per session (accepted drafts + the final target token).
    pub tokens_per_session: f64,
    /// Expected step time, ns.
    pub step_ns: f64,
    /// Expected tokens per second over the whole batch.
    pub tokens_per_second: f64,
}

/// Chooses (D, K, M) each step from measured costs and acceptance.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetPolicy {
    /// Step costs (calibrate at start-up, refine online).
    pub cost: CostModel,
    /// Acceptance rates (learnt online).
    pub acceptance: AcceptanceStats,
    /// What may be chosen.
    pub space: PolicySpace,
}

impl BudgetPolicy {
    /// A policy over `space` with fresh acceptance stats.
    pub fn new(cost: CostModel, space: PolicySpace) -> Self {
        Self {
            acceptance: AcceptanceStats::new(space.max_depth, space.max_branching),
            cost,
            space,
        }
    }

    /// Predicted tokens and time of a step with `params` for `batch_size` sessions.
    pub fn estimate(&self, params: &DraftParams, batch_size: usize) -> StepEstimate {
        let batch = batch_size.max(1);
        let tokens = 1.0 + self.acceptance.expected_accepted(params);
        self.make_estimate(tokens, self.cost.step_ns(params, batch), batch)
    }

    fn make_estimate(&self, tokens: f64, step_ns: f64, batch: usize) -> StepEstimate {
        StepEstimate {
            tokens_per_session: tokens,
            step_ns,
            tokens_per_second: if step_ns > 0.0 {
                batch as f64 * tokens * 1e9 / step_ns
            } else {
                f64::INFINITY
            },
        }
    }

    /// The parameters maximising expected tokens per second for `batch_size` sessions.
    /// Candidates: no drafting, chains of every depth, dynamic trees (K >= 2, M >= D). Ties go to
    /// the cheaper candidate found first.
    pub fn choose(&self, batch_size: usize) -> DraftParams {
        self.choose_for(&self.acceptance, batch_size)
    }

    /// [`BudgetPolicy::choose`] with the acceptance rates of one request (e.g. learnt from
    /// its own steps, starting from the policy's): a request whose draft agrees with the
    /// target more or less than the average gets a bigger or smaller tree.
    pub fn choose_for(&self, acceptance: &AcceptanceStats, batch_size: usize) -> DraftParams {
        let batch = batch_size.max(1);
        let mut best = DraftParams::none();
        let mut best_rate = self.estimate(&best, batch).tokens_per_second;
        let mut consider = |p: DraftParams, tokens: f64| {
            let rate = self
                .make_estimate(tokens, self.cost.step_ns(&p, batch), batch)
                .tokens_per_second;
            if rate > best_rate * (1.0 + 1e-9) {
                best_rate = rate;
                best = p;
            }
        };
        for d in 1..=self.space.max_depth {
            consider(DraftParams::chain(d), 1.0 + acceptance.chain_acceptance(d));
        }
        for k in 2..=self.space.max_branching {
            for d in 1..=self.space.max_depth {
                let curve = acceptance.dynamic_curve(d, k, self.space.max_budget);
                for (m, &acc) in curve.iter().enumerate().skip(d.max(2)) {
                    consider(DraftParams::dynamic(d, k, m), 1.0 + acc);
                }
            }
        }
        best
    }

    /// Learns acceptance from one verified tree.
    pub fn observe(&mut self, tree: &TokenTree, outcome: &VerifyOutcome) {
        self.acceptance.observe(tree, outcome);
    }

    /// Refines the draft cost from a measurement.
    pub fn observe_draft(&mut self, levels: usize, rows: usize, ns: f64) {
        self.cost.observe_draft(levels, rows, ns);
    }

    /// Refines the verify cost from a measurement.
    pub fn observe_verify(&mut self, nodes: usize, batch: usize, ns: f64) {
        self.cost.observe_verify(nodes, batch, ns);
    }

    /// Refines the per-step overheads (see [`CostModel::observe_overhead`]).
    pub fn observe_overhead(&mut self, verify_ns: f64, draft_ns: Option<f64>) {
        self.cost.observe_overhead(verify_ns, draft_ns);
    }
}
