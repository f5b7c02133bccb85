// One-shot all-reduce among the GPUs of one process over peer-to-peer (NVLink) loads, optionally
// fused with the residual add and RMSNorm that follow a row-parallel projection.
//
// Every rank writes its input into its own peer-readable buffer (the projection's output); each
// rank then reads all ranks' buffers and sums them in rank order, so every rank holds the same
// bits. Ranks meet with one flag write per peer and block:
//
//   flags[r]: [kMaxBlocks][kMaxRanks] u32 on rank r's GPU; flags[r][b][p] is the last call of
//             block b at which rank p arrived.
//   counter:  [kMaxBlocks] u32 on this GPU: calls block b has made.
//
// Block b of rank r, at call c = counter[b] + 1: thread p < world stores c into flags[p][b][r]
// (release, system scope), then waits until flags[r][b][p] >= c (acquire). Every rank launches
// the same calls with the same grids, so the counters agree.
//
// Safety of the inputs without a second barrier: callers alternate between two input buffers
// (slot 0 and 1). Rank p writes a slot's buffer again for call c + 2 only after its call c + 1,
// whose block 0 waited for every rank to arrive at c + 1, that is, to have finished call c.
#pragma once

#include <cooperative_groups.h>

#include "flint/e4m3.cuh"

namespace flint {

constexpr int kArMaxRanks = 8;
constexpr int kArMaxBlocks = 64;

struct ArPeers {
    const bf16* data[kArMaxRanks];
    uint32_t* flags[kArMaxRanks];
};

__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// A 16-byte load that skips L1 (peer memory is not coherent with this SM's L1).
__device__ __forceinline__ Bf16x8 load_cg(const bf16* p) {
    int4 r;
    asm volatile("ld.global.cg.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p)
                 : "memory");
    return *reinterpret_cast<Bf16x8*>(&r);
}

__device__ __forceinline__ uint64_t global_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The flag barrier of this block. A rank that never arrives (it failed) stops the kernel with a
// trap after `kArTimeoutNs`, which fails this GPU's stream instead of hanging it.
constexpr uint64_t kArTimeoutNs = 20ull * 1000 * 1000 * 1000;

__device__ __forceinline__ void ar_barrier(const ArPeers& peers, uint32_t* counter, int rank, int world) {
    __shared__ uint32_t call;
    if (threadIdx.x == 0) call = counter[blockIdx.x] + 1;
    __syncthreads();
    const uint32_t c = call;
    if (threadIdx.x < world) {
        const int p = threadIdx.x;
        st_release_sys(peers.flags[p] + blockIdx.x * kArMaxRanks + rank, c);
        const uint32_t* mine = peers.flags[rank] + blockIdx.x * kArMaxRanks + p;
        const uint64_t start = global_ns();
        while ((int32_t)(ld_acquire_sys(mine) - c) < 0) {
            if (global_ns() - start > kArTimeoutNs) {
                printf("flint all-reduce: rank %d block %d waited 20 s for rank %d; trapping\n", rank,
                       (int)blockIdx.x, p);
                __trap();
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) counter[blockIdx.x] = c;
}

// Vector i (8 values) of the sum over ranks, in rank order, rounded to bf16 (as NCCL's BF16 sum).
__device__ __forceinline__ void ar_sum8(const ArPeers& peers, int world, size_t i, float (&s)[8]) {
    Bf16x8 v[kArMaxRanks];
#pragma unroll
    for (int p = 0; p < kArMaxRanks; ++p)
        if (p < world) v[p] = load_cg(peers.data[p] + i * 8);
    unpack(v[0], s);
#pragma unroll
    for (int p = 1; p < kArMaxRanks; ++p) {
        if (p < world) {
            float a[8];
            unpack(v[p], a);
#pragma unroll
            for (int j = 0; j < 8; ++j) s[j] += a[j];
        }
    }
    Bf16x8 rounded = pack(s);
    unpack(rounded, s);
}

// out[i] = sum over ranks of data[i], for `n8` vectors of 8 bf16, grid-strided.
__device__ __forceinline__ void ar_sum_all(const ArPeers& peers, uint32_t* counter, bf16* out, size_t n8, int rank,
                                           int world) {
    ar_barrier(peers, counter, rank, world);
    Bf16x8* o = reinterpret_cast<Bf16x8*>(out);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += (size_t)gridDim.x * blockDim.x) {
        float s[8];
        ar_sum8(peers, world, i, s);
        o[i] = pack(s);
    }
}

// Where the normalised rows go: bf16 rows, or (FP8 models) E4M3 codes with a scale per row,
// as add_rms_norm_fp8_row writes them (the normalised values rounded to bf16, then quantized).
struct ArNormOut {
    bf16* rows;       // bf16 [n, hidden], or null
    uint8_t* codes;   // FP8 [n, hidden] (when rows is null)
    float* scales;    // [n]
};

// Vector i of a row's normalised values (rounded to bf16): the bf16 model's activation.
__device__ __forceinline__ void ar_normed8(const Bf16x8& res, const float* weight, float r, float (&v)[8]) {
    unpack(res, v);
    rms_scale8(v, weight, r);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __bfloat162float(__float2bfloat16(v[j]));
}

__device__ __forceinline__ float abs_max8(const float (&v)[8]) {
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j]));
    return m;
}

// For each of `n` rows of `hidden`: residual += sum over ranks (bf16), then
// out = rms_norm(residual) * weight, as add_rms_norm_row (or add_rms_norm_fp8_row for FP8
// output). Rows are spread over the blocks.
__device__ __forceinline__ void ar_add_rms_norm_rows(const ArPeers& peers, uint32_t* counter, bf16* residual,
                                                     const float* weight, ArNormOut out, int n, int hidden,
                                                     float eps, int rank, int world) {
    __shared__ float scratch[32];
    ar_barrier(peers, counter, rank, world);
    const int h8 = hidden / 8;
    for (int row = blockIdx.x; row < n; row += gridDim.x) {
        Bf16x8* res = reinterpret_cast<Bf16x8*>(residual + (size_t)row * hidden);
        float ss = 0.f;
        for (int i = threadIdx.x; i < h8; i += blockDim.x) {
            float s[8], v[8];
            ar_sum8(peers, world, (size_t)row * h8 + i, s);
            residual_add8(res[i], s, v, ss);
        }
        const float r = rsqrtf(block_sum(ss, scratch) / hidden + eps);
        if (out.rows != nullptr) {
            Bf16x8* o = reinterpret_cast<Bf16x8*>(out.rows + (size_t)row * hidden);
            for (int i = threadIdx.x; i < h8; i += blockDim.x) {
                float v[8];
                unpack(res[i], v);
                rms_scale8(v, weight + i * 8, r);
                o[i] = pack(v);
            }
        } else {
            float m = 0.f;
            for (int i = threadIdx.x; i < h8; i += blockDim.x) {
                float v[8];
                ar_normed8(res[i], weight + i * 8, r, v);
                m = fmaxf(m, abs_max8(v));
            }
            __syncthreads();  // scratch reuse
            const float scale = fp8_scale(block_max(m, scratch));
            for (int i = threadIdx.x; i < h8; i += blockDim.x) {
                float v[8];
                ar_normed8(res[i], weight + i * 8, r, v);
                store_e4m3x8(out.codes + (size_t)row * hidden + i * 8, v, scale);
            }
            if (threadIdx.x == 0) out.scales[row] = scale;
        }
        __syncthreads();
    }
}

// ar_add_rms_norm_rows with each row spread over a cluster of kCluster blocks (one row of
// a decode step is too little work for one SM to fetch from every peer quickly): block c of a
// cluster takes vectors [c * chunk, (c + 1) * chunk) of the row, and the blocks add their
// sums of squares (and, for FP8 output, take the max of their amax) through distributed shared
// memory. Rows go to clusters in turn.
constexpr int kArCluster = 8;

__device__ __forceinline__ void ar_add_rms_norm_cluster(const ArPeers& peers, uint32_t* counter, bf16* residual,
                                                        const float* weight, ArNormOut out, int n, int hidden,
                                                        float eps, int rank, int world) {
    namespace cg = cooperative_groups;
    __shared__ float scratch[32];
    __shared__ float partial, partial_max;
    cg::cluster_group cluster = cg::this_cluster();
    ar_barrier(peers, counter, rank, world);
    const int c = (int)cluster.block_rank();
    const int chunk = hidden / 8 / kArCluster;
    const int n_clusters = gridDim.x / kArCluster;
    for (int row = blockIdx.x / kArCluster; row < n; row += n_clusters) {
        Bf16x8* res = reinterpret_cast<Bf16x8*>(residual + (size_t)row * hidden);
        const size_t base = (size_t)row * (hidden / 8);
        float ss = 0.f;
        for (int i = c * chunk + threadIdx.x; i < (c + 1) * chunk; i += blockDim.x) {
            float s[8], v[8];
            ar_sum8(peers, world, base + i, s);
            residual_add8(res[i], s, v, ss);
        }
        ss = block_sum(ss, scratch);
        if (threadIdx.x == 0) partial = ss;
        cluster.sync();
        float total = 0.f;
        for (int b = 0; b < kArCluster; ++b) total += *cluster.map_shared_rank(&partial, b);
        // Every block has read every partial before any block overwrites its own.
        cluster.sync();
        const float r = rsqrtf(total / hidden + eps);
        if (out.rows != nullptr) {
            Bf16x8* o = reinterpret_cast<Bf16x8*>(out.rows + (size_t)row * hidden);
            for (int i = c * chunk + threadIdx.x; i < (c + 1) * chunk; i += blockDim.x) {
                float v[8];
                unpack(res[i], v);
                rms_scale8(v, weight + i * 8, r);
                o[i] = pack(v);
            }
            continue;
        }
        float m = 0.f;
        for (int i = c * chunk + threadIdx.x; i < (c + 1) * chunk; i += blockDim.x) {
            float v[8];
            ar_normed8(res[i], weight + i * 8, r, v);
            m = fmaxf(m, abs_max8(v));
        }
        __syncthreads();  // scratch reuse
        m = block_max(m, scratch);
        if (threadIdx.x == 0) partial_max = m;
        cluster.sync();
        float amax = 0.f;
        for (int b = 0; b < kArCluster; ++b) amax = fmaxf(amax, *cluster.map_shared_rank(&partial_max, b));
        cluster.sync();
        const float scale = fp8_scale(amax);
        for (int i = c * chunk + threadIdx.x; i < (c + 1) * chunk; i += blockDim.x) {
            float v[8];
            ar_normed8(res[i], weight + i * 8, r, v);
            store_e4m3x8(out.codes + (size_t)row * hidden + i * 8, v, scale);
        }
        if (c == 0 && threadIdx.x == 0) out.scales[row] = scale;
    }
}

}  // namespace flint
