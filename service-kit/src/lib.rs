//! Plumbing shared by the three Spec-LLaVA services: the per-service session
//! store (byte budget, TTL, LRU eviction, published as `specllava_*` metrics),
//! the session worker and session RPCs of the two model services, their common
//! flags and model loading, every proto <-> domain conversion, the model identity
//! the services compare at start-up, the image-limit flags ([`image_args`]), and the gRPC
//! server with graceful shutdown,
//! the `/metrics` endpoint and the health + reflection services; the credentials of the
//! gRPC endpoints and public APIs: TLS / mutual TLS ([`tls`]) and bearer tokens ([`auth`]).

pub mod auth;
pub mod compat;
pub mod convert;
pub mod device;
pub mod fault;
pub mod image_args;
pub mod model_server;
pub mod prefill;
pub mod server;
pub mod session_rpc;
pub mod sessions;
pub mod tls;
pub mod vision_encoder;
pub mod worker;

pub use auth::{ApiKeys, AuthArgs, AuthError, BearerAuth};
pub use device::{NO_CUDA_SUPPORT, parse_device, parse_dtype};
pub use image_args::ImageLimitArgs;
pub use model_server::{LoadedModel, ModelServerArgs, load_model};
pub use prefill::{prefilled_kv, prepare_prefill};
pub use server::{
    Health, MetricsEndpoint, reflection_services, run_with_telemetry, serve_grpc, shutdown_signal,
};
pub use session_rpc::SessionRpc;
pub use sessions::{SessionLimits, SessionState, SessionStore, SessionStoreError};
pub use tls::{ServerTls, ServerTlsArgs, UpstreamTlsArgs};
pub use vision_encoder::VisionEncoder;
pub use worker::{
    AppendError, BatchJob, BatchLimits, FirstStep, PrefillOutcome, Queued, SessionBackend,
    WorkerConfig, WorkerError, WorkerHandle,
};
