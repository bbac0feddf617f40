//! The record a draft session keeps of the tree it sent last: the sync plan reads where its
//! rows are, answer-ahead drafts from its nodes.

/// The last drafted tree and where its nodes' KV rows are.
#[derive(Debug, Clone, PartialEq)]
pub struct LastTree {
    /// Tokens of the tree sent (node 0 = root).
    pub tokens: Vec<u32>,
    /// Parents of the tree sent.
    pub parents: Vec<i32>,
    /// Draft scores of the tree sent (cumulative log-probabilities).
    pub scores: Vec<f32>,
    /// Pending KV row of each tree node, if it was forwarded.
    pub rows: Vec<Option<usize>>,
    /// Number of pending rows holding the fed chain (which ends with the root).
    pub fed: usize,
}
