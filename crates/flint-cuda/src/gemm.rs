//! BF16 GEMMs through cuBLASLt: `y[m, n] = x[m, k] . W[n, k]^T`, with cached plans per shape.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys::{
    self as lts, cublasComputeType_t, cublasLtMatmulDescAttributes_t, cublasLtMatmulPreferenceAttributes_t,
    cudaDataType_t,
};

use crate::gpu::{DeviceBuffer, Gpu};
use crate::{Error, Result};

/// Output element type of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemmOut {
    Bf16,
    F32,
}

/// Input element type of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum GemmIn {
    Bf16,
    /// E4M3 with f32 scales per row of W and per row of x (cuBLASLt outer-vector scaling).
    Fp8,
    /// E4M3 without scales (f32 out; the scales are applied by a kernel after).
    Fp8Unscaled,
}

/// (m, n, k, output, input): what a plan is chosen for.
type PlanKey = (usize, usize, usize, GemmOut, GemmIn);

struct Plan {
    desc: lts::cublasLtMatmulDesc_t,
    a: lts::cublasLtMatrixLayout_t,
    b: lts::cublasLtMatrixLayout_t,
    c: lts::cublasLtMatrixLayout_t,
    algo: lts::cublasLtMatmulAlgo_t,
}

// SAFETY: the handles are only used under the cache's mutex or on the owning stream.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each handle was created by cuBLASLt and is destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle, its workspace and the plans chosen so far.
pub struct Gemm {
    handle: lts::cublasLtHandle_t,
    workspace: DeviceBuffer,
    /// Whether this cuBLASLt takes outer-vector FP8 scales (`None`: not tried yet).
    outer_vec: Mutex<Option<bool>>,
    /// f32 products of the unscaled FP8 fallback, grown on demand.
    scratch: Mutex<Option<DeviceBuffer>>,
    plans: Mutex<HashMap<PlanKey, Plan>>,
}

// SAFETY: the handle is used on one stream; plan creation is serialised by the mutex.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gemm(cuBLASLt)")
    }
}

const WORKSPACE: usize = 32 << 20;

impl Gemm {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { lts::is_culib_present() } {
            return Err(Error::NoCublasLt);
        }
        let handle = lt::create_handle()?;
        let workspace = gpu.alloc(WORKSPACE)?;
        Ok(Gemm {
            handle,
            workspace,
            outer_vec: Mutex::new(None),
            scratch: Mutex::new(None),
            plans: Mutex::new(HashMap::new()),
        })
    }

    fn plan(&self, m: usize, n: usize, k: usize, out: GemmOut, input: GemmIn) -> Result<Plan> {
        // cuBLASLt is column-major. Row-major y[m, n] is column-major y^T [n, m] = W[n, k] . x^T[k, m]:
        // A = W (stored as column-major [k, n], transposed), B = x (column-major [k, m]), C = [n, m].
        let out_type = match out {
            GemmOut::Bf16 => cudaDataType_t::CUDA_R_16BF,
            GemmOut::F32 => cudaDataType_t::CUDA_R_32F,
        };
        let desc = lt::create_matmul_desc(cublasComputeType_t::CUBLAS_COMPUTE_32F, cudaDataType_t::CUDA_R_32F)?;
        let trans = cublasOperation_t::CUBLAS_OP_T;
        // SAFETY: valid descriptor; the attribute buffers are read during the call.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &trans as *const _ as *const c_void,
                std::mem::size_of_val(&trans),
            )?;
        }
        let in_type = match input {
            GemmIn::Bf16 => cudaDataType_t::CUDA_R_16BF,
            GemmIn::Fp8 => {
                // Scales per row of W (A's outer dimension) and per token (B's outer dimension).
                let mode = lts::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
                for attr in [
                    cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                    cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
                ] {
                    // SAFETY: valid descriptor; the attribute value lives through the call.
                    unsafe {
                        lt::set_matmul_desc_attribute(
                            desc,
                            attr,
                            &mode as *const _ as *const c_void,
                            std::mem::size_of_val(&mode),
                        )?;
                    }
                }
                cudaDataType_t::CUDA_R_8F_E4M3
            }
            GemmIn::Fp8Unscaled => cudaDataType_t::CUDA_R_8F_E4M3,
        };
        let a = lt::create_matrix_layout(in_type, k as u64, n as u64, k as i64)?;
        let b = lt::create_matrix_layout(in_type, k as u64, m as u64, k as i64)?;
        let c = lt::create_matrix_layout(out_type, n as u64, m as u64, n as i64)?;
        let pref = lt::create_matmul_pref()?;
        let ws = WORKSPACE as u64;
        // SAFETY: valid handles; attribute buffers live through the calls.
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                std::mem::size_of_val(&ws),
            )?;
            let h = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref);
            let _ = lt::destroy_matmul_pref(pref);
            h?
        };
        Ok(Plan { desc, a, b, c, algo: heuristic.algo })
    }

    /// `y[m, n] = x[m, k] . w[n, k]^T` on the GPU's stream; x and w bf16, y `out`.
    pub fn matmul(&self, gpu: &Gpu, x: u64, w: u64, y: u64, m: usize, n: usize, k: usize, out: GemmOut) -> Result<()> {
        self.run(gpu, x, w, y, m, n, k, out, GemmIn::Bf16, None)
    }

    /// Sizes the FP8 path for products of up to `max_elems` outputs: where this cuBLASLt refuses
    /// outer-vector scales (found by a small product now), the unscaled fallback needs an f32
    /// buffer that size, allocated once so graphs may keep its address.
    pub fn reserve_fp8(&self, gpu: &Gpu, max_elems: usize) -> Result<()> {
        let (m, n, k) = (16, 16, 64);
        let x = gpu.zeros(m * k)?;
        let w = gpu.zeros(n * k)?;
        let ones = gpu.upload(&[1.0f32; 16])?;
        let y = gpu.alloc(2 * m * n)?;
        *self.scratch.lock().unwrap_or_else(|p| p.into_inner()) = Some(gpu.alloc(4 * m * n)?);
        self.matmul_fp8(gpu, x.ptr(), ones.ptr(), w.ptr(), ones.ptr(), y.ptr(), m, n, k)?;
        gpu.synchronize()?;
        let fallback = *self.outer_vec.lock().unwrap_or_else(|p| p.into_inner()) == Some(false);
        *self.scratch.lock().unwrap_or_else(|p| p.into_inner()) =
            if fallback { Some(gpu.alloc(4 * max_elems)?) } else { None };
        Ok(())
    }

    /// `y[m, n] = (x[m, k] . w[n, k]^T) * x_scale[m] * w_scale[n]`, bf16 out: x and w E4M3 codes,
    /// the scales f32 device arrays (cuBLASLt FP8 with outer-vector scaling).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_fp8(
        &self,
        gpu: &Gpu,
        x: u64,
        x_scale: u64,
        w: u64,
        w_scale: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let mut outer = self.outer_vec.lock().unwrap_or_else(|p| p.into_inner());
        if *outer != Some(false) {
            match self.run(gpu, x, w, y, m, n, k, GemmOut::Bf16, GemmIn::Fp8, Some((w_scale, x_scale))) {
                Ok(()) => {
                    *outer = Some(true);
                    return Ok(());
                }
                Err(e) if outer.is_none() => {
                    tracing::info!("cuBLASLt FP8 without outer-vector scales ({e}); scaling after the product");
                    *outer = Some(false);
                }
                Err(e) => return Err(e),
            }
        }
        drop(outer);
        if !n.is_multiple_of(4) {
            return Err(crate::error::shape("matmul_fp8", format!("n = {n} (a multiple of 4)")));
        }
        // Never reallocated here: CUDA graphs captured earlier keep its address.
        let scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let acc = match scratch.as_ref() {
            Some(s) if s.bytes() >= 4 * m * n => s.ptr(),
            _ => {
                return Err(crate::error::shape(
                    "matmul_fp8",
                    format!("a {m}x{n} product needs {} bytes of scratch: reserve_fp8 first", 4 * m * n),
                ));
            }
        };
        self.run(gpu, x, w, acc, m, n, k, GemmOut::F32, GemmIn::Fp8Unscaled, None)?;
        let blocks = (m * n / 4).div_ceil(256).min(gpu.sm_count() as usize * 16).max(1) as u32;
        let (mi, ni) = (m as i32, n as i32);
        gpu.launch(
            "flint_scale_output",
            (blocks, 1, 1),
            256,
            0,
            &mut [
                crate::gpu::arg(&acc),
                crate::gpu::arg(&x_scale),
                crate::gpu::arg(&w_scale),
                crate::gpu::arg(&y),
                crate::gpu::arg(&mi),
                crate::gpu::arg(&ni),
            ],
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        gpu: &Gpu,
        x: u64,
        w: u64,
        y: u64,
        m: usize,
        n: usize,
        k: usize,
        out: GemmOut,
        input: GemmIn,
        scales: Option<(u64, u64)>,
    ) -> Result<()> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let key = (m, n, k, out, input);
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(m, n, k, out, input)?),
        };
        if let Some((a_scale, b_scale)) = scales {
            for (attr, ptr) in [
                (cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, a_scale),
                (cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, b_scale),
            ] {
                // SAFETY: valid descriptor; the pointer value is copied by the call.
                unsafe {
                    lt::set_matmul_desc_attribute(
                        plan.desc,
                        attr,
                        &ptr as *const u64 as *const c_void,
                        std::mem::size_of::<u64>(),
                    )?;
                }
            }
        }
        let alpha = 1.0f32;
        let beta = 0.0f32;
        // SAFETY: the pointers address buffers of the shapes the plan describes (callers check);
        // the workspace is ours; the scalars live through the call.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                plan.a,
                x as *const c_void,
                plan.b,
                y as *const c_void,
                plan.c,
                y as *mut c_void,
                plan.c,
                &plan.algo,
                self.workspace.ptr() as *mut c_void,
                WORKSPACE,
                gpu.stream().cu_stream() as *mut _,
            )?;
        }
        Ok(())
    }
}

impl Drop for Gemm {
    fn drop(&mut self) {
        self.plans.lock().unwrap_or_else(|p| p.into_inner()).clear();
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
