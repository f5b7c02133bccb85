//! Llama-family models on one Hopper GPU in BF16, over `flint-cuda`: [`CudaLlama`] and the
//! measurements of `flint bench --preset` ([`bench`]).

// Launch wrappers take raw device addresses, one per argument.
#![allow(clippy::too_many_arguments)]

pub mod bench;
mod llama;
pub mod tp;

pub use llama::{CudaLlama, CudaLlamaOptions, Parallel, StageLink, StepOutput, TpLink};
pub use tp::{CudaRank, GroupWeights, NodeLayout, P2P_MAX_ROWS, with_cuda_rank};
