//! Compiles `specllava/v1/*.proto` with tonic-prost-build, using the vendored
//! `protoc` so a fresh machine needs nothing installed. Also writes the file
//! descriptor set that tonic-reflection serves.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &[
    "specllava/v1/common.proto",
    "specllava/v1/draft.proto",
    "specllava/v1/target.proto",
    "specllava/v1/generation.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("specllava_v1_descriptor.bin"))
        // Images travel as shared `bytes::Bytes`: handed from request to request without a copy.
        .bytes(".specllava.v1")
        .compile_protos(PROTOS, &["."])?;
    Ok(())
}
