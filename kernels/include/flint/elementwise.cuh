// Row-wise kernels of a decoder layer: embedding gather, RMSNorm (with the residual add fused),
// RoPE fused with the KV-cache write, SwiGLU on a fused gate/up output, random initialisation.
#pragma once

#include "e4m3.cuh"

namespace flint {

// out[t, :] = table[tokens[t] - first, :] for ids in [first, first + vocab), zeros for others
// (the rows another tensor-parallel rank holds; padding rows of a graph bucket are id 0, and real
// ids are checked on the host). One block per token; hidden % 8 == 0.
__device__ __forceinline__ void embedding_row(const uint32_t* tokens, const bf16* table, bf16* out, int hidden,
                                              int vocab, int first) {
    const int t = blockIdx.x;
    const uint32_t id = tokens[t] - (uint32_t)first;  // wraps for ids below `first`
    Bf16x8* dst = reinterpret_cast<Bf16x8*>(out + (size_t)t * hidden);
    if (id >= (uint32_t)vocab) {
        const Bf16x8 zero{};
        for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) dst[i] = zero;
        return;
    }
    const Bf16x8* src = reinterpret_cast<const Bf16x8*>(table + (size_t)id * hidden);
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) dst[i] = src[i];
}

// out[r, v] = in[v / part, r, v % part] for v < vocab: logits all-gathered from `world` ranks
// (each `rows x part`, the last rank's tail padding) back to rows of the whole vocabulary.
__device__ __forceinline__ void unshard_rows_all(const float* in, float* out, int rows, int part, int vocab) {
    const size_t total = (size_t)rows * vocab;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const int r = (int)(i / vocab), v = (int)(i % vocab);
        const int rank = v / part, col = v % part;
        out[i] = in[((size_t)rank * rows + r) * part + col];
    }
}

// If `add` is given: residual[t] += add[t] (rounded to bf16, as a bf16 model does), then
// out[t] = bf16(weight * bf16(residual[t] * rsqrt(mean(residual[t]^2) + eps))). One block per row.
__device__ __forceinline__ void add_rms_norm_row(bf16* residual, const bf16* add, const float* weight, bf16* out,
                                                 int hidden, float eps) {
    __shared__ float scratch[32];
    const size_t row = (size_t)blockIdx.x * hidden;
    Bf16x8* res = reinterpret_cast<Bf16x8*>(residual + row);
    const Bf16x8* addv = reinterpret_cast<const Bf16x8*>(add + row);
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
        float v[8];
        if (add != nullptr) {
            float a[8];
            unpack(addv[i], a);
            residual_add8(res[i], a, v, ss);
        } else {
            unpack(res[i], v);
#pragma unroll
            for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
        }
    }
    const float r = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    Bf16x8* o = reinterpret_cast<Bf16x8*>(out + row);
    for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) {
        float v[8];
        unpack(res[i], v);
        rms_scale8(v, weight + i * 8, r);
        o[i] = pack(v);
    }
}

// qkv: [n, (n_heads + 2 n_kv) * head_dim], the fused projection's output. Adds the bias if given,
// turns q (in place) and k by RoPE (rotate-half) at positions[t], and writes k and v into the
// paged caches [n_blocks, block_size, n_kv, head_dim] at slot slots[t] (skipped when the slot is
// 0xffffffff: padding rows). Grid (n, n_heads + n_kv + 1): block y < n_heads + n_kv turns one
// head; the last y copies v.
__device__ __forceinline__ void rope_kv_write_head(bf16* qkv, const bf16* bias, const uint32_t* positions,
                                                   const float* inv_freq, const uint32_t* slots, bf16* k_cache,
                                                   bf16* v_cache, int n_heads, int n_kv, int head_dim) {
    const int t = blockIdx.x, head = blockIdx.y;
    const int width = (n_heads + 2 * n_kv) * head_dim;
    bf16* row = qkv + (size_t)t * width;
    const uint32_t slot = slots[t];
    const int half = head_dim / 2;
    if (head == n_heads + n_kv) {
        if (slot == 0xffffffffu) return;
        const int v_off = (n_heads + n_kv) * head_dim;
        for (int i = threadIdx.x; i < n_kv * head_dim; i += blockDim.x) {
            float v = __bfloat162float(row[v_off + i]);
            if (bias != nullptr) v += __bfloat162float(bias[v_off + i]);
            v_cache[(size_t)slot * n_kv * head_dim + i] = __float2bfloat16(v);
        }
        return;
    }
    if (head >= n_heads && slot == 0xffffffffu) return;
    const float pos = (float)positions[t];
    for (int p = threadIdx.x; p < half; p += blockDim.x) {
        bf16 y0, y1;
        rope_pair(row, bias, pos, inv_freq, head, head_dim, p, y0, y1);
        if (head < n_heads) {
            row[head * head_dim + p] = y0;
            row[head * head_dim + p + half] = y1;
        } else {
            const size_t base = ((size_t)slot * n_kv + (head - n_heads)) * head_dim;
            k_cache[base + p] = y0;
            k_cache[base + p + half] = y1;
        }
    }
}

// rope_kv_write_head into an FP8 cache: grid (n, n_heads + 2 n_kv), one head per block (query
// heads, then key heads, then value heads). A key or value head of token t, rounded to bf16 as
// the BF16 cache holds it, is stored as E4M3 codes at row slot * n_kv + head of its cache with
// one scale per row (amax / 448). head_dim <= kMaxHeadDim, even.
constexpr int kMaxHeadDim = 256;
__device__ __forceinline__ void rope_kv_write_fp8_head(bf16* qkv, const bf16* bias, const uint32_t* positions,
                                                       const float* inv_freq, const uint32_t* slots,
                                                       uint8_t* k_cache, uint8_t* v_cache, float* k_scales,
                                                       float* v_scales, int n_heads, int n_kv, int head_dim) {
    __shared__ float vals[kMaxHeadDim];
    __shared__ float scratch[32];
    const int t = blockIdx.x, head = blockIdx.y;
    const int width = (n_heads + 2 * n_kv) * head_dim;
    bf16* row = qkv + (size_t)t * width;
    const uint32_t slot = slots[t];
    const int half = head_dim / 2;
    const float pos = (float)positions[t];
    if (head < n_heads) {
        for (int p = threadIdx.x; p < half; p += blockDim.x)
            rope_pair(row, bias, pos, inv_freq, head, head_dim, p, row[head * head_dim + p],
                      row[head * head_dim + p + half]);
        return;
    }
    if (slot == 0xffffffffu) return;
    const bool key = head < n_heads + n_kv;
    const int kvh = head - n_heads - (key ? 0 : n_kv);
    float m = 0.f;
    if (key) {
        for (int p = threadIdx.x; p < half; p += blockDim.x) {
            bf16 y0, y1;
            rope_pair(row, bias, pos, inv_freq, head, head_dim, p, y0, y1);
            vals[p] = __bfloat162float(y0);
            vals[p + half] = __bfloat162float(y1);
            m = fmaxf(m, fmaxf(fabsf(vals[p]), fabsf(vals[p + half])));
        }
    } else {
        for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
            const int c = head * head_dim + i;
            float v = __bfloat162float(row[c]);
            if (bias != nullptr) v += __bfloat162float(bias[c]);
            vals[i] = __bfloat162float(__float2bfloat16(v));
            m = fmaxf(m, fabsf(vals[i]));
        }
    }
    const float scale = fp8_scale(block_max(m, scratch));  // block_max synchronises: vals are in
    const size_t r = (size_t)slot * n_kv + kvh;
    uint8_t* dst = (key ? k_cache : v_cache) + r * head_dim;
    for (int i = 2 * threadIdx.x; i < head_dim; i += 2 * blockDim.x)
        *reinterpret_cast<uint16_t*>(dst + i) = to_e4m3x2(vals[i] / scale, vals[i + 1] / scale);
    if (threadIdx.x == 0) (key ? k_scales : v_scales)[r] = scale;
}

// gate_up: [n, 2 ff] (gate then up); out[t, j] = silu(gate) * up. Grid-stride over n * ff / 8.
__device__ __forceinline__ void silu_mul_all(const bf16* gate_up, bf16* out, int n, int ff) {
    const size_t total = (size_t)n * ff / 8;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t t = i / (ff / 8), c = i % (ff / 8);
        const Bf16x8* g = reinterpret_cast<const Bf16x8*>(gate_up + t * 2 * ff) + c;
        const Bf16x8* u = reinterpret_cast<const Bf16x8*>(gate_up + t * 2 * ff + ff) + c;
        float gv[8], uv[8], o[8];
        unpack(*g, gv);
        unpack(*u, uv);
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = gv[j] / (1.f + __expf(-gv[j])) * uv[j];
        reinterpret_cast<Bf16x8*>(out + t * ff)[c] = pack(o);
    }
}

// out[i] = bf16(mean + std * sqrt(3) * (2u - 1)), u uniform from (seed, i): random weights with a
// given standard deviation, generated on the device.
__device__ __forceinline__ void fill_uniform_all(bf16* out, size_t n, uint64_t seed, float mean, float std) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float u = uniform01(mix64(seed ^ mix64(i)));
        out[i] = __float2bfloat16(mean + std * 1.7320508f * (2.f * u - 1.f));
    }
}

}  // namespace flint
