// Entry points of the small-batch GEMV (include/flint/gemv.cuh): one per batch size 1..8.
#include "flint/gemv.cuh"

using namespace flint;

#define FLINT_GEMV(M)                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * kGemvWarps) flint_gemv_##M(                              \
        const bf16* x, const bf16* w, void* y, int n, int k, int epilogue) {                                   \
        pdl_wait();                                                                                            \
        gemv<M>(x, w, y, n, k, static_cast<GemvEpilogue>(epilogue));                                           \
    }

FLINT_GEMV(1)
FLINT_GEMV(2)
FLINT_GEMV(3)
FLINT_GEMV(4)
FLINT_GEMV(5)
FLINT_GEMV(6)
FLINT_GEMV(7)
FLINT_GEMV(8)
