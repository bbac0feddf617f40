//! Validation and image preparation for session prefills (open / append),
//! shared by the draft and target services.

use std::sync::Arc;

use candle_core::Tensor;
use specllava_model::{ImageLimits, KvCache, Llava, ModelError};

/// Checks history tokens (vocabulary, placeholder count, root not a placeholder)
/// and decodes + preprocesses the images off the async runtime.
pub async fn prepare_prefill(
    model: &Arc<Llava>,
    image_limits: ImageLimits,
    tokens: &[u32],
    images: Vec<Vec<u8>>,
) -> Result<Vec<Tensor>, String> {
    let cfg = model.config();
    let vocab = cfg.text.vocab_size;
    let image_id = cfg.image_token_id;
    let Some(&last) = tokens.last() else {
        return Err("token_ids must not be empty".into());
    };
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        ));
    }
    if last == image_id {
        return Err("the last token (the root) must not be an image placeholder".into());
    }
    let placeholders = tokens.iter().filter(|&&t| t == image_id).count();
    if placeholders != images.len() {
        return Err(format!(
            "{placeholders} image placeholders but {} images",
            images.len()
        ));
    }
    if images.is_empty() {
        return Ok(Vec::new());
    }
    let model = Arc::clone(model);
    tokio::task::spawn_blocking(move || {
        let proc = model.image_processor();
        images
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let img = proc
                    .decode(bytes, &image_limits)
                    .map_err(|e| format!("image {i}: {e}"))?;
                proc.preprocess_on(&img, model.device())
                    .map_err(|e| format!("image {i}: {e}"))
            })
            .collect()
    })
    .await
    .map_err(|e| format!("image decoding task failed: {e}"))?
}

/// A new KV cache holding `prefix` (with `images` at its placeholders): a new session's
/// history minus its root.
pub fn prefilled_kv(
    model: &Llava,
    prefix: &[u32],
    images: &[Tensor],
) -> Result<KvCache, ModelError> {
    let mut kv = model.new_kv();
    if !prefix.is_empty() {
        model.prefill(&mut kv, prefix, images)?;
    }
    Ok(kv)
}
