//! A LLaVA-NeXT or LLaVA-OneVision checkpoint made from a LLaVA-1.5 one, for serving tests:
//! the same tower, projector and decoder, any-resolution tiling added
//! (`image_grid_pinpoints`, an `image_newline` vector, the NeXT / OneVision image processor;
//! OneVision's `anyres_max_N` and its untiled several-image prompts).
//!
//! Unlike [`crate::widen`] this changes the model's function: an image becomes the base tile
//! plus the tiles of its best pinpoint, which the source model never saw. It is a real
//! `LlavaNextForConditionalGeneration` checkpoint (transformers loads it), whose tokenizer is
//! the source's, so the source's siblings (the demo draft) can draft for it: a target whose
//! image-token count varies per image next to a draft whose does not.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use crate::error::{ModelError, Result};
use crate::weights::{INDEX_FILE, SINGLE_FILE};

/// Which any-resolution architecture to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnyResKind {
    /// `LlavaNextForConditionalGeneration`.
    Next,
    /// `LlavaOnevisionForConditionalGeneration` with `anyres_max_{max_tiles}`.
    Onevision {
        /// `N` of `anyres_max_N`.
        max_tiles: usize,
    },
}

/// Writes into `dst` the `kind` variant of the LLaVA-1.5 checkpoint in `src` (a single
/// `model.safetensors`), tiling images into `pinpoints` (`(height, width)`, multiples of the
/// tower's size). `image_newline` is the mean of the token embeddings (deterministic, of the
/// embeddings' scale). Every other file is copied.
pub fn anyres_checkpoint(
    src: &Path,
    dst: &Path,
    kind: AnyResKind,
    pinpoints: &[(usize, usize)],
) -> Result<()> {
    if src.join(INDEX_FILE).exists() {
        return Err(ModelError::Config(format!(
            "{}: sharded checkpoints are not supported here",
            src.display()
        )));
    }
    std::fs::create_dir_all(dst).map_err(|e| ModelError::bad_file(dst, e))?;
    for entry in std::fs::read_dir(src).map_err(|e| ModelError::bad_file(src, e))? {
        let path = entry.map_err(|e| ModelError::bad_file(src, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let rewritten = [
            "config.json",
            "preprocessor_config.json",
            "processor_config.json",
            SINGLE_FILE,
        ];
        if path.is_file() && !rewritten.contains(&name) {
            std::fs::copy(&path, dst.join(name)).map_err(|e| ModelError::bad_file(&path, e))?;
        }
    }
    let pinpoints: Vec<Value> = pinpoints.iter().map(|&(h, w)| json!([h, w])).collect();

    let mut config = read_json(&src.join("config.json"))?;
    if config.get("model_type").and_then(Value::as_str) != Some("llava") {
        return Err(ModelError::Config(format!(
            "{}: not a LLaVA-1.5 (`llava`) checkpoint",
            src.display()
        )));
    }
    let (model_type, class, processor_type, processor_class) = match kind {
        AnyResKind::Next => (
            "llava_next",
            "LlavaNextForConditionalGeneration",
            "LlavaNextImageProcessor",
            "LlavaNextProcessor",
        ),
        AnyResKind::Onevision { max_tiles } => {
            config["vision_aspect_ratio"] = json!(format!("anyres_max_{max_tiles}"));
            // LlavaOnevisionConfig's own defaults are SigLIP's: keep the source's explicit.
            let strategy = config
                .get("vision_feature_select_strategy")
                .cloned()
                .unwrap_or(json!("default"));
            config["vision_feature_select_strategy"] = strategy;
            let layer = config
                .get("vision_feature_layer")
                .cloned()
                .unwrap_or(json!(-2));
            config["vision_feature_layer"] = layer;
            (
                "llava_onevision",
                "LlavaOnevisionForConditionalGeneration",
                "LlavaOnevisionImageProcessor",
                "LlavaOnevisionProcessor",
            )
        }
    };
    config["model_type"] = json!(model_type);
    config["architectures"] = json!([class]);
    config["image_grid_pinpoints"] = json!(pinpoints);
    write_json(&dst.join("config.json"), &config)?;

    // The image processor, alone (what this crate reads) and inside the processor's file
    // (what transformers 5 reads first).
    let next_image_processor = |mut p: Value| {
        p["image_processor_type"] = json!(processor_type);
        p["image_grid_pinpoints"] = json!(pinpoints);
        p["do_pad"] = json!(true);
        if let AnyResKind::Onevision { .. } = kind {
            // OneVision's processor resizes to a square and does not crop.
            let side = p["crop_size"]["height"].clone();
            p["size"] = json!({"height": side, "width": side});
            p["do_center_crop"] = json!(false);
            if let Some(m) = p.as_object_mut() {
                m.remove("crop_size");
            }
        }
        p
    };
    let image_processor = read_json(&src.join("preprocessor_config.json"))?;
    write_json(
        &dst.join("preprocessor_config.json"),
        &next_image_processor(image_processor),
    )?;
    let processor_file = src.join("processor_config.json");
    if processor_file.exists() {
        let mut processor = read_json(&processor_file)?;
        processor["processor_class"] = json!(processor_class);
        if let Some(p) = processor.get("image_processor").cloned() {
            processor["image_processor"] = next_image_processor(p);
        }
        write_json(&dst.join("processor_config.json"), &processor)?;
    }

    let weights = src.join(SINGLE_FILE);
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&weights, &Device::Cpu)?;
    let embed = tensors
        .iter()
        .find(|(name, _)| name.ends_with("embed_tokens.weight"))
        .map(|(_, t)| t.clone())
        .ok_or_else(|| ModelError::MissingTensor {
            name: "embed_tokens.weight".into(),
            dir: src.to_path_buf(),
        })?;
    let newline = embed
        .to_dtype(DType::F32)?
        .mean(0)?
        .to_dtype(embed.dtype())?;
    // The layout's own name: llava-hf's legacy checkpoints keep it at the top level.
    let legacy = tensors.keys().any(|n| n.starts_with("language_model."));
    let name = if legacy {
        "image_newline"
    } else {
        "model.image_newline"
    };
    tensors.insert(name.to_string(), newline);
    candle_core::safetensors::save(&tensors, dst.join(SINGLE_FILE))?;
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::bad_file(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::bad_file(path, e))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::bad_file(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::bad_file(path, e))
}
