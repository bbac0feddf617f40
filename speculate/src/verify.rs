//! Lossless tree verification.
//!
//! Walk from the root: at each node take the target's own token there ([`sample_token`] with
//! the node's logits and absolute position); if a child carries that token, descend, else stop.
//! Every emitted token is exactly what target-only decoding would emit at its position with the
//! same seed, so speculative output is identical to target-only output, greedy or sampled.

use crate::sampling::{SamplingParams, sample_token};
use crate::tree::TokenTree;

/// When generation must end, checked on every emitted token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopConditions {
    /// Emitting any of these ends generation (the EOS token itself is emitted).
    pub eos_token_ids: Vec<u32>,
    /// Remaining token budget: at most this many tokens are emitted.
    pub max_new_tokens: usize,
}

/// A prefill asked to compute the root too and pick the token after it, as a verification of a
/// root-only tree would (the target's; a turn's first token without a second forward).
#[derive(Debug, Clone, PartialEq)]
pub struct FirstStep {
    /// How the token is picked.
    pub sampling: SamplingParams,
    /// When the generation stops.
    pub stop: StopConditions,
}

/// Why generation finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token was emitted.
    Eos,
    /// The token budget is used up.
    Length,
}

/// Result of verifying one tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOutcome {
    /// Node indices whose KV must be kept, in order: always starts with the root 0, then the
    /// accepted nodes except the node of the last emitted token (the last emitted token becomes
    /// the next root; its KV is computed next step). Same length as `emitted` (unless the budget
    /// was already 0).
    pub accepted_path: Vec<usize>,
    /// Accepted child tokens followed by the final target token (len >= 1 while budget remains).
    pub emitted: Vec<u32>,
    /// Tree nodes excluding the root.
    pub proposed: usize,
    /// Draft tokens accepted: emitted tokens that matched a tree child
    /// (`emitted.len() - 1` unless a stop cut the walk on a matched child).
    pub accepted: usize,
    /// Set when this step ended generation.
    pub finish: Option<FinishReason>,
}

/// Verifies `tree` against the target's logits at every node.
///
/// `logits` is row-major `[tree.len() x vocab]`; `root_position` is the absolute position of the
/// root token (= committed KV length); the token sampled at node `i` is at position
/// `root_position + depth(i) + 1`.
///
/// # Panics
/// If `logits.len() != tree.len() * vocab`.
pub fn verify(
    tree: &TokenTree,
    logits: &[f32],
    vocab: usize,
    params: &SamplingParams,
    root_position: u64,
    stop: &StopConditions,
) -> VerifyOutcome {
    assert_eq!(
        logits.len(),
        tree.len() * vocab,
        "verify: logits hold {} values, expected {} nodes x {vocab} vocab",
        logits.len(),
        tree.len()
    );
    let mut out = VerifyOutcome {
        accepted_path: vec![0],
        emitted: Vec::with_capacity(tree.max_depth() + 1),
        proposed: tree.len() - 1,
        accepted: 0,
        finish: None,
    };
    if stop.max_new_tokens == 0 {
        out.finish = Some(FinishReason::Length);
        return out;
    }
    let mut node = 0usize;
    loop {
        let row = &logits[node * vocab..(node + 1) * vocab];
        let position = root_position + tree.depth(node) as u64 + 1;
        let token = sample_token(row, params, position);
        out.emitted.push(token);
        let child = tree.child_with_token(node, token);
        if child.is_some() {
            out.accepted += 1;
        }
        if stop.eos_token_ids.contains(&token) {
            out.finish = Some(FinishReason::Eos);
        } else if out.emitted.len() >= stop.max_new_tokens {
            out.finish = Some(FinishReason::Length);
        }
        match child {
            Some(c) if out.finish.is_none() => {
                out.accepted_path.push(c);
                node = c;
            }
            _ => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::TreeLimits;

    const V: usize = 8;

    /// Logits whose argmax is `t`.
    fn peak(t: u32) -> Vec<f32> {
        (0..V as u32)
            .map(|i| if i == t { 5.0 } else { 0.0 })
            .collect()
    }

    fn tree() -> TokenTree {
        //        0:(1)
        //     1:(2)   2:(3)
        //   3:(4)       4:(5)
        let limits = TreeLimits {
            max_nodes: 16,
            max_depth: 4,
            vocab_size: V,
        };
        TokenTree::new(
            vec![1, 2, 3, 4, 5],
            vec![-1, 0, 0, 1, 2],
            vec![0.0, -0.1, -0.5, -0.2, -0.9],
            &limits,
        )
        .unwrap()
    }

    fn logits(targets: [u32; 5]) -> Vec<f32> {
        targets.iter().flat_map(|&t| peak(t)).collect()
    }

    fn stop(max: usize) -> StopConditions {
        StopConditions {
            eos_token_ids: vec![7],
            max_new_tokens: max,
        }
    }

    #[test]
    fn greedy_walk_accepts_matching_path() {
        let g = SamplingParams::greedy();
        let out = verify(&tree(), &logits([3, 0, 5, 0, 6]), V, &g, 10, &stop(100));
        assert_eq!(out.emitted, vec![3, 5, 6]);
        assert_eq!(out.accepted_path, vec![0, 2, 4]);
        assert_eq!((out.proposed, out.accepted, out.finish), (4, 2, None));
    }

    #[test]
    fn mismatch_at_root_emits_one_token() {
        let g = SamplingParams::greedy();
        let out = verify(&tree(), &logits([6, 0, 0, 0, 0]), V, &g, 0, &stop(100));
        assert_eq!(out.emitted, vec![6]);
        assert_eq!(out.accepted_path, vec![0]);
        assert_eq!(out.accepted, 0);
    }

    #[test]
    fn eos_on_an_accepted_child_cuts_the_walk() {
        let g = SamplingParams::greedy();
        let t = TokenTree::new(
            vec![1, 7, 2],
            vec![-1, 0, 1],
            vec![0.0; 3],
            &TreeLimits {
                max_nodes: 4,
                max_depth: 4,
                vocab_size: V,
            },
        )
        .unwrap();
        let l: Vec<f32> = [7, 2, 0].iter().flat_map(|&x| peak(x)).collect();
        let out = verify(&t, &l, V, &g, 0, &stop(100));
        assert_eq!(out.emitted, vec![7]);
        assert_eq!(out.accepted_path, vec![0]);
        assert_eq!(out.accepted, 1);
        assert_eq!(out.finish, Some(FinishReason::Eos));
    }

    #[test]
    fn length_budget_cuts_the_walk() {
        let g = SamplingParams::greedy();
        let out = verify(&tree(), &logits([2, 4, 0, 6, 0]), V, &g, 0, &stop(2));
        assert_eq!(out.emitted, vec![2, 4]);
        assert_eq!(out.accepted_path, vec![0, 1]);
        assert_eq!(out.accepted, 2);
        assert_eq!(out.finish, Some(FinishReason::Length));
        let out = verify(&tree(), &logits([2, 4, 0, 6, 0]), V, &g, 0, &stop(0));
        assert!(out.emitted.is_empty());
        assert_eq!(out.finish, Some(FinishReason::Length));
    }
}
