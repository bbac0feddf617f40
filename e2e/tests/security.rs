//! End-to-end tests of issue #16's security part over real processes, with certificates
//! generated at test time: TLS on every gRPC endpoint with mutual TLS between the
//! orchestrator and the replicas (lossless: the speculative output equals the target-only
//! one), replicas refusing clients without a certificate, and bearer tokens on the public
//! gRPC and HTTP APIs (UNAUTHENTICATED / PERMISSION_DENIED / OK; 401 / 200), plus the gRPC
//! API's stop-string caps.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use specllava_e2e::{
    Cluster, ClusterConfig, Service, TestPki, collect_generation, fixture_image, free_port,
    http_send,
};
use specllava_proto::v1 as pb;
use specllava_proto::v1::draft_client::DraftClient;
use specllava_proto::v1::generation_client::GenerationClient;
use specllava_proto::v1::target_client::TargetClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// The fixture target (vocabulary 400).
const TARGET: &str = "gqa_default_l-2_sharded";
/// A draft sharing the target's vocabulary.
const DRAFT: &str = "mha_default_l-2_untied";

fn request(mode: pb::SpeculationMode, stop: Vec<String>) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: String::new(),
        image: fixture_image("red_square.png"),
        prompt: "What is in the image?".into(),
        params: Some(pb::GenerationParams {
            max_new_tokens: 24,
            ignore_eos: true,
            stop,
            ..Default::default()
        }),
        speculation: Some(pb::SpeculationConfig {
            mode: mode as i32,
            ..Default::default()
        }),
    }
}

/// `req` with `authorization: <header>` when given.
fn with_auth<T>(req: T, header: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(req);
    if let Some(h) = header {
        req.metadata_mut()
            .insert("authorization", h.parse().unwrap());
    }
    req
}

/// Runs a generation to its end: the tokens and the summary.
async fn generate(
    client: &mut GenerationClient<Channel>,
    req: tonic::Request<pb::GenerateRequest>,
) -> Result<(Vec<u32>, pb::GenerateSummary), tonic::Status> {
    collect_generation(client.generate(req).await?.into_inner()).await
}

/// A channel to `svc` over TLS with `tls`, or plaintext without; connecting may fail.
async fn try_channel(
    svc: &Service,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", svc.addr))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint.connect().await
}

/// An error with its whole source chain, for telling a refusal from a dead port.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether `Target.Info` answers through `tls` (`None`: plaintext); why not, if it does not.
async fn target_answers(
    svc: &Service,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<(), String> {
    let ch = try_channel(svc, tls).await.map_err(|e| chain(&e))?;
    let info = TargetClient::new(ch).info(pb::InfoRequest {}).await;
    info.map(drop).map_err(|e| chain(&e))
}

/// Whether `Draft.Info` answers through `tls` (`None`: plaintext); why not, if it does not.
async fn draft_answers(
    svc: &Service,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<(), String> {
    let ch = try_channel(svc, tls).await.map_err(|e| chain(&e))?;
    let info = DraftClient::new(ch).info(pb::InfoRequest {}).await;
    info.map(drop).map_err(|e| chain(&e))
}

/// A refusal by a replica that is up: the TCP connection was accepted (not "connection
/// refused", which a dead port would give) and the call still failed.
fn assert_refused(outcome: Result<(), String>, what: &str) {
    let why = outcome.expect_err(what);
    assert!(
        !why.to_lowercase().contains("connection refused"),
        "{what}: the port must be up and refuse the call, got {why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_everywhere_with_mutual_tls_is_lossless_and_refuses_clients_without_certs() {
    let pki = Arc::new(TestPki::generate());
    let mut cfg = ClusterConfig::new(DRAFT, TARGET)
        .with_tls(Arc::clone(&pki), true)
        .wait_for_draft();
    let health_port = free_port();
    cfg.target_args = vec![
        "--calibrate".into(),
        "false".into(),
        format!("--health-listen=127.0.0.1:{health_port}"),
    ];
    let cluster = Cluster::start(cfg).await;

    // The plaintext health-only port (for kubelet probes) answers without credentials.
    let ch = Endpoint::from_shared(format!("http://127.0.0.1:{health_port}"))
        .unwrap()
        .connect()
        .await
        .expect("the plaintext health port");
    let status = tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health over plaintext")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // The public endpoint serves TLS: a request through it speculates over mutual TLS to
    // both replicas, and its tokens are the target-only output.
    let mut client = cluster.client().await;
    let (spec, summary) = generate(
        &mut client,
        with_auth(request(pb::SpeculationMode::Dynamic, vec![]), None),
    )
    .await
    .expect("a speculative generation over TLS");
    let stats = summary.stats.expect("stats");
    assert!(
        stats.speculative && stats.drafted > 0,
        "the draft was used over mutual TLS: {stats:?}"
    );
    let (base, _) = generate(
        &mut client,
        with_auth(request(pb::SpeculationMode::Off, vec![]), None),
    )
    .await
    .expect("a target-only generation over TLS");
    assert_eq!(spec.len(), 24);
    assert_eq!(spec, base, "speculation over TLS is lossless");

    // The replicas require a client certificate: with one (the orchestrator's) they answer;
    // without one, or in plaintext, they refuse.
    let (target, draft) = (&cluster.target, cluster.draft.as_ref().unwrap());
    target_answers(target, Some(pki.client_tls(true)))
        .await
        .expect("the target answers the orchestrator's certificate");
    draft_answers(draft, Some(pki.client_tls(true)))
        .await
        .expect("the draft answers the orchestrator's certificate");
    assert_refused(
        target_answers(target, Some(pki.client_tls(false))).await,
        "the target refuses TLS without a client certificate",
    );
    assert_refused(
        draft_answers(draft, Some(pki.client_tls(false))).await,
        "the draft refuses TLS without a client certificate",
    );
    assert_refused(
        target_answers(target, None).await,
        "the target refuses plaintext",
    );
    assert_refused(
        draft_answers(draft, None).await,
        "the draft refuses plaintext",
    );
    // Still up after the refusals: they were refusals, not crashes.
    target_answers(target, Some(pki.client_tls(true)))
        .await
        .expect("the target still answers");
    // The orchestrator's public endpoint serves TLS only.
    let plain = try_channel(&cluster.orchestrator, None).await;
    if let Ok(ch) = plain {
        let refused = generate(
            &mut GenerationClient::new(ch),
            with_auth(request(pb::SpeculationMode::Off, vec![]), None),
        )
        .await;
        assert!(refused.is_err(), "plaintext to a TLS endpoint is refused");
    }

    // An orchestrator that trusts the CA but has no client certificate gets no replica.
    let args = [
        "--model-dir".to_owned(),
        specllava_e2e::fixture(TARGET)
            .to_string_lossy()
            .into_owned(),
        format!("--target-endpoints={}", target.addr),
        format!("--draft-endpoints={}", draft.addr),
    ]
    .into_iter()
    .chain(pki.upstream_args(false))
    .collect::<Vec<_>>();
    let mut no_cert = Service::start_with("specllava-orchestrator", &args, &[], false);
    specllava_e2e::wait_healthy(&mut no_cert, Duration::from_secs(60)).await;
    let mut client = GenerationClient::new(specllava_e2e::connected(&no_cert).await);
    let err = generate(
        &mut client,
        with_auth(request(pb::SpeculationMode::Off, vec![]), None),
    )
    .await
    .expect_err("replicas refuse an orchestrator without a client certificate");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
}

/// Sends one HTTP/1.1 request and returns its status.
fn http_status(addr: &str, method: &str, path: &str, auth: Option<&str>, body: &[u8]) -> u16 {
    let mut s = http_send(addr, method, path, auth, body);
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("reading the response");
    resp.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_guard_the_grpc_and_http_apis_and_stop_strings_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, "# test tokens\nfile-token\n\n").unwrap();
    let http = format!("127.0.0.1:{}", free_port());
    let mut cfg = ClusterConfig::new(DRAFT, TARGET);
    cfg.draft_model = None;
    cfg.draft_endpoints = Some(String::new());
    cfg.target_args = vec!["--calibrate".into(), "false".into()];
    cfg.orchestrator_args = vec![
        "--http-listen".into(),
        http.clone(),
        "--api-keys".into(),
        "inline-token".into(),
        "--api-keys-file".into(),
        keys.to_string_lossy().into_owned(),
        "--max-stop-strings".into(),
        "4".into(),
        "--max-stop-bytes".into(),
        "8".into(),
    ];
    let cluster = Cluster::start(cfg).await;
    let mut client = cluster.client().await;
    let off = || request(pb::SpeculationMode::Off, vec![]);

    // gRPC: no or malformed credentials, an unknown token, then both configured tokens.
    for header in [
        None,
        Some("file-token"),
        Some("Basic ZmlsZS10b2tlbg=="),
        Some("Bearer "),
    ] {
        let err = generate(&mut client, with_auth(off(), header))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{header:?}: {err:?}");
    }
    let err = generate(&mut client, with_auth(off(), Some("Bearer wrong-token")))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = client
        .create_session(with_auth(
            pb::CreateSessionRequest {
                image: Default::default(),
            },
            None,
        ))
        .await
        .expect_err("every Generation method is guarded");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut outputs = Vec::new();
    for token in ["Bearer file-token", "Bearer inline-token"] {
        let (tokens, _) = generate(&mut client, with_auth(off(), Some(token)))
            .await
            .unwrap_or_else(|e| panic!("{token}: {e:?}"));
        assert_eq!(tokens.len(), 24);
        outputs.push(tokens);
    }
    assert_eq!(outputs[0], outputs[1]);
    // Health stays open (the probes send no token).
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(cluster.orchestrator.channel());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health needs no token")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Stop strings: at most 4, each at most 8 bytes (INVALID_ARGUMENT otherwise).
    let auth = Some("Bearer file-token");
    let many = vec!["a".to_owned(); 5];
    let err = generate(
        &mut client,
        with_auth(request(pb::SpeculationMode::Off, many), auth),
    )
    .await
    .expect_err("too many stop strings");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("at most 4"), "{}", err.message());
    let long = vec!["x".to_owned(), "123456789".to_owned()];
    let err = generate(
        &mut client,
        with_auth(request(pb::SpeculationMode::Off, long), auth),
    )
    .await
    .expect_err("a stop string too long");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("at most 8"), "{}", err.message());
    let fine = vec!["\u{1}".to_owned(); 4];
    let (tokens, _) = generate(
        &mut client,
        with_auth(request(pb::SpeculationMode::Off, fine), auth),
    )
    .await
    .expect("stop strings within the caps");
    assert_eq!(tokens, outputs[0]);

    // HTTP: the same tokens, OpenAI's 401 for anything else.
    let chat = |extra: serde_json::Value| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(fixture_image("red_square.png"));
        let mut body = serde_json::json!({
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}},
                {"type": "text", "text": "What is in the image?"}]}],
            "max_tokens": 4,
            "temperature": 0,
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::to_vec(&body).unwrap()
    };
    let body = chat(serde_json::json!({}));
    let post = |auth: Option<&str>| http_status(&http, "POST", "/v1/chat/completions", auth, &body);
    assert_eq!(post(None), 401);
    assert_eq!(post(Some("Bearer wrong-token")), 401);
    assert_eq!(post(Some("file-token")), 401);
    assert_eq!(post(Some("Bearer inline-token")), 200);
    assert_eq!(post(Some("Bearer file-token")), 200);
    assert_eq!(http_status(&http, "GET", "/health", None, b""), 200);
    let stops = chat(serde_json::json!({"stop": ["a", "b", "c", "d", "e"]}));
    assert_eq!(
        http_status(
            &http,
            "POST",
            "/v1/chat/completions",
            Some("Bearer file-token"),
            &stops
        ),
        400,
        "the HTTP API applies the same stop-string caps"
    );
}
