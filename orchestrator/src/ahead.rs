//! Whether draft-ahead pays on this deployment (decided by measurement), and for a turn (by
//! its pre-drafts' hit rate).
//!
//! Pre-drafting the next tree while the target verifies saves the draft's round trip and
//! time on a hit, but where the draft and the target share compute (one host, one GPU) the
//! pre-draft slows the verify it overlaps. Which wins depends on the deployment, so for
//! turns whose shape the policy chooses, the engine runs both arms (asking for pipelined
//! pre-drafts after a drafted step, or not) and keeps the faster one: steps come in blocks
//! of one arm; every step of a block but its first (whose tree was pre-drafted, or not,
//! under the previous block's arm) is a sample of its arm, measured as the step's wall time
//! (its tree's round trip, the verify, and the wait for a pre-draft asked meanwhile) over the
//! cost model's prediction for its shape, so trees of different sizes compare fairly. Each
//! arm is tried until it has [`MIN_SAMPLES`] samples; then the cheaper arm runs, and every
//! [`EXPLORE_EVERY`]-th block tries the other so a change in load is noticed. The engine
//! keeps one gate for greedy turns and one for sampled ones: their pre-drafts guess right at
//! very different rates.

/// A turn's pre-draft hit rate below which it stops asking for pre-drafts.
pub const PIPELINE_MIN_HIT_RATE: f64 = 0.4;
/// EMA rate of a turn's pre-draft hit rate.
const PIPELINE_RATE_ALPHA: f64 = 0.3;
/// A turn that stopped asking for pre-drafts asks again after this many steps (its text may
/// have become predictable).
pub const PIPELINE_PROBE_STEPS: u32 = 8;

/// Steps per block of one arm.
pub const BLOCK_STEPS: u32 = 4;
/// Samples per arm before the gate trusts its means.
pub const MIN_SAMPLES: u64 = 12;
/// Once both arms are known, one block in this many tries the slower one.
pub const EXPLORE_EVERY: u64 = 8;
/// EMA rate of an arm's mean cost ratio.
const RATIO_EMA: f64 = 0.05;

/// One arm's measurements.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ArmStats {
    /// EMA of measured / predicted step time.
    pub ratio: f64,
    /// Samples taken.
    pub samples: u64,
}

impl ArmStats {
    fn observe(&mut self, ratio: f64) {
        // A plain mean for the first samples, then an EMA (follows load changes).
        self.samples += 1;
        let rate = (1.0 / self.samples as f64).max(RATIO_EMA);
        self.ratio += rate * (ratio - self.ratio);
    }
}

/// The engine-wide decision: measurements of both arms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AheadGate {
    /// Steps drafted without draft-ahead.
    pub off: ArmStats,
    /// Steps drafted with draft-ahead.
    pub on: ArmStats,
    blocks: u64,
}

impl AheadGate {
    /// The arm of the next block: `true` pre-drafts.
    pub fn pick(&mut self) -> bool {
        self.blocks += 1;
        if self.on.samples < MIN_SAMPLES || self.off.samples < MIN_SAMPLES {
            // Learn the arm with fewer samples (ahead first).
            return self.on.samples <= self.off.samples;
        }
        let on_wins = self.on.ratio <= self.off.ratio;
        let explore = self.blocks.is_multiple_of(EXPLORE_EVERY);
        on_wins != explore
    }

    /// Whether draft-ahead currently wins (`None` until both arms are measured).
    pub fn ahead_wins(&self) -> Option<bool> {
        (self.on.samples >= MIN_SAMPLES && self.off.samples >= MIN_SAMPLES)
            .then_some(self.on.ratio <= self.off.ratio)
    }

    /// One step of arm `on`: its wall time and the cost model's prediction, in ns.
    pub fn observe(&mut self, on: bool, measured_ns: f64, predicted_ns: f64) {
        if !(measured_ns.is_finite() && predicted_ns.is_finite() && predicted_ns > 0.0) {
            return;
        }
        let arm = if on { &mut self.on } else { &mut self.off };
        arm.observe(measured_ns / predicted_ns);
    }
}

/// A turn's place in its current block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AheadBlock {
    /// The block's arm.
    pub on: bool,
    /// Drafted steps left in the block (0: the next step starts a new one).
    left: u32,
    /// Whether the current step is the block's first (not a clean sample).
    first: bool,
}

impl Default for AheadBlock {
    fn default() -> Self {
        Self {
            on: true,
            left: 0,
            first: true,
        }
    }
}

impl AheadBlock {
    /// The arm of the step about to be drafted, starting a new block from `gate` when the
    /// current one is used up.
    pub fn next_step(&mut self, gate: impl FnOnce() -> bool) -> bool {
        if self.left == 0 {
            let on = gate();
            // The first step's draft was requested under the previous arm.
            self.first = on != self.on || self.first;
            self.on = on;
            self.left = BLOCK_STEPS;
        } else {
            self.first = false;
        }
        self.left -= 1;
        self.on
    }

    /// Whether the step just drafted is a clean sample of its arm.
    pub fn is_sample(&self) -> bool {
        !self.first
    }
}

/// Whether a turn asks the draft for a pre-draft while the target verifies (pipelined
/// draft-ahead), from how often its pre-drafts were right: a pre-draft pays only when the
/// target's outcome is the one it assumed, while its drafting runs next to every verify it
/// overlaps (on shared hardware, slowing it). A turn whose guesses keep missing (text the
/// draft does not predict) stops asking, and asks again every [`PIPELINE_PROBE_STEPS`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelineGate {
    /// EMA of the turn's pre-draft hits (1) and misses (0).
    pub hit_rate: f64,
    /// Steps since the turn last asked.
    idle_steps: u32,
}

impl Default for PipelineGate {
    fn default() -> Self {
        Self {
            hit_rate: 0.5,
            idle_steps: 0,
        }
    }
}

impl PipelineGate {
    /// Whether to ask for a pre-draft this step.
    pub fn ask(&mut self) -> bool {
        if self.hit_rate >= PIPELINE_MIN_HIT_RATE || self.idle_steps + 1 >= PIPELINE_PROBE_STEPS {
            self.idle_steps = 0;
            return true;
        }
        self.idle_steps += 1;
        false
    }

    /// A pre-draft was checked against the target's outcome.
    pub fn observe(&mut self, hit: bool) {
        self.hit_rate += PIPELINE_RATE_ALPHA * (f64::from(u8::from(hit)) - self.hit_rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(g: &mut AheadGate, on_ratio: f64, off_ratio: f64, steps: usize) -> Vec<bool> {
        (0..steps)
            .map(|_| {
                let on = g.pick();
                g.observe(on, if on { on_ratio } else { off_ratio }, 1.0);
                on
            })
            .collect()
    }

    #[test]
    fn both_arms_are_measured_before_deciding() {
        let mut g = AheadGate::default();
        assert_eq!(g.ahead_wins(), None);
        let arms = feed(&mut g, 1.0, 1.0, 2 * MIN_SAMPLES as usize);
        assert_eq!(arms.iter().filter(|&&a| a).count(), MIN_SAMPLES as usize);
        assert!(g.ahead_wins().is_some());
    }

    #[test]
    fn the_cheaper_arm_wins_and_the_other_is_still_explored() {
        for (on_ratio, off_ratio, ahead) in [(1.2, 1.0, false), (0.8, 1.0, true)] {
            let mut g = AheadGate::default();
            feed(&mut g, on_ratio, off_ratio, 2 * MIN_SAMPLES as usize);
            assert_eq!(g.ahead_wins(), Some(ahead));
            let later = feed(&mut g, on_ratio, off_ratio, 8 * EXPLORE_EVERY as usize);
            let chosen = later.iter().filter(|&&a| a == ahead).count();
            assert_eq!(chosen, later.len() - later.len() / EXPLORE_EVERY as usize);
        }
    }

    #[test]
    fn the_gate_follows_a_change_of_load() {
        let mut g = AheadGate::default();
        feed(&mut g, 0.8, 1.0, 40);
        assert_eq!(g.ahead_wins(), Some(true));
        feed(&mut g, 1.5, 1.0, 600);
        assert_eq!(g.ahead_wins(), Some(false));
    }

    #[test]
    fn bad_measurements_are_ignored() {
        let mut g = AheadGate::default();
        g.observe(true, f64::NAN, 1.0);
        g.observe(true, 1.0, 0.0);
        assert_eq!(g.on.samples, 0);
    }

    #[test]
    fn a_block_samples_all_but_its_first_step_after_a_switch() {
        let mut b = AheadBlock::default();
        let mut arms = [false, true, true].into_iter();
        let mut seen = Vec::new();
        for _ in 0..3 * BLOCK_STEPS {
            let on = b.next_step(|| arms.next().unwrap());
            seen.push((on, b.is_sample()));
        }
        let n = BLOCK_STEPS as usize;
        // Block 1 (off) follows nothing: its first step is not a sample.
        assert_eq!(seen[0], (false, false));
        assert!(seen[1..n].iter().all(|&s| s == (false, true)));
        // Block 2 switches to on: first step not a sample.
        assert_eq!(seen[n], (true, false));
        // Block 3 stays on: every step is a sample.
        assert!(seen[2 * n..].iter().all(|&s| s == (true, true)));
    }

    #[test]
    fn a_turn_whose_pre_drafts_miss_stops_asking_and_probes_again() {
        let mut g = PipelineGate::default();
        assert!(g.ask(), "asks before knowing");
        g.observe(false);
        g.observe(false);
        let asked: Vec<bool> = (0..2 * PIPELINE_PROBE_STEPS).map(|_| g.ask()).collect();
        assert_eq!(
            asked.iter().filter(|&&a| a).count(),
            2,
            "one probe every {PIPELINE_PROBE_STEPS} steps: {asked:?}"
        );
        // Probes that hit bring it back.
        g.observe(true);
        g.observe(true);
        assert!(g.hit_rate >= PIPELINE_MIN_HIT_RATE);
        assert!((0..3).all(|_| g.ask()));
    }
}
