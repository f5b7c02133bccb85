//! Host memory behind CPU tensors: an f32 vector behind a lock, so the KV cache can be
//! written in place while other handles read it.

use std::any::Any;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use flint_tensor::{Device, Storage};

/// f32 values of one CPU tensor.
#[derive(Debug)]
pub struct CpuStorage {
    data: RwLock<Vec<f32>>,
}

impl CpuStorage {
    pub fn new(data: Vec<f32>) -> Self {
        CpuStorage { data: RwLock::new(data) }
    }

    /// Shared read access. A poisoned lock (a panic elsewhere while writing) still yields the
    /// data: every writer leaves it in a consistent state between element stores.
    pub fn read(&self) -> RwLockReadGuard<'_, Vec<f32>> {
        self.data.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Vec<f32>> {
        self.data.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Storage for CpuStorage {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn size_in_bytes(&self) -> usize {
        self.read().len() * std::mem::size_of::<f32>()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
