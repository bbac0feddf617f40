//! The draft service's error type and its single mapping to gRPC status.

use specllava_model::ModelError;
use specllava_service_kit::{SessionStoreError, WorkerError};
use tonic::Status;

/// Everything a draft request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DraftError {
    /// Unknown, duplicate or oversized session.
    #[error(transparent)]
    Session(#[from] SessionStoreError),
    /// Any malformed request.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The model rejected the input or failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// A batched draft forward failed (shared by all sessions of the batch).
    #[error("batched draft forward failed: {0}")]
    BatchFailed(String),
    /// Queue full, worker stopped, or a malformed open / append (the session worker's).
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

impl DraftError {
    /// Short stable label for metrics (`errors_total{type=...}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            DraftError::Session(e) => e.error_type(),
            DraftError::InvalidArgument(_) => "invalid_argument",
            DraftError::Model(e) => e.error_type(),
            DraftError::BatchFailed(_) => "batch_failed",
            DraftError::Worker(e) => e.error_type(),
        }
    }
}

impl From<DraftError> for Status {
    fn from(e: DraftError) -> Status {
        let msg = e.to_string();
        let status = match &e {
            DraftError::Session(e) => Status::new(e.code(), msg),
            DraftError::Worker(e) => Status::new(e.code(), msg),
            DraftError::InvalidArgument(_) => Status::invalid_argument(msg),
            DraftError::Model(m) if m.is_invalid_input() => Status::invalid_argument(msg),
            DraftError::Model(_) | DraftError::BatchFailed(_) => Status::internal(msg),
        };
        // The one place every error of this service becomes a status: count it here.
        specllava_telemetry::metrics().record_error(e.error_type(), status.code());
        status
    }
}
