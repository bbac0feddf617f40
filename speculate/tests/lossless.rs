//! Lossless property: for random trees and random target distributions, speculative decoding
//! emits exactly the tokens target-only decoding emits with the same seed, greedy and sampled.

use std::convert::Infallible;

use proptest::prelude::*;
use speculate::{
    DraftParams, Drafter, PartialTree, SamplingParams, StopConditions, TokenTree, TreeLimits,
    TreeMode, build_tree, sample_token, verify,
};

const V: usize = 12;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash_seq(salt: u64, seq: &[u32]) -> u64 {
    seq.iter().fold(mix(salt), |h, &t| mix(h ^ (t as u64 + 1)))
}

/// A random "target model": logits depend on the whole context, with one favoured token so
/// drafts are often right.
#[derive(Clone, Copy)]
struct Target {
    salt: u64,
    sharpness: f32,
}

impl Target {
    fn logits(&self, ctx: &[u32]) -> Vec<f32> {
        let h = hash_seq(self.salt, ctx);
        let favoured = (h % V as u64) as usize;
        (0..V)
            .map(|t| {
                let noise = (mix(h ^ (t as u64) << 32) % 1000) as f32 / 1000.0 * 3.0;
                noise + if t == favoured { self.sharpness } else { 0.0 }
            })
            .collect()
    }
}

/// A drafter that sees the target through noise (its own log-softmax over perturbed logits).
struct NoisyDrafter {
    target: Target,
    noise: f32,
    prefix: Vec<u32>,
}

impl Drafter for NoisyDrafter {
    type Error = Infallible;

    fn expand(
        &mut self,
        partial: &PartialTree,
        expand: &[usize],
        k: usize,
    ) -> Result<Vec<Vec<(u32, f32)>>, Infallible> {
        Ok(expand
            .iter()
            .map(|&n| {
                let mut ctx = self.prefix.clone();
                ctx.extend(partial.path_to(n).iter().map(|&i| partial.tokens[i]));
                let h = hash_seq(0xd4af7, &ctx);
                let l: Vec<f32> = self
                    .target
                    .logits(&ctx)
                    .iter()
                    .enumerate()
                    .map(|(t, &x)| x + (mix(h ^ t as u64) % 1000) as f32 / 1000.0 * self.noise)
                    .collect();
                let max = l.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let lse = max + l.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
                let mut c: Vec<(u32, f32)> = l
                    .iter()
                    .enumerate()
                    .map(|(t, &x)| (t as u32, x - lse))
                    .collect();
                c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                c.truncate(k);
                c
            })
            .collect())
    }
}

/// Target-only decoding: one `sample_token` per position.
fn target_only(t: Target, prompt: &[u32], s: &SamplingParams, eos: &[u32], n: usize) -> Vec<u32> {
    let mut ctx = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < n {
        let tok = sample_token(&t.logits(&ctx), s, ctx.len() as u64);
        ctx.push(tok);
        out.push(tok);
        if eos.contains(&tok) {
            break;
        }
    }
    out
}

/// Verifies one tree against the target at the current context; checks the KV-commit contract.
fn step(
    t: Target,
    ctx: &[u32],
    tree: &TokenTree,
    s: &SamplingParams,
    eos: &[u32],
    left: usize,
) -> (Vec<u32>, bool) {
    let prefix = &ctx[..ctx.len() - 1];
    let mut logits = Vec::with_capacity(tree.len() * V);
    for i in 0..tree.len() {
        let mut seq = prefix.to_vec();
        seq.extend(tree.path_to(i).iter().map(|&j| tree.token(j)));
        logits.extend(t.logits(&seq));
    }
    let stop = StopConditions {
        eos_token_ids: eos.to_vec(),
        max_new_tokens: left,
    };
    let out = verify(tree, &logits, V, s, ctx.len() as u64 - 1, &stop);
    assert_eq!(out.accepted_path[0], 0);
    assert_eq!(out.accepted_path.len(), out.emitted.len());
    for (w, &tok) in out.accepted_path.windows(2).zip(&out.emitted) {
        assert_eq!(tree.parent(w[1]), Some(w[0]), "accepted path is a path");
        assert_eq!(
            tree.token(w[1]),
            tok,
            "kept KV rows hold the emitted tokens"
        );
    }
    assert_eq!(out.proposed, tree.len() - 1);
    assert!(out.accepted <= out.emitted.len());
    (out.emitted, out.finish.is_some())
}

fn speculative(
    t: Target,
    prompt: &[u32],
    s: &SamplingParams,
    eos: &[u32],
    n: usize,
    mut next_tree: impl FnMut(&[u32], usize) -> TokenTree,
) -> (Vec<u32>, usize) {
    let mut ctx = prompt.to_vec();
    let mut out = Vec::new();
    let mut steps = 0;
    while out.len() < n {
        let tree = next_tree(&ctx, steps);
        let (emitted, finished) = step(t, &ctx, &tree, s, eos, n - out.len());
        assert!(!emitted.is_empty());
        ctx.extend(&emitted);
        out.extend(emitted);
        steps += 1;
        if finished {
            break;
        }
    }
    (out, steps)
}

fn sampling() -> impl Strategy<Value = SamplingParams> {
    (
        prop_oneof![Just(0.0f32), Just(0.3), Just(1.0), Just(1.7)],
        prop_oneof![Just(0usize), Just(1), Just(3), Just(8)],
        prop_oneof![Just(1.0f32), Just(0.9), Just(0.5)],
        any::<u64>(),
    )
        .prop_map(|(temperature, top_k, top_p, seed)| SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
        })
}

fn draft_params() -> impl Strategy<Value = DraftParams> {
    (0usize..3, 0usize..7, 1usize..5, 0usize..25).prop_map(|(m, depth, branching, budget)| {
        let mode = [TreeMode::Dynamic, TreeMode::Static, TreeMode::Chain][m];
        DraftParams {
            mode,
            depth,
            branching,
            budget,
        }
    })
}

/// A random valid tree: each node picks a random earlier parent and a random token; nodes that
/// would duplicate a sibling are dropped.
fn random_tree(root: u32, h: u64, nodes: usize) -> TokenTree {
    let (mut tokens, mut parents) = (vec![root], vec![-1i32]);
    for i in 1..nodes as u64 {
        let r = mix(h ^ i);
        let p = (r % tokens.len() as u64) as usize;
        let tok = ((r >> 20) % V as u64) as u32;
        let dup = (1..tokens.len()).any(|j| parents[j] == p as i32 && tokens[j] == tok);
        if !dup {
            tokens.push(tok);
            parents.push(p as i32);
        }
    }
    let limits = TreeLimits {
        max_nodes: 64,
        max_depth: 64,
        vocab_size: V,
    };
    let n = tokens.len();
    TokenTree::new(tokens, parents, vec![0.0; n], &limits).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn drafted_trees_are_lossless(
        salt in any::<u64>(),
        sharpness in 0.0f32..6.0,
        noise in 0.0f32..4.0,
        prompt in prop::collection::vec(0u32..V as u32, 1..5),
        s in sampling(),
        params in draft_params(),
        eos in prop::option::of(0u32..V as u32),
        n in 1usize..40,
    ) {
        let t = Target { salt, sharpness };
        let eos: Vec<u32> = eos.into_iter().collect();
        let expected = target_only(t, &prompt, &s, &eos, n);
        let mut drafter = NoisyDrafter { target: t, noise, prefix: Vec::new() };
        let (got, _) = speculative(t, &prompt, &s, &eos, n, |ctx, _| {
            drafter.prefix = ctx[..ctx.len() - 1].to_vec();
            build_tree(*ctx.last().unwrap(), &params, &mut drafter).unwrap().tree
        });
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn random_trees_are_lossless(
        salt in any::<u64>(),
        sharpness in 0.0f32..6.0,
        prompt in prop::collection::vec(0u32..V as u32, 1..5),
        s in sampling(),
        tree_seed in any::<u64>(),
        nodes in 1usize..64,
        n in 1usize..40,
    ) {
        let t = Target { salt, sharpness };
        let expected = target_only(t, &prompt, &s, &[], n);
        let (got, _) = speculative(t, &prompt, &s, &[], n, |ctx, step| {
            random_tree(*ctx.last().unwrap(), tree_seed ^ step as u64, nodes)
        });
        prop_assert_eq!(got, expected);
    }
}

/// With a good drafter the speculative path actually accepts drafts (so the property above is
/// exercised on long accepted paths, not only on one-token steps).
#[test]
fn good_drafts_are_accepted() {
    let t = Target {
        salt: 7,
        sharpness: 6.0,
    };
    for s in [SamplingParams::greedy(), SamplingParams::sampled(0.7, 11)] {
        let mut drafter = NoisyDrafter {
            target: t,
            noise: 0.5,
            prefix: Vec::new(),
        };
        let n = 200;
        let (got, steps) = speculative(t, &[1, 2], &s, &[], n, |ctx, _| {
            drafter.prefix = ctx[..ctx.len() - 1].to_vec();
            build_tree(
                *ctx.last().unwrap(),
                &DraftParams::dynamic(5, 3, 20),
                &mut drafter,
            )
            .unwrap()
            .tree
        });
        assert_eq!(got, target_only(t, &[1, 2], &s, &[], n));
        assert!(
            steps * 2 < n,
            "expected over 2 tokens per step, got {n} tokens in {steps} steps"
        );
    }
}
