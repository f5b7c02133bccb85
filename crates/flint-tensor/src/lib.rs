//! Flint's vocabulary types: element types, shapes, device-agnostic tensor handles and the
//! `Backend` trait that lists every operation a model's forward pass needs.
//!
//! Nothing here computes. `flint-cpu` is the reference implementation of [`Backend`]; the CUDA
//! backend implements the same trait, and model code only ever sees `&dyn Backend`.

mod attention;
mod backend;
mod dtype;
mod error;
mod shape;
mod tensor;

pub use attention::AttentionBatch;
pub use backend::{Backend, Device};
pub use dtype::DType;
pub use error::{Error, Result};
pub use shape::Shape;
pub use tensor::{Storage, Tensor};
