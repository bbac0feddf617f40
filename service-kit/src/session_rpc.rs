//! The session RPCs both model services serve the same way (`OpenSession`, `Append`,
//! `CloseSession`): validate, encode the images off the async runtime (the
//! [`VisionEncoder`] and its cache), hand the work to the session worker and answer; and
//! `EncodeImages` (the target's: images to vision features, no session).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::Semaphore;

use specllava_model::{ImageTokens, Llava, PrefillImages, check_image_header};
use specllava_proto::v1 as pb;

use crate::prefill::{prepare_prefill, vision_features_to_proto};
use crate::vision_encoder::VisionEncoder;
use specllava_wire::convert::{first_step_from_proto, first_step_to_proto, nanos};
use speculate::FirstStep;

use crate::worker::{FIRST_STEP_REFUSED, SessionBackend, WorkerError, WorkerHandle};

/// `EncodeImages` calls that may wait for the vision tower (one runs at a time); more are
/// refused with RESOURCE_EXHAUSTED (the caller then sends the images themselves).
pub const MAX_WAITING_ENCODES: usize = 32;

/// The shared session handlers of a model service over its worker.
pub struct SessionRpc<B: SessionBackend> {
    worker: WorkerHandle<B>,
    encoder: VisionEncoder,
    max_context: usize,
    /// `EncodeImages` calls admitted (running or waiting): one permit each.
    encodes: Arc<Semaphore>,
}

impl<B: SessionBackend> SessionRpc<B> {
    /// Handlers for `model`'s sessions, owned by `worker`, with their images encoded by
    /// `encoder`; histories longer than `max_context` tokens are refused.
    pub fn new(worker: WorkerHandle<B>, encoder: VisionEncoder, max_context: usize) -> Self {
        Self {
            worker,
            encoder,
            max_context,
            encodes: Arc::new(Semaphore::new(MAX_WAITING_ENCODES + 1)),
        }
    }

    /// The worker (for the service's batched RPC).
    pub fn worker(&self) -> &WorkerHandle<B> {
        &self.worker
    }

    /// The model.
    pub fn model(&self) -> &Arc<Llava> {
        self.encoder.model()
    }

    /// `OpenSession`: prefills all history tokens but the last (the root); with `first_step`,
    /// the root too, and answers the token picked after it.
    pub async fn open(
        &self,
        r: pb::OpenSessionRequest,
    ) -> Result<pb::OpenSessionResponse, B::Error> {
        specllava_telemetry::metrics().record_request("OpenSession");
        if r.session_id.is_empty() {
            return Err(WorkerError::InvalidArgument("session_id must not be empty".into()).into());
        }
        let first = first_step::<B>(r.first_step)?;
        let (images, image_rows) = self
            .prefill_images(
                &r.token_ids,
                r.images,
                r.image_features,
                r.conversation_images,
            )
            .await?;
        let out = self
            .worker
            .open(r.session_id.clone(), r.token_ids, images, first)
            .await?;
        tracing::info!(session = %r.session_id, kv_len = out.kv_len, "session opened");
        Ok(pb::OpenSessionResponse {
            kv_len: out.kv_len,
            num_image_tokens: self.encoder.model().tile_tokens() as u32,
            prefill_ns: out.forward_ns,
            first_step: out.first.as_ref().and_then(first_step_to_proto),
            image_rows,
        })
    }

    /// `Append`: truncates the session's KV, then appends tokens (the last becomes the root;
    /// with `first_step`, it is computed too and the token after it answered). A history
    /// longer than the context is refused by the worker before any forward; the session is
    /// left as it was.
    pub async fn append(&self, r: pb::AppendRequest) -> Result<pb::AppendResponse, B::Error> {
        specllava_telemetry::metrics().record_request("Append");
        // The new tokens' own rows here; with the kept rows, once the session is found (an
        // unknown session is NOT_FOUND whatever the length).
        let first = first_step::<B>(r.first_step)?;
        let (images, image_rows) = self
            .prefill_images(
                &r.token_ids,
                r.images,
                r.image_features,
                r.conversation_images,
            )
            .await?;
        let out = self
            .worker
            .append(r.session_id, r.keep_kv_len, r.token_ids, images, first)
            .await?;
        Ok(pb::AppendResponse {
            kv_len: out.kv_len,
            forward_ns: out.forward_ns,
            first_step: out.first.as_ref().and_then(first_step_to_proto),
            image_rows,
        })
    }

    /// A prefill's images, checked ([`SessionRpc::check_fits`]) and prepared
    /// ([`prepare_prefill`]) for a conversation of `declared` images (0: the request's own),
    /// and each image's KV rows.
    async fn prefill_images(
        &self,
        tokens: &[u32],
        images: Vec<Bytes>,
        features: Vec<pb::VisionFeatures>,
        declared: u32,
    ) -> Result<(PrefillImages, Vec<u32>), WorkerError> {
        let in_conversation = conversation_images(declared, images.len().max(features.len()))?;
        let rows = self.check_fits(0, tokens, &images, &features, in_conversation)?;
        let images =
            prepare_prefill(&self.encoder, tokens, images, features, in_conversation).await?;
        Ok((images, rows))
    }

    /// Refuses, before any image is decoded or any row computed, a prefill of `tokens` after
    /// `keep` rows that would not fit the context (each image placeholder counted as the KV
    /// rows its image becomes, from the image's header or its features' shape) or that
    /// carries more images than a request may. `conversation_images`: the images of the
    /// whole conversation (OneVision tiles an image only when it is alone). Returns each
    /// image's rows.
    fn check_fits(
        &self,
        keep: u64,
        tokens: &[u32],
        images: &[Bytes],
        features: &[pb::VisionFeatures],
        conversation_images: usize,
    ) -> Result<Vec<u32>, WorkerError> {
        let limits = self.encoder.limits();
        let count = images.len().max(features.len());
        limits
            .check_count(count)
            .map_err(|e| WorkerError::InvalidArgument(e.to_string()))?;
        let model = self.encoder.model();
        let image_rows = if let ImageTokens::Fixed(n) = model.image_tokens() {
            // Every image the same: nothing to read.
            vec![*n as u32; count]
        } else if features.is_empty() {
            // By the image's size, from its header.
            images
                .iter()
                .enumerate()
                .map(|(i, bytes)| {
                    let (w, h) = check_image_header(bytes, limits)
                        .map_err(|e| WorkerError::InvalidArgument(format!("image {i}: {e}")))?;
                    let size = (h as usize, w as usize);
                    Ok(model.image_token_count(size, conversation_images) as u32)
                })
                .collect::<Result<Vec<_>, WorkerError>>()?
        } else {
            let per_tile = model.tile_tokens().max(1);
            features
                .iter()
                .map(|f| {
                    let size = (f.image_height as usize, f.image_width as usize);
                    model.feature_token_count(f.rows as usize / per_tile, size) as u32
                })
                .collect()
        };
        for (i, &rows) in image_rows.iter().enumerate() {
            limits
                .check_image_tokens(i, rows as usize)
                .map_err(|e| WorkerError::InvalidArgument(e.to_string()))?;
        }
        let image_id = model.config().image_token_id;
        let placeholders = tokens.iter().filter(|&&t| t == image_id).count();
        let image_total: u64 = image_rows.iter().map(|&r| u64::from(r)).sum();
        let rows = (tokens.len() - placeholders.min(image_rows.len())) as u64 + image_total;
        let history = keep.saturating_add(rows);
        if history > self.max_context as u64 {
            return Err(WorkerError::ContextFull(format!(
                "{keep} kept rows + {} tokens ({} images of {image_rows:?} rows) = \
                 {history} rows exceed the context of {}",
                tokens.len(),
                image_rows.len(),
                self.max_context
            )));
        }
        Ok(image_rows)
    }

    /// `EncodeImages`: the vision features of `images` (decoded and run through the tower as
    /// one batch, as a prefill of them would, off the async runtime; or the encoder cache's);
    /// no session changes. At most as many images as the context holds.
    pub async fn encode_images(
        &self,
        r: pb::EncodeImagesRequest,
    ) -> Result<pb::EncodeImagesResponse, B::Error> {
        specllava_telemetry::metrics().record_request("EncodeImages");
        self.encoder
            .limits()
            .check_count(r.images.len())
            .map_err(|e| WorkerError::InvalidArgument(e.to_string()))?;
        // The images of a conversation being opened (what the orchestrator shares them for).
        let n_images = r.images.len();
        self.check_fits(0, &[], &r.images, &[], n_images)?;
        let _admitted = self
            .encodes
            .try_acquire()
            .map_err(|_| WorkerError::QueueFull {
                role: "vision encoder",
                capacity: MAX_WAITING_ENCODES + 1,
            })?;
        let t0 = Instant::now();
        let features = self
            .encoder
            .encode(r.images, n_images)
            .await
            .map_err(WorkerError::from)?
            .iter()
            .map(vision_features_to_proto)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| WorkerError::Model(format!("vision features: {e}")))?;
        Ok(pb::EncodeImagesResponse {
            features,
            vision_fingerprint: self.encoder.model().vision_fingerprint().to_owned(),
            encode_ns: nanos(t0.elapsed()),
        })
    }

    /// `CloseSession`: frees the session (closing an unknown one is not an error).
    pub async fn close(
        &self,
        r: pb::CloseSessionRequest,
    ) -> Result<pb::CloseSessionResponse, B::Error> {
        specllava_telemetry::metrics().record_request("CloseSession");
        let id = r.session_id;
        let existed = self.worker.close(id.clone()).await?;
        tracing::info!(session = %id, existed, "session closed");
        Ok(pb::CloseSessionResponse { existed })
    }
}

/// The images of a request's conversation: `declared` (a request's `conversation_images`),
/// or the request's own `count` when 0; fewer than the request carries is refused.
fn conversation_images(declared: u32, count: usize) -> Result<usize, WorkerError> {
    match declared as usize {
        0 => Ok(count),
        n if n < count => Err(WorkerError::InvalidArgument(format!(
            "conversation_images {n} is fewer than the request's {count} images"
        ))),
        n => Ok(n),
    }
}

/// A request's first step, checked before any work: refused by a backend that picks no
/// tokens (a draft), its sampling validated.
fn first_step<B: SessionBackend>(
    r: Option<pb::FirstStepRequest>,
) -> Result<Option<FirstStep>, WorkerError> {
    let Some(r) = r else { return Ok(None) };
    if !B::PICKS_FIRST_TOKEN {
        return Err(WorkerError::InvalidArgument(FIRST_STEP_REFUSED.into()));
    }
    first_step_from_proto(r)
        .map(Some)
        .map_err(|e| WorkerError::InvalidArgument(format!("first_step: {e}")))
}

/// Implements a model service's gRPC trait (`Draft`, `Target`): the session RPCs
/// (`OpenSession`, `Append`, `CloseSession`) delegate to the [`SessionRpc`] in field
/// `$sessions`; the service's own RPCs follow in the block.
///
/// ```ignore
/// specllava_service_kit::model_service! {
///     sessions: sessions;
///     impl Draft for DraftService {
///         async fn info(&self, ...) -> ... { ... }
///     }
/// }
/// ```
#[macro_export]
macro_rules! model_service {
    (sessions: $sessions:ident; impl $service:ident for $ty:ident { $($rest:tt)* }) => {
        #[::tonic::async_trait]
        impl $service for $ty {
            async fn open_session(
                &self,
                request: ::tonic::Request<::specllava_proto::v1::OpenSessionRequest>,
            ) -> ::std::result::Result<
                ::tonic::Response<::specllava_proto::v1::OpenSessionResponse>,
                ::tonic::Status,
            > {
                Ok(::tonic::Response::new(self.$sessions.open(request.into_inner()).await?))
            }

            async fn append(
                &self,
                request: ::tonic::Request<::specllava_proto::v1::AppendRequest>,
            ) -> ::std::result::Result<
                ::tonic::Response<::specllava_proto::v1::AppendResponse>,
                ::tonic::Status,
            > {
                Ok(::tonic::Response::new(self.$sessions.append(request.into_inner()).await?))
            }

            async fn close_session(
                &self,
                request: ::tonic::Request<::specllava_proto::v1::CloseSessionRequest>,
            ) -> ::std::result::Result<
                ::tonic::Response<::specllava_proto::v1::CloseSessionResponse>,
                ::tonic::Status,
            > {
                Ok(::tonic::Response::new(self.$sessions.close(request.into_inner()).await?))
            }

            $($rest)*
        }
    };
}
