//! Flint's CUDA backend for Hopper GPUs: the device (one stream, raw buffers, launches with
//! programmatic dependent launch, graphs, page-locked staging, events), the kernels of `kernels/`
//! (embedded by `flint-kernels`) behind typed launchers, and cuBLASLt BF16 GEMMs. Models are
//! built on it in `flint-model` (`flint_model::cuda::CudaLlama`).

// Kernel launches and GEMMs take their operands as raw device addresses, one per argument.
#![allow(clippy::too_many_arguments)]

pub mod error;
pub mod gemm;
pub mod gpu;
pub mod ops;

pub use error::{Error, Result};
pub use gpu::{DeviceBuffer, Event, Gpu, Graph, LaunchTuning, PeerBuffer, Staging, cuda_available, device_count, gib};
