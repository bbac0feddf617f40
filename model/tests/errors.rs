//! Clear errors for bad inputs and broken checkpoints, and loading variants (shards, f16/bf16).

mod common;

use std::io::Cursor;

use common::{Spec, max_abs_diff, model, pixels, write_checkpoint};
use specllava_model::{
    DType, Device, ImageLimits, ImageProcessor, Llava, LlavaTokenizer, ModelError,
};

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 9]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn processor() -> ImageProcessor {
    ImageProcessor::from_json("{}").unwrap()
}

#[test]
fn corrupt_and_oversized_images_are_rejected() {
    let p = processor();
    let lim = ImageLimits::default();
    let e = p.decode(b"definitely not an image", &lim).unwrap_err();
    assert!(
        matches!(e, ModelError::InvalidImage(_)) && e.is_invalid_input(),
        "{e}"
    );
    // A truncated PNG: valid signature, broken body.
    let mut bytes = png(40, 30);
    bytes.truncate(bytes.len() / 2);
    let e = p.decode(&bytes, &lim).unwrap_err();
    assert!(matches!(e, ModelError::InvalidImage(_)), "{e}");

    let bytes = png(100, 100);
    let e = p
        .decode(
            &bytes,
            &ImageLimits {
                max_bytes: 100,
                ..lim
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, ModelError::ImageTooLarge(_)) && e.to_string().contains("bytes"),
        "{e}"
    );
    let e = p
        .decode(
            &bytes,
            &ImageLimits {
                max_bytes: usize::MAX,
                max_pixels: 9_999,
                ..lim
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, ModelError::ImageTooLarge(_)) && e.to_string().contains("pixels"),
        "{e}"
    );
    assert!(e.is_invalid_input());

    let img = p.decode(&bytes, &lim).unwrap();
    let t = p.preprocess(&img).unwrap();
    assert_eq!(t.dims(), &[3, 224, 224]);
}

#[test]
fn missing_files_are_named() {
    let s = Spec::default();
    for (file, needle) in [
        ("config.json", "config.json"),
        ("model.safetensors", "model.safetensors"),
        ("preprocessor_config.json", "preprocessor_config.json"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &s, 1);
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let e = Llava::load(dir.path(), &Device::Cpu)
            .err()
            .expect("load must fail");
        assert!(matches!(e, ModelError::MissingFile { .. }), "{file}: {e}");
        assert!(e.to_string().contains(needle), "{file}: {e}");
        assert!(!e.is_invalid_input());
    }
    // A shard listed in the index is missing.
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &s, 3);
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let e = Llava::load(dir.path(), &Device::Cpu).err().unwrap();
    assert!(
        e.to_string().contains("model-00002-of-00003.safetensors"),
        "{e}"
    );

    let e = LlavaTokenizer::from_file(dir.path().join("tokenizer.json"))
        .err()
        .unwrap();
    assert!(
        matches!(e, specllava_prompt::PromptError::MissingFile { .. })
            && e.to_string().contains("tokenizer.json"),
        "{e}"
    );
}

#[test]
fn corrupt_files_are_named() {
    let s = Spec::default();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &s, 1);
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let e = Llava::load(dir.path(), &Device::Cpu).err().unwrap();
    assert!(
        matches!(e, ModelError::BadFile { .. }) && e.to_string().contains("model.safetensors"),
        "{e}"
    );
    std::fs::write(dir.path().join("config.json"), b"{ not json").unwrap();
    let e = Llava::load(dir.path(), &Device::Cpu).err().unwrap();
    assert!(e.to_string().contains("config.json"), "{e}");
    std::fs::write(dir.path().join("tokenizer.json"), b"{}").unwrap();
    let e = LlavaTokenizer::from_file(dir.path().join("tokenizer.json"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
}

#[test]
fn inconsistent_config_names_the_tensor() {
    let s = Spec::default();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &s, 1);
    let path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["text_config"]["hidden_size"] = 48.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = Llava::load(dir.path(), &Device::Cpu).err().unwrap();
    let msg = e.to_string();
    assert!(matches!(e, ModelError::Config(_)), "{msg}");
    assert!(
        msg.contains(".weight has shape") && msg.contains("48"),
        "{msg}"
    );

    // More layers than the checkpoint has: the missing tensor is named.
    cfg["text_config"]["hidden_size"] = s.hidden.into();
    cfg["text_config"]["num_hidden_layers"] = 5.into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = Llava::load(dir.path(), &Device::Cpu).err().unwrap();
    assert!(
        matches!(e, ModelError::MissingTensor { .. }) && e.to_string().contains("layers.2."),
        "{e}"
    );
}

/// Writes the checkpoint of `s` (half precision) with every tensor widened to f32: the f32
/// model of the rounded weights.
fn write_f32_copy(dir: &std::path::Path, s: &Spec) {
    write_checkpoint(
        dir,
        &Spec {
            dtype: DType::F32,
            ..s.clone()
        },
        1,
    );
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = common::tensors(s)
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

#[test]
fn sharded_and_half_precision_checkpoints_load() {
    let base = Spec::default();
    let (_d, reference) = model(&base);
    let img = pixels(&base, 1);
    let ids = [1u32, 4, common::IMAGE_TOKEN, 5, 6];
    let want = reference
        .prefill(&mut reference.new_kv(), &ids, std::slice::from_ref(&img))
        .unwrap();
    for (shards, dtype, current) in [
        (3, DType::F32, false),
        (2, DType::F32, true),
        (1, DType::BF16, false),
        (1, DType::F16, true),
    ] {
        let s = Spec {
            dtype,
            current_layout: current,
            ..base.clone()
        };
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &s, shards);
        let m = Llava::load(dir.path(), &Device::Cpu).unwrap();
        let got = m
            .prefill(&mut m.new_kv(), &ids, std::slice::from_ref(&img))
            .unwrap();
        // A half-precision checkpoint is the f32 model of its rounded weights: weights are
        // widened exactly and activations stay f32, so it matches an f32 checkpoint of the
        // same rounded values as closely as two f32 checkpoints match each other.
        let want = if dtype == DType::F32 {
            want.clone()
        } else {
            let rounded = tempfile::tempdir().unwrap();
            write_f32_copy(rounded.path(), &s);
            let r = Llava::load(rounded.path(), &Device::Cpu).unwrap();
            r.prefill(&mut r.new_kv(), &ids, std::slice::from_ref(&img))
                .unwrap()
        };
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{shards} shards {dtype:?}: diff {d}");
    }
}

#[test]
fn bad_requests_are_invalid_input() {
    let s = Spec::default();
    let (_d, m) = model(&s);
    let mut kv = m.new_kv();
    m.prefill(&mut kv, &[1, 2, 3], &[]).unwrap();
    let cases: Vec<(Result<_, ModelError>, &str)> = vec![
        (m.forward_tree(&mut kv, &[1, 2], &[-1]), "parents"),
        (m.forward_tree(&mut kv, &[1, 2], &[-1, 1]), "parent 1"),
        (m.forward_tree(&mut kv, &[1, 2], &[-1, -2]), "parent -2"),
        (m.forward_tree(&mut kv, &[], &[]), "no nodes"),
        (m.forward_tree(&mut kv, &[1, 999], &[-1, 0]), "999"),
        (m.prefill(&mut kv, &[1, common::IMAGE_TOKEN], &[]), "image"),
        (m.prefill(&mut kv, &[], &[]), "empty"),
    ];
    for (r, needle) in cases {
        let e = r.expect_err("must fail");
        assert!(
            e.is_invalid_input() && e.to_string().contains(needle),
            "{needle}: {e}"
        );
    }
    // Nothing was changed by the failed calls.
    assert_eq!((kv.committed_len(), kv.pending_len()), (3, 0));
    m.forward_tree(&mut kv, &[4, 5], &[-1, 0]).unwrap();
    assert!(
        m.prefill(&mut kv, &[1], &[])
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(kv.commit(&[1]).unwrap_err().is_invalid_input()); // not a root
    assert!(kv.commit(&[0, 0]).unwrap_err().is_invalid_input());
    assert!(kv.commit(&[7]).unwrap_err().is_invalid_input());
    kv.commit(&[0, 1]).unwrap();
    assert_eq!(kv.committed_len(), 5);
    // Wrong image shape.
    let bad = pixels(
        &Spec {
            image: 12,
            ..s.clone()
        },
        0,
    );
    let e = m
        .prefill(&mut m.new_kv(), &[1, common::IMAGE_TOKEN], &[bad])
        .unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
}
