//! Which kernels run a model: configuration the services' flags set (`--backend`,
//! `--cpu-kernel`, `--cpu-threads`, each also an environment variable); this crate reads no
//! environment of its own.

use std::str::FromStr;

use candle_core::Device;

pub use crate::cpu::gemm::CpuKernel;

/// Which kernels run the decoder (see [`crate::cpu`] for what runs where).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The CPU backend: packed weights in the checkpoint's precision, fused kernels, host KV.
    Cpu,
    /// candle's kernels on any device (the GPU path; on the CPU, for comparison).
    Candle,
}

impl Backend {
    /// The backend a model on `device` uses unless told otherwise: [`Backend::Cpu`] on the
    /// CPU, [`Backend::Candle`] elsewhere.
    pub fn for_device(device: &Device) -> Backend {
        if device.is_cpu() {
            Backend::Cpu
        } else {
            Backend::Candle
        }
    }
}

impl FromStr for Backend {
    type Err = String;

    /// `cpu` or `candle`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Backend::Cpu),
            "candle" => Ok(Backend::Candle),
            _ => Err(format!("unknown backend {s:?} (expected cpu or candle)")),
        }
    }
}

/// Settings of the CPU backend for the whole process (its worker pool and instruction set
/// are chosen once, at the first product).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuSettings {
    /// Threads of the products; 0: every core available to the process (cgroup limits
    /// included).
    pub threads: usize,
    /// The best instruction set the products may use (they use the CPU's best up to it; every
    /// choice gives the same results).
    pub kernel_cap: CpuKernel,
}

impl CpuSettings {
    /// Applies these settings to the process. Only before the first product: returns false,
    /// changing nothing, once the CPU backend has started.
    pub fn apply(&self) -> bool {
        crate::cpu::pool::set_threads(self.threads) && crate::cpu::gemm::cap_kernel(self.kernel_cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_parse_and_unknown_ones_are_refused() {
        assert_eq!("cpu".parse(), Ok(Backend::Cpu));
        assert_eq!("candle".parse(), Ok(Backend::Candle));
        assert!("cuda".parse::<Backend>().is_err());
        assert_eq!("avx2".parse(), Ok(CpuKernel::Avx2));
        assert_eq!("portable".parse(), Ok(CpuKernel::Portable));
        assert_eq!(CpuKernel::default(), "avx512".parse().unwrap());
        assert!("sse".parse::<CpuKernel>().is_err());
        assert_eq!(Backend::for_device(&Device::Cpu), Backend::Cpu);
    }
}
