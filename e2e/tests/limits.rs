//! End-to-end tests of issue #16's limits and containment over real processes: limits are
//! checked before any work (prompt bytes before tokenizing, context before a prefill, image
//! dimensions before decoding), malformed or unknown input gets a clear error status, a
//! panic in a batch fails only its own request, and health tells the truth.
//!
//! Timing is asserted only with generous bounds: these tests run on a loaded 2-core machine.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use specllava_e2e::{Cluster, ClusterConfig, collect_generation, fixture_image, free_port};
use specllava_harness::png::png_header_only;
use specllava_proto::v1 as pb;
use tonic::Code;

/// The fixture target: 512 positions, vocabulary 400.
const TARGET: &str = "gqa_default_l-2_sharded";
/// A draft sharing the target's vocabulary.
const DRAFT: &str = "mha_default_l-2_untied";
/// The fixtures' context.
const CONTEXT: usize = 512;

/// Draft + target (no start-up calibration) and the orchestrator with `orchestrator_args`.
fn config(orchestrator_args: &[&str]) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(DRAFT, TARGET);
    cfg.target_args = vec!["--calibrate".into(), "false".into()];
    cfg.orchestrator_args = orchestrator_args.iter().map(|s| s.to_string()).collect();
    cfg
}

fn greedy(max_new_tokens: u32) -> pb::GenerationParams {
    pb::GenerationParams {
        max_new_tokens,
        ignore_eos: true,
        ..Default::default()
    }
}

fn one_shot(prompt: &str, params: pb::GenerationParams, mode: i32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: String::new(),
        image: fixture_image("red_square.png"),
        prompt: prompt.into(),
        params: Some(params),
        speculation: Some(pb::SpeculationConfig {
            mode,
            ..Default::default()
        }),
    }
}

/// Runs a generation to its end: the generated tokens and the summary.
async fn generate(
    cluster: &Cluster,
    req: pb::GenerateRequest,
) -> Result<(Vec<u32>, pb::GenerateSummary), tonic::Status> {
    collect_generation(cluster.client().await.generate(req).await?.into_inner()).await
}

/// `POST path` with a JSON body over HTTP/1.1: the status and the JSON body.
fn post_json(addr: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).expect("connect the HTTP API");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let resp = String::from_utf8_lossy(&resp);
    let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// A target session holding `tokens` (all but the last prefilled).
async fn open_target(cluster: &Cluster, id: &str, tokens: Vec<u32>) -> u64 {
    cluster
        .target_client()
        .await
        .open_session(pb::OpenSessionRequest {
            session_id: id.into(),
            images: vec![],
            token_ids: tokens,
            image_features: vec![],
            first_step: None,
            conversation_images: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .kv_len
}

/// A root-only greedy Verify of `root` at `kv_len`, without a token limit.
fn verify_root(id: &str, kv_len: u64, root: u32) -> pb::VerifyRequest {
    pb::VerifyRequest {
        session_id: id.into(),
        expected_kv_len: kv_len,
        tree: Some(pb::TokenTree {
            tokens: vec![root],
            parents: vec![-1],
            scores: vec![],
        }),
        sampling: None,
        stop: Some(pb::StopConditions {
            eos_token_ids: vec![],
            max_new_tokens: 0,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_input_is_refused_before_any_work_and_others_keep_serving() {
    let http = format!("127.0.0.1:{}", free_port());
    let cluster = Cluster::start(config(&["--http-listen", &http])).await;
    let good = one_shot("What is this?", greedy(8), 0);
    let before = generate(&cluster, good.clone()).await.unwrap().0;

    // A 4 MB prompt: refused on its size, before tokenizing (which took seconds and GBs).
    let huge = "word ".repeat(800_000);
    let started = Instant::now();
    let err = generate(&cluster, one_shot(&huge, greedy(8), 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("bytes"), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused fast: {:?}",
        started.elapsed()
    );
    // The same through the OpenAI API: 413 in the OpenAI error shape.
    let body = json!({"messages": [{"role": "user", "content": huge}], "max_tokens": 4});
    let (status, body) = post_json(&http, "/v1/chat/completions", body.to_string().as_bytes());
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("bytes"),
        "{body}"
    );

    // An image whose header claims 100000 x 16 pixels (and holds none): refused on the
    // header, by the orchestrator and by the replicas alike.
    let bomb = bytes::Bytes::from(png_header_only(100_000, 16));
    let mut req = good.clone();
    req.image = bomb.clone();
    let err = generate(&cluster, req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("a side"), "{err:?}");
    let err = cluster
        .client()
        .await
        .create_session(pb::CreateSessionRequest {
            image: png_header_only(6300, 6300).into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("pixels"), "{err:?}");
    let image_id = cluster.target_model().await.image_token_id;
    let open = |id: &str| pb::OpenSessionRequest {
        session_id: id.into(),
        images: vec![bomb.clone()],
        token_ids: vec![1, image_id, 5],
        image_features: vec![],
        first_step: None,
        conversation_images: 0,
    };
    let err = cluster
        .target_client()
        .await
        .open_session(open("bomb-t"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("a side"), "{err:?}");
    let err = cluster
        .draft_client()
        .await
        .open_session(open("bomb-d"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // EncodeImages: the same image, and more images than the context holds, refused before
    // any work; so are features of the wrong shape sent in place of an image.
    let encode = |images: Vec<bytes::Bytes>| pb::EncodeImagesRequest { images };
    let err = cluster
        .target_client()
        .await
        .encode_images(encode(vec![bomb.clone()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("a side"), "{err:?}");
    let err = cluster
        .target_client()
        .await
        .encode_images(encode(vec![bomb.clone(); CONTEXT + 1]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Over the per-request image limit (8 by default), which is below what the context holds.
    assert!(err.message().contains("limit"), "{err:?}");
    let wrong = pb::VisionFeatures {
        rows: 3,
        dim: 2,
        data: vec![0u8; 24].into(),
        image_height: 8,
        image_width: 8,
    };
    let err = cluster
        .draft_client()
        .await
        .open_session(pb::OpenSessionRequest {
            session_id: "wrong-features".into(),
            images: vec![],
            token_ids: vec![1, image_id, 5],
            image_features: vec![wrong],
            first_step: None,
            conversation_images: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("image_features"), "{err:?}");

    // Others were served all along, with the same answer.
    assert_eq!(generate(&cluster, good).await.unwrap().0, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_enums_and_malformed_streams_get_error_statuses() {
    let cluster = Cluster::start(config(&[])).await;
    // An unknown speculation mode is refused, naming the field.
    let err = generate(&cluster, one_shot("Hi?", greedy(4), 99))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("speculation.mode"), "{err:?}");

    // The draft's tree mode too.
    let mut draft = cluster.draft_client().await;
    draft
        .open_session(pb::OpenSessionRequest {
            session_id: "s".into(),
            images: vec![],
            token_ids: vec![1, 2, 3],
            image_features: vec![],
            first_step: None,
            conversation_images: 0,
        })
        .await
        .unwrap();
    let req = pb::SpeculateRequest {
        session_id: "s".into(),
        new_tokens: vec![],
        accepted_path: vec![],
        params: Some(pb::DraftParams {
            mode: 42,
            depth: 2,
            branching: 2,
            budget: 4,
        }),
        draft_ahead: false,
        answer_ahead: false,
    };
    let mut trees = draft
        .speculate(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let err = trees.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("params.mode"), "{err:?}");

    // A Speculate stream of bytes that are not a protobuf message ends with an error
    // status (it ended with OK and no message).
    let channel = tonic::transport::Endpoint::from_shared(cluster.draft.as_ref().unwrap().url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/specllava.v1.Draft/Speculate");
    let garbage = vec![0xff_u8; 24];
    let result = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![garbage])),
            path,
            raw::RawCodec,
        )
        .await;
    let status = match result {
        Err(status) => status,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("the stream ended with OK"),
                    Err(status) => break status,
                }
            }
        }
    };
    assert!(
        matches!(status.code(), Code::Internal | Code::InvalidArgument),
        "{status:?}"
    );

    // The draft still serves that session.
    assert!(cluster.draft_has("s").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_count_as_their_tokens_against_the_context_before_any_work() {
    let http = format!("127.0.0.1:{}", free_port());
    let mut cfg = config(&["--http-listen", &http]);
    // More images a request than the context holds (36 rows each, 512 rows).
    cfg.env = vec![("SPECLLAVA_MAX_IMAGES".into(), "64".into())];
    let cluster = Cluster::start(cfg).await;
    let target_model = cluster.target_model().await;
    let draft_model = cluster
        .draft_client()
        .await
        .info(pb::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .model
        .unwrap();
    // Images a request that overflow the model's context (the two towers may differ).
    let over_context = |m: &pb::ModelInfo| m.max_context as usize / m.num_image_tokens as usize + 1;
    let open = |m: &pb::ModelInfo, n: usize| pb::OpenSessionRequest {
        session_id: format!("images-{n}"),
        // Not images at all: a refusal about the context, not about the bytes, shows that the
        // rows were counted before any image was decoded.
        images: vec![bytes::Bytes::from_static(b"not an image"); n],
        token_ids: std::iter::repeat_n(m.image_token_id, n)
            .chain([1])
            .collect(),
        image_features: vec![],
        first_step: None,
        conversation_images: 0,
    };
    for (m, is_target) in [(&target_model, true), (&draft_model, false)] {
        for (n, why) in [(over_context(m), "context"), (65, "limit")] {
            let err = if is_target {
                cluster.target_client().await.open_session(open(m, n)).await
            } else {
                cluster.draft_client().await.open_session(open(m, n)).await
            }
            .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{n} images: {err:?}");
            assert!(err.message().contains(why), "{n} images: {err:?}");
        }
    }
    let over = over_context(&target_model);

    // Over HTTP: a clear 400 naming the positions (or the limit), no replica's message.
    let data_url = {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(fixture_image("red_square.png"));
        format!("data:image/png;base64,{b64}")
    };
    let chat = |n: usize| {
        let mut content = vec![json!({"type": "image_url", "image_url": {"url": data_url}}); n];
        content.push(json!({"type": "text", "text": "What are these?"}));
        serde_json::to_vec(&json!({
            "messages": [{"role": "user", "content": content}], "max_tokens": 4,
        }))
        .unwrap()
    };
    for (n, why) in [(over, "positions"), (65, "limit")] {
        let (status, body) = post_json(&http, "/v1/chat/completions", &chat(n));
        assert_eq!(status, 400, "{n} images: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{n} images: {message}");
        assert!(!message.contains("127.0.0.1"), "{message}");
    }
    // As many as fit are served.
    let (status, body) = post_json(&http, "/v1/chat/completions", &chat(2));
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_limits_refuse_appends_and_end_decoding_normally() {
    // A server default larger than the whole context.
    let cluster = Cluster::start(config(&["--default-max-new-tokens", "2000"])).await;

    // Append past the context: refused before any forward, on both services; the
    // sessions are unchanged and usable, and other sessions are served meanwhile.
    let kv = open_target(&cluster, "t", vec![1, 2, 3]).await;
    open_target(&cluster, "other", vec![1, 2, 3]).await;
    let mut target = cluster.target_client().await;
    let long = vec![7_u32; 4000];
    let started = Instant::now();
    let err = target
        .append(pb::AppendRequest {
            session_id: "t".into(),
            keep_kv_len: kv,
            token_ids: long.clone(),
            images: vec![],
            image_features: vec![],
            first_step: None,
            conversation_images: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("context"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let resp = target.verify(verify_root("t", kv, 3)).await.unwrap();
    assert_eq!(resp.into_inner().kv_len, kv + 1, "the session still works");
    target.verify(verify_root("other", kv, 3)).await.unwrap();
    // An append up to the context still runs.
    let fits = target
        .append(pb::AppendRequest {
            session_id: "other".into(),
            keep_kv_len: 0,
            token_ids: vec![7; CONTEXT],
            images: vec![],
            image_features: vec![],
            first_step: None,
            conversation_images: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fits.kv_len, CONTEXT as u64 - 1);

    let mut draft = cluster.draft_client().await;
    draft
        .open_session(pb::OpenSessionRequest {
            session_id: "d".into(),
            images: vec![],
            token_ids: vec![1, 2, 3],
            image_features: vec![],
            first_step: None,
            conversation_images: 0,
        })
        .await
        .unwrap();
    let err = draft
        .append(pb::AppendRequest {
            session_id: "d".into(),
            keep_kv_len: 2,
            token_ids: long,
            images: vec![],
            image_features: vec![],
            first_step: None,
            conversation_images: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("context"), "{err:?}");
    assert!(cluster.draft_has("d").await);
    // An unknown session is still NOT_FOUND, whatever the length.
    assert!(!cluster.draft_has("no-such-session").await);

    // Decoding "without a limit" on the target ends with finish LENGTH once the context is
    // full, never with an error.
    let mut kv = open_target(&cluster, "full", vec![5; CONTEXT - 3]).await;
    let mut root = 5;
    let mut finish = pb::FinishReason::Unspecified;
    for _ in 0..8 {
        let r = target
            .verify(verify_root("full", kv, root))
            .await
            .unwrap()
            .into_inner();
        kv = r.kv_len;
        if let Some(&last) = r.emitted.last() {
            root = last;
        }
        finish = r.finish();
        if finish != pb::FinishReason::Unspecified {
            assert!(r.emitted.is_empty() || kv == CONTEXT as u64, "{r:?}");
            break;
        }
    }
    assert_eq!(finish, pb::FinishReason::Length);
    assert_eq!(kv, CONTEXT as u64);

    // Generate with max_new_tokens 0: the server default, bounded by the context, ends
    // normally with finish reason LENGTH.
    for mode in [0, pb::SpeculationMode::Off as i32] {
        let (tokens, summary) = generate(&cluster, one_shot("Describe it.", greedy(0), mode))
            .await
            .unwrap();
        assert_eq!(summary.finish(), pb::FinishReason::Length);
        let prompt = summary.usage.unwrap().prompt_tokens as usize;
        assert!(
            !tokens.is_empty() && tokens.len() < CONTEXT && tokens.len() + prompt <= CONTEXT + 64,
            "{} tokens after a prompt of {prompt}",
            tokens.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_batch_fails_only_its_request_and_health_stays_serving() {
    // The target panics verifying a tree that drafts token 399 (test-only fault injection;
    // a root-only tree, as target-only decoding sends, never triggers it).
    let mut cfg = config(&[]);
    cfg.env = vec![("SPECLLAVA_FAULT_INJECT".into(), "panic-on-token:399".into())];
    let cluster = Cluster::start(cfg).await;
    let mut target = cluster.target_client().await;
    let kv = open_target(&cluster, "poisoned", vec![1, 2, 3]).await;
    open_target(&cluster, "healthy", vec![1, 2, 3]).await;

    let mut poisoned = verify_root("poisoned", kv, 3);
    poisoned.tree = Some(pb::TokenTree {
        tokens: vec![3, 399],
        parents: vec![-1, 0],
        scores: vec![],
    });
    let err = target.verify(poisoned).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(err.message().contains("panicked"), "{err:?}");
    // Its session is gone (its KV may be half-written); the other one is served.
    assert!(!cluster.target_has("poisoned").await);
    target.verify(verify_root("healthy", kv, 3)).await.unwrap();
    open_target(&cluster, "new", vec![1, 2]).await;

    // The worker lives on: health still says SERVING, for the server and the service.
    let channel = tonic::transport::Endpoint::from_shared(cluster.target.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "specllava.v1.Target"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    // And target-only generation through the orchestrator works.
    let (tokens, _) = generate(
        &cluster,
        one_shot("What is this?", greedy(4), pb::SpeculationMode::Off as i32),
    )
    .await
    .unwrap();
    assert_eq!(tokens.len(), 4);
}

/// A codec sending and receiving raw bytes, to put bytes that are not a protobuf message
/// on the wire.
mod raw {
    use bytes::{Buf, BufMut};
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> Self::Encoder {
            RawCodec
        }
        fn decoder(&mut self) -> Self::Decoder {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let mut out = vec![0; src.remaining()];
            src.copy_to_slice(&mut out);
            Ok(Some(out))
        }
    }
}
