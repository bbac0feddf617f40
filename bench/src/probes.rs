//! Machine probes behind the roofline: the peak f32 fused multiply-add rate (independent FMA
//! chains in registers on every core) and the streaming-read bandwidth (wide loads over a
//! buffer far larger than the caches, every core reading its own part).
//!
//! Each probe runs the widest instruction set the CPU has (AVX-512, AVX2 + FMA, or portable
//! code the compiler vectorises as it can): a probe slower than the forwards it bounds would
//! make them read as faster than their roofline.

use std::time::Instant;

/// Independent accumulators of the FMA loop (enough to cover the FMA latency on two ports).
const FMA_CHAINS: usize = 12;

/// Steps of every chain in one timed run.
const FMA_ITERS: usize = 1 << 22;

/// The instruction set a probe runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::FMA_CHAINS;

    #[target_feature(enable = "avx512f")]
    pub fn fma_avx512(iters: usize) -> f32 {
        let mut acc = [_mm512_set1_ps(0.0); FMA_CHAINS];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iters {
            for c in &mut acc {
                *c = _mm512_fmadd_ps(*c, a, b);
            }
        }
        acc.iter().map(|c| _mm512_reduce_add_ps(*c)).sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn fma_avx2(iters: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); FMA_CHAINS];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for c in &mut acc {
                *c = _mm256_fmadd_ps(*c, a, b);
            }
        }
        let mut out = [0f32; 8];
        let mut sum = _mm256_set1_ps(0.0);
        for c in acc {
            sum = _mm256_add_ps(sum, c);
        }
        // SAFETY: `out` holds 8 f32s, the width of one unaligned 256-bit store.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }

    /// Sum of `data` with four 512-bit accumulators (`data.len()` a multiple of 64).
    #[target_feature(enable = "avx512f")]
    pub fn read_avx512(data: &[f32]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 4];
        for block in data.chunks_exact(64) {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: `block` holds 64 f32s; lane group `j` reads 16 of them.
                let v = unsafe { _mm512_loadu_ps(block.as_ptr().add(16 * j)) };
                *a = _mm512_add_ps(*a, v);
            }
        }
        acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum()
    }

    /// Sum of `data` with four 256-bit accumulators (`data.len()` a multiple of 32).
    #[target_feature(enable = "avx2")]
    pub fn read_avx2(data: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        for block in data.chunks_exact(32) {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: `block` holds 32 f32s; lane group `j` reads 8 of them.
                let v = unsafe { _mm256_loadu_ps(block.as_ptr().add(8 * j)) };
                *a = _mm256_add_ps(*a, v);
            }
        }
        let mut out = [0f32; 8];
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        // SAFETY: `out` holds 8 f32s, the width of one unaligned 256-bit store.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }
}

fn fma_portable(iters: usize) -> f32 {
    let mut acc = [[0f32; 8]; FMA_CHAINS];
    for _ in 0..iters {
        for c in &mut acc {
            for x in c.iter_mut() {
                *x = x.mul_add(0.999_999, 1e-7);
            }
        }
    }
    acc.iter().flatten().sum()
}

fn read_portable(data: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for block in data.chunks_exact(16) {
        for (a, x) in acc.iter_mut().zip(block) {
            *a += x;
        }
    }
    acc.iter().sum()
}

/// Runs `work(thread index)` on every available thread at once, `reps` times, and returns the
/// best wall time in seconds.
fn best_parallel(reps: usize, work: impl Fn(usize) -> f32 + Sync) -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    let work = &work;
                    s.spawn(move || work(i))
                })
                .collect();
            for h in handles {
                std::hint::black_box(h.join().expect("probe thread"));
            }
        });
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

/// Peak FLOP/s of independent f32 FMAs in registers on every available thread (best of 3).
pub fn fma_peak_rate() -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let isa = isa();
    let (iters, lanes) = match isa {
        Isa::Avx512 => (FMA_ITERS, 16),
        Isa::Avx2 => (FMA_ITERS, 8),
        Isa::Portable => (FMA_ITERS / 16, 8),
    };
    let seconds = best_parallel(3, |_| match isa {
        // SAFETY: the CPU has the instruction set (`isa` checked it).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::fma_avx512(iters) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::fma_avx2(iters) },
        _ => fma_portable(iters),
    });
    (threads * iters * FMA_CHAINS * lanes * 2) as f64 / seconds
}

/// Bytes per second of reading a `bytes`-byte buffer split over every available thread
/// (best of 4 after one untimed pass).
pub fn stream_read_bandwidth(bytes: usize) -> f64 {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = (bytes / 4 / threads / 64 * 64).max(64);
    let data: Vec<f32> = (0..per_thread * threads).map(|i| (i % 7) as f32).collect();
    let isa = isa();
    let read = |i: usize| -> f32 {
        let part = &data[i * per_thread..(i + 1) * per_thread];
        match isa {
            // SAFETY: the CPU has the instruction set (`isa` checked it).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::read_avx512(part) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::read_avx2(part) },
            _ => read_portable(part),
        }
    };
    best_parallel(1, read);
    let seconds = best_parallel(4, read);
    (per_thread * threads * 4) as f64 / seconds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_measure_positive_finite_rates() {
        let f = fma_peak_rate();
        assert!(f.is_finite() && f > 1e8, "{f}");
        let b = stream_read_bandwidth(8 << 20);
        assert!(b.is_finite() && b > 1e8, "{b}");
    }
}
