//! An any-resolution (LLaVA-NeXT) target served on real processes: the demo target made
//! LLaVA-NeXT (`specllava_model::next_checkpoint`, images tiled into up to two tiles plus the
//! base one), with (a) the LLaVA-1.5 demo draft, whose images are a fixed 16 tokens, and (b) the
//! demo draft made LLaVA-NeXT too. Speculative output equals target-only output, greedy and
//! seeded, for a square and a wide image; the prompt's usage counts each image as the tokens it
//! becomes on the target (78 for the 48 x 48 scene, 102 for the 451 x 300 photograph).

use specllava_e2e::{Cluster, ClusterConfig, collect_generation, gen_params, workspace_root};
use specllava_model::next_checkpoint::llava_next_checkpoint;
use specllava_proto::v1 as pb;

const PINPOINTS: &[(usize, usize)] = &[(48, 48), (48, 96), (96, 48)];

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
    let next_target = tempfile::tempdir().unwrap();
    llava_next_checkpoint(&models.join("target"), next_target.path(), PINPOINTS).unwrap();
    let next_draft = tempfile::tempdir().unwrap();
    llava_next_checkpoint(&models.join("draft"), next_draft.path(), PINPOINTS).unwrap();

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
    let next_target = tempfile::tempdir().unwrap();
    llava_next_checkpoint(&models.join("target"), next_target.path(), PINPOINTS).unwrap();
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
