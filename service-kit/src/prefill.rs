//! Validation and image preparation for session prefills (open / append),
//! shared by the draft and target services.

use bytes::Bytes;
use candle_core::Tensor;
use specllava_model::{ImageTokens, KvCache, Llava, ModelError, PrefillImages, VisionFeatures};
use specllava_proto::v1 as pb;

use crate::vision_encoder::VisionEncoder;
use crate::worker::WorkerError;

/// Checks history tokens (vocabulary, placeholder count, root not a placeholder) and
/// prepares the images (of a conversation of `conversation_images` images) as vision features: the `encoder`'s (decoded, preprocessed and run
/// through the tower off the async runtime, or from its cache), or, when the request
/// carries `features` instead, those checked and read.
pub async fn prepare_prefill(
    encoder: &VisionEncoder,
    tokens: &[u32],
    images: Vec<Bytes>,
    features: Vec<pb::VisionFeatures>,
    conversation_images: usize,
) -> Result<PrefillImages, WorkerError> {
    let model = encoder.model();
    let cfg = model.config();
    let vocab = cfg.text.vocab_size;
    let image_id = cfg.image_token_id;
    let invalid = |m: String| WorkerError::InvalidArgument(m);
    let Some(&last) = tokens.last() else {
        return Err(invalid("token_ids must not be empty".into()));
    };
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(invalid(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    if last == image_id {
        return Err(invalid(
            "the last token (the root) must not be an image placeholder".into(),
        ));
    }
    if !images.is_empty() && !features.is_empty() {
        return Err(invalid(
            "images and image_features are alternatives: send one of them".into(),
        ));
    }
    let given = images.len().max(features.len());
    let placeholders = tokens.iter().filter(|&&t| t == image_id).count();
    if placeholders != given {
        return Err(invalid(format!(
            "{placeholders} image placeholders but {given} images"
        )));
    }
    if !features.is_empty() {
        return vision_features_from_proto(model, &features)
            .map(PrefillImages::VisionFeatures)
            .map_err(invalid);
    }
    if images.is_empty() {
        return Ok(PrefillImages::none());
    }
    let features = encoder.encode(images, conversation_images).await?;
    Ok(PrefillImages::VisionFeatures(features.to_vec()))
}

/// Reads vision features sent for `model`: each `[tiles * tile_tokens, vision_feature_dim]`
/// f32 values (one tile unless the model tiles images), all finite.
pub fn vision_features_from_proto(
    model: &Llava,
    features: &[pb::VisionFeatures],
) -> Result<Vec<VisionFeatures>, String> {
    let (tile, dim) = (model.tile_tokens(), model.vision_feature_dim());
    // The base tile plus the largest pinpoint's tiles.
    let max_tiles = match model.image_tokens() {
        ImageTokens::Fixed(_) => 1,
        ImageTokens::AnyRes(a) => {
            1 + a
                .pinpoints
                .iter()
                .map(|&(h, w)| (h / a.tile) * (w / a.tile))
                .max()
                .unwrap_or(0)
        }
    };
    features
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let rows = f.rows as usize;
            let tiles = rows / tile.max(1);
            let sized = f.image_height > 0 && f.image_width > 0;
            if f.dim as usize != dim
                || rows == 0
                || !rows.is_multiple_of(tile.max(1))
                || tiles > max_tiles
                || (tiles > 1 && !sized)
            {
                return Err(format!(
                    "image_features {i} are {}x{} for a {}x{} image, this model takes {}{tile}x{dim}",
                    f.rows,
                    f.dim,
                    f.image_height,
                    f.image_width,
                    if max_tiles == 1 {
                        String::new()
                    } else {
                        format!("(1 to {max_tiles} tiles of a sized image) x ")
                    }
                ));
            }
            // Several tiles must be the base tile plus the layout of the image's size.
            if let ImageTokens::AnyRes(a) = model.image_tokens()
                && tiles > 1
            {
                let (tr, tc) = a
                    .layout(f.image_height as usize, f.image_width as usize)
                    .tiles;
                if tiles != 1 + tr * tc {
                    return Err(format!(
                        "image_features {i} hold {tiles} tiles; a {}x{} image takes 1 + {tr}x{tc}",
                        f.image_height, f.image_width
                    ));
                }
            }
            if f.data.len() != rows * dim * 4 {
                return Err(format!(
                    "image_features {i} carry {} bytes, {rows}x{dim} f32 values take {}",
                    f.data.len(),
                    rows * dim * 4
                ));
            }
            let values: Vec<f32> = f
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if values.iter().any(|v| !v.is_finite()) {
                return Err(format!(
                    "image_features {i} hold a value that is not finite"
                ));
            }
            Ok(VisionFeatures {
                rows: Tensor::from_vec(values, (rows, dim), model.device())
                    .map_err(|e| format!("image_features {i}: {e}"))?,
                image_size: (f.image_height as usize, f.image_width as usize),
            })
        })
        .collect()
}

/// Vision features as sent (f32, little-endian, row-major).
pub fn vision_features_to_proto(
    features: &VisionFeatures,
) -> Result<pb::VisionFeatures, ModelError> {
    let (rows, dim) = features.rows.dims2()?;
    let values = features
        .rows
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(pb::VisionFeatures {
        rows: rows as u32,
        dim: dim as u32,
        data,
        image_height: features.image_size.0 as u32,
        image_width: features.image_size.1 as u32,
    })
}

/// A new KV cache holding `prefix` (with `images` at its placeholders): a new session's
/// history minus its root.
pub fn prefilled_kv(
    model: &Llava,
    prefix: &[u32],
    images: &PrefillImages,
) -> Result<KvCache, ModelError> {
    let mut kv = model.new_kv();
    if !prefix.is_empty() {
        model.prefill_images(&mut kv, prefix, images)?;
    }
    Ok(kv)
}
