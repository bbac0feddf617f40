//! Draft-ahead over real gRPC (issue #12): the draft pre-drafts the next tree while the
//! target verifies; hits and forced misses (a draft that disagrees with the target), greedy
//! and seeded sampling, concurrency and a draft killed mid-pre-draft all give exactly the
//! target-only output; the draft service alone pre-drafts in spare time for clients that do
//! not pipeline. The other e2e suites run with draft-ahead on too (it is the default).

use futures::future::join_all;
use specllava_e2e::{Cluster, ClusterConfig, fixture_image, gen_params as params};
use specllava_proto::v1 as pb;

/// The target checkpoint.
const TARGET: &str = "gqa_default_l-2_sharded";
/// A random draft with the same vocabulary: its guesses mostly miss.
const OTHER_DRAFT: &str = "mha_default_l-2_untied";

fn spec(mode: pb::SpeculationMode, depth: u32, ahead: bool) -> pb::SpeculationConfig {
    pb::SpeculationConfig {
        mode: mode as i32,
        depth,
        branching: if mode == pb::SpeculationMode::Dynamic {
            3
        } else {
            0
        },
        budget: if mode == pb::SpeculationMode::Dynamic {
            10
        } else {
            0
        },
        disable_draft_ahead: !ahead,
    }
}

fn request(
    prompt: &str,
    params: pb::GenerationParams,
    speculation: Option<pb::SpeculationConfig>,
) -> pb::GenerateRequest {
    pb::GenerateRequest {
        session_id: String::new(),
        image: fixture_image("photo.jpg"),
        prompt: prompt.into(),
        params: Some(params),
        speculation: Some(speculation.unwrap_or(pb::SpeculationConfig {
            mode: pb::SpeculationMode::Off as i32,
            ..Default::default()
        })),
    }
}

/// Runs a request to the end: its tokens and statistics. `on_chunk` runs after each chunk.
async fn run(
    cluster: &Cluster,
    req: pb::GenerateRequest,
    mut on_chunk: impl FnMut(usize),
) -> (Vec<u32>, pb::SpeculationStats) {
    let mut client = cluster.client().await;
    let mut stream = client.generate(req).await.unwrap().into_inner();
    let (mut tokens, mut stats) = (Vec::new(), None);
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.event {
            Some(pb::generate_response::Event::Chunk(c)) => {
                tokens.extend(c.token_ids);
                on_chunk(tokens.len());
            }
            Some(pb::generate_response::Event::Summary(s)) => stats = s.stats,
            None => {}
        }
    }
    (tokens, stats.expect("a summary with statistics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_and_forced_misses_equal_target_only() {
    // Draft == target: the guessed outcome (best path accepted, then the draft's top
    // token) is right for greedy decoding.
    let same = Cluster::start(ClusterConfig::new(TARGET, TARGET).wait_for_draft()).await;
    for seed in [None, Some(5u64)] {
        let base = run(
            &same,
            request("Describe it.", params(48, seed), None),
            |_| {},
        )
        .await;
        for mode in [pb::SpeculationMode::Dynamic, pb::SpeculationMode::Chain] {
            let on = spec(mode, 4, true);
            let (tokens, s) = run(
                &same,
                request("Describe it.", params(48, seed), Some(on)),
                |_| {},
            )
            .await;
            assert_eq!(
                tokens, base.0,
                "draft-ahead ({mode:?}, seed {seed:?}) changed the output"
            );
            assert!(s.speculative);
            if seed.is_none() {
                assert!(s.ahead_hits > 0, "greedy self-draft guesses hit: {s:?}");
                assert!(s.ahead_saved_ns > 0, "hits save drafting time: {s:?}");
                assert!(
                    s.pipelined_steps > 0,
                    "pre-drafts made while the target verified were used: {s:?}"
                );
            }
            let off = spec(mode, 4, false);
            let (tokens, s) = run(
                &same,
                request("Describe it.", params(48, seed), Some(off)),
                |_| {},
            )
            .await;
            assert_eq!(tokens, base.0);
            assert_eq!(
                (s.ahead_hits, s.ahead_misses, s.pipelined_steps),
                (0, 0, 0),
                "off means off: {s:?}"
            );
        }
    }
    drop(same);

    // A random draft: its guesses miss, the pre-drafted rows are dropped, output unchanged.
    let other = Cluster::start(ClusterConfig::new(OTHER_DRAFT, TARGET).wait_for_draft()).await;
    let mut misses = 0;
    for seed in [None, Some(9u64)] {
        let base = run(
            &other,
            request("What is here?", params(40, seed), None),
            |_| {},
        )
        .await;
        let on = spec(pb::SpeculationMode::Dynamic, 3, true);
        let (tokens, s) = run(
            &other,
            request("What is here?", params(40, seed), Some(on)),
            |_| {},
        )
        .await;
        assert_eq!(tokens, base.0, "misses (seed {seed:?}) changed the output");
        misses += s.ahead_misses;
    }
    assert!(misses > 0, "a disagreeing draft's guesses miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_with_draft_ahead_match_solo_runs() {
    let cluster = Cluster::start(ClusterConfig::new(TARGET, TARGET).wait_for_draft()).await;
    let reqs: Vec<pb::GenerateRequest> = (0..4)
        .map(|i| {
            let seed = (i % 2 == 1).then_some(i as u64);
            let mode = if i < 2 {
                pb::SpeculationMode::Dynamic
            } else {
                pb::SpeculationMode::Chain
            };
            request(
                &format!("Question {i}?"),
                params(32, seed),
                Some(spec(mode, 4, true)),
            )
        })
        .collect();
    let mut solo = Vec::new();
    for r in &reqs {
        let off = pb::GenerateRequest {
            speculation: None,
            ..r.clone()
        };
        solo.push(run(&cluster, off, |_| {}).await.0);
    }
    let together = join_all(reqs.iter().map(|r| run(&cluster, r.clone(), |_| {}))).await;
    for (i, (tokens, _)) in together.into_iter().enumerate() {
        assert_eq!(
            tokens, solo[i],
            "request {i} changed with concurrent draft-ahead"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_killed_mid_pre_draft_loses_nothing() {
    let mut cluster = Cluster::start(ClusterConfig::new(TARGET, TARGET).wait_for_draft()).await;
    let base = run(
        &cluster,
        request("Tell me more.", params(160, None), None),
        |_| {},
    )
    .await;
    let on = spec(pb::SpeculationMode::Dynamic, 4, true);
    let mut draft = cluster.draft.take().expect("a draft service");
    let mut killed = false;
    let (tokens, s) = run(
        &cluster,
        request("Tell me more.", params(160, None), Some(on)),
        |n| {
            // Kill the draft while it pre-drafts between steps, once speculation is under way.
            if n >= 8 && !killed {
                draft.process.kill();
                killed = true;
            }
        },
    )
    .await;
    assert!(killed, "the draft was killed mid-generation");
    assert_eq!(
        tokens, base.0,
        "losing the draft mid-pre-draft changed the output"
    );
    assert!(s.speculative, "it speculated before the draft died: {s:?}");
}

/// The draft service alone, as a client that does not pipeline would use it: a tree asked
/// for with `draft_ahead` leaves a pre-draft made in spare time; a later `answer_ahead`
/// request gets it without forwards of its own, and reporting the outcome it assumes
/// redeems it (the same tree, a hit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_draft_pre_drafts_in_spare_time_and_redeems_the_guess() {
    let cluster = Cluster::start(ClusterConfig::new(TARGET, TARGET)).await;
    let mut draft = cluster.draft_client().await;
    draft
        .open_session(pb::OpenSessionRequest {
            session_id: "s".into(),
            images: vec![],
            token_ids: vec![1, 5, 6, 7],
            image_features: vec![],
            first_step: None,
            conversation_images: 0,
        })
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut trees = draft
        .speculate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let chain = pb::DraftParams {
        mode: pb::TreeMode::Chain as i32,
        depth: 3,
        branching: 1,
        budget: 3,
    };
    let request = |new_tokens: Vec<u32>, accepted_path: Vec<u32>, draft_ahead, answer_ahead| {
        pb::SpeculateRequest {
            session_id: "s".into(),
            new_tokens,
            accepted_path,
            params: Some(chain),
            draft_ahead,
            answer_ahead,
        }
    };
    tx.send(request(vec![], vec![], true, false)).await.unwrap();
    let sent = trees.message().await.unwrap().unwrap();
    assert_eq!(
        sent.tree.unwrap().tokens.len(),
        4,
        "a chain of 3 below the root"
    );

    // Spare time completes the pre-draft; asked for afterwards, it needs no forward.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    tx.send(request(vec![], vec![], false, true)).await.unwrap();
    let pre = trees.message().await.unwrap().unwrap();
    assert_eq!(pre.levels, 0, "pre-drafted in spare time: {pre:?}");
    assert_eq!(
        pre.assumed_path,
        vec![0, 1, 2, 3],
        "the whole chain accepted"
    );
    let pre_tree = pre.tree.unwrap();
    assert_eq!(pre_tree.tokens.first(), pre.assumed_emitted.last());
    assert!(pre_tree.tokens.len() > 1);

    // The outcome it assumed redeems it.
    tx.send(request(pre.assumed_emitted, pre.assumed_path, false, false))
        .await
        .unwrap();
    let next = trees.message().await.unwrap().unwrap();
    assert_eq!(next.ahead, pb::AheadOutcome::Hit as i32, "{next:?}");
    assert_eq!(next.tree.unwrap(), pre_tree);
}
