//! Bringing a replica session up to date with a conversation's history: which call it takes
//! (`OpenSession` for a new session, `Append` of the tokens it lacks, nothing when in sync),
//! making it, and recording the answer in the [`ReplicaSession`].
//!
//! The call owns its request and replica handle, so it can run as a task of its own: the
//! draft session of a turn syncs in the background while the target already decodes
//! ([`crate::engine`]).

use bytes::Bytes;
use std::sync::Arc;

use specllava_proto::v1 as pb;
use tonic::Status;

use crate::clients::ReplicaApi;
use crate::error::OrchestratorError;
use crate::routing::Replica;
use crate::routing::{ReplicaInfo, ReplicaKind};
use crate::session::{ReplicaSession, kv_rows};

/// The call that syncs a session.
#[derive(Debug, Clone)]
pub enum SyncCall {
    /// Open the session with the whole history.
    Open(pb::OpenSessionRequest),
    /// Truncate the session's KV and append the tokens it lacks.
    Append(pb::AppendRequest),
}

/// What the replica answered.
#[derive(Debug, Clone)]
pub struct SyncReply {
    /// KV rows the session holds now.
    pub kv_len: u64,
    /// KV rows each of the call's images became.
    pub image_rows: Vec<u64>,
    /// Prefill time the replica reports.
    pub forward_ns: u64,
    /// The token the prefill picked after the history, when the call asked for it.
    pub first_step: Option<pb::FirstStep>,
}

/// A sync to make: the call, and where it goes.
pub struct PlannedSync {
    /// Where it goes and what the session holds once it succeeds.
    pub target: SyncTarget,
    /// The call (it owns the request, images or features included: whoever makes the call
    /// takes it, so they are held once).
    pub call: SyncCall,
}

/// Where a sync goes and what its session holds once it succeeds: what the caller records
/// of its answer.
#[derive(Clone)]
pub struct SyncTarget {
    /// Which replica kind.
    pub kind: ReplicaKind,
    /// The replica.
    pub replica: Arc<Replica>,
    /// History tokens the session knows once the call succeeds.
    pub synced: usize,
    /// Whether the call opens the session.
    pub opens: bool,
    /// Images of the history the session keeps (an `Append` truncates after them).
    pub kept_images: usize,
    /// Images of the conversation once the call is applied.
    pub conversation_images: usize,
}

/// The call that brings `rs` up to `history` (with `images` at its placeholders), or `None`
/// when it is in sync already. With `first_step` (a target's), the call also computes the
/// history's last token and picks the one after it.
pub fn plan_sync(
    kind: ReplicaKind,
    rs: &ReplicaSession,
    conv_id: &str,
    history: &[u32],
    images: &[Bytes],
    image_token_id: u32,
    first_step: Option<pb::FirstStepRequest>,
) -> Result<Option<PlannedSync>, OrchestratorError> {
    let replica = Arc::clone(rs.pin.replica());
    let planned = |call: SyncCall, kept_images: usize| {
        Ok(Some(PlannedSync {
            target: SyncTarget {
                kind,
                replica,
                synced: history.len(),
                opens: matches!(call, SyncCall::Open(_)),
                kept_images,
                conversation_images: images.len(),
            },
            call,
        }))
    };
    let conversation_images = images.len() as u32;
    if !rs.opened {
        return planned(
            SyncCall::Open(pb::OpenSessionRequest {
                session_id: conv_id.to_owned(),
                images: images.to_vec(),
                token_ids: history.to_vec(),
                image_features: Vec::new(),
                first_step,
                conversation_images,
            }),
            0,
        );
    }
    if rs.synced == history.len() {
        return Ok(None);
    }
    let mut keep_h = rs.synced.min(history.len()).max(1) - 1;
    let kept_images = history[..keep_h]
        .iter()
        .filter(|&&t| t == image_token_id)
        .count();
    if kept_images > 0
        && (rs.conversation_images == 1) != (images.len() == 1)
        && tiles_single_images_only(rs)
    {
        // LLaVA-OneVision tiles an image only as its conversation's only one (transformers
        // processes the whole prompt): the kept images were prefilled for the other case
        // (one image that now has company, or company that is gone): prefill it all anew.
        keep_h = 0;
    }
    let keep = kv_rows(history, keep_h, image_token_id, &rs.image_rows);
    let skip_images = history[..keep_h]
        .iter()
        .filter(|&&t| t == image_token_id)
        .count();
    let tokens = history[keep_h..].to_vec();
    let n_images = tokens.iter().filter(|&&t| t == image_token_id).count();
    let range = skip_images..skip_images + n_images;
    if range.end > images.len() {
        return Err(OrchestratorError::Internal(format!(
            "history holds more image placeholders than the session has images ({})",
            images.len()
        )));
    }
    planned(
        SyncCall::Append(pb::AppendRequest {
            session_id: conv_id.to_owned(),
            keep_kv_len: keep,
            token_ids: tokens,
            images: images[range].to_vec(),
            image_features: Vec::new(),
            first_step,
            conversation_images,
        }),
        skip_images,
    )
}

/// Whether the session's replica tiles an image only when it is its conversation's only one
/// (LLaVA-OneVision).
fn tiles_single_images_only(rs: &ReplicaSession) -> bool {
    rs.pin
        .replica()
        .info
        .get()
        .and_then(ReplicaInfo::model)
        .and_then(|m| m.any_resolution.as_ref())
        .is_some_and(|a| a.tile_single_images_only)
}

impl PlannedSync {
    /// The images an `OpenSession` carries (none for an `Append`, which the set-ups that
    /// share features never make).
    pub fn open_images(&self) -> &[Bytes] {
        match &self.call {
            SyncCall::Open(req) => &req.images,
            SyncCall::Append(_) => &[],
        }
    }

    /// Has the `OpenSession` carry `features` (one per image, computed with the replica's
    /// vision fingerprint) instead of its images; `false`, changing nothing, when they do not
    /// match its images one for one.
    pub fn carry_features(&mut self, features: Vec<pb::VisionFeatures>) -> bool {
        match &mut self.call {
            SyncCall::Open(req) if !req.images.is_empty() && req.images.len() == features.len() => {
                req.images.clear();
                req.image_features = features;
                true
            }
            _ => false,
        }
    }

    /// Makes the call.
    pub async fn run(self, replicas: &dyn ReplicaApi) -> Result<SyncReply, Status> {
        let SyncTarget { kind, replica, .. } = self.target;
        let sent = match &self.call {
            SyncCall::Open(r) => r.images.len().max(r.image_features.len()),
            SyncCall::Append(r) => r.images.len().max(r.image_features.len()),
        };
        let checked = Arc::clone(&replica);
        let mut reply = match self.call {
            SyncCall::Open(req) => {
                replicas
                    .open_session(kind, &replica, req)
                    .await
                    .map(|r| SyncReply {
                        kv_len: r.kv_len,
                        image_rows: r.image_rows.iter().map(|&n| u64::from(n)).collect(),
                        forward_ns: r.prefill_ns,
                        first_step: r.first_step,
                    })
            }
            SyncCall::Append(req) => {
                replicas
                    .append(kind, &replica, req)
                    .await
                    .map(|r| SyncReply {
                        kv_len: r.kv_len,
                        image_rows: r.image_rows.iter().map(|&n| u64::from(n)).collect(),
                        forward_ns: r.forward_ns,
                        first_step: r.first_step,
                    })
            }
        }?;
        if reply.image_rows.len() != sent {
            // A replica that does not report its images' rows (an older one): its fixed count,
            // or, for a tiling model, an error rather than a wrong KV length later.
            let model = checked.info.get().and_then(ReplicaInfo::model);
            match model {
                Some(m) if m.any_resolution.is_none() && reply.image_rows.is_empty() => {
                    reply.image_rows = vec![u64::from(m.num_image_tokens.max(1)); sent];
                }
                _ => {
                    return Err(Status::internal(format!(
                        "the replica reported the rows of {} images for the {sent} it was sent",
                        reply.image_rows.len()
                    )));
                }
            }
        }
        Ok(reply)
    }
}

impl SyncTarget {
    /// Records a successful call in `rs`.
    pub fn apply(&self, rs: &mut ReplicaSession, reply: &SyncReply) {
        rs.opened = true;
        rs.synced = self.synced;
        rs.kv_len = reply.kv_len;
        rs.image_rows.truncate(self.kept_images);
        rs.image_rows.extend_from_slice(&reply.image_rows);
        rs.conversation_images = self.conversation_images;
    }
}
