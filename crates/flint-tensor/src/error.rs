//! The error type shared by backends: every variant names the operation and what was wrong.

use crate::{DType, Device, Shape};

/// Errors raised by tensor construction and backend operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two operands, or an operand and the operation's contract, disagree on shape.
    #[error("{op}: shape mismatch: {detail}")]
    ShapeMismatch { op: &'static str, detail: String },

    /// The backend cannot hold or compute with this element type.
    #[error("{op}: dtype {dtype} is not supported by the {device} backend")]
    UnsupportedDType { op: &'static str, dtype: DType, device: Device },

    /// A tensor created by one backend was handed to another.
    #[error("{op}: tensor lives on {found}, expected {expected}")]
    WrongDevice { op: &'static str, expected: Device, found: Device },

    /// Host data does not have as many elements as the shape says.
    #[error("{op}: {len} values given for shape {shape}")]
    DataLength { op: &'static str, len: usize, shape: Shape },

    /// An index (token id, position) is outside the range the operation accepts.
    #[error("{op}: index {index} out of range (limit {limit})")]
    OutOfRange { op: &'static str, index: usize, limit: usize },

    /// The requested device is not available on this machine.
    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable { device: String, reason: String },

    /// A failure inside a backend's own machinery (driver, allocator).
    #[error("{backend} backend: {message}")]
    Backend { backend: &'static str, message: String },
}

/// `Result` with this crate's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
