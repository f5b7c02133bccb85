// Entry points of the FP8 kernels (include/flint/fp8.cuh).
#include "flint/fp8.cuh"

using namespace flint;

extern "C" __global__ void flint_quantize_rows(const bf16* x, uint8_t* out, float* scales, int cols) {
    pdl_enter();
    quantize_row(x, out, scales, cols);
}

extern "C" __global__ void flint_add_rms_norm_fp8(bf16* residual, const bf16* add, const float* weight,
                                                  uint8_t* out, float* scales, int hidden, float eps) {
    // The row in registers where it fits (2, 4 or 8 vectors of 8 per thread), else three passes.
    // (Launched with kNormThreads per block.)
    if (hidden <= 16 * kNormThreads) {
        add_rms_norm_fp8_cached<2>(residual, add, weight, out, scales, hidden, eps);
    } else if (hidden <= 32 * kNormThreads) {
        add_rms_norm_fp8_cached<4>(residual, add, weight, out, scales, hidden, eps);
    } else if (hidden <= 64 * kNormThreads) {
        add_rms_norm_fp8_cached<8>(residual, add, weight, out, scales, hidden, eps);
    } else {
        pdl_enter();
        add_rms_norm_fp8_row(residual, add, weight, out, scales, hidden, eps);
    }
}

extern "C" __global__ void flint_silu_mul_fp8(const bf16* gate_up, uint8_t* out, float* scales, int ff) {
    pdl_enter();
    silu_mul_fp8_row(gate_up, out, scales, ff);
}

// The FP8 GEMV per (warps per tile S, 64-element steps per chunk U, prefetch P); the launcher
// picks one per shape (ops::Fp8GemvConfig). `flint_gemv_fp8q_*` take the bf16 activation and
// its amax slots and quantize it themselves (kInBf16 in fp8.cuh), `flint_gemv_fp8n_*` the residual
// of a split norm (kInNormed). `*_norm_*` end with the add + RMSNorm + quantize of their output
// in the last block (kOutNormTail), `*_split_*` with the first half of the split norm
// (kOutSplitNorm); both are compiled only for the variants of the O and down projections, since
// their registers would cost the others occupancy. Each waits for the previous kernel itself,
// after loading its first weights.
// MIN: the blocks an SM must hold (the register budget), 0 for the compiler's choice.
#define FLINT_GEMV_FP8_MIN(S, U, P, IN, OUT, NAME, MIN)                                                             \
    extern "C" __global__ void __launch_bounds__(32 * f8_block_warps(S), MIN) NAME##_s##S##_u##U##_p##P(           \
        const void* x, const float* x_aux, const uint8_t* w, const float* w_scale, bf16* y, int m, int n, int k, \
        int epilogue, float* amax_out, float* amax_clear, int l2_prefetch, Fp8NormTail tail,                  \
        Fp8SplitNorm split) {                                                                                  \
        gemv_fp8<S, U, P, IN, OUT>(x, x_aux, w, w_scale, y, m, n, k, static_cast<Fp8Epilogue>(epilogue),       \
                                   amax_out, amax_clear, l2_prefetch != 0, tail, split);                      \
    }
#define FLINT_GEMV_FP8(S, U, P, IN, OUT, NAME) FLINT_GEMV_FP8_MIN(S, U, P, IN, OUT, NAME, 0)

#define FLINT_GEMV_FP8_P(S, U)                                                    \
    FLINT_GEMV_FP8(S, U, 0, kInCodes, kOutPlain, flint_gemv_fp8)                  \
    FLINT_GEMV_FP8(S, U, 1, kInCodes, kOutPlain, flint_gemv_fp8)                  \
    FLINT_GEMV_FP8(S, U, 0, kInBf16, kOutPlain, flint_gemv_fp8q)                  \
    FLINT_GEMV_FP8(S, U, 1, kInBf16, kOutPlain, flint_gemv_fp8q)
#define FLINT_GEMV_FP8_U(S) FLINT_GEMV_FP8_P(S, 2) FLINT_GEMV_FP8_P(S, 4)
#define FLINT_GEMV_FP8_NORM(S, U)                                               \
    FLINT_GEMV_FP8(S, U, 1, kInCodes, kOutNormTail, flint_gemv_fp8_norm)        \
    FLINT_GEMV_FP8(S, U, 1, kInBf16, kOutNormTail, flint_gemv_fp8q_norm)        \
    FLINT_GEMV_FP8_MIN(S, U, 1, kInCodes, kOutSplitNorm, flint_gemv_fp8_split, f8_min_blocks(S)) \
    FLINT_GEMV_FP8_MIN(S, U, 1, kInBf16, kOutSplitNorm, flint_gemv_fp8q_split, f8_min_blocks(S)) \
    FLINT_GEMV_FP8_MIN(S, U, 1, kInNormed, kOutPlain, flint_gemv_fp8n, f8_min_blocks(S))

FLINT_GEMV_FP8_U(4)
FLINT_GEMV_FP8_U(8)
// Sixteen and thirty-two warps per tile (one tile per block): for the narrow projections, whose
// n / 16 tiles are too few to keep every SM's loads in flight with eight.
FLINT_GEMV_FP8_P(16, 1)
FLINT_GEMV_FP8_P(16, 2)
FLINT_GEMV_FP8_P(32, 1)
FLINT_GEMV_FP8_P(32, 2)
// With a norm after them (tail or split), and the split norm's consumers: the variants
// Fp8GemvConfig::for_shape picks (up to 320 tiles, and above).
FLINT_GEMV_FP8_NORM(16, 1)
FLINT_GEMV_FP8_NORM(8, 2)

// y[r, c] = bf16(acc[r, c] * row_scale[r] * col_scale[c]): the scales of an FP8 product that
// cuBLASLt ran unscaled. Grid-stride over m * n / 4; n % 4 == 0.
extern "C" __global__ void flint_scale_output(const float* acc, const float* row_scale, const float* col_scale, bf16* y,
                                              int m, int n) {
    pdl_wait();
    const size_t total = (size_t)m * n / 4;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i * 4 / n, c = i * 4 % n;
        const float4 a = reinterpret_cast<const float4*>(acc)[i];
        const float s = row_scale[r];
        __nv_bfloat162 lo = __floats2bfloat162_rn(a.x * s * col_scale[c], a.y * s * col_scale[c + 1]);
        __nv_bfloat162 hi = __floats2bfloat162_rn(a.z * s * col_scale[c + 2], a.w * s * col_scale[c + 3]);
        reinterpret_cast<__nv_bfloat162*>(y + r * n + c)[0] = lo;
        reinterpret_cast<__nv_bfloat162*>(y + r * n + c)[1] = hi;
    }
}
