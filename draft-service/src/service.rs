//! The `specllava.v1.Draft` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use specllava_model::{ImageLimits, Llava};
use specllava_proto::v1 as pb;
use specllava_proto::v1::draft_server::Draft;
use specllava_service_kit::prepare_prefill;
use speculate::{DraftParams, TreeMode};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::DraftError;
use crate::worker::{SpeculateJob, WorkerHandle};

/// Request limits of the draft service.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Image decoding limits.
    pub image: ImageLimits,
    /// Largest D, K, M a request may ask for (larger values are clamped).
    pub max_depth: usize,
    /// See `max_depth`.
    pub max_branching: usize,
    /// See `max_depth`.
    pub max_budget: usize,
    /// Maximum KV rows of a session.
    pub max_context: usize,
}

/// The Draft service implementation.
pub struct DraftService {
    model: Arc<Llava>,
    worker: WorkerHandle,
    limits: RequestLimits,
}

impl DraftService {
    /// A service forwarding to `worker`, which owns `model`'s sessions.
    pub fn new(model: Arc<Llava>, worker: WorkerHandle, limits: RequestLimits) -> Self {
        Self {
            model,
            worker,
            limits,
        }
    }
}

/// Converts wire draft params, clamping them to the limits.
pub fn params_from_proto(p: Option<pb::DraftParams>, limits: &RequestLimits) -> DraftParams {
    let p = p.unwrap_or_default();
    let mode = match pb::TreeMode::try_from(p.mode).unwrap_or(pb::TreeMode::Dynamic) {
        pb::TreeMode::Dynamic => TreeMode::Dynamic,
        pb::TreeMode::Static => TreeMode::Static,
        pb::TreeMode::Chain => TreeMode::Chain,
    };
    DraftParams {
        mode,
        depth: (p.depth as usize).min(limits.max_depth),
        branching: (p.branching as usize).min(limits.max_branching),
        budget: (p.budget as usize).min(limits.max_budget),
    }
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<pb::DraftTree, Status>> + Send>>;

#[tonic::async_trait]
impl Draft for DraftService {
    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        specllava_telemetry::metrics().record_request("OpenSession");
        let r = request.into_inner();
        if r.session_id.is_empty() {
            return Err(DraftError::InvalidArgument("session_id must not be empty".into()).into());
        }
        if r.token_ids.len() > self.limits.max_context {
            return Err(DraftError::InvalidArgument(format!(
                "{} tokens exceed the context of {}",
                r.token_ids.len(),
                self.limits.max_context
            ))
            .into());
        }
        let images = prepare_prefill(&self.model, self.limits.image, &r.token_ids, r.images)
            .await
            .map_err(DraftError::InvalidArgument)?;
        let out = self
            .worker
            .open(r.session_id.clone(), r.token_ids, images)
            .await?;
        tracing::info!(session = %r.session_id, kv_len = out.kv_len, "session opened");
        Ok(Response::new(pb::OpenSessionResponse {
            kv_len: out.kv_len,
            num_image_tokens: self.model.num_image_tokens() as u32,
            prefill_ns: out.forward_ns,
        }))
    }

    async fn append(
        &self,
        request: Request<pb::AppendRequest>,
    ) -> Result<Response<pb::AppendResponse>, Status> {
        specllava_telemetry::metrics().record_request("Append");
        let r = request.into_inner();
        let images = prepare_prefill(&self.model, self.limits.image, &r.token_ids, r.images)
            .await
            .map_err(DraftError::InvalidArgument)?;
        let out = self
            .worker
            .append(r.session_id, r.keep_kv_len, r.token_ids, images)
            .await?;
        Ok(Response::new(pb::AppendResponse {
            kv_len: out.kv_len,
            forward_ns: out.forward_ns,
        }))
    }

    async fn close_session(
        &self,
        request: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        specllava_telemetry::metrics().record_request("CloseSession");
        let id = request.into_inner().session_id;
        let existed = self.worker.close(id.clone()).await?;
        tracing::info!(session = %id, existed, "session closed");
        Ok(Response::new(pb::CloseSessionResponse { existed }))
    }

    type SpeculateStream = TreeStream;

    async fn speculate(
        &self,
        request: Request<Streaming<pb::SpeculateRequest>>,
    ) -> Result<Response<Self::SpeculateStream>, Status> {
        specllava_telemetry::metrics().record_request("Speculate");
        let mut inbound = request.into_inner();
        let worker = self.worker.clone();
        let limits = self.limits;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(
            async move {
                let mut session_id = String::new();
                while let Some(msg) = inbound.next().await {
                    let msg = match msg {
                        Ok(m) => m,
                        Err(status) => {
                            tracing::debug!(%status, "speculate stream ended by the client");
                            return;
                        }
                    };
                    if !msg.session_id.is_empty() {
                        session_id = msg.session_id;
                    }
                    if session_id.is_empty() {
                        let _ = tx
                            .send(Err(DraftError::InvalidArgument(
                                "the first message needs a session_id".into(),
                            )
                            .into()))
                            .await;
                        return;
                    }
                    let job = SpeculateJob {
                        session_id: session_id.clone(),
                        new_tokens: msg.new_tokens,
                        accepted_path: msg.accepted_path,
                        params: params_from_proto(msg.params, &limits),
                        span: tracing::Span::current(),
                    };
                    let reply = match worker.speculate(job).await {
                        Ok(d) => Ok(pb::DraftTree {
                            tree: Some(pb::TokenTree {
                                tokens: d.tree.tokens().to_vec(),
                                parents: d.tree.parents().to_vec(),
                                scores: d.tree.scores().to_vec(),
                            }),
                            levels: d.levels,
                            drafted_nodes: d.drafted_nodes,
                            draft_ns: d.draft_ns,
                            fed_tokens: d.fed_tokens,
                            mean_batch_size: d.mean_batch_size,
                        }),
                        Err(e) => Err(Status::from(e)),
                    };
                    let failed = reply.is_err();
                    if tx.send(reply).await.is_err() || failed {
                        return;
                    }
                }
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
