//! Budget policy on synthetic cost curves.

use speculate::{
    AcceptanceStats, BudgetPolicy, CostModel, DraftParams, PolicySpace, SamplingParams,
    StopConditions, TokenTree, TreeLimits, TreeMode, VerifyCostTable, verify,
};

const MS: f64 = 1e6;

/// GPU-like: verifying up to 128 nodes costs about as much as one token (memory bound).
fn gpu() -> CostModel {
    let nodes = vec![1, 16, 64, 128, 256];
    let batches = vec![1, 8];
    let ns = vec![
        20.0 * MS,
        20.5 * MS,
        21.0 * MS,
        23.0 * MS,
        40.0 * MS, // batch 1
        22.0 * MS,
        24.0 * MS,
        30.0 * MS,
        45.0 * MS,
        90.0 * MS, // batch 8
    ];
    CostModel::new(
        1.0 * MS,
        0.01 * MS,
        VerifyCostTable::new(nodes, batches, ns).unwrap(),
    )
}

/// CPU-like: verify time grows linearly with the nodes (compute bound): 20 ms for one token,
/// 4 ms more per extra node.
fn cpu() -> CostModel {
    let nodes = vec![1, 64];
    let ns = vec![20.0 * MS, (20.0 + 63.0 * 4.0) * MS];
    CostModel::new(
        1.0 * MS,
        0.05 * MS,
        VerifyCostTable::new(nodes, vec![1], ns).unwrap(),
    )
}

fn space() -> PolicySpace {
    PolicySpace {
        max_depth: 8,
        max_branching: 8,
        max_budget: 63,
    }
}

#[test]
fn flat_gpu_verify_cost_picks_a_big_tree() {
    let policy = BudgetPolicy::new(gpu(), space());
    let p = policy.choose(1);
    assert_eq!(p.mode, TreeMode::Dynamic, "{p:?}");
    assert!(p.budget >= 32 && p.depth >= 4 && p.branching >= 2, "{p:?}");
    let e = policy.estimate(&p, 1);
    assert!(e.tokens_per_session > 2.0, "{e:?}");
    assert!(e.tokens_per_second > policy.estimate(&DraftParams::none(), 1).tokens_per_second);
}

#[test]
fn linear_cpu_verify_cost_picks_a_small_tree() {
    let policy = BudgetPolicy::new(cpu(), space());
    let p = policy.choose(1);
    let nodes = if p.depth == 0 { 0 } else { p.budget };
    assert!(nodes <= 3, "{p:?}");
    let big = policy.estimate(&DraftParams::dynamic(6, 4, 40), 1);
    assert!(policy.estimate(&p, 1).tokens_per_second > 2.0 * big.tokens_per_second);
}

#[test]
fn bigger_batches_shrink_the_tree() {
    let policy = BudgetPolicy::new(gpu(), space());
    let alone = policy.choose(1);
    let batched = policy.choose(8);
    assert!(batched.budget < alone.budget, "{alone:?} vs {batched:?}");
}

#[test]
fn costly_drafting_means_no_drafting() {
    let verify = VerifyCostTable::constant(10.0 * MS).unwrap();
    let policy = BudgetPolicy::new(CostModel::new(50.0 * MS, 0.0, verify), space());
    assert_eq!(policy.choose(1), DraftParams::none());
}

#[test]
fn a_request_whose_draft_disagrees_gets_a_smaller_tree() {
    let policy = BudgetPolicy::new(gpu(), space());
    let shared = policy.choose(1);
    let mut poor = policy.acceptance.clone();
    poor.alpha = 0.2;
    // The target never takes the draft's children: acceptance falls towards 0.
    let (tree, _) = accept_all_step(4);
    let reject = speculate::VerifyOutcome {
        accepted_path: vec![0],
        emitted: vec![999],
        ..accept_all_step(4).1
    };
    for _ in 0..30 {
        poor.observe(&tree, &reject);
    }
    let mine = policy.choose_for(&poor, 1);
    let nodes = |p: &DraftParams| if p.depth == 0 { 0 } else { p.budget };
    assert!(nodes(&mine) < nodes(&shared), "{shared:?} vs {mine:?}");
}

#[test]
fn per_step_overhead_grows_the_tree() {
    let mut policy = BudgetPolicy::new(cpu(), space());
    let without = policy.choose(1);
    // Round trips of 30 ms per step: amortised over more tokens by a bigger tree.
    for _ in 0..100 {
        policy.observe_overhead(30.0 * MS, Some(30.0 * MS));
    }
    assert!((policy.cost.verify_overhead_ns - 30.0 * MS).abs() < 0.01 * MS);
    let with = policy.choose(1);
    let nodes = |p: &DraftParams| if p.depth == 0 { 0 } else { p.budget };
    assert!(nodes(&with) > nodes(&without), "{without:?} vs {with:?}");
    // The overhead counts in every estimate: drafting adds its own round trip.
    let none = policy.estimate(&DraftParams::none(), 1);
    assert!((none.step_ns - 50.0 * MS).abs() < 0.1 * MS, "{none:?}");
}

/// A chain verified with the target always taking the best child.
fn accept_all_step(depth: usize) -> (TokenTree, speculate::VerifyOutcome) {
    let v = 4;
    let limits = TreeLimits {
        max_nodes: 64,
        max_depth: 64,
        vocab_size: v,
    };
    // Each node has children 1 (best) and 2; the target always picks 1.
    let (mut tokens, mut parents, mut scores) = (vec![0u32], vec![-1i32], vec![0.0f32]);
    let mut spine = 0;
    for d in 0..depth {
        tokens.extend([1, 2]);
        parents.extend([spine as i32, spine as i32]);
        scores.extend([-0.1 * (d + 1) as f32, -3.0]);
        spine = tokens.len() - 2;
    }
    let n = tokens.len();
    let tree = TokenTree::new(tokens, parents, scores, &limits).unwrap();
    let logits: Vec<f32> = (0..n).flat_map(|_| [0.0, 9.0, 0.0, 0.0]).collect();
    let stop = StopConditions {
        eos_token_ids: vec![],
        max_new_tokens: 100,
    };
    let out = verify(&tree, &logits, v, &SamplingParams::greedy(), 0, &stop);
    (tree, out)
}

#[test]
fn acceptance_stats_learn_from_outcomes() {
    let mut stats = AcceptanceStats::new(8, 4);
    let prior = stats.rate(1, 0);
    let (tree, out) = accept_all_step(5);
    assert_eq!(out.accepted, 5);
    for _ in 0..300 {
        stats.observe(&tree, &out);
    }
    for d in 1..=5 {
        assert!(stats.rate(d, 0) > 0.99, "depth {d}: {}", stats.rate(d, 0));
        assert!(stats.rate(d, 1) < 0.01);
    }
    // Depth 6 was never visited with children: it takes depth 5's rates (not the prior).
    assert_ne!(stats.rate(6, 0), prior);
    assert_eq!(stats.rate(6, 0), stats.rate(5, 0));
    assert_eq!(stats.rate(8, 1), stats.rate(5, 1));
    assert_eq!(
        AcceptanceStats::new(8, 4).rate(8, 0),
        prior,
        "nothing observed: the prior"
    );
    assert_eq!(stats.observations(), 300 * 5);
    // Near-certain acceptance makes long chains worthwhile even on the CPU cost curve.
    let mut policy = BudgetPolicy::new(cpu(), space());
    let before = policy.choose(1);
    policy.acceptance = stats;
    let after = policy.choose(1);
    assert!(after.depth > before.depth, "{before:?} -> {after:?}");
}

#[test]
fn dynamic_curve_is_best_first() {
    let stats = AcceptanceStats::with_prior(3, &[0.5, 0.25]);
    let c = stats.dynamic_curve(3, 2, 10);
    // Best-first pops: .5 (d1), .25 (d1), .25 (d2 under .5), .125 (d2 under .5), .125 (d2 under
    // the d1 .25; not expanded: depth 2 already has K = 2 expanded nodes), .125 (d3), then the
    // three .0625 (d2 under .25, d3 under .25, d3 under .125), then .03125 (d3).
    let expect = [
        0.0, 0.5, 0.75, 1.0, 1.125, 1.25, 1.375, 1.4375, 1.5, 1.5625, 1.59375,
    ];
    assert_eq!(c.len(), expect.len());
    for (a, b) in c.iter().zip(expect) {
        assert!((a - b).abs() < 1e-12, "{c:?}");
    }
    assert!((stats.chain_acceptance(3) - 0.875).abs() < 1e-12);
    let p = DraftParams::static_tree(2, 2, 5);
    // Static: .5 .25 | .25 .125 (under .5) .125 (best child of .25).
    assert!((stats.expected_accepted(&p) - 1.25).abs() < 1e-12);
}

#[test]
fn verify_cost_interpolates_and_learns_online() {
    let t = VerifyCostTable::new(vec![1, 11], vec![1, 3], vec![10.0, 20.0, 30.0, 60.0]).unwrap();
    assert_eq!(t.estimate(1, 1), 10.0);
    assert_eq!(t.estimate(6, 1), 15.0);
    assert_eq!(t.estimate(6, 2), (15.0 + 45.0) / 2.0);
    assert_eq!(t.estimate(21, 1), 30.0, "extrapolates the last segment");
    assert!(VerifyCostTable::new(vec![2, 1], vec![1], vec![1.0, 1.0]).is_err());
    assert_eq!(
        VerifyCostTable::new(vec![1, 2], vec![1], vec![1.0])
            .unwrap_err()
            .to_string(),
        "verify cost table needs 2 measurements (batches x nodes), got 1"
    );
    let mut m = CostModel::new(0.0, 0.0, t);
    for _ in 0..800 {
        m.observe_verify(6, 1, 25.0);
        m.observe_draft(3, 12, 3.0 * 100.0 + 12.0 * 5.0);
        m.observe_draft(5, 2, 5.0 * 100.0 + 2.0 * 5.0);
    }
    assert!((m.verify_ns(6, 1) - 25.0).abs() < 0.1);
    assert!(
        (m.draft_level_ns - 100.0).abs() < 1.0,
        "{}",
        m.draft_level_ns
    );
    assert!((m.draft_node_ns - 5.0).abs() < 1.0, "{}", m.draft_node_ns);
}

#[test]
fn a_draft_prior_far_off_is_forgotten_within_a_few_measurements() {
    let table = VerifyCostTable::constant(1e6).unwrap();
    // Prior 2 ms a level; the draft really takes 50 us a level and 10 us a row.
    let mut cost = CostModel::new(2e6, 1e5, table);
    let truth = |levels: usize, rows: usize| 5e4 * levels as f64 + 1e4 * rows as f64;
    for (levels, rows) in [(3, 3), (4, 9), (2, 2), (5, 13), (3, 7), (4, 4)] {
        cost.observe_draft(levels, rows, truth(levels, rows));
    }
    for (levels, rows) in [(3, 3), (5, 13)] {
        let (got, want) = (cost.draft_ns(levels, rows), truth(levels, rows));
        assert!((got - want).abs() < 0.35 * want, "{got} vs {want}");
    }
}

#[test]
fn a_calibrated_draft_cost_fits_the_measured_levels_and_outlasts_one_slow_request() {
    let table = VerifyCostTable::constant(1e6).unwrap();
    let mut cost = CostModel::new(2e6, 1e5, table);
    // A level costs 20 us plus 3 us a row fed.
    let points: Vec<(usize, f64)> = [1, 2, 4, 8, 16, 32]
        .iter()
        .map(|&r| (r, 2e4 + 3e3 * r as f64))
        .collect();
    cost.calibrate_draft(&points).unwrap();
    assert!(
        (cost.draft_level_ns - 2e4).abs() < 1.0,
        "{}",
        cost.draft_level_ns
    );
    assert!(
        (cost.draft_node_ns - 3e3).abs() < 0.1,
        "{}",
        cost.draft_node_ns
    );
    // A first request ten times slower (cold caches) moves the fit, not by ten times.
    cost.observe_draft(1, 2, 10.0 * (2e4 + 6e3));
    assert!(
        cost.draft_ns(1, 2) < 2.0 * (2e4 + 6e3),
        "{}",
        cost.draft_ns(1, 2)
    );
    // Flat or falling times give a non-negative split; bad reports are refused.
    cost.calibrate_draft(&[(1, 5e4), (8, 4e4)]).unwrap();
    assert!(cost.draft_level_ns > 0.0 && cost.draft_node_ns == 0.0);
    assert!(cost.calibrate_draft(&[(4, 1e4)]).is_err());
    assert!(cost.calibrate_draft(&[]).is_err());
    assert!(cost.calibrate_draft(&[(1, f64::NAN), (2, 1.0)]).is_err());
}
