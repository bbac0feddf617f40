//! One session's share of a decoder call: its new rows' positions and which cache rows each new
//! row attends to. Built once per forward (by prefill or the tree planner) and read by every
//! layer of either backend.

use candle_core::{DType, Device, Tensor};

/// Which KV rows each new row of a segment sees: the rows `first[i]..prefix[i]`, plus the
/// listed `extra` rows (ascending, all at or above `prefix[i]`). Causal prefill rows see a
/// prefix only; a tree node sees the committed prefix plus its ancestors and itself. `first`
/// is 0 but under sliding-window attention, where a row at position `p` sees only positions
/// above `p - window` (prefix rows sit at their own position).
///
/// Keys are always visited in ascending row order, so a tree node attends to exactly the
/// sequence of rows that sequential decoding of its path would.
#[derive(Debug, Clone, Default)]
pub(crate) struct Visibility {
    first: Vec<usize>,
    prefix: Vec<usize>,
    starts: Vec<usize>,
    extra: Vec<usize>,
}

impl Visibility {
    /// Causal rows: new row `i` sees rows `[0, first_row + i]`, or the last `window` of them.
    pub fn causal(first_row: usize, n: usize, window: Option<usize>) -> Self {
        Visibility {
            first: (0..n)
                .map(|i| window_start(first_row + i, window))
                .collect(),
            prefix: (0..n).map(|i| first_row + i + 1).collect(),
            starts: vec![0; n + 1],
            extra: Vec::new(),
        }
    }

    /// Bidirectional rows: each of `n` new rows sees rows `[0, len)`.
    pub fn full(len: usize, n: usize) -> Self {
        Visibility {
            first: vec![0; n],
            prefix: vec![len; n],
            starts: vec![0; n + 1],
            extra: Vec::new(),
        }
    }

    /// Appends a row that sees `[first, prefix)` plus `extra` (ascending).
    pub fn push_row(
        &mut self,
        first: usize,
        prefix: usize,
        extra: impl IntoIterator<Item = usize>,
    ) {
        if self.starts.is_empty() {
            self.starts.push(0);
        }
        self.first.push(first.min(prefix));
        self.prefix.push(prefix);
        self.extra.extend(extra);
        self.starts.push(self.extra.len());
    }

    /// Row `i`: the visible prefix rows and the extra rows.
    pub fn row(&self, i: usize) -> (std::ops::Range<usize>, &[usize]) {
        (
            self.first[i]..self.prefix[i],
            &self.extra[self.starts[i]..self.starts[i + 1]],
        )
    }

    /// Number of rows row `i` sees.
    pub fn count(&self, i: usize) -> usize {
        self.prefix[i] - self.first[i] + self.starts[i + 1] - self.starts[i]
    }

    /// The additive mask `[n, len]` (0 visible, -inf hidden) in `dtype` on `device`, or `None`
    /// when every row sees all `len` rows. Built on the device: what is uploaded is each row's
    /// prefix length and, for rows with extra rows (tree nodes), the small block of columns
    /// past the shortest prefix (a tree's `n x n` ancestor block), not the `n x len` mask.
    pub fn mask_tensor(
        &self,
        len: usize,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Option<Tensor>> {
        let n = self.prefix.len();
        if (0..n).all(|i| self.count(i) == len) {
            return Ok(None);
        }
        let prefix: Vec<u32> = self.prefix.iter().map(|&p| p as u32).collect();
        let prefix = Tensor::from_vec(prefix, (n, 1), device)?;
        let columns = Tensor::arange(0u32, len as u32, device)?.reshape((1, len))?;
        let mut visible = columns.broadcast_lt(&prefix)?;
        if self.first.iter().any(|&f| f > 0) {
            let first: Vec<u32> = self.first.iter().map(|&f| f as u32).collect();
            let first = Tensor::from_vec(first, (n, 1), device)?;
            visible = (visible * columns.broadcast_ge(&first)?)?;
        }
        if !self.extra.is_empty() {
            // Extra rows lie at or past their row's prefix, so past the shortest one.
            let lo = self.prefix.iter().copied().min().unwrap_or(0).min(len);
            let width = len - lo;
            let mut block = vec![0u8; n * width];
            for i in 0..n {
                for &e in self.row(i).1 {
                    block[i * width + e - lo] = 1;
                }
            }
            let mut block = Tensor::from_vec(block, (n, width), device)?;
            if lo > 0 {
                let left = Tensor::zeros((n, lo), DType::U8, device)?;
                block = Tensor::cat(&[&left, &block], 1)?;
            }
            visible = (visible + block)?.ne(0u8)?;
        }
        let shown = Tensor::zeros((n, len), dtype, device)?;
        let hidden = Tensor::full(f32::NEG_INFINITY, (n, len), device)?.to_dtype(dtype)?;
        Ok(Some(visible.where_cond(&shown, &hidden)?))
    }

    /// [`Visibility::mask_tensor`] built on the host (the reference it is tested against).
    #[cfg(test)]
    pub fn dense_mask(&self, len: usize) -> Option<Vec<f32>> {
        let n = self.prefix.len();
        if (0..n).all(|i| self.count(i) == len) {
            return None;
        }
        let mut mask = vec![f32::NEG_INFINITY; n * len];
        for i in 0..n {
            let (prefix, extra) = self.row(i);
            let row = &mut mask[i * len..(i + 1) * len];
            row[prefix].fill(0.0);
            for &e in extra {
                row[e] = 0.0;
            }
        }
        Some(mask)
    }
}

/// The first row a row at position `position` sees under a sliding `window` (0 without one).
pub(crate) fn window_start(position: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| (position + 1).saturating_sub(w))
}

/// One session's share of a decoder call.
pub(crate) struct Segment {
    /// Number of new rows.
    pub n: usize,
    /// Position id of each new row.
    pub positions: Vec<u32>,
    /// The cache rows each new row attends to (its own row included).
    pub visible: Visibility,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_and_tree_rows_give_the_expected_masks() {
        let c = Visibility::causal(2, 2, None);
        assert_eq!(c.count(0), 3);
        let m = c.dense_mask(4).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(m, vec![0.0, 0.0, 0.0, inf, 0.0, 0.0, 0.0, 0.0]);
        let mut t = Visibility::default();
        t.push_row(0, 2, [2]);
        t.push_row(0, 2, [2, 3]);
        t.push_row(0, 2, [4]);
        assert_eq!(t.row(1), (0..2, &[2usize, 3][..]));
        assert_eq!(t.dense_mask(5).unwrap()[10..], [0.0, 0.0, inf, inf, 0.0]);
        let w = Visibility::causal(3, 2, Some(2));
        assert_eq!(w.row(0).0, 2..4);
        assert_eq!(w.count(1), 2);
        assert_eq!(
            w.dense_mask(5).unwrap(),
            vec![inf, inf, 0.0, 0.0, inf, inf, inf, inf, 0.0, 0.0]
        );
        let mut one = Visibility::default();
        one.push_row(0, 3, [3]);
        assert!(one.dense_mask(4).is_none());
    }

    #[test]
    fn the_device_mask_equals_the_host_mask() {
        let mut tree = Visibility::default();
        // Prefix 5; a root, two children of the root, a grandchild of the second child.
        tree.push_row(0, 5, [5]);
        tree.push_row(0, 5, [5, 6]);
        tree.push_row(0, 5, [5, 7]);
        tree.push_row(0, 5, [5, 7, 8]);
        let mut ragged = Visibility::default();
        ragged.push_row(0, 0, [1]);
        ragged.push_row(0, 2, [2, 3]);
        // A sliding window of 3 over a tree: the deep node sees fewer prefix rows.
        let mut windowed = Visibility::default();
        windowed.push_row(3, 5, [5]);
        windowed.push_row(4, 5, [5, 6]);
        let cases = [
            (Visibility::causal(3, 4, None), 7),
            (Visibility::causal(0, 5, None), 5),
            (Visibility::causal(3, 4, Some(2)), 7),
            (windowed, 7),
            (Visibility::full(6, 2), 6),
            (tree, 9),
            (ragged, 4),
        ];
        for (v, len) in &cases {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let device = v.mask_tensor(*len, &Device::Cpu, dtype).unwrap();
                let host = v.dense_mask(*len);
                assert_eq!(device.is_some(), host.is_some(), "{v:?}");
                if let (Some(d), Some(h)) = (device, host) {
                    assert_eq!(d.dtype(), dtype);
                    let d: Vec<f32> = d
                        .to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    assert_eq!(d, h, "{v:?} len {len} {dtype:?}");
                }
            }
        }
    }
}
