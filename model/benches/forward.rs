//! Criterion benchmarks of the forward passes speculative decoding is made of, on the bundled
//! demo pair (`models/target`, `models/draft`): target verification of a 4-ary tree of 1, 4,
//! 16 and 64 nodes (batch 1), four sessions of one node each, and one draft level; and on the
//! wide target (the demo target widened x4, built under `target/wide-models/` on first use,
//! the bench's memory-bound pair): verification of 1, 4, 8 and 16 nodes and a 60-row prefill.
//!
//! `cargo bench -p specllava-model --bench forward`; the benchmark harness (`scripts/bench`)
//! holds the same forwards against their roofline.

use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use specllava_model::{Device, ForwardTimer, Llava, TimedForward};

/// Committed prefix of every timed session (an image prompt plus a short answer).
const PREFIX: usize = 64;

fn load(name: &str) -> Option<Llava> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    if !dir.join("config.json").exists() {
        eprintln!("{} missing: skipping", dir.display());
        return None;
    }
    Some(Llava::load(&dir, &Device::Cpu).expect("load the demo checkpoint"))
}

/// The demo target widened x4 (function-preserving; see `specllava_model::widen`), built once.
fn load_wide() -> Option<Llava> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let src = root.join("models/target");
    let dir = root.join("target/wide-models/target-x4");
    if !src.join("config.json").exists() {
        return None;
    }
    if !dir.join("model.safetensors").exists() {
        specllava_model::widen::widen_checkpoint(&src, &dir, 4).expect("widen the demo target");
    }
    Some(Llava::load(&dir, &Device::Cpu).expect("load the wide checkpoint"))
}

fn wide_forwards(c: &mut Criterion) {
    let Some(wide) = load_wide() else { return };
    let mut timer = ForwardTimer::new(&wide, 1, PREFIX).expect("prefill");
    let mut group = c.benchmark_group("wide_target");
    group.sample_size(20);
    for nodes in [1, 4, 8, 16] {
        group.bench_function(format!("verify_batch1_nodes{nodes}"), |b| {
            b.iter(|| {
                timer
                    .run_forward(TimedForward::Tree { nodes, batch: 1 })
                    .expect("forward")
            })
        });
    }
    group.bench_function("prefill_rows60", |b| {
        b.iter(|| {
            timer
                .run_forward(TimedForward::Prefill { rows: 60 })
                .expect("forward")
        })
    });
    group.finish();
}

fn forwards(c: &mut Criterion) {
    if let Some(target) = load("target") {
        let mut timer = ForwardTimer::new(&target, 4, PREFIX).expect("prefill");
        let mut group = c.benchmark_group("target_verify");
        for nodes in [1, 4, 16, 64] {
            group.bench_function(format!("batch1_nodes{nodes}"), |b| {
                b.iter(|| {
                    timer
                        .run_forward(TimedForward::Tree { nodes, batch: 1 })
                        .expect("forward")
                })
            });
        }
        group.bench_function("batch4_nodes1", |b| {
            b.iter(|| {
                timer
                    .run_forward(TimedForward::Tree { nodes: 1, batch: 4 })
                    .expect("forward")
            })
        });
        group.finish();
    }
    if let Some(draft) = load("draft") {
        let mut timer = ForwardTimer::new(&draft, 1, PREFIX).expect("prefill");
        c.bench_function("draft_level_rows1", |b| {
            b.iter(|| {
                timer
                    .run_forward(TimedForward::Level { rows: 1 })
                    .expect("forward")
            })
        });
    }
}

criterion_group!(benches, forwards, wide_forwards);
criterion_main!(benches);
