//! Statistical test: tokens emitted by tree verification follow the target distribution
//! (after temperature, top-k and top-p), whatever the draft proposed. Chi-square goodness of fit
//! with fixed seeds, so the test is deterministic.

use speculate::{SamplingParams, StopConditions, TokenTree, TreeLimits, verify};

const V: usize = 6;
const LOGITS: [f32; V] = [2.0, 1.5, 1.0, 0.2, -0.5, 0.9];
const N: u64 = 20_000;

/// The target distribution computed independently in f64: softmax(l / T), top-k, top-p,
/// renormalised.
fn expected(p: &SamplingParams) -> Vec<f64> {
    let t = p.temperature as f64;
    let w: Vec<f64> = LOGITS.iter().map(|&l| (l as f64 / t).exp()).collect();
    let mut order: Vec<usize> = (0..V).collect();
    order.sort_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        order.truncate(p.top_k);
    }
    let z: f64 = order.iter().map(|&i| w[i]).sum();
    let mut kept = Vec::new();
    let mut acc = 0.0;
    for &i in &order {
        kept.push(i);
        acc += w[i] / z;
        if acc >= p.top_p as f64 {
            break;
        }
    }
    let zk: f64 = kept.iter().map(|&i| w[i]).sum();
    (0..V)
        .map(|i| if kept.contains(&i) { w[i] / zk } else { 0.0 })
        .collect()
}

/// Chi-square critical values at p = 0.001 for 1..=5 degrees of freedom.
const CRITICAL: [f64; 5] = [10.83, 13.82, 16.27, 18.47, 20.52];

/// Emits the first token of a verify step `N` times (different positions) and checks its
/// frequencies. The tree proposes tokens 0, 3 and 4 under the root (with 1 under 0), so a
/// verifier that favoured drafted tokens would be caught.
fn check(p: SamplingParams) {
    let limits = TreeLimits {
        max_nodes: 8,
        max_depth: 4,
        vocab_size: V,
    };
    let tree = TokenTree::new(
        vec![5, 0, 3, 4, 1],
        vec![-1, 0, 0, 0, 1],
        vec![0.0, -0.1, -2.0, -3.0, -0.5],
        &limits,
    )
    .unwrap();
    let logits: Vec<f32> = (0..tree.len()).flat_map(|_| LOGITS).collect();
    let stop = StopConditions {
        eos_token_ids: vec![],
        max_new_tokens: 16,
    };
    let mut first = [0u64; V];
    let mut second = [0u64; V];
    let mut second_n = 0;
    for pos in 0..N {
        let out = verify(&tree, &logits, V, &p, pos * 7, &stop);
        first[out.emitted[0] as usize] += 1;
        if out.emitted.len() > 1 {
            second[out.emitted[1] as usize] += 1;
            second_n += 1;
        }
    }
    let q = expected(&p);
    let (chi, df) = chi_square(&first, N, &q);
    assert!(
        chi < CRITICAL[df - 1],
        "{p:?}: first-token chi-square {chi:.2} (df {df}) over {}; counts {first:?}, expected {q:?}",
        CRITICAL[df - 1]
    );
    // The token after an accepted draft is again a fresh target sample.
    if second_n > 2_000 {
        let (chi, df) = chi_square(&second, second_n, &q);
        assert!(
            chi < CRITICAL[df - 1],
            "{p:?}: second-token chi-square {chi:.2}"
        );
    }
}

fn chi_square(counts: &[u64], n: u64, q: &[f64]) -> (f64, usize) {
    let mut chi = 0.0;
    let mut df = 0;
    for (i, &c) in counts.iter().enumerate() {
        if q[i] == 0.0 {
            assert_eq!(c, 0, "token {i} is outside the support but was emitted");
            continue;
        }
        let e = q[i] * n as f64;
        chi += (c as f64 - e).powi(2) / e;
        df += 1;
    }
    (chi, df.max(2) - 1)
}

#[test]
fn plain_sampling_matches_target_distribution() {
    check(SamplingParams::sampled(1.0, 1234));
}

#[test]
fn tempered_sampling_matches_target_distribution() {
    check(SamplingParams::sampled(0.6, 99));
    check(SamplingParams::sampled(2.5, 5));
}

#[test]
fn top_k_and_top_p_match_target_distribution() {
    let mut p = SamplingParams::sampled(1.0, 77);
    p.top_k = 4;
    check(p);
    p.top_k = 0;
    p.top_p = 0.8;
    check(p);
    p.top_k = 5;
    p.top_p = 0.9;
    p.temperature = 0.8;
    check(p);
}
