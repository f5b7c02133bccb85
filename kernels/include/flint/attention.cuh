// Causal grouped-query attention over a paged KV cache [n_blocks, block_size, n_kv, head_dim]:
// bf16 values, or (F8) E4M3 codes with one f32 scale per row (position and KV head,
// [n_blocks, block_size, n_kv]) as rope_kv_write_fp8_head writes them.
//
// Decode ("flash decoding"): one query token per (token, kv head, split) block; the split's keys
// are read once for every query head of the group; the split that finishes last merges the
// partial softmax states of all of them (no second kernel). Prefill: flash-attention tiles of 64 queries x 64 keys on the tensor
// cores (WMMA, bf16 in, f32 accumulate), online softmax, one query head per block.
#pragma once

#include <mma.h>

#include "e4m3.cuh"

namespace flint {

constexpr int kMaxGroup = 8;        // query heads per KV head handled by one decode block
constexpr int kDecodeTile = 64;     // keys scored together in a decode block
constexpr int kDecodeThreads = 256;  // mirrored by DECODE_THREADS in ops.rs
constexpr int kMaxSplits = 32;      // decode splits of one (token, KV head); one per lane at merge
constexpr float kLog2e = 1.4426950408889634f;

// The cache's element: bf16, or an E4M3 code; Vec8 holds eight of them (one load).
template <bool F8>
struct KvElem {
    using T = bf16;
    using Vec8 = Bf16x8;
};
template <>
struct KvElem<true> {
    using T = uint8_t;
    using Vec8 = uint2;
};

// One 8-element vector of a cache row in a single load (16 bytes of bf16, 8 of E4M3): a plain
// struct copy of Bf16x8 compiles to four 4-byte loads.
__device__ __forceinline__ Bf16x8 load_kv_vec(const Bf16x8* p) {
    const uint4 r = __ldg(reinterpret_cast<const uint4*>(p));
    Bf16x8 v;
    memcpy(&v, &r, sizeof v);
    return v;
}
__device__ __forceinline__ uint2 load_kv_vec(const uint2* p) { return __ldg(p); }

// Row of position `pos` and KV head `kvh` in the paged cache (its data at row * head_dim, its
// scale at row).
__device__ __forceinline__ size_t kv_row(const uint32_t* table, int block_size, int pos, int n_kv, int kvh) {
    const uint32_t block = table[pos / block_size];
    const size_t slot = (size_t)block * block_size + pos % block_size;
    return slot * n_kv + kvh;
}

// An 8-element vector of a row held in shared memory.
template <class V>
__device__ __forceinline__ V load_kv_shared(const V* p) {
    V v;
    memcpy(&v, p, sizeof v);
    return v;
}

// RoPE and the KV-cache write of a decode step's new position, folded into its attention
// (attention_decode with ROPE): q is then the raw fused QKV row (bias not yet added), and the
// caches are written at row slots[t] * n_kv + kvh.
struct DecodeRope {
    const bf16* bias;
    const float* inv_freq;
    const uint32_t* slots;
    void* k_cache;
    void* v_cache;
    float* k_scales;
    float* v_scales;
};

// Key head kvh (roped to `pos`) and value head kvh of the raw QKV row `row`, with the bias,
// exactly as rope_kv_write_head / rope_kv_write_fp8_head compute them: into the cache row `r`
// and into new_k / new_v (the cache's elements) and new_scale (their FP8 scales), for the block
// to use in place of the cache's row. Every thread of the block calls it.
template <int HD, bool F8>
__device__ __forceinline__ void decode_write_new_kv(const bf16* row, const DecodeRope& rope, float pos, int n_heads,
                                                    int n_kv, int kvh, size_t r, typename KvElem<F8>::T* new_k,
                                                    typename KvElem<F8>::T* new_v, float* new_scale) {
    constexpr int kHalf = HD / 2;
    const int k_head = n_heads + kvh, v_col = (n_heads + n_kv + kvh) * HD;
    if constexpr (!F8) {
        bf16* kc = static_cast<bf16*>(rope.k_cache) + r * HD;
        bf16* vc = static_cast<bf16*>(rope.v_cache) + r * HD;
        for (int p = threadIdx.x; p < kHalf; p += blockDim.x) {
            bf16 y0, y1;
            rope_pair(row, rope.bias, pos, rope.inv_freq, k_head, HD, p, y0, y1);
            new_k[p] = kc[p] = y0;
            new_k[p + kHalf] = kc[p + kHalf] = y1;
        }
        for (int i = threadIdx.x; i < HD; i += blockDim.x) {
            float v = __bfloat162float(row[v_col + i]);
            if (rope.bias != nullptr) v += __bfloat162float(rope.bias[v_col + i]);
            new_v[i] = vc[i] = __float2bfloat16(v);
        }
    } else {
        __shared__ float vals[2][HD];
        __shared__ float scratch[32];
        float mk = 0.f, mv = 0.f;
        for (int p = threadIdx.x; p < kHalf; p += blockDim.x) {
            bf16 y0, y1;
            rope_pair(row, rope.bias, pos, rope.inv_freq, k_head, HD, p, y0, y1);
            vals[0][p] = __bfloat162float(y0);
            vals[0][p + kHalf] = __bfloat162float(y1);
            mk = fmaxf(mk, fmaxf(fabsf(vals[0][p]), fabsf(vals[0][p + kHalf])));
        }
        for (int i = threadIdx.x; i < HD; i += blockDim.x) {
            float v = __bfloat162float(row[v_col + i]);
            if (rope.bias != nullptr) v += __bfloat162float(rope.bias[v_col + i]);
            vals[1][i] = __bfloat162float(__float2bfloat16(v));
            mv = fmaxf(mv, fabsf(vals[1][i]));
        }
        // block_max synchronises: vals are complete after the first call.
        const float sk = fp8_scale(block_max(mk, scratch));
        const float sv = fp8_scale(block_max(mv, scratch));
        uint8_t* kc = static_cast<uint8_t*>(rope.k_cache) + r * HD;
        uint8_t* vc = static_cast<uint8_t*>(rope.v_cache) + r * HD;
        for (int i = 2 * threadIdx.x; i < HD; i += 2 * blockDim.x) {
            const uint16_t a = to_e4m3x2(vals[0][i] / sk, vals[0][i + 1] / sk);
            const uint16_t b = to_e4m3x2(vals[1][i] / sv, vals[1][i + 1] / sv);
            *reinterpret_cast<uint16_t*>(new_k + i) = a;
            *reinterpret_cast<uint16_t*>(kc + i) = a;
            *reinterpret_cast<uint16_t*>(new_v + i) = b;
            *reinterpret_cast<uint16_t*>(vc + i) = b;
        }
        if (threadIdx.x == 0) {
            new_scale[0] = rope.k_scales[r] = sk;
            new_scale[1] = rope.v_scales[r] = sv;
        }
    }
}

// Grid (n_tokens, n_kv, n_splits), kDecodeThreads threads. Token t of sequence token_seq[t] sits
// at position positions[t] and sees keys 0..=positions[t]; token_seq[t] < 0 marks a row to skip.
// q row t starts at q + t * q_stride (the fused QKV output). Each split writes part_o [n_tokens,
// n_heads, n_splits, HD] (unnormalised) and part_ml [.., n_splits, 2] and counts itself in
// counters[t, kvh] (zero before the launch, zero again after it); the last one writes the
// group's heads of out [n_tokens, n_heads, HD] (bf16) and, where out_amax is not null, publishes
// their amax into token t's slots (e4m3.cuh) for the FP8 GEMV that quantizes out.
//
// Scores: groups of 8 lanes read one key row with 16-byte loads and reduce its dot products with
// every query head of the group; values: each warp takes every eighth key, each lane a slice of
// the head dimension, and the warps' partial sums are added at the end (in the tile buffers'
// bytes). Score passes past a tile's keys are skipped.
//
// With ROPE (decode-only steps: no other row of the step writes or reads token t's sequence),
// q is the raw QKV row and `rope` says where the new key and value go: every block ropes its
// group's query heads itself, and the one block whose split holds the new position (ctx - 1)
// computes that position's key and value, writes them into the cache and uses them from shared
// memory; no other block reads that position. The same values and cache bytes as
// rope_kv_write(_fp8) followed by the plain kernel.
template <int HD, bool F8, bool ROPE>
__device__ __forceinline__ void attention_decode(const bf16* __restrict__ q, int q_stride,
                                                 const typename KvElem<F8>::T* __restrict__ k_cache,
                                                 const typename KvElem<F8>::T* __restrict__ v_cache,
                                                 const float* __restrict__ k_scales,
                                                 const float* __restrict__ v_scales, const uint32_t* block_tables,
                                                 int max_blocks, const int* token_seq, const uint32_t* positions,
                                                 float* part_o, float* part_ml, uint32_t* counters, bf16* out,
                                                 float* out_amax, int n_heads, int n_kv, int block_size,
                                                 float scale, DecodeRope rope) {
    static_assert(HD == 64 || HD == 128, "head_dim");
    using Kv = typename KvElem<F8>::T;
    using KvVec = typename KvElem<F8>::Vec8;
    constexpr int kRowChunks = HD * (int)sizeof(Kv) / 16;  // 16-byte pieces of one cache row
    constexpr int kWarps = kDecodeThreads / 32;
    constexpr int kKeyLanes = 8;                              // lanes sharing one key row
    constexpr int kKeysPerPass = kDecodeThreads / kKeyLanes;  // 32
    constexpr int kPasses = kDecodeTile / kKeysPerPass;
    constexpr int kVecs = HD / 8 / kKeyLanes;                 // 16-byte vectors per lane per key
    constexpr int kDims = HD / 32;                            // value dims per lane
    // The warps' partial sums (red) are added after the last tile, when the queries, scores and
    // values (qs, scores, vs) are no longer read: they share the bytes (under 48 KB in all).
    constexpr size_t kQsBytes = sizeof(float) * kMaxGroup * HD;
    constexpr size_t kScoresBytes = sizeof(float) * kMaxGroup * kDecodeTile;
    constexpr size_t kTileBytes = kQsBytes + kScoresBytes + sizeof(Kv) * kDecodeTile * HD;
    constexpr size_t kRedBytes = sizeof(float) * kWarps * kMaxGroup * HD;
    __shared__ __align__(16) unsigned char smem[kTileBytes > kRedBytes ? kTileBytes : kRedBytes];
    float(&qs)[kMaxGroup][HD] = *reinterpret_cast<float(*)[kMaxGroup][HD]>(smem);
    float(&scores)[kMaxGroup][kDecodeTile] = *reinterpret_cast<float(*)[kMaxGroup][kDecodeTile]>(smem + kQsBytes);
    Kv(&vs)[kDecodeTile][HD] = *reinterpret_cast<Kv(*)[kDecodeTile][HD]>(smem + kQsBytes + kScoresBytes);
    float(&red)[kWarps][kMaxGroup][HD] = *reinterpret_cast<float(*)[kWarps][kMaxGroup][HD]>(smem);
    __shared__ float m_s[kMaxGroup], l_s[kMaxGroup], alpha_s[kMaxGroup];
    __shared__ float vscale[F8 ? kDecodeTile : 1];

    const int t = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, n_splits = gridDim.z;
    const int group = n_heads / n_kv;
    const int seq = token_seq[t];
    const int ctx = seq < 0 ? 0 : (int)positions[t] + 1;
    int chunk = (ctx + n_splits - 1) / n_splits;
    chunk = max(chunk, 32);
    const int begin = split * chunk, end = min(ctx, begin + chunk);
    const size_t part = ((size_t)t * n_heads + kvh * group) * n_splits + split;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane % kKeyLanes;

    const bf16* qrow = q + (size_t)t * q_stride;
    // The new position's key and value (ROPE), where this block's split holds it.
    __shared__ __align__(16) Kv new_k[ROPE ? HD : 16], new_v[ROPE ? HD : 16];
    __shared__ float new_scale[2];
    int new_pos = -1;
    if constexpr (ROPE) {
        const float pos = (float)positions[t];
        for (int i = threadIdx.x; i < group * HD / 2; i += blockDim.x) {
            const int g = i / (HD / 2), p = i % (HD / 2);
            bf16 y0, y1;
            rope_pair(qrow, rope.bias, pos, rope.inv_freq, kvh * group + g, HD, p, y0, y1);
            qs[g][p] = __bfloat162float(y0) * scale * kLog2e;
            qs[g][p + HD / 2] = __bfloat162float(y1) * scale * kLog2e;
        }
        const uint32_t slot = rope.slots[t];
        if (seq >= 0 && slot != 0xffffffffu && begin <= ctx - 1 && ctx - 1 < end) {  // uniform over the block
            new_pos = ctx - 1;
            decode_write_new_kv<HD, F8>(qrow, rope, pos, n_heads, n_kv, kvh, (size_t)slot * n_kv + kvh, new_k, new_v,
                                        new_scale);
        }
    } else {
        for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
            const int g = i / HD, d = i % HD;
            qs[g][d] = __bfloat162float(qrow[(kvh * group + g) * HD + d]) * scale * kLog2e;
        }
    }
    if (threadIdx.x < kMaxGroup) {
        m_s[threadIdx.x] = -INFINITY;
        l_s[threadIdx.x] = 0.f;
    }
    const uint32_t* table = block_tables + (size_t)max(seq, 0) * max_blocks;
    float acc[kMaxGroup][kDims];
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
        for (int e = 0; e < kDims; ++e) acc[g][e] = 0.f;
    __syncthreads();

    for (int tile = begin; tile < end; tile += kDecodeTile) {
        const int n_keys = min(kDecodeTile, end - tile);
        // The tile's values stream into shared memory while the scores are computed.
        for (int i = threadIdx.x; i < n_keys * kRowChunks; i += blockDim.x) {
            const int j = i / kRowChunks, c = i % kRowChunks;
            char* dst = reinterpret_cast<char*>(&vs[j][0]) + c * 16;
            if (ROPE && tile + j == new_pos) {
                *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(new_v) + c * 16);
                continue;
            }
            const size_t r = kv_row(table, block_size, tile + j, n_kv, kvh);
            cp_async16(dst, reinterpret_cast<const char*>(v_cache + r * HD) + c * 16);
        }
        if constexpr (F8)
            for (int j = threadIdx.x; j < n_keys; j += blockDim.x)
                vscale[j] = ROPE && tile + j == new_pos ? new_scale[1]
                                                        : v_scales[kv_row(table, block_size, tile + j, n_kv, kvh)];
        // Scores.
        // Passes past the tile's keys (a split of fewer keys than a tile) are skipped.
        KvVec kv[kPasses][kVecs];
        float kscale[kPasses];
#pragma unroll
        for (int p = 0; p < kPasses; ++p) {
            if (p * kKeysPerPass >= n_keys) break;
            const int j = p * kKeysPerPass + threadIdx.x / kKeyLanes;
            kscale[p] = 1.f;
            if (ROPE && j < n_keys && tile + j == new_pos) {
                const KvVec* krow = reinterpret_cast<const KvVec*>(new_k);
#pragma unroll
                for (int v = 0; v < kVecs; ++v) kv[p][v] = load_kv_shared(krow + sub + kKeyLanes * v);
                if constexpr (F8) kscale[p] = new_scale[0];
            } else if (j < n_keys) {
                const size_t r = kv_row(table, block_size, tile + j, n_kv, kvh);
                const KvVec* krow = reinterpret_cast<const KvVec*>(k_cache + r * HD);
#pragma unroll
                for (int v = 0; v < kVecs; ++v) kv[p][v] = load_kv_vec(krow + sub + kKeyLanes * v);
                if constexpr (F8) kscale[p] = k_scales[r];
            } else {
#pragma unroll
                for (int v = 0; v < kVecs; ++v) kv[p][v] = KvVec{};
            }
        }
#pragma unroll
        for (int p = 0; p < kPasses; ++p) {
            if (p * kKeysPerPass >= n_keys) break;
            const int j = p * kKeysPerPass + threadIdx.x / kKeyLanes;
            float kf[kVecs][8];
#pragma unroll
            for (int v = 0; v < kVecs; ++v) unpack(kv[p][v], kf[v]);
#pragma unroll
            for (int g = 0; g < kMaxGroup; ++g) {
                if (g >= group) break;
                float s = 0.f;
#pragma unroll
                for (int v = 0; v < kVecs; ++v) {
                    // The lane's eight query values in two 16-byte shared loads.
                    const float4* qv = reinterpret_cast<const float4*>(&qs[g][(sub + kKeyLanes * v) * 8]);
                    const float4 a = qv[0], b = qv[1];
                    s = fmaf(kf[v][0], a.x, s);
                    s = fmaf(kf[v][1], a.y, s);
                    s = fmaf(kf[v][2], a.z, s);
                    s = fmaf(kf[v][3], a.w, s);
                    s = fmaf(kf[v][4], b.x, s);
                    s = fmaf(kf[v][5], b.y, s);
                    s = fmaf(kf[v][6], b.z, s);
                    s = fmaf(kf[v][7], b.w, s);
                }
                s += __shfl_xor_sync(0xffffffffu, s, 4);
                s += __shfl_xor_sync(0xffffffffu, s, 2);
                s += __shfl_xor_sync(0xffffffffu, s, 1);
                if (sub == 0) scores[g][j] = j < n_keys ? s * kscale[p] : -INFINITY;
            }
        }
        cp_async_wait_all();
        __syncthreads();
        // Online softmax, one warp per head.
        for (int g = warp; g < group; g += kWarps) {
            // Keys past n_keys (their pass skipped, or past the tile's end) score -inf.
            const float s0 = lane < n_keys ? scores[g][lane] : -INFINITY;
            const float s1 = lane + 32 < n_keys ? scores[g][lane + 32] : -INFINITY;
            const float m_old = m_s[g];
            const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
            const float p0 = exp2f(s0 - m_new), p1 = exp2f(s1 - m_new);
            scores[g][lane] = p0;
            scores[g][lane + 32] = p1;
            const float sum = warp_sum(p0 + p1);
            if (lane == 0) {
                const float alpha = exp2f(m_old - m_new);
                alpha_s[g] = alpha;
                l_s[g] = l_s[g] * alpha + sum;
                m_s[g] = m_new;
            }
        }
        __syncthreads();
        // Values.
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
            if (g >= group) break;
            const float a = alpha_s[g];
#pragma unroll
            for (int e = 0; e < kDims; ++e) acc[g][e] *= a;
        }
#pragma unroll 4
        for (int j = warp; j < n_keys; j += kWarps) {
            const Kv* vrow = &vs[j][lane * kDims];
            float vf[kDims];
            if constexpr (F8) {
                const float sc = vscale[j];
#pragma unroll
                for (int e = 0; e < kDims; e += 2) {
                    const float2 f = from_e4m3x2(*reinterpret_cast<const uint16_t*>(vrow + e));
                    vf[e] = f.x * sc;
                    vf[e + 1] = f.y * sc;
                }
            } else if constexpr (kDims == 4) {
                const uint2 raw = *reinterpret_cast<const uint2*>(vrow);
                const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
                const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
                vf[0] = a.x;
                vf[1] = a.y;
                vf[2] = b.x;
                vf[3] = b.y;
            } else {
                const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(vrow));
                vf[0] = a.x;
                vf[1] = a.y;
            }
#pragma unroll
            for (int g = 0; g < kMaxGroup; ++g) {
                if (g >= group) break;
                const float p = scores[g][j];
#pragma unroll
                for (int e = 0; e < kDims; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
            }
        }
        __syncthreads();
    }
    // Add the warps' partial sums.
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
        if (g >= group) break;
#pragma unroll
        for (int e = 0; e < kDims; ++e) red[warp][g][lane * kDims + e] = acc[g][e];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD;
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) o += red[w][g][d];
        part_o[(part + (size_t)g * n_splits) * HD + d] = o;
    }
    if (threadIdx.x < group) {
        part_ml[(part + (size_t)threadIdx.x * n_splits) * 2] = m_s[threadIdx.x];
        part_ml[(part + (size_t)threadIdx.x * n_splits) * 2 + 1] = l_s[threadIdx.x];
    }
    // The last split of this (token, KV head) to finish merges them all.
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const uint32_t done = atomicAdd(&counters[(size_t)t * n_kv + kvh], 1u);
        last = done + 1 == (uint32_t)n_splits;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const size_t head0 = (size_t)t * n_heads + kvh * group;
    // Other blocks wrote the partials: read them through L2 (ld.cg), never a stale L1 line.
    // Each split's weight per head, one warp per head (n_splits <= 32, lane s holds split s) ...
    __shared__ float weight[kMaxGroup][kMaxSplits];
    __shared__ float inv_l[kMaxGroup];
    for (int g = warp; g < group; g += kWarps) {
        const size_t base = (head0 + g) * n_splits;
        const float ms = lane < n_splits ? __ldcg(&part_ml[(base + lane) * 2]) : -INFINITY;
        const float ls = lane < n_splits ? __ldcg(&part_ml[(base + lane) * 2 + 1]) : 0.f;
        const float m = warp_max(ms);
        const float w = ms == -INFINITY ? 0.f : exp2f(ms - m);
        const float l = warp_sum(ls * w);
        if (lane < n_splits) weight[g][lane] = w;
        if (lane == 0) inv_l[g] = seq < 0 || l == 0.f ? 0.f : 1.f / l;
    }
    __syncthreads();
    // ... then four dims of one head per thread, every split's load in flight at once.
    float amax = 0.f;
    for (int i = threadIdx.x; i < group * HD / 4; i += blockDim.x) {
        const int g = i / (HD / 4), d4 = i % (HD / 4);
        const size_t base = (head0 + g) * n_splits;
        float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int s = 0; s < n_splits; ++s) {
            const float w = weight[g][s];
            const float4 p = __ldcg(reinterpret_cast<const float4*>(part_o + (base + s) * HD) + d4);
            o.x = fmaf(w, p.x, o.x);
            o.y = fmaf(w, p.y, o.y);
            o.z = fmaf(w, p.z, o.z);
            o.w = fmaf(w, p.w, o.w);
        }
        const float r = inv_l[g];
        __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(out + (head0 + g) * HD + 4 * d4);
        const __nv_bfloat162 lo = __floats2bfloat162_rn(o.x * r, o.y * r), hi = __floats2bfloat162_rn(o.z * r, o.w * r);
        dst[0] = lo;
        dst[1] = hi;
        const float2 a = __bfloat1622float2(lo), b = __bfloat1622float2(hi);
        amax = fmaxf(fmaxf(amax, fmaxf(fabsf(a.x), fabsf(a.y))), fmaxf(fabsf(b.x), fabsf(b.y)));
    }
    if (out_amax != nullptr) {
        amax = warp_max(amax);
        if (lane == 0) amax_publish(out_amax, t, kvh * kWarps + warp, amax);
    }
    if (threadIdx.x == 0) counters[(size_t)t * n_kv + kvh] = 0;  // ready for the next launch
}

// ---- Prefill ----

constexpr int kTileQ = 64, kTileK = 64, kPrefillThreads = 128;

template <int HD>
struct PrefillSmem {
    static constexpr int kLdh = HD + 8;       // bf16 rows of Q, K, V
    static constexpr int kLdS = kTileK + 4;   // f32 scores
    static constexpr int kLdP = kTileK + 8;   // bf16 probabilities
    static constexpr int kLdO = HD + 4;       // f32 output accumulator
    static constexpr size_t kQ = 0;
    static constexpr size_t kK = kQ + sizeof(bf16) * kTileQ * kLdh;
    static constexpr size_t kV = kK + sizeof(bf16) * kTileK * kLdh;
    static constexpr size_t kS = kV + sizeof(bf16) * kTileK * kLdh;
    static constexpr size_t kP = kS + sizeof(float) * kTileQ * kLdS;
    static constexpr size_t kO = kP + sizeof(bf16) * kTileQ * kLdP;
    static constexpr size_t kM = kO + sizeof(float) * kTileQ * kLdO;
    static constexpr size_t kBytes = kM + sizeof(float) * 3 * kTileQ;
};

// Grid (n_tiles, n_heads), kPrefillThreads threads, PrefillSmem<HD>::kBytes of dynamic shared
// memory. Tile i covers query tokens tile_start[i] .. +64 of sequence tile_seq[i] (rows past
// query_starts[seq + 1] are ignored). Sequence s's tokens sit at positions
// context_lens[s] - n_new(s) .. context_lens[s] - 1.
template <int HD, bool F8>
__device__ __forceinline__ void attention_prefill(const bf16* __restrict__ q, int q_stride,
                                                  const typename KvElem<F8>::T* __restrict__ k_cache,
                                                  const typename KvElem<F8>::T* __restrict__ v_cache,
                                                  const float* __restrict__ k_scales,
                                                  const float* __restrict__ v_scales, const uint32_t* block_tables,
                                                  int max_blocks, const uint32_t* query_starts,
                                                  const uint32_t* context_lens, const int* tile_seq,
                                                  const uint32_t* tile_start, bf16* out, int n_heads, int n_kv,
                                                  int block_size, float scale) {
    using namespace nvcuda;
    using L = PrefillSmem<HD>;
    extern __shared__ __align__(128) unsigned char smem[];
    bf16* qs = reinterpret_cast<bf16*>(smem + L::kQ);
    bf16* ks = reinterpret_cast<bf16*>(smem + L::kK);
    bf16* vs = reinterpret_cast<bf16*>(smem + L::kV);
    float* ss = reinterpret_cast<float*>(smem + L::kS);
    bf16* ps = reinterpret_cast<bf16*>(smem + L::kP);
    float* os = reinterpret_cast<float*>(smem + L::kO);
    float* m_s = reinterpret_cast<float*>(smem + L::kM);
    float* l_s = m_s + kTileQ;
    float* a_s = l_s + kTileQ;

    const int seq = tile_seq[blockIdx.x], h = blockIdx.y, kvh = h / (n_heads / n_kv);
    const int q0 = (int)tile_start[blockIdx.x];
    const int q_end = (int)query_starts[seq + 1];
    const int n_new = q_end - (int)query_starts[seq];
    const int ctx = (int)context_lens[seq];
    const int first_pos = ctx - n_new + (q0 - (int)query_starts[seq]);
    const int rows = min(kTileQ, q_end - q0);
    const int last_pos = first_pos + rows - 1;
    const uint32_t* table = block_tables + (size_t)seq * max_blocks;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

    // Q tile (zeros past the last row), O and the softmax state.
    for (int i = threadIdx.x; i < kTileQ * HD / 8; i += blockDim.x) {
        const int r = i / (HD / 8), c = i % (HD / 8);
        Bf16x8 v = {};
        if (r < rows) v = reinterpret_cast<const Bf16x8*>(q + (size_t)(q0 + r) * q_stride + h * HD)[c];
        *reinterpret_cast<Bf16x8*>(qs + r * L::kLdh + c * 8) = v;
    }
    for (int i = threadIdx.x; i < kTileQ * HD; i += blockDim.x) os[(i / HD) * L::kLdO + i % HD] = 0.f;
    if (threadIdx.x < kTileQ) {
        m_s[threadIdx.x] = -INFINITY;
        l_s[threadIdx.x] = 0.f;
    }
    const float scale_log2 = scale * kLog2e;

    for (int k0 = 0; k0 <= last_pos; k0 += kTileK) {
        __syncthreads();
        for (int i = threadIdx.x; i < kTileK * HD / 8; i += blockDim.x) {
            const int r = i / (HD / 8), c = i % (HD / 8);
            Bf16x8 kv = {}, vv = {};
            if (k0 + r <= last_pos) {
                const size_t row = kv_row(table, block_size, k0 + r, n_kv, kvh);
                if constexpr (F8) {
                    // Dequantized and rounded to bf16 for the tensor cores.
                    float kf[8], vf[8];
                    unpack(reinterpret_cast<const uint2*>(k_cache + row * HD)[c], kf);
                    unpack(reinterpret_cast<const uint2*>(v_cache + row * HD)[c], vf);
                    const float ks = k_scales[row], vsc = v_scales[row];
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        kf[e] *= ks;
                        vf[e] *= vsc;
                    }
                    kv = pack(kf);
                    vv = pack(vf);
                } else {
                    kv = reinterpret_cast<const Bf16x8*>(k_cache + row * HD)[c];
                    vv = reinterpret_cast<const Bf16x8*>(v_cache + row * HD)[c];
                }
            }
            *reinterpret_cast<Bf16x8*>(ks + r * L::kLdh + c * 8) = kv;
            *reinterpret_cast<Bf16x8*>(vs + r * L::kLdh + c * 8) = vv;
        }
        __syncthreads();
        // S = Q K^T for this warp's 16 rows.
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kTileK / 16];
#pragma unroll
            for (int c = 0; c < kTileK / 16; ++c) wmma::fill_fragment(acc[c], 0.f);
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
                wmma::load_matrix_sync(a, qs + warp * 16 * L::kLdh + kk * 16, L::kLdh);
#pragma unroll
                for (int c = 0; c < kTileK / 16; ++c) {
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> b;
                    wmma::load_matrix_sync(b, ks + c * 16 * L::kLdh + kk * 16, L::kLdh);
                    wmma::mma_sync(acc[c], a, b, acc[c]);
                }
            }
#pragma unroll
            for (int c = 0; c < kTileK / 16; ++c)
                wmma::store_matrix_sync(ss + warp * 16 * L::kLdS + c * 16, acc[c], L::kLdS, wmma::mem_row_major);
        }
        __syncwarp();
        // Online softmax over the warp's rows; lane owns columns lane and lane + 32.
        for (int r = warp * 16; r < warp * 16 + 16; ++r) {
            const int pos = first_pos + r;
            float s0 = ss[r * L::kLdS + lane] * scale_log2, s1 = ss[r * L::kLdS + lane + 32] * scale_log2;
            if (r >= rows || k0 + lane > pos) s0 = -INFINITY;
            if (r >= rows || k0 + lane + 32 > pos) s1 = -INFINITY;
            const float m_old = m_s[r];
            const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
            float p0 = 0.f, p1 = 0.f, alpha = 1.f;
            if (m_new != -INFINITY) {
                p0 = exp2f(s0 - m_new);
                p1 = exp2f(s1 - m_new);
                alpha = exp2f(m_old - m_new);
            }
            ps[r * L::kLdP + lane] = __float2bfloat16(p0);
            ps[r * L::kLdP + lane + 32] = __float2bfloat16(p1);
            const float sum = warp_sum(p0 + p1);
            if (lane == 0) {
                l_s[r] = l_s[r] * alpha + sum;
                m_s[r] = m_new;
                a_s[r] = alpha;
            }
        }
        __syncwarp();
        for (int i = lane; i < 16 * HD; i += 32) {
            const int r = warp * 16 + i / HD;
            os[r * L::kLdO + i % HD] *= a_s[r];
        }
        __syncwarp();
        // O += P V for the warp's rows.
#pragma unroll
        for (int c = 0; c < HD / 16; ++c) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
            wmma::load_matrix_sync(o, os + warp * 16 * L::kLdO + c * 16, L::kLdO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < kTileK / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> b;
                wmma::load_matrix_sync(a, ps + warp * 16 * L::kLdP + kk * 16, L::kLdP);
                wmma::load_matrix_sync(b, vs + kk * 16 * L::kLdh + c * 16, L::kLdh);
                wmma::mma_sync(o, a, b, o);
            }
            wmma::store_matrix_sync(os + warp * 16 * L::kLdO + c * 16, o, L::kLdO, wmma::mem_row_major);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * HD; i += blockDim.x) {
        const int r = i / HD, d = i % HD;
        const float l = l_s[r];
        out[((size_t)(q0 + r) * n_heads + h) * HD + d] = __float2bfloat16(l > 0.f ? os[r * L::kLdO + d] / l : 0.f);
    }
}

}  // namespace flint
