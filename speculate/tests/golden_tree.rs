//! Golden-value tests for tree building, in the style of sglang's `build_eagle_tree` tests:
//! a fixed drafter table, and the exact tokens / parents / depths / masks / expansion calls.

use std::collections::HashMap;
use std::convert::Infallible;

use speculate::{
    BuildError, DraftParams, Drafter, PartialTree, TokenTree, TreeBuilder, TreeMode, build_tree,
};

/// Children of a node depend only on its token (tokens are unique in these trees).
struct TableDrafter {
    table: HashMap<u32, Vec<(u32, f32)>>,
    calls: Vec<(Vec<usize>, usize)>,
}

impl TableDrafter {
    /// Dyadic log-probs, so cumulative scores are exact and ties are real ties.
    fn new() -> Self {
        let table = HashMap::from([
            (100, vec![(1, -0.25), (2, -1.0)]),
            (1, vec![(3, -0.5), (4, -0.75)]),
            (2, vec![(5, -0.125), (6, -2.0)]),
            (3, vec![(7, -0.25), (8, -1.5)]),
            (4, vec![(9, -0.5), (10, -0.625)]),
            (5, vec![(11, -0.5), (12, -0.75)]),
            (6, vec![(13, -0.5), (14, -0.75)]),
            (7, vec![(15, -0.25), (16, -0.5)]),
        ]);
        Self {
            table,
            calls: Vec::new(),
        }
    }
}

impl Drafter for TableDrafter {
    type Error = Infallible;

    fn expand(
        &mut self,
        partial: &PartialTree,
        expand: &[usize],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>, Infallible> {
        self.calls.push((expand.to_vec(), k));
        Ok(expand
            .iter()
            .map(|&n| {
                let t = partial.tokens[n];
                self.table
                    .get(&t)
                    .map_or(Vec::new(), |c| c.iter().copied().take(k).collect())
            })
            .collect())
    }
}

fn masks(t: &TokenTree) -> Vec<u64> {
    (0..t.len()).map(|i| t.ancestor_bitset(i)[0]).collect()
}

#[test]
fn dynamic_tree_golden() {
    // Drafted scores: n1 -0.25, n2 -1.0, n3 -0.75, n4 -1.0, n5 -1.125, n6 -3.0, n7 -1.0,
    // n8 -2.25, n9 -1.5, n10 -1.625. Level 3 expands the top-2 of level 2: n3, n4.
    // Top 5 by (score desc, id asc): n1, n3, n2, n4, n7 (the -1.0 tie goes to the lower ids).
    let mut d = TableDrafter::new();
    let out = build_tree(100, &DraftParams::dynamic(3, 2, 5), &mut d).unwrap();
    let t = &out.tree;
    assert_eq!(
        d.calls,
        vec![(vec![0], 2), (vec![1, 2], 2), (vec![3, 4], 2)]
    );
    assert_eq!(t.tokens(), &[100, 1, 2, 3, 4, 7]);
    assert_eq!(t.parents(), &[-1, 0, 0, 1, 1, 3]);
    assert_eq!(t.depths(), &[0, 1, 1, 2, 2, 3]);
    assert_eq!(t.scores(), &[0.0, -0.25, -1.0, -0.75, -1.0, -1.0]);
    assert_eq!(masks(t), vec![0b1, 0b11, 0b101, 0b1011, 0b10011, 0b101011]);
    assert_eq!(
        t.leaf_paths(),
        vec![vec![0, 2], vec![0, 1, 4], vec![0, 1, 3, 5]]
    );
    assert_eq!(t.first_child(0), Some(1));
    assert_eq!(t.next_sibling(1), Some(2));
    assert_eq!(t.first_child(3), Some(5));
    assert_eq!(out.drafted_ids, vec![0, 1, 2, 3, 4, 7]);
    assert_eq!((out.levels, out.drafted_nodes), (3, 10));
}

#[test]
fn dynamic_tie_break_prefers_lower_ids() {
    let mut d = TableDrafter::new();
    let out = build_tree(100, &DraftParams::dynamic(3, 2, 4), &mut d).unwrap();
    assert_eq!(out.tree.tokens(), &[100, 1, 2, 3, 4]);
    assert_eq!(out.tree.parents(), &[-1, 0, 0, 1, 1]);
}

#[test]
fn dynamic_stops_early_when_no_descendant_can_be_kept() {
    // After level 2 the 2nd best node is n3 (-0.75), which is also the best frontier node:
    // nothing deeper can enter the top 2, so level 3 is never drafted.
    let mut d = TableDrafter::new();
    let out = build_tree(100, &DraftParams::dynamic(3, 2, 2), &mut d).unwrap();
    assert_eq!(d.calls.len(), 2);
    assert_eq!(out.tree.tokens(), &[100, 1, 3]);
    assert_eq!(out.tree.parents(), &[-1, 0, 1]);
    assert_eq!((out.levels, out.drafted_nodes), (2, 6));
}

#[test]
fn dynamic_wide_frontier_golden() {
    // K = 3 but the table has at most 2 children: level 2 expands all of n1, n2.
    let mut d = TableDrafter::new();
    let out = build_tree(100, &DraftParams::dynamic(4, 3, 8), &mut d).unwrap();
    // Level 3 frontier = top-3 of {n3 -0.75, n4 -1.0, n5 -1.125, n6 -3.0} = n3, n4, n5:
    // n7 -1.0, n8 -2.25 (from n3), n9 -1.5, n10 -1.625 (n4), n11 -1.625, n12 -1.875 (n5).
    // Level 4 frontier = top-3 of level 3 = n7, n9, n10 (n10 beats n11 on id); only n7 has
    // children in the table: n13 (tok 15) -1.25, n14 (tok 16) -1.5.
    // Top 8: n1 -.25, n3 -.75, n2 -1, n4 -1, n7 -1, n5 -1.125, n13 -1.25, n9 -1.5 (n14 -1.5 is later).
    assert_eq!(
        d.calls,
        vec![
            (vec![0], 3),
            (vec![1, 2], 3),
            (vec![3, 4, 5], 3),
            (vec![7, 9, 10], 3)
        ]
    );
    assert_eq!(out.drafted_ids, vec![0, 1, 2, 3, 4, 5, 7, 9, 13]);
    assert_eq!(out.tree.tokens(), &[100, 1, 2, 3, 4, 5, 7, 9, 15]);
    assert_eq!(out.tree.parents(), &[-1, 0, 0, 1, 1, 2, 3, 4, 6]);
    assert_eq!(out.tree.depths(), &[0, 1, 1, 2, 2, 2, 3, 3, 4]);
    assert_eq!(out.drafted_nodes, 14);
}

#[test]
fn static_tree_golden() {
    // Breadth-first, 2 children per node, cut at 5 nodes: n1 n2 | n3 n4 (of n1) n5 (of n2).
    let mut d = TableDrafter::new();
    let out = build_tree(100, &DraftParams::static_tree(3, 2, 5), &mut d).unwrap();
    assert_eq!(d.calls, vec![(vec![0], 2), (vec![1, 2], 2)]);
    assert_eq!(out.tree.tokens(), &[100, 1, 2, 3, 4, 5]);
    assert_eq!(out.tree.parents(), &[-1, 0, 0, 1, 1, 2]);
    assert_eq!(
        masks(&out.tree),
        vec![0b1, 0b11, 0b101, 0b1011, 0b10011, 0b100101]
    );
    assert_eq!(out.levels, 2);
}

#[test]
fn chain_golden() {
    let mut d = TableDrafter::new();
    let out = build_tree(100, &DraftParams::chain(3), &mut d).unwrap();
    assert_eq!(d.calls, vec![(vec![0], 1), (vec![1], 1), (vec![2], 1)]);
    assert_eq!(out.tree.tokens(), &[100, 1, 3, 7]);
    assert_eq!(out.tree.parents(), &[-1, 0, 1, 2]);
    assert_eq!(out.tree.scores(), &[0.0, -0.25, -0.75, -1.0]);
    assert_eq!(masks(&out.tree), vec![0b1, 0b11, 0b111, 0b1111]);
}

#[test]
fn no_drafting_gives_the_root() {
    let mut d = TableDrafter::new();
    for p in [
        DraftParams::none(),
        DraftParams::dynamic(3, 2, 0),
        DraftParams::dynamic(3, 0, 5),
    ] {
        let out = build_tree(100, &p, &mut d).unwrap();
        assert_eq!(out.tree, TokenTree::root(100));
        assert_eq!(out.levels, 0);
    }
    assert!(d.calls.is_empty());
}

#[test]
fn builder_protocol_and_sanitising() {
    let mut b = TreeBuilder::new(100, &DraftParams::dynamic(2, 2, 10));
    assert_eq!(b.add_children(vec![]), Err(BuildError::NoPendingExpansion));
    assert_eq!(b.next_expansion(), Some((vec![0], 2)));
    assert_eq!(
        b.next_expansion(),
        Some((vec![0], 2)),
        "request is repeated until answered"
    );
    assert_eq!(
        b.add_children(vec![vec![], vec![]])
            .unwrap_err()
            .to_string(),
        "expected children for 1 nodes, got 2 lists"
    );
    // Unsorted, duplicated, NaN and positive log-probs, more than k.
    b.add_children(vec![vec![
        (5, -2.0),
        (6, f32::NAN),
        (7, 0.5),
        (5, -0.125),
        (8, -0.25),
    ]])
    .unwrap();
    let p = b.partial();
    assert_eq!(p.tokens, vec![100, 7, 5]);
    assert_eq!(p.scores, vec![0.0, 0.0, -0.125]);
    assert_eq!(b.next_expansion(), Some((vec![1, 2], 2)));
    b.add_children(vec![vec![(1, -0.5)], vec![(1, -0.5), (2, -0.25)]])
        .unwrap();
    assert_eq!(b.next_expansion(), None);
    assert!(b.is_done());
    let out = b.finish();
    assert_eq!(out.tree.tokens(), &[100, 7, 5, 1, 2, 1]);
    assert_eq!(out.tree.parents(), &[-1, 0, 0, 1, 2, 2]);
    assert_eq!(out.tree.scores(), &[0.0, 0.0, -0.125, -0.5, -0.375, -0.625]);
    assert_eq!(out.levels, 2);
}

#[test]
fn builder_can_finish_early() {
    let mut b = TreeBuilder::new(100, &DraftParams::dynamic(5, 2, 10));
    let (nodes, _) = b.next_expansion().unwrap();
    assert_eq!(nodes, vec![0]);
    b.add_children(vec![vec![(1, -0.5), (2, -1.0)]]).unwrap();
    let _ = b.next_expansion();
    let out = b.finish();
    assert_eq!(out.tree.tokens(), &[100, 1, 2]);
}

#[test]
fn chain_mode_forces_branching_one() {
    let b = TreeBuilder::new(
        0,
        &DraftParams {
            mode: TreeMode::Chain,
            depth: 4,
            branching: 3,
            budget: 9,
        },
    );
    assert_eq!(b.params(), &DraftParams::chain(4));
}
