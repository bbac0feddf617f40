//! A function-preserving widening of a LLaVA checkpoint's decoder: the same logits from `factor`²
//! times the decoder weights.
//!
//! It exists for benchmarking. A small target that fits the CPU's caches verifies a tree at a
//! cost of almost one forward per node; the 7B-13B targets people serve stream their weights
//! from memory, so a forward costs about the same for the first few nodes. Widening the demo
//! target puts it in that regime without training: the widened model computes the demo
//! target's function (so the draft's acceptance is unchanged) at the cost of a model too large
//! for the caches. It is never a better model.
//!
//! The transform, for a factor `W` (new index `j` stands for old index `j % n`):
//! - every decoder width is tiled `W` times: hidden size, MLP size, attention and KV heads
//!   (head size kept; heads tiled in blocks, so head `h` of block `b` still reads KV head
//!   `h / group` of its own block and the GQA grouping holds);
//! - each decoder Linear weight `[out, in]` is tiled on both axes and divided by `W`: each input
//!   value now arrives `W` times, so each output is the original one (the LM head is tiled
//!   along its input only, the projector's first layer, whose input is the vision tower's,
//!   along its output only: `transformers` sizes the projector's middle by the decoder's width);
//! - embeddings, RMSNorm weights and biases are tiled: RMSNorm of a tiled vector is the tiled
//!   RMSNorm, attention of tiled heads is the tiled attention;
//! - the vision tower is unchanged.
//!
//! A tied LM head cannot be both the tiled embedding and the tiled-and-scaled head, so the
//! widened checkpoint unties it (writes `lm_head.weight` and sets `tie_word_embeddings` false).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::weights::{INDEX_FILE, SINGLE_FILE};

/// Files of a checkpoint directory copied unchanged (tokenizer, processor, templates).
const COPIED_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
];

/// How one tensor is widened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// The vision tower: not part of the decoder's width.
    Keep,
    /// A `[out, in]` decoder Linear: tiled on both axes, divided by the factor.
    LinearBoth,
    /// The LM head `[vocab, hidden]`: tiled along its input, divided by the factor.
    LinearInput,
    /// The projector's first Linear `[hidden, vision]`: tiled along its output.
    LinearOutput,
    /// Token embeddings `[vocab, hidden]`: tiled along the hidden axis.
    Embedding,
    /// A 1-D vector along a decoder width (norm weight, bias): tiled.
    Vector,
}

/// The rule for tensor `name` (either of the two HF tensor-name layouts).
fn rule_for(name: &str) -> Result<Rule> {
    let has = |s: &str| name.contains(s);
    let rule = if has("vision_tower.") {
        Rule::Keep
    } else if has("multi_modal_projector.linear_1.") {
        if name.ends_with(".weight") {
            Rule::LinearOutput
        } else {
            Rule::Vector
        }
    } else if has("multi_modal_projector.linear_2.") {
        if name.ends_with(".weight") {
            Rule::LinearBoth
        } else {
            Rule::Vector
        }
    } else if name.ends_with("lm_head.weight") {
        Rule::LinearInput
    } else if name.ends_with("embed_tokens.weight") {
        Rule::Embedding
    } else if has("_proj.") && name.ends_with(".weight") {
        Rule::LinearBoth
    } else if (has("_proj.") && name.ends_with(".bias")) || name.ends_with("norm.weight") {
        Rule::Vector
    } else {
        return Err(ModelError::Config(format!(
            "cannot widen tensor `{name}`: not a known LLaVA tensor"
        )));
    };
    Ok(rule)
}

/// Applies `rule` with factor `w` to one tensor (in its own dtype; the division runs in f32
/// and rounds once to the stored precision, exact for a power-of-two factor).
fn widen_tensor(t: &Tensor, rule: Rule, w: usize) -> Result<Tensor> {
    let scaled = |t: Tensor| -> Result<Tensor> {
        let dtype = t.dtype();
        Ok(t.to_dtype(DType::F32)?
            .affine(1.0 / w as f64, 0.0)?
            .to_dtype(dtype)?)
    };
    let out = match rule {
        Rule::Keep => t.clone(),
        Rule::LinearBoth => scaled(t.repeat((w, w))?)?,
        Rule::LinearInput => scaled(t.repeat((1, w))?)?,
        Rule::LinearOutput => t.repeat((w, 1))?,
        Rule::Embedding => t.repeat((1, w))?,
        Rule::Vector => t.repeat(w)?,
    };
    Ok(out)
}

/// The safetensors files of the checkpoint in `dir` (single file or shards).
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::bad_file(&index, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| ModelError::bad_file(&index, e))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::bad_file(&index, "no weight_map"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|s| dir.join(s))
            .collect();
        files.sort();
        files.dedup();
        Ok(files)
    } else {
        Ok(vec![dir.join(SINGLE_FILE)])
    }
}

/// Multiplies the integer at `obj[key]` by `w` (an error if it is missing).
fn scale_field(obj: &mut serde_json::Map<String, Value>, key: &str, w: usize) -> Result<()> {
    let v = obj
        .get(key)
        .and_then(Value::as_u64)
        .ok_or_else(|| ModelError::Config(format!("text_config.{key} missing")))?;
    obj.insert(key.to_owned(), Value::from(v * w as u64));
    Ok(())
}

/// The widened `config.json`: decoder widths times `w`, head size written out, LM head untied.
fn widen_config(config: &Value, w: usize) -> Result<Value> {
    let mut config = config.clone();
    let root = config
        .as_object_mut()
        .ok_or_else(|| ModelError::Config("config.json is not an object".into()))?;
    root.insert("tie_word_embeddings".into(), Value::Bool(false));
    let text = root
        .get_mut("text_config")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ModelError::Config("config.json has no text_config".into()))?;
    let hidden = text.get("hidden_size").and_then(Value::as_u64);
    let heads = text.get("num_attention_heads").and_then(Value::as_u64);
    if !text.contains_key("head_dim")
        && let (Some(h), Some(n)) = (hidden, heads)
    {
        text.insert("head_dim".into(), Value::from(h / n));
    }
    if !text.contains_key("num_key_value_heads")
        && let Some(n) = heads
    {
        text.insert("num_key_value_heads".into(), Value::from(n));
    }
    for key in [
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
    ] {
        scale_field(text, key, w)?;
    }
    text.insert("tie_word_embeddings".into(), Value::Bool(false));
    Ok(config)
}

/// Widens the checkpoint in `src` by `factor` into `dst` (created; its `model.safetensors` and
/// `config.json` written, the tokenizer and processor files copied). Deterministic: the same
/// input gives the same bytes.
pub fn widen_checkpoint(src: &Path, dst: &Path, factor: usize) -> Result<()> {
    if factor < 1 {
        return Err(ModelError::Config("widening factor must be >= 1".into()));
    }
    let config_path = src.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| ModelError::bad_file(&config_path, e))?;
    let config: Value =
        serde_json::from_str(&text).map_err(|e| ModelError::bad_file(&config_path, e))?;
    let tied = config
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        || config
            .pointer("/text_config/tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false);

    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for file in checkpoint_files(src)? {
        let loaded = candle_core::safetensors::load(&file, &Device::Cpu)
            .map_err(|e| ModelError::bad_file(&file, e))?;
        tensors.extend(loaded);
    }
    let embed_name = tensors
        .keys()
        .find(|n| n.ends_with("embed_tokens.weight"))
        .cloned()
        .ok_or_else(|| ModelError::Config("checkpoint has no embed_tokens.weight".into()))?;
    let has_head = tensors.keys().any(|n| n.ends_with("lm_head.weight"));
    if tied && !has_head {
        // Untie: the head is the embedding, scaled like any head.
        // Layouts: `language_model.model.embed_tokens` (head `language_model.lm_head`) and
        // `model.language_model.embed_tokens` (head `lm_head`).
        let head_name = if embed_name.starts_with("language_model.model.") {
            "language_model.lm_head.weight"
        } else {
            "lm_head.weight"
        };
        tensors.insert(head_name.to_owned(), tensors[&embed_name].clone());
    }

    let mut widened = std::collections::HashMap::new();
    for (name, t) in &tensors {
        widened.insert(name.clone(), widen_tensor(t, rule_for(name)?, factor)?);
    }
    std::fs::create_dir_all(dst).map_err(|e| ModelError::bad_file(dst, e))?;
    let out = dst.join(SINGLE_FILE);
    // Written under a temporary name and renamed, so a killed run leaves no half checkpoint.
    let partial = dst.join(format!("{SINGLE_FILE}.partial"));
    candle_core::safetensors::save(&widened, &partial)
        .map_err(|e| ModelError::bad_file(&partial, e))?;
    let wide_config = serde_json::to_string_pretty(&widen_config(&config, factor)?)
        .map_err(|e| ModelError::Config(e.to_string()))?;
    let dst_config = dst.join("config.json");
    std::fs::write(&dst_config, wide_config).map_err(|e| ModelError::bad_file(&dst_config, e))?;
    for name in COPIED_FILES {
        let from = src.join(name);
        if from.exists() {
            let to = dst.join(name);
            std::fs::copy(&from, &to).map_err(|e| ModelError::bad_file(&to, e))?;
        }
    }
    std::fs::rename(&partial, &out).map_err(|e| ModelError::bad_file(&out, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_llava_tensor_has_a_rule() {
        let cases = [
            (
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                Rule::Keep,
            ),
            ("multi_modal_projector.linear_1.weight", Rule::LinearOutput),
            ("multi_modal_projector.linear_1.bias", Rule::Vector),
            ("multi_modal_projector.linear_2.weight", Rule::LinearBoth),
            ("multi_modal_projector.linear_2.bias", Rule::Vector),
            ("language_model.lm_head.weight", Rule::LinearInput),
            ("lm_head.weight", Rule::LinearInput),
            ("model.language_model.embed_tokens.weight", Rule::Embedding),
            (
                "language_model.model.layers.3.self_attn.q_proj.weight",
                Rule::LinearBoth,
            ),
            (
                "language_model.model.layers.3.self_attn.q_proj.bias",
                Rule::Vector,
            ),
            (
                "language_model.model.layers.3.mlp.down_proj.weight",
                Rule::LinearBoth,
            ),
            (
                "language_model.model.layers.3.input_layernorm.weight",
                Rule::Vector,
            ),
            ("language_model.model.norm.weight", Rule::Vector),
        ];
        for (name, rule) in cases {
            assert_eq!(rule_for(name).unwrap(), rule, "{name}");
        }
        assert!(rule_for("language_model.model.layers.0.rotary_emb.inv_freq").is_err());
    }

    #[test]
    fn linear_tiling_preserves_the_product_of_a_tiled_input() {
        // y = W x; widened: W' (x tiled) = y tiled.
        let w = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
        let x = Tensor::new(&[[0.5f32], [-1.0], [2.0]], &Device::Cpu).unwrap();
        let y = w.matmul(&x).unwrap();
        let wide = widen_tensor(&w, Rule::LinearBoth, 3).unwrap();
        assert_eq!(wide.dims(), &[6, 9]);
        let xw = x.repeat((3, 1)).unwrap();
        let yw = wide.matmul(&xw).unwrap();
        let expect = y.repeat((3, 1)).unwrap();
        let diff = (yw - expect)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn config_widths_scale_and_head_size_is_kept() {
        let c: Value = serde_json::from_str(
            r#"{"tie_word_embeddings": true, "text_config": {"hidden_size": 8,
            "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1}}"#,
        )
        .unwrap();
        let w = widen_config(&c, 4).unwrap();
        let t = &w["text_config"];
        assert_eq!(t["hidden_size"], 32);
        assert_eq!(t["intermediate_size"], 64);
        assert_eq!(t["num_attention_heads"], 8);
        assert_eq!(t["num_key_value_heads"], 4);
        assert_eq!(t["head_dim"], 4);
        assert_eq!(w["tie_word_embeddings"], false);
    }
}
