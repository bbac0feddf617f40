//! How the engine talks to replicas: a small client trait ([`ReplicaApi`]) with the
//! gRPC implementation ([`GrpcReplicas`]) over each replica's channel, so that the
//! generation loop can be tested with in-process fakes.

use std::pin::Pin;

use specllava_proto::v1 as pb;
use specllava_proto::v1::draft_client::DraftClient;
use specllava_proto::v1::target_client::TargetClient;
use specllava_telemetry::TraceContextInterceptor;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::routing::Replica;

/// The two kinds of model replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaKind {
    /// A draft service: proposes trees.
    Draft,
    /// A target service: verifies them.
    Target,
}

impl ReplicaKind {
    /// `draft` or `target` (logs, errors, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaKind::Draft => "draft",
            ReplicaKind::Target => "target",
        }
    }
}

impl std::fmt::Display for ReplicaKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The draft trees of one Speculate stream.
pub type TreeStream = Pin<Box<dyn Stream<Item = Result<pb::DraftTree, Status>> + Send>>;

/// The calls the engine makes to replicas. The session calls take the replica kind:
/// both kinds serve `OpenSession`, `Append` and `CloseSession` alike.
#[tonic::async_trait]
pub trait ReplicaApi: Send + Sync + 'static {
    /// `OpenSession` on a replica.
    async fn open_session(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        req: pb::OpenSessionRequest,
    ) -> Result<pb::OpenSessionResponse, Status>;
    /// `Append` on a replica.
    async fn append(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        req: pb::AppendRequest,
    ) -> Result<pb::AppendResponse, Status>;
    /// `CloseSession` on a replica.
    async fn close_session(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        req: pb::CloseSessionRequest,
    ) -> Result<pb::CloseSessionResponse, Status>;
    /// `Target.Verify`.
    async fn verify(
        &self,
        replica: &Replica,
        req: pb::VerifyRequest,
    ) -> Result<pb::VerifyResponse, Status>;
    /// `Target.Info`.
    async fn target_info(&self, replica: &Replica) -> Result<pb::InfoResponse, Status>;
    /// `Draft.Info`.
    async fn draft_info(&self, replica: &Replica) -> Result<pb::DraftInfoResponse, Status>;
    /// Opens a `Draft.Speculate` stream fed by `requests`.
    async fn speculate(
        &self,
        replica: &Replica,
        requests: mpsc::Receiver<pb::SpeculateRequest>,
    ) -> Result<TreeStream, Status>;
}

/// [`ReplicaApi`] over gRPC, with W3C trace context on every call.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcReplicas;

/// A replica's channel carrying the caller's trace context.
type Traced = InterceptedService<Channel, TraceContextInterceptor>;

fn draft(r: &Replica) -> DraftClient<Traced> {
    DraftClient::with_interceptor(r.channel.clone(), TraceContextInterceptor)
}

fn target(r: &Replica) -> TargetClient<Traced> {
    TargetClient::with_interceptor(r.channel.clone(), TraceContextInterceptor)
}

#[tonic::async_trait]
impl ReplicaApi for GrpcReplicas {
    async fn open_session(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        req: pb::OpenSessionRequest,
    ) -> Result<pb::OpenSessionResponse, Status> {
        let resp = match kind {
            ReplicaKind::Draft => draft(replica).open_session(req).await,
            ReplicaKind::Target => target(replica).open_session(req).await,
        };
        resp.map(tonic::Response::into_inner)
    }

    async fn append(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        req: pb::AppendRequest,
    ) -> Result<pb::AppendResponse, Status> {
        let resp = match kind {
            ReplicaKind::Draft => draft(replica).append(req).await,
            ReplicaKind::Target => target(replica).append(req).await,
        };
        resp.map(tonic::Response::into_inner)
    }

    async fn close_session(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        req: pb::CloseSessionRequest,
    ) -> Result<pb::CloseSessionResponse, Status> {
        let resp = match kind {
            ReplicaKind::Draft => draft(replica).close_session(req).await,
            ReplicaKind::Target => target(replica).close_session(req).await,
        };
        resp.map(tonic::Response::into_inner)
    }

    async fn verify(
        &self,
        replica: &Replica,
        req: pb::VerifyRequest,
    ) -> Result<pb::VerifyResponse, Status> {
        target(replica)
            .verify(req)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn target_info(&self, replica: &Replica) -> Result<pb::InfoResponse, Status> {
        target(replica)
            .info(pb::InfoRequest {})
            .await
            .map(tonic::Response::into_inner)
    }

    async fn draft_info(&self, replica: &Replica) -> Result<pb::DraftInfoResponse, Status> {
        draft(replica)
            .info(pb::InfoRequest {})
            .await
            .map(tonic::Response::into_inner)
    }

    async fn speculate(
        &self,
        replica: &Replica,
        requests: mpsc::Receiver<pb::SpeculateRequest>,
    ) -> Result<TreeStream, Status> {
        let resp = draft(replica)
            .speculate(ReceiverStream::new(requests))
            .await?;
        Ok(Box::pin(resp.into_inner()))
    }
}
