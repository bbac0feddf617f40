//! How many image tokens an image becomes, and the any-resolution geometry behind it.
//!
//! LLaVA-1.5 turns every image into the same number of tokens. LLaVA-NeXT and LLaVA-OneVision
//! tile it (*any resolution*): the image is fitted into the best of the checkpoint's
//! `image_grid_pinpoints`, cut into tiles of the vision tower's size, and each tile's feature
//! grid is joined into one grid, cut back to the image's aspect ratio (*unpadded*), shrunk
//! (OneVision's `anyres_max_N`) and given one `image_newline` token per row; a squashed whole
//! image (the *base* tile) comes first. The count therefore depends on the image's size, and
//! the orchestrator (which runs no model) and the model services compute it the same way, from
//! [`ImageTokens`], before any pixel is decoded.
//!
//! Every formula mirrors `transformers` 5.23: `select_best_resolution`
//! (`image_processing_utils.py`), `get_patch_output_size`, `unpad_image`
//! (`modeling_llava_next.py`), `LlavaNextProcessor._get_number_of_features` and
//! `LlavaOnevisionProcessor._get_unpadded_features`.

use crate::error::{PromptError, Result};

/// The image-token rule of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageTokens {
    /// Every image is this many tokens (LLaVA-1.5).
    Fixed(usize),
    /// Any-resolution tiling (LLaVA-NeXT, LLaVA-OneVision).
    AnyRes(AnyRes),
}

/// Any-resolution tiling parameters, resolved from a checkpoint's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyRes {
    /// Candidate resolutions `(height, width)` in pixels (`image_grid_pinpoints`), each a
    /// multiple of `tile`.
    pub pinpoints: Vec<(usize, usize)>,
    /// The vision tower's input size (a tile is `tile x tile` pixels).
    pub tile: usize,
    /// Feature positions per tile side (`tile / patch_size`).
    pub grid: usize,
    /// Tokens of the base tile (the grid squared, plus CLS where the select strategy keeps it).
    pub base_tokens: usize,
    /// OneVision's `anyres_max_N`: the joined grid is shrunk to about `N` tiles' worth of
    /// positions when it is over 1.1 times that; `None` for LLaVA-NeXT.
    pub max_tiles: Option<usize>,
    /// OneVision: an image of a prompt with several images is not tiled (base tile plus one
    /// newline token); LLaVA-NeXT tiles every image.
    pub tile_single_images_only: bool,
}

/// How one image is laid out under [`AnyRes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnyResLayout {
    /// The chosen pinpoint `(height, width)`.
    pub resolution: (usize, usize),
    /// Tiles per side `(rows, columns)` of the chosen pinpoint.
    pub tiles: (usize, usize),
    /// The joined feature grid after unpadding `(rows, columns)`.
    pub unpadded: (usize, usize),
    /// The grid after OneVision's shrinking `(rows, columns)` (equal to `unpadded` otherwise).
    pub packed: (usize, usize),
}

impl AnyResLayout {
    /// Image tokens: the base tile, then each packed row plus its newline token.
    pub fn tokens(&self, base_tokens: usize) -> usize {
        base_tokens + self.packed.0 * (self.packed.1 + 1)
    }
}

impl ImageTokens {
    /// Tokens of an image of `height x width` pixels in a prompt holding `images_in_prompt`
    /// images.
    pub fn count(&self, height: usize, width: usize, images_in_prompt: usize) -> usize {
        match self {
            ImageTokens::Fixed(n) => *n,
            ImageTokens::AnyRes(a) => a.count(height, width, images_in_prompt),
        }
    }

    /// The most tokens any image can become (its bound for context checks).
    pub fn max_count(&self) -> usize {
        match self {
            ImageTokens::Fixed(n) => *n,
            ImageTokens::AnyRes(a) => a.max_count(),
        }
    }

    /// Whether the count depends on the image's size.
    pub fn varies(&self) -> bool {
        matches!(self, ImageTokens::AnyRes(_))
    }
}

impl AnyRes {
    /// Checks the parameters (non-empty pinpoints, each a positive multiple of the tile).
    pub fn validate(&self) -> Result<()> {
        if self.tile == 0 || self.grid == 0 {
            return Err(PromptError::Config(
                "any-resolution tiling needs a positive tile and grid".into(),
            ));
        }
        if self.pinpoints.is_empty() {
            return Err(PromptError::Config("image_grid_pinpoints is empty".into()));
        }
        if let Some(&(h, w)) = self
            .pinpoints
            .iter()
            .find(|&&(h, w)| h == 0 || w == 0 || h % self.tile != 0 || w % self.tile != 0)
        {
            return Err(PromptError::Config(format!(
                "image_grid_pinpoints entry [{h}, {w}] is not a positive multiple of the vision tower's {} pixels",
                self.tile
            )));
        }
        if self.max_tiles == Some(0) {
            return Err(PromptError::Config("anyres_max_0 allows no tiles".into()));
        }
        Ok(())
    }

    /// Whether an image of a prompt with `images_in_prompt` images is tiled.
    pub fn tiles_image(&self, images_in_prompt: usize) -> bool {
        !(self.tile_single_images_only && images_in_prompt > 1)
    }

    /// Tokens of an image of `height x width` pixels in a prompt of `images_in_prompt` images.
    pub fn count(&self, height: usize, width: usize, images_in_prompt: usize) -> usize {
        if !self.tiles_image(images_in_prompt) {
            return self.base_tokens + 1;
        }
        self.layout(height, width).tokens(self.base_tokens)
    }

    /// The most tokens an image can become: the largest pinpoint with nothing unpadded.
    pub fn max_count(&self) -> usize {
        self.pinpoints
            .iter()
            .map(|&(h, w)| {
                let rows = h / self.tile * self.grid;
                let cols = w / self.tile * self.grid;
                let (rows, cols) = self.shrink(rows, cols);
                self.base_tokens + rows * (cols + 1)
            })
            .max()
            .unwrap_or(self.base_tokens)
            .max(self.base_tokens + 1)
    }

    /// The layout of a tiled image of `height x width` pixels (both positive).
    pub fn layout(&self, height: usize, width: usize) -> AnyResLayout {
        let resolution = self.best_resolution(height, width);
        let tiles = (resolution.0 / self.tile, resolution.1 / self.tile);
        let unpadded = unpadded_grid((tiles.0 * self.grid, tiles.1 * self.grid), (height, width));
        AnyResLayout {
            resolution,
            tiles,
            unpadded,
            packed: self.shrink(unpadded.0, unpadded.1),
        }
    }

    /// `select_best_resolution`: the pinpoint keeping the most of the image's pixels when it is
    /// scaled to fit, ties broken by the least wasted area, the first such pinpoint winning.
    pub fn best_resolution(&self, height: usize, width: usize) -> (usize, usize) {
        let (oh, ow) = (height as f64, width as f64);
        let mut best = self.pinpoints[0];
        let mut max_effective = 0usize;
        let mut min_wasted = usize::MAX;
        for &(h, w) in &self.pinpoints {
            let scale = (w as f64 / ow).min(h as f64 / oh);
            let (dw, dh) = ((ow * scale) as usize, (oh * scale) as usize);
            let effective = (dw * dh).min(width * height);
            let wasted = (w * h).saturating_sub(effective);
            if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
                max_effective = effective;
                min_wasted = wasted;
                best = (h, w);
            }
        }
        best
    }

    /// OneVision's shrinking of a `rows x cols` grid (`anyres_max_N`); unchanged otherwise.
    pub fn shrink(&self, rows: usize, cols: usize) -> (usize, usize) {
        match self.shrink_ratio(rows, cols) {
            Some(ratio) => (
                py_floordiv(rows as f64, ratio) as usize,
                py_floordiv(cols as f64, ratio) as usize,
            ),
            None => (rows, cols),
        }
    }

    /// The factor a `rows x cols` grid is shrunk by, when it is (over 1.1).
    pub fn shrink_ratio(&self, rows: usize, cols: usize) -> Option<f64> {
        let max = self.max_tiles?;
        let ratio = ((rows * cols) as f64 / (max * self.grid * self.grid) as f64).sqrt();
        (ratio > 1.1).then_some(ratio)
    }
}

/// `unpad_image`: the part of a `grid` (rows, columns) of features that covers an image of
/// `image` (height, width) pixels fitted into it and centred, the padding cut off evenly.
pub fn unpadded_grid(grid: (usize, usize), image: (usize, usize)) -> (usize, usize) {
    let (rows, cols) = grid;
    let (oh, ow) = (image.0 as f64, image.1 as f64);
    if ow / oh > cols as f64 / rows as f64 {
        let new_rows = round7(oh * (cols as f64 / ow)) as usize;
        let padding = rows.saturating_sub(new_rows) / 2;
        (rows - 2 * padding, cols)
    } else {
        let new_cols = round7(ow * (rows as f64 / oh)) as usize;
        let padding = cols.saturating_sub(new_cols) / 2;
        (rows, cols - 2 * padding)
    }
}

/// Python's float floor division `a // b` for positive operands (`float_floor_div`: from
/// `fmod`, which can be one below `floor(a / b)` when `a / b` rounds up to an integer).
fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = a % b;
    let d = (a - m) / b;
    let f = d.floor();
    if d - f > 0.5 { f + 1.0 } else { f }
}

/// Python's `round(x, 7)`: the nearest value with 7 decimals (the exact binary value rounded
/// half to even, as Rust's formatting does).
fn round7(x: f64) -> f64 {
    format!("{x:.7}").parse().unwrap_or(x)
}

/// `get_patch_output_size`: the size `(height, width)` an image of `image` pixels is resized
/// to before it is padded to `target`: the side with the smaller scale fills the target, the
/// other is scaled and rounded up (at most the target).
pub fn fit_within(image: (usize, usize), target: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = (image.0 as f64, image.1 as f64);
    let (th, tw) = target;
    let scale_w = tw as f64 / ow;
    let scale_h = th as f64 / oh;
    if scale_w < scale_h {
        (((oh * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((ow * scale_h).ceil() as usize).min(tw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llava-v1.6-mistral-7b-hf: CLIP-L/336, 24x24 features a tile, 576 base tokens.
    fn next_7b() -> AnyRes {
        AnyRes {
            pinpoints: vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)],
            tile: 336,
            grid: 24,
            base_tokens: 576,
            max_tiles: None,
            tile_single_images_only: false,
        }
    }

    #[test]
    fn next_counts_match_the_hf_processor() {
        let a = next_7b();
        // What LlavaNextProcessor._get_number_of_features gives with these parameters.
        assert_eq!(a.count(480, 640, 1), 2340);
        assert_eq!(a.best_resolution(480, 640), (672, 672));
        assert_eq!(a.count(672, 672, 1), 576 + 48 * 49);
        // Portrait: the 336x1008 (h x w) pinpoint is wrong-way; 1008x336 chosen.
        assert_eq!(a.best_resolution(1000, 300), (1008, 336));
    }

    #[test]
    fn onevision_shrinks_large_grids_and_skips_tiling_for_several_images() {
        let a = AnyRes {
            pinpoints: (1..=6)
                .flat_map(|i| (1..=6).map(move |j| (i * 384, j * 384)))
                .collect(),
            tile: 384,
            grid: 27,
            base_tokens: 729,
            max_tiles: Some(9),
            tile_single_images_only: true,
        };
        let l = a.layout(2000, 2000);
        assert_eq!(l.resolution, (2304, 2304));
        assert!(l.packed.0 < l.unpadded.0);
        assert!(l.packed.0 * l.packed.1 <= 9 * 27 * 27 * 11 / 10);
        assert_eq!(a.count(2000, 2000, 2), 730);
        // What LlavaOnevisionProcessor._get_number_of_features gives.
        assert_eq!(a.count(2000, 2000, 1), 7371);
        assert_eq!(a.count(480, 640, 1), 2929);
        assert_eq!(a.count(7, 5, 1), 1269);
        assert!(a.max_count() >= a.count(2000, 2000, 1));
    }

    #[test]
    fn unpadding_and_fitting_follow_the_aspect_ratio() {
        assert_eq!(unpadded_grid((48, 48), (480, 640)), (36, 48));
        assert_eq!(unpadded_grid((48, 48), (640, 480)), (48, 36));
        assert_eq!(fit_within((480, 640), (672, 672)), (504, 672));
        assert_eq!(fit_within((7, 5), (32, 32)), (32, 23));
        assert_eq!(round7(2.99999999), 3.0);
        // With r = sqrt(150 / 54), Python's 10 // r is 5.0 and 15 // r is 8.0, while 10 / r
        // rounds to 6.0 and 15 / r to 9.0.
        let r = (150f64 / 54.0).sqrt();
        assert_eq!((py_floordiv(10.0, r), py_floordiv(15.0, r)), (5.0, 8.0));
    }

    #[test]
    fn bad_pinpoints_are_named() {
        let mut a = next_7b();
        a.pinpoints.push((100, 336));
        assert!(a.validate().unwrap_err().to_string().contains("[100, 336]"));
    }
}
