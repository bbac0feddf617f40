//! `config.json` of a Hugging Face `LlavaForConditionalGeneration` checkpoint.
//!
//! The raw serde structs mirror the JSON with every field optional; [`LlavaConfig::from_json`]
//! resolves them into plain values using the defaults of `transformers` (`LlavaConfig`,
//! `LlamaConfig`, `CLIPVisionConfig`), so a minimal `config.json` such as llava-1.5-7b's (whose
//! `text_config` lists only a few fields) means exactly what it means to `transformers`.
//! Note that, as in `transformers`, a `vision_config` given as a dict starts from the
//! `CLIPVisionConfig` defaults (ViT-B/32), not from the CLIP-L/336 values used when it is absent.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::nn::Activation;

/// Which vision-tower positions become image features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectStrategy {
    /// Drop the CLS position (`"default"`).
    Default,
    /// Keep every position, CLS included (`"full"`).
    Full,
}

/// Rotary embedding variant (`rope_parameters.rope_type` / legacy `rope_scaling.type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: inverse frequencies divided by `factor`.
    Linear {
        /// Scaling factor.
        factor: f64,
    },
    /// Llama 3 frequency-dependent scaling.
    Llama3 {
        /// Scaling factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
    },
}

/// Resolved rotary embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base wavelength (`rope_theta`).
    pub theta: f64,
    /// Scaling variant.
    pub scaling: RopeScaling,
}

/// Resolved Llama text-model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Vocabulary size (rows of the embedding and the LM head).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when smaller than `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// Nominal context length (informational; RoPE is computed for any position).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary embedding parameters.
    pub rope: RopeConfig,
    /// Bias on q/k/v/o projections.
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
}

/// Resolved CLIP vision-tower configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Tower width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of encoder layers in the checkpoint.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Input resolution (square).
    pub image_size: usize,
    /// Patch size (square).
    pub patch_size: usize,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl VisionConfig {
    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Positions in the tower's sequence: CLS + patches.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// Resolved LLaVA configuration: no `Option`s, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    /// The language model.
    pub text: TextConfig,
    /// The vision tower.
    pub vision: VisionConfig,
    /// Id of the `<image>` placeholder token (`image_token_index`).
    pub image_token_id: u32,
    /// Projector activation (`projector_hidden_act`).
    pub projector_hidden_act: Activation,
    /// Projector linear layers have biases (`multimodal_projector_bias`).
    pub multimodal_projector_bias: bool,
    /// Vision hidden-state indices whose features are concatenated (`vision_feature_layer`, may
    /// be negative as in Python).
    pub vision_feature_layers: Vec<i64>,
    /// `vision_feature_select_strategy`.
    pub vision_feature_select_strategy: SelectStrategy,
    /// The LM head shares the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Vocabulary size (same as `text.vocab_size`).
    pub vocab_size: usize,
    /// End-of-sequence ids (`generation_config.json` first, then `config.json`).
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id, if any.
    pub bos_token_id: Option<u32>,
    /// Padding id, if any.
    pub pad_token_id: Option<u32>,
}

// ---------------------------------------------------------------------------------------------
// Raw JSON

#[derive(Debug, Default, Deserialize)]
struct RawLlava {
    #[serde(default)]
    text_config: Option<RawText>,
    #[serde(default)]
    vision_config: Option<RawVision>,
    image_token_index: Option<u32>,
    image_token_id: Option<u32>,
    projector_hidden_act: Option<String>,
    vision_feature_select_strategy: Option<String>,
    vision_feature_layer: Option<Value>,
    multimodal_projector_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RawText {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
struct RawVision {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<Value>,
    patch_size: Option<Value>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawGeneration {
    eos_token_id: Option<Value>,
    bos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

/// An int, or a list of ints (`eos_token_id` may be either), `null` meaning none.
fn ids(v: &Option<Value>, field: &str) -> Result<Vec<u32>> {
    let bad = || ModelError::Config(format!("{field} must be an integer or a list of integers"));
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Number(n)) => Ok(vec![n.as_u64().ok_or_else(bad)? as u32]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

fn one_id(v: &Option<Value>, field: &str) -> Result<Option<u32>> {
    Ok(ids(v, field)?.first().copied())
}

/// `image_size` / `patch_size`: an int, or `[h, w]` with h == w.
fn square(v: &Option<Value>, default: usize, field: &str) -> Result<usize> {
    let bad = || {
        ModelError::Config(format!(
            "vision_config.{field} must be an integer or [n, n]"
        ))
    };
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => Ok(n.as_u64().ok_or_else(bad)? as usize),
        Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] => {
            Ok(a[0].as_u64().ok_or_else(bad)? as usize)
        }
        Some(_) => Err(bad()),
    }
}

fn f64_field(map: &serde_json::Map<String, Value>, key: &str, ctx: &str) -> Result<f64> {
    map.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| ModelError::Config(format!("{ctx} needs numeric `{key}`")))
}

fn resolve_rope(raw: &RawText) -> Result<RopeConfig> {
    // transformers 5: `rope_parameters` {rope_type, rope_theta, ...}; transformers 4:
    // `rope_theta` plus optional `rope_scaling` {type|rope_type, factor, ...}.
    let params = match (&raw.rope_parameters, &raw.rope_scaling) {
        (Some(Value::Object(p)), _) => Some(p.clone()),
        (_, Some(Value::Object(s))) => Some(s.clone()),
        (Some(Value::Null) | None, Some(Value::Null) | None) => None,
        _ => {
            return Err(ModelError::Config(
                "text_config.rope_parameters / rope_scaling must be an object".into(),
            ));
        }
    };
    let theta = params
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(raw.rope_theta)
        .unwrap_or(10_000.0);
    let kind = params
        .as_ref()
        .and_then(|p| p.get("rope_type").or_else(|| p.get("type")))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let scaling = match (kind.as_str(), &params) {
        ("default", _) => RopeScaling::Default,
        ("linear", Some(p)) => RopeScaling::Linear {
            factor: f64_field(p, "factor", "linear rope")?,
        },
        ("llama3", Some(p)) => RopeScaling::Llama3 {
            factor: f64_field(p, "factor", "llama3 rope")?,
            low_freq_factor: f64_field(p, "low_freq_factor", "llama3 rope")?,
            high_freq_factor: f64_field(p, "high_freq_factor", "llama3 rope")?,
            original_max_position_embeddings: f64_field(
                p,
                "original_max_position_embeddings",
                "llama3 rope",
            )?,
        },
        (other, _) => {
            return Err(ModelError::Config(format!(
                "unsupported rope type `{other}` (supported: default, linear, llama3)"
            )));
        }
    };
    Ok(RopeConfig { theta, scaling })
}

fn resolve_text(raw: &RawText) -> Result<TextConfig> {
    if let Some(mt) = raw.model_type.as_deref()
        && mt != "llama"
    {
        return Err(ModelError::Config(format!(
            "unsupported text_config.model_type `{mt}` (only `llama` is implemented)"
        )));
    }
    // LlamaConfig defaults (transformers).
    let hidden_size = raw.hidden_size.unwrap_or(4096);
    let num_attention_heads = raw.num_attention_heads.unwrap_or(32);
    if num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads) {
        return Err(ModelError::Config(format!(
            "text_config.hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads})"
        )));
    }
    let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
    if num_key_value_heads == 0 || !num_attention_heads.is_multiple_of(num_key_value_heads) {
        return Err(ModelError::Config(format!(
            "text_config.num_attention_heads ({num_attention_heads}) is not a multiple of num_key_value_heads ({num_key_value_heads})"
        )));
    }
    let head_dim = raw.head_dim.unwrap_or(hidden_size / num_attention_heads);
    if !head_dim.is_multiple_of(2) {
        return Err(ModelError::Config(format!(
            "text_config.head_dim ({head_dim}) must be even for rotary embeddings"
        )));
    }
    Ok(TextConfig {
        vocab_size: raw.vocab_size.unwrap_or(32000),
        hidden_size,
        intermediate_size: raw.intermediate_size.unwrap_or(11008),
        num_hidden_layers: raw.num_hidden_layers.unwrap_or(32),
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        hidden_act: Activation::from_hf(raw.hidden_act.as_deref().unwrap_or("silu"))?,
        max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        rope: resolve_rope(raw)?,
        attention_bias: raw.attention_bias.unwrap_or(false),
        mlp_bias: raw.mlp_bias.unwrap_or(false),
    })
}

fn resolve_vision(raw: Option<&RawVision>) -> Result<VisionConfig> {
    let cfg = match raw {
        // `vision_config` absent: LlavaConfig's CLIP-L/14-336 defaults.
        None => VisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 336,
            patch_size: 14,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        },
        // Given as a dict: CLIPVisionConfig defaults for omitted fields.
        Some(raw) => {
            if let Some(mt) = raw.model_type.as_deref()
                && mt != "clip_vision_model"
            {
                return Err(ModelError::Config(format!(
                    "unsupported vision_config.model_type `{mt}` (only `clip_vision_model` is implemented)"
                )));
            }
            VisionConfig {
                hidden_size: raw.hidden_size.unwrap_or(768),
                intermediate_size: raw.intermediate_size.unwrap_or(3072),
                num_hidden_layers: raw.num_hidden_layers.unwrap_or(12),
                num_attention_heads: raw.num_attention_heads.unwrap_or(12),
                num_channels: raw.num_channels.unwrap_or(3),
                image_size: square(&raw.image_size, 224, "image_size")?,
                patch_size: square(&raw.patch_size, 32, "patch_size")?,
                hidden_act: Activation::from_hf(raw.hidden_act.as_deref().unwrap_or("quick_gelu"))?,
                layer_norm_eps: raw.layer_norm_eps.unwrap_or(1e-5),
            }
        }
    };
    if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        return Err(ModelError::Config(format!(
            "vision_config.hidden_size ({}) is not a multiple of num_attention_heads ({})",
            cfg.hidden_size, cfg.num_attention_heads
        )));
    }
    if cfg.patch_size == 0 || cfg.image_size < cfg.patch_size {
        return Err(ModelError::Config(format!(
            "vision_config.image_size ({}) must be at least patch_size ({})",
            cfg.image_size, cfg.patch_size
        )));
    }
    Ok(cfg)
}

impl LlavaConfig {
    /// Resolves a `config.json` text (plus, optionally, `generation_config.json`'s text, which
    /// takes precedence for the special token ids).
    pub fn from_json(config: &str, generation: Option<&str>) -> Result<Self> {
        let raw: RawLlava = serde_json::from_str(config)
            .map_err(|e| ModelError::Config(format!("config.json: {e}")))?;
        let gen_cfg: RawGeneration = match generation {
            Some(g) => serde_json::from_str(g)
                .map_err(|e| ModelError::Config(format!("generation_config.json: {e}")))?,
            None => RawGeneration::default(),
        };
        let raw_text = raw.text_config.unwrap_or_default();
        let text = resolve_text(&raw_text)?;
        let vision = resolve_vision(raw.vision_config.as_ref())?;

        let vision_feature_layers = match &raw.vision_feature_layer {
            None | Some(Value::Null) => vec![-2],
            Some(Value::Number(n)) => vec![n.as_i64().ok_or_else(|| {
                ModelError::Config("vision_feature_layer must be an integer".into())
            })?],
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|x| {
                    x.as_i64().ok_or_else(|| {
                        ModelError::Config("vision_feature_layer must hold integers".into())
                    })
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(ModelError::Config(
                    "vision_feature_layer must be an integer or a non-empty list".into(),
                ));
            }
        };
        let n_states = vision.num_hidden_layers as i64 + 1;
        for &l in &vision_feature_layers {
            if l >= n_states || l < -n_states {
                return Err(ModelError::Config(format!(
                    "vision_feature_layer {l} out of range for a vision tower with {} layers",
                    vision.num_hidden_layers
                )));
            }
        }
        let vision_feature_select_strategy = match raw
            .vision_feature_select_strategy
            .as_deref()
            .unwrap_or("default")
        {
            "default" => SelectStrategy::Default,
            "full" => SelectStrategy::Full,
            other => {
                return Err(ModelError::Config(format!(
                    "vision_feature_select_strategy must be `default` or `full`, got `{other}`"
                )));
            }
        };
        // LlavaConfig.__post_init__: tied if either the top level or text_config says so.
        let tie_word_embeddings = raw.tie_word_embeddings.unwrap_or(false)
            || raw_text.tie_word_embeddings.unwrap_or(false);

        let mut eos_token_ids = ids(&gen_cfg.eos_token_id, "generation_config.eos_token_id")?;
        if eos_token_ids.is_empty() {
            eos_token_ids = ids(&raw_text.eos_token_id, "text_config.eos_token_id")?;
        }
        if eos_token_ids.is_empty() {
            eos_token_ids = ids(&raw.eos_token_id, "eos_token_id")?;
        }
        if eos_token_ids.is_empty() && raw_text.eos_token_id.is_none() {
            eos_token_ids = vec![2]; // LlamaConfig default
        }
        let bos_token_id = match (
            &gen_cfg.bos_token_id,
            &raw_text.bos_token_id,
            &raw.bos_token_id,
        ) {
            (Some(v), _, _) => one_id(&Some(v.clone()), "generation_config.bos_token_id")?,
            (None, Some(v), _) => one_id(&Some(v.clone()), "text_config.bos_token_id")?,
            (None, None, Some(v)) => one_id(&Some(v.clone()), "bos_token_id")?,
            (None, None, None) => Some(1), // LlamaConfig default
        };
        let pad_token_id = one_id(&gen_cfg.pad_token_id, "pad_token_id")?
            .or(one_id(&raw.pad_token_id, "pad_token_id")?)
            .or(one_id(&raw_text.pad_token_id, "text_config.pad_token_id")?);

        Ok(LlavaConfig {
            vocab_size: text.vocab_size,
            image_token_id: raw
                .image_token_index
                .or(raw.image_token_id)
                .unwrap_or(32000),
            projector_hidden_act: Activation::from_hf(
                raw.projector_hidden_act.as_deref().unwrap_or("gelu"),
            )?,
            multimodal_projector_bias: raw.multimodal_projector_bias.unwrap_or(true),
            vision_feature_layers,
            vision_feature_select_strategy,
            tie_word_embeddings,
            eos_token_ids,
            bos_token_id,
            pad_token_id,
            text,
            vision,
        })
    }

    /// Reads `config.json` (required) and `generation_config.json` (optional) from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let config = read_required(&path, "the model configuration")?;
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.exists() {
            Some(
                std::fs::read_to_string(&gen_path)
                    .map_err(|e| ModelError::bad_file(&gen_path, e))?,
            )
        } else {
            None
        };
        Self::from_json(&config, generation.as_deref()).map_err(|e| match e {
            ModelError::Config(msg) => ModelError::Config(format!("{}: {msg}", dir.display())),
            e => e,
        })
    }

    /// Number of image features per image after the select strategy.
    pub fn num_image_tokens(&self) -> usize {
        let n = self.vision.grid() * self.vision.grid();
        match self.vision_feature_select_strategy {
            SelectStrategy::Default => n,
            SelectStrategy::Full => n + 1,
        }
    }

    /// The vision hidden-state indices as non-negative indices into `[embeddings, layer 1, ...]`.
    pub(crate) fn resolved_feature_layers(&self) -> Vec<usize> {
        let n_states = self.vision.num_hidden_layers as i64 + 1;
        self.vision_feature_layers
            .iter()
            .map(|&l| {
                if l < 0 {
                    (n_states + l) as usize
                } else {
                    l as usize
                }
            })
            .collect()
    }
}

/// Reads a file that must exist, with an error naming it and its purpose.
pub(crate) fn read_required(path: &Path, what: &str) -> Result<String> {
    if !path.exists() {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
            what: what.to_string(),
        });
    }
    std::fs::read_to_string(path).map_err(|e| ModelError::bad_file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llava-hf/llava-1.5-7b-hf's config.json, verbatim in substance.
    const LLAVA_15_7B: &str = r#"{
      "architectures": ["LlavaForConditionalGeneration"],
      "ignore_index": -100, "image_token_index": 32000, "model_type": "llava",
      "pad_token_id": 32001, "projector_hidden_act": "gelu",
      "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
        "torch_dtype": "float16", "vocab_size": 32064},
      "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
      "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
    }"#;

    #[test]
    fn llava_15_defaults_resolve_like_transformers() {
        let c = LlavaConfig::from_json(LLAVA_15_7B, None).unwrap();
        assert_eq!(c.text.hidden_size, 4096);
        assert_eq!(c.text.num_hidden_layers, 32);
        assert_eq!(c.text.num_key_value_heads, 32);
        assert_eq!(c.text.intermediate_size, 11008);
        assert_eq!(c.text.head_dim, 128);
        assert_eq!(c.text.rope.theta, 10_000.0);
        assert_eq!(c.text.rms_norm_eps, 1e-5);
        assert_eq!(c.vocab_size, 32064);
        assert_eq!(c.vision.hidden_act, Activation::QuickGelu);
        assert_eq!(c.num_image_tokens(), 576);
        assert_eq!(c.resolved_feature_layers(), vec![23]);
        assert_eq!(c.image_token_id, 32000);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.pad_token_id, Some(32001));
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.projector_hidden_act, Activation::Gelu);
    }

    #[test]
    fn rope_parameters_and_gqa() {
        let j = r#"{"text_config": {"hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "tie_word_embeddings": true},
            "vision_feature_layer": [-1, 0], "vision_feature_select_strategy": "full"}"#;
        let c = LlavaConfig::from_json(j, Some(r#"{"eos_token_id": [2, 7]}"#)).unwrap();
        assert_eq!(c.text.rope.theta, 500000.0);
        assert_eq!(c.text.num_key_value_heads, 2);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
        // vision_config given as absent -> CLIP-L/336 defaults
        assert_eq!(c.resolved_feature_layers(), vec![24, 0]);
        assert_eq!(c.num_image_tokens(), 577);
    }

    #[test]
    fn bad_values_are_named() {
        let e = LlavaConfig::from_json(r#"{"vision_feature_select_strategy": "cls"}"#, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision_feature_select_strategy"), "{e}");
        let e = LlavaConfig::from_json(
            r#"{"text_config": {"hidden_size": 10, "num_attention_heads": 3}}"#,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("hidden_size"), "{e}");
        let e = LlavaConfig::from_json(r#"{"vision_feature_layer": -30}"#, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vision_feature_layer"), "{e}");
    }
}
