//! Generated code for Flint's gRPC API: package `flint.v1` (`proto/flint/v1`), and the codec it
//! uses.

pub mod codec;

/// Messages, the `Inference` client and the `Inference` server trait.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("flint.v1");

    /// The encoded file descriptor set of `flint.v1`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flint_v1_descriptor");
}
