//! Tree attention over a session's host KV rows, read in place.
//!
//! For each new row and query head: scores against exactly the rows the row sees (see
//! [`Visibility`]), in ascending row order, softmax, then the weighted sum of value rows. The
//! query heads that share a KV head (grouped-query attention) read the same rows. Hidden rows
//! are skipped, not masked, so a tree node's result is bit-for-bit that of sequential decoding
//! of its path.

use super::ops::{axpy_inline, dot_inline, exp_inline, multiversion};
use super::pool::{self, DisjointOut};
use crate::kv::HostLayerKv;
use crate::segment::Visibility;

/// Attention shape of one layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Multiply-adds below which a layer's attention runs on the calling thread alone.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// One session's part of a layer's attention: its new rows and the KV rows they read.
pub(crate) struct SegmentAttention<'a> {
    /// The session's rows of this layer, `[rows, kv_heads * head_dim]` (new rows included).
    pub kv: &'a HostLayerKv,
    /// Which rows each new row sees.
    pub visible: &'a Visibility,
    /// New rows.
    pub n: usize,
    /// The segment's first row in the layer's `q` and `out`.
    pub start: usize,
}

/// Attention of every segment's new rows. Row `i`'s query heads are
/// `q[i * q_stride..][..heads * head_dim]` (rope applied); writes `out`
/// `[rows, heads * head_dim]`. A job is one new row's query heads that share a KV head (they
/// read the same key rows), or one head when that leaves too few jobs for the pool (a row or
/// two under grouped-query attention); the jobs of all segments are shared out over the CPU
/// pool together, so sessions of one row each still keep the cores busy. Each head's result
/// is the same whichever job computes it.
pub(crate) fn attend(
    shape: Heads,
    q: &[f32],
    q_stride: usize,
    segments: &[SegmentAttention<'_>],
    out: &mut [f32],
) {
    let Heads {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let width = heads * head_dim;
    let rows: usize = segments.iter().map(|s| s.n).sum();
    // Query heads per job: a KV head's group, or one head when groups are too few jobs.
    let job_heads = if rows * kv_heads >= 4 * pool::threads() {
        heads / kv_heads
    } else {
        1
    };
    let row_jobs = heads / job_heads;
    // The first job of each segment, and the total.
    let mut first_job = Vec::with_capacity(segments.len() + 1);
    let mut jobs = 0;
    let mut visible_rows = 0;
    for seg in segments {
        first_job.push(jobs);
        jobs += seg.n * row_jobs;
        visible_rows += (0..seg.n).map(|i| seg.visible.count(i)).sum::<usize>();
    }
    first_job.push(jobs);
    let macs = visible_rows * width * 2;
    let parts = if macs < PARALLEL_MIN_MACS {
        1
    } else {
        (4 * pool::threads()).min(jobs)
    };
    let per = jobs.div_ceil(parts.max(1));
    let out_ptr = DisjointOut::new(out);
    let run = |part: usize| {
        let mut scores = Vec::new();
        let (lo, hi) = (part * per, ((part + 1) * per).min(jobs));
        let mut si = first_job.partition_point(|&f| f <= lo).saturating_sub(1);
        for job in lo..hi {
            while job >= first_job[si + 1] {
                si += 1;
            }
            let seg = &segments[si];
            let local = job - first_job[si];
            let (i, j) = (local / row_jobs, local % row_jobs);
            let row = seg.start + i;
            let first_head = j * job_heads;
            let g = first_head / (heads / kv_heads);
            let qg = &q[row * q_stride + first_head * head_dim..][..job_heads * head_dim];
            // SAFETY: each (row, heads) slice of `out` is written by exactly one job.
            let og =
                unsafe { out_ptr.range(row * width + first_head * head_dim, job_heads * head_dim) };
            one_group(
                qg,
                &seg.kv.k,
                &seg.kv.v,
                kv_heads,
                head_dim,
                g,
                seg.visible,
                i,
                &mut scores,
                og,
            );
        }
    };
    if parts <= 1 {
        run(0);
    } else {
        pool::parallel_for(parts, &run);
    }
}

multiversion! {
    /// Query heads of one row that all read KV head `g` (`q` and `out` hold them one after the
    /// other). Each key row is read once for all of them; every head's scores, softmax and
    /// weighted sum are computed exactly as for that head alone.
    #[allow(clippy::too_many_arguments)]
    fn one_group(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        kv_heads: usize,
        head_dim: usize,
        g: usize,
        visible: &Visibility,
        row: usize,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let stride = kv_heads * head_dim;
        let offset = g * head_dim;
        let group = q.len() / head_dim;
        let scale = (head_dim as f32).powf(-0.5);
        let (prefix, extra) = visible.row(row);
        let n = prefix.len() + extra.len();
        // Head h's scores are scores[h * n..][..n], in visible-row order.
        scores.clear();
        scores.resize(group * n, 0.0);
        // Plain loops, not closures: closures are not compiled with `fast`'s target features.
        for (slot, j) in prefix.clone().chain(extra.iter().copied()).enumerate() {
            let key = &keys[j * stride + offset..][..head_dim];
            for h in 0..group {
                scores[h * n + slot] = dot_inline(&q[h * head_dim..][..head_dim], key) * scale;
            }
        }
        let rows = Visible { prefix, extra, stride, offset };
        for h in 0..group {
            let s = &mut scores[h * n..][..n];
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for x in s.iter_mut() {
                *x -= max;
            }
            exp_inline(s);
            let sum: f32 = s.iter().sum();
            // The softmax weights, divided all at once (the same bits as one at a time).
            for x in s.iter_mut() {
                *x /= sum;
            }
            let oh = &mut out[h * head_dim..][..head_dim];
            match head_dim {
                32 => weighted_sum::<32>(s, values, rows.clone(), oh),
                48 => weighted_sum::<48>(s, values, rows.clone(), oh),
                64 => weighted_sum::<64>(s, values, rows.clone(), oh),
                _ => {
                    oh.fill(0.0);
                    for (j, &w) in rows.iter().zip(s.iter()) {
                        axpy_inline(w, &values[j * stride + offset..][..head_dim], oh);
                    }
                }
            }
        }
    }
}

/// The value rows one query head reads: the `prefix` rows, then `extra`, `stride` apart, the
/// head's columns starting at `offset`.
#[derive(Clone)]
struct Visible<'a> {
    prefix: std::ops::Range<usize>,
    extra: &'a [usize],
    stride: usize,
    offset: usize,
}

impl Visible<'_> {
    /// The visible row indices in order.
    #[inline(always)]
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.prefix.clone().chain(self.extra.iter().copied())
    }
}

/// `out = sum_j weights[j] * values[row j]`, accumulated in registers (a head of `D`
/// columns), each column one multiply-add chain over the rows in order: the same bits as
/// [`axpy_inline`] into a zeroed `out`.
#[inline(always)]
fn weighted_sum<const D: usize>(
    weights: &[f32],
    values: &[f32],
    rows: Visible<'_>,
    out: &mut [f32],
) {
    let mut acc = [0f32; D];
    // Row j's weight and index, prefix rows first.
    let (head, tail) = weights.split_at(rows.prefix.len());
    let indexed = rows
        .prefix
        .clone()
        .zip(head)
        .chain(rows.extra.iter().copied().zip(tail));
    for (j, &w) in indexed {
        let v: &[f32; D] = values[j * rows.stride + rows.offset..][..D]
            .try_into()
            .expect("a head's columns");
        for d in 0..D {
            acc[d] = w.mul_add(v[d], acc[d]);
        }
    }
    out.copy_from_slice(&acc);
}
