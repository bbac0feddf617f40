//! Fuzzing the model services' request decoding and validation: arbitrary bytes, and
//! encodings of near-valid requests with bytes flipped or cut, go through
//! `prost::Message::decode` of every request of `Draft` and `Target`, then the validation the
//! handlers run (`convert`'s tree, sampling, stop and draft-param conversions, and
//! [`prepare_prefill`]'s token and image checks against the committed draft model). Each
//! must answer or refuse cleanly, never panic or allocate beyond the cap.
//! `SPECLLAVA_FUZZ_CASES` sets the case count.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use prost::Message;
use specllava_harness::fuzz::{CappedAlloc, byte_edits};
use specllava_model::{Device, ImageLimits, Llava};
use specllava_proto::v1 as pb;
use specllava_service_kit::worker::WorkerError;
use specllava_service_kit::{VisionEncoder, prepare_prefill};
use specllava_wire::convert::{
    draft_params_from_proto, sampling_from_proto, stop_from_proto, tree_from_proto,
};
use speculate::TreeLimits;

#[global_allocator]
static ALLOC: CappedAlloc<{ 256 << 20 }> = CappedAlloc;

const DEFAULT_CASES: u32 = 500;

const TREE: TreeLimits = TreeLimits {
    max_nodes: 64,
    max_depth: 16,
    vocab_size: 1000,
};

const IMAGES: ImageLimits = ImageLimits {
    max_bytes: 64 << 10,
    max_pixels: 1 << 16,
    max_side: 1 << 12,
    max_alloc_bytes: 64 << 20,
    max_images: 8,
    max_image_tokens: 4096,
};

fn runner() -> (TestRunner, u32) {
    specllava_harness::fuzz::runner(DEFAULT_CASES)
}

/// The validation `Target.Verify` runs before its worker.
fn validate_verify(r: pb::VerifyRequest) {
    let _ = tree_from_proto(r.tree.unwrap_or_default(), &TREE);
    let _ = sampling_from_proto(r.sampling);
    let stop = stop_from_proto(r.stop);
    assert!(stop.max_new_tokens >= 1);
}

/// Every field of a `VerifyRequest`, near-valid: small trees, sampling values around the
/// valid ranges and their edges (NaN, infinities, negatives).
fn verify_request() -> impl Strategy<Value = pb::VerifyRequest> {
    let f = prop_oneof![
        -2f32..3.0,
        Just(0.0),
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(-f32::INFINITY),
        any::<f32>()
    ];
    (
        prop::collection::vec(0u32..1100, 0..70),
        prop::collection::vec(-2i32..70, 0..70),
        prop::collection::vec(f.clone(), 0..70),
        (f.clone(), any::<u32>(), f, any::<u64>()),
        (prop::collection::vec(any::<u32>(), 0..4), any::<u32>()),
        any::<u64>(),
    )
        .prop_map(|(tokens, parents, scores, s, stop, kv)| pb::VerifyRequest {
            session_id: "s".into(),
            expected_kv_len: kv,
            tree: Some(pb::TokenTree {
                tokens,
                parents,
                scores,
            }),
            sampling: Some(pb::SamplingParams {
                temperature: s.0,
                top_k: s.1,
                top_p: s.2,
                seed: s.3,
            }),
            stop: Some(pb::StopConditions {
                eos_token_ids: stop.0,
                max_new_tokens: stop.1,
            }),
        })
}

#[test]
fn fuzz_verify_request() {
    let (mut runner, n) = runner();
    runner
        .run(&(verify_request(), byte_edits()), |(r, e)| {
            validate_verify(r.clone());
            if let Ok(d) = pb::VerifyRequest::decode(&e.apply(r.encode_to_vec())[..]) {
                validate_verify(d);
            }
            Ok(())
        })
        .unwrap();
    println!("fuzz_verify_request: {n} cases");
}

#[test]
fn fuzz_speculate_request() {
    let (mut runner, n) = runner();
    let req = (
        prop::collection::vec(any::<u32>(), 0..8),
        prop::collection::vec(any::<u32>(), 0..8),
        (any::<i32>(), any::<u32>(), any::<u32>(), any::<u32>()),
        any::<bool>(),
    )
        .prop_map(
            |(new_tokens, accepted_path, p, answer_ahead)| pb::SpeculateRequest {
                session_id: "s".into(),
                new_tokens,
                accepted_path,
                params: Some(pb::DraftParams {
                    mode: p.0,
                    depth: p.1,
                    branching: p.2,
                    budget: p.3,
                }),
                draft_ahead: true,
                answer_ahead,
            },
        );
    runner
        .run(&(req, byte_edits()), |(r, e)| {
            let bytes = e.apply(r.encode_to_vec());
            if let Ok(d) = pb::SpeculateRequest::decode(&bytes[..]) {
                // A known mode converts with the depth asked for; an unknown one is refused.
                if let Ok(p) = draft_params_from_proto(d.params) {
                    prop_assert_eq!(p.depth, d.params.unwrap_or_default().depth as usize);
                }
            }
            Ok(())
        })
        .unwrap();
    println!("fuzz_speculate_request: {n} cases");
}

/// Arbitrary bytes decoded as every request message of `Draft` and `Target`.
#[test]
fn fuzz_raw_bytes_as_every_request() {
    let (mut runner, n) = runner();
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..256), |bytes| {
            if let Ok(r) = pb::VerifyRequest::decode(&bytes[..]) {
                validate_verify(r);
            }
            if let Ok(r) = pb::SpeculateRequest::decode(&bytes[..]) {
                let _ = draft_params_from_proto(r.params);
            }
            let _ = pb::OpenSessionRequest::decode(&bytes[..]);
            let _ = pb::AppendRequest::decode(&bytes[..]);
            let _ = pb::CloseSessionRequest::decode(&bytes[..]);
            let _ = pb::InfoRequest::decode(&bytes[..]);
            Ok(())
        })
        .unwrap();
    println!("fuzz_raw_bytes_as_every_request: {n} cases");
}

#[test]
fn length_prefixes_claiming_gigabytes_are_refused() {
    // Field 2 (images) with a length prefix of 2^40 and 3 bytes behind it: prost checks the
    // length against the buffer before reserving anything.
    let mut bytes = vec![0x12];
    prost::encoding::encode_varint(1 << 40, &mut bytes);
    bytes.extend_from_slice(b"abc");
    assert!(pb::OpenSessionRequest::decode(&bytes[..]).is_err());
    // Packed token ids (field 3) claiming 2^31 bytes.
    let mut bytes = vec![0x1a];
    prost::encoding::encode_varint(1 << 31, &mut bytes);
    bytes.extend_from_slice(&[1, 2, 3]);
    assert!(pb::AppendRequest::decode(&bytes[..]).is_err());
}

/// `OpenSession` / `Append` prefill validation (the tiny draft model's vocabulary, image id
/// and preprocessor): token ids anywhere near and past the vocabulary, placeholders against
/// image counts, and image bytes random or real.
#[test]
fn fuzz_prefill_validation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = Arc::new(Llava::load(&root.join("models/draft"), &Device::Cpu).unwrap());
    let (vocab, image_id) = (
        model.config().text.vocab_size as u32,
        model.config().image_token_id,
    );
    let png = std::fs::read(root.join("model/tests/fixtures/images/red_square.png")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let encoder = VisionEncoder::new(Arc::clone(&model), IMAGES, 1 << 20, 8);
    let token = prop_oneof![
        40 => 0..vocab,
        2 => Just(image_id),
        1 => Just(vocab),
        1 => vocab..vocab + 10,
        1 => any::<u32>(),
    ];
    let flipped = png.clone();
    let image = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        Just(png),
        (any::<usize>(), any::<u8>()).prop_map(move |(i, b)| {
            let mut p = flipped.clone();
            let n = p.len();
            p[i % n] ^= b | 1;
            p
        }),
    ];
    // Vision features: the model's own shape (random values, sometimes not finite), or a
    // wrong shape or byte count.
    let (rows, dim) = (
        model.tile_tokens() as u32,
        model.vision_feature_dim() as u32,
    );
    let feature = prop_oneof![
        (any::<u32>(), any::<bool>()).prop_map(move |(seed, finite)| {
            let mut data: Vec<u8> = (0..rows * dim)
                .flat_map(|i| ((i ^ seed) as f32 / 1e9).to_le_bytes())
                .collect();
            if !finite {
                data[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            }
            pb::VisionFeatures {
                rows,
                dim,
                data: data.into(),
                image_height: 8,
                image_width: 8,
            }
        }),
        (
            0..rows + 2,
            0..dim + 2,
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(rows, dim, data)| pb::VisionFeatures {
                rows,
                dim,
                data: data.into(),
                image_height: 8,
                image_width: 8,
            }),
    ];
    // Half the requests get exactly one placeholder per image and in-vocabulary ids, so the
    // images are decoded; some send vision features instead of images, some both.
    let req = (
        prop::collection::vec(token, 0..24),
        prop::collection::vec(image, 0..3),
        prop::collection::vec(feature, 0..3),
        0..4u8,
        any::<bool>(),
    )
        .prop_map(move |(mut token_ids, images, features, pick, consistent)| {
            let (images, image_features) = match pick {
                0 => (Vec::new(), features),
                1 => (images, features),
                _ => (images, Vec::new()),
            };
            if consistent {
                token_ids.retain(|&t| t != image_id);
                token_ids.iter_mut().for_each(|t| *t %= vocab);
                let n = images.len().max(image_features.len());
                token_ids.splice(0..0, std::iter::repeat_n(image_id, n));
                token_ids.push(1);
            }
            pb::OpenSessionRequest {
                session_id: "s".into(),
                images: images.into_iter().map(Into::into).collect(),
                token_ids,
                image_features,
                first_step: None,
                conversation_images: 0,
            }
        });
    let (mut runner, n) = runner();
    let prefilled = std::cell::Cell::new(0);
    runner
        .run(&(req, byte_edits()), |(r, e)| {
            let bytes = e.apply(r.encode_to_vec());
            for r in [Some(r), pb::OpenSessionRequest::decode(&bytes[..]).ok()]
                .into_iter()
                .flatten()
            {
                let (tokens, images, features) = (r.token_ids, r.images, r.image_features);
                let n_images = images.len().max(features.len());
                let both = !images.is_empty() && !features.is_empty();
                match rt.block_on(prepare_prefill(
                    &encoder, &tokens, images, features, n_images,
                )) {
                    Ok(t) => {
                        prefilled.set(prefilled.get() + 1);
                        prop_assert!(!both, "images and features are alternatives");
                        prop_assert_eq!(t.len(), n_images);
                        prop_assert!(tokens.iter().all(|&t| t < vocab));
                    }
                    // Bad input is the caller's fault, never an internal error.
                    Err(WorkerError::InvalidArgument(m)) => prop_assert!(!m.is_empty()),
                    Err(e) => prop_assert!(false, "not an invalid argument: {e}"),
                }
            }
            Ok(())
        })
        .unwrap();
    let ok = prefilled.get();
    println!("fuzz_prefill_validation: {n} cases, {ok} requests accepted (images encoded)");
}
