//! End-to-end tests over real gRPC: the three real binaries on loopback ports
//! with the parity fixture checkpoints (tiny random LLaVA models sharing one
//! tokenizer). Issue #4 item 7, (a)-(e), plus multi-turn, fallback, limits
//! and a Python client.

use std::time::Duration;

use futures::future::join_all;
use specllava_e2e::{
    Cluster, ClusterConfig, fixture, fixture_image, scrape_metrics, workspace_root,
};
use specllava_proto::v1 as pb;
use tonic::Code;

/// The target checkpoint (36 image tokens).
const TARGET: &str = "gqa_default_l-2_sharded";
/// A different draft with the same vocabulary (16 image tokens): random, so it is mostly rejected.
const OTHER_DRAFT: &str = "mha_default_l-2_untied";

/// The result of one generation.
#[derive(Debug, Clone, PartialEq)]
struct Output {
    tokens: Vec<u32>,
    text: String,
    summary: pb::GenerateSummary,
}

fn spec(
    mode: pb::SpeculationMode,
    depth: u32,
    branching: u32,
    budget: u32,
) -> pb::SpeculationConfig {
    pb::SpeculationConfig {
        mode: mode as i32,
        depth,
        branching,
        budget,
        disable_draft_ahead: false,
    }
}

fn off() -> pb::SpeculationConfig {
    spec(pb::SpeculationMode::Off, 0, 0, 0)
}

fn greedy(max_new_tokens: u32) -> pb::GenerationParams {
    pb::GenerationParams {
        max_new_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn sampled(max_new_tokens: u32, seed: u64) -> pb::GenerationParams {
    pb::GenerationParams {
        max_new_tokens,
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed,
        ignore_eos: true,
        ..Default::default()
    }
}

fn request(
    image: &str,
    prompt: &str,
    params: pb::GenerationParams,
    speculation: pb::SpeculationConfig,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: String::new(),
        image: fixture_image(image),
        prompt: prompt.into(),
        params: Some(params),
        speculation: Some(speculation),
    }
}

async fn generate(cluster: &Cluster, req: pb::GenerateRequest) -> Result<Output, tonic::Status> {
    let mut client = cluster.client().await;
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let mut summary = None;
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Chunk(c)) => {
                tokens.extend(c.token_ids);
                text.push_str(&c.text);
            }
            Some(pb::generate_response::Event::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    let summary = summary.expect("a final summary");
    assert_eq!(
        summary.text, text,
        "the summary text is the concatenated deltas"
    );
    Ok(Output {
        tokens,
        text,
        summary,
    })
}

fn stats(o: &Output) -> &pb::SpeculationStats {
    o.summary.stats.as_ref().expect("stats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_and_b_seeded_speculative_equal_target_only() {
    // Draft == target: every draft token is accepted (long accepted paths).
    let same = Cluster::start(ClusterConfig::new(TARGET, TARGET).wait_for_draft()).await;
    let base = generate(
        &same,
        request("red_square.png", "What is this?", greedy(40), off()),
    )
    .await
    .unwrap();
    assert_eq!(base.tokens.len(), 40);
    assert!(!stats(&base).speculative);
    for sp in [
        spec(pb::SpeculationMode::Dynamic, 5, 3, 12),
        spec(pb::SpeculationMode::Chain, 6, 0, 0),
        spec(pb::SpeculationMode::Static, 3, 2, 10),
        spec(pb::SpeculationMode::Dynamic, 0, 0, 0),
    ] {
        let out = generate(
            &same,
            request("red_square.png", "What is this?", greedy(40), sp),
        )
        .await
        .unwrap();
        assert_eq!(
            out.tokens, base.tokens,
            "greedy speculative ({sp:?}) must equal target-only"
        );
        assert_eq!(out.text, base.text);
        assert!(stats(&out).speculative);
    }
    let chain = generate(
        &same,
        request(
            "red_square.png",
            "What is this?",
            greedy(40),
            spec(pb::SpeculationMode::Chain, 6, 0, 0),
        ),
    )
    .await
    .unwrap();
    // Steps taken while the draft session is still syncing in the background
    // are target-only (one token, nothing drafted), so judge the drafted steps:
    // every drafted token is accepted, except where the last chain runs past
    // max_tokens (at most one chain, 6 tokens, is cut).
    let s = stats(&chain);
    assert!(s.drafted >= 12, "the draft took part: {s:?}");
    assert!(
        s.accepted + 6 >= s.drafted,
        "draft == target accepts whole chains: {s:?}"
    );
    assert_eq!(s.acceptance_per_depth.first().copied(), Some(1.0));

    // (b) seeded sampling: speculative == target-only, for several seeds.
    for seed in [1u64, 42] {
        let base = generate(
            &same,
            request("photo.jpg", "Describe it.", sampled(32, seed), off()),
        )
        .await
        .unwrap();
        let out = generate(
            &same,
            request(
                "photo.jpg",
                "Describe it.",
                sampled(32, seed),
                spec(pb::SpeculationMode::Dynamic, 4, 3, 10),
            ),
        )
        .await
        .unwrap();
        assert_eq!(
            out.tokens, base.tokens,
            "seeded sampling (seed {seed}) must match target-only"
        );
        assert!(stats(&out).accepted > 0);
    }
    drop(same);

    // A different (random) draft: mostly rejected, output still identical. Its set-up runs
    // its own vision tower (another fingerprint); the turn waits for it (bounded), so that
    // it drafts however loaded the machine running the tests is.
    let mut cfg = ClusterConfig::new(OTHER_DRAFT, TARGET);
    cfg.orchestrator_args
        .extend(["--draft-join-wait-ms".to_owned(), "5000".to_owned()]);
    let other = Cluster::start(cfg).await;
    let base = generate(
        &other,
        request("shapes.webp", "What shapes?", greedy(30), off()),
    )
    .await
    .unwrap();
    let out = generate(
        &other,
        request(
            "shapes.webp",
            "What shapes?",
            greedy(30),
            spec(pb::SpeculationMode::Dynamic, 4, 4, 16),
        ),
    )
    .await
    .unwrap();
    assert_eq!(out.tokens, base.tokens);
    assert!(
        stats(&out).drafted > stats(&out).accepted,
        "a random draft gets rejections"
    );
    let base_s = generate(
        &other,
        request("shapes.webp", "What shapes?", sampled(30, 7), off()),
    )
    .await
    .unwrap();
    let out_s = generate(
        &other,
        request(
            "shapes.webp",
            "What shapes?",
            sampled(30, 7),
            spec(pb::SpeculationMode::Chain, 3, 0, 0),
        ),
    )
    .await
    .unwrap();
    assert_eq!(out_s.tokens, base_s.tokens);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_concurrent_sessions_match_solo_runs() {
    // Steps wait for the draft's set-up: a loaded machine must not turn the speculative
    // requests into target-only ones (which would compare target-only with itself).
    let cluster = Cluster::start(ClusterConfig::new(OTHER_DRAFT, TARGET).wait_for_draft()).await;
    let reqs = vec![
        request(
            "red_square.png",
            "What is this?",
            greedy(24),
            spec(pb::SpeculationMode::Dynamic, 4, 3, 12),
        ),
        request(
            "photo.jpg",
            "Describe the photo.",
            greedy(24),
            spec(pb::SpeculationMode::Chain, 4, 0, 0),
        ),
        request(
            "shapes.webp",
            "Count the shapes.",
            sampled(24, 3),
            spec(pb::SpeculationMode::Dynamic, 3, 2, 8),
        ),
        request("tiny_gray.png", "What colour?", greedy(24), off()),
        request("photo.jpg", "Is it a cat?", sampled(24, 11), off()),
    ];
    let mut solo = Vec::new();
    for r in &reqs {
        solo.push(generate(&cluster, r.clone()).await.unwrap().tokens);
    }
    for _round in 0..2 {
        let together = join_all(reqs.iter().map(|r| generate(&cluster, r.clone()))).await;
        for (i, out) in together.into_iter().enumerate() {
            let out = out.unwrap();
            assert_eq!(out.tokens, solo[i], "request {i} changed when batched");
            let s = stats(&out);
            if i < 3 {
                // The speculative requests drafted, and the target accepted some drafts.
                assert!(
                    s.speculative && s.drafted > 0,
                    "request {i} speculated: {s:?}"
                );
            }
        }
    }
    // Straight to the target: concurrent verifies of different sessions share one forward.
    let target = cluster.target_client().await;
    let ids: Vec<String> = (0..4).map(|i| format!("batch-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let open = pb::OpenSessionRequest {
            session_id: id.clone(),
            images: vec![],
            token_ids: vec![1, 20 + i as u32, 30, 40],
            image_features: vec![],
            first_step: None,
            conversation_images: 0,
        };
        target.clone().open_session(open).await.unwrap();
    }
    let verify = |id: String| {
        let mut t = target.clone();
        async move {
            let req = pb::VerifyRequest {
                session_id: id,
                expected_kv_len: 3,
                tree: Some(pb::TokenTree {
                    tokens: vec![40, 50, 60],
                    parents: vec![-1, 0, 0],
                    scores: vec![],
                }),
                sampling: None,
                stop: None,
            };
            t.verify(req).await.unwrap().into_inner()
        }
    };
    let together = join_all(ids.iter().cloned().map(verify)).await;
    assert!(
        together.iter().any(|r| r.batch_size > 1),
        "no batching: {together:?}"
    );
    for (i, r) in together.iter().enumerate() {
        assert_eq!(r.kv_len, 3 + r.accepted_path.len() as u64, "session {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_cancelling_mid_stream_frees_both_sides() {
    let cluster = Cluster::start(ClusterConfig::new(OTHER_DRAFT, TARGET)).await;
    let mut client = cluster.client().await;
    let session = client
        .create_session(pb::CreateSessionRequest {
            image: fixture_image("photo.jpg"),
        })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let mut req = request(
        "photo.jpg",
        "Tell me a long story.",
        greedy(400),
        spec(pb::SpeculationMode::Dynamic, 3, 2, 6),
    );
    req.image.clear();
    req.session_id = session.clone();
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().expect("a first chunk");
    assert!(matches!(
        first.event,
        Some(pb::generate_response::Event::Chunk(_))
    ));
    assert!(
        cluster.target_has(&session).await,
        "the session is open on the target while generating"
    );
    assert!(
        cluster.draft_has(&session).await,
        "the session is open on the draft while generating"
    );
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if !cluster.target_has(&session).await && !cluster.draft_has(&session).await {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sessions not freed after cancellation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The service keeps working; the session continues (re-prefilled from its history).
    let out = generate(
        &cluster,
        request("red_square.png", "What is this?", greedy(8), off()),
    )
    .await
    .unwrap();
    assert_eq!(out.tokens.len(), 8);
    let mut next = request(
        "photo.jpg",
        "And then?",
        greedy(8),
        spec(pb::SpeculationMode::Chain, 3, 0, 0),
    );
    next.image.clear();
    next.session_id = session.clone();
    assert_eq!(generate(&cluster, next).await.unwrap().tokens.len(), 8);
    assert!(
        client
            .close_session(pb::CloseSessionRequest {
                session_id: session
            })
            .await
            .unwrap()
            .into_inner()
            .existed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_bad_inputs_get_the_right_status_and_others_keep_working() {
    let cluster = Cluster::start(ClusterConfig::new(OTHER_DRAFT, TARGET)).await;
    let good = request(
        "red_square.png",
        "What is this?",
        greedy(16),
        spec(pb::SpeculationMode::Dynamic, 3, 2, 8),
    );
    let before = generate(&cluster, good.clone()).await.unwrap();

    // A multi-turn session that lives through all the bad requests.
    let mut client = cluster.client().await;
    let session = client
        .create_session(pb::CreateSessionRequest {
            image: fixture_image("shapes.webp"),
        })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    let mut turn = request(
        "shapes.webp",
        "What shapes?",
        greedy(8),
        spec(pb::SpeculationMode::Chain, 3, 0, 0),
    );
    turn.image.clear();
    turn.session_id = session.clone();
    generate(&cluster, turn.clone()).await.unwrap();

    let code = |r: Result<Output, tonic::Status>| r.expect_err("must fail").code();
    let mut bad_image = good.clone();
    bad_image.image = bytes::Bytes::from_static(b"definitely not an image");
    assert_eq!(
        code(generate(&cluster, bad_image).await),
        Code::InvalidArgument
    );
    let mut bad_session_image = pb::CreateSessionRequest {
        image: vec![0x89, b'P', b'N', b'G', 0, 1, 2].into(),
    };
    assert_eq!(
        client
            .create_session(bad_session_image.clone())
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    bad_session_image.image.clear();
    let mut empty_prompt = good.clone();
    empty_prompt.prompt = "   ".into();
    assert_eq!(
        code(generate(&cluster, empty_prompt).await),
        Code::InvalidArgument
    );
    let mut unknown = good.clone();
    unknown.image.clear();
    unknown.session_id = "no-such-session".into();
    assert_eq!(code(generate(&cluster, unknown).await), Code::NotFound);
    let mut bad_temp = good.clone();
    bad_temp.params.as_mut().unwrap().temperature = -1.0;
    assert_eq!(
        code(generate(&cluster, bad_temp).await),
        Code::InvalidArgument
    );
    let mut bad_top_p = good.clone();
    bad_top_p.params.as_mut().unwrap().top_p = 1.5;
    assert_eq!(
        code(generate(&cluster, bad_top_p).await),
        Code::InvalidArgument
    );

    // Malformed trees sent straight to the target.
    let mut target = cluster.target_client().await;
    let tree = |tokens: Vec<u32>, parents: Vec<i32>| pb::VerifyRequest {
        session_id: session.clone(),
        expected_kv_len: 0,
        tree: Some(pb::TokenTree {
            tokens,
            parents,
            scores: vec![],
        }),
        sampling: None,
        stop: None,
    };
    for (name, req) in [
        ("parent out of range", tree(vec![1, 2, 3], vec![-1, 0, 7])),
        ("not topological", tree(vec![1, 2, 3], vec![-1, 2, 0])),
        ("two roots", tree(vec![1, 2], vec![-1, -1])),
        (
            "token outside the vocabulary",
            tree(vec![1, 100_000], vec![-1, 0]),
        ),
        ("length mismatch", tree(vec![1, 2], vec![-1])),
        ("empty", tree(vec![], vec![])),
    ] {
        let err = target.verify(req).await.expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
    }
    let deep: Vec<i32> = (-1..300).collect();
    let err = target.verify(tree(vec![5; 301], deep)).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "too deep / too many nodes"
    );
    // A stale expected_kv_len changes nothing.
    assert_eq!(
        target
            .verify(tree(vec![1], vec![-1]))
            .await
            .unwrap_err()
            .code(),
        Code::FailedPrecondition
    );
    let unknown_tree = pb::VerifyRequest {
        session_id: "nope".into(),
        ..tree(vec![1], vec![-1])
    };
    assert_eq!(
        target.verify(unknown_tree).await.unwrap_err().code(),
        Code::NotFound
    );

    // Everything else still works and gives the same answers.
    let after = generate(&cluster, good).await.unwrap();
    assert_eq!(after.tokens, before.tokens);
    let mut turn2 = turn.clone();
    turn2.prompt = "And the colours?".into();
    assert_eq!(generate(&cluster, turn2).await.unwrap().tokens.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_turn_sessions_reuse_kv_and_stay_lossless() {
    // Steps wait for the draft's set-up, so every speculative turn really drafts; the target's
    // metrics count its RPCs by method (KV reuse: a session opens once, later turns append).
    let cluster = Cluster::start(ClusterConfig {
        metrics: true,
        ..ClusterConfig::new(TARGET, TARGET).wait_for_draft()
    })
    .await;
    let mut client = cluster.client().await;
    let run = |sp: pb::SpeculationConfig| {
        let cluster = &cluster;
        async move {
            let mut client = cluster.client().await;
            let id = client
                .create_session(pb::CreateSessionRequest {
                    image: fixture_image("photo.jpg"),
                })
                .await
                .unwrap()
                .into_inner()
                .session_id;
            let mut outs = Vec::new();
            for (prompt, params) in [
                ("What is this?", greedy(12)),
                ("Tell me more.", sampled(12, 5)),
                (
                    "Anything else?",
                    pb::GenerationParams {
                        stop: vec!["w".into()],
                        ..greedy(12)
                    },
                ),
                ("Last question?", greedy(10)),
            ] {
                let req = pb::GenerateRequest {
                    session_id: id.clone(),
                    image: Default::default(),
                    prompt: prompt.into(),
                    params: Some(params),
                    speculation: Some(sp),
                };
                outs.push(generate(cluster, req).await.unwrap());
            }
            client
                .close_session(pb::CloseSessionRequest { session_id: id })
                .await
                .unwrap();
            outs
        }
    };
    let target_rpcs = |rpc: &'static str| {
        let cluster = &cluster;
        async move {
            let text = scrape_metrics(&cluster.target).await;
            let line = format!("specllava_requests_total{{rpc=\"{rpc}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .map_or(0.0, |v| v.trim().parse::<f64>().expect("a counter value"))
        }
    };
    let (opened, appended) = (
        target_rpcs("OpenSession").await,
        target_rpcs("Append").await,
    );
    let base = run(off()).await;
    // Four turns of one session: the target opened it once and appended the other turns to
    // its KV (no re-prefill of the history).
    assert_eq!(target_rpcs("OpenSession").await - opened, 1.0);
    assert_eq!(target_rpcs("Append").await - appended, 3.0);
    let spec_out = run(spec(pb::SpeculationMode::Dynamic, 4, 2, 8)).await;
    for (i, (b, s)) in base.iter().zip(&spec_out).enumerate() {
        assert_eq!(b.tokens, s.tokens, "turn {i}");
        assert_eq!(b.text, s.text, "turn {i}");
        assert!(stats(s).speculative, "turn {i} speculated: {:?}", stats(s));
    }
    // The draft is the target itself here: the turns drafted and had drafts accepted.
    let drafted: u32 = spec_out.iter().map(|o| stats(o).drafted).sum();
    let accepted: u32 = spec_out.iter().map(|o| stats(o).accepted).sum();
    assert!(
        drafted > 0 && accepted > 0,
        "{drafted} drafted, {accepted} accepted"
    );
    // The stop string cut the third turn short (and the history with it).
    assert_eq!(
        base[2].summary.finish,
        pb::FinishReason::StopString as i32,
        "turn 3 stops at \"w\": {:?}",
        base[2].text
    );
    assert!(!base[2].text.contains('w'));
    let id = client
        .create_session(pb::CreateSessionRequest {
            image: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .session_id;
    assert!(
        client
            .close_session(pb::CloseSessionRequest {
                session_id: id.clone()
            })
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(
        !client
            .close_session(pb::CloseSessionRequest { session_id: id })
            .await
            .unwrap()
            .into_inner()
            .existed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_draft_falls_back_to_target_only_and_limits_apply() {
    let dead = format!("127.0.0.1:{}", specllava_e2e::free_port());
    let cfg = ClusterConfig {
        draft_model: None,
        target_model: fixture(TARGET),
        draft_endpoints: Some(dead),
        orchestrator_args: vec![
            "--max-sessions".into(),
            "1".into(),
            "--max-prompt-tokens".into(),
            "200".into(),
        ],
        target_args: vec![],
        env: vec![],
        metrics: false,
        target_replicas: 1,
        draft_replicas: 1,
        tls: None,
    };
    let cluster = Cluster::start(cfg).await;
    let base = generate(
        &cluster,
        request("red_square.png", "What is this?", greedy(16), off()),
    )
    .await
    .unwrap();
    let out = generate(
        &cluster,
        request(
            "red_square.png",
            "What is this?",
            greedy(16),
            spec(pb::SpeculationMode::Dynamic, 4, 2, 8),
        ),
    )
    .await
    .unwrap();
    assert_eq!(out.tokens, base.tokens);
    assert!(!stats(&out).speculative, "no draft reachable: target-only");

    let mut client = cluster.client().await;
    client
        .create_session(pb::CreateSessionRequest {
            image: Default::default(),
        })
        .await
        .unwrap();
    let err = client
        .create_session(pb::CreateSessionRequest {
            image: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let long = "word ".repeat(400);
    let err = generate(&cluster, request("red_square.png", &long, greedy(4), off()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let mut cluster = Cluster::start(ClusterConfig::new(OTHER_DRAFT, TARGET)).await;
    generate(&cluster, request("red_square.png", "Hi?", greedy(4), off()))
        .await
        .unwrap();
    for svc in [&mut cluster.orchestrator, &mut cluster.target] {
        let st = svc.terminate().expect("exited");
        assert!(st.success(), "graceful shutdown exits 0: {st}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_generates() {
    let python = std::env::var("SPECLLAVA_PYTHON").unwrap_or_else(|_| "python3".into());
    // Steps wait for the draft's set-up: the client asserts that its speculative turn drafted.
    let cluster = Cluster::start(ClusterConfig::new(OTHER_DRAFT, TARGET).wait_for_draft()).await;
    let root = workspace_root();
    let status = tokio::process::Command::new(&python)
        .arg(root.join("tests/python/client_test.py"))
        .arg("--endpoint")
        .arg(&cluster.orchestrator.addr)
        .arg("--image")
        .arg(root.join("model/tests/fixtures/images/red_square.png"))
        .arg("--proto-root")
        .arg(root.join("proto"))
        .status()
        .await
        .expect("running the python client");
    assert!(status.success(), "python client failed");
}

/// The services listed by server reflection (what `grpcurl list` prints).
async fn reflected_services(url: String) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let msg = resp
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    match msg.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_health_and_measured_verify_cost() {
    let cluster = Cluster::start(ClusterConfig::new(OTHER_DRAFT, TARGET)).await;
    // The target measured its verify cost at start-up: a full batch-major grid of
    // (batch 1, 2, 4, 8, 16) x (nodes 1-6, 8, 12, 16, 32, 64), timed at a few points within
    // its time budget and filled in from them elsewhere (`target_service::calibration`).
    let info = cluster
        .target_client()
        .await
        .info(pb::InfoRequest {})
        .await
        .expect("Info")
        .into_inner();
    let grid: Vec<(u32, u32)> = info
        .verify_costs
        .iter()
        .map(|c| (c.batch, c.nodes))
        .collect();
    let expected: Vec<(u32, u32)> = [1, 2, 4, 8, 16]
        .into_iter()
        .flat_map(|b| {
            [1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64]
                .into_iter()
                .map(move |n| (b, n))
        })
        .collect();
    assert_eq!(grid, expected);
    assert!(
        info.verify_costs.iter().all(|c| c.forward_ns > 0),
        "{info:?}"
    );

    for (svc, name) in [
        (cluster.orchestrator.url(), "specllava.v1.Generation"),
        (cluster.draft.as_ref().unwrap().url(), "specllava.v1.Draft"),
        (cluster.target.url(), "specllava.v1.Target"),
    ] {
        let services = reflected_services(svc).await;
        assert!(
            services.iter().any(|s| s == name),
            "{name} missing from {services:?}"
        );
        assert!(
            services.iter().any(|s| s == "grpc.health.v1.Health"),
            "{services:?}"
        );
    }
}
