//! Start-up measurement of this replica's verify cost on its own device, reported by
//! the `Info` RPC so that the orchestrator's budget policy starts from real numbers
//! (a GPU verifies 64 nodes almost as fast as 1; a CPU does not).

use specllava_model::{ForwardTimer, Llava, ModelError, SweepPlan, TimedForward};
use specllava_proto::v1 as pb;

/// Tree sizes measured (nodes per session, root included).
const NODES: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
/// Batch sizes measured (sessions per forward): every batch size the policy may size trees
/// for under load, so that it never extrapolates.
const BATCHES: [usize; 5] = [1, 2, 4, 8, 16];
/// How the grid is timed: round-robin, three rounds, one untimed forward before each timed
/// one (35 points; a few seconds on a CPU).
const SWEEP: SweepPlan = SweepPlan {
    rounds: 3,
    warm_ups: 1,
};

/// Times one batched verify forward for every (batch, nodes) of the grid, batch-major, in
/// one round-robin sweep ([`ForwardTimer::sweep`]: the ratios between points the policy
/// compares are not skewed by the machine drifting during the measurement).
/// Tree sizes that would not fit the model's context are left out (all of them: an empty
/// result).
pub fn measure_verify_costs(model: &Llava) -> Result<Vec<pb::VerifyCost>, ModelError> {
    let sessions = BATCHES[BATCHES.len() - 1];
    let Some((mut timer, nodes)) = ForwardTimer::for_calibration(model, sessions, &NODES)? else {
        return Ok(Vec::new());
    };
    let grid: Vec<(usize, usize)> = BATCHES
        .iter()
        .flat_map(|&batch| nodes.iter().map(move |&n| (batch, n)))
        .collect();
    let trees: Vec<TimedForward> = grid
        .iter()
        .map(|&(batch, nodes)| TimedForward::Tree { nodes, batch })
        .collect();
    let ns = timer.sweep(&trees, SWEEP, || {})?;
    Ok(grid
        .iter()
        .zip(ns)
        .map(|(&(batch, nodes), ns)| pb::VerifyCost {
            nodes: nodes as u32,
            batch: batch as u32,
            forward_ns: ns as u64,
        })
        .collect())
}
