//! Errors of model loading and execution.

use std::path::PathBuf;

/// Errors raised while reading model files, validating configs and running models.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("invalid GGUF file {path}: {message}")]
    Gguf { path: PathBuf, message: String },

    #[error("invalid safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },

    #[error("invalid model config ({source_name}): {message}")]
    Config { source_name: String, message: String },

    #[error("unsupported architecture {arch:?} (supported: {supported})")]
    UnsupportedArchitecture { arch: String, supported: &'static str },

    #[error("weight {name} is missing from {source_name}")]
    MissingWeight { name: String, source_name: String },

    #[error("weight {name} has shape {got:?}, expected {expected:?}")]
    WeightShape { name: String, got: Vec<usize>, expected: Vec<usize> },

    #[error("weight {name}: {message}")]
    WeightFormat { name: String, message: String },

    #[error("sequence of {needed} tokens exceeds the KV cache capacity of {capacity}")]
    ContextOverflow { needed: usize, capacity: usize },

    #[error(transparent)]
    Quant(#[from] flint_quant::Error),

    #[error(transparent)]
    Backend(#[from] flint_tensor::Error),

    #[error(transparent)]
    Cuda(#[from] flint_cuda::Error),

    #[error("tensor parallelism: {0}")]
    Sharding(String),

    #[error(transparent)]
    Comm(#[from] flint_comm::Error),
}

/// `Result` with this crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
