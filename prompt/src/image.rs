//! Image bytes from a request, checked and decoded under limits (decompression bombs): the
//! header is read and checked before any pixel buffer exists.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::error::{PromptError, Result};

/// Limits applied when decoding untrusted image bytes (decompression bombs). Everything but
/// `max_bytes` is checked on the header, before any pixel buffer exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted encoded size in bytes.
    pub max_bytes: usize,
    /// Largest accepted width * height.
    pub max_pixels: u64,
    /// Largest accepted width and height, each.
    pub max_side: u32,
    /// Most bytes the decoder may allocate (the decoded buffer and its scratch).
    pub max_alloc_bytes: u64,
    /// Most images one request may carry (each costs the model's image tokens of context
    /// and a vision-tower run).
    pub max_images: usize,
    /// Most tokens one image may become (any-resolution models tile a large image into many:
    /// LLaVA-OneVision up to ~7,400 tokens, LLaVA-NeXT ~2,900), checked on the header.
    pub max_image_tokens: usize,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl ImageLimits {
    /// 20 MB, 16 megapixels (4096 x 4096), 8192 pixels a side, 256 MiB of decoding memory,
    /// 8 images a request, 8192 tokens an image (the services' flag defaults too).
    pub const DEFAULT: ImageLimits = ImageLimits {
        max_bytes: 20 * 1024 * 1024,
        max_pixels: 16 * 1024 * 1024,
        max_side: 8192,
        max_alloc_bytes: 256 * 1024 * 1024,
        max_images: 8,
        max_image_tokens: 8192,
    };

    /// Refuses a request of `n` images over [`ImageLimits::max_images`].
    pub fn check_count(&self, n: usize) -> Result<(), PromptError> {
        if n > self.max_images {
            return Err(PromptError::InvalidInput(format!(
                "{n} images exceed the limit of {} a request",
                self.max_images
            )));
        }
        Ok(())
    }

    /// Refuses image `index` when it becomes `tokens` tokens, over
    /// [`ImageLimits::max_image_tokens`].
    pub fn check_image_tokens(&self, index: usize, tokens: usize) -> Result<(), PromptError> {
        if tokens > self.max_image_tokens {
            return Err(PromptError::ImageTooLarge(format!(
                "image {index} becomes {tokens} tokens, over the limit of {} an image (a smaller \
                 image takes fewer tiles)",
                self.max_image_tokens
            )));
        }
        Ok(())
    }

    /// The `image` crate's decoder limits for these.
    fn decoder_limits(&self) -> image::Limits {
        let mut lim = image::Limits::default();
        lim.max_image_width = Some(self.max_side);
        lim.max_image_height = Some(self.max_side);
        lim.max_alloc = Some(self.max_alloc_bytes);
        lim
    }
}

/// Decodes image bytes under `limits` (see the model crate's `ImageProcessor::decode`): one pass over the
/// bytes, the header checked against the limits before the pixels are decoded.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage> {
    let decoder = checked_decoder(bytes, limits)?;
    DynamicImage::from_decoder(decoder).map_err(|e| match e {
        image::ImageError::Limits(e) => PromptError::ImageTooLarge(format!(
            "decoding needs more than the limit of {} bytes: {e}",
            limits.max_alloc_bytes
        )),
        e => PromptError::InvalidImage(format!("cannot decode image: {e}")),
    })
}

/// Reads only the header of image bytes and checks it against `limits` (format, size,
/// dimensions, decoded size); returns `(width, height)`. Cheap: no pixel is decoded.
pub fn check_image_header(bytes: &[u8], limits: &ImageLimits) -> Result<(u32, u32)> {
    checked_decoder(bytes, limits).map(|d| d.dimensions())
}

/// A decoder over `bytes` whose header passed `limits`, with the limits set on it.
fn checked_decoder<'a>(bytes: &'a [u8], limits: &ImageLimits) -> Result<impl ImageDecoder + 'a> {
    if bytes.len() > limits.max_bytes {
        return Err(PromptError::ImageTooLarge(format!(
            "{} bytes exceeds the limit of {} bytes",
            bytes.len(),
            limits.max_bytes
        )));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| PromptError::InvalidImage(e.to_string()))?;
    if reader.format().is_none() {
        return Err(PromptError::InvalidImage(
            "unrecognised image format (expected PNG, JPEG or WebP)".into(),
        ));
    }
    reader.limits(limits.decoder_limits());
    let decoder = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(e) => PromptError::ImageTooLarge(format!(
            "the image exceeds the limits ({} pixels a side, {} bytes to decode): {e}",
            limits.max_side, limits.max_alloc_bytes
        )),
        e => PromptError::InvalidImage(format!("cannot read image header: {e}")),
    })?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if w > limits.max_side || h > limits.max_side {
        return Err(PromptError::ImageTooLarge(format!(
            "{w}x{h} exceeds the limit of {} pixels a side",
            limits.max_side
        )));
    }
    if pixels > limits.max_pixels {
        return Err(PromptError::ImageTooLarge(format!(
            "{w}x{h} = {pixels} pixels exceeds the limit of {} pixels",
            limits.max_pixels
        )));
    }
    if pixels == 0 {
        return Err(PromptError::InvalidImage(
            "image has zero width or height".into(),
        ));
    }
    if decoder.total_bytes() > limits.max_alloc_bytes {
        return Err(PromptError::ImageTooLarge(format!(
            "{w}x{h} decodes to {} bytes, over the limit of {} bytes",
            decoder.total_bytes(),
            limits.max_alloc_bytes
        )));
    }
    Ok(decoder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_headers_are_refused_before_decoding() {
        use specllava_harness::png::png_header_only;

        let lim = ImageLimits::default();
        // Well-formed headers: the dimensions are read, and nothing else is needed.
        assert_eq!(
            check_image_header(&png_header_only(640, 480), &lim).unwrap(),
            (640, 480)
        );
        for (w, h, what) in [
            (100_000, 10, "a side"),
            (6300, 6300, "pixels"),
            (60_000, 60_000, "a side"),
        ] {
            let bytes = png_header_only(w, h);
            for e in [
                check_image_header(&bytes, &lim).unwrap_err(),
                decode_image(&bytes, &lim).unwrap_err(),
            ] {
                assert!(
                    matches!(e, PromptError::ImageTooLarge(_)) && e.to_string().contains(what),
                    "{w}x{h}: {e}"
                );
            }
        }
        // The decoded size counts too (3 bytes a pixel here).
        let tight = ImageLimits {
            max_alloc_bytes: 1000,
            ..lim
        };
        let e = check_image_header(&png_header_only(100, 100), &tight).unwrap_err();
        assert!(matches!(e, PromptError::ImageTooLarge(_)), "{e}");
    }
}
