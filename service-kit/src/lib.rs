//! Plumbing shared by the two model services (draft and target): the per-service session
//! store (byte budget, TTL, LRU eviction, published as `specllava_*` metrics), the session
//! worker and session RPCs, their common flags and model loading, and the image path (decode,
//! vision tower, shared features). Serving itself (gRPC server, health, TLS, bearer tokens) is
//! `specllava-server`; the wire conversions are `specllava-wire`.

pub mod device;
pub mod fault;
pub mod model_server;
pub mod prefill;
pub mod session_rpc;
pub mod sessions;
pub mod vision_encoder;
pub mod worker;

pub use device::{NO_CUDA_SUPPORT, parse_device, parse_dtype};
pub use model_server::{LoadedModel, ModelServerArgs, load_model, model_info};
pub use prefill::{prefilled_kv, prepare_prefill};
pub use session_rpc::SessionRpc;
pub use sessions::{SessionLimits, SessionState, SessionStore, SessionStoreError};
pub use vision_encoder::VisionEncoder;
pub use worker::{
    AppendError, BatchJob, BatchLimits, PrefillOutcome, Queued, SessionBackend, WorkerConfig,
    WorkerError, WorkerHandle,
};
