//! The CLIP / SigLIP tower on the CPU backend: the same computation as the candle code in
//! [`crate::vision`], on slices. The embeddings (patch convolution as one packed product over
//! the image's patches, CLS and `pre_layrnorm` for CLIP, positions) and the encoder layers
//! (q/k/v packed into one weight, attention reading the image's rows in place: every patch
//! sees every patch).

use super::attention::{Heads, SegmentAttention, attend};
use super::gemm::PackedMatrix;
use super::load::{format_of, pack_stacked, vec_of};
use super::ops::{activate_in_place, add_in_place, layer_norm};
use crate::config::VisionConfig;
use crate::error::Result;
use crate::kv::HostLayerKv;
use crate::nn::Activation;
use crate::segment::Visibility;
use crate::weights::Weights;

/// The tower's embeddings: CLIP's `pre_layrnorm(cat(CLS, conv(pixels)) + positions)`, or
/// SigLIP's `conv(pixels) + bias + positions`.
pub(crate) struct CpuClipEmbeddings {
    /// The patch convolution's kernel (and bias) as a `[hidden, channels * patch * patch]`
    /// product.
    patch: PackedMatrix,
    /// CLIP's class embedding; `None` for SigLIP.
    class: Option<Vec<f32>>,
    /// `[positions, hidden]`.
    positions: Vec<f32>,
    /// CLIP's `pre_layrnorm`; `None` for SigLIP.
    pre_norm: Option<(Vec<f32>, Vec<f32>)>,
    hidden: usize,
    channels: usize,
    image_size: usize,
    patch_size: usize,
    grid: usize,
    eps: f32,
}

impl CpuClipEmbeddings {
    /// Loads from `w` positioned at the tower's prefix (`embeddings.*`, `pre_layrnorm.*`).
    pub fn load(w: &Weights, cfg: &VisionConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let (c, p) = (cfg.num_channels, cfg.patch_size);
        let name = "embeddings.patch_embedding.weight".to_string();
        let kernel = vec_of(&w.get(&name, &[h, c, p, p])?)?;
        let clip = cfg.has_cls();
        let bias = if clip {
            None
        } else {
            Some(vec_of(&w.get("embeddings.patch_embedding.bias", &[h])?)?)
        };
        Ok(Self {
            patch: PackedMatrix::pack(&kernel, h, c * p * p, bias, format_of(w, &[name])),
            class: clip
                .then(|| vec_of(&w.get("embeddings.class_embedding", &[h])?))
                .transpose()?,
            positions: vec_of(&w.get(
                "embeddings.position_embedding.weight",
                &[cfg.num_positions(), h],
            )?)?,
            pre_norm: clip.then(|| norm(w, "pre_layrnorm", h)).transpose()?,
            hidden: h,
            channels: c,
            image_size: cfg.image_size,
            patch_size: p,
            grid: cfg.grid(),
            eps: cfg.layer_norm_eps as f32,
        })
    }

    /// The embedded rows `[images * positions, hidden]` of `pixels` (`[images, C, H, W]`,
    /// row-major, H = W = the configured image size).
    pub fn forward(&self, pixels: &[f32]) -> Vec<f32> {
        let (c, p, g) = (self.channels, self.patch_size, self.grid);
        let side = self.image_size;
        let images = pixels.len() / (c * side * side);
        let h = self.hidden;
        let seq = self.class.is_some() as usize + g * g;
        // One row per patch, its values in the kernel's (channel, y, x) order.
        let mut patches = Vec::with_capacity(images * g * g * c * p * p);
        for image in pixels.chunks_exact(c * side * side) {
            for gy in 0..g {
                for gx in 0..g {
                    for plane in image.chunks_exact(side * side) {
                        for ky in 0..p {
                            let row = (gy * p + ky) * side + gx * p;
                            patches.extend_from_slice(&plane[row..row + p]);
                        }
                    }
                }
            }
        }
        let mut embedded = vec![0f32; images * g * g * h];
        self.patch.matmul(&patches, images * g * g, &mut embedded);
        let mut x = match &self.class {
            Some(class) => {
                let mut x = Vec::with_capacity(images * seq * h);
                for image in embedded.chunks_exact(g * g * h) {
                    x.extend_from_slice(class);
                    x.extend_from_slice(image);
                }
                x
            }
            None => embedded,
        };
        for rows in x.chunks_exact_mut(seq * h) {
            add_in_place(rows, &self.positions);
        }
        match &self.pre_norm {
            Some((weight, bias)) => {
                let mut out = vec![0f32; x.len()];
                layer_norm(&x, weight, bias, self.eps, &mut out);
                out
            }
            None => x,
        }
    }
}

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
