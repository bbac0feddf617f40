//! The draft service's error type and its single mapping to gRPC status.

use specllava_model::ModelError;
use specllava_service_kit::SessionStoreError;
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
    /// The worker queue is full.
    #[error("draft overloaded: the model queue is full ({0} requests)")]
    QueueFull(usize),
    /// The worker thread stopped.
    #[error("the model worker stopped")]
    WorkerGone,
}

impl DraftError {
    /// Short stable label for metrics (`errors_total{type=...}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            DraftError::Session(SessionStoreError::NotFound(_)) => "session_not_found",
            DraftError::Session(SessionStoreError::AlreadyExists(_)) => "session_exists",
            DraftError::Session(SessionStoreError::TooLarge { .. }) => "session_too_large",
            DraftError::InvalidArgument(_) => "invalid_argument",
            DraftError::Model(e) => e.error_type(),
            DraftError::BatchFailed(_) => "batch_failed",
            DraftError::QueueFull(_) => "queue_full",
            DraftError::WorkerGone => "worker_gone",
        }
    }
}

impl From<DraftError> for Status {
    fn from(e: DraftError) -> Status {
        let msg = e.to_string();
        let status = match &e {
            DraftError::Session(SessionStoreError::NotFound(_)) => Status::not_found(msg),
            DraftError::Session(SessionStoreError::AlreadyExists(_)) => Status::already_exists(msg),
            DraftError::Session(SessionStoreError::TooLarge { .. }) => {
                Status::resource_exhausted(msg)
            }
            DraftError::InvalidArgument(_) => Status::invalid_argument(msg),
            DraftError::Model(m) if m.is_invalid_input() => Status::invalid_argument(msg),
            DraftError::Model(_) | DraftError::BatchFailed(_) => Status::internal(msg),
            DraftError::QueueFull(_) => Status::resource_exhausted(msg),
            DraftError::WorkerGone => Status::unavailable(msg),
        };
        // The one place every error of this service becomes a status: count it here.
        specllava_telemetry::metrics().record_error(e.error_type(), status.code());
        status
    }
}
