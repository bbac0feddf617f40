//! Choosing each step's tree shape: the budget policy's starting point (its cost prior
//! and search space, operating decisions set by flags) and how a request's overrides,
//! the policy's choice and the fallback shape combine.

use speculate::{BudgetPolicy, CostModel, DraftParams, PolicySpace, TreeMode, VerifyCostTable};

/// The budget policy's prior and search space, and the shape used where neither the
/// request nor the policy sets one (all from flags; the defaults are CPU-flavoured).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanConfig {
    /// Prior cost of one draft level, in ns.
    pub draft_level_ns: f64,
    /// Prior cost of one drafted row, in ns.
    pub draft_node_ns: f64,
    /// Node counts of the prior verify-cost grid.
    pub verify_nodes: Vec<usize>,
    /// Batch sizes of the prior verify-cost grid.
    pub verify_batches: Vec<usize>,
    /// Prior verify cost, batch-major over (batches x nodes), in ns. Replaced by the first
    /// target's start-up measurement when it reports one.
    pub verify_ns: Vec<f64>,
    /// What the policy may choose.
    pub space: PolicySpace,
    /// When the policy prefers not to draft, still draft every `probe_period`-th step
    /// (dynamic mode) to keep learning the acceptance; 0 never probes.
    pub probe_period: u32,
    /// An adaptive turn for which the policy expects no gain from drafting at the current
    /// load runs target-only without setting up a draft (its set-up prefill would compete
    /// with the target for nothing), except every `explore_turns`-th such turn without
    /// batch-mates, which keeps acceptance and draft costs measured; 1 sets up a draft
    /// for every turn.
    pub explore_turns: u32,
    /// Depth, branching and budget used when neither the request nor the policy sets one.
    pub fallback: (usize, usize, usize),
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            draft_level_ns: Self::DEFAULT_DRAFT_LEVEL_NS,
            draft_node_ns: Self::DEFAULT_DRAFT_NODE_NS,
            verify_nodes: Self::DEFAULT_VERIFY_NODES.to_vec(),
            verify_batches: Self::DEFAULT_VERIFY_BATCHES.to_vec(),
            verify_ns: Self::DEFAULT_VERIFY_NS.to_vec(),
            space: PolicySpace::DEFAULT,
            probe_period: Self::DEFAULT_PROBE_PERIOD,
            explore_turns: Self::DEFAULT_EXPLORE_TURNS,
            fallback: Self::DEFAULT_FALLBACK,
        }
    }
}

/// The defaults, written once: [`PlanConfig::default`] and the orchestrator's flags use them.
impl PlanConfig {
    /// Prior cost of one draft level, ns.
    pub const DEFAULT_DRAFT_LEVEL_NS: f64 = 2e6;
    /// Prior cost of one drafted row, ns.
    pub const DEFAULT_DRAFT_NODE_NS: f64 = 1e5;
    /// Node counts of the prior verify-cost grid.
    pub const DEFAULT_VERIFY_NODES: [usize; 4] = [1, 16, 64, 256];
    /// Batch sizes of the prior verify-cost grid.
    pub const DEFAULT_VERIFY_BATCHES: [usize; 2] = [1, 8];
    /// The prior verify costs, batch-major, ns.
    pub const DEFAULT_VERIFY_NS: [f64; 8] = [8e6, 10e6, 16e6, 40e6, 20e6, 30e6, 60e6, 200e6];
    /// Probe every 4th step the policy would not draft.
    pub const DEFAULT_PROBE_PERIOD: u32 = 4;
    /// Explore every 8th turn the policy would run target-only.
    pub const DEFAULT_EXPLORE_TURNS: u32 = 8;
    /// Depth, branching and budget when neither the request nor the policy sets one.
    pub const DEFAULT_FALLBACK: (usize, usize, usize) = (4, 2, 16);

    /// The budget policy this configuration starts from.
    pub fn policy(&self) -> Result<BudgetPolicy, speculate::CostError> {
        let verify = VerifyCostTable::new(
            self.verify_nodes.clone(),
            self.verify_batches.clone(),
            self.verify_ns.clone(),
        )?;
        Ok(BudgetPolicy::new(
            CostModel::new(self.draft_level_ns, self.draft_node_ns, verify),
            self.space,
        ))
    }
}

/// A request's speculation settings: a tree shape (or `None`: target-only) and
/// overrides of D, K, M (0 = the policy's choice).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecSettings {
    /// Tree shape, `None` = off (target-only).
    pub mode: Option<TreeMode>,
    /// D override (0 = policy).
    pub depth: usize,
    /// K override (0 = policy).
    pub branching: usize,
    /// M override (0 = policy).
    pub budget: usize,
    /// Whether the draft may pre-draft the next tree while the target verifies.
    pub draft_ahead: bool,
    /// Whether the turn streams each step's tree and accepted path with its tokens
    /// ([`crate::events::StepView`]; the playground's view of speculation).
    pub report_steps: bool,
}

impl SpecSettings {
    /// Adaptive speculation with draft-ahead: the default of both APIs.
    pub fn adaptive() -> Self {
        Self {
            mode: Some(TreeMode::Dynamic),
            depth: 0,
            branching: 0,
            budget: 0,
            draft_ahead: true,
            report_steps: false,
        }
    }

    /// Whether the budget policy chooses every step's shape (dynamic, no overrides).
    pub fn is_adaptive(&self) -> bool {
        self.mode == Some(TreeMode::Dynamic)
            && self.depth == 0
            && self.branching == 0
            && self.budget == 0
    }
}

/// The tree shape of step `step`: the request's overrides first, then the policy's
/// `choice`, then the fallback shape. `None` when speculation is off.
pub fn choose_params(
    cfg: &PlanConfig,
    spec: &SpecSettings,
    choice: &DraftParams,
    step: u32,
) -> Option<DraftParams> {
    let mode = spec.mode?;
    let pick = |o: usize, p: usize, fallback: usize| {
        if o > 0 {
            o
        } else if p > 0 {
            p
        } else {
            fallback
        }
    };
    let (fd, fk, fm) = cfg.fallback;
    let p = match mode {
        TreeMode::Chain => DraftParams::chain(pick(spec.depth, choice.depth, fd)),
        TreeMode::Static => DraftParams::static_tree(
            pick(spec.depth, choice.depth, fd),
            pick(spec.branching, choice.branching, fk),
            pick(spec.budget, choice.budget, fm),
        ),
        TreeMode::Dynamic => {
            let probe = cfg.probe_period > 0 && step % cfg.probe_period == cfg.probe_period - 1;
            if spec.is_adaptive() && choice.depth == 0 && !probe {
                // The policy prefers no drafting; probe now and then to keep learning.
                return Some(DraftParams::none());
            }
            if spec.is_adaptive() && choice.depth > 0 {
                // Adaptive: the policy's shape as it is; a chain is the dynamic tree of
                // branching 1 (drafting K rows a level to keep one would be wasted work).
                return Some(*choice);
            }
            let d = pick(spec.depth, choice.depth, fd);
            let k = pick(spec.branching, choice.branching.max(2), fk);
            let m = pick(spec.budget, choice.budget.max(d), fm);
            DraftParams::dynamic(d, k, m)
        }
    };
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(mode: Option<TreeMode>, depth: usize) -> SpecSettings {
        SpecSettings {
            mode,
            depth,
            branching: 0,
            budget: 0,
            draft_ahead: true,
            report_steps: false,
        }
    }

    #[test]
    fn defaults_build_a_policy() {
        assert!(PlanConfig::default().policy().is_ok());
    }

    #[test]
    fn overrides_then_policy_then_fallback() {
        let cfg = PlanConfig::default();
        let none = DraftParams::none();
        assert_eq!(choose_params(&cfg, &spec(None, 3), &none, 0), None);
        assert_eq!(
            choose_params(&cfg, &spec(Some(TreeMode::Chain), 3), &none, 0),
            Some(DraftParams::chain(3))
        );
        let unset = DraftParams {
            branching: 0,
            ..none
        };
        assert_eq!(
            choose_params(&cfg, &spec(Some(TreeMode::Static), 0), &unset, 0),
            Some(DraftParams::static_tree(4, 2, 16))
        );
        let policy = DraftParams::dynamic(5, 3, 20);
        assert_eq!(
            choose_params(&cfg, &spec(Some(TreeMode::Dynamic), 0), &policy, 0),
            Some(policy)
        );
        // Adaptive keeps the policy's chain; a request's overrides still build a tree.
        let chain = DraftParams::chain(3);
        assert_eq!(
            choose_params(&cfg, &spec(Some(TreeMode::Dynamic), 0), &chain, 0),
            Some(chain)
        );
        assert_eq!(
            choose_params(&cfg, &spec(Some(TreeMode::Dynamic), 5), &chain, 0),
            Some(DraftParams::dynamic(5, 2, 5))
        );
    }

    #[test]
    fn a_policy_that_prefers_no_tree_is_probed_every_period() {
        let cfg = PlanConfig::default();
        let none = DraftParams::none();
        let dynamic = spec(Some(TreeMode::Dynamic), 0);
        let drafted: Vec<bool> = (0..8)
            .map(|step| choose_params(&cfg, &dynamic, &none, step).unwrap().depth > 0)
            .collect();
        assert_eq!(
            drafted,
            [false, false, false, true, false, false, false, true]
        );
        let never = PlanConfig {
            probe_period: 0,
            ..PlanConfig::default()
        };
        assert!((0..8).all(|s| choose_params(&never, &dynamic, &none, s).unwrap().depth == 0));
    }
}
