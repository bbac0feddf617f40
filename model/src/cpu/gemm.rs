//! Few-row matrix products `y = x W^T (+ b)` against a weight packed once at load time.
//!
//! The weight `[out, in]` is cut into panels of [`PANEL`] output columns; each panel is stored
//! `[in][PANEL]` contiguously, in the checkpoint's precision (f32, f16 or bf16, widened to f32
//! in registers). One product streams each panel once for all rows of `x`: the rows of a tile
//! stay in registers, so a 1-64 row product reads the weight about once, which is what tree
//! verification, draft levels and batched decode need.
//!
//! Every output element is one fused multiply-add chain over `k = 0..in` in order, starting at
//! zero, then the bias is added. That order does not depend on the number of rows, the tile
//! shape, the thread split or the instruction set (AVX2 lanes and the portable `mul_add` loop
//! round identically), so a row's result is bit-for-bit the same whether it is computed alone or
//! inside a tree of 64 nodes: speculative verification sees exactly the logits sequential
//! decoding would.

use half::{bf16, f16};

use super::pool::{self, DisjointOut};

/// Output columns per panel (two AVX2 vectors).
pub const PANEL: usize = 16;

/// Largest number of rows one register tile holds (AVX-512, for products of up to that many
/// rows; see [`CpuKernel::tiling`]).
const MAX_TILE_ROWS: usize = 8;

/// Rows per register tile when a product's rows split into several tiles.
const SPLIT_TILE_ROWS: usize = 6;

/// Largest number of panels one register tile holds.
const MAX_TILE_PANELS: usize = 8;

/// A register tile's results, rows x (panels x [`PANEL`]) columns.
type TileAcc = [[f32; PANEL * MAX_TILE_PANELS]; MAX_TILE_ROWS];

/// Multiply-adds below which a product runs on the calling thread alone (a thread hand-off
/// costs more than it saves).
const PARALLEL_MIN_MACS: usize = 1 << 17;

/// Storage precision of a packed weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// 32-bit floats.
    F32,
    /// IEEE half precision (widening to f32 is exact).
    F16,
    /// bfloat16 (widening to f32 is exact).
    Bf16,
}

impl WeightFormat {
    /// Bytes per stored weight.
    pub fn bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 4,
            WeightFormat::F16 | WeightFormat::Bf16 => 2,
        }
    }
}

#[derive(Debug, Clone)]
enum PanelData {
    F32(Vec<f32>),
    F16(Vec<u16>),
    Bf16(Vec<u16>),
}

/// A `[out, in]` weight packed in panels (see the module docs), with an optional bias.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    in_dim: usize,
    out_dim: usize,
    panels: usize,
    data: PanelData,
    bias: Option<Vec<f32>>,
}

impl PackedMatrix {
    /// Packs `weight` (row-major `[out, in]`, PyTorch's layout) stored as `format`. The values
    /// must be representable in `format` (they are when they were widened from it).
    pub fn pack(
        weight: &[f32],
        out_dim: usize,
        in_dim: usize,
        bias: Option<Vec<f32>>,
        format: WeightFormat,
    ) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "weight size");
        if let Some(b) = &bias {
            assert_eq!(b.len(), out_dim, "bias size");
        }
        let panels = out_dim.div_ceil(PANEL);
        let mut packed = vec![0f32; panels * in_dim * PANEL];
        for p in 0..panels {
            for c in 0..PANEL.min(out_dim - p * PANEL) {
                let row = &weight[(p * PANEL + c) * in_dim..][..in_dim];
                for (k, &w) in row.iter().enumerate() {
                    packed[(p * in_dim + k) * PANEL + c] = w;
                }
            }
        }
        let data = match format {
            WeightFormat::F32 => PanelData::F32(packed),
            WeightFormat::F16 => {
                PanelData::F16(packed.iter().map(|&w| f16::from_f32(w).to_bits()).collect())
            }
            WeightFormat::Bf16 => PanelData::Bf16(
                packed
                    .iter()
                    .map(|&w| bf16::from_f32(w).to_bits())
                    .collect(),
            ),
        };
        PackedMatrix {
            in_dim,
            out_dim,
            panels,
            data,
            bias,
        }
    }

    /// Input width.
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Output width.
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Storage precision.
    pub fn format(&self) -> WeightFormat {
        match self.data {
            PanelData::F32(_) => WeightFormat::F32,
            PanelData::F16(_) => WeightFormat::F16,
            PanelData::Bf16(_) => WeightFormat::Bf16,
        }
    }

    /// Bytes of the stored weight (what one product streams).
    pub fn weight_bytes(&self) -> usize {
        self.panels * self.in_dim * PANEL * self.format().bytes()
    }

    /// `y[r] = x[r] W^T + b` for `rows` rows; `x` is `[rows, in]`, `y` is `[rows, out]`.
    /// Splits the panels over the CPU pool when the product is large enough.
    pub fn matmul(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.matmul_with(CpuKernel::detect(), x, rows, y);
    }

    /// [`PackedMatrix::matmul`] with a given instruction set.
    fn matmul_with(&self, kernel: CpuKernel, x: &[f32], rows: usize, y: &mut [f32]) {
        assert_eq!(x.len(), rows * self.in_dim, "input size");
        assert_eq!(y.len(), rows * self.out_dim, "output size");
        if rows == 0 {
            return;
        }
        let macs = rows * self.in_dim * self.out_dim;
        let parts = if macs < PARALLEL_MIN_MACS {
            1
        } else {
            (4 * pool::threads()).min(self.panels)
        };
        if parts <= 1 {
            self.matmul_panels(kernel, x, rows, 0..self.panels, DisjointOut::new(y));
            return;
        }
        let out = DisjointOut::new(y);
        // Whole tiles per part where the panels allow (a part may be left empty).
        let (_, group) = kernel.tiling(rows);
        let per = self.panels.div_ceil(parts);
        let per = if per >= group {
            per.next_multiple_of(group)
        } else {
            per
        };
        pool::parallel_for(parts, &|part| {
            let start = part * per;
            let end = (start + per).min(self.panels);
            if start < end {
                self.matmul_panels(kernel, x, rows, start..end, out);
            }
        });
    }

    /// Computes output panels `panels` of every row (writes only their columns of `y`).
    fn matmul_panels(
        &self,
        kernel: CpuKernel,
        x: &[f32],
        rows: usize,
        panels: std::ops::Range<usize>,
        y: DisjointOut<'_>,
    ) {
        let (tiles, group_max) = kernel.tiling(rows);
        // One accumulator block for all of this call's tiles (each tile writes what it reads).
        let mut acc: TileAcc = [[0f32; PANEL * MAX_TILE_PANELS]; MAX_TILE_ROWS];
        let mut p = panels.start;
        while p < panels.end {
            let group = group_max.min(panels.end - p);
            let mut r0 = 0;
            for t in 0..tiles {
                let tile_rows = (rows - r0).div_ceil(tiles - t);
                self.tile(kernel, x, r0, tile_rows, p, group, y, &mut acc);
                r0 += tile_rows;
            }
            p += group;
        }
    }

    /// One register tile: rows `r0..r0+rows` x panels `p0..p0+group`.
    #[allow(clippy::too_many_arguments)]
    fn tile(
        &self,
        kernel: CpuKernel,
        x: &[f32],
        r0: usize,
        rows: usize,
        p0: usize,
        group: usize,
        y: DisjointOut<'_>,
        acc: &mut TileAcc,
    ) {
        let k = self.in_dim;
        let xs = &x[r0 * k..(r0 + rows) * k];
        let span = k * PANEL;
        // SAFETY (every `unsafe` arm): `kernel` is AVX-512 or AVX2 only when
        // `CpuKernel::available` found the CPU supports that instruction set (and F16C), and the
        // slice from `p0 * span` holds `group` panels of `span` elements (the kernels assert
        // both sizes before reading).
        match (&self.data, kernel) {
            #[cfg(target_arch = "x86_64")]
            (PanelData::F32(w), CpuKernel::Avx512) => unsafe {
                avx512::tile::<avx512::F32>(xs, rows, k, &w[p0 * span..], span, group, acc)
            },
            #[cfg(target_arch = "x86_64")]
            (PanelData::F16(w), CpuKernel::Avx512) => unsafe {
                avx512::tile::<avx512::F16>(xs, rows, k, &w[p0 * span..], span, group, acc)
            },
            #[cfg(target_arch = "x86_64")]
            (PanelData::Bf16(w), CpuKernel::Avx512) => unsafe {
                avx512::tile::<avx512::Bf16>(xs, rows, k, &w[p0 * span..], span, group, acc)
            },
            #[cfg(target_arch = "x86_64")]
            (PanelData::F32(w), CpuKernel::Avx2) => unsafe {
                avx2::tile::<avx2::F32>(xs, rows, k, &w[p0 * span..], span, group, acc)
            },
            #[cfg(target_arch = "x86_64")]
            (PanelData::F16(w), CpuKernel::Avx2) => unsafe {
                avx2::tile::<avx2::F16>(xs, rows, k, &w[p0 * span..], span, group, acc)
            },
            #[cfg(target_arch = "x86_64")]
            (PanelData::Bf16(w), CpuKernel::Avx2) => unsafe {
                avx2::tile::<avx2::Bf16>(xs, rows, k, &w[p0 * span..], span, group, acc)
            },
            (PanelData::F32(w), _) => {
                portable_tile(xs, rows, k, &w[p0 * span..], span, group, acc, |v| v)
            }
            (PanelData::F16(w), _) => {
                portable_tile(xs, rows, k, &w[p0 * span..], span, group, acc, |v| {
                    f16::from_bits(v).to_f32()
                })
            }
            (PanelData::Bf16(w), _) => {
                portable_tile(xs, rows, k, &w[p0 * span..], span, group, acc, |v| {
                    bf16::from_bits(v).to_f32()
                })
            }
        }
        let out = self.out_dim;
        for (r, acc_row) in acc.iter().enumerate().take(rows) {
            let col0 = p0 * PANEL;
            let cols = (group * PANEL).min(out - col0);
            // SAFETY: this tile is the only writer of rows r0.. x these columns (panels are
            // split between threads, rows between tiles).
            let dst = unsafe { y.range((r0 + r) * out + col0, cols) };
            match &self.bias {
                Some(b) => {
                    for ((d, &a), &b) in dst.iter_mut().zip(acc_row).zip(&b[col0..col0 + cols]) {
                        *d = a + b;
                    }
                }
                None => dst.copy_from_slice(&acc_row[..cols]),
            }
        }
    }
}

/// The instruction set a product runs with, chosen once per process: the CPU's best, up to
/// the cap [`cap_kernel`] set (every choice gives the same results).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuKernel {
    /// AVX-512F register tiles (x86-64).
    #[default]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
    /// AVX2 + FMA + F16C register tiles (x86-64).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

impl std::str::FromStr for CpuKernel {
    type Err = String;

    /// `avx512`, `avx2` or `portable`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "avx512" => Ok(CpuKernel::Avx512),
            "avx2" => Ok(CpuKernel::Avx2),
            "portable" => Ok(CpuKernel::Portable),
            _ => Err(format!(
                "unknown CPU kernel {s:?} (expected avx512, avx2 or portable)"
            )),
        }
    }
}

/// The cap [`cap_kernel`] set (a [`CpuKernel::rank`]).
static KERNEL_CAP: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(2);
/// The instruction set in use, chosen at the first product.
static KERNEL: std::sync::OnceLock<CpuKernel> = std::sync::OnceLock::new();

/// Caps the instruction set the products of this process use (for comparisons). Only before
/// the first product: returns false, changing nothing, once one has run.
pub fn cap_kernel(cap: CpuKernel) -> bool {
    if KERNEL.get().is_some() {
        return false;
    }
    KERNEL_CAP.store(cap.rank(), std::sync::atomic::Ordering::SeqCst);
    KERNEL.get().is_none()
}

impl CpuKernel {
    /// The best instruction set this CPU has, up to the cap [`cap_kernel`] set.
    fn detect() -> CpuKernel {
        *KERNEL.get_or_init(|| {
            let cap = KERNEL_CAP.load(std::sync::atomic::Ordering::SeqCst);
            CpuKernel::available()
                .into_iter()
                .find(|k| k.rank() <= cap)
                .unwrap_or(CpuKernel::Portable)
        })
    }

    /// The instruction sets this CPU supports, best first.
    fn available() -> Vec<CpuKernel> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") {
                kernels.push(CpuKernel::Avx512);
            }
            if avx2 {
                kernels.push(CpuKernel::Avx2);
            }
        }
        kernels.push(CpuKernel::Portable);
        kernels
    }

    fn rank(self) -> u8 {
        match self {
            CpuKernel::Portable => 0,
            CpuKernel::Avx2 => 1,
            CpuKernel::Avx512 => 2,
        }
    }

    /// How a product of `rows` rows is tiled: the number of register tiles its rows split
    /// into (of near-equal height, 16 rows as 6 + 5 + 5, not 6 + 6 + 4, so no tile is left
    /// with too few accumulators to hide the FMA latency) and the panels each tile holds
    /// (16 vector registers with AVX2, 32 with AVX-512). Each tile streams every weight
    /// once: the fewer the tiles, the fewer times a weight is loaded and widened.
    fn tiling(self, rows: usize) -> (usize, usize) {
        let tiles = match self {
            // Up to 8 rows in one tile of 2 panels: each weight widened once for all rows.
            CpuKernel::Avx512 if rows <= MAX_TILE_ROWS => 1,
            // More rows (any with AVX2 or portable code) in tiles of up to 6 rows: on AVX-512
            // tiles of 8 rows and 2 panels measured slower than 6 rows and 4 panels from 16
            // rows on (fewer accumulators per broadcast).
            _ => rows.div_ceil(SPLIT_TILE_ROWS).max(1),
        };
        (tiles, self.panels_per_tile(rows.div_ceil(tiles)))
    }

    /// Panels per register tile of `rows` rows: few rows leave registers for several panels
    /// at once, which keeps enough independent accumulators in flight to hide the FMA
    /// latency.
    fn panels_per_tile(self, rows: usize) -> usize {
        match (self, rows) {
            (CpuKernel::Avx512, 1) => 8,
            (CpuKernel::Avx512, 2..=6) => 4,
            (CpuKernel::Avx512, _) => 2,
            (_, 1) => 4,
            (_, 2 | 3) => 2,
            _ => 1,
        }
    }
}

/// Names the instruction set the products of this process use ("avx512f",
/// "avx2+fma+f16c" or "portable").
pub fn kernel_name() -> &'static str {
    match CpuKernel::detect() {
        CpuKernel::Avx512 => "avx512f",
        CpuKernel::Avx2 => "avx2+fma+f16c",
        CpuKernel::Portable => "portable",
    }
}

/// The portable tile: the same per-element `mul_add` chain as the vector kernels.
#[allow(clippy::too_many_arguments)]
fn portable_tile<W: Copy>(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[W],
    span: usize,
    group: usize,
    acc: &mut TileAcc,
    widen: impl Fn(W) -> f32,
) {
    for row in acc.iter_mut().take(rows) {
        row[..group * PANEL].fill(0.0);
    }
    for g in 0..group {
        let panel = &w[g * span..(g + 1) * span];
        for kk in 0..k {
            let wrow = &panel[kk * PANEL..(kk + 1) * PANEL];
            let mut wv = [0f32; PANEL];
            for (d, &s) in wv.iter_mut().zip(wrow) {
                *d = widen(s);
            }
            for r in 0..rows {
                let xv = x[r * k + kk];
                let a = &mut acc[r][g * PANEL..(g + 1) * PANEL];
                for (a, &wv) in a.iter_mut().zip(&wv) {
                    *a = xv.mul_add(wv, *a);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 + FMA (+ F16C) register tiles.

    use std::arch::x86_64::*;

    use super::{PANEL, TileAcc};

    /// Elements ahead of the current k row that the kernel prefetches.
    const PREFETCH_AHEAD: usize = 64 * PANEL;

    /// How 8 stored weights become 8 f32 lanes.
    pub trait Widen {
        type Elem: Copy;
        /// # Safety
        /// `p` must point at 8 readable elements; the CPU must have AVX2 and F16C.
        unsafe fn load8(p: *const Self::Elem) -> __m256;
    }

    pub struct F32;
    pub struct F16;
    pub struct Bf16;

    impl Widen for F32 {
        type Elem = f32;
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable f32s at `p` and AVX2.
            unsafe { _mm256_loadu_ps(p) }
        }
    }

    impl Widen for F16 {
        type Elem = u16;
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable halves (16 bytes) at `p` and F16C.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
    }

    impl Widen for Bf16 {
        type Elem = u16;
        #[inline(always)]
        unsafe fn load8(p: *const u16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable bf16s (16 bytes) at `p` and AVX2.
            unsafe {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
        }
    }

    /// Dispatches to a tile with compile-time rows and panels (registers, not memory).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w` holds `group` panels of `span` elements.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<W: Widen>(
        x: &[f32],
        rows: usize,
        k: usize,
        w: &[W::Elem],
        span: usize,
        group: usize,
        acc: &mut TileAcc,
    ) {
        assert!(x.len() >= rows * k && w.len() >= group * span);
        // SAFETY: the sizes are checked above; the instruction set is the caller's promise.
        unsafe {
            match (rows, group) {
                (1, 1) => tile_rp::<W, 1, 1>(x, k, w, span, acc),
                (1, 2) => tile_rp::<W, 1, 2>(x, k, w, span, acc),
                (1, 3) => tile_rp::<W, 1, 3>(x, k, w, span, acc),
                (1, 4) => tile_rp::<W, 1, 4>(x, k, w, span, acc),
                (2, 1) => tile_rp::<W, 2, 1>(x, k, w, span, acc),
                (2, 2) => tile_rp::<W, 2, 2>(x, k, w, span, acc),
                (3, 1) => tile_rp::<W, 3, 1>(x, k, w, span, acc),
                (3, 2) => tile_rp::<W, 3, 2>(x, k, w, span, acc),
                (4, 1) => tile_rp::<W, 4, 1>(x, k, w, span, acc),
                (5, 1) => tile_rp::<W, 5, 1>(x, k, w, span, acc),
                (6, 1) => tile_rp::<W, 6, 1>(x, k, w, span, acc),
                _ => unreachable!("tile shape {rows}x{group}"),
            }
        }
    }

    // Index loops over the register tile read best as written (and unroll fully).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_rp<W: Widen, const R: usize, const P: usize>(
        x: &[f32],
        k: usize,
        w: &[W::Elem],
        span: usize,
        acc: &mut TileAcc,
    ) {
        let mut a = [[[_mm256_setzero_ps(); 2]; P]; R];
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        for kk in 0..k {
            for p in 0..P {
                // SAFETY: panel p, row kk, 16 elements lie inside `w` (checked by the caller).
                let (w0, w1) = unsafe {
                    let base = wp.add(p * span + kk * PANEL);
                    // Ask for the panel's bytes a few rows of k ahead of their use.
                    _mm_prefetch::<_MM_HINT_T0>(base.add(PREFETCH_AHEAD) as *const i8);
                    (W::load8(base), W::load8(base.add(8)))
                };
                for r in 0..R {
                    // SAFETY: row r, column kk of x is inside `x`.
                    let xv = unsafe { _mm256_broadcast_ss(&*xp.add(r * k + kk)) };
                    a[r][p][0] = _mm256_fmadd_ps(xv, w0, a[r][p][0]);
                    a[r][p][1] = _mm256_fmadd_ps(xv, w1, a[r][p][1]);
                }
            }
        }
        for r in 0..R {
            for p in 0..P {
                // SAFETY: acc rows hold MAX_TILE_PANELS panels of 16 lanes.
                unsafe {
                    _mm256_storeu_ps(acc[r].as_mut_ptr().add(p * PANEL), a[r][p][0]);
                    _mm256_storeu_ps(acc[r].as_mut_ptr().add(p * PANEL + 8), a[r][p][1]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! AVX-512F register tiles: one 16-lane register per panel row, up to 6 rows x 4 panels,
    //! 8 rows x 2 panels or 1 row x 8 panels of accumulators in the 32 vector registers. The
    //! same per-element FMA chain as [`super::avx2`], so both give the same bits.

    use std::arch::x86_64::*;

    use super::{PANEL, TileAcc};

    /// Elements ahead of the current k row that the kernel prefetches.
    const PREFETCH_AHEAD: usize = 64 * PANEL;

    /// How 16 stored weights become 16 f32 lanes.
    pub trait Widen {
        type Elem: Copy;
        /// # Safety
        /// `p` must point at 16 readable elements; the CPU must have AVX-512F.
        unsafe fn load16(p: *const Self::Elem) -> __m512;
    }

    pub struct F32;
    pub struct F16;
    pub struct Bf16;

    impl Widen for F32 {
        type Elem = f32;
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            // SAFETY: the caller guarantees 16 readable f32s at `p` and AVX-512F.
            unsafe { _mm512_loadu_ps(p) }
        }
    }

    impl Widen for F16 {
        type Elem = u16;
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> __m512 {
            // SAFETY: the caller guarantees 16 readable halves (32 bytes) at `p` and AVX-512F.
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
    }

    impl Widen for Bf16 {
        type Elem = u16;
        #[inline(always)]
        unsafe fn load16(p: *const u16) -> __m512 {
            // SAFETY: the caller guarantees 16 readable bf16s (32 bytes) at `p` and AVX-512F.
            unsafe {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
        }
    }

    /// Dispatches to a tile with compile-time rows and panels (registers, not memory).
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `w` holds `group` panels of `span` elements.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<W: Widen>(
        x: &[f32],
        rows: usize,
        k: usize,
        w: &[W::Elem],
        span: usize,
        group: usize,
        acc: &mut TileAcc,
    ) {
        assert!(x.len() >= rows * k && w.len() >= group * span);
        // SAFETY: the sizes are checked above; the instruction set is the caller's promise.
        unsafe {
            match (rows, group) {
                (1, 1) => tile_rp::<W, 1, 1>(x, k, w, span, acc),
                (1, 2) => tile_rp::<W, 1, 2>(x, k, w, span, acc),
                (1, 3) => tile_rp::<W, 1, 3>(x, k, w, span, acc),
                (1, 4) => tile_rp::<W, 1, 4>(x, k, w, span, acc),
                (1, 5) => tile_rp::<W, 1, 5>(x, k, w, span, acc),
                (1, 6) => tile_rp::<W, 1, 6>(x, k, w, span, acc),
                (1, 7) => tile_rp::<W, 1, 7>(x, k, w, span, acc),
                (1, 8) => tile_rp::<W, 1, 8>(x, k, w, span, acc),
                (2, 1) => tile_rp::<W, 2, 1>(x, k, w, span, acc),
                (2, 2) => tile_rp::<W, 2, 2>(x, k, w, span, acc),
                (2, 3) => tile_rp::<W, 2, 3>(x, k, w, span, acc),
                (2, 4) => tile_rp::<W, 2, 4>(x, k, w, span, acc),
                (3, 1) => tile_rp::<W, 3, 1>(x, k, w, span, acc),
                (3, 2) => tile_rp::<W, 3, 2>(x, k, w, span, acc),
                (3, 3) => tile_rp::<W, 3, 3>(x, k, w, span, acc),
                (3, 4) => tile_rp::<W, 3, 4>(x, k, w, span, acc),
                (4, 1) => tile_rp::<W, 4, 1>(x, k, w, span, acc),
                (4, 2) => tile_rp::<W, 4, 2>(x, k, w, span, acc),
                (4, 3) => tile_rp::<W, 4, 3>(x, k, w, span, acc),
                (4, 4) => tile_rp::<W, 4, 4>(x, k, w, span, acc),
                (5, 1) => tile_rp::<W, 5, 1>(x, k, w, span, acc),
                (5, 2) => tile_rp::<W, 5, 2>(x, k, w, span, acc),
                (5, 3) => tile_rp::<W, 5, 3>(x, k, w, span, acc),
                (5, 4) => tile_rp::<W, 5, 4>(x, k, w, span, acc),
                (6, 1) => tile_rp::<W, 6, 1>(x, k, w, span, acc),
                (6, 2) => tile_rp::<W, 6, 2>(x, k, w, span, acc),
                (6, 3) => tile_rp::<W, 6, 3>(x, k, w, span, acc),
                (6, 4) => tile_rp::<W, 6, 4>(x, k, w, span, acc),
                (7, 1) => tile_rp::<W, 7, 1>(x, k, w, span, acc),
                (7, 2) => tile_rp::<W, 7, 2>(x, k, w, span, acc),
                (8, 1) => tile_rp::<W, 8, 1>(x, k, w, span, acc),
                (8, 2) => tile_rp::<W, 8, 2>(x, k, w, span, acc),
                _ => unreachable!("tile shape {rows}x{group}"),
            }
        }
    }

    // Index loops over the register tile read best as written (and unroll fully).
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_rp<W: Widen, const R: usize, const P: usize>(
        x: &[f32],
        k: usize,
        w: &[W::Elem],
        span: usize,
        acc: &mut TileAcc,
    ) {
        let mut a = [[_mm512_setzero_ps(); P]; R];
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        for kk in 0..k {
            for p in 0..P {
                // SAFETY: panel p, row kk, 16 elements lie inside `w` (checked by the caller).
                let wv = unsafe {
                    let base = wp.add(p * span + kk * PANEL);
                    // Ask for the panel's bytes a few rows of k ahead of their use.
                    _mm_prefetch::<_MM_HINT_T0>(base.add(PREFETCH_AHEAD) as *const i8);
                    W::load16(base)
                };
                for r in 0..R {
                    // SAFETY: row r, column kk of x is inside `x`.
                    let xv = unsafe { _mm512_set1_ps(*xp.add(r * k + kk)) };
                    a[r][p] = _mm512_fmadd_ps(xv, wv, a[r][p]);
                }
            }
        }
        for r in 0..R {
            for p in 0..P {
                // SAFETY: acc rows hold MAX_TILE_PANELS panels of 16 lanes.
                unsafe { _mm512_storeu_ps(acc[r].as_mut_ptr().add(p * PANEL), a[r][p]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| lcg(&mut s)).collect()
    }

    /// The reference: each element a `mul_add` chain over k from zero, plus bias.
    fn reference(
        x: &[f32],
        rows: usize,
        w: &[f32],
        out: usize,
        inp: usize,
        b: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let mut acc = 0f32;
                for k in 0..inp {
                    acc = x[r * inp + k].mul_add(w[o * inp + k], acc);
                }
                y[r * out + o] = acc + b.map_or(0.0, |b| b[o]);
            }
        }
        y
    }

    #[test]
    fn every_shape_and_format_equals_the_fma_chain_exactly() {
        for &(out, inp) in &[(1, 1), (5, 3), (16, 7), (37, 19), (100, 64), (300, 130)] {
            for format in [WeightFormat::F32, WeightFormat::F16, WeightFormat::Bf16] {
                let mut w = data(out * inp, 7 + out as u64);
                // Make the weights representable in the format, as checkpoint weights are.
                for v in &mut w {
                    *v = match format {
                        WeightFormat::F32 => *v,
                        WeightFormat::F16 => f16::from_f32(*v).to_f32(),
                        WeightFormat::Bf16 => bf16::from_f32(*v).to_f32(),
                    };
                }
                let b = data(out, 99);
                let m = PackedMatrix::pack(&w, out, inp, Some(b.clone()), format);
                for rows in [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 64] {
                    let x = data(rows * inp, rows as u64);
                    let want = reference(&x, rows, &w, out, inp, Some(&b));
                    for kernel in CpuKernel::available() {
                        let mut y = vec![f32::NAN; rows * out];
                        m.matmul_with(kernel, &x, rows, &mut y);
                        assert_eq!(
                            y, want,
                            "out {out} in {inp} rows {rows} {format:?} {kernel:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_alone_equals_the_same_row_in_a_batch() {
        let (out, inp) = (200, 96);
        let w = data(out * inp, 3);
        let m = PackedMatrix::pack(&w, out, inp, None, WeightFormat::F32);
        let rows = 11;
        let x = data(rows * inp, 5);
        let mut all = vec![0f32; rows * out];
        m.matmul(&x, rows, &mut all);
        for r in 0..rows {
            let mut one = vec![0f32; out];
            m.matmul(&x[r * inp..(r + 1) * inp], 1, &mut one);
            assert_eq!(one, all[r * out..(r + 1) * out]);
        }
    }

    #[test]
    fn large_products_split_over_threads_give_the_same_result() {
        let (out, inp) = (1000, 512);
        let w = data(out * inp, 11);
        let m = PackedMatrix::pack(&w, out, inp, None, WeightFormat::F32);
        for rows in [1, 5, 16] {
            let x = data(rows * inp, 12);
            let want = reference(&x, rows, &w, out, inp, None);
            for kernel in CpuKernel::available() {
                let mut y = vec![0f32; rows * out];
                m.matmul_with(kernel, &x, rows, &mut y);
                assert_eq!(y, want, "rows {rows} {kernel:?}");
            }
        }
    }
}
