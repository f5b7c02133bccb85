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

// Dot products of `M` activation rows with one weight row, accumulated per lane.
template <int M>
__device__ __forceinline__ void gemv_row_dot(const bf16* __restrict__ x, const bf16* __restrict__ w, int k,
                                             float (&acc)[M]) {
    const int lane = threadIdx.x & 31;
    constexpr int kStep = 32 * 8;
    int base = 0;
    for (; base + kGemvUnroll * kStep <= k; base += kGemvUnroll * kStep) {
        Bf16x8 wv[kGemvUnroll];
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) wv[u] = load_stream(w + base + u * kStep + lane * 8);
#pragma unroll
        for (int u = 0; u < kGemvUnroll; ++u) {
            float wf[8];
            unpack(wv[u], wf);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float xf[8];
                unpack(*reinterpret_cast<const Bf16x8*>(x + (size_t)m * k + base + u * kStep + lane * 8), xf);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[m] = fmaf(wf[j], xf[j], acc[m]);
            }
        }
    }
    for (int off = base + lane * 8; off < k; off += kStep) {
        float wf[8];
        unpack(load_stream(w + off), wf);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float xf[8];
            unpack(*reinterpret_cast<const Bf16x8*>(x + (size_t)m * k + off), xf);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m] = fmaf(wf[j], xf[j], acc[m]);
        }
    }
}

// Grid: ceil(n / kGemvWarps) blocks of 32 * kGemvWarps threads. k % 8 == 0.
template <int M>
__device__ __forceinline__ void gemv(const bf16* __restrict__ x, const bf16* __restrict__ w, void* y, int n, int k,
                                     GemvEpilogue epilogue) {
    const int row = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
    if (row >= n) return;
    const int lane = threadIdx.x & 31;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    gemv_row_dot<M>(x, w + (size_t)row * k, k, acc);
    if (epilogue == GemvEpilogue::SwiGlu) {
        float up[M];
#pragma unroll
        for (int m = 0; m < M; ++m) up[m] = 0.f;
        gemv_row_dot<M>(x, w + (size_t)(row + n) * k, k, up);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float g = warp_sum(acc[m]);
            const float u = warp_sum(up[m]);
            if (lane == 0) {
                // The bf16 model rounds each projection before the activation.
                const float gb = __bfloat162float(__float2bfloat16(g));
                const float ub = __bfloat162float(__float2bfloat16(u));
                static_cast<bf16*>(y)[(size_t)m * n + row] = __float2bfloat16(gb / (1.f + __expf(-gb)) * ub);
            }
        }
        return;
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float s = warp_sum(acc[m]);
        if (lane == 0) {
            if (epilogue == GemvEpilogue::F32)
                static_cast<float*>(y)[(size_t)m * n + row] = s;
            else
                static_cast<bf16*>(y)[(size_t)m * n + row] = __float2bfloat16(s);
        }
    }
}

}  // namespace flint
