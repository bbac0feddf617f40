//! The `specllava_*` Prometheus metrics, defined in one place.
//!
//! Every service registers the same set; each records what applies to it (the draft
//! service records `drafted_nodes_per_step` and `draft_latency_seconds`, the target the
//! verify metrics, the orchestrator `accepted_tokens_per_step` and request counts). One
//! registry per process, reached through [`metrics()`] and [`registry()`], and served by
//! [`crate::serve_metrics`].
//!
//! | metric (after the `specllava_` prefix) | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `accepted_tokens_per_step` | histogram | | tokens emitted per verify step (accepted drafts + the target's own token) |
//! | `drafted_nodes_per_step` | histogram | | tree nodes drafted per step (tree size sent to verification) |
//! | `draft_latency_seconds` | histogram | | time to draft one tree |
//! | `verify_latency_seconds` | histogram | | time of one verify request (queue + forward) |
//! | `verify_batch_size` | histogram | | sessions in one batched target forward |
//! | `verify_batch_nodes` | histogram | | tree nodes in one batched target forward |
//! | `verify_queue_depth` | gauge | | verify requests waiting for the batcher (target HPA signal) |
//! | `active_sessions` | gauge | | sessions held by this process (draft HPA signal) |
//! | `kv_cache_bytes` | gauge | | bytes of KV cache held by this process |
//! | `evictions_total` | counter | `reason` | sessions evicted (`ttl`, `lru`, `memory`) |
//! | `errors_total` | counter | `type`, `status` | errors by the error enum's `error_type()` and the gRPC status code |
//! | `requests_total` | counter | `rpc` | RPCs handled, by method name |
//! | `replicas_refused_total` | counter | `kind` | replicas the orchestrator refused as incompatible (`draft`, `target`) |
//! | `draft_ahead_total` | counter | `outcome` | draft-ahead guesses judged by the next request (`hit`, `miss`, `late`) |
//! | `draft_ahead_saved_seconds_total` | counter | | spare-time drafting the hits' requests did not wait for |

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The prefix of every metric name.
pub const PREFIX: &str = "specllava";

/// Labels of `specllava_errors_total`: the error's type and its gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ErrorLabels {
    /// The error enum's `error_type()` label, e.g. `session_not_found`.
    pub error_type: String,
    /// The canonical gRPC status code name, e.g. `NOT_FOUND`.
    pub status: &'static str,
}

impl EncodeLabelSet for ErrorLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("type", self.error_type.as_str()).encode(encoder.encode_label())?;
        ("status", self.status).encode(encoder.encode_label())
    }
}

/// Labels of `specllava_requests_total`: the RPC method name, e.g. `Verify`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RpcLabel(pub String);

impl EncodeLabelSet for RpcLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("rpc", self.0.as_str()).encode(encoder.encode_label())
    }
}

/// Labels of `specllava_evictions_total`: why the session went (`ttl`, `lru`, `memory`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReasonLabel(pub String);

impl EncodeLabelSet for ReasonLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("reason", self.0.as_str()).encode(encoder.encode_label())
    }
}

/// Labels of `specllava_draft_ahead_total` (what became of a pre-draft: `hit`, `miss`, `late`)
/// and `specllava_vision_cache_total` (how a lookup was served: `hit`, `shared`, `miss`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OutcomeLabel(pub &'static str);

impl EncodeLabelSet for OutcomeLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("outcome", self.0).encode(encoder.encode_label())
    }
}

/// Labels of `specllava_replicas_refused_total`: the replica kind (`draft`, `target`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KindLabel(pub String);

impl EncodeLabelSet for KindLabel {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("kind", self.0.as_str()).encode(encoder.encode_label())
    }
}

/// All metrics of a Spec-LLaVA process. Cheap handles: clone or borrow freely.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Tokens emitted per verify step (accepted draft tokens + the target's own token).
    pub accepted_tokens_per_step: Histogram,
    /// Tree nodes drafted per step.
    pub drafted_nodes_per_step: Histogram,
    /// Seconds to draft one tree.
    pub draft_latency_seconds: Histogram,
    /// Seconds of one verify request, queueing included.
    pub verify_latency_seconds: Histogram,
    /// Sessions in one batched target forward.
    pub verify_batch_size: Histogram,
    /// Tree nodes in one batched target forward.
    pub verify_batch_nodes: Histogram,
    /// Verify requests waiting for the batcher.
    pub verify_queue_depth: Gauge,
    /// Sessions held by this process.
    pub active_sessions: Gauge,
    /// Bytes of KV cache held by this process.
    pub kv_cache_bytes: Gauge,
    /// Sessions evicted, by reason.
    pub evictions: Family<ReasonLabel, Counter>,
    /// Errors, by type and gRPC status.
    pub errors: Family<ErrorLabels, Counter>,
    /// RPCs handled, by method.
    pub requests: Family<RpcLabel, Counter>,
    /// Replicas refused as incompatible, by kind (orchestrator).
    pub replicas_refused: Family<KindLabel, Counter>,
    /// Draft-ahead guesses, by outcome (draft).
    pub draft_ahead: Family<OutcomeLabel, Counter>,
    /// Spare-time drafting used by hits, in seconds (draft).
    pub draft_ahead_saved_seconds: Counter<f64, AtomicU64>,
    /// Vision-feature lookups of the encoder cache, by outcome (`hit`, `shared`, `miss`).
    pub vision_cache: Family<OutcomeLabel, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` (whose prefix, if any, applies).
    pub fn register(registry: &mut Registry) -> Self {
        let latency = || Histogram::new(exponential_buckets(0.000_5, 2.0, 16)); // 0.5 ms .. 16 s
        let metrics = Self {
            accepted_tokens_per_step: Histogram::new([
                1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0,
            ]),
            drafted_nodes_per_step: Histogram::new(exponential_buckets(1.0, 2.0, 10)), // 1 .. 512
            draft_latency_seconds: latency(),
            verify_latency_seconds: latency(),
            verify_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 9)), // 1 .. 256
            verify_batch_nodes: Histogram::new(exponential_buckets(1.0, 2.0, 14)), // 1 .. 8192
            verify_queue_depth: Gauge::default(),
            active_sessions: Gauge::default(),
            kv_cache_bytes: Gauge::default(),
            evictions: Family::default(),
            errors: Family::default(),
            requests: Family::default(),
            replicas_refused: Family::default(),
            draft_ahead: Family::default(),
            draft_ahead_saved_seconds: Counter::default(),
            vision_cache: Family::default(),
        };
        registry.register(
            "accepted_tokens_per_step",
            "Tokens emitted per verify step (accepted draft tokens plus the target's own token; \
             a turn's first token, picked by the prefill, is no verify step's)",
            metrics.accepted_tokens_per_step.clone(),
        );
        registry.register(
            "drafted_nodes_per_step",
            "Tree nodes drafted per speculation step",
            metrics.drafted_nodes_per_step.clone(),
        );
        registry.register(
            "draft_latency_seconds",
            "Time to draft one token tree",
            metrics.draft_latency_seconds.clone(),
        );
        registry.register(
            "verify_latency_seconds",
            "Time of one verify request, queueing included",
            metrics.verify_latency_seconds.clone(),
        );
        registry.register(
            "verify_batch_size",
            "Sessions in one batched target forward pass",
            metrics.verify_batch_size.clone(),
        );
        registry.register(
            "verify_batch_nodes",
            "Tree nodes in one batched target forward pass",
            metrics.verify_batch_nodes.clone(),
        );
        registry.register(
            "verify_queue_depth",
            "Verify requests waiting for the batcher",
            metrics.verify_queue_depth.clone(),
        );
        registry.register(
            "active_sessions",
            "Sessions held by this process",
            metrics.active_sessions.clone(),
        );
        registry.register(
            "kv_cache_bytes",
            "Bytes of KV cache held by this process",
            metrics.kv_cache_bytes.clone(),
        );
        registry.register(
            "evictions",
            "Sessions evicted, by reason",
            metrics.evictions.clone(),
        );
        registry.register(
            "errors",
            "Errors by type and gRPC status code",
            metrics.errors.clone(),
        );
        registry.register(
            "requests",
            "RPCs handled, by method",
            metrics.requests.clone(),
        );
        registry.register(
            "replicas_refused",
            "Replicas refused as incompatible (vocabulary, special ids, tokenizer), by kind",
            metrics.replicas_refused.clone(),
        );
        registry.register(
            "draft_ahead",
            "Draft-ahead guesses judged by the next request, by outcome (hit, miss, late)",
            metrics.draft_ahead.clone(),
        );
        registry.register(
            "draft_ahead_saved_seconds",
            "Spare-time drafting that requests hitting a pre-draft did not wait for",
            metrics.draft_ahead_saved_seconds.clone(),
        );
        registry.register(
            "vision_cache",
            "Vision-feature lookups by outcome: hit (cached), shared (joined a tower run in \
             flight), miss (ran the tower)",
            metrics.vision_cache.clone(),
        );
        metrics
    }

    /// Counts one vision-feature lookup (`hit`, `shared`, `miss`).
    pub fn record_vision_cache(&self, outcome: &'static str) {
        self.vision_cache
            .get_or_create(&OutcomeLabel(outcome))
            .inc();
    }

    /// Counts one draft-ahead outcome (`hit`, `miss`, `late`); a hit also adds the
    /// spare-time drafting it saved.
    pub fn record_draft_ahead(&self, outcome: &'static str, saved_seconds: f64) {
        self.draft_ahead.get_or_create(&OutcomeLabel(outcome)).inc();
        if saved_seconds > 0.0 {
            self.draft_ahead_saved_seconds.inc_by(saved_seconds);
        }
    }

    /// Counts one error of type `error_type` answered with gRPC status `code`.
    pub fn record_error(&self, error_type: &str, code: tonic::Code) {
        self.errors
            .get_or_create(&ErrorLabels {
                error_type: error_type.to_owned(),
                status: code_name(code),
            })
            .inc();
    }

    /// Counts one RPC of method `rpc` (e.g. `Verify`).
    pub fn record_request(&self, rpc: &str) {
        self.requests.get_or_create(&RpcLabel(rpc.to_owned())).inc();
    }

    /// Counts one replica of `kind` (`draft`, `target`) refused as incompatible.
    pub fn record_refused_replica(&self, kind: &str) {
        self.replicas_refused
            .get_or_create(&KindLabel(kind.to_owned()))
            .inc();
    }

    /// Counts one session eviction for `reason` (`ttl`, `lru`, `memory`).
    pub fn record_eviction(&self, reason: &str) {
        self.evictions
            .get_or_create(&ReasonLabel(reason.to_owned()))
            .inc();
    }
}

/// The canonical upper-case name of a gRPC status code, as other gRPC stacks label it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The process-wide registry and the metrics registered in it.
struct Global {
    registry: Registry,
    metrics: Metrics,
}

static GLOBAL: LazyLock<Global> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix(PREFIX);
    let metrics = Metrics::register(&mut registry);
    Global { registry, metrics }
});

/// The process-wide metrics (registered in [`registry()`] on first use).
pub fn metrics() -> &'static Metrics {
    &GLOBAL.metrics
}

/// The process-wide registry that [`crate::serve_metrics`] exposes.
pub fn registry() -> &'static Registry {
    &GLOBAL.registry
}

/// Encodes `registry` in the text exposition format (OpenMetrics 1.0, which Prometheus
/// scrapes natively).
pub fn encode_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("writing to a String cannot fail");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_the_prefix_and_help() {
        let mut registry = Registry::with_prefix(PREFIX);
        let metrics = Metrics::register(&mut registry);
        metrics.record_error("session_not_found", tonic::Code::NotFound);
        metrics.record_request("Verify");
        metrics.record_eviction("lru");
        let text = encode_text(&registry);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("specllava_"), "{line}");
        }
        assert!(
            text.contains(
                "specllava_errors_total{type=\"session_not_found\",status=\"NOT_FOUND\"} 1"
            )
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn code_names_match_the_grpc_spec() {
        assert_eq!(
            code_name(tonic::Code::ResourceExhausted),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(code_name(tonic::Code::from_i32(5)), "NOT_FOUND");
    }
}
