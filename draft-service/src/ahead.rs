//! Draft-ahead: drafting a session's next tree while the target verifies the tree just sent.
//!
//! The session bets on the verification outcome: the tree's best path (from the root, always
//! the best-scored child, down to a leaf) is accepted in full and the target's next token is
//! the draft's top token after that leaf. It forwards the leaf once (a [`Stage::Leaf`] probe)
//! to learn that token, then drafts the next tree below it ([`Stage::Tree`]), its KV rows
//! pending behind the sent tree's. Either a request asks for that pre-draft outright
//! (`answer_ahead`: pipelined speculation, the caller verifies the sent tree meanwhile and uses
//! the pre-draft when the outcome is the assumed one), or, for a request that only allows it,
//! it runs in the worker's idle time, one batched level per idle slot ([`crate::worker`]).
//!
//! When the next request reports exactly that outcome (a hit), [`Ahead::redeem`] says which
//! rows to commit and hands the pre-drafted tree over: it is answered at once, or finished from
//! where it stands. Otherwise (a miss) the pre-drafted rows are dropped with the sent tree's
//! unused rows and the request drafts as before. Trees are proposals the target verifies, so
//! a guess never changes the output.

use speculate::DraftParams;

use crate::last_tree::LastTree;
use crate::run::DraftRun;

/// The verification outcome a pre-draft bets on.
#[derive(Debug, Clone, PartialEq)]
pub struct Guess {
    /// Accepted path (node indices of the sent tree, from the root to the leaf).
    pub path: Vec<u32>,
    /// Tokens the target would emit: the path's tokens below the root, then (once the leaf
    /// has been forwarded) the guessed next token.
    pub emitted: Vec<u32>,
    /// Pending rows a hit commits, in order: the sent tree's fed chain, the path's rows below
    /// the root, then (once forwarded) the leaf's row.
    pub commit_rows: Vec<usize>,
}

/// Where a pre-draft stands.
#[derive(Debug, Clone)]
pub enum Stage {
    /// The leaf must be forwarded (below `parent_row`) to learn the guessed next token.
    Leaf {
        /// The leaf's token.
        token: u32,
        /// Pending row of the leaf's parent.
        parent_row: usize,
    },
    /// The next tree is being drafted below the guessed token.
    Tree(Box<DraftRun>),
}

/// A session's pre-draft.
#[derive(Debug, Clone)]
pub struct Ahead {
    /// What it bets on.
    pub guess: Guess,
    /// Shape of the pre-drafted tree (the last request's).
    pub params: DraftParams,
    /// Progress.
    pub stage: Stage,
    /// Spare time spent on it so far.
    pub spent_ns: u64,
}

/// What a request makes of the session's pre-draft.
#[derive(Debug)]
pub enum Redeemed {
    /// The request came before the guess was complete: drop the pre-drafted rows.
    Late,
    /// The guess was wrong: drop the pre-drafted rows.
    Miss,
    /// The guess was right. Commit `commit_rows` (keeping `run`'s rows when there is one) and
    /// continue with `run`; `None` when the pre-drafted tree's shape exceeds the request's.
    Hit {
        /// Rows to commit.
        commit_rows: Vec<usize>,
        /// The pre-drafted tree, if usable.
        run: Option<Box<DraftRun>>,
        /// The guessed next token: the new root.
        root: u32,
        /// Spare time that went into it.
        spent_ns: u64,
    },
}

/// The best path of a tree: from the root, the best-scored child (lowest index on ties) down
/// to a leaf.
pub fn best_path(parents: &[i32], scores: &[f32]) -> Vec<usize> {
    let mut path = vec![0];
    loop {
        let at = *path.last().expect("starts with the root");
        let best = (at + 1..parents.len())
            .filter(|&c| parents[c] == at as i32)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)));
        match best {
            Some(c) => path.push(c),
            None => return path,
        }
    }
}

impl Ahead {
    /// The pre-draft of the tree just sent, or `None` when there is nothing to bet on (a
    /// root-only tree, or a path whose inner nodes were not forwarded).
    pub fn start(last: &LastTree, params: DraftParams) -> Option<Self> {
        let path = best_path(&last.parents, &last.scores);
        let (&leaf, inner) = path.split_last()?;
        if inner.is_empty() {
            return None;
        }
        let parent_row = last.rows[*inner.last().expect("not empty")]?;
        let mut commit_rows: Vec<usize> = (0..last.fed).collect();
        for &node in &inner[1..] {
            commit_rows.push(last.rows[node]?);
        }
        Some(Self {
            guess: Guess {
                path: path.iter().map(|&n| n as u32).collect(),
                emitted: path[1..].iter().map(|&n| last.tokens[n]).collect(),
                commit_rows,
            },
            params,
            stage: Stage::Leaf {
                token: last.tokens[leaf],
                parent_row,
            },
            spent_ns: 0,
        })
    }

    /// The leaf probe's result: the leaf went to pending row `leaf_row` and the draft's top
    /// token after it is `next`; the next tree is drafted below it, at most `max_depth` deep.
    pub fn leaf_forwarded(&mut self, leaf_row: usize, next: u32, max_depth: usize) {
        self.guess.emitted.push(next);
        self.guess.commit_rows.push(leaf_row);
        let mut params = self.params;
        params.depth = params.depth.min(max_depth);
        self.stage = Stage::Tree(Box::new(DraftRun::new(vec![next], Some(leaf_row), &params)));
    }

    /// Whether spare time can still advance it.
    pub fn wants_work(&mut self) -> bool {
        match &mut self.stage {
            Stage::Leaf { .. } => true,
            Stage::Tree(run) => !run.is_done(),
        }
    }

    /// Matches the pre-draft against a request reporting `emitted` tokens for the path
    /// `accepted_path` and asking for a tree shaped `params` (`None`: any shape, for a caller
    /// that is verifying the pre-drafted tree already).
    pub fn redeem(
        self,
        emitted: &[u32],
        accepted_path: &[u32],
        params: Option<&DraftParams>,
    ) -> Redeemed {
        let Stage::Tree(run) = self.stage else {
            // The request came before the leaf probe: no guess was made.
            return Redeemed::Late;
        };
        if accepted_path != self.guess.path.as_slice() || emitted != self.guess.emitted.as_slice() {
            return Redeemed::Miss;
        }
        let shape = run.params();
        let fits = params.is_none_or(|params| {
            shape.mode == params.mode
                && shape.depth <= params.depth
                && shape.budget <= params.budget
                && shape.branching <= params.branching.max(1)
        });
        Redeemed::Hit {
            commit_rows: self.guess.commit_rows,
            root: *run.feed().last().expect("the feed ends with the root"),
            run: fits.then_some(run),
            spent_ns: self.spent_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// root(10) -> 11 (score -0.1) -> 12 (-0.3); root -> 21 (-0.5); 11 -> 13 (-0.9).
    fn tree() -> LastTree {
        LastTree {
            tokens: vec![10, 11, 21, 12, 13],
            parents: vec![-1, 0, 0, 1, 1],
            scores: vec![0.0, -0.1, -0.5, -0.3, -0.9],
            rows: vec![Some(1), Some(2), Some(3), None, None],
            fed: 2,
        }
    }

    #[test]
    fn best_path_follows_the_best_child() {
        let t = tree();
        assert_eq!(best_path(&t.parents, &t.scores), vec![0, 1, 3]);
        assert_eq!(best_path(&[-1], &[0.0]), vec![0]);
    }

    #[test]
    fn guesses_the_best_path_then_the_leafs_top_token() {
        let mut a = Ahead::start(&tree(), DraftParams::chain(3)).unwrap();
        assert_eq!(a.guess.path, vec![0, 1, 3]);
        assert_eq!(a.guess.emitted, vec![11, 12]);
        assert_eq!(a.guess.commit_rows, vec![0, 1, 2]);
        assert!(matches!(
            a.stage,
            Stage::Leaf {
                token: 12,
                parent_row: 2
            }
        ));
        a.leaf_forwarded(5, 77, 2);
        assert_eq!(a.guess.emitted, vec![11, 12, 77]);
        assert_eq!(a.guess.commit_rows, vec![0, 1, 2, 5]);
        let Stage::Tree(run) = &a.stage else {
            panic!("drafting the tree")
        };
        assert_eq!(run.params().depth, 2);
        assert_eq!(run.feed(), &[77]);
    }

    #[test]
    fn redeems_only_the_guessed_outcome() {
        let mut a = Ahead::start(&tree(), DraftParams::chain(3)).unwrap();
        a.leaf_forwarded(5, 77, 3);
        a.spent_ns = 9;
        let p = DraftParams::chain(3);
        assert!(matches!(
            a.clone().redeem(&[11, 12, 78], &[0, 1, 3], Some(&p)),
            Redeemed::Miss
        ));
        assert!(matches!(
            a.clone().redeem(&[11, 40], &[0, 1], Some(&p)),
            Redeemed::Miss
        ));
        match a.clone().redeem(&[11, 12, 77], &[0, 1, 3], Some(&p)) {
            Redeemed::Hit {
                commit_rows,
                run,
                root,
                spent_ns,
            } => {
                assert_eq!(commit_rows, vec![0, 1, 2, 5]);
                assert!(run.is_some());
                assert_eq!((root, spent_ns), (77, 9));
            }
            other => panic!("a hit, not {other:?}"),
        }
        // A smaller shape asked for: the guess was right but the tree is not usable...
        match a
            .clone()
            .redeem(&[11, 12, 77], &[0, 1, 3], Some(&DraftParams::chain(2)))
        {
            Redeemed::Hit { run, .. } => assert!(run.is_none()),
            other => panic!("a hit, not {other:?}"),
        }
        // ... unless the caller is verifying it already.
        match a.redeem(&[11, 12, 77], &[0, 1, 3], None) {
            Redeemed::Hit { run, .. } => assert!(run.is_some()),
            other => panic!("a hit, not {other:?}"),
        }
    }

    #[test]
    fn nothing_to_guess_without_drafted_nodes() {
        let root_only = LastTree {
            tokens: vec![10],
            parents: vec![-1],
            scores: vec![0.0],
            rows: vec![Some(0)],
            fed: 1,
        };
        assert!(Ahead::start(&root_only, DraftParams::chain(3)).is_none());
        // Before the leaf probe, nothing is guessed yet.
        let a = Ahead::start(&tree(), DraftParams::chain(3)).unwrap();
        assert!(matches!(
            a.redeem(&[11, 12, 77], &[0, 1, 3], Some(&DraftParams::chain(3))),
            Redeemed::Late
        ));
    }
}
