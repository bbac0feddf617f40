//! The `specllava.v1.Draft` gRPC service.

use std::pin::Pin;
use std::time::Instant;

use specllava_proto::v1 as pb;
use specllava_proto::v1::draft_server::Draft;
use specllava_service_kit::SessionRpc;
use specllava_wire::convert::{draft_params_from_proto, nanos, tree_to_proto};
use speculate::DraftParams;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::error::DraftError;
use crate::worker::{AheadOutcome, DraftBackend, SpeculateJob};

/// The wire form of a draft-ahead outcome.
fn ahead_to_proto(a: AheadOutcome) -> pb::AheadOutcome {
    match a {
        AheadOutcome::None => pb::AheadOutcome::None,
        AheadOutcome::Hit => pb::AheadOutcome::Hit,
        AheadOutcome::Miss => pb::AheadOutcome::Miss,
    }
}

/// Tree limits of the draft service.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest D, K, M a request may ask for (larger values are clamped).
    pub max_depth: usize,
    /// See `max_depth`.
    pub max_branching: usize,
    /// See `max_depth`.
    pub max_budget: usize,
}

/// The Draft service implementation.
pub struct DraftService {
    sessions: SessionRpc<DraftBackend>,
    limits: RequestLimits,
    model_info: pb::ModelInfo,
    level_costs: Vec<pb::LevelCost>,
}

impl DraftService {
    /// A service over `sessions` (the draft model's session worker); `Info` reports
    /// `model_info` and `level_costs` (the start-up measurement, possibly empty).
    pub fn new(
        sessions: SessionRpc<DraftBackend>,
        limits: RequestLimits,
        model_info: pb::ModelInfo,
        level_costs: Vec<pb::LevelCost>,
    ) -> Self {
        Self {
            sessions,
            limits,
            model_info,
            level_costs,
        }
    }
}

impl RequestLimits {
    /// `p` with D, K, M clamped to the limits.
    pub fn clamp(&self, p: DraftParams) -> DraftParams {
        DraftParams {
            depth: p.depth.min(self.max_depth),
            branching: p.branching.min(self.max_branching),
            budget: p.budget.min(self.max_budget),
            ..p
        }
    }
}

type TreeStream = Pin<Box<dyn Stream<Item = Result<pb::DraftTree, Status>> + Send>>;

specllava_service_kit::model_service! {
    sessions: sessions;
    impl Draft for DraftService {
        type SpeculateStream = TreeStream;

        async fn speculate(
            &self,
            request: Request<Streaming<pb::SpeculateRequest>>,
        ) -> Result<Response<Self::SpeculateStream>, Status> {
            specllava_telemetry::metrics().record_request("Speculate");
            let mut inbound = request.into_inner();
            let worker = self.sessions.worker().clone();
            let limits = self.limits;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::spawn(
                async move {
                    let mut session_id = String::new();
                    while let Some(msg) = inbound.next().await {
                        // `total_ns` runs from when the request is read off the stream (a
                        // stream's requests are read one at a time).
                        let received = Instant::now();
                        let msg = match msg {
                            Ok(m) => m,
                            Err(status) => {
                                // A message tonic could not decode (or the client's reset):
                                // the stream ends with that status, never a silent OK.
                                tracing::debug!(%status, "speculate stream failed");
                                let _ = tx.send(Err(status)).await;
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
                        let params = match draft_params_from_proto(msg.params) {
                            Ok(p) => limits.clamp(p),
                            Err(e) => {
                                let _ = tx
                                    .send(Err(DraftError::InvalidArgument(e.to_string()).into()))
                                    .await;
                                return;
                            }
                        };
                        let job = SpeculateJob {
                            session_id: session_id.clone(),
                            new_tokens: msg.new_tokens,
                            accepted_path: msg.accepted_path,
                            params,
                            draft_ahead: msg.draft_ahead,
                            answer_ahead: msg.answer_ahead,
                            span: tracing::Span::current(),
                        };
                        let reply = match worker.submit(job).await {
                            Ok(d) => {
                                let (assumed_path, assumed_emitted) =
                                    d.assumed.unwrap_or_default();
                                Ok(pb::DraftTree {
                                    tree: Some(tree_to_proto(&d.tree)),
                                    levels: d.levels,
                                    drafted_nodes: d.drafted_nodes,
                                    draft_ns: d.draft_ns,
                                    ahead: ahead_to_proto(d.ahead) as i32,
                                    ahead_ns: d.ahead_ns,
                                    assumed_path,
                                    assumed_emitted,
                                    total_ns: nanos(received.elapsed()),
                                })
                            }
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

        async fn info(
            &self,
            _request: Request<pb::InfoRequest>,
        ) -> Result<Response<pb::DraftInfoResponse>, Status> {
            specllava_telemetry::metrics().record_request("Info");
            Ok(Response::new(pb::DraftInfoResponse {
                model: Some(self.model_info.clone()),
                max_depth: self.limits.max_depth as u32,
                max_branching: self.limits.max_branching as u32,
                max_budget: self.limits.max_budget as u32,
                level_costs: self.level_costs.clone(),
            }))
        }
    }
}
