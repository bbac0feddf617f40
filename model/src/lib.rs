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
//! Everything is f32 and device-agnostic (`--features cuda` for NVIDIA GPUs).

pub mod chat;
pub mod config;
pub mod error;
pub mod image;
pub mod kv;
pub mod llama;
pub mod llava;
pub mod nn;
pub mod resample;
pub mod timing;
pub mod tokenizer;
pub mod vision;
pub mod weights;

pub use ::image::DynamicImage;
pub use candle_core::{DType, Device, Tensor};
pub use chat::ChatTurn;
pub use config::{LlavaConfig, SelectStrategy, TextConfig, VisionConfig};
pub use error::ModelError;
pub use image::{ImageLimits, ImageProcessor, decode_image};
pub use kv::KvCache;
pub use llava::{Llava, TreeBatchItem};
pub use timing::ForwardTimer;
pub use tokenizer::LlavaTokenizer;
