//! Spans of a caller ("service A") and a callee ("service B") reach an OTLP collector under
//! one trace id, with the callee's request span parented on the caller's span.
//!
//! The collector is a real tonic server implementing the OTLP `TraceService`; service B is
//! a real tonic server (the gRPC health service) behind [`GrpcTraceLayer`]; service A calls
//! it once through [`TraceContextInterceptor`] and once with [`inject_context`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use specllava_telemetry::{GrpcTraceLayer, TraceContextInterceptor, inject_context};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tracing::Instrument;

/// An OTLP trace collector that forwards every export to a channel.
struct Collector {
    exports: mpsc::UnboundedSender<ExportTraceServiceRequest>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.exports.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn loopback_listener() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Every span in `export`, with the `service.name` of its resource.
fn spans_of(export: ExportTraceServiceRequest) -> Vec<(String, Span)> {
    let mut out = Vec::new();
    for resource_spans in export.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            for span in scope_spans.spans {
                out.push((service.clone(), span));
            }
        }
    }
    out
}

#[test]
fn caller_and_callee_spans_share_one_trace() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (collector_listener, collector_addr) = runtime.block_on(loopback_listener());
    // SAFETY: set before any other thread of this test process reads the environment
    // (the runtime's workers are idle; this file holds a single test).
    unsafe {
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{collector_addr}"),
        );
        std::env::set_var("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc");
        std::env::remove_var("OTEL_SERVICE_NAME");
        std::env::remove_var("OTEL_RESOURCE_ATTRIBUTES");
        std::env::remove_var("OTEL_TRACES_SAMPLER");
        std::env::remove_var("OTEL_SDK_DISABLED");
    }
    runtime.block_on(run(collector_listener));
}

async fn run(collector_listener: TcpListener) {
    let (exports_tx, mut exports_rx) = mpsc::unbounded_channel();
    tokio::spawn(
        Server::builder()
            .add_service(TraceServiceServer::new(Collector {
                exports: exports_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(collector_listener)),
    );

    let guard = specllava_telemetry::init_telemetry("otlp-export-test", false).unwrap();
    assert!(guard.is_exporting());

    // Service B: the health service behind the tracing layer.
    let (service_b_listener, service_b_addr) = loopback_listener().await;
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        Server::builder()
            .layer(GrpcTraceLayer)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(service_b_listener)),
    );

    // Service A: one parent span, two calls into B propagating its context.
    let channel = Channel::from_shared(format!("http://{service_b_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let parent = tracing::info_span!("service_a.generate");
    async {
        let mut intercepted =
            HealthClient::with_interceptor(channel.clone(), TraceContextInterceptor);
        intercepted
            .check(HealthCheckRequest::default())
            .await
            .unwrap();

        let mut plain = HealthClient::new(channel);
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        inject_context(&mut request);
        plain.check(request).await.unwrap();
    }
    .instrument(parent)
    .await;

    // Flush until the parent and both request spans have arrived (the exporter batches).
    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let complete = |spans: &[(String, Span)]| {
        spans.iter().any(|(_, s)| s.name == "service_a.generate")
            && spans
                .iter()
                .filter(|(_, s)| s.name == "grpc.health.v1.Health/Check")
                .count()
                == 2
    };
    while !complete(&spans) {
        assert!(Instant::now() < deadline, "spans missing; got {spans:#?}");
        let flushed = tokio::task::block_in_place(|| guard.force_flush());
        flushed.unwrap();
        while let Ok(export) = exports_rx.try_recv() {
            spans.extend(spans_of(export));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (parent_service, parent) = spans
        .iter()
        .find(|(_, s)| s.name == "service_a.generate")
        .unwrap();
    assert!(
        parent_service.contains("otlp-export-test"),
        "{parent_service}"
    );
    assert_eq!(parent.trace_id.len(), 16);
    assert!(
        parent.parent_span_id.is_empty(),
        "the caller's span is a root"
    );
    for (_, child) in spans
        .iter()
        .filter(|(_, s)| s.name == "grpc.health.v1.Health/Check")
    {
        assert_eq!(
            child.trace_id, parent.trace_id,
            "one trace across both services"
        );
        assert_eq!(
            child.parent_span_id, parent.span_id,
            "callee parented on caller"
        );
        assert_eq!(child.kind, 2, "SPAN_KIND_SERVER");
        let rpc = child
            .attributes
            .iter()
            .find(|kv| kv.key == "rpc")
            .and_then(|kv| kv.value.as_ref())
            .map(|v| format!("{:?}", v.value));
        assert!(
            rpc.as_deref()
                .is_some_and(|r| r.contains("/grpc.health.v1.Health/Check")),
            "{rpc:?}"
        );
    }

    tokio::task::block_in_place(|| guard.shutdown()).unwrap();
}
