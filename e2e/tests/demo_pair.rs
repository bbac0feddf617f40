//! The shipped demo pair (`models/target`, `models/draft`) on real processes: speculative
//! output equals target-only output, greedy and seeded, for an in-domain scene and a
//! photograph, in the adaptive and a chain mode, and the turns really speculated (drafts
//! proposed and accepted). The parity fixtures' random checkpoints cover every code path;
//! this covers the pair users run and the bench measures.

use specllava_e2e::{Cluster, ClusterConfig, collect_generation, gen_params, workspace_root};
use specllava_proto::v1 as pb;

fn demo_cluster_config() -> ClusterConfig {
    let models = workspace_root().join("models");
    // Speculative steps wait for the draft's set-up: a loaded machine must not turn the
    // speculative turns into target-only ones.
    ClusterConfig::from_dirs(models.join("draft"), models.join("target")).wait_for_draft()
}

fn speculation(mode: pb::SpeculationMode, depth: u32) -> pb::SpeculationConfig {
    pb::SpeculationConfig {
        mode: mode as i32,
        depth,
        branching: 0,
        budget: 0,
        disable_draft_ahead: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_pair_speculates_losslessly() {
    let cluster = Cluster::start(demo_cluster_config()).await;
    let root = workspace_root();
    let images = [
        ("in-domain scene", root.join("examples/test/test_00000.png")),
        ("photograph", root.join("examples/ood/chelsea.png")),
    ];
    let modes = [
        speculation(pb::SpeculationMode::Dynamic, 0),
        speculation(pb::SpeculationMode::Chain, 4),
    ];
    let (mut drafted, mut accepted) = (0u32, 0u32);
    for (what, path) in &images {
        let image = bytes::Bytes::from(std::fs::read(path).expect("example image"));
        for seed in [None, Some(7u64)] {
            // Greedy, or seeded sampling at T = 0.8, top-p 0.95 (`gen_params`).
            let params = gen_params(24, seed);
            let request = |sp: pb::SpeculationConfig| pb::GenerateRequest {
                session_id: String::new(),
                image: image.clone(),
                prompt: "Describe the image.".into(),
                params: Some(params.clone()),
                speculation: Some(sp),
            };
            let mut client = cluster.client().await;
            let mut run = async |sp: pb::SpeculationConfig| {
                let stream = client.generate(request(sp)).await.expect("generate");
                collect_generation(stream.into_inner())
                    .await
                    .expect("a full answer")
            };
            let base = run(speculation(pb::SpeculationMode::Off, 0)).await;
            for sp in modes {
                let out = run(sp).await;
                assert_eq!(
                    out.0, base.0,
                    "{what}, seed {seed:?}, {sp:?}: speculative == target-only"
                );
                let stats = out.1.stats.expect("stats");
                assert!(stats.speculative, "{what}, {sp:?}: {stats:?}");
                drafted += stats.drafted;
                accepted += stats.accepted;
            }
        }
    }
    assert!(
        drafted > 0 && accepted > 0,
        "the draft took part: {drafted} drafted, {accepted} accepted"
    );
}
