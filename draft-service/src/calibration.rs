//! Start-up measurement of this replica's cost per draft level on its own device, reported
//! by the `Info` RPC so that the orchestrator's budget policy starts from real numbers
//! instead of a static prior (a first request's time, with its cold caches, is a poor one).

use specllava_model::{ForwardTimer, Llava, ModelError, SweepPlan, TimedForward};
use specllava_proto::v1 as pb;

/// Rows fed per level measured (a level's frontier: 1 for a chain, up to K x K for trees).
const ROWS: [usize; 6] = [1, 2, 4, 8, 16, 32];
/// How the levels are timed: round-robin, seven rounds (the median is reported), one
/// untimed forward before each timed one.
const SWEEP: SweepPlan = SweepPlan {
    rounds: 7,
    warm_ups: 1,
};

/// Times one draft level for every row count of [`ROWS`] that fits the model's context
/// (none fitting: an empty result).
pub fn measure_level_costs(model: &Llava) -> Result<Vec<pb::LevelCost>, ModelError> {
    let Some((mut timer, rows)) = ForwardTimer::for_calibration(model, 1, &ROWS)? else {
        return Ok(Vec::new());
    };
    let levels: Vec<TimedForward> = rows
        .iter()
        .map(|&rows| TimedForward::Level { rows })
        .collect();
    let ns = timer.sweep(&levels, SWEEP, || {})?;
    Ok(rows
        .iter()
        .zip(ns)
        .map(|(&r, ns)| pb::LevelCost {
            rows: r as u32,
            forward_ns: ns as u64,
        })
        .collect())
}
