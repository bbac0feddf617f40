//! The Llama decoder on the CPU backend: the same computation as [`crate::llama::Decoder`]
//! (the candle backend), with the work per row kept near what the hardware needs.
//!
//! - q/k/v are one packed weight, and so are gate/up: one product each, split by offsets;
//! - the residual add is fused into the next RMSNorm, SiLU(gate) * up into one pass;
//! - rotary tables are computed once per model for every position the config allows;
//! - attention reads the session's KV rows in place ([`super::attention`]);
//! - the activations of a forward live in scratch buffers reused across forwards.

use std::sync::Mutex;

use super::attention::{Heads, SegmentAttention, attend};
use super::gemm::PackedMatrix;
use super::load::{format_of, pack_stacked, vec_of};
use super::ops::{add_rms_norm, gated_activation, rope_heads};
use crate::config::TextConfig;
use crate::error::{ModelError, Result};
use crate::kv::KvCache;
use crate::llama::inv_freq;
use crate::nn::Activation;
use crate::segment::Segment;
use crate::weights::Weights;

/// Positions whose rotary tables are precomputed; rarer, later positions are computed per row.
const MAX_TABLE_POSITIONS: usize = 16384;

/// Which rows of a forward need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogitRows {
    /// Every new row (tree verification, draft levels).
    All,
    /// The last row only (prefill).
    Last,
}

struct Layer {
    input_norm: Vec<f32>,
    qkv: PackedMatrix,
    o: PackedMatrix,
    post_norm: Vec<f32>,
    gate_up: PackedMatrix,
    down: PackedMatrix,
}

/// Rotary `cos` / `sin` per position, `head_dim / 2` each.
struct RopeTable {
    inv_freq: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    positions: usize,
}

impl RopeTable {
    fn new(inv_freq: Vec<f32>, positions: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        RopeTable {
            inv_freq,
            cos,
            sin,
            positions,
        }
    }

    /// Applies the rotation of position `pos` to `heads` in place.
    fn apply(&self, heads: &mut [f32], head_dim: usize, pos: usize) {
        let half = self.inv_freq.len();
        if pos < self.positions {
            let (c, s) = (
                &self.cos[pos * half..][..half],
                &self.sin[pos * half..][..half],
            );
            rope_heads(heads, head_dim, c, s);
        } else {
            let (c, s): (Vec<f32>, Vec<f32>) = self
                .inv_freq
                .iter()
                .map(|&f| {
                    let a = pos as f32 * f;
                    (a.cos(), a.sin())
                })
                .unzip();
            rope_heads(heads, head_dim, &c, &s);
        }
    }
}

/// Activation buffers of one forward, kept for the next.
#[derive(Default)]
struct Scratch {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    gated: Vec<f32>,
}

fn sized(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buf.resize(len, 0.0);
    &mut buf[..len]
}

/// The decoder with packed weights (see the module docs).
pub(crate) struct CpuDecoder {
    embed_tokens: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: PackedMatrix,
    rope: RopeTable,
    shape: Heads,
    hidden: usize,
    intermediate: usize,
    vocab: usize,
    eps: f32,
    act: Activation,
    scratch: Mutex<Scratch>,
}

impl CpuDecoder {
    /// Loads from `lm` (positioned at the language model's prefix, like
    /// [`crate::llama::Decoder::load`]); `lm_head` is `(weights, name)` of an untied head, or
    /// `None` to tie it to the embeddings.
    pub fn load(lm: &Weights, lm_head: Option<(&Weights, String)>, c: &TextConfig) -> Result<Self> {
        let h = c.hidden_size;
        let q_dim = c.num_attention_heads * c.head_dim;
        let kv_dim = c.num_key_value_heads * c.head_dim;
        let i = c.intermediate_size;
        let layers = (0..c.num_hidden_layers)
            .map(|li| -> Result<Layer> {
                let p = format!("layers.{li}.");
                Ok(Layer {
                    input_norm: vec_of(&lm.get(&format!("{p}input_layernorm.weight"), &[h])?)?,
                    qkv: pack_stacked(
                        lm,
                        &format!("{p}self_attn."),
                        &[("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)],
                        h,
                        c.qkv_bias,
                    )?,
                    o: pack_stacked(
                        lm,
                        &format!("{p}self_attn."),
                        &[("o_proj", h)],
                        q_dim,
                        c.o_bias,
                    )?,
                    post_norm: vec_of(
                        &lm.get(&format!("{p}post_attention_layernorm.weight"), &[h])?,
                    )?,
                    gate_up: pack_stacked(
                        lm,
                        &format!("{p}mlp."),
                        &[("gate_proj", i), ("up_proj", i)],
                        h,
                        c.mlp_bias,
                    )?,
                    down: pack_stacked(
                        lm,
                        &format!("{p}mlp."),
                        &[("down_proj", h)],
                        i,
                        c.mlp_bias,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = lm.get("embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = match lm_head {
            Some((w, name)) => {
                let t = w.get(&name, &[c.vocab_size, h])?;
                PackedMatrix::pack(&vec_of(&t)?, c.vocab_size, h, None, format_of(w, &[name]))
            }
            None => PackedMatrix::pack(
                &vec_of(&embed)?,
                c.vocab_size,
                h,
                None,
                format_of(lm, &["embed_tokens.weight".to_string()]),
            ),
        };
        Ok(CpuDecoder {
            embed_tokens: vec_of(&embed)?,
            layers,
            norm: vec_of(&lm.get("norm.weight", &[h])?)?,
            lm_head,
            rope: RopeTable::new(
                inv_freq(c),
                c.max_position_embeddings.clamp(1, MAX_TABLE_POSITIONS),
            ),
            shape: Heads {
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            },
            hidden: h,
            intermediate: i,
            vocab: c.vocab_size,
            eps: c.rms_norm_eps as f32,
            act: c.hidden_act,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// Bytes of weights one forward streams (every layer, final norm, LM head).
    pub fn weight_bytes(&self) -> usize {
        let per_layer = |l: &Layer| {
            l.qkv.weight_bytes()
                + l.o.weight_bytes()
                + l.gate_up.weight_bytes()
                + l.down.weight_bytes()
                + 4 * (l.input_norm.len() + l.post_norm.len())
        };
        self.layers.iter().map(per_layer).sum::<usize>()
            + 4 * self.norm.len()
            + self.lm_head.weight_bytes()
    }

    /// Token embeddings `[n, hidden]` (ids already checked against the vocabulary).
    pub fn embed(&self, ids: &[u32]) -> Vec<f32> {
        let h = self.hidden;
        let mut x = Vec::with_capacity(ids.len() * h);
        for &id in ids {
            x.extend_from_slice(&self.embed_tokens[id as usize * h..][..h]);
        }
        x
    }

    /// Runs the decoder over the rows `x` `[N, hidden]` of all segments (concatenated in
    /// order), appending each segment's K/V rows to its cache after the used rows (room
    /// reserved by the caller), and returns the logits of `rows`, `[rows, vocab]`.
    pub fn forward(
        &self,
        mut x: Vec<f32>,
        segments: &[Segment],
        kvs: &mut [&mut KvCache],
        rows: LogitRows,
    ) -> Result<Vec<f32>> {
        let Heads {
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        let h = self.hidden;
        let total: usize = segments.iter().map(|s| s.n).sum();
        debug_assert_eq!(x.len(), total * h);
        // The pool's workers stay awake for this forward's products only.
        let _hold = super::pool::hold();
        let q_dim = heads * head_dim;
        let kv_dim = kv_heads * head_dim;
        let qkv_dim = q_dim + 2 * kv_dim;
        let offsets: Vec<usize> = kvs.iter().map(|kv| kv.used_len()).collect();
        for kv in kvs.iter() {
            if !kv.is_host() {
                return Err(ModelError::InvalidInput(
                    "KV cache was created for another backend".into(),
                ));
            }
        }
        let positions: Vec<usize> = segments
            .iter()
            .flat_map(|s| s.positions.iter().map(|&p| p as usize))
            .collect();

        let mut guard = self.scratch.try_lock();
        let mut local = Scratch::default();
        let scratch: &mut Scratch = match guard.as_deref_mut() {
            Ok(s) => s,
            Err(_) => &mut local,
        };
        let normed = sized(&mut scratch.normed, total * h);
        let qkv = sized(&mut scratch.qkv, total * qkv_dim);
        let attn = sized(&mut scratch.attn, total * q_dim);
        let proj = sized(&mut scratch.proj, total * h);
        let gate_up = sized(&mut scratch.gate_up, total * 2 * self.intermediate);
        let gated = sized(&mut scratch.gated, total * self.intermediate);

        for (li, layer) in self.layers.iter().enumerate() {
            // The previous layer's MLP output joins the residual stream here.
            let delta = (li > 0).then_some(&*proj);
            add_rms_norm(&mut x, delta, &layer.input_norm, self.eps, normed);
            layer.qkv.matmul(normed, total, qkv);
            for (r, &pos) in positions.iter().enumerate() {
                let row = &mut qkv[r * qkv_dim..][..q_dim + kv_dim];
                self.rope.apply(row, head_dim, pos);
            }
            let mut start = 0;
            for (si, seg) in segments.iter().enumerate() {
                let layer_kv = &mut kvs[si].host_layers_mut().expect("host cache")[li];
                for i in 0..seg.n {
                    let src = &qkv[(start + i) * qkv_dim..][..qkv_dim];
                    let dst = (offsets[si] + i) * kv_dim;
                    layer_kv.k[dst..dst + kv_dim].copy_from_slice(&src[q_dim..q_dim + kv_dim]);
                    layer_kv.v[dst..dst + kv_dim].copy_from_slice(&src[q_dim + kv_dim..]);
                }
                start += seg.n;
            }
            let mut start = 0;
            let parts: Vec<SegmentAttention<'_>> = segments
                .iter()
                .zip(kvs.iter())
                .map(|(seg, kv)| {
                    let part = SegmentAttention {
                        kv: &kv.host_layers().expect("host cache")[li],
                        visible: &seg.visible,
                        n: seg.n,
                        start,
                    };
                    start += seg.n;
                    part
                })
                .collect();
            attend(self.shape, qkv, qkv_dim, &parts, attn);
            drop(parts);
            layer.o.matmul(attn, total, proj);
            add_rms_norm(&mut x, Some(proj), &layer.post_norm, self.eps, normed);
            layer.gate_up.matmul(normed, total, gate_up);
            gated_activation(gate_up, self.intermediate, self.act, gated);
            layer.down.matmul(gated, total, proj);
        }
        let (first, n_out) = match rows {
            LogitRows::All => (0, total),
            LogitRows::Last => (total - 1, 1),
        };
        let x_out = &mut x[first * h..];
        let proj_out = &proj[first * h..];
        let normed_out = &mut normed[..n_out * h];
        add_rms_norm(x_out, Some(proj_out), &self.norm, self.eps, normed_out);
        let mut logits = vec![0f32; n_out * self.vocab];
        self.lm_head.matmul(normed_out, n_out, &mut logits);
        Ok(logits)
    }
}
