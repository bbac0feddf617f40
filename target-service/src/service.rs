//! The `specllava.v1.Target` gRPC service: validates requests and forwards
//! them to the model worker.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use specllava_model::{ImageLimits, Llava};
use specllava_proto::v1 as pb;
use specllava_proto::v1::target_server::Target;
use speculate::{SamplingParams, StopConditions, TokenTree, TreeLimits};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::TargetError;
use crate::worker::{VerifyJob, WorkerHandle, finish_to_proto};
use specllava_service_kit::prepare_prefill;

/// Request validation limits.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Tree limits (nodes, depth, vocabulary).
    pub tree: TreeLimits,
    /// Image decoding limits.
    pub image: ImageLimits,
    /// Maximum KV rows + tree depth of a session.
    pub max_context: usize,
}

/// The Target service implementation.
pub struct TargetService {
    model: Arc<Llava>,
    worker: WorkerHandle,
    limits: RequestLimits,
    verify_costs: Vec<pb::VerifyCost>,
}

impl TargetService {
    /// A service forwarding to `worker`, which owns `model`'s sessions; `Info` reports
    /// `verify_costs` (the start-up measurement, possibly empty).
    pub fn new(
        model: Arc<Llava>,
        worker: WorkerHandle,
        limits: RequestLimits,
        verify_costs: Vec<pb::VerifyCost>,
    ) -> Self {
        Self {
            model,
            worker,
            limits,
            verify_costs,
        }
    }
}

/// Converts wire sampling params (0 top_p = off) and validates them.
pub fn sampling_from_proto(
    p: Option<pb::SamplingParams>,
) -> Result<SamplingParams, speculate::SamplingError> {
    let p = p.unwrap_or_default();
    let s = SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        seed: p.seed,
    };
    s.validate()?;
    Ok(s)
}

/// Converts wire stop conditions (0 max_new_tokens = no limit).
pub fn stop_from_proto(p: Option<pb::StopConditions>) -> StopConditions {
    let p = p.unwrap_or_default();
    StopConditions {
        eos_token_ids: p.eos_token_ids,
        max_new_tokens: if p.max_new_tokens == 0 {
            usize::MAX
        } else {
            p.max_new_tokens as usize
        },
    }
}

type DecodeStream = Pin<Box<dyn Stream<Item = Result<pb::DecodeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Target for TargetService {
    async fn open_session(
        &self,
        request: Request<pb::OpenSessionRequest>,
    ) -> Result<Response<pb::OpenSessionResponse>, Status> {
        specllava_telemetry::metrics().record_request("OpenSession");
        let r = request.into_inner();
        if r.session_id.is_empty() {
            return Err(TargetError::InvalidArgument("session_id must not be empty".into()).into());
        }
        if r.token_ids.len() > self.limits.max_context {
            return Err(TargetError::ContextFull(format!(
                "{} tokens exceed the context of {}",
                r.token_ids.len(),
                self.limits.max_context
            ))
            .into());
        }
        let images = prepare_prefill(&self.model, self.limits.image, &r.token_ids, r.images)
            .await
            .map_err(TargetError::InvalidArgument)?;
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
            .map_err(TargetError::InvalidArgument)?;
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

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        specllava_telemetry::metrics().record_request("Verify");
        let t0 = Instant::now();
        let r = request.into_inner();
        let tree = r.tree.unwrap_or_default();
        let scores = if tree.scores.is_empty() {
            vec![0.0; tree.tokens.len()]
        } else {
            tree.scores
        };
        let tree = TokenTree::new(tree.tokens, tree.parents, scores, &self.limits.tree)
            .map_err(TargetError::from)?;
        let job = VerifyJob {
            session_id: r.session_id,
            expected_kv_len: r.expected_kv_len,
            tree,
            sampling: sampling_from_proto(r.sampling).map_err(TargetError::from)?,
            stop: stop_from_proto(r.stop),
            span: tracing::Span::current(),
        };
        let res = self.worker.verify(job).await?;
        Ok(Response::new(pb::VerifyResponse {
            emitted: res.outcome.emitted,
            accepted_path: res
                .outcome
                .accepted_path
                .iter()
                .map(|&i| i as u32)
                .collect(),
            accepted: res.outcome.accepted as u32,
            proposed: res.outcome.proposed as u32,
            kv_len: res.kv_len,
            finish: finish_to_proto(res.outcome.finish) as i32,
            queue_ns: res.queue_ns,
            forward_ns: res.forward_ns,
            total_ns: u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX),
            batch_size: res.batch_size,
            batch_nodes: res.batch_nodes,
        }))
    }

    type DecodeStream = DecodeStream;

    async fn decode(
        &self,
        request: Request<pb::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        specllava_telemetry::metrics().record_request("Decode");
        let r = request.into_inner();
        let sampling = sampling_from_proto(r.sampling).map_err(TargetError::from)?;
        let stop = stop_from_proto(r.stop);
        if r.root_token as usize >= self.limits.tree.vocab_size {
            return Err(TargetError::InvalidArgument(format!(
                "root token {} is outside the vocabulary",
                r.root_token
            ))
            .into());
        }
        let worker = self.worker.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(
            async move {
                let mut kv_len = r.expected_kv_len;
                let mut root = r.root_token;
                let mut remaining = stop.max_new_tokens;
                while remaining > 0 {
                    let job = VerifyJob {
                        session_id: r.session_id.clone(),
                        expected_kv_len: kv_len,
                        tree: TokenTree::root(root),
                        sampling,
                        stop: StopConditions {
                            eos_token_ids: stop.eos_token_ids.clone(),
                            max_new_tokens: remaining,
                        },
                        span: tracing::Span::current(),
                    };
                    let msg = match worker.verify(job).await {
                        Ok(res) => {
                            let token = res.outcome.emitted[0];
                            kv_len = res.kv_len;
                            root = token;
                            remaining -= 1;
                            let finish = res.outcome.finish;
                            let m = pb::DecodeResponse {
                                token,
                                kv_len,
                                finish: finish_to_proto(finish) as i32,
                                forward_ns: res.forward_ns,
                                queue_ns: res.queue_ns,
                            };
                            let last = finish.is_some();
                            if tx.send(Ok(m)).await.is_err() || last {
                                return;
                            }
                            continue;
                        }
                        Err(e) => Err(Status::from(e)),
                    };
                    let _ = tx.send(msg).await;
                    return;
                }
            }
            .instrument(tracing::Span::current()),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        specllava_telemetry::metrics().record_request("Info");
        let cfg = self.model.config();
        Ok(Response::new(pb::InfoResponse {
            vocab_size: cfg.text.vocab_size as u32,
            image_token_id: cfg.image_token_id,
            num_image_tokens: self.model.num_image_tokens() as u32,
            eos_token_ids: cfg.eos_token_ids.clone(),
            max_context: self.limits.max_context as u64,
            max_tree_nodes: self.limits.tree.max_nodes as u32,
            max_tree_depth: self.limits.tree.max_depth as u32,
            verify_costs: self.verify_costs.clone(),
        }))
    }
}
