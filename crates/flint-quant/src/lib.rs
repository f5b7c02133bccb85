//! Quantization formats and their CPU reference implementations.
//!
//! Today this crate holds the ggml block formats found in GGUF files ([`GgmlType`],
//! [`dequantize`]): F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the K-quants
//! Q2_K to Q6_K. Each is checked against vectors produced by the reference `gguf` Python package.

mod error;
mod ggml;

pub use error::{Error, Result};
pub use ggml::{GgmlType, dequantize, dequantize_into};
