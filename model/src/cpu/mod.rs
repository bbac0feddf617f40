//! The CPU backend: the decoder's forward pass and the linear layers on plain `f32` slices,
//! kept near the memory roofline for the few-row products of speculative decoding.
//!
//! What runs where:
//! - **CPU device** (default): the decoder ([`CpuDecoder`]), the CLIP tower's embeddings and
//!   encoder layers ([`vision`]) and every other [`crate::nn::Linear`] (projector) use this
//!   module: weights packed once at load time in the checkpoint's precision ([`gemm`]),
//!   multi-threaded products on a worker pool that polls while a forward runs and sleeps
//!   between forwards ([`pool`]), fused element-wise kernels ([`ops`]) and tree attention
//!   over host KV rows ([`attention`]). The products run AVX-512F or AVX2 + FMA + F16C
//!   register tiles chosen at run time (the element-wise kernels AVX2), with a portable
//!   fallback; all give the same bits.
//! - **CUDA / Metal devices**, or [`crate::Backend::Candle`] on the CPU: candle's own kernels
//!   ([`crate::llama::Decoder`]); nothing here is used, and a GPU build compiles without it
//!   mattering.
//!
//! [`crate::CpuSettings`] (the services' `--cpu-threads` and `--cpu-kernel`) caps the threads
//! and the instruction set (for comparisons: the results are the same).

pub(crate) mod attention;
pub(crate) mod decoder;
pub mod gemm;
pub(crate) mod load;
pub(crate) mod ops;
pub mod pool;
pub(crate) mod vision;

pub(crate) use decoder::{CpuDecoder, LogitRows};
pub(crate) use vision::{CpuClipEmbeddings, CpuClipLayer};

/// Whether SIMD kernels (AVX2 + FMA + F16C or better) are in use (decided once per process).
pub(crate) fn simd_enabled() -> bool {
    static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SIMD.get_or_init(|| gemm::kernel_name() != "portable")
}
