//! The image-limit flags every service shares (the orchestrator checks images before
//! forwarding them, the draft and the target before decoding them).

use specllava_prompt::ImageLimits;

/// Image limits as flags (every flag is also an environment variable); each service
/// flattens this into its own `Args`.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageLimitArgs {
    /// Maximum encoded image size, in bytes.
    #[arg(long, env = "SPECLLAVA_MAX_IMAGE_BYTES", default_value_t = ImageLimits::DEFAULT.max_bytes)]
    pub max_image_bytes: usize,
    /// Maximum decoded image size, in pixels (checked on the header, before decoding).
    #[arg(long, env = "SPECLLAVA_MAX_IMAGE_PIXELS", default_value_t = ImageLimits::DEFAULT.max_pixels)]
    pub max_image_pixels: u64,
    /// Maximum image width and height, each, in pixels (checked on the header).
    #[arg(long, env = "SPECLLAVA_MAX_IMAGE_SIDE", default_value_t = ImageLimits::DEFAULT.max_side)]
    pub max_image_side: u32,
    /// Most memory decoding one image may allocate, in MiB.
    #[arg(
        long,
        env = "SPECLLAVA_MAX_IMAGE_DECODE_MB",
        default_value_t = ImageLimits::DEFAULT.max_alloc_bytes / (1024 * 1024)
    )]
    pub max_image_decode_mb: u64,
    /// Most images one request may carry (each is counted against the context, as the
    /// model's image tokens, before any is decoded).
    #[arg(long, env = "SPECLLAVA_MAX_IMAGES", default_value_t = ImageLimits::DEFAULT.max_images)]
    pub max_images: usize,
    /// Most tokens one image may become (any-resolution models tile a large image into
    /// many), checked on the image's header before it is decoded.
    #[arg(long, env = "SPECLLAVA_MAX_IMAGE_TOKENS", default_value_t = ImageLimits::DEFAULT.max_image_tokens)]
    pub max_image_tokens: usize,
}

impl ImageLimitArgs {
    /// The limits these flags give.
    pub fn limits(&self) -> ImageLimits {
        ImageLimits {
            max_bytes: self.max_image_bytes,
            max_pixels: self.max_image_pixels,
            max_side: self.max_image_side,
            max_alloc_bytes: self.max_image_decode_mb.saturating_mul(1024 * 1024),
            max_images: self.max_images,
            max_image_tokens: self.max_image_tokens,
        }
    }
}
