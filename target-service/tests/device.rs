//! Asking a CPU-only build (or a machine without a GPU) for CUDA fails at start-up with a
//! clear message instead of serving on the wrong device.

use std::process::Command;

#[test]
fn cuda_device_without_cuda_exits_with_a_clear_error() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/fixtures/gqa_full_l-1_tied"
    );
    // A CUDA build on a GPU machine: an ordinal no machine has.
    let device = if cfg!(feature = "cuda") {
        "cuda:4096"
    } else {
        "cuda:0"
    };
    let out = Command::new(env!("CARGO_BIN_EXE_specllava-target"))
        .args([
            "--device",
            device,
            "--listen",
            "127.0.0.1:0",
            "--model-dir",
            fixture,
        ])
        .env_remove("SPECLLAVA_DEVICE")
        .env("RUST_LOG", "warn")
        .output()
        .expect("running specllava-target");
    assert!(!out.status.success(), "started on {device}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = if cfg!(feature = "cuda") {
        "cannot open CUDA device 4096"
    } else {
        "this binary was built without CUDA support; rebuild with --features cuda"
    };
    assert!(stderr.contains(expected), "stderr: {stderr}");
}
