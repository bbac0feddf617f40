//! Spec-LLaVA gRPC protocol (`specllava.v1`): generated client and server code.
//!
//! The `.proto` files under `proto/specllava/v1/` are the contract; this crate
//! compiles them (messages, clients and servers for the `Generation`, `Draft`
//! and `Target` services) and exposes the file descriptor set for server
//! reflection.

/// Version 1 of the protocol.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("specllava.v1");

    /// Encoded `FileDescriptorSet` of all `specllava.v1` protos, for tonic-reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("specllava_v1_descriptor");
}

pub use v1::FILE_DESCRIPTOR_SET;
