//! Observability end to end: the three real binaries export spans over OTLP to an
//! in-process collector (one `Generate` is one trace across the services) and serve
//! Prometheus `/metrics` with the series the dashboards and autoscalers read.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value};
use specllava_e2e::otlp::{Collector, ReceivedSpan};
use specllava_e2e::{Cluster, ClusterConfig, Service, fixture_image, scrape_metrics};
use specllava_proto::v1 as pb;

/// Target and draft checkpoint (the same: every draft token is accepted).
const MODEL: &str = "gqa_default_l-2_sharded";

const ORCHESTRATOR: &str = "specllava-orchestrator";
const DRAFT: &str = "specllava-draft";
const TARGET: &str = "specllava-target";

fn generate_request(session_id: &str, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: session_id.to_owned(),
        image: Default::default(),
        prompt: "What is this?".into(),
        params: Some(pb::GenerationParams {
            max_new_tokens,
            ignore_eos: true,
            ..Default::default()
        }),
        speculation: Some(pb::SpeculationConfig {
            mode: pb::SpeculationMode::Dynamic as i32,
            depth: 3,
            branching: 2,
            budget: 6,
            ..Default::default()
        }),
    }
}

/// Runs one turn of `session_id` to the end; returns the generated tokens.
async fn generate(cluster: &Cluster, req: pb::GenerateRequest) -> Result<Vec<u32>, tonic::Status> {
    let mut stream = cluster.client().await.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(msg) = stream.message().await? {
        if let Some(pb::generate_response::Event::Chunk(c)) = msg.event {
            tokens.extend(c.token_ids);
        }
    }
    Ok(tokens)
}

async fn start_cluster(collector: &Collector) -> Cluster {
    // The test asserts the turn speculated: wait for the draft's set-up even when a loaded
    // machine makes it slower than the turn.
    let mut cfg = ClusterConfig::new(MODEL, MODEL).wait_for_draft();
    cfg.metrics = true;
    cfg.env = collector.env();
    // Spans below the filter are never created: keep the services' own at info.
    cfg.env.push((
        "RUST_LOG".into(),
        "warn,specllava_telemetry=info,orchestrator=info,draft_service=info,target_service=info"
            .into(),
    ));
    Cluster::start(cfg).await
}

/// The spans of the trace of the orchestrator's `generate` span, once spans of all three
/// services (and the worker spans) have arrived.
async fn wait_for_trace(collector: &Collector) -> (ReceivedSpan, Vec<ReceivedSpan>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = collector.spans();
        if let Some(generate) = spans
            .iter()
            .find(|s| s.service == ORCHESTRATOR && s.span.name == "generate")
        {
            let trace: Vec<ReceivedSpan> = spans
                .iter()
                .filter(|s| s.span.trace_id == generate.span.trace_id)
                .cloned()
                .collect();
            let has = |service: &str, name: &str| {
                trace
                    .iter()
                    .any(|s| s.service == service && s.span.name == name)
            };
            if has(DRAFT, "specllava.v1.Draft/Speculate")
                && has(DRAFT, "draft.tree")
                && has(TARGET, "specllava.v1.Target/Verify")
                && has(TARGET, "target.verify")
            {
                return (generate.clone(), trace);
            }
        }
        assert!(
            Instant::now() < deadline,
            "the trace never completed; spans received: {:#?}",
            spans
                .iter()
                .map(|s| (&s.service, &s.span.name, hex(&s.span.trace_id)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The parsed `/metrics` of a service.
struct Metrics {
    service: &'static str,
    samples: Vec<Sample>,
}

impl Metrics {
    async fn scrape(service: &'static str, svc: &Service) -> Self {
        let body = scrape_metrics(svc).await;
        let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .unwrap_or_else(|e| panic!("{service}: unparseable metrics: {e}\n{body}"));
        Self {
            service,
            samples: scrape.samples,
        }
    }

    /// The value of counter `name` with `labels`, 0 when it was never counted.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let counted = self
            .samples
            .iter()
            .any(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
        if counted {
            self.value(name, labels)
        } else {
            0.0
        }
    }

    /// The value of the single sample `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: {name} {labels:?}: {found:?}",
            self.service
        );
        match found[0].value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            ref other => panic!("{}: {name} is {other:?}", self.service),
        }
    }

    /// `(count, sum)` of histogram `name`.
    fn histogram(&self, name: &str) -> (f64, f64) {
        let buckets = self
            .samples
            .iter()
            .find_map(|s| match &s.value {
                Value::Histogram(b) if s.metric == name => Some(b.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{}: no histogram {name}", self.service));
        let inf = buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .expect("+Inf bucket")
            .count;
        let count = self.value(&format!("{name}_count"), &[]);
        assert_eq!(inf, count, "{}: {name}: +Inf bucket == count", self.service);
        (count, self.value(&format!("{name}_sum"), &[]))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_generate_is_one_trace_and_metrics_are_served() {
    let collector = Collector::start().await;
    let cluster = start_cluster(&collector).await;

    // A multi-turn session (its KV stays on the replicas after the turn).
    let session_id = cluster
        .client()
        .await
        .create_session(pb::CreateSessionRequest {
            image: fixture_image("red_square.png"),
        })
        .await
        .expect("create session")
        .into_inner()
        .session_id;
    let tokens = generate(&cluster, generate_request(&session_id, 12))
        .await
        .expect("generate");
    assert_eq!(tokens.len(), 12);
    // One client error, counted by type and status at the orchestrator.
    let err = generate(&cluster, generate_request("no-such-session", 4))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // (a) One trace across the three services.
    let (generate_span, trace) = wait_for_trace(&collector).await;
    let services: HashSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        HashSet::from([ORCHESTRATOR, DRAFT, TARGET]),
        "services in the trace"
    );
    // The orchestrator's request span is the root; `generate` is its child.
    let root = trace
        .iter()
        .find(|s| s.span.span_id == generate_span.span.parent_span_id)
        .expect("the parent of generate is in the trace");
    assert_eq!(root.service, ORCHESTRATOR);
    assert_eq!(root.span.name, "specllava.v1.Generation/Generate");
    assert!(
        root.span.parent_span_id.is_empty(),
        "the request span is the root"
    );
    let by_id = |id: &[u8]| trace.iter().find(|s| s.span.span_id == id);
    for s in trace.iter().filter(|s| s.service != ORCHESTRATOR) {
        // Every draft / target span descends from an orchestrator span.
        let mut cur = s;
        while cur.service != ORCHESTRATOR {
            cur = by_id(&cur.span.parent_span_id).unwrap_or_else(|| {
                panic!(
                    "{}: {} has no parent in the trace",
                    cur.service, cur.span.name
                )
            });
        }
    }
    // Worker spans hang under their request spans.
    for (service, worker, request) in [
        (TARGET, "target.verify", "specllava.v1.Target/Verify"),
        (DRAFT, "draft.tree", "specllava.v1.Draft/Speculate"),
    ] {
        let w = trace
            .iter()
            .find(|s| s.service == service && s.span.name == worker)
            .unwrap();
        let parent = by_id(&w.span.parent_span_id).expect("worker span parent");
        assert_eq!(parent.span.name, request, "{worker}");
    }
    let verify = trace
        .iter()
        .find(|s| s.service == TARGET && s.span.name == "target.verify")
        .unwrap();
    assert_eq!(
        verify.attribute("session").as_deref(),
        Some(session_id.as_str())
    );

    // (b) Metrics of each service.
    let orch = Metrics::scrape(ORCHESTRATOR, &cluster.orchestrator).await;
    let draft = Metrics::scrape(DRAFT, cluster.draft.as_ref().unwrap()).await;
    let target = Metrics::scrape(TARGET, &cluster.target).await;

    let (steps, accepted) = orch.histogram("specllava_accepted_tokens_per_step");
    assert!(steps > 0.0, "accepted tokens observed");
    assert_eq!(
        accepted,
        tokens.len() as f64 - 1.0,
        "every token but the first (the prefill's) comes from a verify step"
    );
    assert!(steps < accepted, "draft == target: several tokens per step");
    let (trees, nodes) = orch.histogram("specllava_drafted_nodes_per_step");
    assert!(trees > 0.0 && nodes >= trees, "drafted nodes observed");
    assert_eq!(
        orch.value("specllava_requests_total", &[("rpc", "Generate")]),
        2.0
    );
    assert_eq!(
        orch.value("specllava_requests_total", &[("rpc", "CreateSession")]),
        1.0
    );
    assert_eq!(
        orch.value(
            "specllava_errors_total",
            &[("type", "session_not_found"), ("status", "NOT_FOUND")]
        ),
        1.0
    );

    let (drafts, draft_seconds) = draft.histogram("specllava_draft_latency_seconds");
    assert!(
        drafts >= trees && draft_seconds > 0.0,
        "draft latency observed"
    );
    assert_eq!(draft.value("specllava_active_sessions", &[]), 1.0);
    assert!(draft.value("specllava_kv_cache_bytes", &[]) > 0.0);
    assert_eq!(
        draft.value("specllava_requests_total", &[("rpc", "OpenSession")]),
        1.0
    );

    // The demo pair shares its vision tower: the target encodes the image once and both
    // sessions prefill from its features (the lossless tests check the output). Its
    // EncodeImages and its own OpenSession, sent at once, share one tower run.
    assert_eq!(
        target.value("specllava_requests_total", &[("rpc", "EncodeImages")]),
        1.0
    );
    let lookups = |outcome| target.count("specllava_vision_cache_total", &[("outcome", outcome)]);
    assert_eq!(lookups("miss"), 1.0, "one tower run on the target");
    assert_eq!(lookups("shared") + lookups("hit"), 1.0);
    assert_eq!(
        draft.count("specllava_vision_cache_total", &[("outcome", "miss")]),
        0.0,
        "the draft prefills from the target's features"
    );
    let verifies = target.value("specllava_requests_total", &[("rpc", "Verify")]);
    assert_eq!(verifies, steps, "one verify per step");
    let (batches, batched) = target.histogram("specllava_verify_batch_size");
    assert!(batches > 0.0 && batches <= verifies);
    assert_eq!(batched, verifies, "every verify ran in one batch");
    let (_, batch_nodes) = target.histogram("specllava_verify_batch_nodes");
    assert!(batch_nodes >= verifies, "at least the root per verify");
    let (latencies, seconds) = target.histogram("specllava_verify_latency_seconds");
    assert_eq!(latencies, verifies);
    assert!(seconds > 0.0);
    assert_eq!(target.value("specllava_verify_queue_depth", &[]), 0.0);
    assert_eq!(target.value("specllava_active_sessions", &[]), 1.0);
    assert!(target.value("specllava_kv_cache_bytes", &[]) > 0.0);

    // Closing the session frees it on both replicas.
    let closed = cluster
        .client()
        .await
        .close_session(pb::CloseSessionRequest {
            session_id: session_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(closed.existed);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let target = Metrics::scrape(TARGET, &cluster.target).await;
        let draft = Metrics::scrape(DRAFT, cluster.draft.as_ref().unwrap()).await;
        if target.value("specllava_active_sessions", &[]) == 0.0
            && draft.value("specllava_active_sessions", &[]) == 0.0
        {
            assert_eq!(target.value("specllava_kv_cache_bytes", &[]), 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "sessions not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
