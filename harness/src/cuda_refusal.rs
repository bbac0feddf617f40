//! The check both model services share: a binary asked for a CUDA device it cannot have
//! (a CPU-only build, or an ordinal no machine has) exits at start-up with a clear message
//! instead of serving on the wrong device.

use std::path::Path;
use std::process::Command;

/// Starts the service binary `bin` with `--device cuda:N` on a tiny fixture checkpoint and
/// asserts it exits with the expected message; `cuda_build` is whether the binary was built
/// with the `cuda` feature.
pub fn assert_cuda_refused(bin: &Path, cuda_build: bool) {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/tests/fixtures/gqa_full_l-1_tied");
    // A CUDA build on a GPU machine: an ordinal no machine has.
    let device = if cuda_build { "cuda:4096" } else { "cuda:0" };
    let out = Command::new(bin)
        .args(["--device", device, "--listen", "127.0.0.1:0", "--model-dir"])
        .arg(&fixture)
        .env_remove("SPECLLAVA_DEVICE")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    assert!(
        !out.status.success(),
        "{} started on {device}",
        bin.display()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = if cuda_build {
        "cannot open CUDA device 4096"
    } else {
        "this binary was built without CUDA support; rebuild with --features cuda"
    };
    assert!(stderr.contains(expected), "stderr: {stderr}");
}
