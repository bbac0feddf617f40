//! What a request becomes before any model runs, shared by the orchestrator (which runs no
//! model) and the model services: the checkpoint's tokenizer ([`LlavaTokenizer`]) and chat
//! template ([`ChatTemplate`]), image bytes checked and decoded under limits ([`image`]), and
//! the hash behind the fingerprints replicas compare ([`Fnv1a64`]). No tensors: this crate
//! does not link candle.

pub mod chat;
pub mod error;
pub mod fnv;
pub mod image;
pub mod image_tokens;
pub mod tokenizer;

pub use ::image::DynamicImage;
pub use chat::{ChatTemplate, ChatTurn, Message};
pub use error::PromptError;
pub use fnv::Fnv1a64;
pub use image::{ImageLimits, check_image_header, decode_image};
pub use image_tokens::{AnyRes, ImageTokens};
pub use tokenizer::LlavaTokenizer;
