//! The Llama decoder with tree attention over a per-session KV cache.
//!
//! Numerics follow `LlamaForCausalLM` (transformers `models/llama/modeling_llama.py`): RMSNorm,
//! rotary embeddings with `rotate_half`, grouped-query attention, SwiGLU MLP. Unlike
//! candle-transformers' `llama`, every call takes explicit position ids and an additive mask
//! per *segment*, and returns hidden states for every new row, which is what tree verification
//! and packed batches need.
//!
//! A call processes several segments (one per session) at once: embeddings, every linear layer
//! and the LM head run over the concatenation of all rows; only attention is per segment, over
//! that session's cached rows plus its new rows. GQA is done without repeating K/V: the query
//! heads that share a KV head are folded into the row dimension of one matmul.

use candle_core::{DType, Device, Tensor};

use crate::backend::Backend;
use crate::config::{RopeScaling, TextConfig};
use crate::error::{ModelError, Result};
use crate::kv::KvCache;
use crate::nn::{Linear, RmsNorm};
use crate::segment::Segment;
use crate::weights::Weights;

struct DecoderLayer {
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl DecoderLayer {
    fn load(w: &Weights, c: &TextConfig) -> Result<Self> {
        let h = c.hidden_size;
        let q_dim = c.num_attention_heads * c.head_dim;
        let kv_dim = c.num_key_value_heads * c.head_dim;
        let a = w.pp("self_attn.");
        let m = w.pp("mlp.");
        let (qkv_b, o_b) = (c.qkv_bias, c.o_bias);
        let mb = c.mlp_bias;
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(w, "input_layernorm", h, c.rms_norm_eps)?,
            q_proj: Linear::load(&a, "q_proj", h, q_dim, qkv_b, Backend::Candle)?,
            k_proj: Linear::load(&a, "k_proj", h, kv_dim, qkv_b, Backend::Candle)?,
            v_proj: Linear::load(&a, "v_proj", h, kv_dim, qkv_b, Backend::Candle)?,
            o_proj: Linear::load(&a, "o_proj", q_dim, h, o_b, Backend::Candle)?,
            post_attention_layernorm: RmsNorm::load(
                w,
                "post_attention_layernorm",
                h,
                c.rms_norm_eps,
            )?,
            gate_proj: Linear::load(&m, "gate_proj", h, c.intermediate_size, mb, Backend::Candle)?,
            up_proj: Linear::load(&m, "up_proj", h, c.intermediate_size, mb, Backend::Candle)?,
            down_proj: Linear::load(&m, "down_proj", c.intermediate_size, h, mb, Backend::Candle)?,
        })
    }
}

/// The Llama language model: embeddings, decoder layers, final norm, LM head.
pub struct Decoder {
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    cfg: TextConfig,
    device: Device,
}

/// Inverse RoPE frequencies, computed in f32 as transformers does.
pub(crate) fn inv_freq(c: &TextConfig) -> Vec<f32> {
    let dim = c.head_dim;
    let base = c.rope.theta as f32;
    let plain: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0f32 / base.powf(i as f32 / dim as f32))
        .collect();
    match &c.rope.scaling {
        RopeScaling::Default => plain,
        RopeScaling::Linear { factor } => plain.iter().map(|f| f / *factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, lo, hi, old) = (
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / lo;
            let high_freq_wavelen = old / hi;
            plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Decoder {
    /// Loads from `lm` (positioned at the language model's `embed_tokens`/`layers`/`norm`
    /// prefix); `lm_head` is the LM head weight, or `None` to tie it to the embeddings.
    pub fn load(
        lm: &Weights,
        lm_head: Option<Tensor>,
        c: &TextConfig,
        device: &Device,
    ) -> Result<Self> {
        let embed_tokens = lm.get("embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| DecoderLayer::load(&lm.pp(&format!("layers.{i}.")), c))
            .collect::<Result<Vec<_>>>()?;
        let head = lm_head.unwrap_or_else(|| embed_tokens.clone());
        if head.dims() != [c.vocab_size, c.hidden_size] {
            return Err(ModelError::Config(format!(
                "lm_head.weight has shape {:?} but config.json implies {:?}",
                head.dims(),
                [c.vocab_size, c.hidden_size]
            )));
        }
        Ok(Decoder {
            embed_tokens,
            layers,
            norm: RmsNorm::load(lm, "norm", c.hidden_size, c.rms_norm_eps)?,
            lm_head: Linear::from_weights(head, None)?,
            inv_freq: inv_freq(c),
            cfg: c.clone(),
            device: device.clone(),
        })
    }

    /// The resolved text configuration.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Token embeddings `[n, hidden]`; ids must be in the vocabulary.
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(ModelError::UnknownToken {
                id,
                vocab_size: self.cfg.vocab_size,
            });
        }
        let idx = Tensor::new(ids, &self.device)?;
        Ok(self.embed_tokens.index_select(&idx, 0)?)
    }

    /// LM head on final hidden states `[n, hidden]` -> f32 logits `[n, vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// `cos`, `sin` `[n, head_dim / 2]` for the given positions (computed in f32, as
    /// transformers does, then in the model's dtype).
    fn rope_tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let shape = (positions.len(), half);
        let dtype = self.embed_tokens.dtype();
        Ok((
            Tensor::from_vec(cos, shape, &self.device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, shape, &self.device)?.to_dtype(dtype)?,
        ))
    }

    /// Runs the decoder on `x` `[N, hidden]`, the rows of all segments concatenated in order.
    /// Segment `i` appends its K/V rows to `kvs[i]` right after its used rows (the caller has
    /// reserved room and updates the cache bookkeeping afterwards). Returns the final-norm
    /// hidden states `[N, hidden]`.
    pub(crate) fn forward(
        &self,
        x: Tensor,
        segments: &[Segment],
        kvs: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let total: usize = segments.iter().map(|s| s.n).sum();
        debug_assert_eq!(x.dim(0)?, total);
        debug_assert_eq!(segments.len(), kvs.len());
        let positions: Vec<u32> = segments
            .iter()
            .flat_map(|s| s.positions.iter().copied())
            .collect();
        let (cos, sin) = self.rope_tables(&positions)?;
        let (heads, kv_heads, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let groups = heads / kv_heads;
        let scale = (hd as f64).powf(-0.5);
        let offsets: Vec<usize> = kvs.iter().map(|kv| kv.used_len()).collect();
        // Each segment's tree mask (0 / -inf), built on the device once for all layers, in
        // the model's dtype.
        let dtype = x.dtype();
        let masks = segments
            .iter()
            .zip(&offsets)
            .map(|(seg, &offset)| seg.visible.mask_tensor(offset + seg.n, &self.device, dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;

        let mut x = x;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            // [N, H*hd] -> [1, H, N, hd] for the rope kernel.
            let to_heads = |t: Tensor, nh: usize| -> candle_core::Result<Tensor> {
                t.reshape((total, nh, hd))?
                    .transpose(0, 1)?
                    .contiguous()?
                    .unsqueeze(0)
            };
            let q = to_heads(layer.q_proj.forward(&h)?, heads)?;
            let k = to_heads(layer.k_proj.forward(&h)?, kv_heads)?;
            let v = to_heads(layer.v_proj.forward(&h)?, kv_heads)?.squeeze(0)?;
            let q = candle_nn::rotary_emb::rope(&q, &cos, &sin)?.squeeze(0)?;
            let k = candle_nn::rotary_emb::rope(&k, &cos, &sin)?.squeeze(0)?;

            let mut outs = Vec::with_capacity(segments.len());
            let mut start = 0;
            for (si, seg) in segments.iter().enumerate() {
                let n = seg.n;
                let (q_s, k_s, v_s) = if segments.len() == 1 {
                    (q.clone(), k.clone(), v.clone())
                } else {
                    (
                        q.narrow(1, start, n)?.contiguous()?,
                        k.narrow(1, start, n)?.contiguous()?,
                        v.narrow(1, start, n)?.contiguous()?,
                    )
                };
                let (keys, values) = kvs[si].write_and_view(li, offsets[si], &k_s, &v_s)?;
                let l = offsets[si] + n;
                // Fold the query heads sharing a KV head into rows: [kvh, groups * n, hd].
                let q_g = q_s.reshape((kv_heads, groups * n, hd))?;
                let scores = (q_g.matmul(&keys.t()?)? * scale)?;
                let scores = match &masks[si] {
                    Some(mask) => scores
                        .reshape((kv_heads, groups, n, l))?
                        .broadcast_add(mask)?
                        .reshape((kv_heads, groups * n, l))?,
                    None => scores,
                };
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                let out = probs.matmul(&values)?; // [kvh, groups * n, hd]
                let out = out
                    .reshape((heads, n, hd))?
                    .transpose(0, 1)?
                    .reshape((n, heads * hd))?;
                outs.push(out);
                start += n;
            }
            let attn = if outs.len() == 1 {
                outs.pop().expect("one segment")
            } else {
                Tensor::cat(&outs, 0)?
            };
            let x_attn = (&x + layer.o_proj.forward(&attn)?)?;
            let h = layer.post_attention_layernorm.forward(&x_attn)?;
            let gate = c.hidden_act.forward(&layer.gate_proj.forward(&h)?)?;
            let mlp = layer
                .down_proj
                .forward(&(gate * layer.up_proj.forward(&h)?)?)?;
            x = (x_attn + mlp)?;
        }
        Ok(self.norm.forward(&x)?)
    }
}
