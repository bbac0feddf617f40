//! Tree-building properties: against a straightforward EAGLE-2 reference (no early stop),
//! with frequent score ties and duplicate/unsorted drafter output.

use std::convert::Infallible;

use proptest::prelude::*;
use speculate::{DraftParams, Drafter, PartialTree, TokenTree, TreeLimits, TreeMode, build_tree};

const V: u32 = 6;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Children as a pure function of the path's tokens: 0..5 of them, tokens from a tiny vocabulary
/// (duplicates happen), dyadic log-probs (ties happen), not sorted.
fn raw_children(salt: u64, path: &[u32]) -> Vec<(u32, f32)> {
    let h = path.iter().fold(mix(salt), |h, &t| mix(h ^ (t as u64 + 1)));
    (0..h % 6)
        .map(|j| {
            let r = mix(h ^ (j + 1));
            ((r % V as u64) as u32, -(((r >> 8) % 8) as f32) * 0.25)
        })
        .collect()
}

/// What the builder does with a drafter's list: stable sort by log-prob desc, drop repeated
/// tokens, keep k.
fn clean(mut c: Vec<(u32, f32)>, k: usize) -> Vec<(u32, f32)> {
    c.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut out: Vec<(u32, f32)> = Vec::new();
    for (t, lp) in c {
        if out.len() < k && out.iter().all(|&(u, _)| u != t) {
            out.push((t, lp));
        }
    }
    out
}

struct HashDrafter(u64);

impl Drafter for HashDrafter {
    type Error = Infallible;

    fn expand(
        &mut self,
        p: &PartialTree,
        expand: &[usize],
        _k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>, Infallible> {
        Ok(expand
            .iter()
            .map(|&n| {
                let path: Vec<u32> = p.path_to(n).iter().map(|&i| p.tokens[i]).collect();
                raw_children(self.0, &path)
            })
            .collect())
    }
}

/// Plain EAGLE-2: D levels, top-K frontier per level, rerank all, keep M. Returns
/// (tokens, parents, scores) of the kept tree.
fn reference(salt: u64, root: u32, d: usize, k: usize, m: usize) -> (Vec<u32>, Vec<i32>, Vec<f32>) {
    let (mut tok, mut par, mut sc, mut path) =
        (vec![root], vec![-1i32], vec![0.0f32], vec![vec![root]]);
    let rank = |sc: &[f32], a: usize, b: usize| sc[b].total_cmp(&sc[a]).then(a.cmp(&b));
    let mut frontier = vec![0usize];
    if k > 0 && m > 0 {
        for _ in 0..d {
            frontier.sort_by(|&a, &b| rank(&sc, a, b));
            frontier.truncate(k);
            let mut next = Vec::new();
            for &n in &frontier {
                for (t, lp) in clean(raw_children(salt, &path[n]), k) {
                    let mut p = path[n].clone();
                    p.push(t);
                    tok.push(t);
                    par.push(n as i32);
                    sc.push(sc[n] + lp);
                    path.push(p);
                    next.push(tok.len() - 1);
                }
            }
            frontier = next;
        }
    }
    let mut ids: Vec<usize> = (1..tok.len()).collect();
    ids.sort_by(|&a, &b| rank(&sc, a, b));
    ids.truncate(m);
    ids.push(0);
    ids.sort();
    let new = |old: usize| ids.iter().position(|&x| x == old).unwrap() as i32;
    (
        ids.iter().map(|&i| tok[i]).collect(),
        ids.iter()
            .map(|&i| if i == 0 { -1 } else { new(par[i] as usize) })
            .collect(),
        ids.iter().map(|&i| sc[i]).collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn dynamic_matches_reference_eagle2(
        salt in any::<u64>(), root in 0..V, d in 0usize..6, k in 0usize..5, m in 0usize..30,
    ) {
        let out = build_tree(root, &DraftParams::dynamic(d, k, m), &mut HashDrafter(salt)).unwrap();
        let (tokens, parents, scores) = reference(salt, root, d, k, m);
        prop_assert_eq!(out.tree.tokens(), &tokens[..]);
        prop_assert_eq!(out.tree.parents(), &parents[..]);
        prop_assert_eq!(out.tree.scores(), &scores[..]);
        prop_assert!(out.levels <= d);
    }

    #[test]
    fn every_mode_builds_a_valid_tree_within_limits(
        salt in any::<u64>(), root in 0..V, mode in 0usize..3, d in 0usize..6, k in 0usize..5,
        m in 0usize..30,
    ) {
        let mode = [TreeMode::Dynamic, TreeMode::Static, TreeMode::Chain][mode];
        let params = DraftParams { mode, depth: d, branching: k, budget: m };
        let out = build_tree(root, &params, &mut HashDrafter(salt)).unwrap();
        let t = &out.tree;
        let limits = TreeLimits { max_nodes: m + 1, max_depth: d, vocab_size: V as usize };
        let again = TokenTree::new(t.tokens().to_vec(), t.parents().to_vec(), t.scores().to_vec(), &limits);
        prop_assert_eq!(again.as_ref(), Ok(t));
        prop_assert_eq!(out.drafted_ids.len(), t.len());
        prop_assert_eq!(out.drafted_ids[0], 0);
        prop_assert!(out.drafted_ids.windows(2).all(|w| w[0] < w[1]));
        if mode == TreeMode::Chain {
            prop_assert!(t.children(0).count() <= 1 && t.leaves().len() == 1);
        }
        // Scores never rise along a path.
        for i in 1..t.len() {
            prop_assert!(t.scores()[i] <= t.scores()[t.parent(i).unwrap()]);
        }
    }
}
