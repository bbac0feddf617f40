//! Knobs shared by the fuzz harnesses (`*/tests/fuzz_*.rs`): the case count, the byte
//! edits applied to valid encodings, and an allocator that turns any single huge
//! allocation into a loud failure.

use std::alloc::{GlobalAlloc, Layout, System};

/// The environment variable holding the number of cases each harness runs.
pub const CASES_VAR: &str = "SPECLLAVA_FUZZ_CASES";

/// Cases per harness: `SPECLLAVA_FUZZ_CASES` when set (`scripts/fuzz` sets it), else
/// `default` (small, so the ordinary test run stays fast).
pub fn cases(default: u32) -> u32 {
    std::env::var(CASES_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// A proptest runner for [`cases`]`(default)` cases (no failure persistence: the harnesses
/// print their seeds), and that count.
pub fn runner(default: u32) -> (proptest::test_runner::TestRunner, u32) {
    let n = cases(default);
    let cfg = proptest::test_runner::Config {
        cases: n,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    };
    (proptest::test_runner::TestRunner::new(cfg), n)
}

/// Edits of an encoding: up to three bytes XOR-ed (positions wrap) and maybe a cut.
#[derive(Debug, Clone)]
pub struct ByteEdits {
    /// (position, XOR mask) pairs.
    pub flips: Vec<(usize, u8)>,
    /// Where to cut (wraps to the length), if anywhere.
    pub cut: Option<usize>,
}

impl ByteEdits {
    /// Applies the edits to `bytes`.
    pub fn apply(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        if !bytes.is_empty() {
            let n = bytes.len();
            for &(i, b) in &self.flips {
                bytes[i % n] ^= b;
            }
        }
        if let Some(c) = self.cut {
            bytes.truncate(c % (bytes.len() + 1));
        }
        bytes
    }
}

/// [`ByteEdits`] with 0-3 flips and a cut half the time.
pub fn byte_edits() -> impl proptest::strategy::Strategy<Value = ByteEdits> {
    use proptest::prelude::*;
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        prop::option::of(any::<usize>()),
    )
        .prop_map(|(flips, cut)| ByteEdits { flips, cut })
}

/// The system allocator refusing any single allocation over `LIMIT` bytes, so an input
/// that makes the code trust a claimed size aborts the harness ("memory allocation of N
/// bytes failed") instead of passing or swapping. Install it in a harness with
/// `#[global_allocator] static A: CappedAlloc<{ 256 << 20 }> = CappedAlloc;`.
pub struct CappedAlloc<const LIMIT: usize>;

// SAFETY: forwards to `System`, or returns null (a failed allocation) for oversized requests.
unsafe impl<const LIMIT: usize> GlobalAlloc for CappedAlloc<LIMIT> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > LIMIT {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
