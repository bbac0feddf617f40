//! The `specllava.v1.Target` gRPC service: validates requests and forwards
//! them to the model worker.

use std::time::Instant;

use specllava_proto::v1 as pb;
use specllava_proto::v1::target_server::Target;
use specllava_service_kit::SessionRpc;
use specllava_wire::convert::{
    nanos, sampling_from_proto, stop_from_proto, tree_from_proto, verify_outcome_to_proto,
};
use speculate::TreeLimits;
use tonic::{Request, Response, Status};

use crate::error::TargetError;
use crate::worker::{TargetBackend, VerifyJob, verify};

/// Request validation limits.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Tree limits (nodes, depth, vocabulary).
    pub tree: TreeLimits,
}

/// The Target service implementation.
pub struct TargetService {
    sessions: SessionRpc<TargetBackend>,
    limits: RequestLimits,
    model_info: pb::ModelInfo,
    verify_costs: Vec<pb::VerifyCost>,
}

impl TargetService {
    /// A service over `sessions` (the target model's session worker); `Info` reports
    /// `model_info` and `verify_costs` (the start-up measurement, possibly empty).
    pub fn new(
        sessions: SessionRpc<TargetBackend>,
        limits: RequestLimits,
        model_info: pb::ModelInfo,
        verify_costs: Vec<pb::VerifyCost>,
    ) -> Self {
        Self {
            sessions,
            limits,
            model_info,
            verify_costs,
        }
    }
}

specllava_service_kit::model_service! {
    sessions: sessions;
    impl Target for TargetService {
        async fn verify(
            &self,
            request: Request<pb::VerifyRequest>,
        ) -> Result<Response<pb::VerifyResponse>, Status> {
            specllava_telemetry::metrics().record_request("Verify");
            let t0 = Instant::now();
            let r = request.into_inner();
            let tree = tree_from_proto(r.tree.unwrap_or_default(), &self.limits.tree)
                .map_err(TargetError::from)?;
            let job = VerifyJob {
                session_id: r.session_id,
                expected_kv_len: r.expected_kv_len,
                tree,
                sampling: sampling_from_proto(r.sampling).map_err(TargetError::from)?,
                stop: stop_from_proto(r.stop),
                span: tracing::Span::current(),
            };
            let res = verify(self.sessions.worker(), job).await?;
            Ok(Response::new(pb::VerifyResponse {
                kv_len: res.kv_len,
                forward_ns: res.forward_ns,
                total_ns: nanos(t0.elapsed()),
                batch_size: res.batch_size,
                ..verify_outcome_to_proto(&res.outcome)
            }))
        }

        async fn encode_images(
            &self,
            request: Request<pb::EncodeImagesRequest>,
        ) -> Result<Response<pb::EncodeImagesResponse>, Status> {
            let resp = self.sessions.encode_images(request.into_inner()).await?;
            Ok(Response::new(resp))
        }

        async fn info(
            &self,
            _request: Request<pb::InfoRequest>,
        ) -> Result<Response<pb::InfoResponse>, Status> {
            specllava_telemetry::metrics().record_request("Info");
            Ok(Response::new(pb::InfoResponse {
                model: Some(self.model_info.clone()),
                max_tree_nodes: self.limits.tree.max_nodes as u32,
                max_tree_depth: self.limits.tree.max_depth as u32,
                verify_costs: self.verify_costs.clone(),
            }))
        }
    }
}
