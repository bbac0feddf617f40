//! Element-wise and reduction kernels of the decoder on `f32` slices: RMSNorm (with the
//! residual add fused in), SwiGLU and other activations, rotary embeddings, attention dot
//! products, and a vectorisable `exp`.
//!
//! Each kernel is written once as plain Rust over fixed-width lane arrays and compiled twice
//! ([`multiversion!`]): with AVX2 + FMA where the CPU has them, and portable. Lanes are
//! independent and every reduction has a fixed order, so both builds give identical bits.

use super::pool::{self, DisjointOut};
use crate::nn::Activation;

/// Lanes of the explicit lane arrays (one AVX2 vector).
const LANES: usize = 8;

/// Defines `fn name(..)` that runs its body compiled for AVX2 + FMA when the CPU has them and
/// portable otherwise.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn fast($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::cpu::simd_enabled() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
                    return unsafe { fast($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// `exp(x)` of each lane, to within 2 ulp (Cephes' `expf` polynomial); `-inf` gives 0.
#[inline(always)]
fn exp_lanes(x: [f32; LANES]) -> [f32; LANES] {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let mut out = [0f32; LANES];
    for l in 0..LANES {
        let v = x[l].clamp(-87.3, 88.7);
        // Round to nearest with the 1.5 * 2^23 trick: plain arithmetic that vectorises.
        let n = (v.mul_add(LOG2E, 12_582_912.0)) - 12_582_912.0;
        let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, v));
        let mut p = 1.987_569_1e-4f32;
        p = p.mul_add(r, 1.398_199_9e-3);
        p = p.mul_add(r, 8.333_452e-3);
        p = p.mul_add(r, 4.166_579_6e-2);
        p = p.mul_add(r, 1.666_666_5e-1);
        p = p.mul_add(r, 5e-1);
        let e = (r * r).mul_add(p, r) + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        out[l] = if x[l] < -87.3 { 0.0 } else { e * scale };
    }
    out
}

/// Applies `$f` (an `#[inline(always)]` lane function) to every lane chunk of `$xs`. A macro,
/// not a closure, so the body is compiled with the caller's target features.
macro_rules! map_lanes {
    ($xs:expr, $f:expr) => {{
        let xs: &mut [f32] = $xs;
        let mut chunks = xs.chunks_exact_mut(LANES);
        for c in &mut chunks {
            let v: [f32; LANES] = (&*c).try_into().expect("lane chunk");
            c.copy_from_slice(&$f(v));
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut v = [0f32; LANES];
            let n = rest.len();
            v[..n].copy_from_slice(rest);
            rest.copy_from_slice(&$f(v)[..n]);
        }
    }};
}

/// `x * sigmoid(k * x)` of each lane (SiLU for k = 1, QuickGELU for k = 1.702).
#[inline(always)]
fn x_sigmoid_kx(v: [f32; LANES], k: f32) -> [f32; LANES] {
    let mut neg = [0f32; LANES];
    for l in 0..LANES {
        neg[l] = -k * v[l];
    }
    let e = exp_lanes(neg);
    let mut out = [0f32; LANES];
    for l in 0..LANES {
        out[l] = v[l] / (1.0 + e[l]);
    }
    out
}

#[inline(always)]
fn silu_lanes(v: [f32; LANES]) -> [f32; LANES] {
    x_sigmoid_kx(v, 1.0)
}

#[inline(always)]
fn quick_gelu_lanes(v: [f32; LANES]) -> [f32; LANES] {
    x_sigmoid_kx(v, 1.702)
}

/// Replaces each element with its exponential (inlined into multiversioned callers).
#[inline(always)]
pub(crate) fn exp_inline(xs: &mut [f32]) {
    map_lanes!(xs, exp_lanes);
}

/// `sum_i a[i] * b[i]` with a fixed lane-wise order (inlined into multiversioned callers).
#[inline(always)]
pub(crate) fn dot_inline(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES * 2];
    let mut ca = a.chunks_exact(LANES * 2);
    let mut cb = b.chunks_exact(LANES * 2);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES * 2 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] = x.mul_add(*y, acc[l]);
    }
    let mut half = [0f32; LANES];
    for l in 0..LANES {
        half[l] = acc[l] + acc[l + LANES];
    }
    ((half[0] + half[4]) + (half[2] + half[6])) + ((half[1] + half[5]) + (half[3] + half[7]))
}

/// `y += a * x` (inlined into multiversioned callers).
#[inline(always)]
pub(crate) fn axpy_inline(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = a.mul_add(*x, *y);
    }
}

multiversion! {
    /// Adds `delta` into the residual stream `x` (when given), then writes
    /// `weight * x / sqrt(mean(x^2) + eps)` of every row into `out`.
    pub fn add_rms_norm(
        x: &mut [f32],
        delta: Option<&[f32]>,
        weight: &[f32],
        eps: f32,
        out: &mut [f32],
    ) {
        let dim = weight.len();
        if let Some(d) = delta {
            for (x, d) in x.iter_mut().zip(d) {
                *x += d;
            }
        }
        for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let mut acc = [0f32; LANES];
            let mut chunks = row.chunks_exact(LANES);
            for c in &mut chunks {
                for l in 0..LANES {
                    acc[l] = c[l].mul_add(c[l], acc[l]);
                }
            }
            for (l, v) in chunks.remainder().iter().enumerate() {
                acc[l] = v.mul_add(*v, acc[l]);
            }
            let sum = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
            let inv = 1.0 / (sum / dim as f32 + eps).sqrt();
            for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
                *o = w * (v * inv);
            }
        }
    }
}

multiversion! {
    /// `x += delta`, element-wise.
    pub fn add_in_place(x: &mut [f32], delta: &[f32]) {
        for (x, d) in x.iter_mut().zip(delta) {
            *x += d;
        }
    }
}

multiversion! {
    /// LayerNorm of every row of `x` (`weight.len()` wide) into `out`:
    /// `(x - mean) / sqrt(var + eps) * weight + bias`.
    pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
        let dim = weight.len();
        for (row, o) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            let mean = row.iter().sum::<f32>() / dim as f32;
            let mut var = 0f32;
            for v in row {
                let d = v - mean;
                var = d.mul_add(d, var);
            }
            let inv = 1.0 / (var / dim as f32 + eps).sqrt();
            for (((o, v), w), b) in o.iter_mut().zip(row).zip(weight).zip(bias) {
                *o = ((v - mean) * inv).mul_add(*w, *b);
            }
        }
    }
}

multiversion! {
    /// Applies `act` to every element.
    pub fn activate_in_place(xs: &mut [f32], act: Activation) {
        activate(xs, act);
    }
}

/// Columns of one gating job (a multiple of [`LANES`]).
const GATING_BLOCK: usize = 128;

/// Outputs below which the gating runs on the calling thread alone.
const GATING_PARALLEL_MIN: usize = 8192;

/// SwiGLU-style gating: for every row of `gate_up` (`[gate | up]`, `2 * width` wide),
/// `out = act(gate) * up`. From [`GATING_PARALLEL_MIN`] outputs (many rows, or a wide
/// intermediate) the rows' blocks of columns are shared out over the CPU pool; every element
/// is computed alone, so the split changes no bit.
pub fn gated_activation(gate_up: &[f32], width: usize, act: Activation, out: &mut [f32]) {
    debug_assert_eq!(gate_up.len(), 2 * out.len());
    if out.len() < GATING_PARALLEL_MIN || pool::threads() <= 1 {
        for (gu, o) in gate_up
            .chunks_exact(2 * width)
            .zip(out.chunks_exact_mut(width))
        {
            gated_columns(gu, width, act, 0, o);
        }
        return;
    }
    let rows = out.len() / width;
    let blocks = width.div_ceil(GATING_BLOCK);
    let jobs = rows * blocks;
    let parts = (4 * pool::threads()).min(jobs);
    let per = jobs.div_ceil(parts);
    let shared = DisjointOut::new(out);
    pool::parallel_for(parts, &|part| {
        for job in part * per..((part + 1) * per).min(jobs) {
            let (r, b) = (job / blocks, job % blocks);
            let c0 = b * GATING_BLOCK;
            let cols = GATING_BLOCK.min(width - c0);
            // SAFETY: each (row, column block) of `out` is written by exactly one job.
            let o = unsafe { shared.range(r * width + c0, cols) };
            gated_columns(&gate_up[r * 2 * width..][..2 * width], width, act, c0, o);
        }
    });
}

multiversion! {
    /// `out[i] = act(gate[c0 + i]) * up[c0 + i]` of one row `gu = [gate | up]`
    /// (`2 * width` wide), a block of at most [`GATING_BLOCK`] columns at a time.
    fn gated_columns(gu: &[f32], width: usize, act: Activation, c0: usize, out: &mut [f32]) {
        let gate = &gu[c0..c0 + out.len()];
        let up = &gu[width + c0..width + c0 + out.len()];
        let mut v = [0f32; GATING_BLOCK];
        for ((o, g), u) in out
            .chunks_mut(GATING_BLOCK)
            .zip(gate.chunks(GATING_BLOCK))
            .zip(up.chunks(GATING_BLOCK))
        {
            let v = &mut v[..g.len()];
            v.copy_from_slice(g);
            activate(v, act);
            for ((o, a), u) in o.iter_mut().zip(v.iter()).zip(u) {
                *o = a * u;
            }
        }
    }
}

/// Applies `act` in place (inlined into the multiversioned callers).
#[inline(always)]
fn activate(xs: &mut [f32], act: Activation) {
    match act {
        Activation::Silu => map_lanes!(xs, silu_lanes),
        Activation::QuickGelu => map_lanes!(xs, quick_gelu_lanes),
        Activation::Relu => xs.iter_mut().for_each(|x| *x = x.max(0.0)),
        Activation::GeluTanh => xs.iter_mut().for_each(|x| {
            let v = *x;
            let inner = (2.0f32 / std::f32::consts::PI).sqrt() * (v + 0.044_715 * v * v * v);
            *x = 0.5 * v * (1.0 + inner.tanh());
        }),
        Activation::Gelu => xs.iter_mut().for_each(|x| {
            let v = *x;
            *x = 0.5 * v * (1.0 + candle_core::cpu::erf::erf_f32(v / std::f32::consts::SQRT_2));
        }),
    }
}

multiversion! {
    /// Rotary embedding (`rotate_half` convention) of `heads` consecutive heads of `head_dim`
    /// in `x`, with this row's `cos` / `sin` tables (`head_dim / 2` each).
    pub fn rope_heads(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = head_dim / 2;
        for head in x.chunks_exact_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    multiversion! {
        fn exp_in_place(xs: &mut [f32]) {
            exp_inline(xs);
        }
    }

    multiversion! {
        fn dot(a: &[f32], b: &[f32]) -> f32 {
            dot_inline(a, b)
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.043).collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, 88.0, -87.0]);
        let want: Vec<f32> = xs.iter().map(|x| x.exp()).collect();
        exp_in_place(&mut xs);
        for (g, w) in xs.iter().zip(&want) {
            let ulp = (g.to_bits() as i64 - w.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp: got {g} want {w}");
        }
        let mut edge = [f32::NEG_INFINITY, -1000.0, -87.5];
        exp_in_place(&mut edge);
        assert_eq!(edge, [0.0, 0.0, 0.0]);
    }

    #[test]
    fn gating_gives_each_element_the_same_bits_however_it_is_split() {
        // A width that is not a multiple of the block or of the lanes; 3 rows stay on the
        // calling thread, 40 are shared out over the pool.
        let width = 300;
        for rows in [3, 40] {
            let gate_up: Vec<f32> = (0..rows * 2 * width)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 97.0)
                .collect();
            for act in [Activation::Silu, Activation::QuickGelu, Activation::Relu] {
                let mut out = vec![f32::NAN; rows * width];
                gated_activation(&gate_up, width, act, &mut out);
                for r in 0..rows {
                    // The reference: the whole row's gate activated at once, times up.
                    let mut gate = gate_up[r * 2 * width..][..width].to_vec();
                    activate_in_place(&mut gate, act);
                    let up = &gate_up[r * 2 * width + width..][..width];
                    for c in 0..width {
                        let want = gate[c] * up[c];
                        assert_eq!(
                            out[r * width + c].to_bits(),
                            want.to_bits(),
                            "{act:?} {r} {c}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn dot_and_norm_match_plain_sums() {
        let a: Vec<f32> = (0..67).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..67).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
        let mut x = a.clone();
        let mut out = vec![0f32; 67];
        add_rms_norm(&mut x, None, &vec![2.0; 67], 1e-5, &mut out);
        let ms: f64 = a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / 67.0;
        for (o, v) in out.iter().zip(&a) {
            assert!((*o as f64 - 2.0 * *v as f64 / (ms + 1e-5).sqrt()).abs() < 1e-5);
        }
    }
}
