//! A draft session's set-up, run as a task of its own while the target prefills: the sync
//! call (open or append) and then, when the turn drafts, the speculate stream and (when its
//! verification is cheap enough) the turn's first tree. Neither the stream's opening nor a
//! draft round trip then stands between the target's prefill and the first token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use specllava_proto::v1 as pb;
use specllava_service_kit::convert::{draft_params_to_proto, nanos};
use speculate::DraftParams;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::Status;
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
    /// Starts `planned` and then, if asked, the stream and the first tree.
    pub fn spawn(
        replicas: Arc<dyn ReplicaApi>,
        planned: PlannedSync,
        early: Option<EarlyStream>,
    ) -> Self {
        let target = planned.target.clone();
        let task = tokio::spawn(
            async move {
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
