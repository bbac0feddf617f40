//! The orchestrator's error type and its mappings to the wire: gRPC status and HTTP status
//! (both here, so the two APIs answer the same failure the same way).

use tonic::{Code, Status};

use crate::routing::ReplicaKind;

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
    /// No replica of a kind is in rotation (every one failed, or none is configured).
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
                _ if is_replica_failure(status) => Code::Unavailable,
                _ => Code::Internal,
            },
            OrchestratorError::Internal(_) => Code::Internal,
        }
    }

    /// Counts this error in `errors_total` and logs it in full (done once, where it becomes
    /// a wire status: the client hears [`OrchestratorError::public_message`]).
    pub fn record(&self) {
        specllava_telemetry::metrics().record_error(self.error_type(), self.grpc_code());
        if matches!(
            self,
            OrchestratorError::Replica { .. }
                | OrchestratorError::Incompatible { .. }
                | OrchestratorError::Internal(_)
        ) {
            tracing::warn!(error = %self, "request failed");
        }
    }

    /// What the client hears: the problem named, never a replica's address or raw message
    /// (those are logged and traced, see [`OrchestratorError::record`]).
    pub fn public_message(&self) -> String {
        match self {
            OrchestratorError::Incompatible { kind, .. } => {
                format!("no {kind} replica available (retry later)")
            }
            OrchestratorError::Replica { kind, status, .. } => match status.code() {
                Code::InvalidArgument => format!(
                    "invalid argument: the {kind} model refused the request (over its context or limits)"
                ),
                Code::ResourceExhausted => {
                    format!("over capacity: the {kind} replicas are full (retry later)")
                }
                _ if is_replica_failure(status) => {
                    format!("no {kind} replica available (retry later)")
                }
                _ => "internal error".into(),
            },
            OrchestratorError::Internal(_) => "internal error".into(),
            OrchestratorError::NoReplica(kind) => {
                format!("no {kind} replica available (retry later)")
            }
            other => other.to_string(),
        }
    }

    /// Whether this is a replica call that failed because of the replica (see
    /// [`is_replica_failure`]): the session moves to another replica.
    pub fn is_replica_failure(&self) -> bool {
        matches!(self, OrchestratorError::Replica { status, .. } if is_replica_failure(status))
    }

    /// Whether the replica call failed with this gRPC code.
    pub fn is_replica_code(&self, code: Code) -> bool {
        matches!(self, OrchestratorError::Replica { status, .. } if status.code() == code)
    }
}

/// Whether a replica call's status means the replica failed (is down, stuck or cut off)
/// rather than that the request was wrong: transport errors and UNAVAILABLE (refused or
/// broken connection), UNKNOWN (a response cut off by a dying peer), DEADLINE_EXCEEDED
/// (no answer within the call's deadline) and CANCELLED (the peer cancelled the call).
/// Such a replica is taken out of rotation and its sessions move to another one; any other
/// status (INVALID_ARGUMENT, NOT_FOUND...) is about the request and is never retried
/// elsewhere.
pub fn is_replica_failure(status: &Status) -> bool {
    // A status made on this side from a transport error carries that error as its source
    // (whatever code the HTTP/2 error maps to); a replica's own answers never do.
    let transport = std::error::Error::source(status).is_some();
    transport
        || matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
        )
}

impl From<OrchestratorError> for Status {
    fn from(e: OrchestratorError) -> Status {
        e.record();
        Status::new(e.grpc_code(), e.public_message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(status: Status) -> OrchestratorError {
        OrchestratorError::Replica {
            kind: ReplicaKind::Target,
            addr: "127.0.0.1:1".into(),
            status,
        }
    }

    #[test]
    fn replica_failures_fail_over_and_client_errors_do_not() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::Cancelled,
        ] {
            let e = replica(Status::new(code, "x"));
            assert!(e.is_replica_failure(), "{code:?}");
            assert_eq!(e.grpc_code(), Code::Unavailable, "{code:?}");
        }
        for code in [Code::InvalidArgument, Code::NotFound, Code::Internal] {
            assert!(
                !replica(Status::new(code, "x")).is_replica_failure(),
                "{code:?}"
            );
        }
        assert_eq!(
            replica(Status::invalid_argument("x")).grpc_code(),
            Code::InvalidArgument
        );
        // A transport error is a failure whatever code it maps to.
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let cut = Status::from_error(Box::new(io));
        assert!(replica(cut).is_replica_failure());
        assert_eq!(
            Status::from(OrchestratorError::NoReplica(ReplicaKind::Target)).code(),
            Code::Unavailable
        );
    }

    #[test]
    fn clients_never_hear_a_replica_address_or_its_raw_message() {
        let internal = "worker queue 0x7f3a at /srv/models: shape [1, 300] over 256";
        for status in [
            Status::invalid_argument(internal),
            Status::resource_exhausted(internal),
            Status::unavailable(internal),
            Status::internal(internal),
            Status::deadline_exceeded(internal),
        ] {
            let code = status.code();
            let e = replica(status);
            let heard = Status::from(e);
            assert!(
                !heard.message().contains("127.0.0.1") && !heard.message().contains("0x7f3a"),
                "{code:?}: {}",
                heard.message()
            );
        }
        let e = OrchestratorError::Incompatible {
            kind: ReplicaKind::Draft,
            addr: "10.1.2.3:50051".into(),
            reason: "vocabulary differs".into(),
        };
        assert!(!e.public_message().contains("10.1.2.3"));
        assert_eq!(
            OrchestratorError::Internal("tokenizer at /x panicked".into()).public_message(),
            "internal error"
        );
    }
}
