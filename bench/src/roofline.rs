//! The roofline a forward pass is held against: bytes of weights over measured memory
//! bandwidth, FLOPs over measured matmul rate.
//!
//! Both machine rates are measured here, on the device the model runs on: bandwidth with a
//! matrix-vector product over a matrix far larger than the caches (the operation decoding is
//! made of), the compute peak as the faster of a large square f32 matmul (on a CPU, candle's or
//! the CPU backend's own packed product) and, on a CPU, a register-only fused multiply-add loop
//! on every core: the rate no product can beat, so no forward ever reads as faster than its
//! roofline.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use specllava_model::cpu::gemm::{PackedMatrix, WeightFormat};
use specllava_model::{Llava, TextConfig};

use crate::probes;

/// Bytes the streaming-read probe reads: far beyond any last-level cache we have met (one
/// machine reported 480 MiB of L3), so that it measures memory.
const STREAM_BYTES: usize = 1 << 30;

/// Measured machine rates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MachineRates {
    /// Sustained memory bandwidth, bytes per second: the streaming read on a CPU, the GEMV on
    /// other devices.
    pub bandwidth_bytes_per_s: f64,
    /// Bandwidth seen by an f32 matrix-vector product on the device.
    pub gemv_bytes_per_s: f64,
    /// Bandwidth of a plain multi-threaded streaming read (CPU only; 0 on other devices).
    pub stream_bytes_per_s: f64,
    /// Sustained dense f32 matmul rate, FLOP per second.
    pub matmul_flops_per_s: f64,
    /// Peak f32 fused multiply-add rate of every core, FLOP per second (CPU: a loop of
    /// independent FMAs in registers; other devices: the matmul rate).
    pub fma_peak_flops_per_s: f64,
}

impl MachineRates {
    /// The compute rate a roofline holds forwards against: the best of the peak and the
    /// matmul rate, FLOP per second.
    pub fn compute_flops_per_s(&self) -> f64 {
        self.fma_peak_flops_per_s.max(self.matmul_flops_per_s)
    }
}

/// Best (shortest) wall time of `reps` runs of `f`, in seconds, after one warm-up run.
fn best_time<F: FnMut() -> candle_core::Result<()>>(
    reps: usize,
    mut f: F,
) -> candle_core::Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// FLOP/s of the CPU backend's packed f32 product, `n` rows against an `n x n` weight.
fn packed_matmul_rate(n: usize) -> candle_core::Result<f64> {
    let w: Vec<f32> = (0..n * n).map(|i| (i % 17) as f32 * 0.01).collect();
    let m = PackedMatrix::pack(&w, n, n, None, WeightFormat::F32);
    let x: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 * 0.01).collect();
    let mut y = vec![0f32; n * n];
    let t = best_time(3, || {
        m.matmul(&x, n, &mut y);
        std::hint::black_box(&y);
        Ok(())
    })?;
    Ok(2.0 * (n as f64).powi(3) / t)
}

impl MachineRates {
    /// Measures bandwidth with a `[rows, cols]` f32 matrix-vector product (pick well over the
    /// last-level cache; 64 MiB+) and the matmul rate with an `n x n x n` matmul.
    pub fn measure(
        device: &Device,
        bw_rows: usize,
        bw_cols: usize,
        n: usize,
    ) -> candle_core::Result<Self> {
        let w = Tensor::randn(0f32, 1.0, (bw_rows, bw_cols), device)?;
        let x = Tensor::randn(0f32, 1.0, (bw_cols, 1), device)?;
        let gemv = best_time(5, || {
            let y = w.matmul(&x)?;
            device.synchronize()?;
            drop(y);
            Ok(())
        })?;
        let bytes = (bw_rows * bw_cols * DType::F32.size_in_bytes()) as f64;
        let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
        let mm = best_time(3, || {
            let c = a.matmul(&b)?;
            device.synchronize()?;
            drop(c);
            Ok(())
        })?;
        let gemv_bw = bytes / gemv;
        let mut matmul_rate = 2.0 * (n as f64).powi(3) / mm;
        let (stream_bw, fma_peak) = if device.is_cpu() {
            // The CPU backend's own products may run wider vectors than candle's GEMM.
            matmul_rate = matmul_rate.max(packed_matmul_rate(n)?);
            (
                probes::stream_read_bandwidth(STREAM_BYTES),
                probes::fma_peak_rate(),
            )
        } else {
            (0.0, matmul_rate)
        };
        Ok(Self {
            // On a CPU the streaming read over 1 GiB: the GEMV's 64 MiB may sit in a large L3.
            bandwidth_bytes_per_s: if device.is_cpu() { stream_bw } else { gemv_bw },
            gemv_bytes_per_s: gemv_bw,
            stream_bytes_per_s: stream_bw,
            matmul_flops_per_s: matmul_rate,
            fma_peak_flops_per_s: fma_peak,
        })
    }
}

/// What one decoder forward costs, from the configuration alone.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ForwardCost {
    /// Bytes of weights every forward reads once (all decoder layers, final norm, LM head; the
    /// embedding table is only gathered from and not counted), at the precision the model
    /// stores them in.
    pub weight_bytes: f64,
    /// FLOPs of the linear layers and LM head per node.
    pub linear_flops_per_node: f64,
    /// Extra FLOPs per node per attended KV row (QK^T and AV over every layer).
    pub attention_flops_per_node_per_row: f64,
    /// Bytes of KV cache per row (read once per session per forward).
    pub kv_bytes_per_row: f64,
}

impl ForwardCost {
    /// Costs of `model`'s decoder, its weights counted at the precision they are stored in
    /// (f16 on the CPU backend for an f16 checkpoint; f32 on candle).
    pub fn for_model(model: &Llava) -> Self {
        let mut cost = Self::of(&model.config().text);
        if let Some(bytes) = model.decoder_weight_bytes() {
            cost.weight_bytes = bytes as f64;
        }
        cost
    }

    /// Costs of a Llama decoder with f32 weights.
    pub fn of(t: &TextConfig) -> Self {
        let h = t.hidden_size as f64;
        let q = (t.num_attention_heads * t.head_dim) as f64;
        let kv = (t.num_key_value_heads * t.head_dim) as f64;
        let i = t.intermediate_size as f64;
        let l = t.num_hidden_layers as f64;
        let per_layer = h * q + 2.0 * h * kv + q * h + 3.0 * h * i + 2.0 * h;
        let params = l * per_layer + h + t.vocab_size as f64 * h;
        Self {
            weight_bytes: 4.0 * params,
            linear_flops_per_node: 2.0 * (params - h - 2.0 * l * h),
            attention_flops_per_node_per_row: 4.0 * l * q,
            kv_bytes_per_row: 4.0 * 2.0 * l * kv,
        }
    }

    /// Memory time in seconds of one forward of `batch` sessions, each with `nodes` new nodes
    /// on `prefix` cached rows: the weights once, each session's KV once, over the bandwidth.
    pub fn memory_s(&self, rates: &MachineRates, nodes: usize, batch: usize, prefix: usize) -> f64 {
        let rows = (prefix + nodes) as f64;
        let bytes = self.weight_bytes + batch as f64 * rows * self.kv_bytes_per_row;
        bytes / rates.bandwidth_bytes_per_s
    }

    /// Compute time in seconds of the same forward: its FLOPs at the machine's peak.
    pub fn compute_s(
        &self,
        rates: &MachineRates,
        nodes: usize,
        batch: usize,
        prefix: usize,
    ) -> f64 {
        let total_nodes = (nodes * batch) as f64;
        let rows = (prefix + nodes) as f64;
        let flops = total_nodes
            * (self.linear_flops_per_node + rows * self.attention_flops_per_node_per_row);
        flops / rates.compute_flops_per_s()
    }

    /// Roofline time in seconds of one forward of `batch` sessions, each with `nodes` new nodes
    /// attending to `prefix` cached rows: the larger of the memory time and the compute time.
    pub fn roofline_s(
        &self,
        rates: &MachineRates,
        nodes: usize,
        batch: usize,
        prefix: usize,
    ) -> f64 {
        self.memory_s(rates, nodes, batch, prefix)
            .max(self.compute_s(rates, nodes, batch, prefix))
    }

    /// Roofline time in seconds of a prefill of `rows` prompt rows on an empty cache (causal
    /// attention: row `i` attends to `i + 1` rows).
    pub fn prefill_roofline_s(&self, rates: &MachineRates, rows: usize) -> f64 {
        let r = rows as f64;
        let bytes = self.weight_bytes + r * self.kv_bytes_per_row;
        let attended = r * (r + 1.0) / 2.0;
        let flops =
            r * self.linear_flops_per_node + attended * self.attention_flops_per_node_per_row;
        (bytes / rates.bandwidth_bytes_per_s).max(flops / rates.compute_flops_per_s())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TextConfig {
        let json = r#"{"text_config": {"vocab_size": 100, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1},
            "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "image_size": 16, "patch_size": 8}}"#;
        specllava_model::LlavaConfig::from_json(json, None)
            .unwrap()
            .text
    }

    #[test]
    fn roofline_is_memory_bound_for_one_node_and_compute_bound_for_many() {
        let c = ForwardCost::of(&cfg());
        // per layer: q 8*8 + kv 2*8*4 + o 8*8 + mlp 3*8*16 + norms 16 = 592; 2 layers + norm 8 + head 800
        assert_eq!(c.weight_bytes, 4.0 * (2.0 * 592.0 + 8.0 + 800.0));
        let rates = MachineRates {
            bandwidth_bytes_per_s: 1e9,
            gemv_bytes_per_s: 1e9,
            stream_bytes_per_s: 0.0,
            matmul_flops_per_s: 1e9,
            fma_peak_flops_per_s: 0.5e9,
        };
        let one = c.roofline_s(&rates, 1, 1, 0);
        assert!((one - c.weight_bytes / 1e9 - c.kv_bytes_per_row / 1e9).abs() < 1e-15);
        let many = c.roofline_s(&rates, 128, 16, 0);
        assert!(many > 128.0 * 16.0 * c.linear_flops_per_node / 1e9 * 0.999);
        let prefill = c.prefill_roofline_s(&rates, 64);
        assert!(prefill >= 64.0 * c.linear_flops_per_node / 1e9);
    }
}
