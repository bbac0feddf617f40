//! The vision encoder on the committed draft model: features computed once and served from
//! the cache after, equal to the tower's own; calls past the admitted number refused before
//! any work.

use std::path::Path;
use std::sync::Arc;

use specllava_model::{Device, ImageLimits, Llava};
use specllava_service_kit::VisionEncoder;
use specllava_service_kit::vision_encoder::EncodeError;

fn setup(max_calls: usize) -> (Arc<Llava>, VisionEncoder, bytes::Bytes) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = Arc::new(Llava::load(&root.join("models/draft"), &Device::Cpu).unwrap());
    let png = bytes::Bytes::from(
        std::fs::read(root.join("model/tests/fixtures/images/red_square.png")).unwrap(),
    );
    let encoder = VisionEncoder::new(
        Arc::clone(&model),
        ImageLimits::default(),
        1 << 20,
        max_calls,
    );
    (model, encoder, png)
}

#[tokio::test]
async fn features_are_the_towers_and_come_from_the_cache_the_second_time() {
    let (model, encoder, png) = setup(4);
    let first = encoder.encode(vec![png.clone()], 1).await.unwrap();
    let again = encoder.encode(vec![png.clone()], 1).await.unwrap();
    assert!(Arc::ptr_eq(&first, &again), "served from the cache");
    let proc = model.image_processor();
    let pixels = model
        .preprocess(&proc.decode(&png, &ImageLimits::default()).unwrap(), 1)
        .unwrap();
    let direct = model.vision_features(&[pixels]).unwrap();
    let (a, b) = (
        first[0]
            .rows
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        direct[0]
            .rows
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
    );
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    // A bad image is the caller's fault, and is not kept.
    let err = encoder
        .encode(vec![bytes::Bytes::from_static(b"not an image")], 1)
        .await
        .unwrap_err();
    assert!(matches!(err, EncodeError::Image(_)), "{err:?}");
}

#[tokio::test]
async fn calls_past_the_admitted_number_are_refused() {
    let (_, encoder, png) = setup(1);
    // The first call holds its admission while it decodes on a blocking thread; the second,
    // polled meanwhile, is refused.
    let (a, b) = tokio::join!(
        encoder.encode(vec![png.clone()], 1),
        encoder.encode(vec![png], 1)
    );
    assert!(a.is_ok());
    assert_eq!(b.unwrap_err(), EncodeError::Busy(1));
}
