//! The orchestrator's error type and its single mapping to gRPC status.

use tonic::{Code, Status};

use crate::clients::ReplicaKind;

/// Everything a public request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// Malformed request (empty prompt, bad image, bad sampling params...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Unknown session.
    #[error("unknown session {0:?}")]
    SessionNotFound(String),
    /// The session is serving another request.
    #[error("session {0:?} is busy with another request")]
    SessionBusy(String),
    /// Too many sessions or concurrent requests.
    #[error("over capacity: {0}")]
    Overloaded(String),
    /// No replica of a kind is reachable.
    #[error("no {0} replica available")]
    NoReplica(ReplicaKind),
    /// A replica's model disagrees with the deployment (refused, never used).
    #[error("{kind} replica {addr} is incompatible: {reason}")]
    Incompatible {
        /// Draft or target.
        kind: ReplicaKind,
        /// The replica's address.
        addr: String,
        /// The mismatches found.
        reason: String,
    },
    /// A replica answered with an error.
    #[error("{kind} replica {addr}: {status}")]
    Replica {
        /// Draft or target.
        kind: ReplicaKind,
        /// The replica's address.
        addr: String,
        /// What it answered.
        status: Status,
    },
    /// Tokenizer or other internal failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl OrchestratorError {
    /// Short stable label for metrics (`errors_total{type=...}`).
    pub fn error_type(&self) -> &'static str {
        match self {
            OrchestratorError::InvalidArgument(_) => "invalid_argument",
            OrchestratorError::SessionNotFound(_) => "session_not_found",
            OrchestratorError::SessionBusy(_) => "session_busy",
            OrchestratorError::Overloaded(_) => "overloaded",
            OrchestratorError::NoReplica(_) => "no_replica",
            OrchestratorError::Incompatible { .. } => "incompatible_replica",
            OrchestratorError::Replica { .. } => "replica",
            OrchestratorError::Internal(_) => "internal",
        }
    }

    /// Whether the replica call failed with this gRPC code.
    pub fn is_replica_code(&self, code: Code) -> bool {
        matches!(self, OrchestratorError::Replica { status, .. } if status.code() == code)
    }
}

impl From<OrchestratorError> for Status {
    fn from(e: OrchestratorError) -> Status {
        let msg = e.to_string();
        let status = match &e {
            OrchestratorError::InvalidArgument(_) => Status::invalid_argument(msg),
            OrchestratorError::SessionNotFound(_) => Status::not_found(msg),
            OrchestratorError::SessionBusy(_) => Status::failed_precondition(msg),
            OrchestratorError::Overloaded(_) => Status::resource_exhausted(msg),
            OrchestratorError::NoReplica(_) | OrchestratorError::Incompatible { .. } => {
                Status::unavailable(msg)
            }
            OrchestratorError::Replica { status, .. } => match status.code() {
                // A replica's invalid-argument is the client's request; anything else is ours.
                Code::InvalidArgument | Code::ResourceExhausted => Status::new(status.code(), msg),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                    Status::unavailable(msg)
                }
                _ => Status::internal(msg),
            },
            OrchestratorError::Internal(_) => Status::internal(msg),
        };
        // The one place every error of this service becomes a status: count it here.
        specllava_telemetry::metrics().record_error(e.error_type(), status.code());
        status
    }
}
