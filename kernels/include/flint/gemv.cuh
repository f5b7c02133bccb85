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
constexpr int kGemvUnroll = 4;
constexpr int kGemvRows = 2;  // weight rows per warp: each activation load serves both

// Dot products of `M` activation rows with `kGemvRows` weight rows (`w0`, `w1`), per lane.
template <int M>
__device__ __forceinline__ void gemv_rows_dot(const bf16* __restrict__ x, const bf16* __restrict__ w0,
                                              const bf16* __restrict__ w1, int k, float (&acc)[M][kGemvRows]) {
    const int lane = threadIdx.x & 31;
    constexpr int kStep = 32 * 8;
    const bf16* w[kGemvRows] = {w0, w1};
    int base = 0;
    for (; base + kGemvUnroll * kStep <= k; base += kGemvUnroll * kStep) {
        Bf16x8 wv[kGemvRows][kGemvUnroll];
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
            for (int u = 0; u < kGemvUnroll; ++u) wv[r][u] = load_stream(w[r] + base + u * kStep + lane * 8);
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
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
    for (int off = base + lane * 8; off < k; off += kStep) {
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

// Grid: ceil(n / (kGemvWarps * kGemvRows)) blocks of 32 * kGemvWarps threads (SwiGlu:
// ceil(n / kGemvWarps), a warp taking gate row j and up row n + j). k % 8 == 0.
template <int M>
__device__ __forceinline__ void gemv(const bf16* __restrict__ x, const bf16* __restrict__ w, void* y, int n, int k,
                                     GemvEpilogue epilogue) {
    const int warp = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    float acc[M][kGemvRows];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) acc[m][r] = 0.f;
    if (epilogue == GemvEpilogue::SwiGlu) {
        const int row = warp;
        if (row >= n) return;
        gemv_rows_dot<M>(x, w + (size_t)row * k, w + (size_t)(row + n) * k, k, acc);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float g = warp_sum(acc[m][0]);
            const float u = warp_sum(acc[m][1]);
            if (lane == 0) {
                // The bf16 model rounds each projection before the activation.
                const float gb = __bfloat162float(__float2bfloat16(g));
                const float ub = __bfloat162float(__float2bfloat16(u));
                static_cast<bf16*>(y)[(size_t)m * n + row] = __float2bfloat16(gb / (1.f + __expf(-gb)) * ub);
            }
        }
        return;
    }
    const int row0 = warp * kGemvRows;
    if (row0 >= n) return;
    // A lone last row reads itself twice and writes once.
    const int row1 = min(row0 + 1, n - 1);
    gemv_rows_dot<M>(x, w + (size_t)row0 * k, w + (size_t)row1 * k, k, acc);
#pragma unroll
    for (int m = 0; m < M; ++m) {
#pragma unroll
        for (int r = 0; r < kGemvRows; ++r) {
            const float s = warp_sum(acc[m][r]);
            const int row = row0 + r;
            if (lane == 0 && row < n) {
                if (epilogue == GemvEpilogue::F32)
                    static_cast<float*>(y)[(size_t)m * n + row] = s;
                else
                    static_cast<bf16*>(y)[(size_t)m * n + row] = __float2bfloat16(s);
            }
        }
    }
}

}  // namespace flint
