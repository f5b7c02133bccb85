//! Element types a tensor can hold, from plain floats to block-scaled 4-bit formats.

use std::fmt;

/// The element type of a tensor.
///
/// Sub-byte and block-scaled formats (`NvFp4`, `Int4`) report their packed size through
/// [`DType::size_in_bytes`] for a given element count rather than a per-element size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// FP8 with 4 exponent and 3 mantissa bits (no infinities, one NaN pattern per sign).
    F8E4M3,
    /// FP8 with 5 exponent and 2 mantissa bits (IEEE-like).
    F8E5M2,
    /// NVFP4: e2m1 values with one e4m3 scale per 16 elements.
    NvFp4,
    /// Signed 4-bit integers, two per byte.
    Int4,
}

impl DType {
    /// Bytes needed to store `n_elements` values of this type (scales of block formats excluded),
    /// saturating at `usize::MAX`.
    pub fn size_in_bytes(self, n_elements: usize) -> usize {
        match self {
            DType::F32 => n_elements.saturating_mul(4),
            DType::BF16 | DType::F16 => n_elements.saturating_mul(2),
            DType::F8E4M3 | DType::F8E5M2 => n_elements,
            DType::NvFp4 | DType::Int4 => n_elements.div_ceil(2),
        }
    }

    /// Whether the type is a floating-point format with one value per element and no scales.
    pub fn is_plain_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    /// The lowercase name used in file formats and command-line flags.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
            DType::NvFp4 => "nvfp4",
            DType::Int4 => "int4",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_sizes_round_up() {
        assert_eq!(DType::NvFp4.size_in_bytes(3), 2);
        assert_eq!(DType::BF16.size_in_bytes(3), 6);
        assert_eq!(DType::F8E4M3.size_in_bytes(7), 7);
    }
}
