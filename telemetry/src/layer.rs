//! A tower layer for tonic servers: one `grpc.request` span per call, parented on the
//! caller's W3C trace context.
//!
//! The span covers the handler's future, i.e. until the response (or, for a streaming
//! RPC, the response stream) is returned. A streaming handler that spawns a task to
//! produce the stream must carry the span into it,
//! `tokio::spawn(work.instrument(tracing::Span::current()))`, so the task's spans and
//! its outgoing calls (with [`crate::TraceContextInterceptor`]) stay in the same trace.
//!
//! ```no_run
//! # async fn run(addr: std::net::SocketAddr) -> Result<(), tonic::transport::Error> {
//! let (_, health) = tonic_health::server::health_reporter();
//! tonic::transport::Server::builder()
//!     .layer(specllava_telemetry::GrpcTraceLayer::default())
//!     .add_service(health)
//!     .serve(addr)
//!     .await
//! # }
//! ```

use std::task::{Context, Poll};

use tracing::Instrument;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::propagation::extract_context_from_headers;

/// Wraps each request in a span `grpc.request{rpc = "/pkg.Service/Method"}` whose parent
/// is the trace context the caller sent in `traceparent`; handler spans nest under it.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> tower::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTraceService { inner }
    }
}

/// The service [`GrpcTraceLayer`] produces.
#[derive(Debug, Clone)]
pub struct GrpcTraceService<S> {
    inner: S,
}

/// The request span for `request`, parented on the propagated context.
fn request_span<B>(request: &http::Request<B>) -> tracing::Span {
    let rpc = request.uri().path();
    let (service, method) = rpc
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or((rpc, ""));
    let span = tracing::info_span!(
        "grpc.request",
        rpc,
        otel.name = rpc.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    // Fails only when no OpenTelemetry layer is installed (or the span is filtered out):
    // then there is nothing to parent.
    let _ = span.set_parent(extract_context_from_headers(request.headers()));
    span
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for GrpcTraceService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = request_span(&request);
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        future.instrument(span)
    }
}
