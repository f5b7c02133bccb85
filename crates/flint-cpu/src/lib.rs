//! The reference [`Backend`](flint_tensor::Backend): plain, obviously-correct f32 math on the
//! CPU, parallelised with rayon where the work is large. [`CpuBackend::blocked`] sends matrix
//! products of more than a few tokens through `matrixmultiply`'s blocked f32 GEMM (the same
//! sums, in a cache-friendly order, with the SIMD the CPU has), for whole-text scoring.
//!
//! Every tensor is stored as `f32`. Tensors created as `bf16` or `f16` hold values already
//! rounded to that type, so a model run here sees the same weights as on a device that stores
//! them natively.

mod ops;
mod storage;

pub use ops::CpuBackend;
pub use storage::CpuStorage;
