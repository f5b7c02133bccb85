//! Errors of the quantization formats.

/// Errors raised while decoding quantized data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A ggml type id this crate does not decode.
    #[error("unsupported ggml tensor type {name} (id {id})")]
    UnsupportedGgmlType { id: u32, name: &'static str },

    /// The element count is not a whole number of the type's blocks.
    #[error("{ty}: {n_elements} elements is not a multiple of the block size {block_size}")]
    PartialBlock { ty: &'static str, n_elements: usize, block_size: usize },

    /// The byte buffer is not the size the element count requires.
    #[error("{ty}: {n_elements} elements need {expected} bytes, got {got}")]
    ByteLength { ty: &'static str, n_elements: usize, expected: usize, got: usize },
}

/// `Result` with this crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
