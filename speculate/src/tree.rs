//! The token tree: flat arrays in topological order plus everything derived from them.
//!
//! A tree is `tokens[i]`, `parents[i]` (`-1` for the root, otherwise an index `< i`) and
//! `scores[i]` (cumulative draft log-probability). Node 0 is the root: the last emitted token,
//! whose KV is not yet computed. Derived on construction: depth (= position offset from the
//! root), first-child / next-sibling links (children in index order), and one ancestor bitset
//! per node (`mask[i] = mask[parents[i]] ∪ {i}`), the rows of the tree-attention mask.

use thiserror::Error;

/// Sentinel for "no node" in the packed link arrays.
const NONE: u32 = u32::MAX;

/// Bounds a received tree must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeLimits {
    /// Maximum number of nodes, root included.
    pub max_nodes: usize,
    /// Maximum depth of any node (the root has depth 0, its children depth 1).
    pub max_depth: usize,
    /// Token ids must be `< vocab_size`.
    pub vocab_size: usize,
}

/// Why a tree was rejected. Messages name the offending node so a client can fix its input.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TreeError {
    /// The tree has no node at all (it needs at least the root).
    #[error("tree is empty: it needs at least the root node")]
    Empty,
    /// `tokens`, `parents` and `scores` differ in length.
    #[error("tree arrays differ in length: {tokens} tokens, {parents} parents, {scores} scores")]
    LengthMismatch {
        /// Length of `tokens`.
        tokens: usize,
        /// Length of `parents`.
        parents: usize,
        /// Length of `scores`.
        scores: usize,
    },
    /// More nodes than the limit allows.
    #[error("tree has {nodes} nodes, over the limit of {max}")]
    TooManyNodes {
        /// Number of nodes received.
        nodes: usize,
        /// The limit.
        max: usize,
    },
    /// Node 0 is not a root.
    #[error("node 0: must be the root (parent -1), found parent {parent}")]
    RootHasParent {
        /// The parent given for node 0.
        parent: i32,
    },
    /// A node other than 0 claims to be a root.
    #[error("node {node}: parent -1 makes a second root (only node 0 may be the root)")]
    MultipleRoots {
        /// The offending node.
        node: usize,
    },
    /// A parent index outside `0..len`.
    #[error("node {node}: parent {parent} is out of range (tree has {len} nodes)")]
    ParentOutOfRange {
        /// The offending node.
        node: usize,
        /// Its parent index.
        parent: i32,
        /// Number of nodes in the tree.
        len: usize,
    },
    /// A parent that does not come before its child (not topological; would allow cycles).
    #[error("node {node}: parent {parent} is not before the child")]
    ParentNotBeforeChild {
        /// The offending node.
        node: usize,
        /// Its parent index.
        parent: usize,
    },
    /// Two children of one node carry the same token.
    #[error("node {node}: token {token} duplicates sibling {sibling} under parent {parent}")]
    DuplicateSibling {
        /// The later of the two siblings.
        node: usize,
        /// The earlier sibling with the same token.
        sibling: usize,
        /// Their parent.
        parent: usize,
        /// The duplicated token.
        token: u32,
    },
    /// A node deeper than the limit.
    #[error("node {node}: depth {depth} is over the limit of {max}")]
    TooDeep {
        /// The offending node.
        node: usize,
        /// Its depth.
        depth: usize,
        /// The limit.
        max: usize,
    },
    /// A token id outside the vocabulary.
    #[error("node {node}: token {token} is out of vocabulary (size {vocab_size})")]
    TokenOutOfVocab {
        /// The offending node.
        node: usize,
        /// Its token id.
        token: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A score that is NaN.
    #[error("node {node}: score is NaN")]
    NanScore {
        /// The offending node.
        node: usize,
    },
}

/// A validated token tree with derived depth, sibling links and ancestor masks.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenTree {
    tokens: Vec<u32>,
    parents: Vec<i32>,
    scores: Vec<f32>,
    depths: Vec<u32>,
    first_child: Vec<u32>,
    next_sibling: Vec<u32>,
    /// Row-major ancestor bitsets, `words` u64 per node; bit j of row i: j is i or an ancestor of i.
    mask: Vec<u64>,
    words: usize,
    max_depth: usize,
}

impl TokenTree {
    /// Validates the arrays against `limits` and derives depth, links and masks.
    ///
    /// Node 0 is the root (`parents[0] == -1`): the last emitted token, whose KV is not yet
    /// computed. Every other node's parent must come before it, children of one node must carry
    /// distinct tokens, and all tokens must be in the vocabulary.
    pub fn new(
        tokens: Vec<u32>,
        parents: Vec<i32>,
        scores: Vec<f32>,
        limits: &TreeLimits,
    ) -> Result<Self, TreeError> {
        let n = tokens.len();
        if parents.len() != n || scores.len() != n {
            return Err(TreeError::LengthMismatch {
                tokens: n,
                parents: parents.len(),
                scores: scores.len(),
            });
        }
        if n == 0 {
            return Err(TreeError::Empty);
        }
        if n > limits.max_nodes {
            return Err(TreeError::TooManyNodes {
                nodes: n,
                max: limits.max_nodes,
            });
        }
        if parents[0] != -1 {
            return Err(TreeError::RootHasParent { parent: parents[0] });
        }
        for (node, (&token, &score)) in tokens.iter().zip(&scores).enumerate() {
            if token as usize >= limits.vocab_size {
                return Err(TreeError::TokenOutOfVocab {
                    node,
                    token,
                    vocab_size: limits.vocab_size,
                });
            }
            if score.is_nan() {
                return Err(TreeError::NanScore { node });
            }
        }
        for (node, &parent) in parents.iter().enumerate().skip(1) {
            if parent == -1 {
                return Err(TreeError::MultipleRoots { node });
            }
            if parent < 0 || parent as usize >= n {
                return Err(TreeError::ParentOutOfRange {
                    node,
                    parent,
                    len: n,
                });
            }
            if parent as usize >= node {
                return Err(TreeError::ParentNotBeforeChild {
                    node,
                    parent: parent as usize,
                });
            }
        }
        let tree = Self::from_valid_parts(tokens, parents, scores);
        if tree.max_depth > limits.max_depth {
            let node = (0..n)
                .find(|&i| tree.depth(i) > limits.max_depth)
                .unwrap_or(0);
            return Err(TreeError::TooDeep {
                node,
                depth: tree.depth(node),
                max: limits.max_depth,
            });
        }
        for node in 1..n {
            let parent = tree.parents[node] as usize;
            let mut s = tree.first_child[parent];
            while s != NONE && (s as usize) < node {
                if tree.tokens[s as usize] == tree.tokens[node] {
                    return Err(TreeError::DuplicateSibling {
                        node,
                        sibling: s as usize,
                        parent,
                        token: tree.tokens[node],
                    });
                }
                s = tree.next_sibling[s as usize];
            }
        }
        Ok(tree)
    }

    /// A single-node tree: the target-only decoding step.
    pub fn root(token: u32) -> Self {
        Self::from_valid_parts(vec![token], vec![-1], vec![0.0])
    }

    /// Derives everything from arrays already known to be structurally valid (root at 0,
    /// parents before children). Used by [`TokenTree::new`] and by the tree builder.
    pub(crate) fn from_valid_parts(tokens: Vec<u32>, parents: Vec<i32>, scores: Vec<f32>) -> Self {
        let n = tokens.len();
        let words = n.div_ceil(64);
        let mut depths = vec![0u32; n];
        let mut first_child = vec![NONE; n];
        let mut next_sibling = vec![NONE; n];
        let mut last_child = vec![NONE; n];
        let mut mask = vec![0u64; n * words];
        let mut max_depth = 0usize;
        for i in 0..n {
            let row = i * words;
            if i > 0 {
                let p = parents[i] as usize;
                depths[i] = depths[p] + 1;
                max_depth = max_depth.max(depths[i] as usize);
                if last_child[p] == NONE {
                    first_child[p] = i as u32;
                } else {
                    next_sibling[last_child[p] as usize] = i as u32;
                }
                last_child[p] = i as u32;
                mask.copy_within(p * words..(p + 1) * words, row);
            }
            mask[row + i / 64] |= 1u64 << (i % 64);
        }
        Self {
            tokens,
            parents,
            scores,
            depths,
            first_child,
            next_sibling,
            mask,
            words,
            max_depth,
        }
    }

    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Token of every node.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Parent of every node (`-1` for the root).
    pub fn parents(&self) -> &[i32] {
        &self.parents
    }

    /// Cumulative draft log-probability of every node (0 for the root).
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// Token of node `i`.
    pub fn token(&self, i: usize) -> u32 {
        self.tokens[i]
    }

    /// Parent of node `i`, `None` for the root.
    pub fn parent(&self, i: usize) -> Option<usize> {
        let p = self.parents[i];
        (p >= 0).then_some(p as usize)
    }

    /// Depth of node `i` (root 0). Also its position offset from the root.
    pub fn depth(&self, i: usize) -> usize {
        self.depths[i] as usize
    }

    /// Depth of every node: the position offsets (position id = root position + depth).
    pub fn depths(&self) -> &[u32] {
        &self.depths
    }

    /// Position id of every node for a root at absolute position `root_position`.
    pub fn position_ids(&self, root_position: u64) -> Vec<u64> {
        self.depths
            .iter()
            .map(|&d| root_position + d as u64)
            .collect()
    }

    /// Largest depth of any node (0 for a root-only tree).
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// First child of node `i` (the lowest-index child).
    pub fn first_child(&self, i: usize) -> Option<usize> {
        link(self.first_child[i])
    }

    /// Next sibling of node `i` (the next-higher-index child of the same parent).
    pub fn next_sibling(&self, i: usize) -> Option<usize> {
        link(self.next_sibling[i])
    }

    /// Children of node `i` in index order.
    pub fn children(&self, i: usize) -> Children<'_> {
        Children {
            tree: self,
            next: self.first_child[i],
        }
    }

    /// The child of node `i` that carries `token`, if any.
    pub fn child_with_token(&self, i: usize, token: u32) -> Option<usize> {
        self.children(i).find(|&c| self.tokens[c] == token)
    }

    /// Node ids from the root to `i`, both included.
    pub fn path_to(&self, i: usize) -> Vec<usize> {
        path_to(&self.parents, i, self.depth(i))
    }

    /// Nodes without children, in index order.
    pub fn leaves(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.first_child[i] == NONE)
            .collect()
    }

    /// Root-to-leaf paths, one per leaf in index order (EAGLE's `retrieve_indices`).
    pub fn leaf_paths(&self) -> Vec<Vec<usize>> {
        self.leaves().into_iter().map(|l| self.path_to(l)).collect()
    }

    /// Whether `a` is `b` or an ancestor of `b` (i.e. whether `b` attends to `a`).
    pub fn is_ancestor(&self, a: usize, b: usize) -> bool {
        self.mask[b * self.words + a / 64] >> (a % 64) & 1 == 1
    }

    /// Number of u64 words in one ancestor bitset row (`ceil(len / 64)`).
    pub fn mask_words(&self) -> usize {
        self.words
    }

    /// Ancestor bitset of node `i`: bit `j` (word `j / 64`, bit `j % 64`) is set when `j` is `i`
    /// or one of its ancestors.
    pub fn ancestor_bitset(&self, i: usize) -> &[u64] {
        &self.mask[i * self.words..(i + 1) * self.words]
    }

    /// Dense row-major `len x len` attention mask: `mask[i * len + j]` is true when node `i`
    /// may attend to node `j` (j is i or an ancestor of i).
    pub fn dense_mask(&self) -> Vec<bool> {
        let n = self.len();
        let mut out = Vec::with_capacity(n * n);
        for i in 0..n {
            out.extend((0..n).map(|j| self.is_ancestor(j, i)));
        }
        out
    }
}

fn link(v: u32) -> Option<usize> {
    (v != NONE).then_some(v as usize)
}

/// Iterator over the children of a node, in index order.
#[derive(Debug, Clone)]
pub struct Children<'a> {
    tree: &'a TokenTree,
    next: u32,
}

impl Iterator for Children<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        let cur = link(self.next)?;
        self.next = self.tree.next_sibling[cur];
        Some(cur)
    }
}

/// Node ids from the root to `i`, both included, in a parent array (-1 for the root) where
/// node `i` sits at `depth`.
pub(crate) fn path_to(parents: &[i32], i: usize, depth: usize) -> Vec<usize> {
    let mut path = Vec::with_capacity(depth + 1);
    let mut node = i as i32;
    while node >= 0 {
        path.push(node as usize);
        node = parents[node as usize];
    }
    path.reverse();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: TreeLimits = TreeLimits {
        max_nodes: 64,
        max_depth: 8,
        vocab_size: 100,
    };

    fn tree(tokens: &[u32], parents: &[i32]) -> Result<TokenTree, TreeError> {
        TokenTree::new(
            tokens.to_vec(),
            parents.to_vec(),
            vec![0.0; tokens.len()],
            &LIMITS,
        )
    }

    #[test]
    fn derives_depth_links_paths_and_masks() {
        //      0
        //    1   2
        //   3 4   5
        //   6
        let t = tree(&[10, 11, 12, 13, 14, 15, 16], &[-1, 0, 0, 1, 1, 2, 3]).unwrap();
        assert_eq!(t.depths(), &[0, 1, 1, 2, 2, 2, 3]);
        assert_eq!(t.max_depth(), 3);
        assert_eq!(t.children(0).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(t.children(1).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(t.first_child(3), Some(6));
        assert_eq!(t.next_sibling(3), Some(4));
        assert_eq!(t.next_sibling(4), None);
        assert_eq!(t.path_to(6), vec![0, 1, 3, 6]);
        assert_eq!(t.leaves(), vec![4, 5, 6]);
        assert_eq!(t.child_with_token(1, 14), Some(4));
        assert_eq!(t.child_with_token(1, 15), None);
        assert_eq!(t.ancestor_bitset(6), &[0b1001011]);
        assert!(t.is_ancestor(1, 6) && !t.is_ancestor(2, 6) && t.is_ancestor(6, 6));
        assert_eq!(t.position_ids(100), vec![100, 101, 101, 102, 102, 102, 103]);
        let dense = t.dense_mask();
        assert_eq!(
            &dense[5 * 7..6 * 7],
            &[true, false, true, false, false, true, false]
        );
    }

    #[test]
    fn masks_span_several_words() {
        let n = 130;
        let parents: Vec<i32> = (0..n as i32).map(|i| i - 1).collect();
        let tokens = vec![1u32; n];
        let limits = TreeLimits {
            max_nodes: 200,
            max_depth: 200,
            vocab_size: 2,
        };
        let t = TokenTree::new(tokens, parents, vec![0.0; n], &limits).unwrap();
        assert_eq!(t.mask_words(), 3);
        assert!(t.is_ancestor(0, 129) && t.is_ancestor(100, 129) && !t.is_ancestor(129, 100));
        assert_eq!(t.ancestor_bitset(129), &[u64::MAX, u64::MAX, 0b11]);
    }

    #[test]
    fn rejects_malformed_trees_precisely() {
        let msg = |r: Result<TokenTree, TreeError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(tree(&[1, 2, 3, 4, 5, 6, 7, 8], &[-1, 0, 0, 1, 1, 7, 0, 0])),
            "node 5: parent 7 is not before the child"
        );
        assert_eq!(
            msg(tree(&[1, 2], &[-1, 5])),
            "node 1: parent 5 is out of range (tree has 2 nodes)"
        );
        assert_eq!(
            msg(tree(&[1, 2], &[-1, -3])),
            "node 1: parent -3 is out of range (tree has 2 nodes)"
        );
        assert_eq!(
            msg(tree(&[1, 2, 3], &[-1, 0, -1])),
            "node 2: parent -1 makes a second root (only node 0 may be the root)"
        );
        assert_eq!(
            msg(tree(&[1, 2], &[0, 0])),
            "node 0: must be the root (parent -1), found parent 0"
        );
        assert_eq!(
            msg(tree(&[1, 2, 3, 2], &[-1, 0, 0, 0])),
            "node 3: token 2 duplicates sibling 1 under parent 0"
        );
        assert_eq!(
            msg(tree(&[1, 2, 100], &[-1, 0, 1])),
            "node 2: token 100 is out of vocabulary (size 100)"
        );
        assert_eq!(
            msg(tree(&[], &[])),
            "tree is empty: it needs at least the root node"
        );
        let deep: Vec<i32> = (-1..9).collect();
        assert_eq!(
            msg(tree(&[1; 10], &deep)),
            "node 9: depth 9 is over the limit of 8"
        );
        assert_eq!(
            msg(tree(&[1; 65], &[0; 65])),
            "tree has 65 nodes, over the limit of 64"
        );
        assert_eq!(
            msg(TokenTree::new(vec![1, 2], vec![-1], vec![0.0; 2], &LIMITS)),
            "tree arrays differ in length: 2 tokens, 1 parents, 2 scores"
        );
        assert_eq!(
            msg(TokenTree::new(
                vec![1, 2],
                vec![-1, 0],
                vec![0.0, f32::NAN],
                &LIMITS
            )),
            "node 1: score is NaN"
        );
        // Same token under different parents is fine.
        assert!(tree(&[1, 2, 3, 2, 2], &[-1, 0, 0, 1, 2]).is_ok());
    }

    #[test]
    fn root_only_tree() {
        let t = TokenTree::root(7);
        assert_eq!(t.len(), 1);
        assert_eq!(t.max_depth(), 0);
        assert_eq!(t.leaves(), vec![0]);
        assert_eq!(t.children(0).count(), 0);
        assert_eq!(t.ancestor_bitset(0), &[1]);
    }
}
