//! Device selection from a flag value.

use anyhow::Context;

/// The message when a CUDA device is asked of a binary built without the `cuda` feature.
pub const NO_CUDA_SUPPORT: &str =
    "this binary was built without CUDA support; rebuild with --features cuda";

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device. Asking for CUDA fails with a clear
/// message when the binary was built without the `cuda` feature ([`NO_CUDA_SUPPORT`]) or when
/// the device cannot be opened (no driver, no such GPU).
pub fn parse_device(s: &str) -> anyhow::Result<candle_core::Device> {
    let ordinal: usize = match s {
        "cpu" => return Ok(candle_core::Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:") {
            Some(n) => n
                .parse()
                .with_context(|| format!("bad CUDA ordinal in device {other:?}"))?,
            None => anyhow::bail!("unknown device {other:?} (expected cpu, cuda or cuda:N)"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!("device {s:?}: {NO_CUDA_SUPPORT}");
    }
    candle_core::Device::new_cuda(ordinal).with_context(|| {
        format!(
            "device {s:?}: cannot open CUDA device {ordinal} (is the NVIDIA driver installed and \
             the GPU visible? see nvidia-smi and CUDA_VISIBLE_DEVICES)"
        )
    })
}

/// Parses a `--dtype`: `auto` (`None`: f32 on the CPU, the checkpoint's dtype on a GPU),
/// `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> anyhow::Result<Option<candle_core::DType>> {
    use candle_core::DType;
    Ok(match s {
        "auto" => None,
        "f32" | "float32" => Some(DType::F32),
        "f16" | "float16" => Some(DType::F16),
        "bf16" | "bfloat16" => Some(DType::BF16),
        other => anyhow::bail!("unknown dtype {other:?} (expected auto, f32, f16 or bf16)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_bad_names() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("gpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        assert_eq!(parse_dtype("auto").unwrap(), None);
        assert_eq!(parse_dtype("bf16").unwrap(), Some(candle_core::DType::BF16));
        assert!(parse_dtype("f8").is_err());
    }

    #[test]
    fn cuda_without_the_feature_says_so() {
        if candle_core::utils::cuda_is_available() {
            return;
        }
        for s in ["cuda", "cuda:0", "cuda:3"] {
            let e = format!("{:#}", parse_device(s).unwrap_err());
            assert!(e.contains(NO_CUDA_SUPPORT), "{e}");
        }
    }
}
