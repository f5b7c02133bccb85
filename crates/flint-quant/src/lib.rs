//! Quantization formats and their CPU reference implementations.
//!
//! Today this crate holds the ggml block formats found in GGUF files ([`GgmlType`],
//! [`dequantize`]): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants
//! Q2_K to Q6_K. Each is checked against vectors produced by the reference `gguf` Python package.
//! And the FP8 formats ([`Fp8Format`]: E4M3, E5M2) with their scales, checked bit for bit
//! against PyTorch's casts, and the rules that pick a group's scale ([`ScaleRule`]: the largest
//! magnitude, or the least squared error).

mod error;
pub mod fp8;
mod ggml;

pub use error::{Error, Result};
pub use fp8::{Fp8Format, Fp8Matrix, Granularity, ScaleRule};
pub use ggml::{GgmlType, dequantize, dequantize_into};
