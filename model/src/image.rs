//! Image decoding under size limits and `CLIPImageProcessor` / `LlavaNextImageProcessor` /
//! `LlavaOnevisionImageProcessor` preprocessing.
//!
//! [`ImageProcessor`] reads `preprocessor_config.json` and applies exactly the steps it names,
//! in transformers' order (the PIL backend, `image_processing_backends.PilBackend`): convert
//! to RGB, resize (shortest edge, `int(size * long / short)` for the long edge, Pillow's
//! resampling via [`crate::resample`]), center crop (zero padding when the image is smaller),
//! rescale (`f32(f64(x) * factor)`), normalize (`(x - mean) / std` in f32).
//!
//! Any-resolution checkpoints first cut the image into tiles ([`Tiling`]), each then
//! preprocessed as above: the whole image squashed to the tile size (the *base* tile), then
//! the image resized to fit the best pinpoint (aspect ratio kept, `get_patch_output_size`),
//! zero-padded to it (centred, on the 8-bit pixels) and cut into tiles row by row. OneVision's
//! images of a several-image prompt are instead padded to a square with the mean colour and
//! make one tile.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde::Deserialize;
use serde_json::Value;
use specllava_prompt::image::{ImageLimits, decode_image};
use specllava_prompt::image_tokens::{AnyRes, fit_within};

use crate::config::read_required;
use crate::error::{ModelError, Result};
use crate::resample::{Filter, Image8, resize};

/// Widest aspect ratio (long / short edge) preprocessing accepts with a shortest-edge
/// resize: the resized long edge is at most this many times the shortest edge.
pub const MAX_ASPECT_RATIO: usize = 64;

/// How the image is resized before cropping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// Shortest edge to this size, aspect ratio kept.
    ShortestEdge(usize),
    /// Exactly this height and width.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// How an image becomes the vision tower's tiles.
#[derive(Debug, Clone, Copy)]
pub enum Tiling<'a> {
    /// One tile: the image preprocessed as is (LLaVA-1.5).
    Single,
    /// The base tile plus the tiles of the best pinpoint (LLaVA-NeXT, OneVision).
    AnyRes(&'a AnyRes),
    /// Padded to a square with the mean colour, one tile (OneVision, several images).
    PadToSquare,
}

/// A resolved image-processor configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// Resize step, if enabled.
    pub resize: Option<ResizeTo>,
    /// Resampling filter.
    pub resample: Filter,
    /// Center-crop size (height, width), if enabled.
    pub crop: Option<(usize, usize)>,
    /// Rescale factor, if enabled.
    pub rescale_factor: Option<f64>,
    /// Normalisation (mean, std) per channel, if enabled.
    pub normalize: Option<([f32; 3], [f32; 3])>,
    /// The image mean as configured (the padding colour of [`Tiling::PadToSquare`], as
    /// `int(mean * 255)`), whether or not normalisation is on.
    pub image_mean: [f32; 3],
    /// `image_grid_pinpoints`, when the file names them (any-resolution processors).
    pub grid_pinpoints: Option<Vec<(usize, usize)>>,
}

#[derive(Deserialize, Default)]
struct RawProcessor {
    image_processor_type: Option<String>,
    do_resize: Option<bool>,
    size: Option<Value>,
    resample: Option<u64>,
    do_center_crop: Option<bool>,
    crop_size: Option<Value>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
    image_grid_pinpoints: Option<Vec<(usize, usize)>>,
}

// transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (Python floats, cast to f32 like numpy does).
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

fn triple(v: &Option<Value>, default: [f64; 3], field: &str) -> Result<[f32; 3]> {
    let bad = || {
        ModelError::Config(format!(
            "preprocessor_config.json: `{field}` must be a number or 3 numbers"
        ))
    };
    match v {
        None | Some(Value::Null) => Ok(default.map(|x| x as f32)),
        Some(Value::Number(n)) => {
            let x = n.as_f64().ok_or_else(bad)? as f32;
            Ok([x; 3])
        }
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x.as_f64().ok_or_else(bad)? as f32;
            }
            Ok(out)
        }
        Some(_) => Err(bad()),
    }
}

fn get_usize(m: &serde_json::Map<String, Value>, k: &str) -> Option<usize> {
    m.get(k).and_then(Value::as_u64).map(|x| x as usize)
}

impl ImageProcessor {
    /// Parses the JSON text of a `preprocessor_config.json` (CLIPImageProcessor defaults for
    /// omitted fields).
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawProcessor = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("preprocessor_config.json: {e}")))?;
        // LlavaOnevisionImageProcessor's class defaults differ from CLIP's: a 384 x 384
        // resize and no center crop.
        let onevision = raw
            .image_processor_type
            .as_deref()
            .is_some_and(|t| t.starts_with("LlavaOnevisionImageProcessor"));
        let bad = |what: &str| {
            ModelError::Config(format!("preprocessor_config.json: unsupported `{what}`"))
        };
        let resize = if raw.do_resize.unwrap_or(true) {
            Some(match &raw.size {
                None | Some(Value::Null) if onevision => ResizeTo::Exact {
                    height: 384,
                    width: 384,
                },
                None | Some(Value::Null) => ResizeTo::ShortestEdge(224),
                // CLIP uses default_to_square=False: an int means the shortest edge.
                Some(Value::Number(n)) => {
                    ResizeTo::ShortestEdge(n.as_u64().ok_or_else(|| bad("size"))? as usize)
                }
                Some(Value::Object(m)) => {
                    if m.get("longest_edge").is_some_and(|v| !v.is_null()) {
                        return Err(bad("size.longest_edge"));
                    }
                    if let Some(s) = get_usize(m, "shortest_edge") {
                        ResizeTo::ShortestEdge(s)
                    } else if let (Some(height), Some(width)) =
                        (get_usize(m, "height"), get_usize(m, "width"))
                    {
                        ResizeTo::Exact { height, width }
                    } else {
                        return Err(bad("size"));
                    }
                }
                Some(_) => return Err(bad("size")),
            })
        } else {
            None
        };
        let resample = match raw.resample {
            None => Filter::Bicubic,
            Some(n) => Filter::from_pil(n).ok_or_else(|| bad("resample"))?,
        };
        let crop = if raw.do_center_crop.unwrap_or(!onevision) {
            Some(match &raw.crop_size {
                None | Some(Value::Null) => (224, 224),
                Some(Value::Number(n)) => {
                    let s = n.as_u64().ok_or_else(|| bad("crop_size"))? as usize;
                    (s, s)
                }
                Some(Value::Object(m)) => match (get_usize(m, "height"), get_usize(m, "width")) {
                    (Some(h), Some(w)) => (h, w),
                    _ => return Err(bad("crop_size")),
                },
                Some(_) => return Err(bad("crop_size")),
            })
        } else {
            None
        };
        let rescale_factor = if raw.do_rescale.unwrap_or(true) {
            Some(raw.rescale_factor.unwrap_or(1.0 / 255.0))
        } else {
            None
        };
        let image_mean = triple(&raw.image_mean, OPENAI_CLIP_MEAN, "image_mean")?;
        let normalize = if raw.do_normalize.unwrap_or(true) {
            Some((
                image_mean,
                triple(&raw.image_std, OPENAI_CLIP_STD, "image_std")?,
            ))
        } else {
            None
        };
        Ok(ImageProcessor {
            resize,
            resample,
            crop,
            rescale_factor,
            normalize,
            image_mean,
            grid_pinpoints: raw.image_grid_pinpoints,
        })
    }

    /// Reads a `preprocessor_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = read_required(path, "the image preprocessor configuration")?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Config(m) => ModelError::bad_file(path, m),
            e => e,
        })
    }

    /// Decodes PNG / JPEG / WebP bytes, rejecting inputs over `limits` before allocating the
    /// pixel buffer.
    pub fn decode(&self, bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage> {
        Ok(decode_image(bytes, limits)?)
    }

    /// Preprocesses an image into a `[3, H, W]` f32 tensor on the CPU.
    pub fn preprocess(&self, img: &DynamicImage) -> Result<Tensor> {
        self.preprocess_on(img, &Device::Cpu)
    }

    /// Preprocesses an image into a `[3, H, W]` f32 tensor on `device`.
    pub fn preprocess_on(&self, img: &DynamicImage, device: &Device) -> Result<Tensor> {
        let im = self.tile_pixels(&image8(img)?)?;
        let (h, w) = (im.height, im.width);
        Ok(Tensor::from_vec(self.normalized(&im), (3, h, w), device)?)
    }

    /// Cuts an image into tiles as `tiling` says and preprocesses each: `[tiles, 3, H, W]`
    /// f32 on `device` (one tile for [`Tiling::Single`] and [`Tiling::PadToSquare`]).
    pub fn preprocess_tiles(
        &self,
        img: &DynamicImage,
        tiling: Tiling<'_>,
        device: &Device,
    ) -> Result<Tensor> {
        let im = image8(img)?;
        let tiles = match tiling {
            Tiling::Single => vec![im],
            Tiling::PadToSquare => {
                // A 1 x 8192 strip passes the pixel limit but would pad to 8192 x 8192.
                let (long, short) = (im.width.max(im.height), im.width.min(im.height));
                if long > MAX_ASPECT_RATIO.saturating_mul(short) {
                    return Err(ModelError::ImageTooLarge(format!(
                        "{}x{}: aspect ratio over {MAX_ASPECT_RATIO}:1",
                        im.width, im.height
                    )));
                }
                let color = self.image_mean.map(|m| (m as f64 * 255.0) as u8);
                vec![pad_to_square(&im, color)]
            }
            Tiling::AnyRes(a) => self.anyres_tiles(&im, a)?,
        };
        let mut out = Vec::with_capacity(tiles.len());
        let mut shape = (0, 0);
        for tile in &tiles {
            let tile = self.tile_pixels(tile)?;
            shape = (tile.height, tile.width);
            out.extend(self.normalized(&tile));
        }
        Ok(Tensor::from_vec(
            out,
            (tiles.len(), 3, shape.0, shape.1),
            device,
        )?)
    }

    /// The square size of the base tile and the grid tiles (`size` height/width, else the
    /// shortest edge).
    fn tile_size(&self) -> Result<usize> {
        match self.resize {
            Some(ResizeTo::Exact { height, width }) if height == width => Ok(height),
            Some(ResizeTo::ShortestEdge(s)) => Ok(s),
            _ => Err(ModelError::Config(
                "preprocessor_config.json: any-resolution tiling needs a square `size`".into(),
            )),
        }
    }

    /// `get_image_patches`: the base tile (the image squashed to the tile size), then the
    /// image resized into the best pinpoint, zero-padded to it (centred) and cut row by row.
    fn anyres_tiles(&self, im: &Image8, a: &AnyRes) -> Result<Vec<Image8>> {
        let side = self.tile_size()?;
        if side != a.tile {
            return Err(ModelError::Config(format!(
                "preprocessor_config.json tiles {side} pixels but the vision tower takes {}",
                a.tile
            )));
        }
        let (bh, bw) = a.best_resolution(im.height, im.width);
        let (nh, nw) = fit_within((im.height, im.width), (bh, bw));
        let fitted = resize(im, nw, nh, self.resample);
        let (top, left) = ((bh - nh) / 2, (bw - nw) / 2);
        let mut tiles = vec![resize(im, side, side, self.resample)];
        for ty in 0..bh / side {
            for tx in 0..bw / side {
                let mut data = vec![0u8; side * side * 3];
                for y in 0..side {
                    // Row y of the tile is row ty * side + y of the padded image.
                    let Some(sy) = (ty * side + y).checked_sub(top).filter(|&r| r < nh) else {
                        continue;
                    };
                    for x in 0..side {
                        let Some(sx) = (tx * side + x).checked_sub(left).filter(|&c| c < nw) else {
                            continue;
                        };
                        let s = (sy * nw + sx) * 3;
                        data[(y * side + x) * 3..][..3].copy_from_slice(&fitted.data[s..s + 3]);
                    }
                }
                tiles.push(Image8 {
                    width: side,
                    height: side,
                    channels: 3,
                    data,
                });
            }
        }
        Ok(tiles)
    }

    /// The resize and crop steps of one tile (or of the whole image, for LLaVA-1.5).
    fn tile_pixels(&self, im: &Image8) -> Result<Image8> {
        let (w, h) = (im.width, im.height);
        let mut im = im.clone();
        if let Some(r) = self.resize {
            let (out_h, out_w) = match r {
                ResizeTo::Exact { height, width } => (height, width),
                ResizeTo::ShortestEdge(s) => {
                    // transformers' get_resize_output_image_size(default_to_square=False).
                    let (short, long) = if w <= h { (w, h) } else { (h, w) };
                    let new_long = (s as f64 * long as f64 / short as f64) as usize;
                    // A 1 x 10^7 strip passes the pixel limit but would resize to
                    // s x (s * 10^7): refuse such aspect ratios before allocating that.
                    if new_long > MAX_ASPECT_RATIO.saturating_mul(s.max(1)) {
                        return Err(ModelError::ImageTooLarge(format!(
                            "{w}x{h}: aspect ratio over {MAX_ASPECT_RATIO}:1"
                        )));
                    }
                    if w <= h { (new_long, s) } else { (s, new_long) }
                }
            };
            im = resize(&im, out_w, out_h, self.resample);
        }
        if let Some((ch, cw)) = self.crop {
            im = center_crop(&im, ch, cw);
        }
        Ok(im)
    }

    /// Rescale and normalise: planar `[3, H, W]` f32 values.
    fn normalized(&self, im: &Image8) -> Vec<f32> {
        let (w, h) = (im.width, im.height);
        let mut out = vec![0f32; 3 * h * w];
        for c in 0..3 {
            let (mean, std) = match self.normalize {
                Some((m, s)) => (Some(m[c]), s[c]),
                None => (None, 1.0),
            };
            for i in 0..h * w {
                let raw = im.data[i * 3 + c];
                let mut x = match self.rescale_factor {
                    Some(f) => (raw as f64 * f) as f32,
                    None => raw as f32,
                };
                if let Some(m) = mean {
                    x = (x - m) / std;
                }
                out[c * h * w + i] = x;
            }
        }
        out
    }
}

/// The decoded image as 8-bit RGB; refuses an empty one.
fn image8(img: &DynamicImage) -> Result<Image8> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(ModelError::InvalidImage(
            "image has zero width or height".into(),
        ));
    }
    Ok(Image8 {
        width: w,
        height: h,
        channels: 3,
        data: rgb8(img),
    })
}

/// `pad_to_square`: the image centred on a square of its longer side filled with `color`.
fn pad_to_square(im: &Image8, color: [u8; 3]) -> Image8 {
    let side = im.width.max(im.height);
    if im.width == im.height {
        return im.clone();
    }
    let mut data: Vec<u8> = std::iter::repeat_n(color, side * side).flatten().collect();
    let (top, left) = ((side - im.height) / 2, (side - im.width) / 2);
    for y in 0..im.height {
        let d = ((top + y) * side + left) * 3;
        data[d..d + im.width * 3].copy_from_slice(&im.data[y * im.width * 3..][..im.width * 3]);
    }
    Image8 {
        width: side,
        height: side,
        channels: 3,
        data,
    }
}

/// The image as interleaved 8-bit RGB: `DynamicImage::to_rgb8`'s samples (gray replicated,
/// alpha dropped), with direct loops for the 8-bit layouts (its generic per-pixel conversion
/// takes over a millisecond for a 512 x 512 grayscale photograph).
fn rgb8(img: &DynamicImage) -> Vec<u8> {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb.as_raw().clone(),
        DynamicImage::ImageLuma8(gray) => gray.as_raw().iter().flat_map(|&l| [l, l, l]).collect(),
        DynamicImage::ImageLumaA8(gray) => gray
            .as_raw()
            .chunks_exact(2)
            .flat_map(|la| [la[0], la[0], la[0]])
            .collect(),
        DynamicImage::ImageRgba8(rgba) => rgba
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        other => other.to_rgb8().into_raw(),
    }
}

/// transformers' `center_crop`: crop around the center, zero-padding when the image is smaller.
///
/// In transformers' padded branch the source lands at offset `ceil((crop - size) / 2)` of the
/// padded frame and the window starts at `floor((size - crop) / 2)` plus that offset, so output
/// row `y` always reads source row `y + floor((size - crop) / 2)` (zero when outside).
fn center_crop(im: &Image8, crop_h: usize, crop_w: usize) -> Image8 {
    let (oh, ow) = (im.height as i64, im.width as i64);
    let top = (oh - crop_h as i64).div_euclid(2);
    let left = (ow - crop_w as i64).div_euclid(2);
    let ch = im.channels;
    let mut data = vec![0u8; crop_h * crop_w * ch];
    for y in 0..crop_h {
        let sy = y as i64 + top;
        if !(0..oh).contains(&sy) {
            continue;
        }
        for x in 0..crop_w {
            let sx = x as i64 + left;
            if !(0..ow).contains(&sx) {
                continue;
            }
            let s = (sy * ow + sx) as usize * ch;
            let d = (y * crop_w + x) * ch;
            data[d..d + ch].copy_from_slice(&im.data[s..s + ch]);
        }
    }
    Image8 {
        width: crop_w,
        height: crop_h,
        channels: ch,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> Image8 {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend_from_slice(&[(x * 10) as u8, (y * 10) as u8, 7]);
            }
        }
        Image8 {
            width: w,
            height: h,
            channels: 3,
            data,
        }
    }

    #[test]
    fn rgb8_equals_the_image_crates_conversion() {
        let (w, h) = (7u32, 5u32);
        let samples = |n: usize| (0..n).map(|i| (i * 37 % 256) as u8).collect::<Vec<u8>>();
        let px = (w * h) as usize;
        let images = [
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, samples(px)).unwrap()),
            DynamicImage::ImageLumaA8(
                image::GrayAlphaImage::from_raw(w, h, samples(2 * px)).unwrap(),
            ),
            DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, samples(3 * px)).unwrap()),
            DynamicImage::ImageRgba8(image::RgbaImage::from_raw(w, h, samples(4 * px)).unwrap()),
        ];
        for img in &images {
            assert_eq!(rgb8(img), img.to_rgb8().into_raw(), "{:?}", img.color());
        }
    }

    #[test]
    fn center_crop_inside_and_padded() {
        let im = gradient(6, 4);
        let c = center_crop(&im, 2, 2);
        // top = 1, left = 2
        assert_eq!(&c.data[0..3], &[20, 10, 7]);
        let p = center_crop(&im, 6, 8);
        assert_eq!((p.width, p.height), (8, 6));
        // padded one row on top, one column on the left
        assert_eq!(&p.data[0..3], &[0, 0, 0]);
        let first = (8 + 1) * 3;
        assert_eq!(&p.data[first..first + 3], &[0, 0, 7]);
    }

    #[test]
    fn defaults_are_clip() {
        let p = ImageProcessor::from_json("{}").unwrap();
        assert_eq!(p.resize, Some(ResizeTo::ShortestEdge(224)));
        assert_eq!(p.crop, Some((224, 224)));
        assert_eq!(p.resample, Filter::Bicubic);
    }
}
