//! Plumbing shared by the three Spec-LLaVA services: the per-service session
//! store (byte budget, TTL, LRU eviction, published as `specllava_*` metrics),
//! graceful shutdown, the `/metrics`
//! endpoint, and the gRPC health + reflection services.

pub mod device;
pub mod prefill;
pub mod server;
pub mod sessions;

pub use device::parse_device;
pub use prefill::prepare_prefill;
pub use server::{MetricsEndpoint, reflection_services, shutdown_signal};
pub use sessions::{SessionLimits, SessionState, SessionStore, SessionStoreError};
