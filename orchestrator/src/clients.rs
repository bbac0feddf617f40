//! How the engine talks to replicas: a small client trait ([`ReplicaApi`]) with the
//! gRPC implementation ([`GrpcReplicas`]) over each replica's channel, so that the
//! generation loop can be tested with in-process fakes; and [`Guarded`], which every
//! call goes through: a deadline on each call and the replica's health kept from the
//! outcome.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

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

use crate::error::is_replica_failure;
use crate::routing::{Replica, ReplicaKind};

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
    /// `Target.EncodeImages` (a replica that does not offer it: UNIMPLEMENTED, the images
    /// then travel as they are).
    async fn encode_images(
        &self,
        _replica: &Replica,
        _req: pb::EncodeImagesRequest,
    ) -> Result<pb::EncodeImagesResponse, Status> {
        Err(Status::unimplemented("EncodeImages"))
    }
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

/// Largest reply a replica may send (the replicas' own request limit,
/// `--max-message-bytes`, by default): vision features run to megabytes per image.
const MAX_REPLY_BYTES: usize = 64 * 1024 * 1024;

fn draft(r: &Replica) -> DraftClient<Traced> {
    DraftClient::with_interceptor(r.channel.clone(), TraceContextInterceptor)
        .max_decoding_message_size(MAX_REPLY_BYTES)
}

fn target(r: &Replica) -> TargetClient<Traced> {
    TargetClient::with_interceptor(r.channel.clone(), TraceContextInterceptor)
        .max_decoding_message_size(MAX_REPLY_BYTES)
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

    async fn encode_images(
        &self,
        replica: &Replica,
        req: pb::EncodeImagesRequest,
    ) -> Result<pb::EncodeImagesResponse, Status> {
        target(replica)
            .encode_images(req)
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

/// The deadline of every call to a replica, by replica kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Deadline of a draft call.
    pub draft: Duration,
    /// Deadline of a target call.
    pub target: Duration,
}

impl Deadlines {
    /// The deadline of a call to a `kind` replica.
    pub fn of(&self, kind: ReplicaKind) -> Duration {
        match kind {
            ReplicaKind::Draft => self.draft,
            ReplicaKind::Target => self.target,
        }
    }
}

/// [`ReplicaApi`] with a deadline on every call (the replica kind's, scaled by the images a
/// call carries: each image decoded and run through the tower is work of its own, and a
/// request's size must never read as a replica failure), keeping the replicas' health: a call that fails because of the replica (a missed deadline, a
/// transport error... see [`is_replica_failure`]) takes it out of rotation at once; any
/// answer puts it back. `CloseSession` (best-effort cleanup, often of a session on a
/// replica that just failed) has the deadline but says nothing about health. The
/// `Speculate` deadline covers opening the stream; each tree is waited for under the draft
/// timeout by the engine.
pub struct Guarded {
    inner: Arc<dyn ReplicaApi>,
    deadlines: Deadlines,
}

impl Guarded {
    /// `inner` with `deadlines`.
    pub fn new(inner: Arc<dyn ReplicaApi>, deadlines: Deadlines) -> Self {
        Self { inner, deadlines }
    }

    /// Runs one call carrying `images` images under the kind's deadline, once more for each
    /// image.
    async fn within<T>(
        &self,
        kind: ReplicaKind,
        what: &str,
        images: usize,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let scale = u32::try_from(images.saturating_add(1)).unwrap_or(u32::MAX);
        let limit = self.deadlines.of(kind).saturating_mul(scale);
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "{kind} {what} got no answer within {} ms",
                limit.as_millis()
            )))
        })
    }

    /// Runs one call to `replica` carrying `images` images under its deadline
    /// ([`Guarded::within`]) and records its outcome.
    async fn call<T>(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        what: &str,
        images: usize,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let res = self.within(kind, what, images, call).await;
        match &res {
            Err(s) if is_replica_failure(s) => replica.mark_down(kind, s),
            _ => replica.mark_up(kind),
        }
        res
    }
}

#[tonic::async_trait]
impl ReplicaApi for Guarded {
    async fn open_session(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        req: pb::OpenSessionRequest,
    ) -> Result<pb::OpenSessionResponse, Status> {
        let images = req.images.len();
        let call = self.inner.open_session(kind, replica, req);
        self.call(kind, replica, "OpenSession", images, call).await
    }

    async fn append(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        req: pb::AppendRequest,
    ) -> Result<pb::AppendResponse, Status> {
        let images = req.images.len();
        let call = self.inner.append(kind, replica, req);
        self.call(kind, replica, "Append", images, call).await
    }

    async fn close_session(
        &self,
        kind: ReplicaKind,
        replica: &Replica,
        req: pb::CloseSessionRequest,
    ) -> Result<pb::CloseSessionResponse, Status> {
        let call = self.inner.close_session(kind, replica, req);
        self.within(kind, "CloseSession", 0, call).await
    }

    async fn verify(
        &self,
        replica: &Replica,
        req: pb::VerifyRequest,
    ) -> Result<pb::VerifyResponse, Status> {
        let call = self.inner.verify(replica, req);
        self.call(ReplicaKind::Target, replica, "Verify", 0, call)
            .await
    }

    async fn target_info(&self, replica: &Replica) -> Result<pb::InfoResponse, Status> {
        let call = self.inner.target_info(replica);
        self.call(ReplicaKind::Target, replica, "Info", 0, call)
            .await
    }

    async fn draft_info(&self, replica: &Replica) -> Result<pb::DraftInfoResponse, Status> {
        let call = self.inner.draft_info(replica);
        self.call(ReplicaKind::Draft, replica, "Info", 0, call)
            .await
    }

    async fn encode_images(
        &self,
        replica: &Replica,
        req: pb::EncodeImagesRequest,
    ) -> Result<pb::EncodeImagesResponse, Status> {
        let images = req.images.len();
        let call = self.inner.encode_images(replica, req);
        self.call(ReplicaKind::Target, replica, "EncodeImages", images, call)
            .await
    }

    async fn speculate(
        &self,
        replica: &Replica,
        requests: mpsc::Receiver<pb::SpeculateRequest>,
    ) -> Result<TreeStream, Status> {
        let call = self.inner.speculate(replica, requests);
        self.call(ReplicaKind::Draft, replica, "Speculate", 0, call)
            .await
    }
}
