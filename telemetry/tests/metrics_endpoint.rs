//! `GET /metrics` serves the `specllava_*` metrics in a format a Prometheus parser reads.

use std::collections::HashMap;

use prometheus_parse::{Scrape, Value};
use specllava_telemetry::{MetricsServer, metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 request over a fresh connection: (status code, headers, body).
async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

#[tokio::test]
async fn metrics_endpoint_serves_parseable_prometheus_text() {
    let m = metrics();
    for accepted in [1, 3, 4, 4] {
        m.accepted_tokens_per_step.observe(f64::from(accepted));
    }
    m.drafted_nodes_per_step.observe(48.0);
    m.draft_latency_seconds.observe(0.012);
    m.verify_latency_seconds.observe(0.034);
    m.verify_batch_size.observe(3.0);
    m.verify_batch_nodes.observe(150.0);
    m.verify_queue_depth.set(2);
    m.active_sessions.set(5);
    m.kv_cache_bytes.set(123_456_789);
    m.record_eviction("lru");
    m.record_error("session_not_found", tonic::Code::NotFound);
    m.record_error("session_not_found", tonic::Code::NotFound);
    m.record_error("invalid_tree", tonic::Code::InvalidArgument);
    m.record_request("Verify");

    let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));

    let (status, head, body) = get(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );

    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let by_name = |name: &str| -> Vec<&prometheus_parse::Sample> {
        scrape.samples.iter().filter(|s| s.metric == name).collect()
    };
    let single = |name: &str| -> Value {
        let found = by_name(name);
        assert_eq!(found.len(), 1, "{name}: {found:?}\n{body}");
        found[0].value.clone()
    };

    // Histograms: buckets are cumulative, +Inf holds every observation.
    match single("specllava_accepted_tokens_per_step") {
        Value::Histogram(buckets) => {
            let le = |bound: f64| {
                buckets
                    .iter()
                    .find(|b| b.less_than == bound)
                    .unwrap_or_else(|| panic!("no bucket le={bound}"))
                    .count
            };
            assert_eq!(le(1.0), 1.0);
            assert_eq!(le(3.0), 2.0);
            assert_eq!(le(4.0), 4.0);
            assert_eq!(le(f64::INFINITY), 4.0);
        }
        other => panic!("accepted_tokens_per_step is not a histogram: {other:?}"),
    }
    for name in [
        "specllava_drafted_nodes_per_step",
        "specllava_draft_latency_seconds",
        "specllava_verify_latency_seconds",
        "specllava_verify_batch_size",
        "specllava_verify_batch_nodes",
    ] {
        match single(name) {
            Value::Histogram(buckets) => {
                let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
                assert_eq!(inf.count, 1.0, "{name}");
            }
            other => panic!("{name} is not a histogram: {other:?}"),
        }
        assert_eq!(by_name(&format!("{name}_count")).len(), 1, "{name}_count");
        assert_eq!(by_name(&format!("{name}_sum")).len(), 1, "{name}_sum");
    }

    // Gauges.
    for (name, expected) in [
        ("specllava_verify_queue_depth", 2.0),
        ("specllava_active_sessions", 5.0),
        ("specllava_kv_cache_bytes", 123_456_789.0),
    ] {
        assert_eq!(single(name), Value::Gauge(expected), "{name}");
    }

    // Counters (OpenMetrics names their samples `<family>_total`).
    let value = |sample: &prometheus_parse::Sample| match sample.value {
        Value::Counter(v) | Value::Untyped(v) | Value::Gauge(v) => v,
        ref other => panic!("{}: unexpected {other:?}", sample.metric),
    };
    let errors: HashMap<(String, String), f64> = by_name("specllava_errors_total")
        .into_iter()
        .map(|s| {
            let label = |k: &str| {
                s.labels
                    .get(k)
                    .unwrap_or_else(|| panic!("no {k}"))
                    .to_owned()
            };
            ((label("type"), label("status")), value(s))
        })
        .collect();
    assert_eq!(
        errors,
        HashMap::from([
            (("session_not_found".into(), "NOT_FOUND".into()), 2.0),
            (("invalid_tree".into(), "INVALID_ARGUMENT".into()), 1.0),
        ])
    );
    let requests = by_name("specllava_requests_total");
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].labels.get("rpc"), Some("Verify"));
    assert_eq!(value(requests[0]), 1.0);
    let evictions = by_name("specllava_evictions_total");
    assert_eq!(evictions[0].labels.get("reason"), Some("lru"));
    assert_eq!(value(evictions[0]), 1.0);

    // Every family is documented, and nothing escapes the prefix.
    for name in [
        "specllava_accepted_tokens_per_step",
        "specllava_active_sessions",
        "specllava_errors",
    ] {
        assert!(scrape.docs.contains_key(name), "no HELP for {name}");
    }
    assert!(
        scrape
            .samples
            .iter()
            .all(|s| s.metric.starts_with("specllava_"))
    );

    // Other paths and methods.
    assert_eq!(get(addr, "GET", "/").await.0, 404);
    assert_eq!(get(addr, "POST", "/metrics").await.0, 405);

    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
