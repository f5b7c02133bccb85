//! Device-agnostic tensor handles: a shape, a dtype and reference-counted backend storage.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use crate::{DType, Device, Shape};

/// Memory owned by a backend. Each backend downcasts through [`Storage::as_any`] to its own type.
pub trait Storage: Send + Sync + fmt::Debug {
    /// The device the memory lives on.
    fn device(&self) -> Device;
    /// Bytes of memory held.
    fn size_in_bytes(&self) -> usize;
    /// For the owning backend to recover its concrete type.
    fn as_any(&self) -> &dyn Any;
}

/// A cheap-to-clone handle to a contiguous, row-major tensor on some backend.
///
/// Clones share storage. Backends may update storage in place (the KV cache), so a handle is
/// a view of memory, not an immutable value.
#[derive(Clone)]
pub struct Tensor {
    shape: Shape,
    dtype: DType,
    storage: Arc<dyn Storage>,
}

impl Tensor {
    /// Wraps backend storage. Backends call this; the shape must describe the storage's contents.
    pub fn from_storage(shape: Shape, dtype: DType, storage: Arc<dyn Storage>) -> Self {
        Tensor { shape, dtype, storage }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.storage.device()
    }

    pub fn elem_count(&self) -> usize {
        self.shape.elem_count()
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    /// The same storage seen with another shape of equal element count.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Option<Tensor> {
        let shape = shape.into();
        (shape.elem_count() == self.elem_count()).then(|| Tensor {
            shape,
            dtype: self.dtype,
            storage: Arc::clone(&self.storage),
        })
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({}, {}, {})", self.shape, self.dtype, self.device())
    }
}
