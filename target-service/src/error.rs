//! The target service's error type and its single mapping to gRPC status.

use specllava_model::ModelError;
use specllava_service_kit::{SessionStoreError, WorkerError};
use tonic::Status;

/// Everything a target request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// Unknown, duplicate or oversized session.
    #[error(transparent)]
    Session(#[from] SessionStoreError),
    /// The caller's view of the session is stale (or the request is a duplicate).
    #[error(
        "session {session:?}: expected kv_len {expected} but the session has {actual} (stale or duplicate request)"
    )]
    StaleKv {
        /// The session.
        session: String,
        /// What the request said.
        expected: u64,
        /// What the session holds.
        actual: u64,
    },
    /// The tree's root is not the session's root token.
    #[error(
        "session {session:?}: tree root token {got} is not the session's last token {expected}"
    )]
    RootMismatch {
        /// The session.
        session: String,
        /// The session's root token.
        expected: u32,
        /// The tree's root token.
        got: u32,
    },
    /// Malformed tree.
    #[error("invalid tree: {0}")]
    Tree(#[from] speculate::TreeError),
    /// Invalid sampling parameters.
    #[error("invalid sampling parameters: {0}")]
    Sampling(#[from] speculate::SamplingError),
    /// Any other malformed request.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The session's context would exceed the model's maximum.
    #[error("context full: {0}")]
    ContextFull(String),
    /// Queue full, worker stopped, or a malformed open / append (the session worker's).
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The model rejected the input or failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A batched forward failed (shared by all requests of the batch).
    #[error("batched forward failed: {0}")]
    BatchFailed(String),
}

impl TargetError {
    /// Short stable label for metrics (`errors_total{type=...}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            TargetError::Session(e) => e.error_type(),
            TargetError::Worker(e) => e.error_type(),
            TargetError::StaleKv { .. } => "stale_kv",
            TargetError::RootMismatch { .. } => "root_mismatch",
            TargetError::Tree(_) => "invalid_tree",
            TargetError::Sampling(_) => "invalid_sampling",
            TargetError::InvalidArgument(_) => "invalid_argument",
            TargetError::ContextFull(_) => "context_full",
            TargetError::Model(e) => e.error_type(),
            TargetError::BatchFailed(_) => "batch_failed",
        }
    }
}

impl From<TargetError> for Status {
    fn from(e: TargetError) -> Status {
        let msg = e.to_string();
        let status = match &e {
            TargetError::Session(e) => Status::new(e.code(), msg),
            TargetError::Worker(e) => Status::new(e.code(), msg),
            TargetError::StaleKv { .. } | TargetError::RootMismatch { .. } => {
                Status::failed_precondition(msg)
            }
            TargetError::Tree(_)
            | TargetError::Sampling(_)
            | TargetError::InvalidArgument(_)
            | TargetError::ContextFull(_) => Status::invalid_argument(msg),
            TargetError::Model(m) if m.is_invalid_input() => Status::invalid_argument(msg),
            TargetError::Model(_) | TargetError::BatchFailed(_) => Status::internal(msg),
        };
        // The one place every error of this service becomes a status: count it here.
        specllava_telemetry::metrics().record_error(e.error_type(), status.code());
        status
    }
}
