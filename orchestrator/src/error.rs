//! The orchestrator's error type and its mappings to the wire: gRPC status and HTTP status
//! (both here, so the two APIs answer the same failure the same way).

use tonic::{Code, Status};

use crate::clients::ReplicaKind;

/// Everything a public request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// Malformed request (empty prompt, bad image, bad sampling params...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request is larger than a limit (image bytes or pixels).
    #[error("too large: {0}")]
    TooLarge(String),
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
            OrchestratorError::TooLarge(_) => "too_large",
            OrchestratorError::SessionNotFound(_) => "session_not_found",
            OrchestratorError::SessionBusy(_) => "session_busy",
            OrchestratorError::Overloaded(_) => "overloaded",
            OrchestratorError::NoReplica(_) => "no_replica",
            OrchestratorError::Incompatible { .. } => "incompatible_replica",
            OrchestratorError::Replica { .. } => "replica",
            OrchestratorError::Internal(_) => "internal",
        }
    }

    /// The HTTP status of this error (the OpenAI-compatible API); follows the gRPC mapping,
    /// except that oversized input is `413 Payload Too Large`.
    pub fn http_status(&self) -> u16 {
        if let OrchestratorError::TooLarge(_) = self {
            return 413;
        }
        match self.grpc_code() {
            Code::InvalidArgument | Code::OutOfRange => 400,
            Code::NotFound => 404,
            Code::FailedPrecondition => 409,
            Code::ResourceExhausted => 429,
            Code::Unavailable => 503,
            Code::DeadlineExceeded => 504,
            Code::Cancelled => 499,
            _ => 500,
        }
    }

    /// The gRPC code this error maps to.
    fn grpc_code(&self) -> Code {
        match self {
            OrchestratorError::InvalidArgument(_) | OrchestratorError::TooLarge(_) => {
                Code::InvalidArgument
            }
            OrchestratorError::SessionNotFound(_) => Code::NotFound,
            OrchestratorError::SessionBusy(_) => Code::FailedPrecondition,
            OrchestratorError::Overloaded(_) => Code::ResourceExhausted,
            OrchestratorError::NoReplica(_) | OrchestratorError::Incompatible { .. } => {
                Code::Unavailable
            }
            OrchestratorError::Replica { status, .. } => match status.code() {
                // A replica's invalid-argument is the client's request; anything else is ours.
                Code::InvalidArgument | Code::ResourceExhausted => status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => Code::Unavailable,
                _ => Code::Internal,
            },
            OrchestratorError::Internal(_) => Code::Internal,
        }
    }

    /// Counts this error in `errors_total` (done once, where it becomes a wire status).
    pub fn record(&self) {
        specllava_telemetry::metrics().record_error(self.error_type(), self.grpc_code());
    }

    /// Whether the replica call failed with this gRPC code.
    pub fn is_replica_code(&self, code: Code) -> bool {
        matches!(self, OrchestratorError::Replica { status, .. } if status.code() == code)
    }
}

impl From<OrchestratorError> for Status {
    fn from(e: OrchestratorError) -> Status {
        e.record();
        Status::new(e.grpc_code(), e.to_string())
    }
}
