//! A draft session's set-up, run as a task of its own while the target prefills: the vision
//! features from the turn's target (when the draft's tower is the target's), the sync call
//! (open or append) and then, when the turn drafts, the speculate stream and (when its
//! verification is cheap enough) the turn's first tree. Neither the stream's opening nor a
//! draft round trip then stands between the target's prefill and the first token. A set-up
//! that finishes after the target's first steps still serves: its first tree, below the
//! tokens the target emitted meanwhile ([`FirstTree::after`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use specllava_proto::v1 as pb;
use specllava_wire::convert::{draft_params_to_proto, nanos};
use speculate::DraftParams;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::{Code, Status};
use tracing::Instrument;

use crate::clients::{ReplicaApi, TreeStream};
use crate::routing::Replica;
use crate::sync::{PlannedSync, SyncReply, SyncTarget};

/// An open Speculate stream.
pub struct DraftStream {
    /// Requests to the draft, one per tree.
    pub requests: mpsc::Sender<pb::SpeculateRequest>,
    /// The draft's answers, one per request.
    pub trees: TreeStream,
}

impl DraftStream {
    /// Opens a Speculate stream on `replica`.
    pub async fn open(replicas: &dyn ReplicaApi, replica: &Replica) -> Result<Self, Status> {
        let (requests, rx) = mpsc::channel::<pb::SpeculateRequest>(2);
        let trees = replicas.speculate(replica, rx).await?;
        Ok(Self { requests, trees })
    }
}

/// The stream a set-up opens once the session is in sync, and the tree it drafts for the
/// turn's first step.
#[derive(Debug, Clone)]
pub struct EarlyStream {
    /// The conversation (the draft session's id).
    pub session_id: String,
    /// The first tree's shape; `None`: open the stream only.
    pub first_tree: Option<DraftParams>,
    /// Deadline of the stream's opening and the tree.
    pub timeout: Duration,
    /// The history's length once in sync; its last token is the first tree's root.
    pub history_len: usize,
    /// The root.
    pub root: u32,
}

/// The first tree a set-up drafted, for the root the history had when the set-up started.
pub struct FirstTree {
    /// The draft's answer.
    pub answer: pb::DraftTree,
    /// The shape asked for.
    pub params: DraftParams,
    /// The root it was drafted for.
    pub root: u32,
    /// The history's length it was drafted for (the root is its last token).
    pub history_len: usize,
    /// Opening the stream, asking and receiving (overlapped with the target's prefill).
    pub rtt_ns: u64,
}

/// The part of a first tree that serves after the target emitted some of its tokens (in
/// target-only steps while the draft set up): the subtree below the node those tokens lead
/// to, re-rooted there.
#[derive(Debug, Clone, PartialEq)]
pub struct Subtree {
    /// The subtree (its root is the node the emitted tokens lead to).
    pub tree: pb::TokenTree,
    /// For each of its nodes, the node of the first tree it is.
    pub nodes: Vec<u32>,
    /// The first tree's nodes from its root down to the subtree's root, that excluded:
    /// what the draft, which drafted the whole tree, hears as accepted before the
    /// subtree's accepted path.
    pub path_above: Vec<u32>,
    /// Levels below the subtree's root.
    pub depth: usize,
}

impl FirstTree {
    /// The tree for a history that holds `emitted` after the one it was drafted for: the
    /// subtree below the node the emitted tokens lead to, when every one of them is a
    /// drafted node (the whole tree when none are); `None` when one of them is not or
    /// the tree is malformed.
    pub fn after(&self, emitted: &[u32]) -> Option<Subtree> {
        let tree = self.answer.tree.as_ref()?;
        let n = tree.tokens.len();
        // One root, every parent before its child (as `TokenTree::new` requires).
        let well_formed = n > 0
            && tree.parents.len() == n
            && tree.scores.len() == n
            && tree.parents[0] == -1
            && (1..n).all(|i| usize::try_from(tree.parents[i]).is_ok_and(|p| p < i));
        if !well_formed {
            return None;
        }
        // Node `i >= 1`'s parent (in range: checked above).
        let parent = |i: usize| tree.parents[i] as usize;
        let mut path = vec![0usize];
        for &token in emitted {
            let at = *path.last().expect("never empty");
            let child = (at + 1..n).find(|&c| parent(c) == at && tree.tokens[c] == token)?;
            path.push(child);
        }
        let top = *path.last().expect("never empty");
        // Parents precede their children: one pass keeps the nodes below `top`.
        let mut index = vec![None::<usize>; n];
        let mut level = vec![0usize; n];
        let mut sub = pb::TokenTree::default();
        let mut nodes = Vec::new();
        for i in top..n {
            let under = if i == top {
                None
            } else {
                match index[parent(i)] {
                    Some(p) => Some(p),
                    None => continue,
                }
            };
            index[i] = Some(nodes.len());
            level[nodes.len()] = under.map_or(0, |p| level[p] + 1);
            sub.tokens.push(tree.tokens[i]);
            sub.parents.push(under.map_or(-1, |p| p as i32));
            sub.scores.push(tree.scores[i]);
            nodes.push(i as u32);
        }
        let depth = level[..nodes.len()].iter().copied().max().unwrap_or(0);
        path.pop();
        Some(Subtree {
            tree: sub,
            nodes,
            path_above: path.into_iter().map(|i| i as u32).collect(),
            depth,
        })
    }
}

/// Where a draft's set-up gets the vision features it prefills from instead of encoding the
/// images itself: the turn's target, whose tower is the draft's (same vision fingerprint).
/// The target computes them once for both sessions: its `EncodeImages` and its own
/// `OpenSession` with the images, sent at the same time, share one tower run (its encoder
/// cache), so the target's prefill never waits for this call.
#[derive(Clone)]
pub struct FeatureSource {
    /// The turn's target.
    pub target: Arc<Replica>,
    /// The vision fingerprint the draft and the target share.
    pub fingerprint: String,
    /// How long the set-up waits for them (a target busy encoding other turns' images must
    /// not cost the draft its set-up's deadline): past it, the draft gets the images.
    pub timeout: Duration,
}

impl FeatureSource {
    /// Has the target encode the images `planned` opens the draft session with, and puts their
    /// features in the request instead; on any failure the images stay (the draft encodes them).
    async fn supply(&self, replicas: &dyn ReplicaApi, planned: &mut PlannedSync) {
        let images = planned.open_images();
        if images.is_empty() {
            return;
        }
        let req = pb::EncodeImagesRequest {
            images: images.to_vec(),
        };
        let answer = tokio::time::timeout(self.timeout, replicas.encode_images(&self.target, req))
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("EncodeImages took too long")));
        match answer {
            Ok(resp) if resp.vision_fingerprint == self.fingerprint => {
                let (n, encode_us) = (resp.features.len(), resp.encode_ns / 1000);
                if planned.carry_features(resp.features) {
                    tracing::debug!(images = n, encode_us, "vision features shared");
                } else {
                    tracing::warn!("EncodeImages answered other features; sending images");
                }
            }
            Ok(_) => tracing::warn!("EncodeImages answered other features; sending images"),
            Err(s) if s.code() == Code::Unimplemented => {
                tracing::debug!("the target has no EncodeImages; sending images");
            }
            Err(s) => tracing::warn!(status = %s, "EncodeImages failed; sending images"),
        }
    }
}

/// What a finished set-up hands the turn.
pub struct SetupDone {
    /// The sync call's answer.
    pub reply: Result<SyncReply, Status>,
    /// The stream opened after a successful sync, with the first tree if one was asked for:
    /// `None` when no stream was asked for or either could not be had (the turn then opens
    /// a stream itself).
    pub early: Option<(DraftStream, Option<FirstTree>)>,
}

/// A draft session's set-up running as a task of its own.
pub struct DraftSetup {
    /// Where the sync goes and what the session holds once it succeeds.
    pub target: SyncTarget,
    /// The task.
    pub task: JoinHandle<SetupDone>,
}

impl DraftSetup {
    /// Starts `planned` (with the vision features from `features`, when given) and then, if
    /// asked, the stream and the first tree.
    pub fn spawn(
        replicas: Arc<dyn ReplicaApi>,
        mut planned: PlannedSync,
        features: Option<FeatureSource>,
        early: Option<EarlyStream>,
    ) -> Self {
        let target = planned.target.clone();
        let task = tokio::spawn(
            async move {
                if let Some(source) = features {
                    source.supply(replicas.as_ref(), &mut planned).await;
                }
                let replica = Arc::clone(&planned.target.replica);
                let reply = planned.run(replicas.as_ref()).await;
                let early = match (&reply, early) {
                    (Ok(_), Some(req)) => open_early(replicas.as_ref(), &replica, req).await,
                    _ => None,
                };
                SetupDone { reply, early }
            }
            // The set-up's calls belong to the turn's trace.
            .in_current_span(),
        );
        Self { target, task }
    }

    /// Whether the task has finished.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Opens the stream and drafts the first tree on it, if asked; `None` when either fails (the
/// failure shows again, and is handled, when the turn opens a stream itself).
async fn open_early(
    replicas: &dyn ReplicaApi,
    replica: &Replica,
    req: EarlyStream,
) -> Option<(DraftStream, Option<FirstTree>)> {
    let t0 = Instant::now();
    let got = tokio::time::timeout(req.timeout, async {
        let mut stream = DraftStream::open(replicas, replica).await.ok()?;
        let Some(params) = req.first_tree else {
            return Some((stream, None));
        };
        let ask = pb::SpeculateRequest {
            session_id: req.session_id,
            // In sync: the tree is for the session's root.
            new_tokens: Vec::new(),
            accepted_path: Vec::new(),
            params: Some(draft_params_to_proto(&params)),
            draft_ahead: false,
            answer_ahead: false,
        };
        stream.requests.send(ask).await.ok()?;
        let answer = stream.trees.next().await?.ok()?;
        let rooted = answer
            .tree
            .as_ref()
            .is_some_and(|t| t.tokens.first() == Some(&req.root));
        let first = FirstTree {
            answer,
            params,
            root: req.root,
            history_len: req.history_len,
            rtt_ns: nanos(t0.elapsed()),
        };
        // A tree for another root is not one to verify (the stream is fine).
        Some((stream, rooted.then_some(first)))
    })
    .await;
    got.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// root 10 -> {11 -> {13, 14 -> 15}, 12}
    fn first() -> FirstTree {
        FirstTree {
            answer: pb::DraftTree {
                tree: Some(pb::TokenTree {
                    tokens: vec![10, 11, 12, 13, 14, 15],
                    parents: vec![-1, 0, 0, 1, 1, 4],
                    scores: vec![0.0, -0.1, -0.2, -0.3, -0.4, -0.5],
                }),
                ..Default::default()
            },
            params: DraftParams::dynamic(3, 2, 5),
            root: 10,
            history_len: 4,
            rtt_ns: 0,
        }
    }

    #[test]
    fn nothing_emitted_keeps_the_whole_tree() {
        let sub = first().after(&[]).unwrap();
        assert_eq!(sub.tree, first().answer.tree.unwrap());
        assert_eq!(sub.nodes, [0, 1, 2, 3, 4, 5]);
        assert!(sub.path_above.is_empty());
        assert_eq!(sub.depth, 3);
    }

    #[test]
    fn emitted_tokens_lead_to_the_subtree_below_them() {
        let sub = first().after(&[11]).unwrap();
        assert_eq!(sub.tree.tokens, [11, 13, 14, 15]);
        assert_eq!(sub.tree.parents, [-1, 0, 0, 2]);
        assert_eq!(sub.tree.scores, [-0.1, -0.3, -0.4, -0.5]);
        assert_eq!(sub.nodes, [1, 3, 4, 5]);
        assert_eq!(sub.path_above, [0]);
        assert_eq!(sub.depth, 2);
        let leaf = first().after(&[11, 14, 15]).unwrap();
        assert_eq!(leaf.tree.tokens, [15]);
        assert_eq!(leaf.path_above, [0, 1, 4]);
        assert_eq!(leaf.depth, 0);
    }

    #[test]
    fn a_malformed_tree_serves_nothing() {
        let mut bad = first();
        bad.answer.tree.as_mut().unwrap().parents = vec![-1, 0, 3, 1, 1, 4];
        assert_eq!(bad.after(&[]), None);
        bad.answer.tree.as_mut().unwrap().parents = vec![-1, 0, 0, 1, -1, 4];
        assert_eq!(bad.after(&[]), None);
        bad.answer.tree.as_mut().unwrap().parents = vec![-1, 0, 0, 9, 1, 4];
        assert_eq!(bad.after(&[]), None);
    }

    #[test]
    fn a_token_the_draft_did_not_propose_leaves_nothing() {
        assert_eq!(first().after(&[12, 13]), None);
        assert_eq!(first().after(&[99]), None);
    }
}
