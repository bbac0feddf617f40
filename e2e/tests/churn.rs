//! Replica churn and the drain over real processes (issue #29): a target that restarted is
//! back in rotation within a probe period (not after its backoff); rolling restarts of
//! targets and drafts under steady load (SIGTERM, wait for the exit, start again, wait for
//! health, one replica at a time, as a Kubernetes rollout does) lose no request and change
//! no output; SIGTERM of the orchestrator with requests in flight on both APIs turns both
//! unhealthy at once, refuses new requests retryably (UNAVAILABLE, 503 with `Retry-After`),
//! and finishes the requests in flight before it exits. Durations are only bounded from
//! above, generously.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use specllava_e2e::{
    Cluster, ClusterConfig, Service, fixture_image, free_port, gen_params,
    generate_tokens as generate, http_send, speculation, target_holds,
};
use specllava_proto::v1 as pb;
use specllava_proto::v1::generation_client::GenerationClient;
use tonic::Code;

const TARGET: &str = "gqa_default_l-2_sharded";
const DRAFT: &str = "mha_default_l-2_untied";

/// `targets` and `drafts` replicas with the default backoff and probe period.
fn config(targets: usize, drafts: usize) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(DRAFT, TARGET).replicas(targets, drafts);
    cfg.orchestrator_args
        .extend(["--target-timeout-ms", "4000", "--draft-timeout-ms", "2000"].map(String::from));
    cfg
}

/// A one-shot request.
fn request(
    prompt: &str,
    params: pb::GenerationParams,
    spec: pb::SpeculationConfig,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: String::new(),
        image: fixture_image("red_square.png"),
        prompt: prompt.into(),
        params: Some(params),
        speculation: Some(spec),
    }
}

/// Waits (off the async threads) for `svc` to exit after SIGTERM; asserts a clean exit.
fn wait_clean_exit(svc: &mut Service, within: Duration) {
    let st = tokio::task::block_in_place(|| svc.process.wait_exit(within))
        .unwrap_or_else(|| panic!("{} did not exit within {within:?} of SIGTERM", svc.addr));
    assert!(st.success(), "graceful shutdown exits 0: {st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_target_is_back_in_rotation_within_a_probe_period() {
    let mut cluster = Cluster::start(config(2, 1)).await;
    let mut client = cluster.client().await;
    let req = || {
        request(
            "Hi?",
            gen_params(8, None),
            speculation(pb::SpeculationMode::Off),
        )
    };
    let reference = generate(&mut client, req()).await.unwrap();
    // Target A dies; requests fail over to B, and A's backoff grows while probes fail
    // (0.5 s doubling: 8 s from about 7.5 s on, so A would be out until about 15 s).
    cluster.target.process.kill();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(10) {
        assert_eq!(generate(&mut client, req()).await.unwrap(), reference);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.target.start_again().await;
    // One probe period (0.5 s) and a probe's round trip later, A takes new sessions again
    // (before, its backoff of several seconds kept it out): of two sessions opened now, one
    // is pinned to A (the one with fewer sessions). 1.5 s leaves room for a loaded machine.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let id = client
            .create_session(pb::CreateSessionRequest {
                image: fixture_image("red_square.png"),
            })
            .await
            .unwrap()
            .into_inner()
            .session_id;
        let mut turn = req();
        turn.session_id = id.clone();
        turn.image = Default::default();
        generate(&mut client, turn).await.unwrap();
        sessions.push(id);
    }
    let mut on_a = false;
    for id in &sessions {
        on_a |= target_holds(&cluster.target, id).await;
    }
    assert!(
        on_a,
        "the restarted target takes sessions within a probe period"
    );
    // And when the other target dies now, requests go on on A.
    cluster.more_targets[0].process.kill();
    for _ in 0..3 {
        assert_eq!(generate(&mut client, req()).await.unwrap(), reference);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restarts_of_targets_and_drafts_under_load_lose_no_request() {
    let mut cluster = Cluster::start(config(2, 2)).await;
    let mut client = cluster.client().await;
    let params = [
        ("Describe it.", gen_params(48, None)),
        ("Tell me a story.", gen_params(48, Some(7))),
    ];
    let mut references = Vec::new();
    for (prompt, p) in &params {
        let req = request(prompt, p.clone(), speculation(pb::SpeculationMode::Off));
        references.push(generate(&mut client, req).await.unwrap());
    }
    let references = Arc::new(references);
    let stop = Arc::new(AtomicBool::new(false));
    // Steady load: three clients, one request after the other, speculative.
    let load: Vec<_> = (0..3)
        .map(|k| {
            let (mut client, stop, refs) =
                (client.clone(), Arc::clone(&stop), Arc::clone(&references));
            let params = params.clone();
            tokio::spawn(async move {
                let (mut done, mut failed, mut wrong) = (0, Vec::new(), 0);
                let mut i = k;
                while !stop.load(Ordering::Relaxed) {
                    let (prompt, p) = &params[i % params.len()];
                    let req = request(
                        prompt,
                        p.clone(),
                        speculation(pb::SpeculationMode::Adaptive),
                    );
                    match generate(&mut client, req).await {
                        Ok(tokens) if tokens == refs[i % params.len()] => done += 1,
                        Ok(_) => wrong += 1,
                        Err(s) => failed.push(format!("{:?}: {}", s.code(), s.message())),
                    }
                    i += 1;
                }
                (done, failed, wrong)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // One replica at a time: SIGTERM (it drains), its exit, a new process on its address,
    // its health, a readiness period.
    for i in 0..4 {
        let svc = match i {
            0 => &mut cluster.target,
            1 => &mut cluster.more_targets[0],
            2 => cluster.draft.as_mut().unwrap(),
            _ => &mut cluster.more_drafts[0],
        };
        svc.process.begin_terminate();
        wait_clean_exit(svc, Duration::from_secs(30));
        svc.start_again().await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut done, mut failed, mut wrong) = (0, Vec::new(), 0);
    for task in load {
        let (d, f, w) = task.await.unwrap();
        done += d;
        failed.extend(f);
        wrong += w;
    }
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    assert_eq!(wrong, 0, "outputs differ from target-only");
    assert!(done >= 12, "too little load to show anything: {done}");
}

/// Reads an HTTP answer's status line and headers.
fn read_head(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> (u16, Vec<String>) {
    let status_line = lines.next().expect("a status line").unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(Result::unwrap)
        .take_while(|l| !l.is_empty())
        .collect();
    (status, headers)
}

/// The text of an SSE completion stream's content deltas, to its `[DONE]`.
fn sse_text(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> String {
    let mut text = String::new();
    for line in lines {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return text;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert!(chunk.get("error").is_none(), "the stream failed: {chunk}");
        if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    panic!("the stream ended without [DONE]")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_both_apis_with_requests_in_flight() {
    let http = format!("127.0.0.1:{}", free_port());
    let mut cfg = config(1, 1);
    cfg.orchestrator_args
        .extend(["--http-listen".to_string(), http.clone()]);
    let mut cluster = Cluster::start(cfg).await;
    let mut client = cluster.client().await;
    let grpc_req = || {
        request(
            "Hi?",
            gen_params(400, None),
            speculation(pb::SpeculationMode::Off),
        )
    };
    let grpc_reference = generate(&mut client, grpc_req()).await.unwrap();
    let body = |stream: bool| {
        serde_json::to_vec(&json!({
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 300, "ignore_eos": true, "temperature": 0, "stream": stream,
        }))
        .unwrap()
    };
    let http_reference = {
        let mut conn = http_send(&http, "POST", "/v1/chat/completions", None, &body(false));
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        let json = answer.split("\r\n\r\n").nth(1).unwrap();
        let v: Value = serde_json::from_str(json).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // In flight: a gRPC stream read up to its first message (the rest waits for the client),
    // and an HTTP stream read up to its first chunk.
    let mut grpc_stream = client.generate(grpc_req()).await.unwrap().into_inner();
    let first = grpc_stream.message().await.unwrap().unwrap();
    let conn = http_send(&http, "POST", "/v1/chat/completions", None, &body(true));
    let mut http_lines = BufReader::new(conn).lines();
    let (status, _) = read_head(&mut http_lines);
    assert_eq!(status, 200);

    cluster.orchestrator.process.begin_terminate();
    let signalled = Instant::now();
    // HTTP: unhealthy, and new requests refused retryably, at once.
    let deadline = signalled + Duration::from_secs(5);
    loop {
        let mut conn = http_send(&http, "GET", "/health", None, b"");
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        if answer.starts_with("HTTP/1.1 503") {
            break;
        }
        assert!(Instant::now() < deadline, "/health still says: {answer}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = http_send(&http, "POST", "/v1/chat/completions", None, &body(false));
    let (status, headers) = read_head(&mut BufReader::new(refused).lines());
    assert_eq!(status, 503);
    assert!(
        headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("retry-after:")),
        "{headers:?}"
    );
    // gRPC: a new request is refused as UNAVAILABLE (retryable).
    let mut fresh = GenerationClient::new(
        tonic::transport::Endpoint::from_shared(cluster.orchestrator.url())
            .unwrap()
            .connect_lazy(),
    );
    let err = generate(&mut fresh, grpc_req()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // The requests in flight finish, whole.
    let mut tokens = Vec::new();
    if let Some(pb::generate_response::Event::Chunk(c)) = first.event {
        tokens.extend(c.token_ids);
    }
    while let Some(msg) = grpc_stream.message().await.unwrap() {
        if let Some(pb::generate_response::Event::Chunk(c)) = msg.event {
            tokens.extend(c.token_ids);
        }
    }
    assert_eq!(tokens, grpc_reference, "the gRPC stream in flight finished");
    let text = tokio::task::block_in_place(|| sse_text(&mut http_lines));
    assert_eq!(text, http_reference, "the HTTP stream in flight finished");
    drop(http_lines);
    wait_clean_exit(&mut cluster.orchestrator, Duration::from_secs(20));
}
