//! Plumbing shared by the three Spec-LLaVA services: the per-service session
//! store (byte budget, TTL, LRU eviction, published as `specllava_*` metrics),
//! the model services' common flags and model loading, and the gRPC server with
//! graceful shutdown, the `/metrics` endpoint and the health + reflection services.

pub mod device;
pub mod model_server;
pub mod prefill;
pub mod server;
pub mod sessions;

pub use device::parse_device;
pub use model_server::{LoadedModel, ModelServerArgs, load_model};
pub use prefill::prepare_prefill;
pub use server::{MetricsEndpoint, reflection_services, serve_grpc, shutdown_signal};
pub use sessions::{SessionLimits, SessionState, SessionStore, SessionStoreError};
