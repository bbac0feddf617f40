//! Device selection from a flag value.

/// Parses `cpu`, `cuda` or `cuda:N` into a candle device.
pub fn parse_device(s: &str) -> anyhow::Result<candle_core::Device> {
    match s {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => Ok(candle_core::Device::new_cuda(0)?),
        other => match other.strip_prefix("cuda:") {
            Some(n) => Ok(candle_core::Device::new_cuda(n.parse()?)?),
            None => anyhow::bail!("unknown device {other:?} (expected cpu, cuda or cuda:N)"),
        },
    }
}
