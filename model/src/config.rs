//! `config.json` of a Hugging Face LLaVA checkpoint: `LlavaForConditionalGeneration`
//! (LLaVA-1.5), `LlavaNextForConditionalGeneration` (LLaVA-NeXT / 1.6) or
//! `LlavaOnevisionForConditionalGeneration`.
//!
//! The raw serde structs mirror the JSON with every field optional; [`LlavaConfig::from_json`]
//! resolves them into plain values using the defaults of `transformers` (`LlavaConfig`,
//! `LlavaNextConfig`, `LlavaOnevisionConfig`, `LlamaConfig`, `MistralConfig`, `Qwen2Config`,
//! `CLIPVisionConfig`, `SiglipVisionConfig`), so a minimal `config.json` such as
//! llava-1.5-7b's (whose `text_config` lists only a few fields) means exactly what it means to
//! `transformers`.
//! Note that, as in `transformers`, a `vision_config` given as a dict starts from the
//! `CLIPVisionConfig` defaults (ViT-B/32), not from the CLIP-L/336 values used when it is absent.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use specllava_prompt::{AnyRes, ImageTokens};

use crate::error::{ModelError, Result};
use crate::nn::Activation;

/// Which LLaVA generation a checkpoint is (its top-level `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `llava`: LLaVA-1.5, one fixed-size tile an image.
    Llava,
    /// `llava_next`: LLaVA-NeXT / 1.6, any-resolution tiling.
    LlavaNext,
    /// `llava_onevision`: any-resolution tiling with `anyres_max_N` shrinking.
    LlavaOnevision,
}

/// The decoder family (`text_config.model_type`); what differs is resolved into
/// [`TextConfig`]'s fields (biases, sliding window, defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFamily {
    /// `llama` (Vicuna, Llama 3).
    Llama,
    /// `mistral`: sliding-window attention.
    Mistral,
    /// `qwen2`: biases on the q/k/v projections.
    Qwen2,
}

/// The vision tower (`vision_config.model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TowerKind {
    /// `clip_vision_model`: CLS position, `pre_layrnorm`, no patch-embedding bias.
    Clip,
    /// `siglip_vision_model`: no CLS, no pre-norm, a patch-embedding bias.
    Siglip,
}

/// Any-resolution tiling of a LLaVA-NeXT / OneVision checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct AnyResConfig {
    /// `image_grid_pinpoints`: candidate resolutions `(height, width)`.
    pub pinpoints: Vec<(usize, usize)>,
    /// `vision_aspect_ratio` `anyres_max_N` (OneVision): `N`.
    pub max_tiles: Option<usize>,
}

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

/// Resolved decoder configuration (Llama, Mistral or Qwen2).
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// The decoder family.
    pub family: TextFamily,
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
    /// Bias on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Sliding-window attention: a position sees the last this many positions (itself
    /// included), in every layer.
    pub sliding_window: Option<usize>,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
}

/// Resolved vision-tower configuration (CLIP or SigLIP).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// The tower.
    pub tower: TowerKind,
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
    /// Positions in the tower's sequence: CLS (CLIP only) + patches.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + self.has_cls() as usize
    }
    /// Whether the tower's sequence starts with a CLS position.
    pub fn has_cls(&self) -> bool {
        self.tower == TowerKind::Clip
    }
}

/// Resolved LLaVA configuration: no `Option`s, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct LlavaConfig {
    /// The LLaVA generation.
    pub architecture: Architecture,
    /// Any-resolution tiling (LLaVA-NeXT, OneVision); `None` for LLaVA-1.5.
    pub anyres: Option<AnyResConfig>,
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
    model_type: Option<String>,
    image_grid_pinpoints: Option<Value>,
    vision_aspect_ratio: Option<String>,
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
    /// `None` when the key is absent, `Some(Null)` when it is `null` (no window).
    #[serde(default, deserialize_with = "present")]
    sliding_window: Option<Value>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
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

/// A field that is present, `null` included (serde reads a `null` `Option` as absent).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
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

/// Defaults of a decoder family's `transformers` config class.
struct TextDefaults {
    vocab_size: usize,
    intermediate_size: usize,
    num_key_value_heads: Option<usize>,
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
}

fn text_family(model_type: Option<&str>, default: TextFamily) -> Result<TextFamily> {
    Ok(match model_type {
        None => default,
        Some("llama") => TextFamily::Llama,
        Some("mistral") => TextFamily::Mistral,
        Some("qwen2") => TextFamily::Qwen2,
        Some(other) => {
            return Err(ModelError::Config(format!(
                "unsupported text_config.model_type `{other}` (supported: llama, mistral, qwen2)"
            )));
        }
    })
}

/// `sliding_window`: a positive integer or null.
fn window(v: &Option<Value>) -> Result<Option<Option<usize>>> {
    match v {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(w) if w > 0 => Ok(Some(Some(w as usize))),
            _ => Err(ModelError::Config(
                "text_config.sliding_window must be a positive integer or null".into(),
            )),
        },
        Some(_) => Err(ModelError::Config(
            "text_config.sliding_window must be a positive integer or null".into(),
        )),
    }
}

fn resolve_text(raw: &RawText, default_family: TextFamily) -> Result<TextConfig> {
    let family = text_family(raw.model_type.as_deref(), default_family)?;
    // LlamaConfig / MistralConfig / Qwen2Config defaults (transformers).
    let d = match family {
        TextFamily::Llama => TextDefaults {
            vocab_size: 32000,
            intermediate_size: 11008,
            num_key_value_heads: None,
            max_position_embeddings: 2048,
            sliding_window: None,
        },
        TextFamily::Mistral => TextDefaults {
            vocab_size: 32000,
            intermediate_size: 14336,
            num_key_value_heads: Some(8),
            max_position_embeddings: 4096 * 32,
            sliding_window: Some(4096),
        },
        TextFamily::Qwen2 => TextDefaults {
            vocab_size: 151936,
            intermediate_size: 22016,
            num_key_value_heads: Some(32),
            max_position_embeddings: 32768,
            sliding_window: None,
        },
    };
    let sliding_window = match family {
        TextFamily::Llama => None,
        TextFamily::Mistral => {
            if raw.layer_types.is_some() {
                return Err(ModelError::Config(
                    "text_config.layer_types (alternating attention) is not supported for mistral"
                        .into(),
                ));
            }
            window(&raw.sliding_window)?.unwrap_or(d.sliding_window)
        }
        TextFamily::Qwen2 => {
            let sliding = raw.use_sliding_window.unwrap_or(false)
                || raw
                    .layer_types
                    .iter()
                    .flatten()
                    .any(|t| t != "full_attention");
            if sliding {
                return Err(ModelError::Config(
                    "qwen2 with sliding-window layers (use_sliding_window / layer_types) is not supported"
                        .into(),
                ));
            }
            None
        }
    };
    let hidden_size = raw.hidden_size.unwrap_or(4096);
    let num_attention_heads = raw.num_attention_heads.unwrap_or(32);
    if num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads) {
        return Err(ModelError::Config(format!(
            "text_config.hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_attention_heads})"
        )));
    }
    let num_key_value_heads = raw
        .num_key_value_heads
        .or(d.num_key_value_heads)
        .unwrap_or(num_attention_heads);
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
    let (qkv_bias, o_bias) = match family {
        TextFamily::Llama => {
            let b = raw.attention_bias.unwrap_or(false);
            (b, b)
        }
        TextFamily::Mistral => (false, false),
        TextFamily::Qwen2 => (true, false),
    };
    Ok(TextConfig {
        family,
        vocab_size: raw.vocab_size.unwrap_or(d.vocab_size),
        hidden_size,
        intermediate_size: raw.intermediate_size.unwrap_or(d.intermediate_size),
        num_hidden_layers: raw.num_hidden_layers.unwrap_or(32),
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        hidden_act: Activation::from_hf(raw.hidden_act.as_deref().unwrap_or("silu"))?,
        max_position_embeddings: raw
            .max_position_embeddings
            .unwrap_or(d.max_position_embeddings),
        rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
        rope: resolve_rope(raw)?,
        qkv_bias,
        o_bias,
        sliding_window,
        mlp_bias: family == TextFamily::Llama && raw.mlp_bias.unwrap_or(false),
    })
}

fn resolve_vision(raw: Option<&RawVision>, architecture: Architecture) -> Result<VisionConfig> {
    let cfg = match raw {
        // `vision_config` absent: LlavaOnevisionConfig's SigLIP-so400m/14-384 defaults.
        None if architecture == Architecture::LlavaOnevision => VisionConfig {
            tower: TowerKind::Siglip,
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 26,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 384,
            patch_size: 14,
            hidden_act: Activation::GeluTanh,
            layer_norm_eps: 1e-6,
        },
        // `vision_config` absent: LlavaConfig's / LlavaNextConfig's CLIP-L/14-336 defaults.
        None => VisionConfig {
            tower: TowerKind::Clip,
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
        // Given as a dict: CLIPVisionConfig / SiglipVisionConfig defaults for omitted fields.
        Some(raw) => {
            let tower = match raw.model_type.as_deref() {
                None | Some("clip_vision_model") => TowerKind::Clip,
                Some("siglip_vision_model") => TowerKind::Siglip,
                Some(mt) => {
                    return Err(ModelError::Config(format!(
                        "unsupported vision_config.model_type `{mt}` (supported: clip_vision_model, siglip_vision_model)"
                    )));
                }
            };
            let (image_size, patch_size, act, eps) = match tower {
                TowerKind::Clip => (224, 32, "quick_gelu", 1e-5),
                TowerKind::Siglip => (224, 16, "gelu_pytorch_tanh", 1e-6),
            };
            VisionConfig {
                tower,
                hidden_size: raw.hidden_size.unwrap_or(768),
                intermediate_size: raw.intermediate_size.unwrap_or(3072),
                num_hidden_layers: raw.num_hidden_layers.unwrap_or(12),
                num_attention_heads: raw.num_attention_heads.unwrap_or(12),
                num_channels: raw.num_channels.unwrap_or(3),
                image_size: square(&raw.image_size, image_size, "image_size")?,
                patch_size: square(&raw.patch_size, patch_size, "patch_size")?,
                hidden_act: Activation::from_hf(raw.hidden_act.as_deref().unwrap_or(act))?,
                layer_norm_eps: raw.layer_norm_eps.unwrap_or(eps),
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

/// The architecture from the top-level `model_type` (`llava` when absent).
fn architecture(model_type: Option<&str>) -> Result<Architecture> {
    Ok(match model_type {
        None | Some("llava") => Architecture::Llava,
        Some("llava_next") => Architecture::LlavaNext,
        Some("llava_onevision") => Architecture::LlavaOnevision,
        Some(other) => {
            return Err(ModelError::Config(format!(
                "unsupported model_type `{other}` (supported: llava, llava_next, llava_onevision)"
            )));
        }
    })
}

/// `image_grid_pinpoints`: a list of `[height, width]` pairs.
fn pinpoints(v: &Option<Value>, default: Vec<(usize, usize)>) -> Result<Vec<(usize, usize)>> {
    let bad = || {
        ModelError::Config("image_grid_pinpoints must be a list of [height, width] pairs".into())
    };
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| match p.as_array().map(Vec::as_slice) {
                Some([h, w]) => Ok((
                    h.as_u64().ok_or_else(bad)? as usize,
                    w.as_u64().ok_or_else(bad)? as usize,
                )),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// `vision_aspect_ratio` `anyres_max_N` -> `N`.
fn max_tiles(v: Option<&str>) -> Result<usize> {
    let v = v.unwrap_or("anyres_max_9");
    v.strip_prefix("anyres_max_")
        .and_then(|n| n.parse().ok())
        .filter(|&n: &usize| n > 0)
        .ok_or_else(|| {
            ModelError::Config(format!(
                "vision_aspect_ratio must be `anyres_max_N` with N > 0, got `{v}`"
            ))
        })
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
        let architecture = architecture(raw.model_type.as_deref())?;
        let onevision = architecture == Architecture::LlavaOnevision;
        let raw_text = raw.text_config.unwrap_or_default();
        let default_family = if onevision {
            TextFamily::Qwen2
        } else {
            TextFamily::Llama
        };
        let text = resolve_text(&raw_text, default_family)?;
        let vision = resolve_vision(raw.vision_config.as_ref(), architecture)?;

        let vision_feature_layers = match &raw.vision_feature_layer {
            None | Some(Value::Null) => vec![if onevision { -1 } else { -2 }],
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
            .unwrap_or(if onevision { "full" } else { "default" })
        {
            "default" => SelectStrategy::Default,
            "full" => SelectStrategy::Full,
            other => {
                return Err(ModelError::Config(format!(
                    "vision_feature_select_strategy must be `default` or `full`, got `{other}`"
                )));
            }
        };
        let anyres = match architecture {
            Architecture::Llava => None,
            Architecture::LlavaNext => Some(AnyResConfig {
                pinpoints: pinpoints(
                    &raw.image_grid_pinpoints,
                    vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)],
                )?,
                max_tiles: None,
            }),
            Architecture::LlavaOnevision => Some(AnyResConfig {
                pinpoints: pinpoints(
                    &raw.image_grid_pinpoints,
                    (1..=6)
                        .flat_map(|i| (1..=6).map(move |j| (i * 384, j * 384)))
                        .collect(),
                )?,
                max_tiles: Some(max_tiles(raw.vision_aspect_ratio.as_deref())?),
            }),
        };
        // A tile's features must be its grid (transformers reshapes them to one).
        let tile_is_grid =
            vision.has_cls() == (vision_feature_select_strategy == SelectStrategy::Default);
        if anyres.is_some() && !tile_is_grid {
            return Err(ModelError::Config(
                "any-resolution tiling needs each tile's features to be exactly its patch grid: CLIP with the `default` select strategy or SigLIP with `full` (transformers fails on the other combinations)".into(),
            ));
        }
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
        let llama_like = text.family != TextFamily::Qwen2;
        if eos_token_ids.is_empty() && raw_text.eos_token_id.is_none() && llama_like {
            eos_token_ids = vec![2]; // LlamaConfig / MistralConfig default
        }
        let bos_token_id = match (
            &gen_cfg.bos_token_id,
            &raw_text.bos_token_id,
            &raw.bos_token_id,
        ) {
            (Some(v), _, _) => one_id(&Some(v.clone()), "generation_config.bos_token_id")?,
            (None, Some(v), _) => one_id(&Some(v.clone()), "text_config.bos_token_id")?,
            (None, None, Some(v)) => one_id(&Some(v.clone()), "bos_token_id")?,
            // LlamaConfig / MistralConfig default; Qwen2Config has none.
            (None, None, None) => llama_like.then_some(1),
        };
        let pad_token_id = one_id(&gen_cfg.pad_token_id, "pad_token_id")?
            .or(one_id(&raw.pad_token_id, "pad_token_id")?)
            .or(one_id(&raw_text.pad_token_id, "text_config.pad_token_id")?);

        let cfg = LlavaConfig {
            architecture,
            anyres,
            vocab_size: text.vocab_size,
            image_token_id: raw
                .image_token_index
                .or(raw.image_token_id)
                .unwrap_or(if onevision { 151646 } else { 32000 }),
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
        };
        if let ImageTokens::AnyRes(a) = cfg.image_tokens() {
            a.validate()
                .map_err(|e| ModelError::Config(e.to_string()))?;
        }
        Ok(cfg)
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

    /// Image features of one tile (the whole image for LLaVA-1.5) after the select strategy.
    pub fn tile_tokens(&self) -> usize {
        let dropped = self.vision_feature_select_strategy == SelectStrategy::Default;
        self.vision.num_positions() - dropped as usize
    }

    /// How many tokens an image becomes (see [`ImageTokens`]).
    pub fn image_tokens(&self) -> ImageTokens {
        match &self.anyres {
            None => ImageTokens::Fixed(self.tile_tokens()),
            Some(a) => ImageTokens::AnyRes(AnyRes {
                pinpoints: a.pinpoints.clone(),
                tile: self.vision.image_size,
                grid: self.vision.grid(),
                base_tokens: self.tile_tokens(),
                max_tiles: a.max_tiles,
                tile_single_images_only: self.architecture == Architecture::LlavaOnevision,
            }),
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
        assert_eq!(c.tile_tokens(), 576);
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
        assert_eq!(c.tile_tokens(), 577);
    }

    #[test]
    fn a_null_sliding_window_is_none_and_an_absent_one_mistrals_default() {
        let cfg = |w: &str| {
            let j = format!(
                r#"{{"text_config": {{"model_type": "mistral", "hidden_size": 64,
                "num_attention_heads": 4, "num_key_value_heads": 2{w}}}}}"#
            );
            LlavaConfig::from_json(&j, None)
                .unwrap()
                .text
                .sliding_window
        };
        assert_eq!(cfg(r#", "sliding_window": null"#), None);
        assert_eq!(cfg(""), Some(4096));
        assert_eq!(cfg(r#", "sliding_window": 12"#), Some(12));
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
