//! The LLaVA-NeXT variant of a LLaVA-1.5 checkpoint (`specllava_model::next_checkpoint`), the
//! any-resolution target of the serving tests.

use specllava_model::{Device, Llava};

/// The demo target as LLaVA-NeXT: it loads, tiles a wide image into two tiles plus the base
/// one, and its text-only logits are the source's (the decoder is unchanged).
#[test]
fn a_next_variant_of_the_demo_target_tiles_images() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/target");
    let dst = tempfile::tempdir().unwrap();
    specllava_model::next_checkpoint::llava_next_checkpoint(
        &src,
        dst.path(),
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
