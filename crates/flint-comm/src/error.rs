/// Errors of collective communication.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: {detail}")]
    Size { op: &'static str, detail: String },
    #[error("{op}: rank {rank} waited {seconds} s for the other ranks (did one of them fail?)")]
    Timeout { op: &'static str, rank: usize, seconds: u64 },
    #[error("the communicator group was aborted by rank {0}")]
    Aborted(usize),
    #[error("NCCL is not installed on this machine (libnccl.so.2 not found)")]
    NoNccl,
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("CUDA: {0}")]
    Cuda(#[from] flint_cuda::Error),
    #[error("bootstrap with {addr}: {detail}")]
    Bootstrap { addr: String, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
