//! Seeded, stateless token sampling.
//!
//! The token at absolute position `p` is a pure function of (logits at `p`, sampling params,
//! seed, `p`): the uniform draw comes from a counter-based hash of (seed, position), never a
//! stateful RNG. Verification calls exactly this function at every tree node, so speculative
//! decoding emits token-for-token what target-only decoding emits with the same seed.

use thiserror::Error;

/// How the target picks its token from its logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` disables.
    pub top_k: usize,
    /// Keep the smallest most-likely set whose mass reaches `top_p`; `1.0` disables.
    pub top_p: f32,
    /// Request seed; with the absolute position it keys the uniform draw.
    pub seed: u64,
}

/// Invalid sampling parameters.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SamplingError {
    /// Temperature negative or not finite.
    #[error("temperature must be finite and >= 0, got {0}")]
    Temperature(f32),
    /// `top_p` outside `(0, 1]`.
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
}

impl SamplingParams {
    /// Greedy decoding (argmax, lowest id wins ties).
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    /// Seeded sampling at `temperature` with top-k and top-p off.
    pub fn sampled(temperature: f32, seed: u64) -> Self {
        Self {
            temperature,
            top_k: 0,
            top_p: 1.0,
            seed,
        }
    }

    /// Checks `temperature >= 0` (finite) and `0 < top_p <= 1`.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }

    /// Whether these params pick the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

/// SplitMix64 finaliser: a bijective 64-bit mix with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Counter-based uniform in `[0, 1)` keyed by (seed, position): the same key always gives the
/// same number, and neighbouring keys give independent-looking numbers.
pub fn uniform(seed: u64, position: u64) -> f64 {
    let h = mix64(mix64(seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_add(mix64(position)));
    (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// NaN counts as -inf; +inf is clamped so the softmax stays finite.
fn clean(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x.min(f32::MAX)
    }
}

/// Index of the largest logit, lowest id on ties (NaN counts as -inf). 0 for empty input.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        let v = clean(v);
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// Token the target emits at absolute sequence position `position` given its logits there.
///
/// Greedy (`temperature == 0` or `top_k == 1`): argmax, lowest id wins ties. Otherwise
/// temperature, then top-k, then top-p over the tempered distribution, then an inverse-CDF draw
/// with [`uniform`]`(seed, position)` over the kept tokens in (probability desc, id asc) order.
/// Params are assumed valid (see [`SamplingParams::validate`]).
pub fn sample_token(logits: &[f32], params: &SamplingParams, position: u64) -> u32 {
    if params.is_greedy() || logits.len() <= 1 {
        return argmax(logits);
    }
    let max = clean(logits[argmax(logits) as usize]);
    if max == f32::NEG_INFINITY {
        return 0;
    }
    let inv_t = 1.0 / params.temperature as f64;
    let u = uniform(params.seed, position);
    if params.top_k > 0 && params.top_k < logits.len() {
        // Top-k on the raw logits (same order as the tempered weights), then top-p among them.
        let top = top_k_by_logit(logits, params.top_k);
        let w: Vec<f64> = top.iter().map(|&(l, _)| tempered(l, max, inv_t)).collect();
        let total: f64 = w.iter().sum();
        let mut n = w.len();
        if params.top_p < 1.0 {
            let target = params.top_p as f64 * total;
            let mut acc = 0.0;
            for (j, &x) in w.iter().enumerate() {
                acc += x;
                if acc >= target {
                    n = j + 1;
                    break;
                }
            }
        }
        let mass: f64 = w[..n].iter().sum();
        let items = top[..n]
            .iter()
            .zip(&w)
            .map(|(&(_, id), &x)| (id as usize, x));
        return draw(items, u * mass).unwrap_or(top[0].1);
    }
    // Unnormalised tempered probabilities; the max token has weight 1.
    let weights: Vec<f64> = logits.iter().map(|&l| tempered(l, max, inv_t)).collect();
    if params.top_p >= 1.0 {
        // Full distribution: any fixed order is a valid inverse CDF; id order needs no sort.
        let total: f64 = weights.iter().sum();
        return draw(weights.iter().copied().enumerate(), u * total)
            .unwrap_or_else(|| argmax(logits));
    }
    let order = ranked(&weights, params.top_p as f64);
    let total: f64 = order.iter().map(|&i| weights[i as usize]).sum();
    draw(
        order.iter().map(|&i| (i as usize, weights[i as usize])),
        u * total,
    )
    .unwrap_or_else(|| argmax(logits))
}

/// Tempered weight `exp((l - max) / T)`; exactly 0 below `e^-60` (relative to the top token),
/// which skips the `exp` for far-off tokens and changes no probability by more than 1e-26.
fn tempered(l: f32, max: f32, inv_t: f64) -> f64 {
    let x = (clean(l) as f64 - max as f64) * inv_t;
    if x < -60.0 { 0.0 } else { x.exp() }
}

/// The `k` largest logits as (logit, id), sorted by (logit desc, id asc), in one pass.
fn top_k_by_logit(logits: &[f32], k: usize) -> Vec<(f32, u32)> {
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        let l = clean(l);
        if top.len() == k && l <= top[k - 1].0 {
            continue;
        }
        // After every kept entry with logit >= l: earlier ids win ties.
        let at = top.partition_point(|&(x, _)| x >= l);
        top.insert(at, (l, i as u32));
        top.truncate(k);
    }
    top
}

/// Walks `(id, weight)` pairs until the running sum exceeds `target`; the last positive-weight
/// id if rounding leaves it short, `None` if no weight is positive.
fn draw(items: impl Iterator<Item = (usize, f64)>, target: f64) -> Option<u32> {
    let mut acc = 0.0;
    let mut last = None;
    for (i, w) in items {
        if w <= 0.0 {
            continue;
        }
        acc += w;
        last = Some(i);
        if acc > target {
            return Some(i as u32);
        }
    }
    last.map(|i| i as u32)
}

/// Descending (weight, then ascending id) comparison.
fn by_weight_desc(w: &[f64]) -> impl Fn(&u32, &u32) -> std::cmp::Ordering + '_ {
    move |&a, &b| {
        w[b as usize]
            .total_cmp(&w[a as usize])
            .then_with(|| a.cmp(&b))
    }
}

/// Ids kept by top-p, sorted by (weight desc, id asc).
///
/// Top-p only needs the head of the sorted order: if the tokens with weight `>= tau` already
/// hold `top_p` of the mass, the nucleus lies among them, so only they are sorted. The result
/// equals a full sort's.
fn ranked(weights: &[f64], top_p: f64) -> Vec<u32> {
    let cmp = by_weight_desc(weights);
    let total: f64 = weights.iter().sum();
    let mut ids: Vec<u32> = (0..weights.len() as u32).collect();
    let mut tau = 1e-3;
    loop {
        let mut head: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| weights[i as usize] >= tau)
            .collect();
        let mass: f64 = head.iter().map(|&i| weights[i as usize]).sum();
        if mass >= top_p * total || tau == 0.0 {
            head.sort_unstable_by(&cmp);
            return nucleus(head, weights, top_p, total);
        }
        tau = if tau < 1e-12 { 0.0 } else { tau * 1e-3 };
        ids.retain(|&i| weights[i as usize] > 0.0);
    }
}

/// Truncates sorted `ids` to the shortest prefix whose mass reaches `top_p` of `total`.
fn nucleus(mut ids: Vec<u32>, weights: &[f64], top_p: f64, total: f64) -> Vec<u32> {
    if top_p >= 1.0 {
        return ids;
    }
    let target = top_p * total;
    let mut acc = 0.0;
    for (n, &i) in ids.iter().enumerate() {
        acc += weights[i as usize];
        if acc >= target {
            ids.truncate(n + 1);
            break;
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_lowest_id_on_ties() {
        let g = SamplingParams::greedy();
        assert_eq!(sample_token(&[0.0, 3.0, 1.0, 3.0], &g, 0), 1);
        assert_eq!(sample_token(&[f32::NAN, -1.0], &g, 0), 1);
        assert_eq!(sample_token(&[2.0], &SamplingParams::sampled(1.0, 1), 0), 0);
    }

    #[test]
    fn validate_rejects_bad_params() {
        assert!(SamplingParams::greedy().validate().is_ok());
        let mut p = SamplingParams::sampled(-0.5, 0);
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "temperature must be finite and >= 0, got -0.5"
        );
        p.temperature = 1.0;
        p.top_p = 0.0;
        assert_eq!(
            p.validate().unwrap_err().to_string(),
            "top_p must be in (0, 1], got 0"
        );
        p.top_p = 1.5;
        assert!(p.validate().is_err());
    }

    #[test]
    fn sampling_is_a_pure_function_of_seed_and_position() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32 * 0.3).collect();
        let p = SamplingParams::sampled(1.0, 42);
        for pos in 0..100 {
            assert_eq!(
                sample_token(&logits, &p, pos),
                sample_token(&logits, &p, pos)
            );
        }
        let a: Vec<u32> = (0..100).map(|pos| sample_token(&logits, &p, pos)).collect();
        let q = SamplingParams::sampled(1.0, 43);
        let b: Vec<u32> = (0..100).map(|pos| sample_token(&logits, &q, pos)).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [5.0, 4.0, 3.0, 0.0, -1.0, 4.0];
        let mut p = SamplingParams::sampled(1.0, 7);
        p.top_k = 2;
        for pos in 0..200 {
            let t = sample_token(&logits, &p, pos);
            assert!(t == 0 || t == 1, "top-k 2 sampled {t}");
        }
        p.top_k = 0;
        p.top_p = 0.01;
        for pos in 0..50 {
            assert_eq!(sample_token(&logits, &p, pos), 0);
        }
    }

    #[test]
    fn nucleus_head_search_matches_full_sort() {
        let weights: Vec<f64> = (0..1000)
            .map(|i| (-((i * 37 % 1000) as f64) / 50.0).exp())
            .collect();
        for &p in &[0.1, 0.5, 0.9, 0.999, 0.999999] {
            let mut all: Vec<u32> = (0..1000).collect();
            all.sort_unstable_by(by_weight_desc(&weights));
            let total = weights.iter().sum();
            assert_eq!(
                ranked(&weights, p),
                nucleus(all, &weights, p, total),
                "top_p {p}"
            );
        }
    }

    #[test]
    fn top_k_pass_matches_a_sort() {
        let logits: Vec<f32> = (0..500).map(|i| ((i * 7919) % 97) as f32 * 0.1).collect();
        for k in [1, 2, 10, 50, 499] {
            let mut all: Vec<(f32, u32)> = (0..500).map(|i| (logits[i], i as u32)).collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            all.truncate(k);
            assert_eq!(top_k_by_logit(&logits, k), all, "k {k}");
        }
    }

    #[test]
    fn uniform_is_in_unit_interval_and_spread() {
        let mut sum = 0.0;
        for pos in 0..10_000 {
            let u = uniform(3, pos);
            assert!((0.0..1.0).contains(&u));
            sum += u;
        }
        assert!((sum / 10_000.0 - 0.5).abs() < 0.02);
    }
}
