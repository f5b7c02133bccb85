use cudarc::cublaslt::result::CublasError;
use cudarc::driver::DriverError;

/// Errors of the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no CUDA driver on this machine (libcuda not found)")]
    NoDriver,
    #[error("no CUDA device {0} (this machine has {1})")]
    NoDevice(usize, usize),
    #[error("CUDA device {name} has compute capability {major}.{minor}; Flint's kernels are built for sm_90a (Hopper)")]
    UnsupportedDevice { name: String, major: i32, minor: i32 },
    #[error("the CUDA kernels were not built into this binary: run `cargo xtask kernels`, then rebuild")]
    KernelsNotBuilt,
    #[error("cuBLASLt not found on this machine")]
    NoCublasLt,
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("cuBLASLt: {0:?}")]
    Cublas(CublasError),
    #[error("{0}")]
    Unsupported(String),
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("out of device memory: {what} needs {need_gib:.2} GiB, {free_gib:.2} GiB free")]
    OutOfMemory { what: String, need_gib: f64, free_gib: f64 },
}

impl From<CublasError> for Error {
    fn from(e: CublasError) -> Self {
        Error::Cublas(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A shape or size error of operation `op`.
pub fn shape(op: &'static str, detail: impl Into<String>) -> Error {
    Error::Shape { op, detail: detail.into() }
}
