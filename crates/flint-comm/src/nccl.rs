//! NCCL, through cudarc's bindings: one GPU per rank, collectives on the rank's stream.

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::nccl::{result, sys};
use flint_cuda::Gpu;

use crate::{Communicator, Error, ReduceOp, Result, check_peer, part_len};

/// Element type of a [`DeviceSlice`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommType {
    F32,
    Bf16,
    F16,
    U32,
    U8,
}

impl CommType {
    pub fn size(self) -> usize {
        match self {
            CommType::F32 | CommType::U32 => 4,
            CommType::Bf16 | CommType::F16 => 2,
            CommType::U8 => 1,
        }
    }

    fn nccl(self) -> sys::ncclDataType_t {
        match self {
            CommType::F32 => sys::ncclDataType_t::ncclFloat32,
            CommType::Bf16 => sys::ncclDataType_t::ncclBfloat16,
            CommType::F16 => sys::ncclDataType_t::ncclFloat16,
            CommType::U32 => sys::ncclDataType_t::ncclUint32,
            CommType::U8 => sys::ncclDataType_t::ncclUint8,
        }
    }
}

/// `len` elements of `dtype` at device address `ptr` on the rank's GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSlice {
    pub ptr: u64,
    pub len: usize,
    pub dtype: CommType,
}

impl DeviceSlice {
    pub fn new(ptr: u64, len: usize, dtype: CommType) -> Self {
        DeviceSlice { ptr, len, dtype }
    }

    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
}

/// NCCL's unique id: made once by one rank ([`NcclId::new`]) and handed to all others.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId(..)")
    }
}

/// Whether NCCL's library can be loaded here.
pub fn nccl_available() -> bool {
    // SAFETY: only probes whether the library can be opened.
    unsafe { sys::is_culib_present() }
}

fn nccl_err(what: &str, e: result::NcclError) -> Error {
    Error::Nccl(format!("{what}: {e:?}"))
}

impl NcclId {
    /// A fresh unique id (NCCL's `ncclGetUniqueId`).
    pub fn new() -> Result<Self> {
        if !nccl_available() {
            return Err(Error::NoNccl);
        }
        let id = result::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId { internal: self.0.map(|b| b as ::core::ffi::c_char) }
    }
}

/// One rank of an NCCL communicator, bound to one GPU and its stream.
///
/// Collectives are enqueued on the GPU's stream and return before they finish; they order with
/// the rank's kernels like any other work on that stream, and can be captured in CUDA graphs.
pub struct NcclComm {
    /// The communicator, shared with [`NcclAbort`] handles; `None` once aborted.
    comm: Arc<Mutex<Option<RawComm>>>,
    gpu: Arc<Gpu>,
    rank: usize,
    world: usize,
    /// Four bytes for the barrier's all-reduce.
    scratch: flint_cuda::DeviceBuffer,
}

struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one thread at a time (the mutex
// around it); `ncclCommAbort` may be called from another thread while operations are in flight.
unsafe impl Send for RawComm {}

/// Aborts an [`NcclComm`] from any thread: its in-flight and later operations fail instead of
/// waiting for peers that will never come (a rank that failed mid-step).
#[derive(Clone)]
pub struct NcclAbort(Arc<Mutex<Option<RawComm>>>);

impl std::fmt::Debug for NcclAbort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclAbort")
    }
}

impl NcclAbort {
    pub fn abort(&self) {
        let mut comm = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(raw) = comm.take() {
            // SAFETY: the communicator is live (it was not taken before) and is never used again.
            if let Err(e) = unsafe { result::comm_abort(raw.0) } {
                tracing::warn!("ncclCommAbort: {e:?}");
            }
        }
    }
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm(rank {} of {} on {:?})", self.rank, self.world, self.gpu)
    }
}

impl NcclComm {
    /// Joins rank `rank` of `world` ranks sharing `id`, on `gpu`. Blocks until every rank has
    /// joined: call it from one thread (or process) per rank.
    pub fn new(gpu: Arc<Gpu>, rank: usize, world: usize, id: &NcclId) -> Result<Self> {
        if !nccl_available() {
            return Err(Error::NoNccl);
        }
        if rank >= world {
            return Err(Error::Size { op: "NcclComm::new", detail: format!("rank {rank} of {world}") });
        }
        gpu.context().bind_to_thread().map_err(flint_cuda::Error::from)?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is NCCL's own bytes.
        unsafe { result::comm_init_rank(&mut comm, world as i32, id.raw(), rank as i32) }
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        let scratch = gpu.zeros(4)?;
        Ok(NcclComm { comm: Arc::new(Mutex::new(Some(RawComm(comm)))), gpu, rank, world, scratch })
    }

    /// One communicator over `gpus` driven from this thread: rank `i` on `gpus[i]`.
    pub fn group(gpus: &[Arc<Gpu>]) -> Result<Vec<Self>> {
        let id = NcclId::new()?;
        let world = gpus.len();
        let mut comms = vec![std::ptr::null_mut(); world];
        result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        let mut init = Ok(());
        for (rank, gpu) in gpus.iter().enumerate() {
            if let Err(e) = gpu.context().bind_to_thread() {
                init = Err(Error::Cuda(e.into()));
                break;
            }
            // SAFETY: valid out-pointer; inside a group NCCL defers the joins to group end.
            if let Err(e) = unsafe { result::comm_init_rank(&mut comms[rank], world as i32, id.raw(), rank as i32) } {
                init = Err(nccl_err("ncclCommInitRank", e));
                break;
            }
        }
        let end = result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e));
        init?;
        end?;
        gpus.iter()
            .zip(comms)
            .enumerate()
            .map(|(rank, (gpu, comm))| {
                let scratch = gpu.zeros(4)?;
                Ok(NcclComm { comm: Arc::new(Mutex::new(Some(RawComm(comm)))), gpu: gpu.clone(), rank, world, scratch })
            })
            .collect()
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// A handle that aborts this communicator from another thread.
    pub fn abort_handle(&self) -> NcclAbort {
        NcclAbort(Arc::clone(&self.comm))
    }

    /// The raw communicator for one call, or an error once aborted.
    fn raw(&self) -> Result<sys::ncclComm_t> {
        let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        comm.as_ref().map(|c| c.0).ok_or_else(|| Error::Nccl("the communicator was aborted".to_string()))
    }

    fn stream(&self) -> sys::cudaStream_t {
        self.gpu.stream().cu_stream() as sys::cudaStream_t
    }

    fn bind(&self) -> Result<()> {
        self.gpu.context().bind_to_thread().map_err(|e| Error::Cuda(e.into()))
    }

    fn op(op: ReduceOp) -> sys::ncclRedOp_t {
        match op {
            ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
            ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
            ReduceOp::Min => sys::ncclRedOp_t::ncclMin,
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let mut comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(raw) = comm.take() {
            // SAFETY: the communicator is ours and no longer used.
            if let Err(e) = unsafe { result::comm_destroy(raw.0) } {
                tracing::warn!("ncclCommDestroy: {e:?}");
            }
        }
    }
}

fn ptr(p: u64) -> *mut c_void {
    p as *mut c_void
}

impl Communicator<DeviceSlice> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&self, buf: &mut DeviceSlice, op: ReduceOp) -> Result<()> {
        self.bind()?;
        // SAFETY: `buf` is device memory of this rank's GPU holding `len` elements (caller's
        // contract); in place is allowed.
        unsafe {
            result::all_reduce(
                ptr(buf.ptr),
                ptr(buf.ptr),
                buf.len,
                buf.dtype.nccl(),
                Self::op(op),
                self.raw()?,
                self.stream(),
            )
        }
        .map_err(|e| nccl_err("ncclAllReduce", e))?;
        Ok(())
    }

    fn all_gather(&self, buf: &mut DeviceSlice) -> Result<()> {
        let n = part_len("all_gather", buf.len, self.world)?;
        self.bind()?;
        let send = buf.ptr + (self.rank * n * buf.dtype.size()) as u64;
        // SAFETY: in place: the send part lies at offset rank * n of the receive buffer.
        unsafe { result::all_gather(ptr(send), ptr(buf.ptr), n, buf.dtype.nccl(), self.raw()?, self.stream()) }
            .map_err(|e| nccl_err("ncclAllGather", e))?;
        Ok(())
    }

    fn reduce_scatter(&self, buf: &mut DeviceSlice, op: ReduceOp) -> Result<()> {
        let n = part_len("reduce_scatter", buf.len, self.world)?;
        self.bind()?;
        let recv = buf.ptr + (self.rank * n * buf.dtype.size()) as u64;
        // SAFETY: in place: the receive part lies at offset rank * n of the send buffer.
        unsafe {
            result::reduce_scatter(
                ptr(buf.ptr),
                ptr(recv),
                n,
                buf.dtype.nccl(),
                Self::op(op),
                self.raw()?,
                self.stream(),
            )
        }
        .map_err(|e| nccl_err("ncclReduceScatter", e))?;
        Ok(())
    }

    fn broadcast(&self, buf: &mut DeviceSlice, root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::Size { op: "broadcast", detail: format!("root {root} of {}", self.world) });
        }
        self.bind()?;
        // SAFETY: in place broadcast over `len` elements of device memory.
        unsafe {
            result::broadcast(
                ptr(buf.ptr),
                ptr(buf.ptr),
                buf.len,
                buf.dtype.nccl(),
                root as i32,
                self.raw()?,
                self.stream(),
            )
        }
        .map_err(|e| nccl_err("ncclBroadcast", e))?;
        Ok(())
    }

    fn send(&self, buf: &DeviceSlice, peer: usize) -> Result<()> {
        check_peer("send", peer, self.rank, self.world)?;
        self.bind()?;
        // SAFETY: `len` elements of device memory, read by NCCL in stream order.
        unsafe { result::send(ptr(buf.ptr), buf.len, buf.dtype.nccl(), peer as i32, self.raw()?, self.stream()) }
            .map_err(|e| nccl_err("ncclSend", e))?;
        Ok(())
    }

    fn recv(&self, buf: &mut DeviceSlice, peer: usize) -> Result<()> {
        check_peer("recv", peer, self.rank, self.world)?;
        self.bind()?;
        // SAFETY: `len` elements of device memory, written by NCCL in stream order.
        unsafe { result::recv(ptr(buf.ptr), buf.len, buf.dtype.nccl(), peer as i32, self.raw()?, self.stream()) }
            .map_err(|e| nccl_err("ncclRecv", e))?;
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let mut one = DeviceSlice::new(self.scratch.ptr(), 1, CommType::F32);
        self.all_reduce(&mut one, ReduceOp::Sum)?;
        self.gpu.synchronize()?;
        Ok(())
    }
}
