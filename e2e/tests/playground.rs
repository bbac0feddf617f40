//! The web playground (issue #30) in a real browser: headless Chromium (Debian's `chromium` and
//! `chromedriver`, driven by Selenium from `tests/python/playground_test.py`) against the real
//! services on the demo pair, with bearer tokens on: an image uploaded, a prompt sent, the
//! answer equal to the gRPC API's for the same request, the step trees drawn, the target-only
//! comparison measured, a screenshot saved to `target/playground.png`. Skipped, saying why,
//! where no Chromium (or Selenium) is installed.

use std::path::Path;

use specllava_e2e::{Cluster, ClusterConfig, collect_generation, free_port, workspace_root};
use specllava_proto::v1 as pb;

const API_KEY: &str = "playground-key";
const PROMPT: &str = "Describe the image.";
const MAX_TOKENS: u32 = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_playground_answers_as_the_grpc_api_and_draws_the_trees() {
    let python = std::env::var("SPECLLAVA_PYTHON").unwrap_or_else(|_| "python3".into());
    let (chromium, driver) = (
        Path::new("/usr/bin/chromium"),
        Path::new("/usr/bin/chromedriver"),
    );
    let selenium = std::process::Command::new(&python)
        .args(["-c", "import selenium"])
        .status()
        .is_ok_and(|s| s.success());
    if !(chromium.exists() && driver.exists() && selenium) {
        eprintln!(
            "SKIPPED: the playground's browser test needs Debian's chromium and chromium-driver \
             (/usr/bin/chromium, /usr/bin/chromedriver) and Python's selenium; scripts/test \
             installs them where it can (root, apt)"
        );
        return;
    }
    let root = workspace_root();
    let http = format!("127.0.0.1:{}", free_port());
    let mut cfg = ClusterConfig::new("mha_default_l-2_untied", "gqa_default_l-2_sharded");
    cfg.draft_model = Some(root.join("models/draft"));
    cfg.target_model = root.join("models/target");
    cfg.target_args = vec!["--calibrate".into(), "false".into()];
    cfg.orchestrator_args = ["--http-listen", &http, "--api-keys", API_KEY]
        .map(String::from)
        .to_vec();
    let cluster = Cluster::start(cfg).await;

    // The gRPC API's answer to the same request (greedy, adaptive speculation).
    let image_path = root.join("examples/test/test_00000.png");
    let image = std::fs::read(&image_path).expect("the example image");
    let mut req = tonic::Request::new(pb::GenerateRequest {
        session_id: String::new(),
        image: image.into(),
        prompt: PROMPT.into(),
        params: Some(pb::GenerationParams {
            max_new_tokens: MAX_TOKENS,
            ..Default::default()
        }),
        speculation: Some(pb::SpeculationConfig {
            mode: pb::SpeculationMode::Adaptive as i32,
            ..Default::default()
        }),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {API_KEY}").parse().unwrap(),
    );
    let stream = cluster
        .client()
        .await
        .generate(req)
        .await
        .unwrap()
        .into_inner();
    let expected = collect_generation(stream).await.unwrap().1.text;

    let screenshot = root.join("target/playground.png");
    let status = tokio::process::Command::new(&python)
        .arg(root.join("tests/python/playground_test.py"))
        .arg("--url")
        .arg(format!("http://{http}/"))
        .arg("--image")
        .arg(&image_path)
        .arg("--prompt")
        .arg(PROMPT)
        .arg("--max-tokens")
        .arg(MAX_TOKENS.to_string())
        .arg("--expected")
        .arg(&expected)
        .arg("--api-key")
        .arg(API_KEY)
        .arg("--screenshot")
        .arg(&screenshot)
        .status()
        .await
        .expect("running the playground test");
    assert!(status.success(), "the playground test failed");
}
