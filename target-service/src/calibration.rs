//! Start-up measurement of this replica's verify cost on its own device, reported by
//! the `Info` RPC so that the orchestrator's budget policy starts from real numbers
//! (a GPU verifies 64 nodes almost as fast as 1; a CPU does not).
//!
//! The measurement is bounded, whatever the model: a replica of a 7B-13B target must be
//! ready in seconds, and every rolling restart pays for it. It times a few points (one
//! session's trees of 1..64 nodes, a few batched points) round-robin within a time budget,
//! and fills the rest of the policy's grid from them ([`fill_grid`]); the orchestrator then
//! refines the table online from the forwards the replica serves.

use std::time::{Duration, Instant};

use specllava_model::timing::median;
use specllava_model::{ForwardTimer, Llava, ModelError, SweepPlan, TimedForward};
use specllava_proto::v1 as pb;

/// Tree sizes of the reported grid (nodes per session, root included): every size up to 6,
/// where a memory-bound target's verify cost turns from flat to linear, then powers of two.
const NODES: [usize; 11] = [1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64];
/// Batch sizes of the reported grid (sessions per forward): every batch size the policy may
/// size trees for under load.
const BATCHES: [usize; 5] = [1, 2, 4, 8, 16];
/// Batched points timed besides one session's curve: what a batch adds beyond its rows.
const BATCHED: [(usize, usize); 3] = [(2, 1), (4, 1), (4, 4)];
/// Most timed rounds (each point's median is kept).
const MAX_ROUNDS: usize = 3;

/// Times one session's trees of every [`NODES`] size that fits the context and the
/// [`BATCHED`] points, round-robin (one untimed forward before each timed one), for as many
/// rounds as fit in `budget` (at least one), and returns the full (batch x nodes) grid, measured
/// where timed and filled in elsewhere. Tree sizes that would not fit the model's context are
/// left out (all of them: an empty result).
pub fn measure_verify_costs(
    model: &Llava,
    budget: Duration,
) -> Result<Vec<pb::VerifyCost>, ModelError> {
    let sessions = BATCHED.iter().map(|p| p.0).max().unwrap_or(1);
    let Some((mut timer, nodes)) = ForwardTimer::for_calibration(model, sessions, &NODES)? else {
        return Ok(Vec::new());
    };
    let points: Vec<(usize, usize)> = nodes
        .iter()
        .map(|&n| (1, n))
        .chain(BATCHED.iter().copied().filter(|p| nodes.contains(&p.1)))
        .collect();
    let trees: Vec<TimedForward> = points
        .iter()
        .map(|&(batch, nodes)| TimedForward::Tree { nodes, batch })
        .collect();
    let one_round = SweepPlan {
        rounds: 1,
        warm_ups: 1,
    };
    let started = Instant::now();
    let mut samples: Vec<Vec<f64>> = timer
        .sweep(&trees, one_round, || {})?
        .into_iter()
        .map(|ns| vec![ns])
        .collect();
    let per_round = started.elapsed();
    let rounds = (budget.as_secs_f64() / per_round.as_secs_f64().max(1e-9)).floor() as usize;
    for _ in 1..rounds.clamp(1, MAX_ROUNDS) {
        for (s, ns) in samples
            .iter_mut()
            .zip(timer.sweep(&trees, one_round, || {})?)
        {
            s.push(ns);
        }
    }
    let measured: Vec<(usize, usize, f64)> = points
        .iter()
        .zip(&mut samples)
        .map(|(&(b, n), s)| (b, n, median(s)))
        .collect();
    tracing::debug!(
        points = measured.len(),
        rounds = samples.first().map_or(0, Vec::len),
        ms = started.elapsed().as_millis() as u64,
        "verify cost points timed"
    );
    let grid = fill_grid(&measured, &BATCHES, &nodes);
    Ok(grid
        .into_iter()
        .map(|(batch, nodes, ns)| pb::VerifyCost {
            nodes: nodes as u32,
            batch: batch as u32,
            forward_ns: ns.round() as u64,
        })
        .collect())
}

/// The (batch, nodes, ns) grid over `batches x nodes`, batch-major, from `measured` points.
///
/// A batched forward runs its linear layers over all rows at once, so its cost is first that of
/// one session's tree with as many rows: `single(batch x nodes)`, interpolated linearly in rows
/// between one session's measured trees and extrapolated past the largest along the last
/// segment's slope. What a batch costs beyond its rows (each session's attention over its own
/// KV) is a per-extra-session term: the median of `(t - single(rows)) / (batch - 1)` over the
/// measured batched points, never negative. Measured points keep their measured value.
pub fn fill_grid(
    measured: &[(usize, usize, f64)],
    batches: &[usize],
    nodes: &[usize],
) -> Vec<(usize, usize, f64)> {
    let mut curve: Vec<(f64, f64)> = measured
        .iter()
        .filter(|p| p.0 == 1)
        .map(|p| (p.1 as f64, p.2))
        .collect();
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    let single = |rows: f64| -> f64 {
        match curve.len() {
            0 => 0.0,
            1 => curve[0].1 * rows / curve[0].0,
            _ => {
                let hi = curve
                    .partition_point(|p| p.0 < rows)
                    .clamp(1, curve.len() - 1);
                let (a, b) = (curve[hi - 1], curve[hi]);
                let slope = (b.1 - a.1) / (b.0 - a.0);
                (a.1 + slope * (rows - a.0)).max(curve[0].1)
            }
        }
    };
    let mut extra: Vec<f64> = measured
        .iter()
        .filter(|p| p.0 > 1)
        .map(|&(b, n, ns)| (ns - single((b * n) as f64)) / (b - 1) as f64)
        .collect();
    let per_session = if extra.is_empty() {
        0.0
    } else {
        median(&mut extra).max(0.0)
    };
    batches
        .iter()
        .flat_map(|&b| nodes.iter().map(move |&n| (b, n)))
        .map(|(b, n)| {
            let ns = measured.iter().find(|p| p.0 == b && p.1 == n).map_or_else(
                || single((b * n) as f64) + per_session * (b - 1) as f64,
                |p| p.2,
            );
            (b, n, ns)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memory-bound device: flat at 10 ms up to 6 rows, then 2 ms per row; 0.5 ms per extra
    /// session.
    fn fake(b: usize, n: usize) -> f64 {
        let rows = (b * n) as f64;
        1e6 * (10.0f64.max(2.0 * rows - 2.0) + 0.5 * (b - 1) as f64)
    }

    #[test]
    fn the_grid_is_filled_from_one_sessions_curve_and_a_per_session_term() {
        let mut measured: Vec<(usize, usize, f64)> =
            NODES.iter().map(|&n| (1, n, fake(1, n))).collect();
        measured.extend(BATCHED.iter().map(|&(b, n)| (b, n, fake(b, n))));
        let grid = fill_grid(&measured, &BATCHES, &NODES);
        assert_eq!(grid.len(), BATCHES.len() * NODES.len());
        for &(b, n, ns) in &grid {
            let want = fake(b, n);
            // Exact at measured points and on the linear parts; within the interpolation error
            // of the knee elsewhere (rows between two measured sizes).
            assert!(
                (ns - want).abs() <= 0.15 * want,
                "batch {b} nodes {n}: {ns} vs {want}"
            );
        }
        let at = |b: usize, n: usize| grid.iter().find(|p| p.0 == b && p.1 == n).unwrap().2;
        assert_eq!(at(4, 4), fake(4, 4));
        // Past the largest measured tree, extrapolated along the last slope.
        assert!((at(16, 64) - fake(16, 64)).abs() < 1e-6 * fake(16, 64));
    }

    #[test]
    fn a_single_point_scales_by_rows_and_extras_never_go_negative() {
        let grid = fill_grid(&[(1, 1, 100.0), (4, 1, 50.0)], &[1, 4], &[1, 2]);
        assert_eq!(grid[0], (1, 1, 100.0));
        assert_eq!(grid[1], (1, 2, 200.0));
        assert_eq!(grid[2], (4, 1, 50.0));
        // (4, 2): 8 rows, no negative per-session term.
        assert_eq!(grid[3], (4, 2, 800.0));
    }
}
