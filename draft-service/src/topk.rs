//! Top-k log-probabilities of a logits row.

/// The `k` most likely tokens of `logits` with their log-probabilities
/// (log-softmax), sorted by log-probability descending, lowest id first on ties.
pub fn top_k_log_probs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(logits.len());
    if k == 0 {
        return Vec::new();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&x| (x - max).exp()).sum();
    let log_z = max + sum.ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx.into_iter()
        .map(|i| (i, logits[i as usize] - log_z))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_largest_with_log_softmax() {
        let out = top_k_log_probs(&[0.0, 2.0, 1.0, 2.0], 3);
        let ids: Vec<u32> = out.iter().map(|p| p.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        let z = (1.0f32 + 2.0f32.exp() * 2.0 + 1.0f32.exp()).ln();
        assert!((out[0].1 - (2.0 - z)).abs() < 1e-5);
        assert!(top_k_log_probs(&[1.0], 0).is_empty());
        assert_eq!(top_k_log_probs(&[1.0, 3.0], 5).len(), 2);
    }
}
