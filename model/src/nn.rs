//! Small layers shared by the vision tower, the projector and the decoder, with the numerics
//! of their PyTorch counterparts.

use candle_core::{DType, Tensor};

use crate::backend::Backend;
use crate::cpu::gemm::{PackedMatrix, WeightFormat};
use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// Activation functions by their `transformers` `ACT2FN` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact (erf) GELU.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `silu` / `swish`.
    Silu,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parses an `ACT2FN` key.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            "relu" => Activation::Relu,
            other => {
                return Err(ModelError::Config(format!(
                    "unsupported activation `{other}` (supported: gelu, gelu_new, gelu_pytorch_tanh, quick_gelu, silu, relu)"
                )));
            }
        })
    }

    /// Applies the activation.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Silu => candle_nn::ops::silu(x),
            Activation::Relu => x.relu(),
        }
    }
}

/// `nn.Linear`: `y = x W^T + b` over any leading dimensions.
///
/// On the candle backend the weight is kept transposed and contiguous (`[in, out]`): on the
/// CPU, candle's matmul with a transposed `[out, in]` view repacks the whole weight on every
/// call. On the CPU backend it is packed for [`crate::cpu::gemm`] in the checkpoint's precision.
#[derive(Debug, Clone)]
pub struct Linear {
    kind: LinearKind,
}

#[derive(Debug, Clone)]
enum LinearKind {
    Candle {
        weight_t: Tensor,
        bias: Option<Tensor>,
    },
    Packed(PackedMatrix),
}

impl Linear {
    /// Loads `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`, for
    /// `backend`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        backend: Backend,
    ) -> Result<Self> {
        let name = format!("{prefix}.weight");
        let weight = w.get(&name, &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_dim])?)
        } else {
            None
        };
        match backend {
            Backend::Candle => Ok(Self::from_weights(weight, bias)?),
            Backend::Cpu => {
                let format = match w.source_dtype(&name) {
                    DType::F16 => WeightFormat::F16,
                    DType::BF16 => WeightFormat::Bf16,
                    _ => WeightFormat::F32,
                };
                let bias = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
                let weight = weight.flatten_all()?.to_vec1::<f32>()?;
                Ok(Linear {
                    kind: LinearKind::Packed(PackedMatrix::pack(
                        &weight, out_dim, in_dim, bias, format,
                    )),
                })
            }
        }
    }

    /// Wraps existing tensors for the candle backend: `weight` `[out, in]` as PyTorch stores
    /// it, `bias` `[out]`.
    pub fn from_weights(weight: Tensor, bias: Option<Tensor>) -> candle_core::Result<Self> {
        Ok(Linear {
            kind: LinearKind::Candle {
                weight_t: weight.t()?.contiguous()?,
                bias,
            },
        })
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let mut out_shape = dims.to_vec();
        match &self.kind {
            LinearKind::Candle { weight_t, bias } => {
                let y = x.reshape((rows, in_dim))?.matmul(weight_t)?;
                *out_shape.last_mut().expect("at least one dimension") = weight_t.dim(1)?;
                let y = y.reshape(out_shape)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            LinearKind::Packed(m) => {
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut y = vec![0f32; rows * m.out_dim()];
                m.matmul(&xs, rows, &mut y);
                *out_shape.last_mut().expect("at least one dimension") = m.out_dim();
                Tensor::from_vec(y, out_shape, x.device())
            }
        }
    }
}

/// `nn.LayerNorm` with affine weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both `[dim]`.
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get(&format!("{prefix}.weight"), &[dim])?,
            bias: w.get(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        candle_nn::ops::layer_norm(&x, &self.weight, &self.bias, self.eps)
    }
}

/// Llama's RMSNorm: `w * x / sqrt(mean(x^2) + eps)`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Loads `{prefix}.weight` `[dim]`.
    pub fn load(w: &Weights, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.get(&format!("{prefix}.weight"), &[dim])?,
            eps: eps as f32,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        candle_nn::ops::rms_norm(&x, &self.weight, self.eps)
    }
}
