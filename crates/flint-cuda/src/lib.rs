//! Flint's CUDA backend for Hopper GPUs: device memory, the kernels of `kernels/` (embedded by
//! `flint-kernels`), cuBLASLt GEMMs, CUDA graphs, and [`CudaLlama`], a Llama-family model that
//! runs batched steps over a paged KV cache with one graph replay per decode step.

// Kernel launches and GEMMs take their operands as raw device addresses, one per argument.
#![allow(clippy::too_many_arguments)]

pub mod bench;
mod error;
pub mod gemm;
pub mod gpu;
pub mod llama;
pub mod ops;

pub use error::{Error, Result};
pub use gpu::{DeviceBuffer, Gpu, cuda_available};
pub use llama::{CudaLlama, CudaLlamaOptions, StepOutput};
