//! Fuzzing tree validation ([`TokenTree::new`]): arbitrary arrays and near-valid trees (a
//! valid tree with one field broken, limits at the edge) must give a tree or a clean
//! [`TreeError`], never a panic or an outsized allocation; accepted trees satisfy every
//! invariant the verifier relies on. `SPECLLAVA_FUZZ_CASES` sets the case count.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use specllava_harness::fuzz::{CappedAlloc, cases};
use speculate::{TokenTree, TreeError, TreeLimits};

#[global_allocator]
static ALLOC: CappedAlloc<{ 64 << 20 }> = CappedAlloc;

const DEFAULT_CASES: u32 = 2_000;

/// Arrays exactly as a client could send them (lengths may differ, any values).
fn raw() -> impl Strategy<Value = (Vec<u32>, Vec<i32>, Vec<f32>)> {
    let token = prop_oneof![0u32..40, any::<u32>()];
    let parent = prop_oneof![-2i32..40, any::<i32>()];
    let score = prop_oneof![-10f32..1.0, any::<f32>(), Just(f32::NAN)];
    (
        prop::collection::vec(token, 0..48),
        prop::collection::vec(parent, 0..48),
        prop::collection::vec(score, 0..48),
    )
}

/// A valid tree over a vocabulary of 40 (parents before children, distinct sibling tokens
/// up to 40 nodes), then one mutation: a bad parent, a second root, a token out of the vocabulary,
/// a NaN score, a truncated array, or nothing.
fn near_valid() -> impl Strategy<Value = (Vec<u32>, Vec<i32>, Vec<f32>)> {
    (1usize..64, any::<u64>(), 0u8..8, any::<u32>()).prop_map(|(n, seed, op, x)| {
        let mut z = seed;
        let mut next = || {
            z = z
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (z >> 33) as usize
        };
        let mut tokens = vec![next() as u32 % 40];
        let mut parents = vec![-1i32];
        for i in 1..n {
            parents.push((next() % i) as i32);
            // Distinct tokens for the first 40 nodes, so most duplicates come from mutations.
            tokens.push(((tokens[0] as usize + i) % 40) as u32);
        }
        let mut scores: Vec<f32> = (0..n).map(|i| -(i as f32) * 0.1).collect();
        let i = x as usize % n;
        match op {
            0 => parents[i] = x as i32,
            1 => parents[i] = i as i32,
            2 => parents[i] = -1,
            3 => tokens[i] = 40 + x % 1000,
            4 => scores[i] = f32::NAN,
            5 => {
                parents.truncate(i);
            }
            _ => {}
        }
        (tokens, parents, scores)
    })
}

/// Limits around the trees' sizes: mostly generous (so mutations are what gets caught),
/// sometimes anything.
fn limits() -> impl Strategy<Value = TreeLimits> {
    let any_limits = (0usize..70, 0usize..70, 0usize..50);
    let generous = (48usize..70, 24usize..70, 40usize..50);
    prop_oneof![1 => any_limits, 3 => generous].prop_map(|(max_nodes, max_depth, vocab_size)| {
        TreeLimits {
            max_nodes,
            max_depth,
            vocab_size,
        }
    })
}

/// What an accepted tree promises.
fn check_invariants(t: &TokenTree, tokens: &[u32], parents: &[i32], limits: &TreeLimits) {
    let n = t.len();
    assert!(n >= 1 && n <= limits.max_nodes);
    assert_eq!(t.tokens(), tokens);
    assert_eq!(t.parents(), parents);
    assert_eq!(t.parent(0), None);
    assert!(t.max_depth() <= limits.max_depth);
    for i in 1..n {
        let p = t.parent(i).expect("a non-root node has a parent");
        assert!(p < i);
        assert_eq!(t.depth(i), t.depth(p) + 1);
        assert!(t.is_ancestor(p, i) && t.is_ancestor(0, i) && !t.is_ancestor(i, p));
        assert_eq!(t.path_to(i).len(), t.depth(i) + 1);
        assert!((t.token(i) as usize) < limits.vocab_size);
    }
    for i in 0..n {
        let kids: Vec<usize> = t.children(i).collect();
        for (a, &x) in kids.iter().enumerate() {
            assert_eq!(t.parent(x), Some(i));
            assert!(kids[a + 1..].iter().all(|&y| t.token(y) != t.token(x)));
            assert_eq!(t.child_with_token(i, t.token(x)), Some(x));
        }
    }
    assert_eq!(t.dense_mask().len(), n * n);
    assert_eq!(
        t.position_ids(7),
        t.depths().iter().map(|&d| 7 + d as u64).collect::<Vec<_>>()
    );
    for path in t.leaf_paths() {
        assert_eq!(path[0], 0);
    }
}

/// Runs the cases; returns how many ran and how many trees were accepted.
fn run(
    strategy: impl Strategy<Value = ((Vec<u32>, Vec<i32>, Vec<f32>), TreeLimits)>,
) -> (u32, u32) {
    let n = cases(DEFAULT_CASES);
    let accepted = std::cell::Cell::new(0);
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |((tokens, parents, scores), limits)| {
            match TokenTree::new(tokens.clone(), parents.clone(), scores, &limits) {
                Ok(t) => {
                    check_invariants(&t, &tokens, &parents, &limits);
                    accepted.set(accepted.get() + 1);
                }
                Err(e) => {
                    // Every rejection explains itself.
                    assert!(!e.to_string().is_empty());
                    if let TreeError::TooManyNodes { nodes, max } = e {
                        prop_assert!(nodes > max);
                    }
                }
            }
            Ok(())
        })
        .unwrap();
    (n, accepted.get())
}

#[test]
fn fuzz_tree_raw_arrays() {
    let (n, ok) = run((raw(), limits()));
    println!("fuzz_tree_raw_arrays: {n} cases, {ok} trees accepted");
}

#[test]
fn fuzz_tree_near_valid() {
    let (n, ok) = run((near_valid(), limits()));
    println!("fuzz_tree_near_valid: {n} cases, {ok} trees accepted");
}

#[test]
fn huge_trees_are_refused_before_deriving() {
    // A tree claiming more nodes than the limit is refused on its length, before any
    // mask (n^2 / 64 words) is built.
    let n = 1 << 20;
    let limits = TreeLimits {
        max_nodes: 64,
        max_depth: 8,
        vocab_size: 10,
    };
    let parents: Vec<i32> = (0..n as i32).map(|i| i - 1).collect();
    let e = TokenTree::new(vec![1; n], parents, vec![0.0; n], &limits).unwrap_err();
    assert_eq!(e, TreeError::TooManyNodes { nodes: n, max: 64 });
}
