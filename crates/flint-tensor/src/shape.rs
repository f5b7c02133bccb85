//! Tensor shapes: a short list of axis lengths, outermost first (row-major).

use std::fmt;

/// The axis lengths of a tensor, outermost first. `[n_tokens, hidden]` has `dims() == [n_tokens, hidden]`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// A shape from its axis lengths, outermost first.
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    /// The axis lengths, outermost first.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Product of all axis lengths (1 for a scalar).
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// Length of axis `axis`, or `None` when the shape has fewer axes.
    pub fn dim(&self, axis: usize) -> Option<usize> {
        self.0.get(axis).copied()
    }

    /// Length of the innermost axis (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.0.last().copied().unwrap_or(1)
    }

    /// The shape seen as a matrix: (product of all outer axes, innermost axis).
    pub fn as_rows(&self) -> (usize, usize) {
        let cols = self.last_dim();
        let rows = self.elem_count().checked_div(cols).unwrap_or(0);
        (rows, cols)
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl From<&[usize]> for Shape {
    fn from(dims: &[usize]) -> Self {
        Shape(dims.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(dims: [usize; N]) -> Self {
        Shape(dims.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_a_rank3_shape() {
        let s = Shape::from([2, 3, 4]);
        assert_eq!(s.as_rows(), (6, 4));
        assert_eq!(s.elem_count(), 24);
        assert_eq!(s.to_string(), "[2, 3, 4]");
    }
}
