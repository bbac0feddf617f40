//! Cost-model calibration: the measured costs behind the budget policy.
//!
//! Runs the model crate in-process (no services, [`ForwardTimer`]): target verify time as a
//! function of tree nodes and batch size, and draft time per level as a function of the rows fed
//! in that level, next to their roofline. The result converts into the [`speculate::CostModel`]
//! the budget policy uses ([`Calibration::cost_model`]). The target service measures the same
//! verify table at start-up (a smaller plan) and reports it through its `Info` RPC.

use candle_core::Device;
use serde::Serialize;
use specllava_model::{ForwardTimer, Llava, ModelError, SweepPlan, TimedForward};
use speculate::{CostError, CostModel, VerifyCostTable};
use thiserror::Error;

use crate::roofline::{ForwardCost, MachineRates};
use crate::stats::linear_fit;

/// Calibration failures.
#[derive(Debug, Error)]
pub enum CalibrationError {
    /// A forward pass failed.
    #[error("model forward failed during calibration: {0}")]
    Model(#[from] ModelError),
    /// Measuring the machine failed.
    #[error("measuring the machine failed: {0}")]
    Machine(#[from] candle_core::Error),
    /// The measurements do not form a valid cost table.
    #[error("invalid cost table: {0}")]
    Cost(#[from] CostError),
    /// A plan with nothing to measure.
    #[error("calibration plan is empty: {0}")]
    EmptyPlan(&'static str),
}

/// What to measure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CalibrationPlan {
    /// Tree sizes (nodes per session, root included), strictly increasing.
    pub nodes: Vec<usize>,
    /// Batch sizes (sessions per forward), strictly increasing.
    pub batches: Vec<usize>,
    /// Rows per draft level to time (fits the per-level and per-row draft costs).
    pub draft_rows: Vec<usize>,
    /// Committed KV rows of every session before the tree (typical prompt + image length).
    pub prefix_len: usize,
    /// Timed rounds over all points (each point's median is kept).
    pub reps: usize,
    /// Untimed forwards of a point right before each timed one.
    pub warm_ups: usize,
}

impl CalibrationPlan {
    /// The benchmark's full sweep: nodes 1..128 (powers of two), batches 1, 4, 16.
    pub fn full(prefix_len: usize) -> Self {
        Self {
            nodes: vec![1, 2, 4, 8, 16, 32, 64, 128],
            batches: vec![1, 4, 16],
            draft_rows: vec![1, 2, 4, 8, 16, 32],
            prefix_len,
            reps: 9,
            warm_ups: WARM_UPS,
        }
    }

    /// The full sweep of a target whose weights stream from memory (a forward of 16 x 128
    /// nodes would take seconds there): the small trees the memory-bound window holds in
    /// detail, batches 1 and 4, fewer rounds (a memory-bound forward barely varies) and one
    /// warm-up (the weights never stay cached anyway).
    pub fn memory_bound(prefix_len: usize) -> Self {
        Self {
            nodes: vec![1, 2, 3, 4, 6, 8, 12, 16, 32, 64],
            batches: vec![1, 4],
            draft_rows: vec![1, 2, 4, 8, 16, 32],
            prefix_len,
            reps: 5,
            warm_ups: 1,
        }
    }

    /// A quick sweep for service start-up or smoke runs.
    pub fn quick(prefix_len: usize) -> Self {
        Self {
            nodes: vec![1, 4, 16, 64],
            batches: vec![1, 4],
            draft_rows: vec![1, 4, 16],
            prefix_len,
            reps: 1,
            warm_ups: 1,
        }
    }
}

/// One measured verify point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VerifyPoint {
    /// Nodes per session.
    pub nodes: usize,
    /// Sessions in the batch.
    pub batch: usize,
    /// Median measured time of the batched forward, ns.
    pub measured_ns: f64,
    /// Roofline time, ns (if machine rates were given).
    pub roofline_ns: Option<f64>,
}

/// The measured prefill of a typical prompt.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PrefillPoint {
    /// Prompt rows (the plan's prefix length).
    pub rows: usize,
    /// Median measured time, ns.
    pub measured_ns: f64,
    /// Roofline time, ns (if machine rates were given).
    pub roofline_ns: Option<f64>,
}

/// One measured draft level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DraftPoint {
    /// Rows fed to the draft model in this level.
    pub rows: usize,
    /// Median measured time, ns.
    pub measured_ns: f64,
    /// Roofline time, ns (if machine rates were given).
    pub roofline_ns: Option<f64>,
}

/// Everything measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// The plan that was run.
    pub plan: CalibrationPlan,
    /// Verify points, batch-major (`batches x nodes`).
    pub verify: Vec<VerifyPoint>,
    /// The target's prefill of `plan.prefix_len` rows.
    pub prefill: PrefillPoint,
    /// Draft points (empty without a draft model).
    pub draft: Vec<DraftPoint>,
    /// Fitted fixed cost of one draft level, ns.
    pub draft_level_ns: f64,
    /// Fitted cost of one draft row, ns.
    pub draft_row_ns: f64,
    /// Analytical costs of the target forward.
    pub target_cost: ForwardCost,
    /// Analytical costs of the draft forward.
    pub draft_cost: Option<ForwardCost>,
    /// Machine rates used for the roofline.
    pub rates: Option<MachineRates>,
}

impl Calibration {
    /// The [`CostModel`] the budget policy takes.
    pub fn cost_model(&self) -> Result<CostModel, CostError> {
        let table = VerifyCostTable::new(
            self.plan.nodes.clone(),
            self.plan.batches.clone(),
            self.verify.iter().map(|p| p.measured_ns).collect(),
        )?;
        Ok(CostModel::new(
            self.draft_level_ns,
            self.draft_row_ns,
            table,
        ))
    }
}

/// Measures verify and draft costs, each set of points in one round-robin sweep
/// ([`ForwardTimer::sweep`]: [`CalibrationPlan::reps`] rounds, [`WARM_UPS`] untimed forwards
/// before each timed one, as a forward follows others of its kind while serving).
/// `progress` is called after each timed forward with (timed forwards done, timed forwards
/// in all).
pub fn calibrate(
    target: &Llava,
    draft: Option<&Llava>,
    rates: Option<MachineRates>,
    plan: &CalibrationPlan,
    mut progress: impl FnMut(usize, usize),
) -> Result<Calibration, CalibrationError> {
    if plan.nodes.is_empty() || plan.batches.is_empty() {
        return Err(CalibrationError::EmptyPlan("needs node and batch sizes"));
    }
    let rounds = plan.reps.max(1);
    let sweep_plan = SweepPlan {
        rounds,
        warm_ups: plan.warm_ups,
    };
    let tree_points: Vec<(usize, usize)> = plan
        .batches
        .iter()
        .flat_map(|&batch| plan.nodes.iter().map(move |&nodes| (batch, nodes)))
        .collect();
    // The tree points, then the prefill, in one sweep.
    let trees: Vec<TimedForward> = tree_points
        .iter()
        .map(|&(batch, nodes)| TimedForward::Tree { nodes, batch })
        .chain([TimedForward::Prefill {
            rows: plan.prefix_len,
        }])
        .collect();
    let draft_len = draft.map_or(0, |_| plan.draft_rows.len());
    let total = rounds * (trees.len() + draft_len);
    let mut done = 0;
    let mut tick = move || {
        done += 1;
        progress(done, total);
    };

    let target_cost = ForwardCost::for_model(target);
    let max_batch = *plan.batches.iter().max().expect("non-empty");
    let mut timer = ForwardTimer::new(target, max_batch, plan.prefix_len)?;
    let mut verify_ns = timer.sweep(&trees, sweep_plan, &mut tick)?;
    drop(timer);
    let prefill = PrefillPoint {
        rows: plan.prefix_len,
        measured_ns: verify_ns.pop().expect("the prefill point"),
        roofline_ns: rates.map(|r| 1e9 * target_cost.prefill_roofline_s(&r, plan.prefix_len)),
    };
    let verify = tree_points
        .iter()
        .zip(verify_ns)
        .map(|(&(batch, nodes), ns)| VerifyPoint {
            nodes,
            batch,
            measured_ns: ns,
            roofline_ns: rates
                .map(|r| 1e9 * target_cost.roofline_s(&r, nodes, batch, plan.prefix_len)),
        })
        .collect();

    let (mut draft_points, mut level_ns, mut row_ns, mut draft_cost) = (Vec::new(), 0.0, 0.0, None);
    if let Some(d) = draft {
        let cost = ForwardCost::for_model(d);
        let mut timer = ForwardTimer::new(d, 1, plan.prefix_len)?;
        // One level of `rows` sibling nodes under the root (what expanding a frontier feeds).
        let levels: Vec<TimedForward> = plan
            .draft_rows
            .iter()
            .map(|&rows| TimedForward::Level { rows })
            .collect();
        let level_ns_by_rows = timer.sweep(&levels, sweep_plan, &mut tick)?;
        draft_points = plan
            .draft_rows
            .iter()
            .zip(level_ns_by_rows)
            .map(|(&rows, ns)| DraftPoint {
                rows,
                measured_ns: ns,
                roofline_ns: rates.map(|r| 1e9 * cost.roofline_s(&r, rows, 1, plan.prefix_len)),
            })
            .collect();
        let pts: Vec<(f64, f64)> = draft_points
            .iter()
            .map(|p| (p.rows as f64, p.measured_ns))
            .collect();
        if let Some((a, b)) = linear_fit(&pts) {
            // Keep both terms non-negative (the policy's model has no negative costs).
            level_ns = a.max(0.0);
            row_ns = b.max(0.0);
        }
        draft_cost = Some(cost);
    }
    Ok(Calibration {
        plan: plan.clone(),
        verify,
        prefill,
        draft: draft_points,
        draft_level_ns: level_ns,
        draft_row_ns: row_ns,
        target_cost,
        draft_cost,
        rates,
    })
}

/// Untimed forwards of a point right before each timed one (see [`SweepPlan::warm_ups`]).
const WARM_UPS: usize = 3;

/// Machine rates sized for a CPU or a GPU: 64 MiB GEMV and a 1024^3 matmul on CPU, 1 GiB and
/// 4096^3 on a GPU.
pub fn measure_rates(device: &Device) -> Result<MachineRates, CalibrationError> {
    let (rows, cols, n) = if device.is_cpu() {
        (4096, 4096, 1024)
    } else {
        (16384, 16384, 4096)
    };
    Ok(MachineRates::measure(device, rows, cols, n)?)
}

/// A plain-text table of the calibration next to its roofline.
pub fn render(c: &Calibration) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if let Some(r) = c.rates {
        let _ = writeln!(
            s,
            "machine: memory bandwidth {:.1} GB/s (f32 GEMV {:.1}, streaming read {:.1}); f32 FMA peak {:.1} GFLOP/s (f32 matmul {:.1})",
            r.bandwidth_bytes_per_s / 1e9,
            r.gemv_bytes_per_s / 1e9,
            r.stream_bytes_per_s / 1e9,
            r.compute_flops_per_s() / 1e9,
            r.matmul_flops_per_s / 1e9
        );
    }
    let _ = writeln!(
        s,
        "target decoder: {:.1} MB of weights per forward, {:.1} MFLOP per node (prefix {} rows)",
        c.target_cost.weight_bytes / 1e6,
        c.target_cost.linear_flops_per_node / 1e6,
        c.plan.prefix_len
    );
    let _ = writeln!(
        s,
        "\ntarget verify time (ms) vs tree nodes and batch size, roofline in brackets:"
    );
    let _ = write!(s, "{:>7}", "nodes");
    for b in &c.plan.batches {
        let _ = write!(s, " {:>20}", format!("batch {b}"));
    }
    let _ = writeln!(s);
    for (ni, n) in c.plan.nodes.iter().enumerate() {
        let _ = write!(s, "{n:>7}");
        for bi in 0..c.plan.batches.len() {
            let p = &c.verify[bi * c.plan.nodes.len() + ni];
            let roof = p
                .roofline_ns
                .map_or(String::new(), |r| format!(" [{:.2}]", r / 1e6));
            let _ = write!(s, " {:>20}", format!("{:.2}{roof}", p.measured_ns / 1e6));
        }
        let _ = writeln!(s);
    }
    let p = &c.prefill;
    let _ = writeln!(
        s,
        "\ntarget prefill of {} rows: {:.2} ms{}",
        p.rows,
        p.measured_ns / 1e6,
        p.roofline_ns.map_or(String::new(), |r| format!(
            " [roofline {:.2} ms, {:.2}x]",
            r / 1e6,
            p.measured_ns / r
        ))
    );
    if !c.draft.is_empty() {
        let _ = writeln!(
            s,
            "\ndraft time per level (ms) vs rows fed, roofline in brackets:"
        );
        for p in &c.draft {
            let roof = p
                .roofline_ns
                .map_or(String::new(), |r| format!(" [{:.3}]", r / 1e6));
            let _ = writeln!(s, "{:>7} {:>12.3}{roof}", p.rows, p.measured_ns / 1e6);
        }
        let _ = writeln!(
            s,
            "fit: {:.3} ms per level + {:.4} ms per row",
            c.draft_level_ns / 1e6,
            c.draft_row_ns / 1e6
        );
    }
    s
}
