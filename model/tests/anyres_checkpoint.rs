//! The LLaVA-NeXT and LLaVA-OneVision variants of a LLaVA-1.5 checkpoint
//! (`specllava_model::anyres_checkpoint`), the any-resolution targets of the serving tests.

use specllava_model::anyres_checkpoint::{AnyResKind, anyres_checkpoint};
use specllava_model::{Device, Llava};

/// The demo target as LLaVA-NeXT: it loads, tiles a wide image into two tiles plus the base
/// one, and its text-only logits are the source's (the decoder is unchanged).
#[test]
fn a_next_variant_of_the_demo_target_tiles_images() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/target");
    let dst = tempfile::tempdir().unwrap();
    anyres_checkpoint(
        &src,
        dst.path(),
        AnyResKind::Next,
        &[(48, 48), (48, 96), (96, 48)],
    )
    .unwrap();
    let narrow = Llava::load(&src, &Device::Cpu).unwrap();
    let next = Llava::load(dst.path(), &Device::Cpu).unwrap();
    assert_eq!(
        next.config().architecture,
        specllava_model::Architecture::LlavaNext
    );
    // 36 base rows, then a 6 x 12 grid, unpadded to the 60 x 100 image's 6 x 10, with a
    // newline a row.
    assert_eq!(next.image_token_count((60, 100), 1), 36 + 6 * 11);
    let ids = [1u32, 17, 23, 42];
    let a = narrow.prefill(&mut narrow.new_kv(), &ids, &[]).unwrap();
    let b = next.prefill(&mut next.new_kv(), &ids, &[]).unwrap();
    assert_eq!(
        a.to_vec1::<f32>().unwrap(),
        b.to_vec1::<f32>().unwrap(),
        "same decoder"
    );
}

/// The demo target as LLaVA-OneVision: a big image's grid is shrunk to `anyres_max_1`, and an
/// image of a several-image prompt is one padded tile plus a newline row.
#[test]
fn a_onevision_variant_of_the_demo_target_shrinks_and_skips_tiling() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/target");
    let dst = tempfile::tempdir().unwrap();
    let pinpoints = [(48, 48), (48, 96), (96, 48), (96, 96)];
    anyres_checkpoint(
        &src,
        dst.path(),
        AnyResKind::Onevision { max_tiles: 1 },
        &pinpoints,
    )
    .unwrap();
    let m = Llava::load(dst.path(), &Device::Cpu).unwrap();
    assert_eq!(
        m.config().architecture,
        specllava_model::Architecture::LlavaOnevision
    );
    // 100 x 100: the 96 x 96 pinpoint, a 12 x 12 grid, shrunk by sqrt(144 / 36) = 2 to 6 x 6.
    assert_eq!(m.image_token_count((100, 100), 1), 36 + 6 * 7);
    assert_eq!(m.image_token_count((100, 100), 2), 36 + 1);
}
