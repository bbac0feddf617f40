//! The CLIP encoder layers on the CPU backend: the same computation as the candle layers in
//! [`crate::vision`], on slices, with q/k/v packed into one weight and attention reading the
//! image's rows in place (every patch sees every patch).

use super::attention::{Heads, SegmentAttention, attend};
use super::gemm::PackedMatrix;
use super::load::{pack_stacked, vec_of};
use super::ops::{activate_in_place, add_in_place, layer_norm};
use crate::config::VisionConfig;
use crate::error::Result;
use crate::kv::HostLayerKv;
use crate::nn::Activation;
use crate::segment::Visibility;
use crate::weights::Weights;

/// One pre-LN encoder layer.
pub(crate) struct CpuClipLayer {
    ln1: (Vec<f32>, Vec<f32>),
    qkv: PackedMatrix,
    out: PackedMatrix,
    ln2: (Vec<f32>, Vec<f32>),
    fc1: PackedMatrix,
    fc2: PackedMatrix,
    act: Activation,
    shape: Heads,
    eps: f32,
}

fn norm(w: &Weights, prefix: &str, dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    Ok((
        vec_of(&w.get(&format!("{prefix}.weight"), &[dim])?)?,
        vec_of(&w.get(&format!("{prefix}.bias"), &[dim])?)?,
    ))
}

impl CpuClipLayer {
    /// Loads from `w` positioned at `encoder.layers.{i}.`.
    pub fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let i = cfg.intermediate_size;
        Ok(CpuClipLayer {
            ln1: norm(w, "layer_norm1", h)?,
            qkv: pack_stacked(
                w,
                "self_attn.",
                &[("q_proj", h), ("k_proj", h), ("v_proj", h)],
                h,
                true,
            )?,
            out: pack_stacked(w, "self_attn.", &[("out_proj", h)], h, true)?,
            ln2: norm(w, "layer_norm2", h)?,
            fc1: pack_stacked(w, "mlp.", &[("fc1", i)], h, true)?,
            fc2: pack_stacked(w, "mlp.", &[("fc2", h)], i, true)?,
            act: cfg.hidden_act,
            shape: Heads {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_attention_heads,
                head_dim: h / cfg.num_attention_heads,
            },
            eps: cfg.layer_norm_eps as f32,
        })
    }

    /// Runs the layer in place on `x` `[images * seq, hidden]`.
    pub fn forward(&self, x: &mut [f32], images: usize, seq: usize) {
        let h = self.ln1.0.len();
        let rows = images * seq;
        let mut normed = vec![0f32; rows * h];
        layer_norm(x, &self.ln1.0, &self.ln1.1, self.eps, &mut normed);
        let mut qkv = vec![0f32; rows * 3 * h];
        self.qkv.matmul(&normed, rows, &mut qkv);
        let mut attn = vec![0f32; rows * h];
        let visible = Visibility::full(seq, seq);
        let kvs: Vec<HostLayerKv> = qkv
            .chunks_exact(seq * 3 * h)
            .map(|img| {
                let mut kv = HostLayerKv {
                    k: Vec::with_capacity(seq * h),
                    v: Vec::with_capacity(seq * h),
                };
                for row in img.chunks_exact(3 * h) {
                    kv.k.extend_from_slice(&row[h..2 * h]);
                    kv.v.extend_from_slice(&row[2 * h..]);
                }
                kv
            })
            .collect();
        let parts: Vec<SegmentAttention<'_>> = kvs
            .iter()
            .enumerate()
            .map(|(b, kv)| SegmentAttention {
                kv,
                visible: &visible,
                n: seq,
                start: b * seq,
            })
            .collect();
        attend(self.shape, &qkv, 3 * h, &parts, &mut attn);
        let mut proj = vec![0f32; rows * h];
        self.out.matmul(&attn, rows, &mut proj);
        add_in_place(x, &proj);
        layer_norm(x, &self.ln2.0, &self.ln2.1, self.eps, &mut normed);
        let mut hidden = vec![0f32; rows * self.fc1.out_dim()];
        self.fc1.matmul(&normed, rows, &mut hidden);
        activate_in_place(&mut hidden, self.act);
        self.fc2.matmul(&hidden, rows, &mut proj);
        add_in_place(x, &proj);
    }
}
