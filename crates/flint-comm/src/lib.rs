//! Collective communication for tensor and pipeline parallelism.
//!
//! [`Communicator`] is the contract the model code programs against: all-reduce, all-gather,
//! reduce-scatter, broadcast, point-to-point send/recv and a barrier, over a buffer type `B`.
//! Two implementations:
//!
//! - [`LocalComm`]: ranks are threads of one process and buffers are host slices (`[f32]`,
//!   `[u32]`). It is the reference the tensor- and pipeline-parallel CPU tests run on; every rank
//!   reduces in rank order, so all ranks hold bit-identical results.
//! - [`NcclComm`]: NCCL through cudarc's bindings, over [`DeviceSlice`]s of one GPU per rank.
//!   Collectives are enqueued on the rank's stream (and may be captured in CUDA graphs).
//!
//! [`P2pAllReduce`] is the small-message all-reduce of decode steps: one kernel that reads every
//! GPU's buffer peer to peer after a flag barrier, or pushes this GPU's values into every peer's
//! memory and waits for theirs in its own ([`P2pLink`]), among the GPUs of one process, fused
//! with the residual add and RMSNorm after it.
//!
//! [`bootstrap`] hands NCCL's unique id from the first node to the others over TCP, for jobs of
//! several processes or hosts.

pub mod bench;
pub mod bootstrap;
mod error;
mod local;
mod nccl;
pub mod p2p;
mod tcp;

pub use error::{Error, Result};
pub use local::{HostElement, LocalComm, Members};
pub use nccl::{CommType, DeviceSlice, NcclAbort, NcclComm, NcclId, nccl_available};
pub use p2p::{P2pAllReduce, P2pLink};
pub use tcp::TcpComm;

/// How values of the ranks are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
}

/// Collectives among the ranks of one group, over buffers of type `B`.
///
/// Every rank of the group must call the same collectives in the same order with buffers of the
/// same length; a rank that does not shows up as an error ([`Error::Timeout`] or NCCL's) on the
/// others, never as silently wrong data.
pub trait Communicator<B: ?Sized>: Send + std::fmt::Debug {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// Ranks in the group.
    fn world_size(&self) -> usize;

    /// Every rank's `buf` becomes the element-wise reduction of all ranks' `buf`.
    fn all_reduce(&self, buf: &mut B, op: ReduceOp) -> Result<()>;

    /// `buf` holds `world_size` equal parts; this rank's part (part `rank`) is sent and every
    /// other part is received from its rank.
    fn all_gather(&self, buf: &mut B) -> Result<()>;

    /// `buf` holds `world_size` equal parts on every rank; afterwards part `rank` holds the
    /// reduction over ranks of that part (the other parts are unspecified).
    fn reduce_scatter(&self, buf: &mut B, op: ReduceOp) -> Result<()>;

    /// Every rank's `buf` becomes `root`'s.
    fn broadcast(&self, buf: &mut B, root: usize) -> Result<()>;

    /// Sends `buf` to `peer`, which receives it with [`Communicator::recv`] into a buffer of the
    /// same length. Messages between two ranks arrive in the order they were sent.
    fn send(&self, buf: &B, peer: usize) -> Result<()>;

    /// Receives the next message `peer` sent to this rank.
    fn recv(&self, buf: &mut B, peer: usize) -> Result<()>;

    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// Splits `len` elements into `world` equal parts, or says why it cannot.
pub(crate) fn part_len(op: &'static str, len: usize, world: usize) -> Result<usize> {
    if !len.is_multiple_of(world) {
        return Err(Error::Size { op, detail: format!("{len} elements do not split into {world} equal parts") });
    }
    Ok(len / world)
}

pub(crate) fn check_peer(op: &'static str, peer: usize, rank: usize, world: usize) -> Result<()> {
    if peer >= world || peer == rank {
        return Err(Error::Size { op, detail: format!("peer {peer} from rank {rank} of {world}") });
    }
    Ok(())
}
