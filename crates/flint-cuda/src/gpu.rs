//! The device: context, one stream, loaded kernel modules, raw device buffers and launches.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::sys::{CUevent_flags, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice,
    result,
};
use cudarc::nvrtc::Ptx;

use crate::{Error, Result};

/// A device allocation of `bytes` bytes, freed on drop. Its address is fixed for its lifetime, so
/// kernels captured in CUDA graphs may keep it.
#[derive(Debug)]
pub struct DeviceBuffer {
    slice: CudaSlice<u8>,
    ptr: u64,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.slice.len()
    }

    /// The address `offset` bytes in.
    pub fn at(&self, offset: usize) -> u64 {
        debug_assert!(offset <= self.bytes());
        self.ptr + offset as u64
    }
}

/// Device memory that other GPUs of the process may read and write once peer access is enabled
/// ([`Gpu::enable_peer_access`]): a plain `cuMemAlloc` allocation (memory from the
/// stream-ordered pool that [`DeviceBuffer`]s use is not visible to peers). Freed on drop.
#[derive(Debug)]
pub struct PeerBuffer {
    ctx: Arc<CudaContext>,
    ptr: u64,
    bytes: usize,
}

impl PeerBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for PeerBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemAlloc in this context and is freed once; users
        // synchronise before dropping.
        let freed = self
            .ctx
            .bind_to_thread()
            .map_err(Error::from)
            .and_then(|()| unsafe { result::free_sync(self.ptr) }.map_err(Error::from));
        if let Err(e) = freed {
            tracing::warn!("freeing a peer buffer: {e}");
        }
    }
}

/// How the kernels of a decode step overlap (mirrors `flint_early_launch` and
/// `flint_l2_prefetch_budget` in kernels/include/flint/common.cuh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchTuning {
    /// The latency-bound kernels (norms, RoPE, decode attention, quantization) let the next
    /// kernel launch as they enter, and the GEMVs load their first weights before they wait for
    /// the previous kernel: the weight stream starts while the chain's small kernels run. Off,
    /// every kernel waits first and launches the next at its end. Needs [`Gpu::pdl`] to matter.
    pub early_launch: bool,
    /// Bytes of its weights a GEMV launched with `l2_prefetch` (one that follows a latency-bound
    /// kernel, while DRAM idles: `ops::gemv_l2`, `ops::Fp8Gemv::l2_prefetch`) asks into L2
    /// before its wait, from its first blocks (with `early_launch`); 0 for none.
    pub l2_prefetch_budget: u32,
}

impl Default for LaunchTuning {
    /// Early launch with 4 MiB of L2 prefetch by each GEMV that follows a latency-bound kernel:
    /// on an H100, Llama-3.1-8B batch-1 decode took 5.631 ms in BF16 (5.741 without prefetch,
    /// 5.652 / 5.773 / 5.825 with 8 / 16 / 32 MiB) and 3.789 ms in FP8 (3.800 without, 3.814 /
    /// 3.859 / 3.943); larger budgets outlast the short kernel and compete with the GEMV's reads.
    fn default() -> Self {
        LaunchTuning { early_launch: true, l2_prefetch_budget: 4 << 20 }
    }
}

impl LaunchTuning {
    /// The default, changed by `FLINT_EARLY_LAUNCH` (`0` or `1`) and `FLINT_L2_PREFETCH_MB`
    /// (MiB, at most 1024).
    pub fn from_env() -> Result<Self> {
        let mut tuning = LaunchTuning::default();
        if let Ok(v) = std::env::var("FLINT_EARLY_LAUNCH") {
            tuning.early_launch = match v.as_str() {
                "0" => false,
                "1" => true,
                _ => return Err(Error::Unsupported(format!("FLINT_EARLY_LAUNCH is 0 or 1, not {v:?}"))),
            };
        }
        if let Ok(v) = std::env::var("FLINT_L2_PREFETCH_MB") {
            let mb: u32 = v
                .parse()
                .ok()
                .filter(|&mb| mb <= 1024)
                .ok_or_else(|| Error::Unsupported(format!("FLINT_L2_PREFETCH_MB is 0..=1024 MiB, not {v:?}")))?;
            tuning.l2_prefetch_budget = mb << 20;
        }
        Ok(tuning)
    }

    /// `off`, or `early` with the budget in MiB (`early+l2=32M`), for reports.
    pub fn label(&self) -> String {
        if self.early_launch { format!("early+l2={}M", self.l2_prefetch_budget >> 20) } else { "off".to_string() }
    }
}

/// A CUDA device with Flint's kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
    /// The dynamic shared-memory limit each kernel was raised to (so launchers can ask at every
    /// launch without a driver call each time).
    smem_limits: std::sync::Mutex<HashMap<String, u32>>,
    modules: Vec<Arc<CudaModule>>,
    name: String,
    ordinal: usize,
    sm_count: u32,
    pdl: bool,
    tuning: std::sync::Mutex<LaunchTuning>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gpu({} #{})", self.name, self.ordinal)
    }
}

/// Whether this machine has a CUDA driver and at least one device.
pub fn cuda_available() -> bool {
    // SAFETY: only probes whether the library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return false;
    }
    CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

/// CUDA devices on this machine (0 without a driver).
pub fn device_count() -> usize {
    if !cuda_available() {
        return 0;
    }
    CudaContext::device_count().map_or(0, |n| n.max(0) as usize)
}

/// Kernel-parameter pointer to a value.
pub(crate) fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

impl Gpu {
    /// Opens device `ordinal`, checks it is a Hopper GPU and loads every kernel module.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        let count = CudaContext::device_count()? as usize;
        if ordinal >= count {
            return Err(Error::NoDevice(ordinal, count));
        }
        if !flint_kernels::all_built() {
            return Err(Error::KernelsNotBuilt);
        }
        let ctx = CudaContext::new(ordinal)?;
        // One stream, ordered: cudarc's per-buffer event tracking would only add work.
        // SAFETY: every buffer of this context is used on the one stream below.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name()?;
        let (major, minor) = ctx.compute_capability()?;
        if (major, minor) != (9, 0) {
            return Err(Error::UnsupportedDevice { name, major, minor });
        }
        let sm_count = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let stream = ctx.new_stream()?;
        let mut functions = HashMap::new();
        let mut modules = Vec::new();
        for name in flint_kernels::MODULE_NAMES {
            let image = flint_kernels::module(name).ok_or(Error::KernelsNotBuilt)?;
            let module = ctx.load_module(Ptx::from_binary(image.to_vec()))?;
            for f in KERNEL_NAMES {
                if let Ok(func) = module.load_function(f) {
                    functions.insert((*f).to_string(), func);
                }
            }
            modules.push(module);
        }
        if let Some(missing) = KERNEL_NAMES.iter().find(|f| !functions.contains_key(**f)) {
            return Err(Error::Unsupported(format!("kernel {missing} is missing: rebuild with `cargo xtask kernels`")));
        }
        let pdl = std::env::var("FLINT_PDL").map(|v| v != "0").unwrap_or(true);
        let tuning = LaunchTuning::from_env()?;
        let gpu = Arc::new(Gpu {
            ctx,
            stream,
            functions,
            smem_limits: Default::default(),
            modules,
            name,
            ordinal,
            sm_count,
            pdl,
            tuning: std::sync::Mutex::new(tuning),
        });
        gpu.set_launch_tuning(tuning)?;
        Ok(gpu)
    }

    /// The launch tuning the kernels run with.
    pub fn launch_tuning(&self) -> LaunchTuning {
        self.tuning.lock().map_or_else(|e| *e.into_inner(), |t| *t)
    }

    /// Sets the launch tuning of every module. Kernels read it as they run (captured graphs
    /// included), so this synchronizes the stream before and after writing it.
    pub fn set_launch_tuning(&self, tuning: LaunchTuning) -> Result<()> {
        let mut current = self.tuning.lock().map_err(|_| Error::Unsupported("poisoned launch tuning".into()))?;
        self.stream.synchronize()?;
        let early = i32::from(tuning.early_launch).to_ne_bytes();
        let budget = tuning.l2_prefetch_budget.to_ne_bytes();
        for module in &self.modules {
            for (symbol, value) in [("flint_early_launch", &early), ("flint_l2_prefetch_budget", &budget)] {
                let mut global = module.get_global(symbol, &self.stream)?;
                if global.len() != value.len() {
                    return Err(Error::Unsupported(format!("kernel constant {symbol} has {} bytes", global.len())));
                }
                self.stream.memcpy_htod(value.as_slice(), &mut global)?;
            }
        }
        self.stream.synchronize()?;
        *current = tuning;
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Whether launches use programmatic dependent launch.
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Unsupported(format!("kernel {name} is not in the built modules")))
    }

    /// Raises a kernel's dynamic shared-memory limit to at least `bytes` (a driver call only
    /// the first time a kernel needs more than it has).
    pub fn set_max_dynamic_smem(&self, name: &str, bytes: u32) -> Result<()> {
        let f = self.function(name)?;
        let mut limits = self.smem_limits.lock().map_err(|_| Error::Unsupported("poisoned smem limits".into()))?;
        if limits.get(name).is_some_and(|&set| set >= bytes) {
            return Ok(());
        }
        // SAFETY: a valid function handle of this context.
        unsafe {
            result::function::set_function_attribute(
                f.cu_function(),
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )?;
        }
        limits.insert(name.to_string(), bytes);
        Ok(())
    }

    /// Lets this GPU's kernels read and write memory of GPU `peer` (same process, unified
    /// addressing). `Ok(false)` when the two GPUs have no peer-to-peer path.
    pub fn enable_peer_access(&self, peer: usize) -> Result<bool> {
        if peer == self.ordinal {
            return Ok(true);
        }
        self.ctx.bind_to_thread()?;
        // SAFETY: plain driver queries and a context-wide setting; the peer's primary context is
        // retained for the call and released after.
        unsafe {
            let (mut me, mut other) = (0, 0);
            sys::cuDeviceGet(&mut me, self.ordinal as i32).result()?;
            sys::cuDeviceGet(&mut other, peer as i32).result()?;
            let mut can = 0;
            sys::cuDeviceCanAccessPeer(&mut can, me, other).result()?;
            if can == 0 {
                return Ok(false);
            }
            let mut peer_ctx = std::ptr::null_mut();
            sys::cuDevicePrimaryCtxRetain(&mut peer_ctx, other).result()?;
            let enabled = sys::cuCtxEnablePeerAccess(peer_ctx, 0);
            sys::cuDevicePrimaryCtxRelease_v2(other).result()?;
            match enabled {
                sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(true),
                e => Err(Error::Driver(cudarc::driver::DriverError(e))),
            }
        }
    }

    /// `bytes` bytes of zeroed device memory that peers may access (see [`PeerBuffer`]).
    pub fn alloc_peer(&self, bytes: usize) -> Result<PeerBuffer> {
        let bytes = bytes.max(16);
        self.ctx.bind_to_thread()?;
        // SAFETY: a plain allocation, owned by the returned buffer.
        let ptr = unsafe { result::malloc_sync(bytes) }?;
        let buf = PeerBuffer { ctx: Arc::clone(&self.ctx), ptr, bytes };
        self.memset(ptr, 0, bytes)?;
        self.synchronize()?;
        Ok(buf)
    }

    /// `bytes` bytes of device memory (uninitialised).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        let bytes = bytes.max(16);
        // SAFETY: the memory is written before it is read by every user of DeviceBuffer.
        let slice = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(|e| {
            let free = self.memory().map(|m| m.0).unwrap_or(0);
            if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                Error::OutOfMemory { what: "an allocation".into(), need_gib: gib(bytes), free_gib: gib(free) }
            } else {
                Error::Driver(e)
            }
        })?;
        let ptr = slice.device_ptr(&self.stream).0;
        Ok(DeviceBuffer { slice, ptr })
    }

    /// Zero-filled device memory.
    pub fn zeros(&self, bytes: usize) -> Result<DeviceBuffer> {
        let buf = self.alloc(bytes)?;
        self.memset(buf.ptr(), 0, buf.bytes())?;
        Ok(buf)
    }

    pub fn memset(&self, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        // SAFETY: callers pass ranges inside their buffers.
        unsafe { result::memset_d8_async(ptr, value, bytes, self.stream.cu_stream())? };
        Ok(())
    }

    /// Fills `count` u16 at `ptr` with `value`.
    pub fn memset_u16(&self, ptr: u64, value: u16, count: usize) -> Result<()> {
        // SAFETY: callers pass ranges inside their buffers.
        unsafe { sys::cuMemsetD16Async(ptr, value, count, self.stream.cu_stream()).result()? };
        Ok(())
    }

    /// Copies host data into a new buffer.
    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DeviceBuffer> {
        let buf = self.alloc(std::mem::size_of_val(data))?;
        self.write(&buf, 0, data)?;
        Ok(buf)
    }

    /// Copies `data` to `buf` at byte `offset`, synchronously with respect to the host data.
    pub fn write<T: Copy>(&self, buf: &DeviceBuffer, offset: usize, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if offset + bytes > buf.bytes() {
            return Err(crate::error::shape("write", format!("{bytes} bytes at {offset} into {}", buf.bytes())));
        }
        self.write_ptr(buf.at(offset), data)
    }

    /// Copies `data` to device address `ptr` (synchronously with respect to the host data).
    pub fn write_ptr<T: Copy>(&self, ptr: u64, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the host slice lives through the synchronous copy; the range is checked by callers.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(ptr, data.as_ptr() as *const c_void, bytes, self.stream.cu_stream()).result()?;
        }
        self.stream.synchronize()?;
        Ok(())
    }

    /// Copies `out.len()` values from device address `ptr` to the host (waits for the stream).
    pub fn read<T: Copy>(&self, ptr: u64, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `out` is a writable host slice of `bytes` bytes; the copy completes before return.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(out.as_mut_ptr() as *mut c_void, ptr, bytes, self.stream.cu_stream()).result()?;
        }
        self.stream.synchronize()?;
        Ok(())
    }

    pub fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: callers pass ranges inside their buffers.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())? };
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// Runs `f` as a profiler range (cuProfilerStart / cuProfilerStop, the stream synchronized
    /// on both sides): a profiler started with collection off (`ncu --profile-from-start off`)
    /// sees only the kernels `f` launches. Without a profiler attached it only synchronizes.
    pub fn profiled<T, E: From<Error>>(
        &self,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        self.ctx.bind_to_thread().map_err(Error::from)?;
        self.synchronize()?;
        cudarc::driver::profiler_start().map_err(Error::from)?;
        let out = f();
        let synced = self.synchronize();
        cudarc::driver::profiler_stop().map_err(Error::from)?;
        synced?;
        out
    }

    /// Launches kernel `name`; `args` point at the kernel's parameters in order.
    pub(crate) fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.function(name)?.cu_function();
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        // SAFETY: `args` match the kernel's signature (each wrapper in `ops` is written against
        // its kernel), and point at values alive for the call.
        unsafe {
            if self.pdl {
                let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
                attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
                attr.value.programmaticStreamSerializationAllowed = 1;
                let config = sys::CUlaunchConfig {
                    gridDimX: grid.0,
                    gridDimY: grid.1,
                    gridDimZ: grid.2,
                    blockDimX: block,
                    blockDimY: 1,
                    blockDimZ: 1,
                    sharedMemBytes: smem,
                    hStream: self.stream.cu_stream(),
                    attrs: &mut attr,
                    numAttrs: 1,
                };
                sys::cuLaunchKernelEx(&config, f, args.as_mut_ptr(), std::ptr::null_mut()).result()?;
            } else {
                result::launch_kernel(f, grid, (block, 1, 1), smem, self.stream.cu_stream(), args)?;
            }
        }
        Ok(())
    }
}

/// A captured CUDA graph of work on the GPU's stream.
pub struct Graph(CudaGraph);

// SAFETY: a graph is only launched or dropped by whoever holds it, one thread at a time (CUDA
// graph objects need external synchronisation, not thread affinity).
unsafe impl Send for Graph {}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}

impl Graph {
    /// Replays the graph on the stream it was captured on.
    pub fn launch(&self) -> Result<()> {
        self.0.launch()?;
        Ok(())
    }
}

/// Page-locked host memory for asynchronous uploads.
pub struct Staging(PinnedHostSlice<u8>);

// SAFETY: plain host memory; the owner serialises its use.
unsafe impl Send for Staging {}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Staging({} bytes)", self.0.len())
    }
}

/// A CUDA event for timing work on the stream.
pub struct Event(CudaEvent);

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Event")
    }
}

impl Event {
    /// Records the event at the current end of `gpu`'s stream.
    pub fn record(&self, gpu: &Gpu) -> Result<()> {
        self.0.record(&gpu.stream)?;
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        self.0.synchronize()?;
        Ok(())
    }

    /// Milliseconds from this event to `end` (both recorded and complete).
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        Ok(self.0.elapsed_ms(&end.0)?)
    }
}

impl Gpu {
    /// Captures the work `enqueue` puts on the stream into a graph (nothing runs meanwhile).
    pub fn capture(&self, enqueue: impl FnOnce() -> Result<()>) -> Result<Graph> {
        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let captured = enqueue();
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        captured?;
        let graph = graph?.ok_or_else(|| Error::Unsupported("graph capture recorded nothing".into()))?;
        graph.upload()?;
        Ok(Graph(graph))
    }

    /// `bytes` of page-locked host memory.
    pub fn staging(&self, bytes: usize) -> Result<Staging> {
        // SAFETY: bytes are written before they are copied out (`upload_staged`).
        Ok(Staging(unsafe { self.ctx.alloc_pinned::<u8>(bytes.max(16)) }?))
    }

    /// Writes `bytes` into `staging` at `offset` and copies them to device address `dst`,
    /// asynchronously in stream order. The caller must not rewrite that staging range before
    /// the stream has passed the copy (e.g. before it next synchronises).
    pub fn upload_staged(&self, staging: &mut Staging, offset: usize, bytes: &[u8], dst: u64) -> Result<()> {
        let host = staging.0.as_mut_slice()?;
        if offset + bytes.len() > host.len() {
            return Err(crate::error::shape(
                "upload",
                format!("{} bytes at {offset} into {}", bytes.len(), host.len()),
            ));
        }
        host[offset..offset + bytes.len()].copy_from_slice(bytes);
        // SAFETY: the source is page-locked and left alone until the copy is done (above); the
        // caller owns the destination range.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst,
                host[offset..].as_ptr() as *const c_void,
                bytes.len(),
                self.stream.cu_stream(),
            )
            .result()?;
        }
        Ok(())
    }

    /// A timing event.
    pub fn event(&self) -> Result<Event> {
        Ok(Event(self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?))
    }
}

/// Bytes as GiB, for messages.
pub fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Every kernel entry point of `kernels/*.cu`.
pub(crate) const KERNEL_NAMES: &[&str] = &[
    "flint_embedding",
    "flint_unshard_rows",
    "flint_add_rms_norm",
    "flint_rope_kv_write",
    "flint_rope_kv_write_fp8",
    "flint_silu_mul",
    "flint_fill_uniform",
    "flint_gemv_1_u1",
    "flint_gemv_1_u2",
    "flint_gemv_1_u4",
    "flint_gemv_2_u1",
    "flint_gemv_2_u2",
    "flint_gemv_2_u4",
    "flint_gemv_3_u1",
    "flint_gemv_3_u2",
    "flint_gemv_3_u4",
    "flint_gemv_4_u1",
    "flint_gemv_4_u2",
    "flint_gemv_4_u4",
    "flint_gemv_5_u1",
    "flint_gemv_5_u2",
    "flint_gemv_5_u4",
    "flint_gemv_6_u1",
    "flint_gemv_6_u2",
    "flint_gemv_6_u4",
    "flint_gemv_7_u1",
    "flint_gemv_7_u2",
    "flint_gemv_7_u4",
    "flint_gemv_8_u1",
    "flint_gemv_8_u2",
    "flint_gemv_8_u4",
    "flint_attention_decode_64",
    "flint_attention_decode_128",
    "flint_attention_prefill_64",
    "flint_attention_prefill_128",
    "flint_attention_decode_fp8_64",
    "flint_attention_decode_fp8_128",
    "flint_attention_decode_rope_64",
    "flint_attention_decode_rope_128",
    "flint_attention_decode_rope_fp8_64",
    "flint_attention_decode_rope_fp8_128",
    "flint_attention_prefill_fp8_64",
    "flint_attention_prefill_fp8_128",
    "flint_sample",
    "flint_top_candidates",
    "flint_quantize_rows",
    "flint_add_rms_norm_fp8",
    "flint_silu_mul_fp8",
    "flint_gemv_fp8_s4_u2_p0",
    "flint_gemv_fp8_s4_u2_p1",
    "flint_gemv_fp8_s4_u4_p0",
    "flint_gemv_fp8_s4_u4_p1",
    "flint_gemv_fp8_s8_u2_p0",
    "flint_gemv_fp8_s8_u2_p1",
    "flint_gemv_fp8_s8_u4_p0",
    "flint_gemv_fp8_s8_u4_p1",
    "flint_gemv_fp8_s16_u1_p0",
    "flint_gemv_fp8_s16_u1_p1",
    "flint_gemv_fp8_s16_u2_p0",
    "flint_gemv_fp8_s16_u2_p1",
    "flint_gemv_fp8_s32_u1_p0",
    "flint_gemv_fp8_s32_u1_p1",
    "flint_gemv_fp8_s32_u2_p0",
    "flint_gemv_fp8_s32_u2_p1",
    "flint_gemv_fp8_norm_s16_u1_p1",
    "flint_gemv_fp8_norm_s8_u2_p1",
    "flint_gemv_fp8q_norm_s16_u1_p1",
    "flint_gemv_fp8q_norm_s8_u2_p1",
    "flint_gemv_fp8_split_s16_u1_p1",
    "flint_gemv_fp8_split_s8_u2_p1",
    "flint_gemv_fp8q_split_s16_u1_p1",
    "flint_gemv_fp8q_split_s8_u2_p1",
    "flint_gemv_fp8n_s16_u1_p1",
    "flint_gemv_fp8n_s8_u2_p1",
    "flint_gemv_fp8q_s4_u2_p0",
    "flint_gemv_fp8q_s4_u2_p1",
    "flint_gemv_fp8q_s4_u4_p0",
    "flint_gemv_fp8q_s4_u4_p1",
    "flint_gemv_fp8q_s8_u2_p0",
    "flint_gemv_fp8q_s8_u2_p1",
    "flint_gemv_fp8q_s8_u4_p0",
    "flint_gemv_fp8q_s8_u4_p1",
    "flint_gemv_fp8q_s16_u1_p0",
    "flint_gemv_fp8q_s16_u1_p1",
    "flint_gemv_fp8q_s16_u2_p0",
    "flint_gemv_fp8q_s16_u2_p1",
    "flint_gemv_fp8q_s32_u1_p0",
    "flint_gemv_fp8q_s32_u1_p1",
    "flint_gemv_fp8q_s32_u2_p0",
    "flint_gemv_fp8q_s32_u2_p1",
    "flint_scale_output",
    "flint_ar_sum",
    "flint_ar_add_rms_norm",
    "flint_ar_add_rms_norm_cluster",
    "flint_arl_sum",
    "flint_arl_add_rms_norm",
    "flint_arl_add_rms_norm_cluster",
];
