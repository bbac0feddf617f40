//! Tree building and verification speed: a 64-node tree should take microseconds.

use std::convert::Infallible;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use speculate::{
    DraftParams, Drafter, PartialTree, SamplingParams, StopConditions, TokenTree, TreeLimits,
    build_tree, verify,
};

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Children derived from a hash of the node id: no model cost, just the tree logic.
struct HashDrafter {
    vocab: u32,
    out: Vec<Vec<(u32, f32)>>,
}

impl Drafter for HashDrafter {
    type Error = Infallible;

    fn expand(
        &mut self,
        partial: &PartialTree,
        expand: &[usize],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>, Infallible> {
        self.out.clear();
        for &n in expand {
            let h = mix(partial.tokens[n] as u64 ^ (n as u64) << 32);
            self.out.push(
                (0..k)
                    .map(|j| {
                        let tok = ((h.wrapping_add(j as u64 * 7919)) % self.vocab as u64) as u32;
                        (tok, -0.3 * (j as f32 + 1.0) - (h % 100) as f32 * 1e-3)
                    })
                    .collect(),
            );
        }
        Ok(std::mem::take(&mut self.out))
    }
}

/// Logits where the target agrees with the tree along the first-child spine.
fn spine_logits(tree: &TokenTree, vocab: usize) -> Vec<f32> {
    let mut logits = vec![0.0f32; tree.len() * vocab];
    for i in 0..tree.len() {
        let row = &mut logits[i * vocab..(i + 1) * vocab];
        for (j, x) in row.iter_mut().enumerate() {
            *x = (mix((i * vocab + j) as u64) % 1000) as f32 * 1e-3;
        }
        if let Some(c) = tree.first_child(i) {
            row[tree.token(c) as usize] = 8.0;
        }
    }
    logits
}

fn bench(c: &mut Criterion) {
    let params = DraftParams::dynamic(6, 8, 63);
    for vocab in [1_000usize, 32_000] {
        let mut drafter = HashDrafter {
            vocab: vocab as u32,
            out: Vec::new(),
        };
        c.bench_function(&format!("build_dynamic_d6_k8_m63_v{vocab}"), |b| {
            b.iter(|| build_tree(black_box(5), &params, &mut drafter).unwrap())
        });
        let tree = build_tree(5, &params, &mut drafter).unwrap().tree;
        assert_eq!(tree.len(), 64);
        let limits = TreeLimits {
            max_nodes: 64,
            max_depth: 16,
            vocab_size: vocab,
        };
        c.bench_function(&format!("validate_64_nodes_v{vocab}"), |b| {
            b.iter(|| {
                TokenTree::new(
                    tree.tokens().to_vec(),
                    tree.parents().to_vec(),
                    tree.scores().to_vec(),
                    &limits,
                )
                .unwrap()
            })
        });
        let logits = spine_logits(&tree, vocab);
        let stop = StopConditions {
            eos_token_ids: vec![2],
            max_new_tokens: 1000,
        };
        let greedy = SamplingParams::greedy();
        let sampled = SamplingParams {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.9,
            seed: 1,
        };
        for (name, s) in [("greedy", greedy), ("sampled", sampled)] {
            c.bench_function(&format!("verify_{name}_64_nodes_v{vocab}"), |b| {
                b.iter(|| verify(&tree, black_box(&logits), vocab, &s, 100, &stop))
            });
        }
        c.bench_function(&format!("build_and_verify_greedy_64_nodes_v{vocab}"), |b| {
            b.iter(|| {
                let t = build_tree(black_box(5), &params, &mut drafter)
                    .unwrap()
                    .tree;
                verify(&t, &logits, vocab, &greedy, 100, &stop)
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
