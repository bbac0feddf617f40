//! Packing an any-resolution image's projected tile features into its token rows
//! (`pack_image_features` of transformers' `modeling_llava_next.py` and
//! `modeling_llava_onevision.py`).
//!
//! The tiles after the base one are joined into one feature grid (tile rows, then rows within
//! a tile), the grid is cut back to the image's aspect ratio (*unpadded*), OneVision shrinks
//! it bilinearly when it is over `anyres_max_N` tiles' worth, every grid row gets the
//! `image_newline` vector appended, and the base tile's rows come first. An image that was not
//! tiled (one tile) is its tile's rows plus one newline row. The geometry is
//! [`specllava_prompt::image_tokens`], the same the token counts come from.

use candle_core::{D, Tensor};
use specllava_prompt::image_tokens::AnyRes;

use crate::error::{ModelError, Result};

/// Packs one image's projected features `[tiles, grid * grid, hidden]` into its token rows
/// `[n, hidden]`, `n` being what [`AnyRes::count`] gives for the image.
pub(crate) fn pack(
    tiles: &Tensor,
    image_size: (usize, usize),
    anyres: &AnyRes,
    newline: &Tensor,
) -> Result<Tensor> {
    let (n_tiles, positions, hidden) = tiles.dims3()?;
    let base = tiles.get(0)?;
    if n_tiles == 1 {
        return Ok(Tensor::cat(&[&base, &newline.reshape((1, hidden))?], 0)?);
    }
    let g = anyres.grid;
    if positions != g * g {
        return Err(ModelError::InvalidInput(format!(
            "a tile has {positions} feature rows, expected the {g}x{g} grid"
        )));
    }
    let (height, width) = image_size;
    let layout = anyres.layout(height, width);
    let (tr, tc) = layout.tiles;
    if n_tiles - 1 != tr * tc {
        return Err(ModelError::InvalidInput(format!(
            "a {height}x{width} image takes {tr}x{tc} tiles plus the base one, got {n_tiles}"
        )));
    }
    // [tr, tc, g, g, hidden] -> [hidden, tr, g, tc, g] -> [hidden, tr * g, tc * g]
    let grid = tiles
        .narrow(0, 1, n_tiles - 1)?
        .reshape((tr, tc, g, g, hidden))?
        .permute((4, 0, 2, 1, 3))?
        .contiguous()?
        .reshape((hidden, tr * g, tc * g))?;
    // Unpadding keeps a centred block: the padding is cut evenly from both ends.
    let (rows, cols) = layout.unpadded;
    let grid = grid
        .narrow(1, (tr * g - rows) / 2, rows)?
        .narrow(2, (tc * g - cols) / 2, cols)?;
    let (rows, cols) = layout.packed;
    let grid = if layout.packed == layout.unpadded {
        grid
    } else {
        grid.unsqueeze(0)?
            .upsample_bilinear2d(rows, cols, false)?
            .squeeze(0)?
    };
    let newline = newline
        .reshape((hidden, 1, 1))?
        .broadcast_as((hidden, rows, 1))?;
    let packed = Tensor::cat(&[&grid, &newline], D::Minus1)? // [hidden, rows, cols + 1]
        .reshape((hidden, rows * (cols + 1)))?
        .t()?;
    Ok(Tensor::cat(&[&base, &packed], 0)?)
}
