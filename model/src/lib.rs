//! LLaVA vision-language models on candle: HF checkpoints, tree-attention forward, per-session KV.
//!
//! - [`Llava`] loads a Hugging Face `LlavaForConditionalGeneration` checkpoint (both tensor-name
//!   layouts, single or sharded safetensors, f16/bf16 converted to f32) and runs
//!   [`Llava::prefill`] (images + prompt), [`Llava::forward_tree`] (a token tree on top of the
//!   committed prefix, logits at every node) and [`Llava::forward_batch`] (several sessions'
//!   trees packed into one call).
//! - [`KvCache`] is one session's cache: committed rows plus pending tree nodes, with
//!   [`KvCache::commit`] of an accepted path and [`KvCache::rollback`].
//! - [`ImageProcessor`] decodes images under [`ImageLimits`] and reproduces
//!   `CLIPImageProcessor` (Pillow-exact resampling); [`LlavaTokenizer`] and [`chat`] turn
//!   conversations into ids.
//! - [`ForwardTimer`] times batched tree forwards (verify and draft-level costs).
//!
//! Activations and KV are f32. On the CPU the decoder runs on the [`cpu`] backend (weights kept
//! in the checkpoint's precision and widened in registers); on other devices, or with
//! [`Backend::Candle`], on candle's kernels with f32 weights (`--features cuda` for NVIDIA GPUs).

mod anyres;
pub mod anyres_checkpoint;
pub mod backend;
pub mod config;
pub mod cpu;
pub mod error;
pub mod image;
pub mod kv;
pub mod llama;
pub mod llava;
pub mod nn;
pub mod resample;
mod segment;
pub mod timing;
pub mod vision;
pub mod weights;
pub mod widen;

pub use ::image::DynamicImage;
pub use backend::{Backend, CpuKernel, CpuSettings};
pub use candle_core::{DType, Device, Tensor};
pub use config::{
    AnyResConfig, Architecture, LlavaConfig, SelectStrategy, TextConfig, TextFamily, TowerKind,
    VisionConfig,
};
pub use error::ModelError;
pub use image::ImageProcessor;
pub use kv::KvCache;
pub use llava::{ImagePixels, Llava, PrefillImages, TreeBatchItem, VisionFeatures};
pub use timing::{CALIBRATION_PROMPT_ROWS, ForwardTimer, SweepPlan, TimedForward};
// The prompt side (tokenizer, chat template, image checks) lives in `specllava-prompt`, which
// links no candle; re-exported here for the model services.
pub use specllava_prompt::{
    AnyRes, ChatTemplate, ChatTurn, Fnv1a64, ImageLimits, ImageTokens, LlavaTokenizer, Message,
    chat, check_image_header, decode_image, tokenizer,
};
