//! A target's prefill picks a turn's first token (`first_step`) as a `Verify` of a root-only
//! tree would: the same token, greedy and seeded, opening a session or appending to one (after
//! a rollback too), and the session goes on as after that verify. A draft refuses the request
//! before any work.

use specllava_e2e::{Cluster, ClusterConfig, fixture_image};
use specllava_proto::v1 as pb;
use tonic::Code;

/// The fixture target and a draft sharing its vocabulary.
const TARGET: &str = "gqa_default_l-2_sharded";
const DRAFT: &str = "mha_default_l-2_untied";

fn sampling(seed: Option<u64>) -> pb::SamplingParams {
    match seed {
        None => pb::SamplingParams::default(),
        Some(seed) => pb::SamplingParams {
            temperature: 0.7,
            seed,
            ..Default::default()
        },
    }
}

fn stop() -> pb::StopConditions {
    pb::StopConditions {
        eos_token_ids: vec![],
        max_new_tokens: 8,
    }
}

fn root_only(token: u32) -> pb::TokenTree {
    pb::TokenTree {
        tokens: vec![token],
        parents: vec![-1],
        scores: vec![0.0],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefill_picks_the_token_a_root_only_verify_would() {
    let mut cfg = ClusterConfig::new(DRAFT, TARGET);
    cfg.target_args = vec!["--calibrate".into(), "false".into()];
    let cluster = Cluster::start(cfg).await;
    let mut target = cluster.target_client().await;
    let image_id = cluster.target_model().await.image_token_id;
    let image = fixture_image("red_square.png");
    let histories = [vec![1, image_id, 17, 23, 42], vec![1, 5, 6, 7, 8, 9]];
    let mut n = 0;
    for history in &histories {
        for seed in [None, Some(3), Some(11)] {
            n += 1;
            let images = if history.contains(&image_id) {
                vec![image.clone()]
            } else {
                vec![]
            };
            let open = |id: String, first_step| pb::OpenSessionRequest {
                session_id: id,
                images: images.clone(),
                token_ids: history.clone(),
                image_features: vec![],
                first_step,
                conversation_images: 0,
            };
            // The prefill picks it...
            let ask = pb::FirstStepRequest {
                sampling: Some(sampling(seed)),
                stop: Some(stop()),
            };
            let a = target
                .open_session(open(format!("a{n}"), Some(ask)))
                .await
                .unwrap()
                .into_inner();
            let first = a.first_step.expect("the first step");
            // ...as a root-only verify after a plain prefill does.
            let b = target
                .open_session(open(format!("b{n}"), None))
                .await
                .unwrap()
                .into_inner();
            assert!(b.first_step.is_none());
            let verify = |id: String, kv_len, root| pb::VerifyRequest {
                session_id: id,
                expected_kv_len: kv_len,
                tree: Some(root_only(root)),
                sampling: Some(sampling(seed)),
                stop: Some(stop()),
            };
            let root = *history.last().unwrap();
            let v = target
                .verify(verify(format!("b{n}"), b.kv_len, root))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                (first.token, a.kv_len),
                (v.emitted[0], v.kv_len),
                "history {history:?}, seed {seed:?}"
            );
            assert_eq!(first.finish, v.finish);
            // Both sessions go on alike.
            let next_a = target
                .verify(verify(format!("a{n}"), a.kv_len, first.token))
                .await
                .unwrap()
                .into_inner();
            let next_b = target
                .verify(verify(format!("b{n}"), v.kv_len, v.emitted[0]))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                (next_a.emitted, next_a.kv_len),
                (next_b.emitted, next_b.kv_len)
            );
        }
    }
    // Append (a conversation's next turn, and a rollback of its last rows first): the token
    // picked and the step after it as after Append then a root-only verify.
    for seed in [None, Some(5)] {
        let mut twins = Vec::new();
        for (id, ask) in [("ta", true), ("tb", false)] {
            let id = format!("{id}{}", seed.unwrap_or(0));
            let first_step = ask.then(|| pb::FirstStepRequest {
                sampling: Some(sampling(seed)),
                stop: Some(stop()),
            });
            let history = vec![1u32, 5, 6, 7, 8];
            target
                .open_session(pb::OpenSessionRequest {
                    session_id: id.clone(),
                    images: vec![],
                    token_ids: history.clone(),
                    image_features: vec![],
                    first_step: None,
                    conversation_images: 0,
                })
                .await
                .unwrap();
            // Keep 3 of the 4 rows (a rollback), re-send the 4th and the root, add a turn.
            let tokens = vec![history[3], history[4], 11, 12, 13];
            let appended = target
                .append(pb::AppendRequest {
                    session_id: id.clone(),
                    keep_kv_len: 3,
                    token_ids: tokens,
                    images: vec![],
                    image_features: vec![],
                    first_step,
                    conversation_images: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let (token, kv_len) = match appended.first_step {
                Some(first) => (first.token, appended.kv_len),
                None => {
                    let v = target
                        .verify(pb::VerifyRequest {
                            session_id: id.clone(),
                            expected_kv_len: appended.kv_len,
                            tree: Some(root_only(13)),
                            sampling: Some(sampling(seed)),
                            stop: Some(stop()),
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    (v.emitted[0], v.kv_len)
                }
            };
            let next = target
                .verify(pb::VerifyRequest {
                    session_id: id,
                    expected_kv_len: kv_len,
                    tree: Some(root_only(token)),
                    sampling: Some(sampling(seed)),
                    stop: Some(stop()),
                })
                .await
                .unwrap()
                .into_inner();
            twins.push((token, kv_len, next.emitted, next.kv_len));
        }
        assert_eq!(twins[0], twins[1], "seed {seed:?}");
        assert_eq!(twins[0].1, 8, "3 kept rows + 5 appended, the root included");
    }
    // A draft picks no tokens: refused before any work, the session not opened.
    let mut draft = cluster.draft_client().await;
    let err = draft
        .open_session(pb::OpenSessionRequest {
            session_id: "d".into(),
            images: vec![],
            token_ids: vec![1, 5, 6],
            image_features: vec![],
            first_step: Some(pb::FirstStepRequest::default()),
            conversation_images: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("first_step"), "{err:?}");
    assert!(!cluster.draft_has("d").await);
}
