//! The key invariant of tree attention (issue #2, item 5) on random tiny checkpoints: the
//! logits `forward_tree` gives at each node equal plain sequential decoding of the node's
//! root-to-node path; after `commit(path)` decoding continues as if only the path had been fed;
//! packed batches equal individual calls; rollback restores an earlier state.

mod common;

use common::{IMAGE_TOKEN, Spec, max_abs_diff, model, model_with, pixels};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use specllava_model::{Backend, KvCache, Llava, Tensor, TreeBatchItem};

const TOL: f32 = 1e-4;

/// Both backends, each with the tolerance its invariants hold to: the CPU backend computes
/// every row with the same operation order whatever the tree or batch around it, so its tree
/// logits equal sequential decoding bit for bit; candle's kernels are only close.
fn backends() -> [(Backend, f32); 2] {
    [(Backend::Cpu, 0.0), (Backend::Candle, TOL)]
}

/// A random tree: parents[i] in [-1, i).
fn random_tree(rng: &mut StdRng, n: usize, vocab: u32) -> (Vec<u32>, Vec<i32>) {
    let tokens = (0..n).map(|_| rng.random_range(0..vocab - 1)).collect();
    let parents = (0..n)
        .map(|i| {
            if i == 0 || rng.random_bool(0.15) {
                -1
            } else {
                rng.random_range(0..i as i32)
            }
        })
        .collect();
    (tokens, parents)
}

fn path_to(parents: &[i32], node: usize) -> Vec<usize> {
    let mut p = vec![node];
    let mut cur = parents[node];
    while cur >= 0 {
        p.push(cur as usize);
        cur = parents[cur as usize];
    }
    p.reverse();
    p
}

/// Logits of feeding `tokens` one at a time (single-node tree + commit each step).
fn sequential(m: &Llava, kv: &mut KvCache, tokens: &[u32]) -> Tensor {
    let mut last = None;
    for &t in tokens {
        let l = m.forward_tree(kv, &[t], &[-1]).unwrap();
        kv.commit(&[0]).unwrap();
        last = Some(l.squeeze(0).unwrap());
    }
    last.unwrap()
}

/// A session with an image prompt of `extra` text tokens after the image.
fn session(m: &Llava, s: &Spec, extra: usize, seed: u64) -> KvCache {
    let mut kv = m.new_kv();
    let mut ids = vec![1u32, 5, IMAGE_TOKEN];
    ids.extend((0..extra as u32).map(|i| 7 + i % 50));
    m.prefill(&mut kv, &ids, &[pixels(s, seed)]).unwrap();
    kv
}

fn specs() -> Vec<Spec> {
    vec![
        Spec::default(),
        Spec {
            kv_heads: 4,
            tied: true,
            strategy: "full",
            feature_layer: -1,
            current_layout: true,
            seed: 1,
            ..Spec::default()
        },
        Spec {
            heads: 4,
            kv_heads: 1,
            layers: 3,
            seed: 2,
            ..Spec::default()
        },
    ]
}

#[test]
fn tree_logits_equal_sequential_decoding_of_each_path() {
    for (s, (backend, tol)) in specs()
        .into_iter()
        .flat_map(|s| backends().map(|b| (s.clone(), b)))
    {
        let (_dir, m) = model_with(&s, backend);
        let mut rng = StdRng::seed_from_u64(s.seed + 100);
        for round in 0..3 {
            let base = session(&m, &s, 2 + round, round as u64);
            let n = rng.random_range(1..12);
            let (tokens, parents) = random_tree(&mut rng, n, s.vocab as u32);
            let mut kv = base.fork().unwrap();
            let logits = m.forward_tree(&mut kv, &tokens, &parents).unwrap();
            assert_eq!(logits.dims(), &[n, s.vocab]);
            assert_eq!(kv.pending_len(), n);
            for i in 0..n {
                let path: Vec<u32> = path_to(&parents, i).iter().map(|&j| tokens[j]).collect();
                let mut r = base.fork().unwrap();
                let want = sequential(&m, &mut r, &path);
                let got = logits.get(i).unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(
                    d <= tol,
                    "{s:?} {backend:?} round {round} node {i}: diff {d}"
                );
            }
        }
    }
}

#[test]
fn incremental_levels_equal_one_shot_tree() {
    let s = Spec::default();
    let (_dir, m) = model(&s);
    let mut rng = StdRng::seed_from_u64(7);
    let base = session(&m, &s, 3, 0);
    let (tokens, parents) = random_tree(&mut rng, 10, s.vocab as u32);
    let mut one = base.fork().unwrap();
    let all = m.forward_tree(&mut one, &tokens, &parents).unwrap();
    // The same nodes in three calls (parents always precede children).
    let mut inc = base.fork().unwrap();
    let mut parts = Vec::new();
    for (a, b) in [(0, 3), (3, 4), (4, 10)] {
        parts.push(
            m.forward_tree(&mut inc, &tokens[a..b], &parents[a..b])
                .unwrap(),
        );
    }
    let inc_all = Tensor::cat(&parts, 0).unwrap();
    assert!(max_abs_diff(&all, &inc_all) < TOL);
    assert_eq!(inc.pending_len(), 10);
}

#[test]
fn commit_then_continue_equals_only_the_path_fed() {
    for s in specs() {
        let (_dir, m) = model(&s);
        let mut rng = StdRng::seed_from_u64(s.seed + 200);
        for round in 0..4 {
            let base = session(&m, &s, 1 + round, 10 + round as u64);
            let n = rng.random_range(2..10);
            let (tokens, parents) = random_tree(&mut rng, n, s.vocab as u32);
            let mut kv = base.fork().unwrap();
            m.forward_tree(&mut kv, &tokens, &parents).unwrap();
            let node = rng.random_range(0..n);
            let path = path_to(&parents, node);
            kv.commit(&path).unwrap();
            assert_eq!(kv.committed_len(), base.committed_len() + path.len());
            assert_eq!(kv.pending_len(), 0);
            // Continue with a two-level tree (a small chain plus a sibling).
            let next = [11u32, 12, 13];
            let next_parents = [-1, 0, -1];
            let got = m.forward_tree(&mut kv, &next, &next_parents).unwrap();
            let mut r = base.fork().unwrap();
            let path_tokens: Vec<u32> = path.iter().map(|&j| tokens[j]).collect();
            sequential(&m, &mut r, &path_tokens);
            let want = m.forward_tree(&mut r, &next, &next_parents).unwrap();
            let d = max_abs_diff(&got, &want);
            assert!(d < TOL, "{s:?} round {round}: diff {d}");
        }
    }
}

#[test]
fn commit_keeping_a_subtree_equals_feeding_its_path_then_the_subtree() {
    for (s, (backend, tol)) in specs()
        .into_iter()
        .flat_map(|s| backends().map(|b| (s.clone(), b)))
    {
        let (_dir, m) = model_with(&s, backend);
        let base = session(&m, &s, 2, 3);
        // A drafted tree: chain 0 -> 1 -> 2 plus a sibling 3 of node 1.
        let mut kv = base.fork().unwrap();
        m.forward_tree(&mut kv, &[21, 22, 23, 24], &[-1, 0, 1, 0])
            .unwrap();
        // A subtree pre-drafted below node 2 (rows 4..7): 4 -> 5, 4 -> 6.
        m.forward_tree(&mut kv, &[31, 32, 33], &[2, 4, 4]).unwrap();
        kv.commit_keeping(&[0, 1, 2], &[4, 5, 6]).unwrap();
        assert_eq!(kv.committed_len(), base.committed_len() + 3);
        assert_eq!(kv.pending_len(), 3);
        // Extend the kept subtree below its node 1 (token 32) and read the logits.
        let got = m.forward_tree(&mut kv, &[41], &[1]).unwrap();
        let mut r = base.fork().unwrap();
        let want = sequential(&m, &mut r, &[21, 22, 23, 31, 32, 41]);
        let d = max_abs_diff(&got.squeeze(0).unwrap(), &want);
        assert!(d <= tol, "{s:?} {backend:?}: diff {d}");
        // Committing the kept subtree's path works like any commit.
        kv.commit(&[0, 1, 3]).unwrap();
        assert_eq!(kv.committed_len(), base.committed_len() + 6);
        let mut bad = base.fork().unwrap();
        m.forward_tree(&mut bad, &[21, 22, 23], &[-1, 0, 0])
            .unwrap();
        // Out of order, not below the path's end, a root with a non-empty path.
        assert!(bad.commit_keeping(&[0], &[2, 1]).is_err());
        assert!(bad.commit_keeping(&[0, 1], &[2]).is_err());
        assert!(bad.commit_keeping(&[], &[0, 1]).is_ok());
    }
}

#[test]
fn packed_batch_equals_individual_calls() {
    for (s, (backend, tol)) in specs()
        .into_iter()
        .flat_map(|s| backends().map(|b| (s.clone(), b)))
    {
        let (_dir, m) = model_with(&s, backend);
        let mut rng = StdRng::seed_from_u64(s.seed + 300);
        // Sessions with different prefix lengths, one with pending nodes from an earlier call.
        let bases: Vec<KvCache> = (0..3)
            .map(|i| session(&m, &s, 1 + 4 * i, i as u64))
            .collect();
        let mut kvs: Vec<KvCache> = bases.iter().map(|b| b.fork().unwrap()).collect();
        m.forward_tree(&mut kvs[1], &[3, 4], &[-1, 0]).unwrap();
        let trees: Vec<(Vec<u32>, Vec<i32>)> = (0..3)
            .map(|i| {
                let n = rng.random_range(1..8);
                let (t, mut p) = random_tree(&mut rng, n, s.vocab as u32);
                if i == 1 {
                    // attach to the earlier pending nodes
                    p = p.iter().map(|&x| x + 2).collect();
                    p[0] = 1;
                }
                (t, p)
            })
            .collect();
        let mut singles = Vec::new();
        for (i, (t, p)) in trees.iter().enumerate() {
            let mut kv = kvs[i].fork().unwrap();
            singles.push(m.forward_tree(&mut kv, t, p).unwrap());
        }
        let mut items: Vec<TreeBatchItem<'_>> = kvs
            .iter_mut()
            .zip(&trees)
            .map(|(kv, (t, p))| TreeBatchItem {
                kv,
                tokens: t,
                parents: p,
            })
            .collect();
        let batched = m.forward_batch(&mut items).unwrap();
        for (i, (b, single)) in batched.iter().zip(&singles).enumerate() {
            let d = max_abs_diff(b, single);
            assert!(d <= tol, "{s:?} {backend:?} item {i}: diff {d}");
        }
        // Each session then commits independently and stays consistent.
        for (i, kv) in kvs.iter_mut().enumerate() {
            let want_pending = trees[i].0.len() + if i == 1 { 2 } else { 0 };
            assert_eq!(kv.pending_len(), want_pending);
            kv.commit(&[0]).unwrap();
            assert_eq!(kv.committed_len(), bases[i].committed_len() + 1);
        }
    }
}

#[test]
fn rollback_restores_an_earlier_state() {
    let s = Spec::default();
    let (_dir, m) = model(&s);
    let base = session(&m, &s, 2, 0);
    let len = base.committed_len();
    let mut kv = base.fork().unwrap();
    sequential(&m, &mut kv, &[20, 21, 22]);
    m.forward_tree(&mut kv, &[1, 2], &[-1, -1]).unwrap();
    kv.rollback(len).unwrap();
    assert_eq!((kv.committed_len(), kv.pending_len()), (len, 0));
    let got = sequential(&m, &mut kv, &[30, 31]);
    let mut r = base.fork().unwrap();
    let want = sequential(&m, &mut r, &[30, 31]);
    assert!(max_abs_diff(&got, &want) < TOL);
    assert!(kv.rollback(len + 10).is_err());
}

#[test]
fn prefill_in_chunks_equals_whole_prefill() {
    let s = Spec::default();
    let (_dir, m) = model(&s);
    let ids = [1u32, 5, IMAGE_TOKEN, 8, 9, 10, 11];
    let img = pixels(&s, 3);
    let mut whole = m.new_kv();
    let a = m
        .prefill(&mut whole, &ids, std::slice::from_ref(&img))
        .unwrap();
    let mut chunks = m.new_kv();
    m.prefill(&mut chunks, &ids[..4], std::slice::from_ref(&img))
        .unwrap();
    let b = m.prefill(&mut chunks, &ids[4..], &[]).unwrap();
    assert!(max_abs_diff(&a, &b) < TOL);
    assert_eq!(whole.committed_len(), 2 + m.tile_tokens() + 4);
    // An already-expanded placeholder run is the same as a single placeholder.
    let mut expanded = vec![1u32, 5];
    expanded.extend(std::iter::repeat_n(IMAGE_TOKEN, m.tile_tokens()));
    expanded.extend([8, 9, 10, 11]);
    let mut e = m.new_kv();
    let c = m.prefill(&mut e, &expanded, &[img]).unwrap();
    assert!(max_abs_diff(&a, &c) < TOL);
}

#[test]
fn kv_grows_and_reports_bytes() {
    let s = Spec::default();
    let (_dir, m) = model(&s);
    let mut kv = m.new_kv();
    assert_eq!(kv.bytes(), 0);
    let ids: Vec<u32> = (0..100).map(|i| i % 60).collect();
    m.prefill(&mut kv, &ids, &[]).unwrap();
    let per_token = m.kv_bytes_per_token();
    assert!(kv.bytes() >= 100 * per_token);
    assert!(kv.bytes() <= 256 * per_token);
}
