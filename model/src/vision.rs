//! The CLIP vision tower and the LLaVA multimodal projector.
//!
//! Mirrors `CLIPVisionModel` (transformers `models/clip/modeling_clip.py`) and
//! `LlavaMultiModalProjector` / `LlavaModel.get_image_features` (`models/llava/modeling_llava.py`):
//! patch conv -> `[CLS] + patches` + position embeddings -> `pre_layrnorm` (HF's spelling) ->
//! pre-LN encoder layers. `hidden_states[0]` is the `pre_layrnorm` output and
//! `hidden_states[i]` the output of layer `i`; `vision_feature_layer` picks among them (the
//! post-layernorm is never used by LLaVA), the `default` strategy drops CLS, and the projector
//! maps the (concatenated) features to the text width. Only the layers that the selected
//! hidden states need are loaded and run.

use candle_core::{D, Tensor};

use crate::backend::Backend;
use crate::config::{LlavaConfig, SelectStrategy, VisionConfig};
use crate::cpu::{CpuClipEmbeddings, CpuClipLayer};
use crate::error::{ModelError, Result};
use crate::nn::{Activation, LayerNorm, Linear};
use crate::weights::Weights;

struct ClipLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
    num_heads: usize,
    head_dim: usize,
}

impl ClipLayer {
    fn load(w: &Weights, cfg: &VisionConfig, backend: Backend) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = w.pp("self_attn.");
        Ok(ClipLayer {
            layer_norm1: LayerNorm::load(w, "layer_norm1", h, cfg.layer_norm_eps)?,
            q_proj: Linear::load(&attn, "q_proj", h, h, true, backend)?,
            k_proj: Linear::load(&attn, "k_proj", h, h, true, backend)?,
            v_proj: Linear::load(&attn, "v_proj", h, h, true, backend)?,
            out_proj: Linear::load(&attn, "out_proj", h, h, true, backend)?,
            layer_norm2: LayerNorm::load(w, "layer_norm2", h, cfg.layer_norm_eps)?,
            fc1: Linear::load(w, "mlp.fc1", h, cfg.intermediate_size, true, backend)?,
            fc2: Linear::load(w, "mlp.fc2", cfg.intermediate_size, h, true, backend)?,
            act: cfg.hidden_act,
            num_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, s, hidden) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, s, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, hidden))?;
        self.out_proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = (x + self.attention(&self.layer_norm1.forward(x)?)?)?;
        let m = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.layer_norm2.forward(&h)?)?)?,
        )?;
        h + m
    }
}

/// The tower's embeddings as candle tensors: the patch convolution's kernel (and SigLIP's
/// bias), CLIP's CLS, the position embeddings and CLIP's `pre_layrnorm`.
struct CandleEmbeddings {
    patch_embedding: Tensor,
    patch_bias: Option<Tensor>,
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    pre_layrnorm: Option<LayerNorm>,
}

/// The embeddings and encoder layers on one backend.
enum Encoder {
    Candle {
        embeddings: CandleEmbeddings,
        layers: Vec<ClipLayer>,
    },
    /// The CPU backend runs the embeddings too.
    Cpu {
        embeddings: Box<CpuClipEmbeddings>,
        layers: Vec<CpuClipLayer>,
    },
}

/// CLIP or SigLIP vision tower truncated to the layers LLaVA's feature selection needs.
pub struct VisionTower {
    layers: Encoder,
    feature_layers: Vec<usize>,
    cfg: VisionConfig,
}

impl VisionTower {
    /// Loads from `w` positioned at the tower's `vision_model.` (or equivalent) prefix.
    pub fn load(w: &Weights, cfg: &LlavaConfig, backend: Backend) -> Result<Self> {
        let v = &cfg.vision;
        let feature_layers = cfg.resolved_feature_layers();
        let needed = feature_layers.iter().copied().max().unwrap_or(0);
        let layer = |i: usize| w.pp(&format!("encoder.layers.{i}."));
        let clip = v.has_cls();
        let layers = match backend {
            Backend::Candle => Encoder::Candle {
                embeddings: CandleEmbeddings {
                    patch_embedding: w.get(
                        "embeddings.patch_embedding.weight",
                        &[v.hidden_size, v.num_channels, v.patch_size, v.patch_size],
                    )?,
                    patch_bias: (!clip)
                        .then(|| w.get("embeddings.patch_embedding.bias", &[v.hidden_size]))
                        .transpose()?,
                    class_embedding: clip
                        .then(|| w.get("embeddings.class_embedding", &[v.hidden_size]))
                        .transpose()?,
                    position_embedding: w.get(
                        "embeddings.position_embedding.weight",
                        &[v.num_positions(), v.hidden_size],
                    )?,
                    pre_layrnorm: clip
                        .then(|| {
                            LayerNorm::load(w, "pre_layrnorm", v.hidden_size, v.layer_norm_eps)
                        })
                        .transpose()?,
                },
                layers: (0..needed)
                    .map(|i| ClipLayer::load(&layer(i), v, backend))
                    .collect::<Result<Vec<_>>>()?,
            },
            Backend::Cpu => Encoder::Cpu {
                embeddings: Box::new(CpuClipEmbeddings::load(w, v)?),
                layers: (0..needed)
                    .map(|i| CpuClipLayer::load(&layer(i), v))
                    .collect::<Result<Vec<_>>>()?,
            },
        };
        Ok(VisionTower {
            layers,
            feature_layers,
            cfg: v.clone(),
        })
    }

    /// Runs the tower on `pixels` `[B, C, H, W]` and returns the selected hidden states
    /// concatenated on the feature axis: `[B, positions, hidden * n_selected]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let v = &self.cfg;
        if c != v.num_channels || h != v.image_size || w != v.image_size {
            return Err(ModelError::InvalidInput(format!(
                "pixel tensor is [{c}, {h}, {w}] but the vision tower expects [{}, {}, {}]",
                v.num_channels, v.image_size, v.image_size
            )));
        }
        let layers = match &self.layers {
            Encoder::Candle { layers, .. } => layers.len(),
            Encoder::Cpu { layers, .. } => layers.len(),
        };
        let mut states: Vec<Option<Tensor>> = vec![None; layers + 1];
        match &self.layers {
            Encoder::Candle { embeddings, layers } => {
                let patches = pixels.contiguous()?.conv2d(
                    &embeddings.patch_embedding,
                    0,
                    v.patch_size,
                    1,
                    1,
                )?; // [B, hidden, g, g]
                let mut x = patches.flatten_from(2)?.transpose(1, 2)?; // [B, g*g, hidden]
                if let Some(bias) = &embeddings.patch_bias {
                    x = x.broadcast_add(bias)?;
                }
                if let Some(class) = &embeddings.class_embedding {
                    let cls = class.reshape((1, 1, v.hidden_size))?.broadcast_as((
                        b,
                        1,
                        v.hidden_size,
                    ))?;
                    x = Tensor::cat(&[&cls, &x], 1)?;
                }
                let x = x.broadcast_add(&embeddings.position_embedding.unsqueeze(0)?)?;
                let mut x = match &embeddings.pre_layrnorm {
                    Some(norm) => norm.forward(&x)?,
                    None => x,
                };
                states[0] = Some(x.clone());
                for (i, layer) in layers.iter().enumerate() {
                    x = layer.forward(&x)?;
                    states[i + 1] = Some(x.clone());
                }
            }
            Encoder::Cpu { embeddings, layers } => {
                let _hold = crate::cpu::pool::hold();
                let shape = [b, v.num_positions(), v.hidden_size];
                let mut rows = embeddings.forward(&pixels.flatten_all()?.to_vec1::<f32>()?);
                let device = pixels.device();
                if self.feature_layers.contains(&0) {
                    states[0] = Some(Tensor::from_slice(&rows, shape.as_slice(), device)?);
                }
                for (i, layer) in layers.iter().enumerate() {
                    layer.forward(&mut rows, b, shape[1]);
                    if self.feature_layers.contains(&(i + 1)) {
                        states[i + 1] = Some(Tensor::from_slice(&rows, shape.as_slice(), device)?);
                    }
                }
            }
        }
        let selected = self
            .feature_layers
            .iter()
            .map(|&i| states[i].clone().expect("layer was run"))
            .collect::<Vec<_>>();
        Ok(Tensor::cat(&selected, D::Minus1)?)
    }
}

/// `LlavaMultiModalProjector`: `linear_2(act(linear_1(x)))`.
pub struct Projector {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl Projector {
    /// Loads from `w` positioned at `multi_modal_projector.`.
    pub fn load(w: &Weights, cfg: &LlavaConfig, backend: Backend) -> Result<Self> {
        let in_dim = cfg.vision.hidden_size * cfg.vision_feature_layers.len();
        let out = cfg.text.hidden_size;
        let bias = cfg.multimodal_projector_bias;
        Ok(Projector {
            linear_1: Linear::load(w, "linear_1", in_dim, out, bias, backend)?,
            linear_2: Linear::load(w, "linear_2", out, out, bias, backend)?,
            act: cfg.projector_hidden_act,
        })
    }

    /// Projects `[.., in]` features to `[.., text_hidden]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(x)?)?)
    }
}

/// Applies the select strategy to the tower output `[B, positions, F]` (`default` drops the
/// first position: CLS for CLIP, as `transformers` does for any tower).
pub fn select_features(features: &Tensor, strategy: SelectStrategy) -> candle_core::Result<Tensor> {
    match strategy {
        SelectStrategy::Full => Ok(features.clone()),
        SelectStrategy::Default => {
            let n = features.dim(1)?;
            features.narrow(1, 1, n - 1)
        }
    }
}
