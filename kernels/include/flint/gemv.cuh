// Small-batch GEMV for decode: y[m, n] = x[m, :] . W[n, :] for m <= 8 tokens, reading each weight
// once with 16-byte streaming loads, several in flight per lane. One warp per output row.
#pragma once

#include "common.cuh"

namespace flint {

enum class GemvEpilogue : int {
    Bf16 = 0,    // y bf16 [m, n]
    SwiGlu = 1,  // W is [gate; up] (2n rows); y[m, j] = silu(gate_j) * up_j, bf16 [m, n]
    F32 = 2,     // y f32 [m, n] (logits)
};

constexpr int kGemvWarps = 8;
constexpr int kGemvRows = 2;    // weight rows per warp: each activation load serves both
constexpr int kGemvSplitK = 4;  // warps sharing a row pair, each taking every fourth K chunk
constexpr int kGemvPairsPerBlock = kGemvWarps / kGemvSplitK;

// Partial dot products of `M` activation rows with two weight rows (`w0`, `w1`) over the K
// chunks `part`, `part + kGemvSplitK`, ... of U * 256 elements, per lane (U 16-byte loads of
// each row in flight per lane; the launcher picks U so that the chunks spread evenly over the
// kGemvSplitK warps).
template <int M, int U>
__device__ __forceinline__ void gemv_rows_dot(const bf16* __restrict__ x, const bf16* __restrict__ w0,
                                              const bf16* __restrict__ w1, int k, int part,
                                              float (&acc)[M][kGemvRows]) {
    const int lane = threadIdx.x & 31;
    constexpr int kStep = 32 * 8;
    constexpr int kChunk = U * kStep;
    const bf16* w[kGemvRows] = {w0, w1};
    const int full = k / kChunk;
    for (int c = part; c < full; c += kGemvSplitK) {
        const int base = c * kChunk;
        Bf16x8 wv[kGemvRows][U];
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
            for (int u = 0; u < U; ++u) wv[r][u] = load_stream(w[r] + base + u * kStep + lane * 8);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float wf[kGemvRows][8];
#pragma unroll
            for (int r = 0; r < kGemvRows; ++r) unpack(wv[r][u], wf[r]);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float xf[8];
                unpack(*reinterpret_cast<const Bf16x8*>(x + (size_t)m * k + base + u * kStep + lane * 8), xf);
#pragma unroll
                for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[m][r] = fmaf(wf[r][j], xf[j], acc[m][r]);
            }
        }
    }
    // The tail past the last full chunk, split by 256-element steps.
    for (int off = full * kChunk + (part * 32 + lane) * 8; off < k; off += kGemvSplitK * kStep) {
        float wf[kGemvRows][8];
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) unpack(load_stream(w[r] + off), wf[r]);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float xf[8];
            unpack(*reinterpret_cast<const Bf16x8*>(x + (size_t)m * k + off), xf);
#pragma unroll
            for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[m][r] = fmaf(wf[r][j], xf[j], acc[m][r]);
        }
    }
}

// Grid: ceil(pairs / kGemvPairsPerBlock) blocks of 32 * kGemvWarps threads, where a pair is two
// plain rows (pairs = ceil(n / 2)) or, for SwiGlu, gate row j with up row n + j (pairs = n).
// kGemvSplitK warps share a pair and add their partial sums through shared memory. k % 8 == 0.
// l2_prefetch: the launch may ask its first blocks' weights into L2 before the wait.
template <int M, int U>
__device__ __forceinline__ void gemv(const bf16* __restrict__ x, const bf16* __restrict__ w, void* y, int n, int k,
                                     GemvEpilogue epilogue, bool l2_prefetch) {
    __shared__ float partial[kGemvWarps][M][kGemvRows];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int pair = blockIdx.x * kGemvPairsPerBlock + warp / kGemvSplitK;
    const int part = warp % kGemvSplitK;
    const bool swiglu = epilogue == GemvEpilogue::SwiGlu;
    const int n_pairs = swiglu ? n : (n + 1) / 2;
    float acc[M][kGemvRows];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) acc[m][r] = 0.f;
    int row0 = 0, row1 = 0;
    if (pair < n_pairs) {
        if (swiglu) {
            row0 = pair;
            row1 = pair + n;
        } else {
            row0 = 2 * pair;
            row1 = min(row0 + 1, n - 1);  // a lone last row reads itself twice and writes once
        }
    }
    // With early launch and l2_prefetch the block's weights go to L2 (within the budget) before
    // the wait.
    const bool early = flint_early_launch != 0;
    if (!early) pdl_wait();
    if (pair < n_pairs && part == 0 && lane == 0 &&
        prefetches_l2(l2_prefetch, blockIdx.x, (size_t)kGemvPairsPerBlock * kGemvRows * k * sizeof(bf16))) {
        prefetch_l2(w + (size_t)row0 * k, k * sizeof(bf16));
        prefetch_l2(w + (size_t)row1 * k, k * sizeof(bf16));
    }
    if (early) pdl_wait();
    if (pair < n_pairs) gemv_rows_dot<M, U>(x, w + (size_t)row0 * k, w + (size_t)row1 * k, k, part, acc);
    // This block's weights are read: the next kernel may start launching.
    pdl_launch_next();
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) {
            const float v = warp_sum(acc[m][r]);
            if (lane == 0) partial[warp][m][r] = v;
        }
    __syncthreads();
    if (part != 0 || pair >= n_pairs || lane >= M) return;
    // Lane m of the pair's first warp finishes token m.
    float sum[kGemvRows];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
        sum[r] = 0.f;
#pragma unroll
        for (int p = 0; p < kGemvSplitK; ++p) sum[r] += partial[warp + p][lane][r];
    }
    const int m = lane;
    if (swiglu) {
        // The bf16 model rounds each projection before the activation.
        const float gb = __bfloat162float(__float2bfloat16(sum[0]));
        const float ub = __bfloat162float(__float2bfloat16(sum[1]));
        static_cast<bf16*>(y)[(size_t)m * n + row0] = __float2bfloat16(gb / (1.f + __expf(-gb)) * ub);
        return;
    }
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
        const int row = row0 + r;
        if (row >= n) break;
        if (epilogue == GemvEpilogue::F32)
            static_cast<float*>(y)[(size_t)m * n + row] = sum[r];
        else
            static_cast<bf16*>(y)[(size_t)m * n + row] = __float2bfloat16(sum[r]);
    }
}

}  // namespace flint
