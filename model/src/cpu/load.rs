//! Turning checkpoint tensors into the CPU backend's packed weights and plain vectors.

use candle_core::{DType, Tensor};

use super::gemm::{PackedMatrix, WeightFormat};
use crate::error::Result;
use crate::weights::Weights;

/// The storage format shared by `names` (their checkpoint dtype), f32 when they differ.
pub(crate) fn format_of(w: &Weights, names: &[String]) -> WeightFormat {
    let formats: Vec<WeightFormat> = names
        .iter()
        .map(|n| match w.source_dtype(n) {
            DType::F16 => WeightFormat::F16,
            DType::BF16 => WeightFormat::Bf16,
            _ => WeightFormat::F32,
        })
        .collect();
    if formats.windows(2).all(|p| p[0] == p[1]) {
        formats[0]
    } else {
        WeightFormat::F32
    }
}

/// A tensor's values, flattened.
pub(crate) fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Packs the `[out_i, in]` weights `prefix{name}.weight` (and biases) stacked on the output axis.
pub(crate) fn pack_stacked(
    w: &Weights,
    prefix: &str,
    names: &[(&str, usize)],
    in_dim: usize,
    bias: bool,
) -> Result<PackedMatrix> {
    let mut weight = Vec::new();
    let mut biases = Vec::new();
    let mut weight_names = Vec::new();
    for &(name, out) in names {
        let wname = format!("{prefix}{name}.weight");
        weight.extend(vec_of(&w.get(&wname, &[out, in_dim])?)?);
        weight_names.push(wname);
        if bias {
            biases.extend(vec_of(&w.get(&format!("{prefix}{name}.bias"), &[out])?)?);
        }
    }
    let out: usize = names.iter().map(|(_, o)| o).sum();
    let format = format_of(w, &weight_names);
    Ok(PackedMatrix::pack(
        &weight,
        out,
        in_dim,
        bias.then_some(biases),
        format,
    ))
}
