//! W3C trace context (`traceparent` / `tracestate`) carried in gRPC metadata.
//!
//! The propagator is the global one [`crate::init_telemetry`] installs (W3C TraceContext).
//! Client side: [`inject_context`] on a request, or [`TraceContextInterceptor`] on a whole
//! client (`XxxClient::with_interceptor(channel, TraceContextInterceptor)`). Server side:
//! [`crate::GrpcTraceLayer`] does the extraction for every request; [`extract_context`]
//! is there for handlers that start spans of their own.

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Writes propagation fields into gRPC metadata (ASCII entries only).
struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // Propagator keys and values are ASCII by specification; skip anything that is not.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Reads propagation fields from gRPC metadata.
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Reads propagation fields from HTTP/2 headers (what a tower layer sees).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The caller's trace context found in `metadata` (an empty context when there is none).
pub fn extract_context(metadata: &MetadataMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&MetadataExtractor(metadata))
    })
}

/// [`extract_context`] for raw HTTP headers.
pub fn extract_context_from_headers(headers: &http::HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&HeaderExtractor(headers))
    })
}

/// Writes `context` into `metadata` as `traceparent` (and `tracestate`).
pub fn inject_into_metadata(context: &Context, metadata: &mut MetadataMap) {
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(context, &mut MetadataInjector(metadata));
    });
}

/// Makes `request` a child of the current `tracing` span: injects its trace context.
pub fn inject_context<T>(request: &mut tonic::Request<T>) {
    let context = tracing::Span::current().context();
    inject_into_metadata(&context, request.metadata_mut());
}

/// A client interceptor that injects the current span's trace context into every call:
/// `DraftClient::with_interceptor(channel, TraceContextInterceptor)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInterceptor;

impl tonic::service::Interceptor for TraceContextInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject_context(&mut request);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;

    fn remote_context() -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    }

    #[test]
    fn metadata_round_trip_keeps_trace_and_span_ids() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let mut metadata = MetadataMap::new();
        inject_into_metadata(&remote_context(), &mut metadata);
        assert_eq!(
            metadata.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );

        let extracted = extract_context(&metadata);
        let span = extracted.span();
        let span_context = span.span_context();
        assert!(span_context.is_remote());
        assert_eq!(
            span_context.trace_id(),
            remote_context().span().span_context().trace_id()
        );
        assert_eq!(
            span_context.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );

        let headers = metadata.clone().into_headers();
        let from_headers = extract_context_from_headers(&headers);
        assert_eq!(from_headers.span().span_context(), span_context);
    }

    #[test]
    fn missing_or_malformed_traceparent_gives_no_parent() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        assert!(!extract_context(&MetadataMap::new()).has_active_span());
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", MetadataValue::from_static("00-zz-yy-01"));
        let span = extract_context(&metadata);
        assert!(!span.span().span_context().is_valid());
    }
}
