//! Llama-family models on one Hopper GPU in BF16, over `flint-cuda`: [`CudaLlama`] and the
//! measurements of `flint bench --preset` ([`bench`]).

// Launch wrappers take raw device addresses, one per argument.
#![allow(clippy::too_many_arguments)]

pub mod bench;
mod llama;
pub mod tp;

pub use llama::{CudaLlama, CudaLlamaOptions, StepOutput};
pub use tp::{CudaRank, GroupWeights, with_cuda_rank};
