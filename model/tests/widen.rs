//! The widened checkpoint (`specllava_model::widen`) computes the original's function: on
//! random tiny checkpoints of every layout (GQA and MHA, tied and untied heads, both tensor-name
//! layouts, f32 and f16, single file and shards), the prefill logits and a tree's logits at
//! every node equal the original's within 1e-4, and the widened decoder holds factor² times the
//! weights.

mod common;

use candle_core::DType;
use common::{IMAGE_TOKEN, Spec, max_abs_diff, pixels, write_checkpoint};
use specllava_model::widen::widen_checkpoint;
use specllava_model::{Device, Llava};

const TOL: f32 = 1e-4;

fn check(spec: &Spec, shards: usize, factor: usize) {
    let src = tempfile::tempdir().unwrap();
    write_checkpoint(src.path(), spec, shards);
    let dst = tempfile::tempdir().unwrap();
    widen_checkpoint(src.path(), dst.path(), factor).unwrap();
    let narrow = Llava::load(src.path(), &Device::Cpu).unwrap();
    let wide = Llava::load(dst.path(), &Device::Cpu).unwrap();

    let (n, w) = (&narrow.config().text, &wide.config().text);
    assert_eq!(w.hidden_size, factor * n.hidden_size);
    assert_eq!(w.num_attention_heads, factor * n.num_attention_heads);
    assert_eq!(w.num_key_value_heads, factor * n.num_key_value_heads);
    assert_eq!(w.head_dim, n.head_dim);
    assert_eq!(w.vocab_size, n.vocab_size);
    assert_eq!(wide.tile_tokens(), narrow.tile_tokens());

    let ids = [1u32, 5, IMAGE_TOKEN, 9, 17, 33];
    let image = [pixels(spec, 7)];
    let (mut kv_n, mut kv_w) = (narrow.new_kv(), wide.new_kv());
    let a = narrow.prefill(&mut kv_n, &ids, &image).unwrap();
    let b = wide.prefill(&mut kv_w, &ids, &image).unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d < TOL, "{spec:?} x{factor}: prefill logits differ by {d}");

    let tokens = [3u32, 8, 8, 21, 40];
    let parents = [-1, 0, 0, 1, 3];
    let a = narrow.forward_tree(&mut kv_n, &tokens, &parents).unwrap();
    let b = wide.forward_tree(&mut kv_w, &tokens, &parents).unwrap();
    let d = max_abs_diff(&a, &b);
    assert!(d < TOL, "{spec:?} x{factor}: tree logits differ by {d}");
}

#[test]
fn widened_checkpoints_keep_the_logits() {
    check(&Spec::default(), 1, 4);
    check(
        &Spec {
            kv_heads: 4,
            tied: true,
            current_layout: true,
            seed: 1,
            ..Spec::default()
        },
        2,
        3,
    );
    check(
        &Spec {
            heads: 8,
            kv_heads: 2,
            dtype: DType::F16,
            seed: 2,
            ..Spec::default()
        },
        1,
        2,
    );
}

#[test]
fn widening_is_deterministic_and_unknown_tensors_are_refused() {
    let spec = Spec::default();
    let src = tempfile::tempdir().unwrap();
    write_checkpoint(src.path(), &spec, 1);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    widen_checkpoint(src.path(), a.path(), 2).unwrap();
    widen_checkpoint(src.path(), b.path(), 2).unwrap();
    let read = |d: &std::path::Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(read(a.path()), read(b.path()));

    let mut tensors = common::tensors(&spec);
    tensors.insert(
        "language_model.model.layers.0.mystery.weight".into(),
        candle_core::Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, src.path().join("model.safetensors")).unwrap();
    let err = widen_checkpoint(src.path(), a.path(), 2).unwrap_err();
    assert!(err.to_string().contains("mystery"), "{err}");
}
