// Entry points of the small-batch GEMV (include/flint/gemv.cuh): one per batch size 1..8 and
// loads in flight per lane (1, 2 or 4).
#include "flint/gemv.cuh"

using namespace flint;

#define FLINT_GEMV(M, U)                                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * kGemvWarps) flint_gemv_##M##_u##U(                       \
        const bf16* x, const bf16* w, void* y, int n, int k, int epilogue, int l2_prefetch) {                  \
        gemv<M, U>(x, w, y, n, k, static_cast<GemvEpilogue>(epilogue), l2_prefetch != 0);                       \
    }

#define FLINT_GEMV_ALL_U(M) FLINT_GEMV(M, 1) FLINT_GEMV(M, 2) FLINT_GEMV(M, 4)

FLINT_GEMV_ALL_U(1)
FLINT_GEMV_ALL_U(2)
FLINT_GEMV_ALL_U(3)
FLINT_GEMV_ALL_U(4)
FLINT_GEMV_ALL_U(5)
FLINT_GEMV_ALL_U(6)
FLINT_GEMV_ALL_U(7)
FLINT_GEMV_ALL_U(8)
