//! Per-session draft state and its resynchronisation with the history.
//!
//! Invariant: the session's committed KV plus `feed` is exactly a prefix of
//! the orchestrator's history; `feed` (never empty) holds the history tokens
//! whose KV is not yet computed and ends with the root of the next tree. A
//! drafted tree leaves pending KV rows (the fed chain, then every expanded
//! node); when the target's accepted path arrives those rows are committed
//! where they match the new history, and only the rest is fed again. A
//! message that does not match the last tree falls back to feeding the new
//! tokens: wrong guesses only cost speed, never correctness.

use specllava_model::KvCache;
use specllava_service_kit::SessionState;

use crate::ahead::Ahead;
use crate::last_tree::LastTree;

/// One session on the draft.
pub struct DraftSession {
    /// Committed KV: a prefix of the history.
    pub kv: KvCache,
    /// History tokens not yet in the committed KV; ends with the root.
    pub feed: Vec<u32>,
    /// The last tree sent, while its rows are pending in `kv`.
    pub last: Option<LastTree>,
    /// The next tree, pre-drafted from a guess of the last tree's outcome (for an
    /// `answer_ahead` request, or in spare time); its rows are pending in `kv` behind the
    /// last tree's.
    pub ahead: Option<Ahead>,
}

impl SessionState for DraftSession {
    fn bytes(&self) -> usize {
        self.kv.bytes()
    }
}

/// What to do with the pending rows when new history tokens arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan {
    /// Pending rows to commit, in order (empty: discard them all).
    pub commit_rows: Vec<usize>,
    /// The new feed (history tokens still to compute, ending with the root).
    pub feed: Vec<u32>,
}

/// Plans the resynchronisation of a session whose state is (`feed`, `last`)
/// after the history grew by `new_tokens`, the target having accepted
/// `accepted_path` (node indices of the last tree).
pub fn plan_sync(
    feed: &[u32],
    last: Option<&LastTree>,
    new_tokens: &[u32],
    accepted_path: &[u32],
) -> SyncPlan {
    if new_tokens.is_empty() {
        // Nothing new: recompute the same feed next time.
        return SyncPlan {
            commit_rows: Vec::new(),
            feed: feed.to_vec(),
        };
    }
    let Some(last) = last else {
        let mut f = feed.to_vec();
        f.extend_from_slice(new_tokens);
        return SyncPlan {
            commit_rows: Vec::new(),
            feed: f,
        };
    };
    // The fed chain is history (ending with the root): always keep it.
    let mut commit_rows: Vec<usize> = (0..last.fed).collect();
    let mut consumed = 0;
    let path_ok = accepted_path.first() == Some(&0)
        && accepted_path.len() <= new_tokens.len()
        && accepted_path.windows(2).all(|w| {
            let (p, c) = (w[0] as usize, w[1] as usize);
            c < last.tokens.len() && last.parents[c] == p as i32
        });
    if path_ok {
        for (i, &node) in accepted_path.iter().enumerate().skip(1) {
            let node = node as usize;
            match last.rows[node] {
                Some(row) if last.tokens[node] == new_tokens[i - 1] => {
                    commit_rows.push(row);
                    consumed = i;
                }
                _ => break,
            }
        }
    }
    SyncPlan {
        commit_rows,
        feed: new_tokens[consumed..].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> LastTree {
        // root(10) -> 11 -> 12 -> 13(leaf, not forwarded); root -> 21
        LastTree {
            tokens: vec![10, 11, 21, 12, 13],
            parents: vec![-1, 0, 0, 1, 3],
            scores: vec![0.0, -0.1, -0.2, -0.3, -0.4],
            rows: vec![Some(1), Some(2), Some(3), Some(4), None],
            fed: 2,
        }
    }

    #[test]
    fn commits_the_forwarded_accepted_prefix() {
        // emitted 11, 12, 13, 99: accepted path root,11,12,13 but 13 has no row.
        let plan = plan_sync(&[9, 10], Some(&tree()), &[11, 12, 13, 99], &[0, 1, 3, 4]);
        assert_eq!(plan.commit_rows, vec![0, 1, 2, 4]);
        assert_eq!(plan.feed, vec![13, 99]);
    }

    #[test]
    fn only_root_accepted() {
        let plan = plan_sync(&[10], Some(&tree()), &[55], &[0]);
        assert_eq!(plan.commit_rows, vec![0, 1]);
        assert_eq!(plan.feed, vec![55]);
    }

    #[test]
    fn mismatching_path_feeds_everything() {
        let plan = plan_sync(&[10], Some(&tree()), &[77, 5], &[0, 1]);
        assert_eq!(plan.commit_rows, vec![0, 1]);
        assert_eq!(plan.feed, vec![77, 5]);
        let bad_parent = plan_sync(&[10], Some(&tree()), &[12, 5], &[0, 3]);
        assert_eq!(bad_parent.feed, vec![12, 5]);
    }

    #[test]
    fn without_a_tree_the_feed_grows() {
        let plan = plan_sync(&[10], None, &[11, 12], &[]);
        assert!(plan.commit_rows.is_empty());
        assert_eq!(plan.feed, vec![10, 11, 12]);
        let same = plan_sync(&[10], Some(&tree()), &[], &[0]);
        assert_eq!(
            same,
            SyncPlan {
                commit_rows: vec![],
                feed: vec![10]
            }
        );
    }
}
