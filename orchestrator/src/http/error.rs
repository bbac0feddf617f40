//! HTTP API errors and their one conversion into OpenAI's JSON error shape:
//! `{"error": {"message", "type", "param", "code"}}` with the matching status.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::OrchestratorError;

/// Everything an HTTP request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A malformed request (bad JSON, unsupported field value...), with the field at fault.
    #[error("{message}")]
    BadRequest {
        /// What is wrong.
        message: String,
        /// The request field, when one is at fault.
        param: Option<String>,
    },
    /// Missing or unknown bearer token.
    #[error("invalid or missing API key (send `Authorization: Bearer <key>`)")]
    Unauthorized,
    /// `model` is not the served model.
    #[error("the model {0:?} does not exist (this server serves {1:?})")]
    ModelNotFound(String, String),
    /// The body is over the size limit.
    #[error("request body too large: {0}")]
    BodyTooLarge(String),
    /// The server drains (SIGTERM): new requests go elsewhere.
    #[error("the server is shutting down; retry (another replica takes the request)")]
    Draining,
    /// What both APIs fail with (limits, replicas, ...).
    #[error(transparent)]
    Orchestrator(#[from] OrchestratorError),
}

impl ApiError {
    /// A bad request about `param`.
    pub fn bad(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// The error a body extraction failed with.
    pub fn from_body(e: BytesRejection) -> Self {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge(e.body_text())
        } else {
            ApiError::BadRequest {
                message: e.body_text(),
                param: None,
            }
        }
    }

    /// The HTTP status and the OpenAI error `type` and `code`.
    fn classify(&self) -> (StatusCode, &'static str, Option<&'static str>) {
        match self {
            ApiError::BadRequest { .. } => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
            ),
            ApiError::ModelNotFound(..) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            ApiError::BodyTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
            ),
            ApiError::Draining => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("service_unavailable"),
            ),
            ApiError::Orchestrator(e) => {
                let status = StatusCode::from_u16(e.http_status())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let (kind, code) = match status.as_u16() {
                    400 => ("invalid_request_error", None),
                    413 => ("invalid_request_error", Some("request_too_large")),
                    429 => ("rate_limit_error", Some("rate_limit_exceeded")),
                    503 => ("server_error", Some("service_unavailable")),
                    _ => ("server_error", None),
                };
                (status, kind, code)
            }
        }
    }

    /// The error's JSON body.
    pub fn body(&self) -> ErrorBody {
        let (_, kind, code) = self.classify();
        ErrorBody {
            error: ErrorDetail {
                message: match self {
                    ApiError::Orchestrator(e) => e.public_message(),
                    other => other.to_string(),
                },
                kind,
                param: match self {
                    ApiError::BadRequest { param, .. } => param.clone(),
                    ApiError::ModelNotFound(..) => Some("model".into()),
                    _ => None,
                },
                code,
            },
        }
    }
}

/// `{"error": {...}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// OpenAI's error object.
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// Human-readable.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A stable code, when there is one.
    pub code: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // The one place every error of this API becomes a response: count it here.
        match &self {
            ApiError::Orchestrator(e) => e.record(),
            ApiError::Draining => {
                specllava_telemetry::metrics().record_error("draining", tonic::Code::Unavailable)
            }
            other => specllava_telemetry::metrics().record_error(
                match other {
                    ApiError::Unauthorized => "unauthorized",
                    ApiError::ModelNotFound(..) => "model_not_found",
                    ApiError::BodyTooLarge(_) => "too_large",
                    _ => "invalid_argument",
                },
                tonic::Code::InvalidArgument,
            ),
        }
        let (status, _, _) = self.classify();
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // Retryable: the next replica (or this one, once a replica is back) takes it.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_shared_mapping() {
        let status = |e: ApiError| e.classify().0.as_u16();
        assert_eq!(status(ApiError::bad("n", "only n = 1")), 400);
        assert_eq!(status(ApiError::Unauthorized), 401);
        assert_eq!(status(ApiError::ModelNotFound("x".into(), "y".into())), 404);
        assert_eq!(status(ApiError::BodyTooLarge("x".into())), 413);
        let orch = |e: OrchestratorError| status(ApiError::Orchestrator(e));
        assert_eq!(orch(OrchestratorError::InvalidArgument("x".into())), 400);
        assert_eq!(orch(OrchestratorError::TooLarge("x".into())), 413);
        assert_eq!(orch(OrchestratorError::Overloaded("x".into())), 429);
        assert_eq!(
            orch(OrchestratorError::NoReplica(crate::ReplicaKind::Target)),
            503
        );
        let body = serde_json::to_value(ApiError::bad("n", "only n = 1").body()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"message": "only n = 1",
                "type": "invalid_request_error", "param": "n", "code": null}})
        );
    }
}
