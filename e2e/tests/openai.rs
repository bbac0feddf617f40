//! End-to-end tests of the OpenAI-compatible HTTP API (issue #14) over real HTTP between real
//! processes: the official `openai` Python client against the gRPC API (same tokens), with the
//! demo pair (`models/draft`, `models/target`, each with its own chat template); the error
//! shapes and limits at the HTTP level, a client leaving mid-stream, and remote image URLs
//! (`http://`, and `https://` trusting a CA made at test time), with the fixtures.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use specllava_e2e::{
    Cluster, ClusterConfig, TestPki, fixture_image, free_port, http_send, workspace_root,
};
use specllava_harness::test_host;

use tokio_rustls::TlsAcceptor;

const API_KEY: &str = "sekret";

/// The fixture target (512 positions) with a draft, serving HTTP on `http` too.
fn fixture_config(http: &str, extra: &[&str]) -> ClusterConfig {
    let mut cfg = ClusterConfig::new("mha_default_l-2_untied", "gqa_default_l-2_sharded");
    cfg.orchestrator_args = ["--http-listen", http]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    cfg
}

/// The demo pair (which answers in words), serving HTTP on `http` too.
async fn demo_cluster(http: &str, extra: &[&str]) -> Cluster {
    let root = workspace_root();
    let mut cfg = ClusterConfig::new("mha_default_l-2_untied", "gqa_default_l-2_sharded");
    cfg.draft_model = Some(root.join("models/draft"));
    cfg.target_model = root.join("models/target");
    // The verify-cost calibration is not what these tests are about (e2e.rs checks it).
    cfg.target_args = vec!["--calibrate".into(), "false".into()];
    cfg.orchestrator_args = ["--http-listen", http]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    Cluster::start(cfg).await
}

fn data_url(image: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(fixture_image(image));
    format!("data:image/png;base64,{b64}")
}

fn chat(image: &str, text: &str, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image)}},
            {"type": "text", "text": text}]}],
        "max_tokens": 8,
        "temperature": 0,
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// Sends one request (HTTP/1.1, `Connection: close`) with API key `key` and returns the
/// open connection.
fn send(addr: &str, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> TcpStream {
    let auth = key.map(|k| format!("Bearer {k}"));
    http_send(addr, method, path, auth.as_deref(), body)
}

/// One whole request: status and body (JSON when it parses, else a string).
fn request(addr: &str, method: &str, path: &str, key: Option<&str>, body: &[u8]) -> (u16, Value) {
    let mut s = send(addr, method, path, key, body);
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("reading the response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.into()));
    (status, body)
}

fn post(addr: &str, body: &Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    request(addr, "POST", "/v1/chat/completions", Some(API_KEY), &bytes)
}

/// Asserts OpenAI's error shape with this status and `type`.
fn assert_error(got: (u16, Value), status: u16, kind: &str) -> Value {
    assert_eq!(got.0, status, "{}", got.1);
    let e = &got.1["error"];
    assert_eq!(e["type"], kind, "{}", got.1);
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{e}");
    e.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_client_gets_the_grpc_tokens() {
    let python = std::env::var("SPECLLAVA_PYTHON").unwrap_or_else(|_| "python3".into());
    let http = format!("127.0.0.1:{}", free_port());
    let cluster = demo_cluster(&http, &[]).await;
    let root = workspace_root();
    let status = tokio::process::Command::new(&python)
        .arg(root.join("tests/python/openai_test.py"))
        .arg("--base-url")
        .arg(format!("http://{http}/v1"))
        .arg("--grpc-endpoint")
        .arg(&cluster.orchestrator.addr)
        .arg("--image")
        .arg(root.join("model/tests/fixtures/images/red_square.png"))
        .arg("--proto-root")
        .arg(root.join("proto"))
        .status()
        .await
        .expect("running the openai client test");
    assert!(status.success(), "openai client test failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_limits_and_a_client_leaving_mid_stream() {
    let http = format!("127.0.0.1:{}", free_port());
    let cluster = Cluster::start(fixture_config(
        &http,
        &[
            "--api-keys",
            API_KEY,
            "--max-concurrent-requests",
            "1",
            "--max-image-bytes",
            "1000",
            "--http-max-body-bytes",
            "20000",
        ],
    ))
    .await;
    let addr = http.as_str();
    assert_eq!(request(addr, "GET", "/health", None, b"").0, 200);
    let good = chat("red_square.png", "What do you see?", json!({}));
    let bytes = serde_json::to_vec(&good).unwrap();

    // Authentication, malformed and unsupported requests.
    let e = assert_error(
        request(addr, "POST", "/v1/chat/completions", None, &bytes),
        401,
        "authentication_error",
    );
    assert_eq!(e["code"], "invalid_api_key");
    assert_error(
        request(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(API_KEY),
            b"{not json",
        ),
        400,
        "invalid_request_error",
    );
    let e = assert_error(
        post(
            addr,
            &chat("red_square.png", "hi", json!({"model": "nope"})),
        ),
        404,
        "invalid_request_error",
    );
    assert_eq!(e["code"], "model_not_found");
    let e = assert_error(
        post(addr, &chat("red_square.png", "hi", json!({"n": 3}))),
        400,
        "invalid_request_error",
    );
    assert_eq!(e["param"], "n");
    assert_error(
        post(
            addr,
            &chat("red_square.png", "hi", json!({"temperature": -1})),
        ),
        400,
        "invalid_request_error",
    );
    assert_error(
        post(addr, &chat("red_square.png", "an <image> typed", json!({}))),
        400,
        "invalid_request_error",
    );
    let mut remote = good.clone();
    remote["messages"][0]["content"][0]["image_url"]["url"] = "http://example.com/a.png".into();
    let e = assert_error(post(addr, &remote), 400, "invalid_request_error");
    assert!(
        e["message"].as_str().unwrap().contains("remote image"),
        "{e}"
    );

    // Sizes: an image over --max-image-bytes, a body over --http-max-body-bytes.
    assert_error(
        post(addr, &chat("photo.jpg", "hi", json!({}))),
        413,
        "invalid_request_error",
    );
    let huge = chat("red_square.png", &"x".repeat(30_000), json!({}));
    assert_error(post(addr, &huge), 413, "invalid_request_error");

    // A long stream holds the only request slot: another request gets 429. Then the client
    // leaves mid-stream, which frees the sessions on both replicas.
    let long = chat(
        "red_square.png",
        "What do you see?",
        json!({"max_tokens": 2000, "ignore_eos": true, "stream": true}),
    );
    let conn = send(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(API_KEY),
        &serde_json::to_vec(&long).unwrap(),
    );
    let mut lines = BufReader::new(conn.try_clone().unwrap()).lines();
    let status_line = lines.next().unwrap().unwrap();
    assert!(status_line.contains(" 200 "), "{status_line}");
    let mut id = None;
    let mut chunks = 0;
    while chunks < 3 {
        let line = lines.next().expect("the stream goes on").unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            let chunk: Value = serde_json::from_str(data).unwrap();
            assert_eq!(chunk["object"], "chat.completion.chunk");
            id = chunk["id"].as_str().map(str::to_owned);
            chunks += 1;
        }
    }
    // `chatcmpl-<session>-<turn>`.
    let id = id.unwrap();
    let session = id.split('-').nth(1).unwrap().to_owned();
    let e = assert_error(post(addr, &good), 429, "rate_limit_error");
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(
        cluster.target_has(&session).await,
        "generating on the target"
    );
    drop(lines);
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.target_has(&session).await || cluster.draft_has(&session).await {
        assert!(
            Instant::now() < deadline,
            "sessions not freed after the client left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Others keep working.
    let (status, body) = post(addr, &good);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["usage"]["completion_tokens"], 8);
    assert!(
        body["speculation"]["steps"].as_u64().unwrap() >= 1,
        "{body}"
    );
    let models = request(addr, "GET", "/v1/models", Some(API_KEY), b"");
    assert_eq!(
        models.1["data"][0]["id"], "gqa_default_l-2_sharded",
        "{}",
        models.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_target_replica_is_503() {
    let http = format!("127.0.0.1:{}", free_port());
    let root = workspace_root();
    let dead = format!("127.0.0.1:{}", free_port());
    let mut orch = specllava_e2e::Service::start(
        "specllava-orchestrator",
        &[
            "--model-dir".into(),
            root.join("models/target").to_string_lossy().into_owned(),
            "--target-endpoints".into(),
            dead,
            "--draft-endpoints=".into(),
            "--http-listen".into(),
            http.clone(),
            "--connect-timeout-ms".into(),
            "300".into(),
        ],
    );
    specllava_e2e::wait_healthy(&mut orch, Duration::from_secs(60)).await;
    let body = serde_json::to_vec(&chat("red_square.png", "hi", json!({}))).unwrap();
    let got = request(&http, "POST", "/v1/chat/completions", None, &body);
    let e = assert_error(got, 503, "server_error");
    assert_eq!(e["code"], "service_unavailable");
}

/// Serves images (HTTPS with `tls`, else HTTP); its base URL. `/red_square.png`: the fixture
/// with its `Content-Length`; `/huge.png`: 4 MB of it with no length (only a limit enforced
/// while streaming catches it); else 404.
async fn image_server(tls: Option<TlsAcceptor>) -> String {
    test_host::serve(tls, |path| async move {
        let mut out = Vec::new();
        match path.as_str() {
            "/red_square.png" => {
                let png = fixture_image("red_square.png");
                let len = png.len();
                out.extend(format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n").bytes());
                out.extend(png);
            }
            "/huge.png" => {
                out.extend(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n");
                out.extend(fixture_image("red_square.png"));
                out.resize(4 << 20, 0);
            }
            _ => out.extend(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
        }
        out
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_image_urls_over_http_and_https() {
    let pki = TestPki::generate();
    let ca_file = pki.ca.clone();
    let trusted = image_server(Some(pki.acceptor())).await;
    // Signed by another CA, which the orchestrator does not trust.
    let untrusted = image_server(Some(TestPki::generate().acceptor())).await;
    let plain = image_server(None).await;

    let http = format!("127.0.0.1:{}", free_port());
    let cfg = fixture_config(&http, &["--max-image-bytes", "100000"]).remote_images(Some(&ca_file));
    let _cluster = Cluster::start(cfg).await;
    let addr = http.as_str();

    let request = chat(
        "red_square.png",
        "What do you see?",
        json!({"return_token_ids": true}),
    );
    let with_url = |url: String| {
        let mut r = request.clone();
        r["messages"][0]["content"][0]["image_url"]["url"] = url.into();
        r
    };
    let (status, by_data) = post(addr, &request);
    assert_eq!(status, 200, "{by_data}");
    let tokens = &by_data["choices"][0]["token_ids"];
    assert_eq!(tokens.as_array().map(Vec::len), Some(8), "{by_data}");
    for base in [&trusted, &plain] {
        let (status, body) = post(addr, &with_url(format!("{base}/red_square.png")));
        assert_eq!(status, 200, "{base}: {body}");
        assert_eq!(&body["choices"][0]["token_ids"], tokens, "{base}: {body}");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            by_data["choices"][0]["message"]["content"]
        );
    }

    // An untrusted certificate: a 400 that says so.
    let e = assert_error(
        post(addr, &with_url(format!("{untrusted}/red_square.png"))),
        400,
        "invalid_request_error",
    );
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{e}");
    // Over --max-image-bytes while streaming (no Content-Length): 413, over HTTPS and HTTP.
    for base in [&trusted, &plain] {
        let e = assert_error(
            post(addr, &with_url(format!("{base}/huge.png"))),
            413,
            "invalid_request_error",
        );
        assert_eq!(e["code"], "request_too_large");
    }
    // A missing image: a 400 with the status.
    let e = assert_error(
        post(addr, &with_url(format!("{trusted}/nope.png"))),
        400,
        "invalid_request_error",
    );
    assert!(e["message"].as_str().unwrap().contains("404"), "{e}");
}
