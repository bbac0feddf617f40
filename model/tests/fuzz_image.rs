//! Fuzzing image decoding under [`ImageLimits`] and CLIP preprocessing: random bytes, and
//! real PNG / JPEG / WebP encodings (from the `image` crate's encoders) with their
//! dimensions rewritten, bytes flipped or cut short. Every input decodes or fails with
//! `InvalidImage` / `ImageTooLarge`; nothing panics, and no single allocation exceeds the
//! cap (a claimed size is checked before the pixel buffer exists). What decodes is
//! preprocessed into the model's `[3, 48, 48]` input. `SPECLLAVA_FUZZ_CASES` sets the count.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use specllava_harness::fuzz::CappedAlloc;
use specllava_model::{ImageLimits, ImageProcessor, ModelError, decode_image};
use specllava_prompt::PromptError;

#[global_allocator]
static ALLOC: CappedAlloc<{ 256 << 20 }> = CappedAlloc;

const DEFAULT_CASES: u32 = 300;

/// 64 KiB and 2^16 pixels: small enough that every accepted image decodes quickly.
const LIMITS: ImageLimits = ImageLimits {
    max_bytes: 64 << 10,
    max_pixels: 1 << 16,
    max_side: 1 << 12,
    max_alloc_bytes: 64 << 20,
    max_images: 8,
    max_image_tokens: 4096,
};

fn processor() -> ImageProcessor {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/target");
    ImageProcessor::from_file(dir.join("preprocessor_config.json")).unwrap()
}

fn encode(w: u32, h: u32, seed: u8, format: ImageFormat) -> Vec<u8> {
    let img = RgbImage::from_fn(w, h, |x, y| {
        Rgb([x as u8 ^ seed, y as u8, (x + y) as u8 ^ seed.rotate_left(3)])
    });
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img)
        .write_to(&mut out, format)
        .unwrap();
    out.into_inner()
}

/// Rewrites the claimed width and height in the header (PNG IHDR, with its CRC fixed;
/// JPEG SOFn), leaving the pixel data as it was.
fn set_dims(bytes: &mut [u8], format: ImageFormat, w: u32, h: u32) {
    match format {
        ImageFormat::Png => specllava_harness::png::set_png_dims(bytes, w, h),
        ImageFormat::Jpeg => {
            if let Some(i) = bytes
                .windows(2)
                .position(|m| m[0] == 0xff && matches!(m[1], 0xc0..=0xc2))
                && i + 9 <= bytes.len()
            {
                bytes[i + 5..i + 7].copy_from_slice(&(h as u16).to_be_bytes());
                bytes[i + 7..i + 9].copy_from_slice(&(w as u16).to_be_bytes());
            }
        }
        _ => {}
    }
}

/// A mutation of an encoded image.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    Dims(u32, u32),
    Flip(Vec<(usize, u8)>),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let dim = prop_oneof![0u32..300, Just(0), Just(1), Just(65_535), any::<u32>()];
    prop_oneof![
        1 => Just(Mutation::None),
        3 => (dim.clone(), dim).prop_map(|(w, h)| Mutation::Dims(w, h)),
        3 => prop::collection::vec((any::<usize>(), any::<u8>()), 1..8).prop_map(Mutation::Flip),
        2 => any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, format: ImageFormat, m: &Mutation) -> Vec<u8> {
    match m {
        Mutation::None => {}
        Mutation::Dims(w, h) => set_dims(&mut bytes, format, *w, *h),
        Mutation::Flip(edits) => {
            let n = bytes.len();
            for &(i, b) in edits {
                bytes[i % n] ^= b | 1;
            }
        }
        Mutation::Truncate(at) => bytes.truncate(at % bytes.len().max(1)),
    }
    bytes
}

/// Decodes under `limits`, then preprocesses what decoded; panics only on a wrong error
/// kind or a wrongly shaped output.
fn check(proc: &ImageProcessor, bytes: &[u8], limits: &ImageLimits) -> Result<(), TestCaseError> {
    match proc.decode(bytes, limits) {
        Ok(img) => {
            prop_assert!(u64::from(img.width()) * u64::from(img.height()) <= limits.max_pixels);
            match proc.preprocess(&img) {
                Ok(t) => prop_assert_eq!(t.dims(), &[3, 48, 48]),
                Err(e) => prop_assert!(e.is_invalid_input(), "{e}"),
            }
        }
        Err(ModelError::InvalidImage(_) | ModelError::ImageTooLarge(_)) => {}
        Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
    }
    Ok(())
}

fn runner() -> (TestRunner, u32) {
    specllava_harness::fuzz::runner(DEFAULT_CASES)
}

#[test]
fn fuzz_image_random_bytes() {
    let proc = processor();
    let (mut runner, n) = runner();
    // Random bytes, and random bytes behind a real signature so the decoders get past it.
    let magic = prop_oneof![
        Just(Vec::new()),
        Just(b"\x89PNG\r\n\x1a\n".to_vec()),
        Just(vec![0xff, 0xd8, 0xff]),
        Just(b"RIFF\0\0\0\0WEBPVP8L".to_vec()),
    ];
    runner
        .run(
            &(magic, prop::collection::vec(any::<u8>(), 0..512)),
            |(mut bytes, tail)| {
                bytes.extend(tail);
                check(&proc, &bytes, &LIMITS)
            },
        )
        .unwrap();
    println!("fuzz_image_random_bytes: {n} cases");
}

#[test]
fn fuzz_image_mutated_encodings() {
    let proc = processor();
    let (mut runner, n) = runner();
    let format = prop_oneof![
        Just(ImageFormat::Png),
        Just(ImageFormat::Jpeg),
        Just(ImageFormat::WebP)
    ];
    runner
        .run(
            &(1u32..40, 1u32..40, any::<u8>(), format, mutation()),
            |(w, h, seed, format, m)| {
                let bytes = apply(encode(w, h, seed, format), format, &m);
                check(&proc, &bytes, &LIMITS)
            },
        )
        .unwrap();
    println!("fuzz_image_mutated_encodings: {n} cases");
}

#[test]
fn claimed_sizes_are_refused_before_allocating() {
    // 65535 x 65535 claimed in a 1x1 PNG: over the pixel limit, refused from the header.
    let mut png = encode(1, 1, 0, ImageFormat::Png);
    set_dims(&mut png, ImageFormat::Png, 65_535, 65_535);
    let e = decode_image(&png, &ImageLimits::default()).unwrap_err();
    assert!(matches!(e, PromptError::ImageTooLarge(_)), "{e}");
    let mut jpg = encode(8, 8, 0, ImageFormat::Jpeg);
    set_dims(&mut jpg, ImageFormat::Jpeg, 65_535, 65_535);
    let e = decode_image(&jpg, &ImageLimits::default()).unwrap_err();
    assert!(matches!(e, PromptError::ImageTooLarge(_)), "{e}");
}

#[test]
fn extreme_aspect_ratios_are_refused_before_resizing() {
    // 1 x 60000 (under the pixel limit) would resize to 48 x 2.88M: refused instead.
    let img = DynamicImage::ImageRgb8(RgbImage::new(1, 60_000));
    let e = processor().preprocess(&img).unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
}
