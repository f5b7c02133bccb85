// Shared helpers for Flint's kernels: bf16 vectors, warp/block reductions, PDL hooks.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

// Launch tuning, one copy per module, set by the host at start-up (flint-cuda's Gpu; read before
// any griddepcontrol.wait, so they must not change while kernels run).
// flint_early_launch: a latency-bound kernel of the decode chain lets the next kernel launch as
// it enters (pdl_enter), and a GEMV loads weights before it waits (they never depend on the
// previous kernel); 0 keeps every kernel waiting first and launching the next at its end.
__constant__ int flint_early_launch = 1;
// flint_l2_prefetch_budget: bytes of its weights a GEMV launched with its l2_prefetch argument
// set (one that follows a latency-bound kernel, while DRAM idles) asks into L2 before it waits,
// from its first blocks (those resident first); 0 for none. Read only with flint_early_launch.
__constant__ unsigned int flint_l2_prefetch_budget = 0;

namespace flint {

using bf16 = __nv_bfloat16;

// Eight bf16 values moved as one 16-byte access.
struct alignas(16) Bf16x8 {
    __nv_bfloat162 h[4];
};

__device__ __forceinline__ void unpack(const Bf16x8& v, float (&out)[8]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 f = __bfloat1622float2(v.h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ Bf16x8 pack(const float (&in)[8]) {
    Bf16x8 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) v.h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    return v;
}

// v rounded to the nearest bf16 (ties to even), as a float.
__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16(v)); }

// Loads that bypass L1 allocation: weights are read once per step.
__device__ __forceinline__ Bf16x8 load_stream(const bf16* p) {
    int4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return *reinterpret_cast<Bf16x8*>(&r);
}

// 16-byte asynchronous copy global -> shared (completes at cp_async_wait_all).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_all;" ::: "memory");
}

// The residual pass of a fused residual add + RMSNorm, for 8 values: v = res + a rounded to bf16
// (as a bf16 model does) and stored back into `res`; ss accumulates v^2.
__device__ __forceinline__ void residual_add8(Bf16x8& res, const float (&a)[8], float (&v)[8], float& ss) {
    unpack(res, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] += a[j];
    const Bf16x8 packed = pack(v);
    res = packed;
    unpack(packed, v);
#pragma unroll
    for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
}

// The output pass of RMSNorm for 8 values of the row: v = weight * bf16(v * r), r the inverse
// root mean square (the caller rounds v to its output type).
__device__ __forceinline__ void rms_scale8(float (&v)[8], const float* weight8, float r) {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = weight8[j] * __bfloat162float(__float2bfloat16(v[j] * r));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds at least 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < n_warps ? scratch[lane] : 0.f;
    return warp_sum(t);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < n_warps ? scratch[lane] : -INFINITY;
    return warp_max(t);
}

// Pair p of head `head` of a fused QKV row, bias added (rounded to bf16 as the bf16 model has
// it) and rotated to position `pos`: (y0, y1) for dims p and p + head_dim / 2.
__device__ __forceinline__ void rope_pair(const bf16* row, const bf16* bias, float pos, const float* inv_freq,
                                          int head, int head_dim, int p, bf16& y0, bf16& y1) {
    const int a = head * head_dim + p, b = a + head_dim / 2;
    float x0 = __bfloat162float(row[a]), x1 = __bfloat162float(row[b]);
    if (bias != nullptr) {
        x0 = __bfloat162float(__float2bfloat16(x0 + __bfloat162float(bias[a])));
        x1 = __bfloat162float(__float2bfloat16(x1 + __bfloat162float(bias[b])));
    }
    float s, c;
    sincosf(pos * inv_freq[p], &s, &c);
    y0 = __float2bfloat16(x0 * c - x1 * s);
    y1 = __float2bfloat16(x1 * c + x0 * s);
}

// Programmatic dependent launch: wait for the previous kernel's results before touching them,
// and let the next kernel start its prologue early. Both are no-ops without the launch attribute.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

// The entry of a latency-bound kernel of the decode chain: with early launch, the next kernel
// launches now and starts streaming its weights while this one waits and runs. Safe whatever
// the position of the trigger: every kernel reads and writes activations only after its own
// wait, which returns once the previous kernel (and so, by induction, every earlier one) has
// completed; before it, a kernel only reads weights.
__device__ __forceinline__ void pdl_enter() {
    if (flint_early_launch != 0) pdl_launch_next();
    pdl_wait();
}

// Asks the L2 for [p, p + bytes) without waiting (a TMA bulk prefetch); p 16-byte aligned,
// bytes a multiple of 16.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// Asks L1 for the line holding p without waiting.
__device__ __forceinline__ void prefetch_l1(const void* p) {
    asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

// Whether block `block` of a GEMV whose blocks each read `block_bytes` of weights prefetches
// them into L2 before its wait: with `asked` (the launch's l2_prefetch), the first blocks, up to
// the budget.
__device__ __forceinline__ bool prefetches_l2(bool asked, int block, size_t block_bytes) {
    return asked && flint_early_launch != 0 && (size_t)block * block_bytes < (size_t)flint_l2_prefetch_budget;
}

// splitmix64: a counter-based generator for seeded sampling and random weights.
__device__ __forceinline__ uint64_t mix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Uniform in [0, 1) from 24 random bits.
__device__ __forceinline__ float uniform01(uint64_t bits) {
    return (float)(bits >> 40) * (1.0f / 16777216.0f);
}

}  // namespace flint
