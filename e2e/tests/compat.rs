//! A mismatched deployment is refused at start-up instead of producing garbage: the
//! orchestrator compares its tokenizer, the target's and the draft's `Info`.

use std::time::Duration;

use specllava_e2e::{
    Cluster, ClusterConfig, Service, fixture, fixture_image, scrape_metrics, wait_healthy,
};
use specllava_proto::v1 as pb;

/// The target checkpoint (vocabulary 400).
const TARGET: &str = "gqa_default_l-2_sharded";
/// A draft with the same vocabulary.
const DRAFT: &str = "mha_default_l-2_untied";
/// A checkpoint whose model has 416 vocabulary rows.
const WIDE_VOCAB: &str = "legacy_layout";

fn model_args(name: &str) -> Vec<String> {
    vec![
        "--model-dir".into(),
        fixture(name).to_string_lossy().into_owned(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_info_describes_the_model() {
    let cluster = Cluster::start(ClusterConfig::new(DRAFT, TARGET)).await;
    let draft = cluster
        .draft_client()
        .await
        .info(pb::InfoRequest {})
        .await
        .expect("Draft.Info")
        .into_inner();
    let target = cluster
        .target_client()
        .await
        .info(pb::InfoRequest {})
        .await
        .expect("Target.Info")
        .into_inner();
    let (d, t) = (draft.model.unwrap(), target.model.unwrap());
    assert_eq!(
        (d.vocab_size, d.image_token_id),
        (t.vocab_size, t.image_token_id)
    );
    assert_eq!(d.eos_token_ids, t.eos_token_ids);
    assert!(!d.tokenizer_fingerprint.is_empty());
    assert_eq!(
        d.tokenizer_fingerprint, t.tokenizer_fingerprint,
        "one tokenizer"
    );
    assert!(draft.max_depth > 0 && draft.max_budget > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_draft_fails_start_up_with_a_clear_error() {
    let mut target = Service::start("specllava-target", &model_args(TARGET));
    let mut draft = Service::start("specllava-draft", &model_args(WIDE_VOCAB));
    wait_healthy(&mut target, Duration::from_secs(120)).await;
    wait_healthy(&mut draft, Duration::from_secs(120)).await;
    let log = std::env::temp_dir().join(format!("specllava-compat-{}.log", std::process::id()));
    let mut args = model_args(TARGET);
    args.extend([
        "--target-endpoints".into(),
        target.addr.clone(),
        "--draft-endpoints".into(),
        draft.addr.clone(),
    ]);
    let env = [("SPECLLAVA_E2E_LOG".to_owned(), "info".to_owned())];
    let mut orch = Service::start_logged("specllava-orchestrator", &args, &env, &log);
    let status = orch
        .process
        .wait_exit(Duration::from_secs(60))
        .expect("the orchestrator refuses to start");
    assert!(!status.success(), "{status}");
    let text = std::fs::read_to_string(&log).expect("the orchestrator's log");
    let _ = std::fs::remove_file(&log);
    assert!(
        text.contains("vocabulary mismatch: draft=416, target=400"),
        "{text}"
    );
    assert!(text.contains("no compatible draft replica"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_draft_among_good_ones_is_refused_and_counted() {
    let mut bad = Service::start("specllava-draft", &model_args(WIDE_VOCAB));
    let mut good = Service::start("specllava-draft", &model_args(DRAFT));
    wait_healthy(&mut bad, Duration::from_secs(120)).await;
    wait_healthy(&mut good, Duration::from_secs(120)).await;
    let mut cfg = ClusterConfig::new(DRAFT, TARGET).wait_for_draft();
    cfg.metrics = true;
    cfg.draft_model = None;
    cfg.draft_endpoints = Some(format!("{},{}", bad.addr, good.addr));
    let cluster = Cluster::start(cfg).await;
    let metrics = scrape_metrics(&cluster.orchestrator).await;
    assert!(
        metrics.contains("specllava_replicas_refused_total{kind=\"draft\"} 1"),
        "{metrics}"
    );
    // Generation still speculates, with the good draft, and stays lossless.
    let mut outputs = Vec::new();
    for mode in [pb::SpeculationMode::Chain, pb::SpeculationMode::Off] {
        let mut client = cluster.client().await;
        let mut stream = client
            .generate(pb::GenerateRequest {
                session_id: String::new(),
                image: fixture_image("red_square.png"),
                prompt: "What is this?".into(),
                params: Some(pb::GenerationParams {
                    max_new_tokens: 12,
                    ignore_eos: true,
                    ..Default::default()
                }),
                speculation: Some(pb::SpeculationConfig {
                    mode: mode as i32,
                    depth: 3,
                    ..Default::default()
                }),
            })
            .await
            .expect("Generate")
            .into_inner();
        let (mut tokens, mut speculative) = (Vec::new(), None);
        while let Some(msg) = stream.message().await.expect("stream") {
            match msg.event.unwrap() {
                pb::generate_response::Event::Chunk(c) => tokens.extend(c.token_ids),
                pb::generate_response::Event::Summary(s) => {
                    speculative = Some(s.stats.unwrap().speculative)
                }
            }
        }
        outputs.push((tokens, speculative));
    }
    assert_eq!(outputs[0].1, Some(true), "the good draft is used");
    assert_eq!(outputs[0].0, outputs[1].0, "speculative == target-only");
}
