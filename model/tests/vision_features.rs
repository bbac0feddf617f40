//! Vision features computed by one model stand in for the images of another with the same
//! vision fingerprint (the demo pair shares its CLIP tower): a prefill from the features is
//! the prefill from the images, bit for bit.

use std::path::Path;

use specllava_model::{Device, ImageLimits, Llava, PrefillImages};

fn demo(name: &str) -> Option<Llava> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    if !dir.join("config.json").exists() {
        eprintln!("{} missing: skipping", dir.display());
        return None;
    }
    Some(Llava::load(&dir, &Device::Cpu).expect("load the demo checkpoint"))
}

#[test]
fn features_from_the_target_prefill_the_draft_as_its_own_images_do() {
    let (Some(target), Some(draft)) = (demo("target"), demo("draft")) else {
        return;
    };
    assert!(!target.vision_fingerprint().is_empty());
    assert_eq!(target.vision_fingerprint(), draft.vision_fingerprint());
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/shapes.webp"),
    )
    .unwrap();
    let proc = target.image_processor();
    let img = proc.decode(&bytes, &ImageLimits::default()).unwrap();
    let pixels = target.preprocess(&img, 1).unwrap();
    let features = target
        .vision_features(std::slice::from_ref(&pixels))
        .unwrap();
    assert_eq!(
        features[0].rows.dims(),
        [target.tile_tokens(), target.vision_feature_dim()]
    );
    let image_id = target.config().image_token_id;
    let ids = [1, image_id, 17, 23, 42];
    for model in [&target, &draft] {
        let mut from_pixels = model.new_kv();
        let a = model
            .prefill_images(
                &mut from_pixels,
                &ids,
                &PrefillImages::Pixels(vec![pixels.clone()]),
            )
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut from_features = model.new_kv();
        let b = model
            .prefill_images(
                &mut from_features,
                &ids,
                &PrefillImages::VisionFeatures(features.clone()),
            )
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "the same logits, bit for bit"
        );
        assert_eq!(from_pixels.committed_len(), from_features.committed_len());
    }
}

#[test]
fn features_of_another_shape_are_refused() {
    let Some(target) = demo("target") else {
        return;
    };
    let wrong = specllava_model::VisionFeatures {
        rows: specllava_model::Tensor::zeros(
            (target.tile_tokens() + 1, target.vision_feature_dim()),
            specllava_model::DType::F32,
            target.device(),
        )
        .unwrap(),
        image_size: (8, 8),
    };
    let image_id = target.config().image_token_id;
    let err = target
        .prefill_images(
            &mut target.new_kv(),
            &[1, image_id, 5],
            &PrefillImages::VisionFeatures(vec![wrong]),
        )
        .unwrap_err();
    assert!(err.to_string().contains("vision features"), "{err}");
}
