//! Asking a CPU-only build (or a machine without a GPU) for CUDA fails at start-up with a
//! clear message instead of serving on the wrong device.

use std::path::Path;

#[test]
fn cuda_device_without_cuda_exits_with_a_clear_error() {
    specllava_harness::cuda_refusal::assert_cuda_refused(
        Path::new(env!("CARGO_BIN_EXE_specllava-target")),
        cfg!(feature = "cuda"),
    );
}
