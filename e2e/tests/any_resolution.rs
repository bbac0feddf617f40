//! An any-resolution (LLaVA-NeXT) target served on real processes: the demo target made
//! LLaVA-NeXT (`specllava_model::anyres_checkpoint`, images tiled into up to two tiles plus the
//! base one), with (a) the LLaVA-1.5 demo draft, whose images are a fixed 16 tokens, and (b) the
//! demo draft made LLaVA-NeXT too. Speculative output equals target-only output, greedy and
//! seeded, for a square and a wide image; the prompt's usage counts each image as the tokens it
//! becomes on the target (78 for the 48 x 48 scene, 102 for the 451 x 300 photograph). The
//! demo target made LLaVA-OneVision, with the LLaVA-1.5 draft and a OneVision draft, over the
//! OpenAI API: an image tiled only as its conversation's only one, kept conversations that gain
//! or lose their second image prefilled anew, every answer equal to a fresh target-only one.
//! Images over `--max-image-tokens` are refused before any work.

use specllava_e2e::{Cluster, ClusterConfig, collect_generation, gen_params, workspace_root};
use specllava_model::anyres_checkpoint::{AnyResKind, anyres_checkpoint};
use specllava_proto::v1 as pb;

const PINPOINTS: &[(usize, usize)] = &[(48, 48), (48, 96), (96, 48)];

/// The LLaVA-NeXT variant of the demo pair's `model` (`target` or `draft`), in a temp dir.
fn next_variant(model: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = workspace_root().join("models").join(model);
    anyres_checkpoint(&src, dir.path(), AnyResKind::Next, PINPOINTS).unwrap();
    dir
}

fn speculation(mode: pb::SpeculationMode, depth: u32) -> pb::SpeculationConfig {
    pb::SpeculationConfig {
        mode: mode as i32,
        depth,
        ..Default::default()
    }
}

/// Greedy and seeded, adaptive and chain:4, both images: speculative == target-only; returns
/// the target-only prompt tokens of each image.
async fn speculative_equals_target_only(cluster: &Cluster, what: &str) -> Vec<u32> {
    let root = workspace_root();
    let images = [
        root.join("examples/test/test_00000.png"),
        root.join("examples/ood/chelsea.png"),
    ];
    let mut prompt_tokens = Vec::new();
    let (mut drafted, mut accepted) = (0u32, 0u32);
    for path in &images {
        let image = bytes::Bytes::from(std::fs::read(path).expect("example image"));
        for seed in [None, Some(7u64)] {
            let request = |sp: pb::SpeculationConfig| pb::GenerateRequest {
                session_id: String::new(),
                image: image.clone(),
                prompt: "Describe the image.".into(),
                params: Some(gen_params(20, seed)),
                speculation: Some(sp),
            };
            let mut client = cluster.client().await;
            let mut run = async |sp: pb::SpeculationConfig| {
                let stream = client.generate(request(sp)).await.expect("generate");
                collect_generation(stream.into_inner())
                    .await
                    .expect("a full answer")
            };
            let (base, summary) = run(speculation(pb::SpeculationMode::Off, 0)).await;
            if seed.is_none() {
                prompt_tokens.push(summary.usage.expect("usage").prompt_tokens);
            }
            for sp in [
                speculation(pb::SpeculationMode::Dynamic, 0),
                speculation(pb::SpeculationMode::Chain, 4),
            ] {
                let (out, summary) = run(sp).await;
                assert_eq!(
                    out,
                    base,
                    "{what}, {}, seed {seed:?}, {sp:?}: speculative == target-only",
                    path.display()
                );
                let stats = summary.stats.expect("stats");
                assert!(stats.speculative, "{what}, {sp:?}: {stats:?}");
                drafted += stats.drafted;
                accepted += stats.accepted;
            }
        }
    }
    assert!(
        drafted > 0,
        "{what}: the draft took part ({accepted} accepted)"
    );
    prompt_tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_next_target_speculates_losslessly_with_either_draft() {
    let models = workspace_root().join("models");
    let next_target = next_variant("target");
    let next_draft = next_variant("draft");

    for (what, draft) in [
        ("LLaVA-1.5 draft", models.join("draft")),
        ("LLaVA-NeXT draft", next_draft.path().to_path_buf()),
    ] {
        let cluster = Cluster::start(
            ClusterConfig::from_dirs(draft, next_target.path().to_path_buf()).wait_for_draft(),
        )
        .await;
        let info = cluster.target_model().await;
        assert!(info.any_resolution.is_some(), "{what}: {info:?}");
        let prompt_tokens = speculative_equals_target_only(&cluster, what).await;
        // The same text with a 48 x 48 image (one tile: 36 + 6 x 7 rows) and a 451 x 300 one
        // (two tiles, unpadded to 6 x 10: 36 + 6 x 11 rows).
        assert_eq!(
            prompt_tokens[1] - prompt_tokens[0],
            102 - 78,
            "{what}: usage counts each image's own tokens: {prompt_tokens:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_over_the_token_limit_is_refused_before_any_work() {
    let models = workspace_root().join("models");
    let next_target = next_variant("target");
    let mut cfg = ClusterConfig::from_dirs(models.join("draft"), next_target.path().to_path_buf());
    cfg.orchestrator_args.push("--max-image-tokens=90".into());
    cfg.target_args.push("--max-image-tokens=90".into());
    let cluster = Cluster::start(cfg).await;
    let root = workspace_root();
    let request = |path: &str| pb::GenerateRequest {
        image: std::fs::read(root.join(path)).unwrap().into(),
        prompt: "Describe the image.".into(),
        params: Some(gen_params(4, None)),
        ..Default::default()
    };
    let mut client = cluster.client().await;
    // The 48 x 48 scene is 78 tokens: served.
    let ok = client
        .generate(request("examples/test/test_00000.png"))
        .await;
    collect_generation(ok.expect("served").into_inner())
        .await
        .expect("a full answer");
    // The 451 x 300 photograph becomes 102: refused by the orchestrator, naming the limit.
    let err = client
        .generate(request("examples/ood/chelsea.png"))
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("102 tokens"), "{err:?}");
    // The target refuses it too when asked directly (before decoding it).
    let err = cluster
        .target_client()
        .await
        .open_session(pb::OpenSessionRequest {
            session_id: "over".into(),
            token_ids: vec![1, 4, 5],
            images: vec![
                std::fs::read(root.join("examples/ood/chelsea.png"))
                    .unwrap()
                    .into(),
            ],
            ..Default::default()
        })
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("102 tokens"), "{err:?}");
}

/// A LLaVA-OneVision variant of the demo target (`anyres_max_1`, so large grids are shrunk)
/// with `draft`, over the OpenAI API, serving HTTP at `http`.
async fn onevision_cluster(
    onevision: &std::path::Path,
    draft: &std::path::Path,
    http: &str,
    extra: &[&str],
) -> Cluster {
    let mut cfg = ClusterConfig::from_dirs(draft.to_path_buf(), onevision.to_path_buf());
    cfg.orchestrator_args = ["--http-listen", http]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    Cluster::start(cfg.wait_for_draft()).await
}

fn data_url(path: &str) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(workspace_root().join(path)).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:image/png;base64,{b64}")
}

/// A chat completion's token ids and usage.prompt_tokens.
fn complete(
    http: &str,
    messages: &serde_json::Value,
    mode: &str,
    seed: Option<u64>,
) -> (Vec<u64>, u64) {
    use std::io::Read as _;
    let mut body = serde_json::json!({
        "messages": messages,
        "max_tokens": 12,
        "temperature": if seed.is_some() { 0.8 } else { 0.0 },
        "ignore_eos": true,
        "return_token_ids": true,
        "speculation": {"mode": mode},
    });
    if let Some(seed) = seed {
        body["seed"] = seed.into();
    }
    let mut s = specllava_e2e::http_send(
        http,
        "POST",
        "/v1/chat/completions",
        None,
        body.to_string().as_bytes(),
    );
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, json) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{resp}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let ids = v["choices"][0]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("token ids: {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    (ids, v["usage"]["prompt_tokens"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_onevision_target_tiles_lone_images_only_and_stays_lossless_across_kept_conversations() {
    let models = workspace_root().join("models");
    let onevision = tempfile::tempdir().unwrap();
    let kind = AnyResKind::Onevision { max_tiles: 1 };
    let pinpoints = [(48, 48), (48, 96), (96, 48), (96, 96)];
    anyres_checkpoint(&models.join("target"), onevision.path(), kind, &pinpoints).unwrap();
    let onevision_draft = tempfile::tempdir().unwrap();
    anyres_checkpoint(
        &models.join("draft"),
        onevision_draft.path(),
        kind,
        &pinpoints,
    )
    .unwrap();
    let image =
        |path: &str| serde_json::json!({"type": "image_url", "image_url": {"url": data_url(path)}});
    let text = |t: &str| serde_json::json!({"type": "text", "text": t});
    // A: one image (tiled); B: A's conversation answered, then a second image (neither is
    // tiled once the conversation holds two).
    let a = serde_json::json!([
        {"role": "user", "content": [image("examples/ood/chelsea.png"), text("Describe the image.")]},
    ]);
    let b = |answer: &str| {
        serde_json::json!([
            {"role": "user", "content": [image("examples/ood/chelsea.png"), text("Describe the image.")]},
            {"role": "assistant", "content": answer},
            {"role": "user", "content": [image("examples/test/test_00000.png"), text("And this one?")]},
        ])
    };

    // Fresh: no conversation kept, every request prefilled from scratch; the LLaVA-1.5 draft.
    let http = format!("127.0.0.1:{}", specllava_e2e::free_port());
    let fresh = onevision_cluster(
        onevision.path(),
        &models.join("draft"),
        &http,
        &["--http-cached-conversations=0"],
    )
    .await;
    let mut want = Vec::new();
    for seed in [None, Some(11u64)] {
        let (a_ids, a_prompt) = complete(&http, &a, "off", seed);
        assert_eq!(
            complete(&http, &a, "dynamic", seed).0,
            a_ids,
            "A, seed {seed:?}"
        );
        let b_msgs = b("A red square.");
        let (b_ids, b_prompt) = complete(&http, &b_msgs, "off", seed);
        assert_eq!(
            complete(&http, &b_msgs, "dynamic", seed).0,
            b_ids,
            "B, seed {seed:?}"
        );
        want.push((a_ids, b_ids));
        assert!(b_prompt > a_prompt);
        // The same text with the 48 x 48 scene instead: usage differs by the images' rows as
        // the model counts them (and transformers: tests/parity_anyres.rs).
        let scene = serde_json::json!([
            {"role": "user", "content": [image("examples/test/test_00000.png"), text("Describe the image.")]},
        ]);
        let (_, scene_prompt) = complete(&http, &scene, "off", seed);
        let m =
            specllava_model::Llava::load(onevision.path(), &specllava_model::Device::Cpu).unwrap();
        let rows = |h, w| m.image_token_count((h, w), 1) as i64;
        // 68 rows (a 12 x 12 grid unpadded to 8 x 12, shrunk to 4 x 7) against 78 (6 x 6).
        assert_eq!(
            a_prompt as i64 - scene_prompt as i64,
            rows(300, 451) - rows(48, 48),
            "usage counts tiles"
        );
    }
    drop(fresh);

    // Kept, with a OneVision draft of the same family (it shares the target's vision tower,
    // so it prefills from the target's features, and tiles as the target does): A, then B
    // reusing A's conversation (its image must be re-prefilled untiled on both replicas), then
    // A again reusing B's (tiled again), then B again: each equals the fresh answer.
    // Then the same with the LLaVA-1.5 draft, whose images stay 36 rows each while the
    // target's change: each replica's kept rows are its own.
    for draft in [onevision_draft.path(), &models.join("draft")] {
        let http = format!("127.0.0.1:{}", specllava_e2e::free_port());
        let _kept = onevision_cluster(onevision.path(), draft, &http, &[]).await;
        for (seed, (a_ids, b_ids)) in [None, Some(11u64)].into_iter().zip(&want) {
            for round in 0..2 {
                for mode in ["dynamic", "off"] {
                    let what = format!("{}, {mode}, seed {seed:?}, round {round}", draft.display());
                    assert_eq!(&complete(&http, &a, mode, seed).0, a_ids, "A, {what}");
                    let b = complete(&http, &b("A red square."), mode, seed).0;
                    assert_eq!(&b, b_ids, "B, {what}");
                }
            }
        }
    }
}
