//! The losslessness check: every run's tokens must equal target-only decoding's tokens for the
//! same item and sampling setting.

use std::collections::HashMap;

use serde::Serialize;

/// One output that differs from the target-only reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    /// Eval item id.
    pub item: String,
    /// Mode label.
    pub mode: String,
    /// Sampling label.
    pub sampling: String,
    /// Concurrent sessions of the run.
    pub concurrency: usize,
    /// Repeat index.
    pub repeat: usize,
    /// First differing token position.
    pub first_difference: usize,
    /// Tokens target-only produced.
    pub expected: Vec<u32>,
    /// Tokens this run produced.
    pub got: Vec<u32>,
}

/// Index of the first position where `a` and `b` differ (a length difference counts), or `None`
/// when they are equal.
pub fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => Some(i),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

/// Where a run's output came from.
#[derive(Debug, Clone, Copy)]
pub struct RunLabel<'a> {
    /// Mode label.
    pub mode: &'a str,
    /// Sampling label.
    pub sampling: &'a str,
    /// Concurrent sessions.
    pub concurrency: usize,
    /// Repeat index.
    pub repeat: usize,
}

/// Reference outputs (the first target-only output per (sampling, item)) and the mismatches seen.
#[derive(Debug, Default)]
pub struct EqualityCheck {
    reference: HashMap<(String, String), Vec<u32>>,
    mismatches: Vec<Mismatch>,
    /// Speculative outputs compared.
    checked: usize,
    /// Target-only re-runs compared (determinism of the baseline).
    baseline_reruns: usize,
}

impl EqualityCheck {
    /// An empty check.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a target-only output as the reference if none is set; otherwise checks it.
    pub fn record_reference(&mut self, item: &str, tokens: &[u32], label: RunLabel<'_>) {
        let key = (label.sampling.to_owned(), item.to_owned());
        match self.reference.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.compare(item, tokens, label);
                self.baseline_reruns += 1;
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(tokens.to_vec());
            }
        }
    }

    /// Checks an output against the reference. Returns `false` on a mismatch. An output with no
    /// reference yet is an error of the schedule (target-only runs first) and panics.
    pub fn check(&mut self, item: &str, tokens: &[u32], label: RunLabel<'_>) -> bool {
        self.checked += 1;
        self.compare(item, tokens, label)
    }

    fn compare(&mut self, item: &str, tokens: &[u32], label: RunLabel<'_>) -> bool {
        let key = (label.sampling.to_owned(), item.to_owned());
        let expected = self
            .reference
            .get(&key)
            .unwrap_or_else(|| panic!("no target-only reference for {item} ({})", label.sampling));
        match first_difference(expected, tokens) {
            None => true,
            Some(i) => {
                self.mismatches.push(Mismatch {
                    item: item.to_owned(),
                    mode: label.mode.to_owned(),
                    sampling: label.sampling.to_owned(),
                    concurrency: label.concurrency,
                    repeat: label.repeat,
                    first_difference: i,
                    expected: expected.clone(),
                    got: tokens.to_vec(),
                });
                false
            }
        }
    }

    /// The reference tokens of an item.
    pub fn reference(&self, sampling: &str, item: &str) -> Option<&[u32]> {
        self.reference
            .get(&(sampling.to_owned(), item.to_owned()))
            .map(Vec::as_slice)
    }

    /// Every mismatch seen.
    pub fn mismatches(&self) -> &[Mismatch] {
        &self.mismatches
    }

    /// Speculative outputs compared with a reference.
    pub fn checked(&self) -> usize {
        self.checked
    }

    /// Target-only re-runs compared with the first target-only output.
    pub fn baseline_reruns(&self) -> usize {
        self.baseline_reruns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(mode: &str) -> RunLabel<'_> {
        RunLabel {
            mode,
            sampling: "greedy",
            concurrency: 1,
            repeat: 0,
        }
    }

    #[test]
    fn first_difference_finds_changes_and_truncations() {
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 9, 3]), Some(1));
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2]), Some(2));
        assert_eq!(first_difference(&[], &[4]), Some(0));
    }

    #[test]
    fn speculative_output_is_compared_with_the_first_target_only_output() {
        let mut c = EqualityCheck::new();
        c.record_reference("a", &[5, 6, 7], label("target-only"));
        assert!(c.check("a", &[5, 6, 7], label("chain:2")));
        assert!(!c.check("a", &[5, 6, 8], label("dynamic:4,2,8")));
        // A second target-only run is checked too (decoding must be deterministic).
        c.record_reference("a", &[5, 6], label("target-only"));
        assert_eq!(c.checked(), 2);
        assert_eq!(c.baseline_reruns(), 1);
        let m = c.mismatches();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].mode.as_str(), m[0].first_difference),
            ("dynamic:4,2,8", 2)
        );
        assert_eq!(
            (m[1].mode.as_str(), m[1].first_difference),
            ("target-only", 2)
        );
        assert_eq!(c.reference("greedy", "a"), Some(&[5, 6, 7][..]));
    }
}
